from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from models import Net, Scripted, fit, read_scalars

from lightning_escape import StallClassifier, StallDetector
from lightning_escape.detectors import KINDS, Diagnosis

FLAT = [1.0] * 200
DECAY = [math.exp(-0.02 * t) for t in range(200)]
DROP = [1.0 - 0.005 * t if t < 60 else 0.7 for t in range(200)]
NAN_AT_37 = [1.0 - 0.001 * t if t != 37 else math.nan for t in range(200)]

CASES = [
    # (name, trace, detector kwargs, expected (step, kind) of the first diagnosis, or None)
    ("flat: stall after the warm-up", FLAT, {"patience": 30, "warmup_steps": 50}, (50, "plateau")),
    (
        "flat: checks every 8 steps round up",
        FLAT,
        {"patience": 30, "warmup_steps": 50, "check_every_n_steps": 8},
        (55, "plateau"),
    ),
    ("steady decay: no stall", DECAY, {"patience": 30, "warmup_steps": 0}, None),
    (
        "drop then flat",
        DROP,
        {"patience": 30, "warmup_steps": 0, "smoothing": 0.0},
        (90, "plateau"),
    ),
    (
        "NaN is divergence at its check",
        NAN_AT_37,
        {"patience": 30, "warmup_steps": 0, "check_every_n_steps": 5},
        (39, "diverging"),
    ),
]


@pytest.mark.parametrize(
    ("trace", "kwargs", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_scripted_traces(
    trace: list[float], kwargs: dict[str, Any], expected: tuple[int, str] | None
) -> None:
    kwargs.setdefault("check_every_n_steps", 1)
    detector = StallDetector(**kwargs)
    fit(Scripted(trace), [detector], max_steps=len(trace))
    first = (detector.diagnoses[0].step, detector.diagnoses[0].kind) if detector.diagnoses else None
    assert first == expected
    for d in detector.diagnoses:
        assert isinstance(d, Diagnosis) and d.kind in KINDS
        assert isinstance(d.reason, str) and d.reason
        assert set(d.to_dict()) == {"step", "kind", "reason", "evidence"}


def test_monitor_a_logged_metric_in_max_mode() -> None:
    accuracy = [min(0.9, 0.1 + 0.01 * t) for t in range(200)]  # flat at 0.9 from step 80
    detector = StallDetector(
        monitor="acc", mode="max", patience=40, warmup_steps=0, check_every_n_steps=5, smoothing=0.0
    )
    fit(Scripted(accuracy, log_name="acc"), [detector], max_steps=200)
    assert [(d.step, d.kind) for d in detector.diagnoses] == [
        (124, "plateau")
    ]  # best sampled at the check of step 84; +40 steps
    assert detector.diagnoses[0].evidence["best"] == pytest.approx(0.9)


def test_missing_metric_warns_and_stays_passive() -> None:
    detector = StallDetector(
        monitor="val_loss", strict=False, patience=5, warmup_steps=0, check_every_n_steps=5
    )
    with pytest.warns(UserWarning, match="could not find `val_loss`"):
        fit(Scripted(FLAT), [detector], max_steps=50)
    assert detector.diagnoses == []


def test_one_diagnosis_per_stall_and_rearm_after_improvement() -> None:
    trace = [1.0] * 80 + [0.5] * 120  # stall, improvement at 80, stall again
    detector = StallDetector(patience=20, warmup_steps=0, check_every_n_steps=5, smoothing=0.0)
    fit(Scripted(trace), [detector], max_steps=200)
    assert [(d.step, d.kind) for d in detector.diagnoses] == [
        (24, "plateau"),
        (104, "plateau"),  # improvement at step 80, +20 steps, next check at 104
    ]


def test_logs_signals_and_diagnosis_text(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    detector = StallDetector(patience=20, warmup_steps=0, check_every_n_steps=5)
    fit(Scripted(FLAT), [detector], max_steps=60, logger=logger)
    scalars = read_scalars(logger.log_dir)
    assert sorted(scalars["stall/monitored"]) == list(range(4, 60, 5))
    assert max(scalars["stall/noise"].values()) < 1e-12  # a flat trace
    assert scalars["stall/score"][24] >= 1.0 > scalars["stall/score"][14]
    assert "stall/lambda_max" in scalars and "stall/lambda_min" in scalars
    # A marker: 1 at the check that diagnosed, 0 at every other check.
    assert scalars["stall/diagnosis"] == {s: float(s == 24) for s in range(4, 60, 5)}
    assert not any(tag.startswith("escape/") for tag in scalars)  # a detector never escapes
    ea = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    ea.Reload()
    text = ea.Tensors("stall/diagnosis/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("**plateau** at step 24: loss 1 has not improved")


def test_detector_never_changes_the_run() -> None:
    # Probing every 3 steps (dropout-free model with momentum) must give bitwise the same run.
    torch.manual_seed(0)
    a = Net(optimizer="adam")
    torch.manual_seed(0)
    b = Net(optimizer="adam")
    fit(a, [], max_steps=30, log_every_n_steps=1)
    detector = StallDetector(
        patience=5,
        warmup_steps=0,
        check_every_n_steps=1,
        classifier=StallClassifier(probe_every_n_steps=3),
    )
    trainer = fit(b, [detector], max_steps=30, log_every_n_steps=1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert detector.last_spectrum is not None
    assert torch.equal(
        trainer.callback_metrics["train_loss"], a.trainer.callback_metrics["train_loss"]
    )


def test_manual_optimization_without_loss_fn_falls_back() -> None:
    detector = StallDetector(patience=5, warmup_steps=0, check_every_n_steps=5, min_delta_rel=0.9)

    class Manual(Net):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            super().training_step(batch, batch_idx)
            return self.loss(batch).detach()

    with pytest.warns(UserWarning, match="needs `loss_fn` under manual optimization"):
        fit(Manual(manual=True), [detector], max_steps=30)
    assert detector.diagnoses and detector.diagnoses[0].kind == "plateau"
    assert "loss_fn" in detector.diagnoses[0].reason

    with_fn = StallDetector(
        patience=5,
        warmup_steps=0,
        check_every_n_steps=5,
        min_delta_rel=0.9,
        classifier=StallClassifier(loss_fn=_net_loss),
    )
    fit(Manual(manual=True), [with_fn], max_steps=30)
    assert "lambda_min" in with_fn.diagnoses[0].evidence


def _net_loss(module: Any, batch: Any) -> torch.Tensor:
    return module.loss(batch)


def test_resume_mid_window_continues(tmp_path: Path) -> None:
    trace = [1.0 - 0.01 * t if t < 20 else 0.8 for t in range(100)]
    kwargs: dict[str, Any] = {
        "patience": 30,
        "warmup_steps": 0,
        "check_every_n_steps": 7,
        "smoothing": 0.5,
        # The motion meter's parameter anchors are not checkpointed (two copies of the model):
        # after a resume it measures fresh windows. Everything else resumes exactly.
        "classifier": StallClassifier(motion=None),
    }
    full = StallDetector(**kwargs)
    fit(Scripted(trace), [full], max_steps=100)

    # 4 batches per epoch: the epoch-end checkpoint at step 36 falls between two checks (34, 41).
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, save_last=False)
    first = StallDetector(**kwargs)
    fit(Scripted(trace), [first, ckpt], max_steps=36, enable_checkpointing=True)
    path = next(tmp_path.glob("*step=36.ckpt"))
    state = torch.load(path, weights_only=True)["callbacks"][first.state_key]
    assert len(state["pending"]) == 36 - 35  # samples taken since the check at step 34
    resumed = StallDetector(**kwargs)
    trainer = fit(Scripted(trace), [resumed], max_steps=100, ckpt_path=str(path))
    assert trainer.global_step == 100
    assert resumed.diagnoses == full.diagnoses
    assert resumed.tracker.state_dict() == full.tracker.state_dict()


def test_two_instances_keep_separate_state() -> None:
    a = StallDetector()
    b = StallDetector(monitor="val_loss")
    assert a.state_key != b.state_key


def test_pickles() -> None:
    detector = StallDetector(patience=7)
    clone = pickle.loads(pickle.dumps(detector))
    assert clone.patience == 7 and clone.tracker.patience == 7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"monitor": ""}, "`monitor` must be a metric name or None, got ''"),
        ({"mode": "low"}, "`mode` can be 'min', 'max', got 'low'"),
        ({"patience": 0}, "`patience` must be a positive integer, got 0"),
        ({"warmup_steps": -5}, "`warmup_steps` must be a non-negative integer, got -5"),
        ({"check_every_n_steps": 0}, "`check_every_n_steps` must be a positive integer, got 0"),
        ({"min_delta_rel": -0.1}, r"`min_delta_rel` must be a number in \[0.0, 1.0\], got -0.1"),
        ({"smoothing": 1.5}, r"`smoothing` must be a number in \[0.0, 1.0\), got 1.5"),
        ({"classifier": "probe"}, "`classifier` must be a StallClassifier or None, got 'probe'"),
        ({"gradients": "yes"}, "`gradients` must be a bool or a GradientMonitor, got 'yes'"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StallDetector(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"probe": "yes"}, "`probe` must be a bool, got 'yes'"),
        ({"probe_every_n_steps": 0}, "`probe_every_n_steps` must be a positive integer, got 0"),
        ({"lanczos_steps": 0}, "`lanczos_steps` must be a positive integer, got 0"),
        ({"lanczos_steps": 1}, "`lanczos_steps` must be at least 2 .*, got 1"),
        ({"loss_fn": "mse"}, "`loss_fn` must be callable as loss_fn\\(module, batch\\), got 'mse'"),
        ({"plateau_tol": -1.0}, "`plateau_tol` must be a positive finite number, got -1.0"),
        ({"saddle_tol": 2.0}, r"`saddle_tol` must be a number in \[0.0, 1.0\], got 2.0"),
        ({"dead_fraction": 0.0}, r"`dead_fraction` must be a number in \(0.0, 1.0\], got 0.0"),
        ({"divergence_factor": 0.0}, "`divergence_factor` must be a positive finite number"),
        ({"seed": -1}, r"`seed` must be an integer in \[0, 2\*\*63\), got -1"),
        ({"seed": 2**64}, r"`seed` must be an integer in \[0, 2\*\*63\), got 18446744073709551616"),
    ],
)
def test_bad_classifier_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StallClassifier(**kwargs)


class RankFile(StallDetector):
    """Writes each rank's diagnoses and tracker state to a file at the end."""

    def __init__(self, out: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(
            json.dumps(
                {
                    "diagnoses": [d.to_dict() for d in self.diagnoses],
                    "tracker": self.tracker.state_dict(),
                }
            )
        )


@pytest.mark.ddp
def test_ddp_ranks_with_different_losses_decide_alike(tmp_path: Path) -> None:
    # Rank 0 sees a flat loss, rank 1 the same plus 1.0: decisions use the mean, on both ranks.
    detector = RankFile(str(tmp_path), patience=20, warmup_steps=0, check_every_n_steps=5)
    fit(
        Scripted([1.0] * 60, rank_offset=1.0),
        [detector],
        max_steps=60,
        strategy="ddp_spawn",
        devices=2,
    )
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1
    assert [(d["step"], d["kind"]) for d in r0["diagnoses"]] == [(24, "plateau")]
    assert r0["diagnoses"][0]["evidence"]["smoothed"] == pytest.approx(1.5)


def test_warns_when_gradients_would_be_logged_twice() -> None:
    from lightning_escape import GradientMonitor

    with pytest.warns(UserWarning, match="pass `gradients=False`"):
        fit(Scripted(FLAT), [StallDetector(), GradientMonitor()], max_steps=2)


def test_a_stall_after_a_recovered_divergence_is_diagnosed() -> None:
    trace = [1.0] * 30 + [5.0] * 20 + [1.0] * 100
    detector = StallDetector(patience=30, warmup_steps=0, check_every_n_steps=5, smoothing=0.0)
    fit(Scripted(trace), [detector], max_steps=150)
    assert [(d.step, d.kind) for d in detector.diagnoses] == [
        (34, "diverging"),  # 5.0 is worse than the best 1.0 by more than its scale
        (54, "plateau"),  # back at 1.0: no improvement since step 0
    ]


def test_one_nan_batch_does_not_switch_detection_off() -> None:
    # A single NaN loss is a divergence at its check; once every sample after it is finite again,
    # stalls are diagnosed as before (the flat trace stalls again by step 64).
    trace = [1.0] * 10 + [math.nan] + [1.0] * 89
    detector = StallDetector(patience=30, warmup_steps=0, check_every_n_steps=5, smoothing=0.0)
    fit(Scripted(trace), [detector], max_steps=100)
    assert [(d.step, d.kind) for d in detector.diagnoses] == [(14, "diverging"), (34, "plateau")]


def test_a_run_that_stays_nonfinite_stays_diverging() -> None:
    trace = [1.0] * 10 + [math.nan] * 90
    detector = StallDetector(patience=30, warmup_steps=0, check_every_n_steps=5, smoothing=0.0)
    fit(Scripted(trace), [detector], max_steps=100)
    assert [(d.step, d.kind) for d in detector.diagnoses] == [(14, "diverging")]
    assert detector.tracker.status().nonfinite


class SignSplit(pl.LightningModule):
    """Units that fire on one sign of the input each: batches alternate between the two signs.

    Four ReLU units with input weights 1, 2, -1 and -2: on a batch of positive inputs the last two
    are silent, on one of negative inputs the first two; every unit fires on some example of the
    data. A learning rate of 1e-9 keeps the loss flat, so that a stall is called at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(1, 4)
        self.relu = torch.nn.ReLU()
        self.out = torch.nn.Linear(4, 1)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.tensor([[1.0], [2.0], [-1.0], [-2.0]]))
            self.hidden.bias.zero_()
            self.out.weight.copy_(torch.tensor([[0.5, 0.25, 0.5, 0.25]]))
            self.out.bias.zero_()
        magnitudes = torch.linspace(0.5, 2.0, 8)[:, None]
        # Batches of 8 without shuffling: positive, negative, positive, ...
        self.x = torch.cat([magnitudes * (1 if i % 2 == 0 else -1) for i in range(8)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return torch.nn.functional.mse_loss(self.out(self.relu(self.hidden(x))), x.abs() * 2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-9)

    def train_dataloader(self) -> Any:
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(self.x), batch_size=8)


def _stall_at_step_7(classifier: StallClassifier) -> StallDetector:
    """A detector whose one stall, on :class:`SignSplit`'s flat loss, is called at step 7."""
    return StallDetector(
        patience=4, warmup_steps=0, check_every_n_steps=4, min_delta_rel=0.5, classifier=classifier
    )


@pytest.mark.parametrize("confirm", [True, False], ids=["two batches", "one batch"])
def test_units_silent_on_the_probe_batch_but_firing_on_the_one_before_are_not_dead(
    confirm: bool,
) -> None:
    # Half the units are silent on every batch (the probe batch's sign), none on the data: on
    # one batch that is `dead_units`; the batch before the probe's wakes the other half.
    detector = _stall_at_step_7(StallClassifier(confirm_curvature=confirm, motion=None))
    fit(SignSplit(), [detector], max_steps=8)
    [diagnosis] = detector.diagnoses
    if confirm:
        assert diagnosis.kind == "plateau"
        assert "dead_fraction" not in diagnosis.evidence
    else:
        assert diagnosis.kind == "dead_units"
        assert diagnosis.evidence["dead_fraction"] == 0.5
        assert "2 of 4 units after `relu` never activate on the probe batch (" in diagnosis.reason


def test_units_silent_on_both_batches_are_dead_and_the_reason_says_so() -> None:
    # The same split, every input positive: the last two units are silent on both batches.
    model = SignSplit()
    model.x = model.x.abs()
    detector = _stall_at_step_7(StallClassifier(motion=None))
    fit(model, [detector], max_steps=8)
    [diagnosis] = detector.diagnoses
    assert diagnosis.kind == "dead_units"
    assert "2 of 4 units after `relu` never activate on the probe batch nor the one before" in (
        diagnosis.reason
    )


def test_a_loss_fn_the_probe_cannot_call_is_refused_or_passed_over() -> None:
    # A loss_fn of the wrong arity crashed the fit at the first stall (TypeError in the unit
    # evidence), one giving a loss per example did too (grad of a non-scalar), with the detector
    # alone, which must never change a run.
    with pytest.raises(ValueError, match=r"`loss_fn` must be callable as loss_fn\(module, batch\)"):
        StallClassifier(loss_fn=lambda module: module)
    with pytest.raises(ValueError, match="`probe_every_n_steps=2` runs the curvature probe"):
        StallClassifier(probe=False, probe_every_n_steps=2)
    per_example = StallClassifier(
        motion=None, loss_fn=lambda module, batch: (module(batch[0]) - batch[1]).square()
    )
    detector = StallDetector(
        patience=4, warmup_steps=0, check_every_n_steps=2, min_delta_rel=0.9, classifier=per_example
    )
    with pytest.warns(UserWarning, match="`loss_fn` must give a scalar floating-point loss"):
        fit(Net(), [detector], max_steps=12)
    assert detector.diagnoses


class Validated(Net):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def val_dataloader(self) -> Any:
        return self.train_dataloader()


def test_a_metric_no_validation_of_the_fit_could_log_is_named_at_its_end() -> None:
    # Validations every 10 epochs, a fit of 3: nothing said the detector watched nothing; its
    # summary read "0 stalls in 12 steps", as for a watched healthy run.
    detector = StallDetector(monitor="val_loss", strict=False)
    with pytest.warns(UserWarning, match="never read `val_loss`: nothing in this fit logged it"):
        fit(Validated(), [detector], max_epochs=3, max_steps=-1, check_val_every_n_epoch=10)
    watched = StallDetector(monitor="val_loss", strict=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*never read.*")
        fit(Validated(), [watched], max_epochs=3, max_steps=-1)
