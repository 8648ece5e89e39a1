from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from models import (
    SCHEDULERS,
    BatchSizes,
    Net,
    Scripted,
    fit,
    forcing_detector,
    read_scalars,
    same_state,
)
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_escape import (
    BatchSizeChange,
    EscapeCallback,
    EscapeStep,
    GradientNoise,
    LRKick,
    Perturb,
    StallClassifier,
    StallDetector,
)
from lightning_escape.escapes import EscapeContext
from lightning_escape.policy import ESCAPABLE
from lightning_escape.probation import EscapeEvent


def _everywhere(*steps: Any) -> dict[str, list[Any]]:
    """The same ladder for every kind."""
    return {kind: list(steps) for kind in ESCAPABLE}


class LRRecorder(Callback):
    """The learning rate each optimizer step used (placed after EscapeCallback, so kicks show)."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]


# Flat until step 40, then better: a stall is declared at step 24, the kick runs on steps 25-29,
# and the verdict at step 44 keeps it (no rollback to rewind the schedule).
KICK_TRACE = [1.0] * 40 + [0.5] * 40


def _kick_run(scheduler: str, kick: bool, **trainer_kwargs: Any) -> tuple[LRRecorder, Any]:
    recorder = LRRecorder()
    escape = EscapeCallback(
        StallDetector(patience=20, warmup_steps=0, check_every_n_steps=5, smoothing=0.0),
        probation_steps=20,
        max_escapes=1,
        ladders=_everywhere(LRKick(factor=10.0, steps=5)) if kick else _everywhere(),
    )
    fit(
        Scripted(KICK_TRACE, scheduler=scheduler, log_name="train_loss"),
        [escape, recorder],
        max_steps=len(KICK_TRACE),
        **trainer_kwargs,
    )
    return recorder, escape


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_kicked_rates_never_reach_the_scheduler(scheduler: str) -> None:
    plain, _ = _kick_run(scheduler, kick=False)
    kicked, escape = _kick_run(scheduler, kick=True)
    assert [(e.step, e.action, e.verdict) for e in escape.events] == [
        (24, "LRKick(factor=10.0, steps=5)", "accepted")
    ]
    kicked_steps = set(range(25, 30))
    assert sorted(kicked.lrs) == sorted(plain.lrs)
    for step, lr in kicked.lrs.items():
        if step in kicked_steps:
            assert lr == plain.lrs[step] * 10.0, step
        else:
            assert lr == plain.lrs[step], step  # exactly the un-kicked trajectory
    assert len(set(plain.lrs.values())) > 1 or scheduler == "none"


class InfAt(Callback):
    """Puts an infinite gradient at one step, so the AMP scaler skips that step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_step == self.step:
            pl_module.layer.weight.grad[0, 0] = math.inf


@pytest.mark.parametrize("scheduler", ["StepLR", "OneCycleLR"])
def test_a_step_skipped_by_the_scaler_leaves_no_kicked_rate(scheduler: str) -> None:
    def plugin() -> MixedPrecision:
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=8.0))

    recorders = []
    for kick in (False, True):
        recorder = LRRecorder()
        escape = EscapeCallback(
            StallDetector(patience=20, warmup_steps=0, check_every_n_steps=5, smoothing=0.0),
            probation_steps=20,
            max_escapes=1,
            ladders=_everywhere(LRKick(factor=10.0, steps=5)) if kick else _everywhere(),
        )
        fit(
            Scripted(KICK_TRACE, scheduler=scheduler),
            [InfAt(27), escape, recorder],
            max_steps=len(KICK_TRACE),
            plugins=[plugin()],
        )
        recorders.append(recorder)
    plain, kicked = recorders
    for step, lr in kicked.lrs.items():
        if step in (25, 26, 28, 29):
            assert lr == plain.lrs[step] * 10.0, step
        else:
            assert lr == plain.lrs[step], step  # step 27 was skipped: not kicked, nothing left


class StateRecorder(Callback):
    """Model, optimizer and scheduler state at every batch end."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, Any]] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.states[trainer.global_step - 1] = {
            "model": copy.deepcopy(pl_module.state_dict()),
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "scheduler": copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict()),
        }


class NetWithScheduler(Net):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-7)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.9)}


def test_rollback_restores_parameters_and_optimizer_state_bit_for_bit() -> None:
    before, after = StateRecorder(), StateRecorder()
    escape = EscapeCallback(
        StallDetector(patience=10, warmup_steps=5, check_every_n_steps=5),
        probation_steps=10,
        max_failures=1,
        ladders=_everywhere(Perturb(radius=3.0)),
    )
    fit(NetWithScheduler(), [before, escape, after], max_steps=60)
    assert len(escape.events) == 1
    event = escape.events[0]
    assert event.verdict == "rolled_back"
    pre, post = before.states[event.step], after.states[event.end_step]
    assert same_state(pre["model"], post["model"])
    assert same_state(pre["optimizer"]["state"], post["optimizer"]["state"])
    # The schedule is not rewound: it stands where the steps since the escape brought it.
    now = before.states[event.end_step]
    assert same_state(now["scheduler"], post["scheduler"]) and now["lr"] == post["lr"]
    assert not same_state(pre["scheduler"], post["scheduler"])
    # and training moved on between the two: the snapshot was not of an idle run
    assert not same_state(now["model"], pre["model"])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_rollback_does_not_rewind_the_schedule(scheduler: str) -> None:
    # The loss is scripted flat, so every escape is rolled back; the rates every step uses must
    # be those of the same run without escapes (LearningRateMonitor showed a sawtooth).
    def run(ladder: list[Any]) -> tuple[LRRecorder, EscapeCallback]:
        recorder = LRRecorder()
        escape = EscapeCallback(
            StallDetector(
                patience=10,
                warmup_steps=0,
                check_every_n_steps=5,
                smoothing=0.0,
                # StepLR halves the rate every 7 steps: below 1% of its peak from step 49 on, a
                # stall would be `converged`; the rollbacks are what this test is about.
                classifier=StallClassifier(annealed_rel=0.0),
            ),
            probation_steps=10,
            cooldown_steps=0,
            max_failures=5,
            ladders=_everywhere(*ladder),
        )
        trace = [1.0] * 80
        fit(
            Scripted(trace, scheduler=scheduler, log_name="train_loss"),
            [escape, recorder],
            max_steps=80,
        )
        return recorder, escape

    plain, _ = run([])
    escaped, escape = run([Perturb(radius=0.5)])
    assert len(escape.events) >= 3
    assert all(e.verdict == "rolled_back" for e in escape.events)
    assert escaped.lrs == plain.lrs


class WindowAudit(Callback):
    """Checks that every optimizer step's gradient is exactly its own window's.

    Records each micro-batch's gradient of ``loss / N`` (N as Lightning divides by) computed on a
    copy of the model before the batch; at each optimizer step the gradient must equal the sum over
    the batches since the previous step, and `zero_grad` must have run at the window's first batch.
    """

    def __init__(self) -> None:
        self.window: list[dict[str, torch.Tensor]] = []
        self.zeroed_at_start = True
        self.windows: list[tuple[int, int]] = []  # (first batch, batches) of each step
        self.errors: list[str] = []
        self._first = 0

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        model = copy.deepcopy(pl_module)
        model.zero_grad(set_to_none=True)
        loss = model.loss(batch) / trainer.accumulate_grad_batches
        loss.backward()
        if not self.window:
            self._first = batch_idx
        self.window.append(
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        )

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        for name, p in pl_module.named_parameters():
            want = sum(w[name] for w in self.window)
            if not torch.allclose(p.grad, want, rtol=1e-5, atol=1e-7):
                self.errors.append(f"step {trainer.global_step}: {name} mixes windows")
        self.windows.append((self._first, len(self.window)))
        self.window = []


def _stalls_at_once() -> StallDetector:
    """A detector that calls a stall at its first checks (every step), short of a 90% gain."""
    return StallDetector(patience=4, warmup_steps=0, check_every_n_steps=1, min_delta_rel=0.9)


def test_accumulation_changes_never_mix_two_windows() -> None:
    audit = WindowAudit()
    escape = EscapeCallback(
        _stalls_at_once(),
        probation_steps=12,
        max_escapes=1,
        ladders=_everywhere(BatchSizeChange(factor=1.5, steps=6, method="accumulation")),
    )
    model = Net(n=7 * 8, batch_size=8, optimizer="sgd", lr=1e-3)  # 7 batches per epoch
    fit(model, [escape, audit], max_steps=30, accumulate_grad_batches=2)
    assert audit.errors == []
    sizes = [n for _, n in audit.windows]
    assert 3 in sizes and sizes[-1] <= 2  # 2 -> 3 and back to 2
    assert escape.events and escape.events[0].action.startswith("BatchSizeChange(factor=1.5")
    # every change happened where both windows begin
    for first, n in audit.windows:
        assert first % n == 0 or first == 6  # an epoch's last batch steps alone


def test_batch_size_change_through_the_dataloader_and_back() -> None:
    sizes = BatchSizes()
    escape = EscapeCallback(
        _stalls_at_once(),
        probation_steps=8,
        max_escapes=1,
        ladders=_everywhere(BatchSizeChange(factor=0.5, steps=8, method="dataloader")),
    )
    model = Net(n=64, batch_size=16, lr=1e-3)
    trainer = fit(model, [escape, sizes], max_steps=40)
    assert 8 in sizes.sizes and sizes.sizes[0] == 16 and sizes.sizes[-1] == 16
    assert model.batch_size == 16
    # Lightning reloads the dataloader once at each change, then as the user set it: the
    # switch back saved the reload setting the change had made (1) as the user's, for good.
    assert trainer.reload_dataloaders_every_n_epochs == 0


class StepSizes(Callback):
    """The batch size each optimizer step trained on, by step."""

    def __init__(self) -> None:
        self.by_step: dict[int, int] = {}

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self.by_step[trainer.global_step] = len(batch[0])


def test_a_batch_size_change_is_judged_on_steps_it_acted_on() -> None:
    # Four batches per epoch, probation of 2 steps: the halved batch size comes in force at the
    # next epoch, and the verdict was given before it, on steps trained at the old size (a
    # change that never acted was kept, or rolled back). Probation now counts from the first
    # step at the new size.
    sizes = StepSizes()
    escape = EscapeCallback(
        _stalls_at_once(),
        probation_steps=2,
        probation_extensions=0,
        max_escapes=1,
        ladders=_everywhere(BatchSizeChange(factor=0.5, steps=2, method="dataloader")),
    )
    fit(Net(n=64, batch_size=16, lr=1e-3), [escape, sizes], max_steps=40)
    [event] = escape.events
    first = min(step for step, size in sizes.by_step.items() if size == 8)
    assert event.step + 1 < first  # decided before the epoch's end
    assert event.end_step == first + 1  # judged after two steps at the new size


def test_divergence_during_probation_is_rolled_back() -> None:
    escape = EscapeCallback(
        StallDetector(patience=5, warmup_steps=0, check_every_n_steps=5, min_delta_rel=0.9),
        probation_steps=30,
        max_escapes=1,
        ladders=_everywhere(LRKick(factor=1e6, steps=10)),
    )
    model = Net(lr=1e-3)
    fit(model, [escape], max_steps=40)
    event = escape.events[0]
    assert event.verdict == "rolled_back"
    assert "diverged" in event.reason
    assert all(torch.isfinite(p).all() for p in model.parameters())


class Explode(Net):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        if self.global_step == 33:
            loss = loss * math.nan
        return loss


def test_divergence_outside_probation_rolls_back_to_the_guard() -> None:
    escape = EscapeCallback(
        StallDetector(patience=100, warmup_steps=0, check_every_n_steps=5), guard_every_n_steps=10
    )
    model = Explode(lr=1e-2)
    fit(model, [escape], max_steps=40)
    assert [(e.diagnosis, e.action, e.verdict) for e in escape.events] == [
        ("diverging", "rollback", "rolled_back")
    ]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_no_guard_means_a_warning_and_no_action() -> None:
    escape = EscapeCallback(StallDetector(patience=100, warmup_steps=0, check_every_n_steps=5))
    with pytest.warns(UserWarning, match="set `guard_every_n_steps`"):
        fit(Explode(lr=1e-2), [escape], max_steps=40)
    assert escape.events == []
    assert escape.diagnoses[-1].kind == "diverging"


def test_stopping_rule_after_consecutive_failures() -> None:
    escape = EscapeCallback(
        StallDetector(patience=5, warmup_steps=0, check_every_n_steps=5),
        probation_steps=5,
        max_failures=2,
        ladders=_everywhere(Perturb(radius=0.5)),
    )
    fit(Scripted([1.0] * 100), [escape], max_steps=100)
    assert [e.verdict for e in escape.events] == ["rolled_back", "rolled_back"]
    assert escape.events[1].action == "Perturb(radius=1.0, scale='auto', seed=0)"  # stronger
    assert escape.policy.concluded


def test_budget_bounds_the_escapes() -> None:
    escape = EscapeCallback(
        StallDetector(patience=5, warmup_steps=0, check_every_n_steps=5),
        probation_steps=5,
        max_failures=100,
        max_escapes=3,
        ladders=_everywhere(Perturb(radius=0.5)),
    )
    fit(Scripted([1.0] * 100), [escape], max_steps=100)
    assert len(escape.events) == 3


@pytest.mark.usefixtures("unforeseen_end")
def test_pending_probation_is_settled_at_the_end() -> None:
    before = StateRecorder()
    escape = EscapeCallback(
        StallDetector(patience=10, warmup_steps=5, check_every_n_steps=5),
        probation_steps=1000,
        ladders=_everywhere(Perturb(radius=0.3)),
    )
    model = NetWithScheduler()
    fit(model, [before, escape], max_steps=30)
    event = escape.events[0]
    assert event.verdict == "rolled_back"
    assert "settled at the end of training" in event.reason
    assert same_state(model.state_dict(), before.states[event.step]["model"])


def test_events_and_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    escape = EscapeCallback(
        StallDetector(patience=20, warmup_steps=0, check_every_n_steps=5, smoothing=0.0),
        probation_steps=20,
        max_escapes=1,
        ladders=_everywhere(LRKick(factor=10.0, steps=5)),
    )
    fit(Scripted(KICK_TRACE), [escape], max_steps=80, logger=logger)
    [event] = escape.events
    assert EscapeEvent.from_dict(event.to_dict()) == event
    assert set(event.to_dict()) >= {"step", "diagnosis", "action", "verdict", "reason", "before"}
    assert event.verdict == "accepted" and event.diagnosis == "plateau"
    assert "learning rate x10.0 for 5 steps" in event.reason
    scalars = read_scalars(logger.log_dir)
    checks = range(4, 80, 5)
    assert scalars["escape/escape"] == {s: float(s == 24) for s in checks}
    assert scalars["escape/verdict"] == {s: float(s == 44) for s in checks}
    assert scalars["escape/probation"] == {s: float(24 <= s < 44) for s in checks}
    assert scalars["escape/verdict_before"] == {44: 1.0}
    assert scalars["escape/verdict_after"] == {44: 0.5}
    ea = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    ea.Reload()
    texts = [
        e.tensor_proto.string_val[0].decode() for e in ea.Tensors("escape/escape/text_summary")
    ]
    assert texts[0].startswith("**LRKick(factor=10.0, steps=5)** at step 24 against **plateau**")
    verdicts = [
        e.tensor_proto.string_val[0].decode() for e in ea.Tensors("escape/verdict/text_summary")
    ]
    assert verdicts[0].startswith("**accepted**")
    raw = ea.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(raw)
    assert [c.title for c in layout.category] == ["stall", "escape", "grad"]
    for category in layout.category:
        for chart in category.chart:
            patterns = chart.multiline.tag
            assert any(re.search(p, tag) for p in patterns for tag in scalars), chart.title


def test_noise_as_a_standalone_callback_follows_the_global_step() -> None:
    model = Scripted([1.0] * 10)
    seen: list[torch.Tensor] = []

    class Grab(Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            seen.append(pl_module.layer.weight.grad.clone())

    fit(model, [GradientNoise(eta=1.0, gamma=0.0), Grab()], max_steps=10)
    assert all(g.abs().sum() > 0 for g in seen)  # the zero gradients received noise
    assert not torch.equal(seen[0], seen[1])


def test_pickles_and_bad_arguments() -> None:
    escape = EscapeCallback(ladders={"saddle": [Perturb(radius=0.2)]})
    clone = pickle.loads(pickle.dumps(escape))
    assert clone.policy.ladders["saddle"][0].radius == 0.2
    for kwargs, match in [
        ({"probation_steps": 0}, "`probation_steps` must be a positive integer, got 0"),
        ({"cooldown_steps": -1}, "`cooldown_steps` must be a non-negative integer, got -1"),
        ({"max_escapes": -1}, "`max_escapes` must be a non-negative integer, got -1"),
        ({"max_failures": 0}, "`max_failures` must be a positive integer, got 0"),
        ({"snapshot_device": "gpu"}, "`snapshot_device` can be 'same', 'cpu', got 'gpu'"),
        ({"guard_every_n_steps": 0}, "`guard_every_n_steps` must be a positive integer, got 0"),
        ({"ladders": {"stuck": [Perturb()]}}, "`ladders` keys can be .* got 'stuck'"),
        (
            {"ladders": {"saddle": [Perturb(), "Perturb"]}},
            r"`ladders\['saddle'\]\[1\]` must be an EscapeStep, got 'Perturb'",
        ),
        (
            {"ladders": {"saddle": (s for s in [Perturb()])}},
            r"`ladders\['saddle'\]` must be a list of EscapeStep, got <generator",
        ),
        ({"ladders": [Perturb()]}, "`ladders` must be a mapping of kind to escape steps"),
        (
            {"ladders": {"saddle": Perturb()}},
            r"`ladders\['saddle'\]` must be a list of EscapeStep, got Perturb\(radius=0.1",
        ),
        ({"detector": "min"}, "`detector` must be a StallDetector or None, got 'min'"),
        ({"seed": 2**64}, r"`seed` must be an integer in \[0, 2\*\*63\)"),
        ({"verbose": 1}, "`verbose` must be a bool, got 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            EscapeCallback(**kwargs)


class Scale(EscapeStep):
    """A user-written escape step: scale every trainable weight by ``factor`` once."""

    def __init__(self, factor: float = 3.0) -> None:
        self.factor = factor

    def config(self) -> dict[str, Any]:
        return {"factor": self.factor}

    def stronger(self) -> Scale:
        return Scale(self.factor**2)

    def apply(self, ctx: EscapeContext) -> str:
        with torch.no_grad():
            for p in ctx.params():
                p.mul_(self.factor)
        return f"scaled {len(ctx.params())} tensors by {self.factor}"


class Settings(EscapeStep):
    """A plain subclass that takes a setting and leaves ``config()`` to the base class."""

    def __init__(self, factor: float = 3.0) -> None:
        self.factor = factor

    def apply(self, ctx: EscapeContext) -> str:
        return f"factor {self.factor}"


class Needs(Settings):
    def __init__(self, factor: float) -> None:
        self.factor = factor


class NoApply(EscapeStep):
    def aply(self, ctx: EscapeContext) -> str:  # misspelt: the base class's apply stays
        return "never"


def test_a_ladder_of_steps_the_loop_cannot_use_is_refused_at_construction() -> None:
    # Each escape acts with a fresh copy, type(step)(**step.config()): a plain subclass without
    # config() acted with its defaults (factor 3.0 for the 0.5 given), or crashed the fit at its
    # first escape (a required argument); a step without apply() crashed it with an empty
    # NotImplementedError; a window longer than the probation was cut by the verdict unsaid.
    for ladder, match in [
        ([Settings(0.5)], r"`ladders\['plateau'\]\[0\]` Settings takes factor but does not define"),
        ([Perturb(), Needs(0.5)], r"`ladders\['plateau'\]\[1\]` Needs takes factor"),
        ([NoApply()], r"`ladders\['plateau'\]\[0\]` NoApply does not implement `apply\(ctx\)`"),
        (
            [LRKick(factor=2.0, steps=100)],
            r"`ladders\['plateau'\]\[0\]` LRKick\(factor=2.0, steps=100\) acts for 100 steps, "
            r"longer than `probation_steps=6`",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            EscapeCallback(ladders={"plateau": ladder}, probation_steps=6)
    EscapeCallback(ladders={"plateau": [Scale(0.5), LRKick(steps=6)]}, probation_steps=6)


def test_a_user_written_step_plugs_into_the_loop() -> None:
    before, after = StateRecorder(), StateRecorder()
    escape = EscapeCallback(
        StallDetector(patience=10, warmup_steps=5, check_every_n_steps=5),
        probation_steps=10,
        max_failures=2,
        ladders=_everywhere(Scale(3.0)),
    )
    fit(NetWithScheduler(), [before, escape, after], max_steps=60)
    assert [e.action for e in escape.events] == ["Scale(factor=3.0)", "Scale(factor=9.0)"]
    assert escape.events[0].reason.startswith("scaled 4 tensors by 3.0")
    assert all(e.verdict == "rolled_back" for e in escape.events)
    assert escape.policy.concluded
    first, last = escape.events[0], escape.events[-1]
    # The second escape waited out the back-off (the cooldown, 10 steps) after the first failed.
    assert last.step >= first.end_step + 10
    assert same_state(after.states[last.end_step]["model"], before.states[last.step]["model"])


@pytest.mark.usefixtures("unforeseen_end")
def test_settings_waiting_for_a_boundary_are_put_back_at_the_end() -> None:
    # The batch size halves at an epoch end; training stops before the next epoch end, where the
    # original size would come back.
    sizes = BatchSizes()
    escape = EscapeCallback(
        _stalls_at_once(),
        probation_steps=1000,
        max_escapes=1,
        ladders=_everywhere(BatchSizeChange(factor=0.5, steps=1000, method="dataloader")),
    )
    model = Net(n=64, batch_size=16, lr=1e-3)  # 4 batches per epoch
    trainer = fit(model, [escape, sizes], max_steps=10)
    assert escape.events[0].verdict in ("accepted", "neutral", "rolled_back")
    assert sizes.sizes[-1] == 8  # the change was in force when training stopped
    assert model.batch_size == 16
    assert trainer.reload_dataloaders_every_n_epochs == 0


class LBFGSNet(Net):
    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)


def test_a_kick_is_passed_over_under_lbfgs_for_the_next_rung() -> None:
    # LBFGS reads its rate before it first calls its closure, where the kick is made (the hook
    # runs inside the closure): a kick showed in the hooks (x10) and left the step as it was.
    escape = EscapeCallback(
        StallDetector(patience=4, warmup_steps=0, check_every_n_steps=2, min_delta_rel=0.9),
        probation_steps=6,
        max_escapes=1,
        ladders=_everywhere(LRKick(factor=10.0, steps=3), Perturb(radius=0.1)),
    )
    fit(LBFGSNet(), [escape], max_steps=20)
    assert [e.action.split("(")[0] for e in escape.events] == ["Perturb"]


def test_a_run_that_keeps_diverging_is_stopped_not_rolled_back_forever() -> None:
    # Healthy for 30 steps, then non-finite at every step whatever the weights: each rollback to
    # the guard is followed by the same divergence. After `max_failures` rollbacks in a row the
    # run is stopped with a message, instead of looping to the end with ever more events.
    trace = [1.0 - 0.01 * t for t in range(30)] + [math.nan] * 470
    escape = EscapeCallback(
        StallDetector(patience=50, warmup_steps=0, check_every_n_steps=5, smoothing=0.0),
        guard_every_n_steps=10,
        max_failures=3,
    )
    with pytest.warns(UserWarning, match="stopping training at step 49: the run diverged 3 times"):
        trainer = fit(Scripted(trace), [escape], max_steps=500)
    assert [e.action for e in escape.events] == ["rollback"] * 3
    assert trainer.global_step == 50


class RaiseAt(Callback):
    """Ends the run with an error at one step, as SpikeDetection does on a loss spike."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("loss spike")


def test_an_error_during_probation_leaves_the_model_from_before_the_escape() -> None:
    before = StateRecorder()
    escape = EscapeCallback(
        StallDetector(patience=10, warmup_steps=5, check_every_n_steps=5),
        probation_steps=20,
        ladders=_everywhere(Perturb(radius=3.0)),
    )
    model = NetWithScheduler()
    with pytest.raises(RuntimeError, match="loss spike"):
        fit(model, [before, escape, RaiseAt(step=30)], max_steps=60)
    [event] = escape.events
    assert event.step < 30 < event.step + 20  # the error came during probation
    assert event.verdict == "rolled_back"
    assert "training stopped (RuntimeError: loss spike) during probation" in event.reason
    assert same_state(model.state_dict(), before.states[event.step]["model"])


@pytest.mark.parametrize("limit", [{"max_steps": 30}, {"max_epochs": 8}])
@pytest.mark.usefixtures("unforeseen_end")
def test_last_checkpoint_holds_the_final_model_not_a_failed_trial(
    tmp_path: Path, limit: dict[str, int]
) -> None:
    escape = EscapeCallback(
        StallDetector(patience=10, warmup_steps=5, check_every_n_steps=5),
        probation_steps=1000,  # still on probation when training ends: settled at the end
        ladders=_everywhere(Perturb(radius=3.0)),
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = NetWithScheduler()  # 4 batches per epoch
    fit(model, [escape, checkpoint], enable_checkpointing=True, **limit)
    [event] = escape.events
    assert event.verdict == "rolled_back"
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert same_state(saved, model.state_dict())


class WithBackbone(Net):
    """`l1` is the backbone BackboneFinetuning freezes, then unfreezes as a new param group."""

    def __init__(self) -> None:
        super().__init__(n=32, batch_size=32)  # one batch per epoch: a smooth loss
        self.backbone = self.l1

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


def test_a_rollback_after_another_callback_changed_the_optimizer_is_never_blind() -> None:
    from lightning.pytorch.callbacks import BackboneFinetuning

    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=10)
    escape = EscapeCallback(
        # Every check is a stall: an escape starts at once, and BackboneFinetuning adds the
        # backbone's parameter group at epoch 10 (step 10), while it is on probation.
        StallDetector(patience=4, warmup_steps=0, check_every_n_steps=2, min_delta_rel=0.9),
        probation_steps=16,
        max_escapes=1,
        ladders=_everywhere(Perturb(radius=0.3)),
        keep_neutral=False,  # a trial that fails is rolled back
    )
    with pytest.warns(UserWarning, match=r"cannot be rolled back exactly .*by BackboneFinetuning"):
        fit(WithBackbone(), [finetuning, escape], max_steps=40)
    [event] = escape.events
    assert event.verdict == "neutral"  # judged now and kept (not as help), never restored blindly
    assert "the optimizers' parameter groups changed during the escape" in event.reason


class SwitchesToAdam(Net):
    """Swaps its SGD for Adam at epoch 2 (step 8), Lightning's way: setup_optimizers again."""

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 2:
            self.optimizer = "adam"
            self.trainer.strategy.setup_optimizers(self.trainer)


def test_a_rollback_after_the_optimizer_was_swapped_is_never_blind() -> None:
    # The parameter groups kept their sizes: SGD's momentum was loaded into Adam at the rollback
    # and Adam's next step failed (KeyError: 'exp_avg').
    escape = EscapeCallback(
        StallDetector(patience=4, warmup_steps=0, check_every_n_steps=2, min_delta_rel=0.9),
        probation_steps=6,
        max_escapes=1,
        ladders=_everywhere(Perturb(radius=0.3)),
        keep_neutral=False,
    )
    with pytest.warns(UserWarning, match="cannot be rolled back exactly"):
        trainer = fit(SwitchesToAdam(), [escape], max_steps=20)
    [event] = escape.events
    assert event.verdict == "neutral"  # kept, not counted as help
    assert "the optimizers changed during the escape" in event.reason
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)


def _forced(probation: int = 16, radius: float = 0.3) -> EscapeCallback:
    """One Perturb at the first check, which fails (a 90% gain is asked) and is rolled back."""
    return EscapeCallback(
        StallDetector(patience=4, warmup_steps=0, check_every_n_steps=2, min_delta_rel=0.9),
        probation_steps=probation,
        max_escapes=1,
        ladders=_everywhere(Perturb(radius=radius)),
        keep_neutral=False,
    )


@pytest.mark.usefixtures("unforeseen_end")
def test_swa_swapping_the_scheduler_during_probation_is_no_crash_and_keeps_the_average() -> None:
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=10)  # SWALR from step 10
    escape = _forced(probation=100)  # still on probation at the end of training
    model = WithBackbone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, [swa, escape], max_steps=30)
    [event] = escape.events
    # Lightning 2.6 puts SWALR among the trainer's schedulers: the run changed shape, so the
    # trial is kept with a warning. Lightning 2.4 steps SWALR itself: the rollback is exact.
    kept = [w for w in caught if "cannot be rolled back exactly" in str(w.message)]
    assert event.verdict == ("neutral" if kept else "rolled_back")
    assert not kept or "the learning-rate schedulers changed" in str(kept[0].message)
    # Where SWA copies its average into the model at the end (2.6 does, with max_steps; 2.4 only
    # at its last epoch), that comes after the last verdict: the final model is the average.
    plain_swa, plain = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=10), WithBackbone()
    fit(plain, [plain_swa], max_steps=30)
    if same_state(plain.state_dict(), plain_swa._average_model.state_dict()):
        assert same_state(model.state_dict(), swa._average_model.state_dict())


def test_pruning_masks_are_never_rolled_back() -> None:
    from lightning.pytorch.callbacks import ModelPruning

    pruning = ModelPruning("l1_unstructured", amount=0.2, make_pruning_permanent=False)
    escape = _forced(probation=6, radius=3.0)
    model = WithBackbone()
    fit(model, [pruning, escape], max_steps=30)
    masks = {n: b for n, b in model.named_buffers() if n.endswith("_mask")}
    assert masks  # pruned
    plain = WithBackbone()
    fit(
        plain,
        [ModelPruning("l1_unstructured", amount=0.2, make_pruning_permanent=False)],
        max_steps=30,
    )
    sparsity = {n: float((b == 0).float().mean()) for n, b in masks.items()}
    plain_sparsity = {
        n: float((b == 0).float().mean()) for n, b in plain.named_buffers() if n.endswith("_mask")
    }
    assert sparsity == plain_sparsity  # each epoch's pruning stands, whatever was rolled back
    assert any(
        e.verdict == "rolled_back" or "cannot be rolled back" in e.reason for e in escape.events
    )


def test_no_escape_starts_that_training_ends_before_it_can_be_judged() -> None:
    # The same stall as above, but the trainer says when it ends: an escape begun there would be
    # judged on a cut-short probation, and a rollback would throw away the last steps of training.
    escape = EscapeCallback(
        StallDetector(patience=10, warmup_steps=5, check_every_n_steps=5),
        probation_steps=1000,
        ladders=_everywhere(Perturb(radius=0.3)),
    )
    fit(NetWithScheduler(), [escape], max_steps=30)
    assert escape.diagnoses and escape.events == []
    assert escape.engine.horizon == 29


class _StopAt(Callback):
    """Sets ``should_stop`` at the end of optimizer step ``step`` (as EarlyStopping or a Timer)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("pruning_first", [True, False], ids=["pruning-first", "escape-first"])
def test_a_trial_cut_short_by_a_stop_is_judged_before_pruning_is_made_permanent(
    pruning_first: bool,
) -> None:
    from lightning.pytorch.callbacks import ModelPruning

    # ModelPruning's `on_train_end` renames `weight_orig` back to `weight`; judged after that, a
    # failed trial could not be rolled back and was kept, whichever callback came first.
    pruning = ModelPruning("l1_unstructured", amount=0.2)  # make_pruning_permanent=True
    escape = _forced(probation=100, radius=3.0)  # the trial outlasts the stop at step 20
    callbacks: list[Callback] = [pruning, escape] if pruning_first else [escape, pruning]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(WithBackbone(), [*callbacks, _StopAt(20)], max_steps=200)
    assert trainer.global_step == 20
    [event] = escape.events
    assert event.verdict == "rolled_back", event.reason
    assert "settled at the end of training" in event.reason
    assert not [w for w in caught if "cannot be rolled back" in str(w.message)]


def test_a_stop_before_min_steps_does_not_settle_the_trial() -> None:
    # Lightning trains on to `min_steps` whatever `should_stop` says: the trial runs its course.
    escape = _forced(probation=10, radius=3.0)
    fit(WithBackbone(), [escape, _StopAt(6)], max_steps=200, min_steps=30)
    first = escape.events[0]
    assert first.end_step is not None and first.end_step - first.step >= 10
    assert "settled at the end of training" not in first.reason


class _Stream(torch.utils.data.IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Net's data with no length: Lightning cannot count the batches of an epoch."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __iter__(self) -> Any:
        return iter(self.data)


class _Unsized(WithBackbone):
    def train_dataloader(self) -> Any:
        loader = super().train_dataloader()
        return torch.utils.data.DataLoader(_Stream(loader.dataset), batch_size=32)


def test_unsized_data_without_max_steps_leaves_the_end_unknown_not_past() -> None:
    # Lightning estimates the stepping batches as `max_steps`, -1 when unset: read as the end,
    # no escape could ever start.
    escape = _forced(probation=5)
    trainer = fit(_Unsized(), [escape], max_steps=-1, max_epochs=30)
    assert trainer.global_step == 30
    assert escape.engine.horizon is None
    assert [e.verdict for e in escape.events] != []


def test_with_two_optimizers_per_batch_the_end_is_counted_in_batches() -> None:
    # max_steps=60 optimizer steps are 30 batches (steps 0 to 29): an escape starts only where
    # its probation of 20 steps ends by step 29 (the end was read as step 59).
    escape = _forced(probation=20)
    model = Net(manual=True, two_optimizers=True, n=32, batch_size=32, manual_loss=True)
    trainer = fit(model, [escape], max_steps=60)
    assert trainer.global_step == 60
    assert escape.engine.horizon == 29
    assert escape.events and all(e.step + 20 <= 29 for e in escape.events)


def test_a_run_resumed_mid_epoch_knows_its_last_step(tmp_path: Path) -> None:
    # On resume from a checkpoint written at a batch's end, Lightning's count of batches that
    # stepped trails `global_step` by one until the first batch: no reason to scale the end down
    # (it was read as step 35 here, and escapes the uninterrupted run makes were refused).
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1)
    fit(Net(), [EscapeCallback(), checkpoint], max_steps=40, enable_checkpointing=True)
    resumed = EscapeCallback()
    fit(Net(), [resumed], max_steps=40, ckpt_path=str(tmp_path / "epoch=2-step=10.ckpt"))
    assert resumed.engine.horizon == 39


def test_a_ladder_given_as_a_string_is_refused_as_one() -> None:
    with pytest.raises(
        ValueError, match=r"`ladders\['plateau'\]` must be a list of EscapeStep, got 'Perturb'"
    ):
        EscapeCallback(ladders={"plateau": "Perturb"})  # type: ignore[dict-item]


def test_numpy_numbers_are_numbers_and_tensors_are_refused_by_name() -> None:
    import numpy as np

    from lightning_escape import TrustRatioStep

    detector = StallDetector(patience=np.int64(300), min_delta_rel=np.float32(0.01))
    assert detector.patience == 300 and type(detector.patience) is int
    assert EscapeCallback(detector, probation_steps=np.int32(50)).engine.probation_steps == 50
    assert Perturb(radius=np.float64(0.25)).radius == 0.25
    assert TrustRatioStep(trust=np.float32(0.5), steps=np.int16(7)).steps == 7
    with pytest.raises(ValueError, match=r"`patience` must be a positive integer, got tensor\(3\)"):
        StallDetector(patience=torch.tensor(3))
    with pytest.raises(ValueError, match=r"`verbose` must be a bool, got "):
        EscapeCallback(verbose=np.bool_(True))


class _GrowingCache(WithBackbone):
    """A non-persistent cache rebuilt at a larger size at step 8 (as rotary-embedding caches are)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(2), persistent=False)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.trainer.global_step == 8:
            self.cache = torch.zeros(4)
        return super().training_step(batch, batch_idx)


def test_a_buffer_resized_during_probation_keeps_the_trial_with_a_warning() -> None:
    # The snapshot's buffer no longer fits: the rollback raised and ended the fit.
    escape = _forced(probation=6, radius=3.0)
    with pytest.warns(UserWarning, match=r"cannot be rolled back exactly \(the module's buffers"):
        fit(_GrowingCache(), [escape], max_steps=20)
    [event] = escape.events
    # Kept, not counted as help (it was "accepted", and the policy went back to its first rung
    # with no back-off): a failure to the policy.
    assert event.verdict == "neutral" and "cannot be rolled back" in event.reason
    assert "not counted as help" in event.reason
    assert escape.policy.backoff == 1


def test_a_detector_both_given_and_listed_is_refused_at_the_fit() -> None:
    # Lightning called its hooks besides the escape callback: 45 samples where the run had 26,
    # one diagnosis where there were three, no escape where there were two.
    detector = StallDetector()
    with pytest.raises(ValueError, match="is also in the Trainer's `callbacks`"):
        fit(Net(), [detector, EscapeCallback(detector)], max_steps=4)


def test_mode_max_on_the_training_loss_is_refused() -> None:
    # It kept escapes that raised the loss from 3.16 to 68.5 as improvements.
    with pytest.raises(ValueError, match="`mode='max'` watches for a value that should rise"):
        StallDetector(mode="max")
    StallDetector(monitor="val_acc", mode="max")


def test_a_patience_too_long_for_any_run_still_runs() -> None:
    # At 2**52 the gradient level's decay rounded to 1: ZeroDivisionError at the first sample.
    detector = StallDetector(patience=2**62, warmup_steps=0, check_every_n_steps=2)
    fit(Net(), [detector], max_steps=6)
    assert detector.diagnoses == []


def _kicking(ladder: list[Any], probation: int = 4) -> EscapeCallback:
    return EscapeCallback(
        StallDetector(patience=4, warmup_steps=0, check_every_n_steps=2, min_delta_rel=0.9),
        probation_steps=probation,
        cooldown_steps=0,
        max_failures=50,
        keep_neutral=False,
        ladders=_everywhere(*ladder),
    )


@pytest.mark.parametrize("ladder", [[], [Perturb(radius=0.2)]], ids=["no escapes", "another step"])
def test_a_run_resumed_with_other_ladders_finishes_the_escape_it_was_trying(
    tmp_path: Path, ladder: list[Any]
) -> None:
    # The trial on probation was rebuilt from the new ladders: IndexError at the load (no rung
    # there), or a GradientNoise finishing an LRKick's trial under the LRKick's name.
    every = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    writer = _kicking([LRKick(factor=10.0, steps=2), Perturb(radius=0.5)])
    fit(Net(), [writer, every], enable_checkpointing=True, max_steps=24)
    pending = [
        path
        for path in sorted(tmp_path.glob("*.ckpt"))
        if torch.load(path, weights_only=True)["callbacks"][writer.state_key]["engine"]["trial"]
    ]
    assert pending
    for path in pending:
        state = torch.load(path, weights_only=True)["callbacks"][writer.state_key]
        loaded = _kicking(ladder)
        loaded.load_state_dict(state)
        trial = loaded.engine.trial
        assert trial is not None
        assert trial.step.describe() == loaded.events[trial.event].action
        resumed = _kicking(ladder)
        fit(Net(), [resumed], max_steps=24, ckpt_path=path)
        assert all(e.verdict is not None for e in resumed.events)


@dataclasses.dataclass(eq=False, repr=False)
class HeadKick(LRKick):
    """A subclass of a dataclass step with an `__init__` of its own: `only_head` is no field."""

    def __init__(self, factor: float = 10.0, steps: int = 5, only_head: bool = False) -> None:
        super().__init__(factor=factor, steps=steps)
        self.only_head = only_head


def test_a_step_whose_copies_lose_a_setting_is_refused() -> None:
    # Each escape acts with type(step)(**step.config()): HeadKick(only_head=True) acted with False.
    with pytest.raises(ValueError, match=r"HeadKick is not rebuilt whole .*only_head=True"):
        EscapeCallback(ladders={"plateau": [HeadKick(only_head=True)]})
    EscapeCallback(ladders={"plateau": [HeadKick()]})


class EmptyValidation(Net):
    """A validation loop with no batches: Lightning writes its checkpoints at epochs' ends."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def val_dataloader(self) -> Any:
        return []


def test_a_run_resumed_from_an_epochs_end_mid_kick_ends_as_the_uninterrupted_one(
    tmp_path: Path,
) -> None:
    # Lightning 2.6 restores the count of batches that stepped one ahead from a checkpoint
    # written at an epoch's end: the kick's window, the noise's seeds and the checks moved by one
    # step (parameters off from step 10), and the summary told 41 steps for 40.
    def escape() -> EscapeCallback:
        return EscapeCallback(
            forcing_detector(),
            probation_steps=8,
            cooldown_steps=0,
            max_failures=50,
            keep_neutral=False,
            ladders=_everywhere(LRKick(3.0, steps=4), GradientNoise(eta=0.1, steps=6)),
        )

    every = ModelCheckpoint(
        dirpath=tmp_path, every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1
    )
    torch.manual_seed(0)
    whole, writer = EmptyValidation(n=16, batch_size=8), escape()  # two batches per epoch
    fit(whole, [writer, every], enable_checkpointing=True, max_steps=40)
    assert writer.events[0].action.startswith("LRKick") and writer.events[0].step == 5
    torch.manual_seed(0)
    resumed, again = EmptyValidation(n=16, batch_size=8), escape()
    fit(resumed, [again], max_steps=40, ckpt_path=tmp_path / "epoch=2-step=6.ckpt")  # mid-kick
    assert [e.to_dict() for e in again.events] == [e.to_dict() for e in writer.events]
    assert same_state(resumed.state_dict(), whole.state_dict())
    assert again.detector.steps_seen == writer.detector.steps_seen == 40
