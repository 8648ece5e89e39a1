"""Monitoring a metric logged at validation: samples only when fresh, verdicts on real validations."""

from __future__ import annotations

import copy
import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from models import RESUMES_AFTER_THE_BATCH, StatesByStep, digest, fit, read_ranks, same_state
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_escape import EscapeCallback, EscapeStep, Perturb, StallDetector
from lightning_escape.escapes import EscapeContext
from lightning_escape.policy import ESCAPABLE


class Regression(pl.LightningModule):
    """A linear model on ``y = x @ w`` (noise on the training targets only), trained with SGD.

    It records its own measurements: ``train_losses[step]`` (the loss of the batch optimizer step
    ``step`` trained on), ``val_losses[step]`` (the validation loss after step ``step``) and
    ``validated`` (the step after which each validation ran, one entry per validation).
    """

    def __init__(
        self,
        d: int = 8,
        n_train: int = 64,
        n_val: int = 32,
        batch_size: int = 8,
        lr: float = 0.05,
        noise: float = 0.0,
        w_scale: float = 1.0,
        epoch_metric: bool = False,
        sync_dist: bool = False,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(d, 1, generator=g) * w_scale
        self.x = torch.randn(n_train, d, generator=g)
        self.y = self.x @ w + noise * torch.randn(n_train, 1, generator=g)
        self.xv = torch.randn(n_val, d, generator=g)
        self.yv = self.xv @ w
        self.model = nn.Linear(d, 1, bias=False)
        with torch.no_grad():
            self.model.weight.fill_(0.01)  # small, so that a tiny learning rate barely moves it
        self.batch_size = batch_size
        self.lr = lr
        self.epoch_metric = epoch_metric
        self.sync_dist = sync_dist
        self.train_losses: dict[int, float] = {}
        self.val_losses: dict[int, float] = {}
        self.validated: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        self.log("train_loss", loss)
        if self.epoch_metric:
            self.log("train_epoch_loss", loss, on_step=False, on_epoch=True)
        self.train_losses[self.global_step] = float(loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        self.log("val_loss", loss, sync_dist=self.sync_dist)
        if not self.trainer.sanity_checking:
            self.val_losses[self.global_step - 1] = float(loss)
            self.validated.append(self.global_step - 1)  # one batch per validation

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(self.xv, self.yv), batch_size=len(self.xv))


def _every(n: int) -> dict[str, Any]:
    """Trainer arguments for a validation every ``n`` optimizer steps, across epochs."""
    return {"val_check_interval": n, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0}


def _spy(detector: StallDetector, spans: list[int] | None = None) -> list[tuple[int, float]]:
    """The (step, value) samples fed to the detector's tracker, as they are fed (and their spans)."""
    fed: list[tuple[int, float]] = []
    update = detector.tracker.update

    def spy(step: int, value: float | None, grad_norm: float | None = None, span: int = 1) -> None:
        if value is not None:
            fed.append((step, value))
            if spans is not None:
                spans.append(span)
        update(step, value, grad_norm, span=span)

    detector.tracker.update = spy  # type: ignore[method-assign]
    return fed


def _everywhere(*steps: EscapeStep) -> dict[str, list[EscapeStep]]:
    return {kind: list(steps) for kind in ESCAPABLE}


def _forced(**kwargs: Any) -> StallDetector:
    """A detector that calls a stall once 15 steps pass without a 90% improvement."""
    return StallDetector(
        monitor="val_loss",
        patience=15,
        warmup_steps=0,
        check_every_n_steps=5,
        min_delta_rel=0.9,
        smoothing=0.0,
        **kwargs,
    )


# ---------------------------------------------------------------------------- sampling


def test_a_healthy_run_is_not_a_stall_between_validations() -> None:
    # 40 steps between validations, patience 15: the stale value must not count as a stall.
    detector = StallDetector(
        monitor="val_loss", patience=15, warmup_steps=0, check_every_n_steps=5, smoothing=0.0
    )
    model = Regression()
    fit(model, [detector], max_steps=200, **_every(40))
    losses = [model.val_losses[s] for s in sorted(model.val_losses)]
    assert len(losses) == 5 and all(b < 0.5 * a for a, b in itertools.pairwise(losses))  # healthy
    assert detector.diagnoses == []
    # One sample per validation, the last (199) read at the end of fit: there the converged run
    # (1e-11) has not improved by `min_delta` for 80 steps, a stall nothing diagnoses any more.
    assert detector.tracker.state_dict()["n"] == 5


def test_samples_are_fed_only_at_validation_ends() -> None:
    detector = StallDetector(monitor="val_loss", patience=15, warmup_steps=0, check_every_n_steps=5)
    fed = _spy(detector)
    model = Regression()
    fit(model, [detector], max_steps=190, **_every(40))
    assert sorted(model.val_losses) == [39, 79, 119, 159]
    # One sample per validation, at the step it measured, with the value it measured.
    assert [s for s, _ in fed] == [39, 79, 119, 159]
    assert [v for _, v in fed] == pytest.approx([model.val_losses[s] for s, _ in fed], rel=1e-6)


def test_the_smoothed_value_follows_validations_not_epochs_of_them() -> None:
    # Default smoothing (0.95). Validations 40 steps apart each stand for 40 steps: the smoothed
    # value is the latest validation's, nearly, not an average over the last 20 validations (a
    # descending run's smoothed value then lags far behind, and keeps falling after an escape
    # whatever the escape did).
    detector = StallDetector(monitor="val_loss", patience=1000, check_every_n_steps=5)
    spans: list[int] = []
    fed = _spy(detector, spans)
    model = Regression(lr=0.005)
    fit(model, [detector], max_steps=400, **_every(40))
    assert spans == [1] + [40] * 9
    values = [v for _, v in fed]
    assert values[-1] < 0.5 * values[0]  # it descends

    def smoothed(per_step: bool) -> float:
        ema = norm = 0.0
        for v, span in zip(values, spans):
            decay = 0.95 ** (span if per_step else 1)
            ema, norm = decay * ema + (1 - decay) * v, decay * norm + (1 - decay)
        return ema / norm

    assert detector.tracker.status().smoothed == pytest.approx(smoothed(True), rel=1e-9)
    # Within a fifth of the latest value's distance to the one before; per validation, the
    # average would still be more than 10 times the latest value.
    assert abs(smoothed(True) - values[-1]) < 0.2 * (values[-2] - values[-1])
    assert smoothed(False) > 10 * values[-1]


def test_a_training_metric_logged_per_epoch_is_sampled_once_per_epoch() -> None:
    detector = StallDetector(
        monitor="train_epoch_loss", patience=100, warmup_steps=0, check_every_n_steps=5
    )
    fed = _spy(detector)
    # 8 batches per epoch: epochs end after steps 7, 15, 23, 31; the first checks after them
    # are at steps 9, 19, 24 and 34. The last epoch, cut short after step 35 by `max_steps`,
    # logs its value as training ends, where it is read.
    fit(Regression(epoch_metric=True), [detector], max_steps=36)
    assert [s for s, _ in fed] == [9, 19, 24, 34, 35]
    assert len({v for _, v in fed}) == 5  # a new value each time, never a stale one again


def test_a_training_metric_logged_per_step_is_sampled_at_every_check() -> None:
    detector = StallDetector(
        monitor="train_loss", patience=100, warmup_steps=0, check_every_n_steps=5
    )
    fed = _spy(detector)
    model = Regression()
    fit(model, [detector], max_steps=30, **_every(10))
    assert [s for s, _ in fed] == [4, 9, 14, 19, 24, 29]
    assert [v for _, v in fed] == pytest.approx([model.train_losses[s] for s, _ in fed], rel=1e-6)


# ---------------------------------------------------------------------------- verdicts


class StatesAtBatchStart(Callback):
    """The module's state dict when each batch starts, by the step it takes (placed last)."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.by_step[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def test_a_verdict_waits_for_the_first_validation_after_probation() -> None:
    model = Regression(lr=1e-6)
    escape = EscapeCallback(
        _forced(),
        probation_steps=25,
        probation_extensions=0,
        max_escapes=1,
        ladders=_everywhere(Perturb(radius=0.1)),
    )
    before = StatesByStep()  # each step's state, before escapes and verdicts act on it
    starts = StatesAtBatchStart()  # the state each batch trains from
    fit(model, [before, escape, starts], max_steps=90, **_every(20))
    # Validations after steps 19, 39, 59, 79: the stall is called on the sample of step 39 (20
    # steps since the first), before the batch of step 40 trains, and the escape acts on the
    # model that validation measured. Probation counts from the sample: it ends at step 64, and
    # the next validation is 79.
    [event] = escape.events
    assert event.step == 39
    assert event.end_step == 79
    assert event.reason.endswith("restored the state of step 39")
    # Judged right after the validation of step 79, before the batch of step 80 trains: steps
    # 40 to 79 are thrown away, as `end_step` says, and no step after it.
    assert same_state(starts.by_step[80], before.by_step[39])
    assert not same_state(starts.by_step[79], before.by_step[39])
    assert not same_state(before.by_step[39], before.by_step[40])  # each step moves the model
    assert event.before == pytest.approx(model.val_losses[39], rel=1e-6)
    assert event.after == pytest.approx(model.val_losses[79], rel=1e-6)
    assert event.before != event.after


class FitTrainingSet(EscapeStep):
    """Jump to the least-norm weights that fit the training set exactly: it overfits its noise."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []

    def apply(self, ctx: EscapeContext) -> str:
        module = ctx.module
        assert isinstance(module, Regression)
        self.before = [p.detach().clone() for p in module.parameters()]
        with torch.no_grad():
            w = torch.linalg.pinv(module.x) @ module.y
            module.model.weight.copy_(w.T)
        return "fitted the training set exactly"

    def config(self) -> dict[str, Any]:
        return {}

    def stronger(self) -> EscapeStep:
        return self


class AtVerdict(Callback):
    """The parameters right after the first verdict (placed after the escape callback)."""

    def __init__(self, escape: EscapeCallback) -> None:
        self.escape = escape
        self.params: list[torch.Tensor] | None = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        events = self.escape.events
        if self.params is None and events and events[0].verdict != "pending":
            self.params = [p.detach().clone() for p in pl_module.parameters()]


@pytest.mark.parametrize("monitor", [None, "val_loss"], ids=["training loss", "val_loss"])
def test_an_escape_that_overfits_is_rolled_back_on_the_validation_loss(monitor: str | None) -> None:
    # 8 noisy training examples, 16 features: the exact fit has a lower training loss and a much
    # higher validation loss. A learning rate of 1e-6 leaves the run stalled where it starts.
    model = Regression(d=16, n_train=8, n_val=64, batch_size=8, lr=1e-6, noise=1.0, w_scale=0.1)
    step = FitTrainingSet()
    escape = EscapeCallback(
        StallDetector(
            monitor=monitor, patience=20, warmup_steps=0, check_every_n_steps=5, smoothing=0.0
        ),
        probation_steps=20,
        max_failures=1,
        ladders=_everywhere(step),
    )
    at_verdict = AtVerdict(escape)
    fit(model, [escape, at_verdict], max_steps=60, **_every(10))
    event = escape.events[0]
    train, val = model.train_losses, model.val_losses
    assert event.end_step is not None
    if monitor is None:
        # Judged on the training loss, the same escape is kept.
        assert (event.step, event.end_step, event.verdict) == (24, 44, "accepted")
        assert train[44] < 0.1 * train[24] and val[49] > 2 * val[19]
        return
    # Validations after steps 9, 19, 29, ...: the stall is called on the sample of 29, and the
    # escape acts on the model it measured; the verdict is on the sample of 49.
    assert (event.step, event.end_step) == (29, 49)
    assert train[49] < 0.1 * train[29]  # the escape lowered the training loss
    assert val[49] > 2 * val[29]  # and raised the validation loss
    assert event.before == pytest.approx(val[29], rel=1e-6)
    assert event.after == pytest.approx(val[49], rel=1e-6)
    assert event.verdict == "rolled_back"
    assert at_verdict.params is not None
    assert all(torch.equal(a, b) for a, b in zip(at_verdict.params, step.before))


@pytest.mark.usefixtures("unforeseen_end")
def test_a_trial_without_a_fresh_value_at_the_end_is_rolled_back() -> None:
    # The stall is called on the sample of step 39 and the run ends at step 54, before the next
    # validation, which the callback did not foresee (as when another callback stops the run):
    # nothing measured the escape, so it is rolled back, unjudged.
    model = Regression(lr=1e-6)
    step = FitTrainingSet()
    escape = EscapeCallback(_forced(), probation_steps=10, ladders=_everywhere(step))
    fit(model, [escape], max_steps=55, **_every(20))
    [event] = escape.events
    assert event.step == 39 and event.verdict == "rolled_back"  # acted on the model of 39
    assert event.after is None and "measured after it started" in event.reason
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), step.before))


@pytest.mark.usefixtures("unforeseen_end")
def test_a_trial_is_judged_at_the_end_on_a_value_measured_after_it_started() -> None:
    # Probation (60 steps) outlasts the run, but the validation after step 59 measured the
    # escape: the trial is judged on it at its end (before checkpoints of that validation).
    model = Regression(lr=1e-6)
    step = FitTrainingSet()  # the exact least-squares fit: the validation loss drops to ~0
    escape = EscapeCallback(_forced(), probation_steps=60, ladders=_everywhere(step))
    fit(model, [escape], max_steps=60, **_every(20))
    [event] = escape.events
    assert (event.step, event.end_step, event.verdict) == (39, 59, "accepted")
    assert event.after == pytest.approx(model.val_losses[59], rel=1e-6)
    assert event.after < 1e-3 * event.before
    assert "settled at the end of training" in event.reason


# ---------------------------------------------------------------------------- validate_verdicts


def _validating(**kwargs: Any) -> EscapeCallback:
    """One Perturb after a forced stall, judged after 25 steps on a validation run for it."""
    options: dict[str, Any] = {
        "probation_steps": 25,
        "probation_extensions": 0,
        "max_escapes": 1,
        "ladders": _everywhere(Perturb(radius=0.1)),
        "validate_verdicts": True,
        "keep_neutral": False,  # short of the 90% asked, it is rolled back
    }
    options.update(kwargs)
    return EscapeCallback(_forced(), **options)


@pytest.mark.parametrize("validate", [False, True], ids=["scheduled", "validate_verdicts"])
def test_validate_verdicts_runs_one_validation_when_probation_ends(validate: bool) -> None:
    # Validations after steps 39, 79, 119: the stall is called on the sample of 79 and probation
    # ends at step 104. Waiting, the verdict comes with the validation of 119; with
    # `validate_verdicts`, one validation runs before the batch after step 104, and only one.
    model = Regression(lr=1e-6)
    escape = _validating(validate_verdicts=validate)
    fit(model, [escape], max_steps=150, **_every(40))
    [event] = escape.events
    end = 104 if validate else 119
    assert model.validated == sorted({39, 79, 119, end})
    assert (event.step, event.end_step) == (79, end)  # acts on the model of 79
    assert event.before == pytest.approx(model.val_losses[79], rel=1e-6)
    assert event.after == pytest.approx(model.val_losses[end], rel=1e-6)


def test_validate_verdicts_under_gradient_accumulation() -> None:
    # Two batches per optimizer step: validations every 40 batches come after steps 19, 39, 59.
    # The stall is called on the sample of 39 and probation ends at step 64; the next scheduled
    # validation (79) would come after the run's last step (74). One runs after step 64, once.
    model = Regression(lr=1e-6)
    escape = _validating()
    fit(model, [escape], max_steps=75, accumulate_grad_batches=2, **_every(40))
    assert model.validated == [19, 39, 59, 64]
    [event] = escape.events
    assert (event.step, event.end_step) == (39, 64)
    assert event.after == pytest.approx(model.val_losses[64], rel=1e-6)


def test_validate_verdicts_does_not_double_a_scheduled_validation() -> None:
    # Probation of 40 steps ends at step 119, right where Lightning validates anyway.
    model = Regression(lr=1e-6)
    escape = _validating(probation_steps=40)
    fit(model, [escape], max_steps=150, **_every(40))
    assert model.validated == [39, 79, 119]
    assert [(e.step, e.end_step) for e in escape.events] == [(79, 119)]


@pytest.mark.usefixtures("unforeseen_end")
def test_validate_verdicts_judges_a_trial_still_waiting_at_the_end() -> None:
    # Probation (30 steps) outlasts the run, which ends at step 54, before the next validation:
    # without `validate_verdicts` nothing would measure the escape and it would be rolled back.
    # One validation runs after the last step and judges the exact fit: kept.
    model = Regression(lr=1e-6)
    step = FitTrainingSet()
    escape = EscapeCallback(
        _forced(), probation_steps=30, ladders=_everywhere(step), validate_verdicts=True
    )
    fit(model, [escape], max_steps=55, **_every(20))
    [event] = escape.events
    assert model.validated == [19, 39, 54]
    assert (event.step, event.end_step, event.verdict) == (39, 54, "accepted")
    assert event.after == pytest.approx(model.val_losses[54], rel=1e-6)
    assert event.after < 1e-3 * event.before


def test_validate_verdicts_beside_early_stopping_and_checkpoints(tmp_path: Path) -> None:
    # The validation run for a verdict is a validation like any other: EarlyStopping counts it
    # and ModelCheckpoint saves on it, with the trial's model and its value.
    model = Regression(lr=1e-6)
    escape = _validating()
    stopping = EarlyStopping(monitor="val_loss", patience=100, min_delta=1.0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1)
    fit(model, [escape, stopping, ckpt], max_steps=150, enable_checkpointing=True, **_every(40))
    assert [(e.step, e.end_step) for e in escape.events] == [(79, 104)]
    saved = sorted(int(p.stem.split("step=")[1]) for p in tmp_path.iterdir())
    assert saved == [40, 80, 105, 120]  # after steps 39, 79, 104 (the verdict's) and 119
    # Four validations: the first sets the best value, none of the three after improves by 1.
    assert stopping.wait_count == 3


@pytest.mark.skipif(
    not RESUMES_AFTER_THE_BATCH,
    reason="this Lightning resumes a batch-end checkpoint a batch behind",
)
def test_validate_verdicts_resumes_between_probation_end_and_its_validation(
    tmp_path: Path,
) -> None:
    # 10 batches per epoch. Probation of 20 steps ends at step 99, the last of an epoch; the
    # validation run for the verdict comes at that batch's end, before the checkpoint written
    # there (checkpoint callbacks come last), which holds the verdict. The resumed run does not
    # validate again, and ends where the whole run ends.
    kwargs: dict[str, Any] = {"max_steps": 150, **_every(40)}
    whole = Regression(n_train=40, batch_size=4, lr=1e-6)
    full = _validating(probation_steps=20)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=100)
    fit(whole, [full, ckpt], enable_checkpointing=True, **kwargs)
    assert [(e.step, e.end_step) for e in full.events] == [(79, 99)]
    path = next(tmp_path.glob("*step=100.ckpt"))
    state = torch.load(path, weights_only=True)["callbacks"][full.state_key]
    assert state["engine"]["trial"] is None and state["detector"]["monitored"]["pending"] == []
    assert state["engine"]["events"][0]["verdict"] == "rolled_back"
    model = Regression(n_train=40, batch_size=4, lr=1e-6)
    resumed = _validating(probation_steps=20)
    fit(model, [resumed], ckpt_path=str(path), **kwargs)
    assert whole.validated == [39, 79, 99, 119]
    assert model.validated == [119]
    assert resumed.events == full.events
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), whole.parameters()))


class LastValidation(Callback):
    """What ``last_validation_step`` foresees when training starts, and every step a validation
    followed."""

    def __init__(self) -> None:
        self.foreseen: int | None = None
        self.validated: list[int] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from lightning_escape._lightning import last_validation_step

        self.foreseen = last_validation_step(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.validated.append(trainer.global_step - 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_epochs": 5},
        {"max_epochs": 7, "check_val_every_n_epoch": 3},
        {"max_steps": 30},
        {"max_steps": 75, **_every(20)},
        {"max_epochs": 2, "val_check_interval": 0.25},
        {"max_epochs": 3, "accumulate_grad_batches": 2},
        {"max_steps": 40, "accumulate_grad_batches": 3, **_every(41)},
        {"max_epochs": 4, "accumulate_grad_batches": 3, "check_val_every_n_epoch": 2},
        {"max_epochs": 3, "limit_val_batches": 0},
    ],
    ids=str,
)
def test_the_last_validation_of_a_fit_is_foreseen(kwargs: dict[str, Any]) -> None:
    seen = LastValidation()
    fit(Regression(lr=1e-6), [seen], **{"max_steps": -1, "num_sanity_val_steps": 0, **kwargs})
    assert seen.foreseen == (seen.validated[-1] if seen.validated else -1)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_time": {"hours": 1}}, {"reload_dataloaders_every_n_epochs": 1}],
    ids=["a Timer may end it", "reloaded loaders"],
)
def test_the_last_validation_is_not_foreseen_where_it_cannot_be(kwargs: dict[str, Any]) -> None:
    # A fit a Timer may end, or whose loaders are rebuilt every epoch (at any length): a step
    # foreseen there was wrong (64 for a fit a 1 s Timer ended at 18).
    seen = LastValidation()
    fit(Regression(lr=1e-6), [seen], max_epochs=3, max_steps=-1, num_sanity_val_steps=0, **kwargs)
    assert seen.foreseen is None and seen.validated == [7, 15, 23]


@pytest.mark.parametrize("every", [None, 4], ids=["each epoch", "every 4 batches"])
def test_the_last_validation_is_foreseen_after_a_resume_at_an_epochs_end(
    tmp_path: Path, every: int | None
) -> None:
    # Resumed from the checkpoint written at the end of epoch 2 of 4: Lightning still counts that
    # epoch's batches until the next starts, and a whole epoch was left out (23 for 31).
    from lightning.pytorch.callbacks import ModelCheckpoint

    kwargs: dict[str, Any] = {"num_sanity_val_steps": 0, "max_steps": -1}
    if every is not None:
        kwargs["val_check_interval"] = every
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{step}")
    fit(Regression(lr=1e-6), [saver], max_epochs=2, enable_checkpointing=True, **kwargs)
    seen = LastValidation()
    fit(
        Regression(lr=1e-6),
        [seen],
        max_epochs=4,
        ckpt_path=str(tmp_path / "step=16.ckpt"),
        **kwargs,
    )
    assert seen.validated[-1] == 31
    assert seen.foreseen == 31


def test_no_escape_starts_that_no_validation_could_judge(caplog: pytest.LogCaptureFixture) -> None:
    # Validations after epochs 3 and 6 of 7 (steps 23 and 47; the run ends at 55): the stall
    # called on the sample of 47 started a trial that no validation could measure, rolled back
    # at the end of training with its last 8 steps. None starts; the note says why.
    import logging

    escape = EscapeCallback(
        _forced(), probation_steps=5, ladders=_everywhere(Perturb(0.1)), verbose=True
    )
    with caplog.at_level(logging.INFO):
        fit(
            Regression(lr=1e-6),
            [escape],
            max_steps=-1,
            max_epochs=7,
            check_val_every_n_epoch=3,
            num_sanity_val_steps=0,
        )
    assert [d.step for d in escape.diagnoses] == [47]
    assert escape.events == []
    assert (
        "no escape at step 47 (plateau): its probation would end after the fit's last "
        "validation, which its verdict needs (step 47)" in caplog.text
    )


def test_validate_verdicts_must_be_a_bool_and_needs_a_monitor() -> None:
    with pytest.raises(ValueError, match="`validate_verdicts` must be a bool, got 'yes'"):
        EscapeCallback(_forced(), validate_verdicts="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`validate_verdicts=True`.*`monitor=None`"):
        EscapeCallback(validate_verdicts=True)


# ---------------------------------------------------------------------------- a missing metric


def test_no_warning_before_the_first_validation() -> None:
    detector = StallDetector(monitor="val_loss", patience=5, warmup_steps=0, check_every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(Regression(), [detector], max_steps=24, num_sanity_val_steps=0)  # 8 steps per epoch
    assert not [w for w in caught if "val_loss" in str(w.message)]


def test_a_misspelt_metric_is_an_error_at_the_end_of_the_first_validation() -> None:
    detector = StallDetector(monitor="val_los")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[detector],
        max_steps=40,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **_every(10),
    )
    with pytest.raises(RuntimeError, match=r"`val_los`.*`train_loss`, `val_loss`"):
        trainer.fit(Regression())
    assert trainer.global_step == 10  # the end of the first validation


def test_a_misspelt_metric_warns_once_without_strict() -> None:
    detector = StallDetector(monitor="val_los", strict=False, patience=5, warmup_steps=0)
    with pytest.warns(UserWarning, match="could not find `val_los`") as record:
        fit(Regression(), [detector], max_steps=40, **_every(10))
    assert len([w for w in record if "could not find `val_los`" in str(w.message)]) == 1
    assert detector.diagnoses == [] and detector.tracker.state_dict()["n"] == 0


def test_a_misspelt_metric_with_validation_every_epoch_is_an_error_after_the_first_epoch() -> None:
    with pytest.raises(RuntimeError, match="`val_los`"):
        fit(Regression(), [StallDetector(monitor="val_los")], max_steps=40)


def test_strict_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="`strict` must be a bool"):
        StallDetector(monitor="val_loss", strict="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- resume


def _resumable() -> EscapeCallback:
    return EscapeCallback(
        _forced(),
        probation_steps=25,
        probation_extensions=0,
        max_escapes=1,
        ladders=_everywhere(Perturb(radius=0.1)),
    )


def test_resume_mid_probation_keeps_the_pending_validation(tmp_path: Path) -> None:
    # A validation every 10 steps: samples of steps 9, 19, 29, ... The stall is called on the
    # sample of 29 (the escape acts on the model it measured), probation ends at 54, so the verdict
    # falls on the sample of 59. The checkpoint written at the end of that validation holds the
    # verdict (given before checkpoint callbacks save), and the resumed run goes on from there.
    kwargs: dict[str, Any] = {"max_steps": 80, **_every(10)}
    full = _resumable()
    whole = Regression(n_train=40, batch_size=4, lr=1e-6)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    fit(whole, [full, ckpt], enable_checkpointing=True, **kwargs)
    assert [(e.step, e.end_step) for e in full.events] == [(29, 59)]
    path = next(tmp_path.glob("*step=60.ckpt"))
    state = torch.load(path, weights_only=True)["callbacks"][full.state_key]
    assert state["engine"]["trial"] is None
    assert state["detector"]["monitored"]["pending"] == []

    resumed = _resumable()
    model = Regression(n_train=40, batch_size=4, lr=1e-6)
    fit(model, [resumed], ckpt_path=str(path), **kwargs)
    assert resumed.events == full.events
    assert resumed.detector.tracker.state_dict() == full.detector.tracker.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), whole.parameters()))


def test_state_round_trips_through_a_weights_only_checkpoint() -> None:
    import io

    detector = _forced()
    fit(Regression(), [detector], max_steps=20, **_every(10))
    state = detector.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    clone = _forced()
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    assert clone.state_dict().keys() == state.keys()
    assert math.isfinite(clone.tracker.status().smoothed)


# ---------------------------------------------------------------------------- DDP


class RankReport(Callback):
    """Writes what ``escape`` decided on this process, at the end of training, to ``rank<k>.json``.

    Placed after ``escape``, whose own ``on_train_end`` settles the last trial first.
    """

    def __init__(self, out: str, escape: EscapeCallback) -> None:
        self.out = out
        self.escape = escape

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        report = {
            "events": [e.to_dict() for e in self.escape.events],
            "tracker": self.escape.detector.tracker.state_dict(),
            "val_loss": float(trainer.callback_metrics["val_loss"]),
            "digest": digest(pl_module),
        }
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("sync_dist", "validate", "end"),
    [(True, False, 59), (False, False, 59), (False, True, 54)],
    ids=["sync_dist", "per-rank values", "validate_verdicts"],
)
def test_every_rank_decides_alike(
    tmp_path: Path, sync_dist: bool, validate: bool, end: int
) -> None:
    # Each rank validates on its own half of the validation set: with `sync_dist=True` the logged
    # values are equal, without it they differ and the detector averages them. The verdict comes
    # with the validation after step 59, or, with `validate_verdicts`, with the one every rank
    # runs after step 54, where probation ends.
    escape = _validating(validate_verdicts=validate)
    model = Regression(lr=1e-6, sync_dist=sync_dist)
    report = RankReport(str(tmp_path), escape)
    fit(model, [escape, report], max_steps=70, strategy="ddp_spawn", devices=2, **_every(10))
    r0, r1 = read_ranks(tmp_path)
    assert [(e["step"], e["end_step"]) for e in r0["events"]] == [(29, end)]
    assert r0["events"] == r1["events"]
    assert r0["tracker"] == r1["tracker"]
    assert r0["digest"] == r1["digest"]
    assert (r0["val_loss"] == r1["val_loss"]) == sync_dist


class HeldOutPlateau(Regression):
    """The regression, slowly fitting its training set while its validation loss stays flat."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", 1.0)  # what a model that fits no more of held-out data would show


@pytest.mark.parametrize("training_improves", [True, False])
def test_a_held_out_plateau_while_the_training_loss_improves_is_held_off(
    training_improves: bool,
) -> None:
    from lightning_escape import StallClassifier

    detector = StallDetector(
        monitor="val_loss",
        patience=15,
        warmup_steps=0,
        check_every_n_steps=5,
        # The parameters move steadily: without `motion=None` that alone would hold it off.
        classifier=StallClassifier(probe=False, motion=None, training_improves=training_improves),
    )
    model = HeldOutPlateau(lr=0.002)
    fit(model, [detector], max_steps=120, **_every(10))
    # The optimizer makes progress: the mean loss of an epoch (8 batches) falls epoch after epoch.
    epochs = [
        sum(model.train_losses[s] for s in range(e, e + 8)) / 8 for e in range(0, 120, 8)[:-1]
    ]
    assert all(b < a for a, b in itertools.pairwise(epochs))
    if training_improves:
        assert detector.diagnoses == []
        [(step, smoothed, since)] = detector.held_off_training  # once for the episode
        assert step == 29 and since < 15 and smoothed < epochs[0]
        assert detector.summary()["held_off_training"] == 1
    else:
        assert [d.kind for d in detector.diagnoses] == ["plateau"]
        assert detector.held_off_training == []
