"""Details of what the callbacks say, log and count: verdict timing, log points, messages."""

from __future__ import annotations

import collections
import csv
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, Timer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from models import RESUMES_AFTER_THE_BATCH, StatesByStep, fit, same_state
from test_validation_monitor import Regression
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_escape import EscapeCallback, EscapeStep, Perturb, StallClassifier, StallDetector
from lightning_escape.escapes import EscapeContext
from lightning_escape.policy import ESCAPABLE


def _everywhere(*steps: EscapeStep) -> dict[str, list[EscapeStep]]:
    return {kind: list(steps) for kind in ESCAPABLE}


def _forced(monitor: str | None = "val_loss", **kwargs: Any) -> StallDetector:
    """A detector that calls a stall once 15 steps pass without a 90% improvement."""
    options: dict[str, Any] = {
        "patience": 15,
        "warmup_steps": 0,
        "check_every_n_steps": 5,
        "min_delta_rel": 0.9,
        "smoothing": 0.0,
    }
    options.update(kwargs)
    return StallDetector(monitor=monitor, **options)


def _every_check() -> StallDetector:
    """A detector on the training loss that calls a stall at its first checks (every 2 steps)."""
    return _forced(
        None,
        patience=4,
        check_every_n_steps=2,
        smoothing=0.95,
        classifier=StallClassifier(motion=None),
        gradients=False,
    )


def _one_perturb(detector: StallDetector, **kwargs: Any) -> EscapeCallback:
    """One small Perturb, never extended: on a stalled regression it is rolled back."""
    options: dict[str, Any] = {
        "probation_steps": 20,
        "probation_extensions": 0,
        "max_escapes": 1,
        "ladders": _everywhere(Perturb(radius=0.1)),
        "keep_neutral": False,  # short of the 90% asked, it is rolled back
    }
    options.update(kwargs)
    return EscapeCallback(detector, **options)


def _every(n: int) -> dict[str, Any]:
    """Trainer arguments for a validation every ``n`` optimizer steps, across epochs."""
    return {"val_check_interval": n, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0}


def _events(logdir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _texts(logdir: Path, tag: str) -> list[str]:
    return [
        e.tensor_proto.string_val[0].decode()
        for e in _events(logdir).Tensors(f"{tag}/text_summary")
    ]


class StartStates(Callback):
    """The module's parameters when each training batch starts (placed after the escape)."""

    def __init__(self) -> None:
        self.by_step: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.by_step[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]


# ---------------------------------------------------------------------------- D1: the escape's text


def test_the_escape_text_names_the_validation_that_judges_it(tmp_path: Path) -> None:
    # Validations after steps 19, 39, 59, 79: the stall is called on the sample of 39 (the escape
    # acts on the model that validation measured), probation (25 steps) ends at 64, and the
    # verdict falls on the validation of 79. The text said "Judged at step 69" (the escape's
    # check plus probation), a step where nothing happens.
    escape = _one_perturb(_forced(), probation_steps=25)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    fit(Regression(lr=1e-6), [escape], max_steps=90, logger=logger, **_every(20))
    [event] = escape.events
    assert (event.step, event.end_step) == (39, 79)
    [text] = [t for t in _texts(tmp_path / "tb" / "version_0", "escape/escape") if "**" in t]
    assert text.endswith("Judged at the first validation after step 64.")


def test_the_escape_text_names_the_check_that_judges_it(tmp_path: Path) -> None:
    # The training loss, checked every 5 steps; probation of 12 steps from the check of 19 ends
    # at 31, and the first check from there is 34.
    escape = _one_perturb(_forced(None), probation_steps=12)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    fit(Regression(lr=1e-6), [escape], max_steps=40, logger=logger)
    [event] = escape.events
    assert (event.step, event.end_step) == (19, 34)
    [text] = [t for t in _texts(tmp_path / "tb" / "version_0", "escape/escape") if "**" in t]
    assert text.endswith("Judged at step 34.")


# ---------------------------------------------------------------------------- D2: verdict timing


@pytest.mark.parametrize("validate", [False, True], ids=["scheduled", "validate_verdicts"])
def test_a_verdict_on_a_validation_acts_before_the_next_batch(validate: bool) -> None:
    # Checks every 10 steps, validations after 24, 49, 74, 99: the stall is called on the sample
    # of 49 before the next batch (the escape acts on the model it measured), probation (20
    # steps) ends at 69. Waiting, the validation of 74 judges; with `validate_verdicts` one runs
    # after 69 and judges. The rollback acted at the next check (79), throwing away steps trained
    # after the validation, uncounted; and with `validate_verdicts` the validation of 74 judged,
    # not the one run for the verdict.
    model = Regression(lr=1e-6)
    escape = _one_perturb(_forced(check_every_n_steps=10), validate_verdicts=validate)
    before, starts = StatesByStep(), StartStates()
    fit(model, [before, escape, starts], max_steps=100, **_every(25))
    [event] = escape.events
    end = 69 if validate else 74
    assert model.validated == sorted({24, 49, 74, 99, end})
    assert (event.step, event.end_step, event.verdict) == (49, end, "rolled_back")
    assert event.after == pytest.approx(model.val_losses[end], rel=1e-6)
    # The batch after the judging validation starts from the state before the escape.
    restored = list(before.by_step[49].values())
    assert same_state(starts.by_step[end + 1], restored)
    assert not same_state(starts.by_step[end], restored)
    assert escape.summary()["wasted_steps"] == end - 49


# ---------------------------------------------------------------------------- D3: log points


@pytest.mark.parametrize("escapes", [False, True], ids=["healthy", "rolled_back"])
def test_the_status_is_logged_once_per_fresh_value(tmp_path: Path, escapes: bool) -> None:
    # Checks every 5 steps, validations every 20: each check between two validations logged the
    # last status again at its old step (4 points per step), and a score of 0 at step 0 before
    # any value; after a rollback, the restored value at the verdict's step as a second point.
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    callback: Callback
    if escapes:
        callback = _one_perturb(_forced(gradients=False), probation_steps=25)
        model = Regression(lr=1e-6)
    else:
        callback = StallDetector(monitor="val_loss", gradients=False, check_every_n_steps=5)
        model = Regression(lr=0.05)
    fit(model, [callback], max_steps=100, logger=logger, **_every(20))
    events = _events(tmp_path / "tb" / "version_0")
    for tag in ("stall/monitored", "stall/score", "stall/diagnosis"):
        counts = collections.Counter(e.step for e in events.Scalars(tag))
        assert sorted(counts) == [19, 39, 59, 79, 99], tag
        assert set(counts.values()) == {1}, tag


def test_a_verdict_at_the_last_step_keeps_its_marker(tmp_path: Path) -> None:
    # The trial of 39 is rolled back at the validation after the last step (99); the end of
    # training reported again at that step and wrote the verdict marker's 0 over its -1.
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    escape = _one_perturb(_forced(), probation_steps=60)
    fit(Regression(lr=1e-6), [escape], max_steps=100, logger=logger, **_every(20))
    assert [(e.step, e.end_step, e.verdict) for e in escape.events] == [(39, 99, "rolled_back")]
    events = _events(tmp_path / "tb" / "version_0")
    at_end = [e.value for e in events.Scalars("escape/verdict") if e.step == 99]
    assert at_end == [-1.0]


def test_no_status_is_logged_at_the_end_without_a_value_after_the_last_validation(
    tmp_path: Path,
) -> None:
    # Validations every 20 steps, the run ends at step 109: the end of training fed the gradient
    # norms read after the validation of 99 and logged the status of 99 again, at step 109.
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    detector = StallDetector(monitor="val_loss", check_every_n_steps=5)
    fit(Regression(lr=0.05), [detector], max_steps=110, logger=logger, **_every(20))
    events = _events(tmp_path / "tb" / "version_0")
    for tag in ("stall/monitored", "stall/score", "stall/diagnosis"):
        assert [e.step for e in events.Scalars(tag)] == [19, 39, 59, 79, 99], tag


# ---------------------------------------------------------------------------- D4: steps counted


@pytest.mark.parametrize(
    ("monitor", "max_steps", "validation"),
    [("val_loss", 100, _every(20)), ("val_loss", 105, {}), (None, 105, {})],
    ids=["validation every 20", "validation every epoch", "training loss"],
)
def test_a_detector_alone_counts_every_step(
    monitor: str | None, max_steps: int, validation: dict[str, Any]
) -> None:
    # 8 batches per epoch. The samples after the last check, and the last validation's value,
    # were never read back at the end of fit: 80, 96 and 100 steps.
    detector = StallDetector(monitor=monitor, gradients=False)
    escape = EscapeCallback(StallDetector(monitor=monitor, gradients=False))
    fit(Regression(lr=0.05), [detector, escape], max_steps=max_steps, **validation)
    assert detector.summary()["steps"] == escape.summary()["steps"] == max_steps
    assert detector.tracker.status().step == max_steps - 1


# ---------------------------------------------------------------------------- D5: guard advice


class BlowsUp(Regression):
    """The regression whose training loss turns NaN from optimizer step ``at`` on."""

    def __init__(self, at: int) -> None:
        super().__init__(lr=0.05)
        self.at = at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step >= self.at else loss


def _diverging_in_warmup() -> tuple[EscapeCallback, list[str]]:
    """Divergence at step 32, inside the detector's warm-up (50 steps), guard every 10 steps."""
    escape = EscapeCallback(
        StallDetector(patience=50, check_every_n_steps=5, gradients=False),
        guard_every_n_steps=10,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(BlowsUp(at=32), [escape], max_steps=45)
    return escape, [str(w.message) for w in caught if "snapshot" in str(w.message)]


def test_a_divergence_in_the_warmup_does_not_ask_for_the_guard_that_is_set() -> None:
    # It said "set `guard_every_n_steps` to keep one", which is set.
    escape, messages = _diverging_in_warmup()
    assert escape.diagnoses[0].kind == "diverging"
    rolled_back = any(e.action == "rollback" for e in escape.events)
    assert rolled_back or messages, "a divergence left as it is must be said"
    assert not any("set `guard_every_n_steps`" in m for m in messages)


def test_a_divergence_in_the_warmup_rolls_back_to_the_guard() -> None:
    escape, _ = _diverging_in_warmup()
    assert [(e.step, e.action) for e in escape.events][:1] == [(34, "rollback")]


# ---------------------------------------------------------------------------- D6: log step


def test_a_validation_run_for_a_verdict_logs_at_the_step_it_follows(tmp_path: Path) -> None:
    # Validations after 24, 49, 74, 99 and one run after 69 for the verdict: Lightning logs a
    # validation after step N at step N; the one run for the verdict was logged at 70.
    model = Regression(lr=1e-6)
    escape = _one_perturb(_forced(), validate_verdicts=True)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    fit(model, [escape], max_steps=100, logger=logger, **_every(25))
    assert model.validated == [24, 49, 69, 74, 99]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        logged = [int(row["step"]) for row in csv.DictReader(f) if row.get("val_loss")]
    assert logged == model.validated


# ---------------------------------------------------------------------------- D7: the error


def test_a_misspelt_metric_error_lists_only_the_metrics_logged() -> None:
    # The callback's own progress-bar fields (`stall`, `probation`) were offered as metrics.
    escape = EscapeCallback(StallDetector(monitor="val_lss"))
    with pytest.raises(RuntimeError, match=r"could not find `val_lss`") as raised:
        fit(Regression(), [escape], max_steps=40, **_every(20))
    message = str(raised.value)
    assert "`val_loss`" in message and "`train_loss`" in message
    assert "`stall`" not in message and "`probation`" not in message


# ---------------------------------------------------------------------------- D8: a NaN verdict


class NanValidation(Regression):
    """The regression whose validation loss is NaN after optimizer step ``at``."""

    def __init__(self, at: int) -> None:
        super().__init__(lr=1e-6)
        self.at = at

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        if self.global_step - 1 == self.at:
            loss = loss * math.nan
        self.log("val_loss", loss)


def test_a_trial_judged_on_a_nan_reports_the_nan() -> None:
    # Validations every 10 steps; the stall is called on the sample of 29, and the escape taken
    # there is judged on the validation of 49, which is NaN. It reported "12.26 -> 12.26", the
    # last finite value (from before the escape) as the trial's.
    escape = _one_perturb(_forced(), probation_steps=20)
    fit(NanValidation(at=49), [escape], max_steps=80, **_every(10))
    [event] = escape.events
    assert (event.step, event.end_step, event.verdict) == (29, 49, "rolled_back")
    assert event.after is not None and math.isnan(event.after)


# ---------------------------------------------------------------------------- D9: who changed it


class AddsAGroup(pl.LightningModule):
    """An MLP whose own hook adds a parameter group to its optimizer at step 8."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 1)
        self.extra = nn.Parameter(torch.zeros(1))
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 8, generator=g)
        self.y = torch.randn(64, 1, generator=g)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.l2(torch.tanh(self.l1(x))) + self.extra, y)

    def configure_optimizers(self) -> Any:
        params = [*self.l1.parameters(), *self.l2.parameters()]
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.trainer.optimizers[0]
        if self.global_step == 8 and len(optimizer.param_groups) == 1:
            optimizer.add_param_group({"params": [self.extra], "lr": 0.01})


class Quiet(Callback):
    """A callback that changes nothing."""


def test_a_changed_run_blames_no_callback_that_cannot_reshape_it() -> None:
    # The module adds the group; Timer (and any unknown callback) was named as the suspect.
    escape = EscapeCallback(
        _every_check(),
        ladders=_everywhere(Perturb(0.5)),
        probation_steps=4,
        max_escapes=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(AddsAGroup(), [Timer(duration={"minutes": 10}), Quiet(), Quiet(), escape])
    [event] = escape.events
    assert "cannot be rolled back exactly" in event.reason
    assert "(by the module or another callback)" in event.reason
    assert "Timer" not in event.reason and "Quiet" not in event.reason


# ---------------------------------------------------------------------------- D10: skipped batches


class SkipsSome(pl.LightningModule):
    """An MLP near a saddle whose ``training_step`` returns None on batch 1 of each epoch (or all)."""

    def __init__(self, skip: str = "some") -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 1)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 8, generator=g)
        self.y = torch.randn(64, 1, generator=g)
        self.skip = skip

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        loss = nn.functional.mse_loss(self.l2(torch.tanh(self.l1(x))), y)
        skipped = self.skip == "all" or (self.skip == "some" and batch_idx % 4 == 1)
        return None if skipped else loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


def _probe_warnings(model: pl.LightningModule, detector: StallDetector) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, [detector], max_steps=8)
    return [str(w.message) for w in caught if "probe" in str(w.message)]


def test_a_check_on_a_skipped_batch_probes_the_last_batch_with_a_loss() -> None:
    # The check of step 5 falls on batch 1 of the epoch, skipped: the probe ran `training_step`
    # on it, got None, advised returning a loss and diagnosed a plateau without curvature.
    detector = _every_check()
    warned = _probe_warnings(SkipsSome("some"), detector)
    assert warned == []
    # Judged with curvature, measured on the last batch with a loss and again on the one before
    # it that had one (batch 0): the probe batch's negative direction does not hold there.
    assert [(d.step, d.kind) for d in detector.diagnoses] == [(5, "local_minimum")]
    evidence = detector.diagnoses[0].evidence
    assert "lambda_min" in evidence and "lambda_min_other" in evidence
    assert evidence["probe_loss"] != evidence["probe_loss_other"]


def test_a_module_that_never_returns_a_loss_still_hears_why_the_probe_cannot_run() -> None:
    detector = StallDetector(classifier=StallClassifier(probe_every_n_steps=2), gradients=False)
    warned = _probe_warnings(SkipsSome("all"), detector)
    assert any("`training_step` returned no loss" in m for m in warned)


# ---------------------------------------------------------------------------- verdict validations


def _tiny(**kwargs: Any) -> Regression:
    """Ten batches of four per epoch at a learning rate that stalls: epochs end at 9, 19, ..."""
    return Regression(lr=1e-6, n_train=40, batch_size=4, **kwargs)


@pytest.mark.skipif(
    not RESUMES_AFTER_THE_BATCH,
    reason="this Lightning resumes a batch-end checkpoint a batch behind",
)
def test_a_resume_from_a_verdict_validation_checkpoint_repeats_the_run(tmp_path: Path) -> None:
    # Validations every 40 batches (after 39, 79, 119); the stall is called on the value of 79,
    # probation ends at 99 (the last batch of an epoch) and `validate_verdicts` runs one there,
    # where ModelCheckpoint saves. Resumed from that checkpoint, Lightning's batch counters stood
    # one ahead: validations came one batch early (after 118) and the run went elsewhere.
    from lightning.pytorch.callbacks import ModelCheckpoint

    def escape() -> EscapeCallback:
        return _one_perturb(_forced(), validate_verdicts=True, max_escapes=2)

    whole, full = _tiny(), escape()
    saver = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1)
    fit(whole, [full, saver], max_steps=130, enable_checkpointing=True, **_every(40))
    assert whole.validated == [39, 79, 99, 119]
    [path] = tmp_path.glob("*-step=100.ckpt")  # written by the validation run for the verdict
    resumed, again = _tiny(), escape()
    fit(resumed, [again], max_steps=130, ckpt_path=str(path), **_every(40))
    assert resumed.validated == [119]  # no second validation for the verdict given before
    assert again.events == full.events
    assert same_state(list(resumed.parameters()), list(whole.parameters()))


@pytest.mark.skipif(
    not hasattr(_TrainingEpochLoop(None, min_steps=None), "_skip_next_val"),  # type: ignore[arg-type]
    reason="this Lightning has no flag to skip the validation after a batch",
)
def test_a_stop_at_a_verdict_validation_takes_effect_at_once(tmp_path: Path) -> None:
    # The validation run for the verdict after step 99 is EarlyStopping's second without an
    # improvement (patience 2): Lightning stops there, as at a validation of its own. Run at the
    # next batch's start, it stopped a batch late: step 100 trained, then Lightning validated
    # again (EarlyStopping counted it: wait 3) and wrote one more checkpoint.
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    model, escape = _tiny(), _one_perturb(_forced(), validate_verdicts=True)
    stop = EarlyStopping(monitor="val_loss", patience=2, min_delta=1.0)
    saver = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1)
    trainer = fit(
        model, [escape, stop, saver], max_steps=150, enable_checkpointing=True, **_every(40)
    )
    assert model.validated == [39, 79, 99]
    assert trainer.global_step == 100
    assert stop.wait_count == 2
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == [
        "epoch=3-step=40.ckpt",
        "epoch=7-step=80.ckpt",
        "epoch=9-step=100.ckpt",
    ]


def test_the_checkpoints_of_a_stop_at_a_verdict_hold_the_final_model(tmp_path: Path) -> None:
    # The verdict falls on Lightning's validation after 119, where EarlyStopping stops the run:
    # the Perturb is rolled back. ModelCheckpoint saved before the verdict, so `last.ckpt` and
    # the epoch's checkpoint held the trial's weights, rolled back afterwards.
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    model, escape = _tiny(), _one_perturb(_forced())
    stop = EarlyStopping(monitor="val_loss", patience=2, min_delta=1.0)
    saver = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1, save_last=True)
    fit(model, [escape, stop, saver], max_steps=200, enable_checkpointing=True, **_every(40))
    [event] = escape.events
    assert (event.end_step, event.verdict) == (119, "rolled_back")
    for name in ("last.ckpt", "epoch=11-step=120.ckpt"):
        saved = torch.load(tmp_path / name, weights_only=True)
        assert torch.equal(saved["state_dict"]["model.weight"], model.model.weight)
        assert saved["callbacks"][escape.state_key]["engine"]["trial"] is None


class MetricsAtValidationEnd(Callback):
    """What ``callback_metrics`` held for ``val_loss`` at each validation's end, by step (placed
    after the escape callback, where EarlyStopping or a user's callback would read it)."""

    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self.by_step[trainer.global_step - 1] = float(trainer.callback_metrics["val_loss"])


def test_a_checkpoint_at_a_rollback_holds_the_restored_model_with_its_own_score(
    tmp_path: Path,
) -> None:
    # Validations after steps 19, 39, 59, 79, 99: the stall is called on the sample of 39 and
    # the Perturb is rolled back at the validation of 59, before ModelCheckpoint saves there. It
    # recorded the trial's validation loss beside the restored model: a score that model never
    # had (the escape acted at the check after 44, on a model no validation measured). The trial
    # now starts from the model the validation of 39 measured, and what that validation measured
    # is what every callback after the rollback reads.
    from lightning.pytorch.callbacks import ModelCheckpoint

    model, escape, after = Regression(lr=1e-6), _one_perturb(_forced()), MetricsAtValidationEnd()
    saver = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1)
    fit(model, [escape, after, saver], max_steps=100, enable_checkpointing=True, **_every(20))
    [event] = escape.events
    assert (event.step, event.end_step, event.verdict) == (39, 59, "rolled_back")
    losses = model.val_losses
    assert losses[59] != pytest.approx(losses[39], rel=1e-3)  # the trial measured otherwise

    def saved(step: int) -> tuple[dict[str, torch.Tensor], float]:
        [path] = tmp_path.glob(f"*-step={step + 1}.ckpt")
        return torch.load(path, weights_only=True)["state_dict"], saver.best_k_models[str(path)]

    (at_start, start_score), (at_verdict, verdict_score) = saved(39), saved(59)
    assert same_state(list(at_verdict.values()), list(at_start.values()))
    assert float(verdict_score) == float(start_score) == pytest.approx(losses[39], rel=1e-6)
    assert after.by_step[59] == pytest.approx(losses[39], rel=1e-6)
    # Every other validation is read as it was measured.
    assert all(after.by_step[s] == pytest.approx(losses[s], rel=1e-6) for s in (19, 39, 79, 99))


class MetricsAtBatchEnd(Callback):
    """What ``callback_metrics`` held for ``val_loss`` at each training batch's end, by step."""

    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        value = trainer.callback_metrics.get("val_loss")
        if value is not None:
            self.by_step[trainer.global_step - 1] = float(value)


def _scores(saver: Any) -> dict[int, float]:
    """The score ``saver`` recorded for each checkpoint, by the step count in its name."""
    return {
        int(Path(path).stem.split("step=")[1]): float(score)
        for path, score in saver.best_k_models.items()
    }


def test_a_rollback_between_validations_puts_back_what_was_measured_before_the_trial(
    tmp_path: Path,
) -> None:
    # Judged on the training loss: the Perturb of step 19 is rolled back at the check of 39.
    # The validation of 31 measured the trial; until the next one (47), the checkpoints written
    # every 5 steps score the restored model. They recorded the trial's validation loss, a score
    # no model the run goes on with had; now the latest measured before the trial (15), as a
    # run without escapes scores its checkpoints between validations.
    from lightning.pytorch.callbacks import ModelCheckpoint

    model, escape, reads = Regression(lr=1e-6), _one_perturb(_forced(None)), MetricsAtBatchEnd()
    saver = ModelCheckpoint(
        dirpath=tmp_path, monitor="val_loss", save_top_k=-1, every_n_train_steps=5
    )
    fit(model, [escape, reads, saver], max_steps=60, enable_checkpointing=True, **_every(16))
    [event] = escape.events
    assert (event.step, event.end_step, event.verdict) == (19, 39, "rolled_back")
    losses = model.val_losses
    assert sorted(losses) == [15, 31, 47]
    assert losses[31] != pytest.approx(losses[15], rel=1e-3)  # the trial measured otherwise
    assert reads.by_step[38] == pytest.approx(losses[31], rel=1e-6)  # during the trial
    for step in range(39, 48):
        assert reads.by_step[step] == pytest.approx(losses[15], rel=1e-6), step
    assert _scores(saver)[45] == pytest.approx(losses[15], rel=1e-6)
    assert reads.by_step[48] == pytest.approx(losses[47], rel=1e-6)  # measured after 47


def test_a_rollback_after_a_validation_inside_an_accumulation_window_puts_back_its_start(
    tmp_path: Path,
) -> None:
    # Two batches per step, a validation every 41 batches: each falls inside a window, after
    # steps 19, 40, 60, 81. The stall is called on the sample of 40, the trial starts from that
    # model, and the validation of 60 measures it; it is judged and rolled back where the next
    # window begins (step 61). Until the validation of 81, every reader of `val_loss` (the
    # checkpoints written every 5 steps) reads what the validation of 40 measured, not the trial.
    from lightning.pytorch.callbacks import ModelCheckpoint

    model, escape, reads = Regression(lr=1e-6), _one_perturb(_forced()), MetricsAtBatchEnd()
    saver = ModelCheckpoint(
        dirpath=tmp_path, monitor="val_loss", save_top_k=-1, every_n_train_steps=5
    )
    fit(
        model,
        [escape, reads, saver],
        max_steps=100,
        enable_checkpointing=True,
        accumulate_grad_batches=2,
        val_check_interval=41,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    [event] = escape.events
    assert (event.step, event.end_step, event.verdict) == (40, 61, "rolled_back")
    losses = model.val_losses
    assert sorted(losses) == [19, 40, 60, 81]
    assert losses[60] != pytest.approx(losses[40], rel=1e-3)
    for step in range(61, 81):
        assert reads.by_step[step] == pytest.approx(losses[40], rel=1e-6), step
    scores = _scores(saver)
    assert [scores[s] for s in (65, 70, 75, 80)] == pytest.approx([losses[40]] * 4, rel=1e-6)
    if 61 in scores:  # written at the validation of 60 (Lightning 2.6; 2.4 writes none there)
        assert scores[61] == pytest.approx(losses[60], rel=1e-6)  # the trial's, measured of it


def test_the_validation_metrics_a_rollback_puts_back_are_checkpointed() -> None:
    # Saved with the callback, loadable with `weights_only=True`; a checkpoint written before
    # the callback kept them (its detector kept the latest validation of its monitor) gives
    # those back.
    import io

    escape = _one_perturb(_forced())
    fit(Regression(lr=1e-6), [escape], max_steps=20, **_every(10))
    buffer = io.BytesIO()
    torch.save(escape.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state["validation"]) == {"val_loss"}
    clone = _one_perturb(_forced())
    clone.load_state_dict(state)
    assert same_state(clone._validation.latest, {"val_loss": state["validation"]["val_loss"]})
    older = {key: value for key, value in state.items() if key != "validation"}
    older["detector"]["monitored"]["measured"] = [9, {"val_loss": torch.tensor(2.5)}]
    clone.load_state_dict(older)
    assert same_state(clone._validation.latest, {"val_loss": torch.tensor(2.5)})


@pytest.mark.parametrize(
    "first", [True, False], ids=["EarlyStopping first", "EscapeCallback first"]
)
def test_early_stopping_listed_first_is_named_at_a_rollback(first: bool) -> None:
    # EarlyStopping runs its `on_validation_end` in the order of `callbacks`: listed before the
    # escape callback, it reads the trial's value at the validation that rolls the trial back.
    from lightning.pytorch.callbacks import EarlyStopping

    stop = EarlyStopping(monitor="val_loss", patience=100)
    escape = _one_perturb(_forced())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(
            Regression(lr=1e-6),
            [stop, escape] if first else [escape, stop],
            max_steps=100,
            **_every(20),
        )
    assert [e.verdict for e in escape.events] == ["rolled_back"]
    named = [str(w.message) for w in caught if "listed before EscapeCallback" in str(w.message)]
    assert len(named) == (1 if first else 0)
    if first:
        assert named[0].startswith("EarlyStopping is listed before EscapeCallback")


class WithMetric(Regression):
    """The regression, also logging a torchmetrics metric (the mean absolute error) at validation,
    and every metric's value at each validation's end as its callbacks leave it, by step."""

    def __init__(self) -> None:
        super().__init__(lr=1e-6)
        import torchmetrics

        self.mae = torchmetrics.MeanAbsoluteError()
        self.maes: dict[int, float] = {}
        self.read: dict[int, dict[str, float]] = {}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        x, y = batch
        self.mae(self.model(x), y)
        self.log("val_mae", self.mae)
        self.maes[self.global_step - 1] = float(self.mae.compute())

    def on_validation_end(self) -> None:  # after every callback's
        metrics = self.trainer.callback_metrics
        self.read[self.global_step - 1] = {k: float(metrics[k]) for k in ("val_loss", "val_mae")}


def test_a_rollback_puts_back_every_metric_the_validation_logged() -> None:
    # The trial from the model of 39 is rolled back at the validation of 59: the module's own
    # hook, after every callback's, reads what the validation of 39 measured, a torchmetrics
    # metric included; the next validation reads its own values again.
    model, escape = WithMetric(), _one_perturb(_forced())
    fit(model, [escape], max_steps=100, **_every(20))
    [event] = escape.events
    assert (event.step, event.end_step, event.verdict) == (39, 59, "rolled_back")
    assert model.maes[59] != pytest.approx(model.maes[39], rel=1e-4)
    assert model.read[59] == pytest.approx(
        {"val_loss": model.val_losses[39], "val_mae": model.maes[39]}
    )
    for step in (19, 39, 79, 99):
        assert model.read[step] == pytest.approx(
            {"val_loss": model.val_losses[step], "val_mae": model.maes[step]}
        )


class TwoLoaders(Regression):
    """The regression validated on two loaders (the same examples), a torchmetrics metric on the
    first: its metrics are ``val_loss/dataloader_idx_0``, ``val_loss/dataloader_idx_1`` and
    ``val_mae/dataloader_idx_0``. ``measured[step]``: what the validation after ``step`` logged,
    read before any callback's ``on_validation_end``."""

    def __init__(self) -> None:
        super().__init__(lr=1e-6)
        import torchmetrics

        self.mae = torchmetrics.MeanAbsoluteError()
        self.measured: dict[int, dict[str, float]] = {}

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.model(x), y), prog_bar=True)
        if dataloader_idx == 0:
            self.mae(self.model(x), y)
            self.log("val_mae", self.mae)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            metrics = self.trainer.callback_metrics
            self.measured[self.global_step - 1] = {
                k: float(v) for k, v in metrics.items() if k.startswith("val_")
            }

    def val_dataloader(self) -> Any:
        return [super().val_dataloader(), super().val_dataloader()]


class ValidationMetricsAtBatchEnd(Callback):
    """Every validation metric ``callback_metrics`` held at each training batch's end, by step,
    and those the progress bar showed."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, float]] = {}
        self.shown: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        step = trainer.global_step - 1
        self.by_step[step] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")
        }
        bar = trainer.progress_bar_metrics
        self.shown[step] = {k: float(v) for k, v in bar.items() if k.startswith("val_")}


def test_what_a_rollback_puts_back_lasts_past_its_validation() -> None:
    # The trial from the model of 39 is rolled back at the validation of 59, and nothing reads
    # `callback_metrics` in that validation's end after the escape callback. Until the next
    # validation, every metric reads what the validation of 39 measured: a torchmetrics metric
    # and the metrics of a second loader included. They read the trial's values before: Lightning
    # keeps what a validation logged in a store filled before `on_validation_end`.
    model, reads = TwoLoaders(), ValidationMetricsAtBatchEnd()
    escape = _one_perturb(_forced("val_loss/dataloader_idx_0"))
    fit(model, [escape, reads], max_steps=100, **_every(20))
    [event] = escape.events
    assert (event.step, event.end_step, event.verdict) == (39, 59, "rolled_back")
    start, trial = model.measured[39], model.measured[59]
    assert set(start) == {"val_loss/dataloader_idx_0", "val_loss/dataloader_idx_1"} | {
        "val_mae/dataloader_idx_0"
    }
    assert all(trial[k] != pytest.approx(start[k], rel=1e-4) for k in start)
    for step in range(60, 79):
        assert reads.by_step[step] == pytest.approx(start, rel=1e-6), step
        # The progress bar too (it showed the trial's values).
        assert reads.shown[step] == pytest.approx(
            {k: v for k, v in start.items() if k.startswith("val_loss")}, rel=1e-6
        ), step
    assert reads.by_step[80] == pytest.approx(model.measured[79], rel=1e-6)


class TowardTheFit(EscapeStep):
    """Move the regression's weights 5% of the way to the least-norm fit of its training set: the
    validation loss falls by about a tenth, short of what a forced detector asks."""

    def apply(self, ctx: EscapeContext) -> str:
        module = ctx.module
        assert isinstance(module, Regression)
        with torch.no_grad():
            fit_ = (torch.linalg.pinv(module.x) @ module.y).T
            module.model.weight.add_(0.05 * (fit_ - module.model.weight))
        return "moved 5% of the way to the fit"

    def config(self) -> dict[str, Any]:
        return {}

    def stronger(self) -> EscapeStep:
        return self


class PlateauRegression(Regression):
    """The regression under ``ReduceLROnPlateau`` on ``val_loss``, validated and stepped once per
    epoch (8 steps); ``bests[step]``: the scheduler's best after its step at the epoch ending
    with optimizer step ``step``."""

    def __init__(self) -> None:
        super().__init__(lr=1e-6)
        self.bests: dict[int, float] = {}

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, threshold=0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "val_loss"}}

    def on_train_epoch_start(self) -> None:
        if self.global_step:
            plateau = self.trainer.lr_scheduler_configs[0].scheduler
            self.bests[self.global_step - 1] = float(plateau.best)


def test_a_rollback_puts_back_the_best_of_early_stopping_and_of_a_plateau_schedule() -> None:
    # The trial lowers the validation loss by about a tenth, not by the 90% asked, and is rolled
    # back at the validation that judges it. The scheduler and EarlyStopping had taken the trial's
    # value for their best (11.83 against 13.11): the restored model then counted as a plateau,
    # and the scheduler cut the learning rate twice (1e-6 to 1e-8), which a run without escapes
    # never does. Their best is put back as the trial found it.
    from lightning.pytorch.callbacks import EarlyStopping

    model = PlateauRegression()
    stop = EarlyStopping(monitor="val_loss", patience=100)
    seen: dict[int, float] = {}

    class StopBest(Callback):  # after EarlyStopping, which reads at each epoch's end
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            seen[trainer.global_step - 1] = float(stop.best_score)

    escape = _one_perturb(_forced(), ladders=_everywhere(TowardTheFit()))
    fit(model, [escape, stop, StopBest()], max_steps=96)
    [event] = escape.events
    start, end = event.step, event.end_step
    assert event.verdict == "rolled_back"
    losses = model.val_losses
    assert losses[end] < 0.95 * losses[start]  # the trial's value was a new best
    assert model.bests[end] == pytest.approx(losses[start], rel=1e-6)
    assert seen[end] == pytest.approx(losses[start], rel=1e-6)
    # From there on, only values the kept models had (the trial's were lower than all of them).
    kept = [loss for step, loss in losses.items() if step <= start or step > end]
    for best in (float(stop.best_score), max(model.bests.items())[1]):
        assert min(kept) * (1 - 1e-6) <= best <= losses[start]
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == 1e-6  # never cut


def test_a_run_resumed_at_the_validation_a_trial_starts_from_goes_on_alike(tmp_path: Path) -> None:
    # The checkpoint written at the validation of 39 holds its value, not decided on yet: the
    # resumed run decides at its first batch, starts the same trial from the same model and, at
    # the rollback, reports what the validation of 39 measured (one it did not run itself).
    from lightning.pytorch.callbacks import ModelCheckpoint

    whole, full = Regression(lr=1e-6), _one_perturb(_forced())
    saver = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1)
    fit(whole, [full, saver], max_steps=100, enable_checkpointing=True, **_every(20))
    [path] = tmp_path.glob("*-step=40.ckpt")
    resumed, again, after = Regression(lr=1e-6), _one_perturb(_forced()), MetricsAtValidationEnd()
    fit(resumed, [again, after], max_steps=100, ckpt_path=str(path), **_every(20))

    # (The reasons differ: the motion meter is measured anew after a resume.)
    def outline(events: list[Any]) -> list[tuple[Any, ...]]:
        return [(e.step, e.end_step, e.verdict, e.action, e.before, e.after) for e in events]

    assert outline(again.events) == outline(full.events)
    assert [(e.step, e.end_step) for e in again.events] == [(39, 59)]
    assert after.by_step[59] == pytest.approx(whole.val_losses[39], rel=1e-6)
    assert same_state(list(resumed.parameters()), list(whole.parameters()))


@pytest.mark.skipif(
    not RESUMES_AFTER_THE_BATCH,
    reason="this Lightning resumes a batch-end checkpoint a batch behind",
)
def test_a_run_resumed_on_probation_puts_back_the_metrics_of_the_trials_start(
    tmp_path: Path,
) -> None:
    # The checkpoint written at step 50 holds the trial started from the model of 39, with what
    # the validation of 39 measured: the resumed run, which never ran that validation, reports
    # it at the rollback (validation of 59) as the uninterrupted run does.
    from lightning.pytorch.callbacks import ModelCheckpoint

    whole, full = Regression(lr=1e-6), _one_perturb(_forced())
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=50)
    fit(whole, [full, saver], max_steps=100, enable_checkpointing=True, **_every(20))
    [path] = tmp_path.glob("*-step=50.ckpt")
    state = torch.load(path, weights_only=True)["callbacks"][full.state_key]
    assert state["engine"]["trial"] is not None
    resumed, again, after = Regression(lr=1e-6), _one_perturb(_forced()), MetricsAtValidationEnd()
    fit(resumed, [again, after], max_steps=100, ckpt_path=str(path), **_every(20))
    assert [(e.step, e.end_step, e.verdict) for e in again.events] == [(39, 59, "rolled_back")]
    assert after.by_step[59] == pytest.approx(whole.val_losses[39], rel=1e-6)
    assert same_state(list(resumed.parameters()), list(whole.parameters()))


class FirstStates(Callback):
    """The parameters at the end of the batch that took each optimizer step (placed before the
    escape, so before any escape at that step): the first batch end after it, by step."""

    def __init__(self) -> None:
        self.by_step: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        params = [p.detach().clone() for p in pl_module.parameters()]
        self.by_step.setdefault(trainer.global_step - 1, params)


def test_a_verdict_inside_an_accumulation_window_counts_every_step_thrown_away() -> None:
    # Twelve batches per epoch, three per optimizer step, a validation every 10 batches: the one
    # after batch 99 (step 32) falls inside the window of step 33 and judges the trial that
    # started at the validation after batch 59 (step 19). The rollback waits for the window's
    # end, so step 33 trains on the trial and is thrown away too: 14 steps, where the event said
    # 13 (up to 32).
    model = Regression(lr=1e-6, n_train=96, batch_size=8)
    escape = _one_perturb(_forced(), probation_steps=12)
    before, starts = FirstStates(), StartStates()
    fit(
        model,
        [before, escape, starts],
        max_steps=60,
        accumulate_grad_batches=3,
        val_check_interval=10,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    [event] = escape.events
    assert {19, 32} <= set(model.validated)
    assert (event.step, event.end_step, event.verdict) == (19, 33, "rolled_back")
    assert same_state(starts.by_step[34], before.by_step[19])
    assert escape.summary()["wasted_steps"] == 14


def test_the_markers_get_one_point_per_step(tmp_path: Path) -> None:
    # Checks at 9, 19, 29, 39 and the end of training at 39: the markers got two points at 39.
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    fit(Regression(lr=0.01), [EscapeCallback()], max_steps=40, logger=logger)
    events = _events(tmp_path / "tb" / "version_0")
    markers = [tag for tag in events.Tags()["scalars"] if tag.startswith("escape/")]
    assert markers
    for tag in markers:
        steps = [e.step for e in events.Scalars(tag)]
        assert steps == sorted(set(steps)) == [9, 19, 29, 39], tag
