from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from models import Digests, fit, fit_two_ranks, same_state
from torch import nn
from torch.utils.data import DataLoader

from lightning_escape import (
    EscapeCallback,
    LRKick,
    StallClassifier,
    StallDetector,
    TrustRatioStep,
)
from lightning_escape.escapes import EscapeContext
from lightning_escape.policy import ESCAPABLE, EscapePolicy, default_ladders


def _deep_tanh(depth: int = 8, width: int = 32, init_std: float = 0.05) -> nn.Sequential:
    """Small weights, default (nonzero) biases: the signal reaches the top, the gradient fades."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.normal_(linear.weight, std=init_std)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def _backward(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 32, generator=g), torch.randn(64, 1, generator=g)
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()


def _backward_any(model: nn.Module, width: int) -> None:
    model(torch.randn(8, width)).pow(2).mean().backward()


def _weights(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.dim() >= 2]


def _reference(params: list[torch.Tensor], before: list[torch.Tensor], trust: float) -> None:
    """Plain per-tensor loop: Δ → Δ·trust·‖θ‖/‖Δ‖ in float64, zero norms left alone."""
    for p, b in zip(params, before):
        delta = p.double() - b.double()
        weight, step = b.double().norm(), delta.norm()
        if weight > 0 and step > 0:
            p.copy_((b.double() + delta * (trust * weight / step)).to(p.dtype))


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, None)]
)
def test_the_fused_rescaling_agrees_with_a_per_tensor_loop(
    dtype: torch.dtype, rtol: float | None
) -> None:
    g = torch.Generator().manual_seed(1)
    shapes = [(8, 4), (3, 3, 2), (5, 7), (6, 6), (2, 9)]
    before = [torch.randn(s, generator=g).to(dtype) * 10.0**-i for i, s in enumerate(shapes)]
    before[3].zero_()  # zero norm: the update stays
    after = [b + torch.randn(b.shape, generator=g).to(dtype) * 1e-3 for b in before]
    after[4] = before[4].clone()  # zero update: nothing to rescale
    expected = [a.clone() for a in after]
    _reference(expected, before, trust=0.02)
    fused = [a.clone() for a in after]
    TrustRatioStep(trust=0.02).rescale(fused, [b.clone() for b in before])
    for got, want, b in zip(fused, expected, before):
        assert got.dtype == dtype
        if rtol is None:  # bfloat16: the weights agree to their last bit but one
            torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=0.0)
        else:  # the updates themselves agree
            torch.testing.assert_close(got - b, want - b, rtol=rtol, atol=0.0)
    assert torch.equal(fused[3], after[3]) and torch.equal(fused[4], after[4])
    for got, b in zip(fused[:3], before[:3]):
        moved = (got.double() - b.double()).norm() / b.double().norm()
        assert moved.item() == pytest.approx(0.02, rel=0.1 if rtol is None else 10 * rtol)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=1e-3),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
    ],
    ids=["sgd", "momentum", "adam", "adamw"],
)
def test_each_layer_moves_by_trust_times_its_norm(make: Any) -> None:
    torch.manual_seed(0)
    model = _deep_tanh(depth=4)
    twin = copy.deepcopy(model)
    opt, twin_opt = make(model.parameters()), make(twin.parameters())
    step = TrustRatioStep(trust=0.03, steps=3)
    for i in range(3):
        ctx = EscapeContext(model, [opt], step=10 + i)
        _backward(model, seed=i)
        _backward(twin, seed=i)
        before = [p.detach().clone() for p in model.parameters()]
        step.before_optimizer_step(ctx, opt)
        opt.step()
        step.after_optimizer_step(ctx, opt)
        twin_opt.step()
        for p, b in zip(model.parameters(), before):
            if p.dim() >= 2:
                moved = ((p.detach() - b).norm() / b.norm()).item()
                assert moved == pytest.approx(0.03, rel=1e-4)
        if i == 0:  # the same gradients: biases keep the optimizer's own update, bit for bit
            for p, q in zip(model.parameters(), twin.parameters()):
                assert torch.equal(p, q) == (p.dim() < 2)
    step.undo(EscapeContext(model, [opt]))
    assert not step._saved  # the buffer goes with the window


def test_a_skipped_step_and_repeated_closure_calls_rescale_once() -> None:
    torch.manual_seed(0)
    model = _deep_tanh(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrustRatioStep(trust=0.05)
    _backward(model)
    step.before_optimizer_step(EscapeContext(model, [opt], step=4), opt)  # the scaler skips it
    ctx = EscapeContext(model, [opt], step=5)
    start = [p.detach().clone() for p in _weights(model)]
    step.before_optimizer_step(ctx, opt)
    with torch.no_grad():  # a closure optimizer moves the weights between closure calls...
        for p in _weights(model):
            p.add_(p.grad, alpha=-0.1)
    step.before_optimizer_step(ctx, opt)  # ...and calls the hook again: no new copy
    opt.step()
    step.after_optimizer_step(ctx, opt)
    step.after_optimizer_step(ctx, opt)  # once per step, whatever calls it again
    for p, b in zip(_weights(model), start):
        assert ((p.detach() - b).norm() / b.norm()).item() == pytest.approx(0.05, rel=1e-4)


def test_unavailable_with_one_tensor_balanced_ratios_or_no_gradient() -> None:
    step = TrustRatioStep()
    one = nn.Linear(4, 1)
    _backward_any(one, 4)
    assert "1 weight tensor(s) with a gradient" in str(step.unavailable(EscapeContext(one)))
    balanced = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    for p in balanced.parameters():
        p.grad = 0.1 * p.detach().clone()  # every ratio 0.1
    why = step.unavailable(EscapeContext(balanced))
    assert why is not None and "span only 1x" in why and "min_spread=100.0" in why
    assert TrustRatioStep(min_spread=1.0).unavailable(EscapeContext(balanced)) is None
    fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert "0 weight tensor(s)" in str(step.unavailable(EscapeContext(fresh)))


def test_available_on_a_deep_tanh_net_with_small_init() -> None:
    torch.manual_seed(0)
    model = _deep_tanh()
    _backward(model)
    ctx = EscapeContext(model)
    step = TrustRatioStep()
    assert step.unavailable(ctx) is None
    spread = step.spread(ctx)
    assert not isinstance(spread, str)
    assert spread[0] >= 100 and spread[3] == 9
    text = step.apply(ctx)
    assert "each weight tensor's update set to 0.01 x its norm" in text
    assert f"the gradient-to-weight ratios of the 9 weight tensors span {spread[0]:.3g}x" in text


def test_the_default_ladders_try_it_only_on_evidence() -> None:
    ladders = default_ladders(probation_steps=120)
    rungs = [ladders["plateau"][2], ladders["saddle"][3]]
    assert all(isinstance(r, TrustRatioStep) and r.steps == 30 for r in rungs)
    torch.manual_seed(0)
    deep = _deep_tanh()
    _backward(deep)
    one = nn.Linear(4, 1)
    _backward_any(one, 4)
    for rung in rungs:
        assert rung.unavailable(EscapeContext(deep)) is None
        assert rung.unavailable(EscapeContext(one)) is not None
    policy = EscapePolicy({"plateau": [TrustRatioStep(), LRKick()]})
    step, why = policy.choose("plateau", EscapeContext(one))
    assert isinstance(step, LRKick)
    assert why.startswith(
        "skipped TrustRatioStep(trust=0.01, steps=50, min_spread=100.0) (1 weight"
    )
    fresh = EscapePolicy({"plateau": [TrustRatioStep(), LRKick()]})
    step, why = fresh.choose("plateau", EscapeContext(deep))
    assert isinstance(step, TrustRatioStep) and why == ""


def test_stronger_doubles_trust_and_the_step_round_trips() -> None:
    step = TrustRatioStep(trust=0.02, steps=7, min_spread=50.0)
    assert step.describe() == "TrustRatioStep(trust=0.02, steps=7, min_spread=50.0)"
    stronger = step.stronger()
    assert isinstance(stronger, TrustRatioStep)
    assert (stronger.trust, stronger.steps, stronger.min_spread) == (0.04, 7, 50.0)
    assert stronger.stronger().trust == 0.08
    clone = pickle.loads(pickle.dumps(step))
    assert clone.describe() == step.describe() and clone.config() == step.config()
    # Nothing outlives an optimizer step: the state to resume mid-window is the engine's trial.
    assert step.state_dict() == {}
    step.load_state_dict(step.state_dict())
    assert step.duration == 7


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: TrustRatioStep(trust=0), "`trust` must be a positive finite number, got 0"),
        (
            lambda: TrustRatioStep(trust=math.nan),
            "`trust` must be a positive finite number, got nan",
        ),
        (lambda: TrustRatioStep(steps=0), "`steps` must be a positive integer, got 0"),
        (lambda: TrustRatioStep(steps=2.5), "`steps` must be a positive integer, got 2.5"),
        (
            lambda: TrustRatioStep(min_spread=0.5),
            r"`min_spread` must be a number in \[1.0, inf\), got 0.5",
        ),
        (
            lambda: TrustRatioStep(min_spread=math.inf),
            r"`min_spread` must be a number in \[1.0, inf\), got inf",
        ),
    ],
)
def test_bad_arguments(factory: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


# ---------------------------------------------------------------------------- in a Trainer


class FlatDeepTanh(pl.LightningModule):
    """A deep tanh regression trained with full-batch SGD, monitored through a flat ``flat`` metric.

    The flat metric makes every stall a plateau and every escape a failure (rolled back), whatever
    the escape does to the real loss.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = _deep_tanh(depth=4, width=32)
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 32, generator=g), torch.randn(64, 1, generator=g)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.log("flat", 1.0)
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader[Any]:
        # The full batch, four times per epoch: a resumed run sees the same data at every step.
        return DataLoader([(self.x, self.y)] * 4, batch_size=None)


class UpdateRecorder(pl.Callback):
    """Per optimizer step: the weights and gradients before it and the weights after it."""

    def __init__(self) -> None:
        self.before: dict[int, list[torch.Tensor]] = {}
        self.grads: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}
        self.states: dict[int, dict[str, Any]] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = trainer.global_step
        self.before[step] = [p.detach().clone() for p in pl_module.parameters()]
        self.grads[step] = [p.grad.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step - 1
        self.after[step] = [p.detach().clone() for p in pl_module.parameters()]
        self.states[step] = {
            "model": copy.deepcopy(pl_module.state_dict()),
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        }


def _fit_flat(recorder: UpdateRecorder, steps: int = 4) -> EscapeCallback:
    escape = _window_callback(steps, probation_steps=10)
    fit(FlatDeepTanh(), [escape, recorder], max_steps=40)
    return escape


def test_outside_its_window_the_optimizers_update_is_untouched() -> None:
    recorder = UpdateRecorder()
    escape = _fit_flat(recorder, steps=4)
    [event] = escape.events
    assert event.diagnosis == "plateau" and event.action.startswith("TrustRatioStep(")
    assert "gradient-to-weight ratios of the 5 weight tensors span" in event.reason
    rescaled = []
    for step, after in recorder.after.items():
        if step == event.end_step:
            continue  # restored at the verdict, after its optimizer step
        before, grads = recorder.before[step], recorder.grads[step]
        sgd = [
            torch.allclose(a, b - 0.1 * g, rtol=1e-6, atol=1e-9)
            for a, b, g in zip(after, before, grads)
        ]
        weights = [i for i, b in enumerate(before) if b.dim() >= 2]
        if all(sgd):
            continue
        rescaled.append(step)
        for i, (a, b) in enumerate(zip(after, before)):
            if i in weights:
                assert ((a - b).norm() / b.norm()).item() == pytest.approx(0.05, rel=1e-4)
            else:
                assert sgd[i]  # biases keep the optimizer's update
    assert rescaled == list(range(event.step + 1, event.step + 5))


def test_a_rollback_restores_the_parameters_bit_for_bit() -> None:
    recorder = UpdateRecorder()
    escape = _fit_flat(recorder, steps=4)
    [event] = escape.events
    assert event.verdict == "rolled_back" and event.end_step is not None
    pre, post = recorder.states[event.step], recorder.states[event.end_step]
    assert same_state(pre, post)
    # and the window moved the run between the two
    moved = recorder.states[event.step + 4]["model"]
    assert not all(torch.equal(pre["model"][k], moved[k]) for k in pre["model"])


def test_only_plateau_and_saddle_ladders_hold_it() -> None:
    ladders = default_ladders()
    holding = {
        kind for kind in ESCAPABLE if any(isinstance(s, TrustRatioStep) for s in ladders[kind])
    }
    assert holding == {"plateau", "saddle"}


def _window_callback(steps: int = 8, probation_steps: int = 12) -> EscapeCallback:
    """A trust-ratio window of ``steps`` at the first plateau of the flat metric; one escape."""
    return EscapeCallback(
        StallDetector(
            monitor="flat",
            patience=10,
            warmup_steps=0,
            check_every_n_steps=5,
            # A stall of the flat metric while the training loss falls is not held off here.
            classifier=StallClassifier(probe=False, training_improves=False),
        ),
        ladders={"plateau": [TrustRatioStep(trust=0.05, steps=steps, min_spread=1.0)]},
        probation_steps=probation_steps,
        max_escapes=1,
        max_failures=1,
    )


def test_resume_mid_window_repeats_the_run(tmp_path: Path) -> None:
    full, seen_a = _window_callback(), Digests()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)  # every 4 steps
    fit(FlatDeepTanh(), [full, seen_a, ckpt], max_steps=40, enable_checkpointing=True)
    [event] = full.events
    inside = [
        path
        for path in sorted(tmp_path.glob("*.ckpt"))
        if event.step + 1 < int(path.stem.split("step=")[1]) < event.step + 8
    ]
    state = torch.load(inside[0], weights_only=True)["callbacks"][full.state_key]
    assert state["engine"]["trial"]["step"] == {}  # nothing outlives an optimizer step
    resumed, seen_b = _window_callback(), Digests()
    fit(FlatDeepTanh(), [resumed, seen_b], max_steps=40, ckpt_path=str(inside[0]))
    assert resumed.events == full.events
    # Bit for bit at every step, the rest of the window included (and after its rollback).
    assert event.step + 7 in seen_b.by_step
    assert seen_b.by_step == {step: seen_a.by_step[step] for step in seen_b.by_step}


@pytest.mark.ddp
def test_ddp_replicas_stay_identical_through_a_window(tmp_path: Path) -> None:
    base = _window_callback()
    escape = EscapeCallback(
        base.detector,
        ladders=base.policy.ladders,
        probation_steps=12,
        max_escapes=1,
        max_failures=1,
    )
    r0, r1 = fit_two_ranks(FlatDeepTanh(), escape, tmp_path)
    assert r0["actions"] and r0["actions"][0][0].startswith("TrustRatioStep(")
    assert r0["actions"] == r1["actions"]
    assert r0["digests"] == r1["digests"]  # the same weights at every step, bit for bit
