"""What a user sees without opening TensorBoard: the summary, the progress bar, repr, tables."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from models import Scripted, fit, read_scalars

from lightning_escape import EscapeCallback, LRKick, StallDetector
from lightning_escape.policy import ESCAPABLE
from lightning_escape.tables import to_csv, to_markdown

KICK_TRACE = [1.0] * 40 + [0.5] * 40


def _escape(**kwargs: object) -> EscapeCallback:
    return EscapeCallback(
        StallDetector(patience=20, warmup_steps=0, check_every_n_steps=5, smoothing=0.0),
        probation_steps=20,
        max_escapes=1,
        ladders={k: [LRKick(factor=10.0, steps=5)] for k in ESCAPABLE},
        **kwargs,  # type: ignore[arg-type]
    )


class ProgressBarFields(Callback):
    def __init__(self) -> None:
        self.seen: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.seen[trainer.global_step - 1] = dict(trainer.progress_bar_metrics)


def test_the_summary_at_the_end_of_fit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    escape, fields = _escape(), ProgressBarFields()
    logger = TensorBoardLogger(tmp_path, name="tb")
    with caplog.at_level(logging.INFO):
        trainer = fit(Scripted(KICK_TRACE), [escape, fields], max_steps=80, logger=logger)
    # Probation fills up between the escape at step 24 and its verdict at step 44.
    assert [fields.seen[s]["probation"] for s in (25, 34, 43, 44)] == pytest.approx(
        [0.05, 0.5, 0.95, 0.0]
    )
    facts = escape.summary()
    assert facts == {
        "stalls": {"plateau": 2},  # the second one, after the kept escape, finds the budget spent
        "held_off": 0,
        "held_off_training": 0,
        "escapes": {"LRKick": {"accepted": 1}},
        "kept": 1,
        "neutral": 0,
        "rolled_back": 0,
        "probation_steps": 20,
        "wasted_steps": 0,
        "steps": 80,
        "per_coordinate_steps": False,
        "log_dir": logger.log_dir,
    }
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("EscapeCallback:")]
    assert said == [
        "EscapeCallback: 2 stalls in 80 steps (plateau 2); 1 escape (LRKick: 1 kept); "
        f"20 steps on probation, 0 wasted in rollbacks. Logs: {logger.log_dir}."
    ]
    # The progress bar shows how close the run is to a stall, and how far probation has come.
    assert trainer.progress_bar_metrics["stall"] == pytest.approx(
        escape.detector.tracker.status().score
    )
    assert trainer.progress_bar_metrics["probation"] == 0.0  # judged: none on probation now
    # The progress bar fields are not sent to the loggers.
    assert not {"stall", "probation"} & set(read_scalars(logger.log_dir))


def test_the_summary_names_the_tensorboard_run_whichever_logger_comes_first(
    tmp_path: Path,
) -> None:
    # With `logger=[CSVLogger, TensorBoardLogger]` it named the CSV directory, where the texts
    # are not and `lightning-escape report` finds no event files.
    from lightning.pytorch.loggers import CSVLogger

    from lightning_escape.report import load_run

    escape = _escape()
    board = TensorBoardLogger(tmp_path, name="tb")
    fit(Scripted(KICK_TRACE), [escape], max_steps=80, logger=[CSVLogger(tmp_path), board])
    assert escape.summary()["log_dir"] == board.log_dir
    assert [e.action for e in load_run(board.log_dir).escapes()] == ["LRKick(factor=10.0, steps=5)"]


def test_a_detector_alone_sums_up_too(caplog: pytest.LogCaptureFixture) -> None:
    detector = StallDetector(patience=20, warmup_steps=0, check_every_n_steps=5, smoothing=0.0)
    with caplog.at_level(logging.INFO):
        fit(Scripted([1.0] * 60), [detector], max_steps=60)
    assert detector.summary() == {
        "stalls": {"plateau": 1},
        "held_off": 0,
        "held_off_training": 0,
        "steps": 60,
        "log_dir": None,
    }
    assert any(
        r.getMessage()
        == "StallDetector: 1 stall in 60 steps (plateau 1). No logger: nothing was written."
        for r in caplog.records
    )


def test_reprs_say_what_a_callback_is_and_has_done() -> None:
    escape = _escape()
    assert repr(escape) == (
        "EscapeCallback(StallDetector(training loss, mode='min', patience=20, 0 diagnoses), "
        "probation_steps=20, 0 escapes, 0 kept)"
    )
    assert repr(escape.policy.ladders["plateau"][0]) == "LRKick(factor=10.0, steps=5)"
    assert repr(escape.detector.classifier) == "StallClassifier(probe=True)"


def test_events_and_diagnoses_as_csv_and_markdown(tmp_path: Path) -> None:
    escape = _escape()
    fit(Scripted(KICK_TRACE), [escape], max_steps=80)
    rows = list(csv.DictReader(io.StringIO(to_csv(escape.events, tmp_path / "events.csv"))))
    assert (tmp_path / "events.csv").read_text().startswith("step,diagnosis,action,")
    assert [(r["step"], r["action"], r["verdict"], r["end_step"]) for r in rows] == [
        ("24", "LRKick(factor=10.0, steps=5)", "accepted", "44")
    ]
    table = to_markdown(escape.diagnoses, columns=("step", "kind", "reason"))
    lines = table.splitlines()
    assert lines[:2] == ["| step | kind | reason |", "|---|---|---|"]
    assert lines[2].startswith("| 24 | plateau | loss 1 has not improved")
    evidence = next(csv.DictReader(io.StringIO(to_csv(escape.diagnoses))))["evidence"]
    assert '"smoothed": 1.0' in evidence  # nested evidence is one JSON cell
    with pytest.raises(ValueError, match="`columns` \\['nope'\\] are not fields of EscapeEvent"):
        to_csv(escape.events, columns=("nope",))
    # None gave '', a column name as a string was read letter by letter, and a mixed list raised
    # asdict()'s TypeError without naming `records`.
    for records, columns, match in [
        (None, None, "`records` must be a list of dataclass instances, got None"),
        (escape.events, "step", "`columns` must be a list of field names or None, got 'step'"),
        ([*escape.events, 1], None, "dataclass instances of one type, got EscapeEvent and int"),
    ]:
        with pytest.raises(ValueError, match=match):
            to_csv(records, columns=columns)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=match):
            to_markdown(records, columns=columns)  # type: ignore[arg-type]


def test_the_report_goes_into_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(Scripted(KICK_TRACE), [_escape(report=True)], max_steps=80, logger=logger)
    ea = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    ea.Reload()
    [image] = ea.Images("escape/report")
    assert image.step == 79 and image.width > 1000 and image.height > 600


def test_a_callback_that_never_watched_a_step_has_seen_none() -> None:
    # As the parent process's copy under ddp_spawn: nothing ran in it.
    assert EscapeCallback().summary()["steps"] == 0
    assert StallDetector().summary()["steps"] == 0
    assert "0 stalls in 0 steps" in EscapeCallback().summary_text()


def test_a_second_fit_of_the_same_trainer_counts_its_own_steps() -> None:
    # The second fit goes on from step 40 to step 70: it said "in 70 steps" beside the stalls of
    # its own 30 steps (what the first fit found is forgotten at the start of the next).
    from models import bare_trainer

    detector = StallDetector(patience=10, warmup_steps=0)
    trainer = bare_trainer(40, detector)
    model = Scripted([1.0] * 100)
    trainer.fit(model)
    assert detector.summary()["steps"] == 40
    trainer.fit_loop.epoch_loop.max_steps = 70
    trainer.fit(model)
    assert detector.summary()["steps"] == 30
    assert " in 30 steps" in detector.summary_text()
