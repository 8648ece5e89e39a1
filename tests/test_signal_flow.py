"""The input's signal through the layers: its fade, the ``vanishing_gradient`` kind it gives, and
``Restandardize``, the escape that gives every hidden layer mean 0 and a set std (one-pass LSUV)."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from models import StatesByStep, fit, fit_two_ranks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_escape import EscapeCallback, Restandardize, StallClassifier, StallDetector
from lightning_escape.detectors import RecurrentEvidence, StallTracker, classify
from lightning_escape.escapes import EscapeContext
from lightning_escape.signal_flow import (
    LayerSignal,
    SignalFade,
    measured_layers,
    record_signal,
    signal_fade,
    standardize_layers,
)

# ---------------------------------------------------------------------------- models and helpers


def _mlp(depth: int = 4, width: int = 16, inputs: int = 8, outputs: int = 3) -> nn.Sequential:
    """``depth`` hidden Linear+Sigmoid layers (PyTorch's default initialisation), then a Linear."""
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.Sigmoid()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, outputs))


def _convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(8, 8, 3),
        nn.Sigmoid(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(6, 2, 1),
    )


def _model(kind: str) -> nn.Sequential:
    return _mlp() if kind == "mlp" else _convnet()


def _input(kind: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(128, 8, generator=g)
    return torch.randn(16, 3, 7, 7, generator=g)


def _layers(module: nn.Module) -> list[nn.Linear | nn.Conv2d]:
    """The Linear and Conv2d layers of a Sequential, in order (the order they run)."""
    return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _linear(model: nn.Module, index: int) -> nn.Linear:
    """The Linear layer ``model[index]`` of a Sequential."""
    assert isinstance(model, nn.Sequential)
    layer = model[index]
    assert isinstance(layer, nn.Linear)
    return layer


def _first_output(layer: nn.Module, forward: Callable[[], object]) -> torch.Tensor:
    """``layer``'s output at its first run during one whole ``forward``."""
    seen: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: Any, output: torch.Tensor) -> None:
        if not seen:
            seen.append(output.detach().clone())

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            forward()
    finally:
        handle.remove()
    return seen[0]


def _per_channel(layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """``out`` as (channels, everything else), in float64."""
    channels = out.double().movedim(1 if isinstance(layer, nn.Conv2d) else -1, 0)
    return channels.reshape(channels.shape[0], -1)


def _reference_lsuv(
    hidden: list[nn.Linear | nn.Conv2d], forward: Callable[[], object], std: float, center: bool
) -> None:
    """The classic sequential LSUV: one whole forward per hidden layer, statistics in float64."""
    for layer in hidden:
        flat = _per_channel(layer, _first_output(layer, forward))
        mean, dev = flat.mean(1), flat.std(1, unbiased=False)
        usable = dev > 0
        factor = torch.where(usable, std / dev, torch.ones_like(dev))
        assert layer.bias is not None
        with torch.no_grad():
            shape = [-1] + [1] * (layer.weight.dim() - 1)
            layer.weight.copy_(layer.weight.double() * factor.view(shape))
            bias = layer.bias.double()
            if center:
                bias = bias - torch.where(usable, mean, torch.zeros_like(mean))
            layer.bias.copy_(bias * factor)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------- standardize_layers


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_one_pass_equals_the_sequential_lsuv(kind: str, center: bool) -> None:
    model = _model(kind)
    before = _state(model)
    reference = copy.deepcopy(model)
    x = _input(kind)
    done = standardize_layers(model, lambda: model(x), center=center)
    _reference_lsuv(_layers(reference)[:-1], lambda: reference(x), std=1.0, center=center)
    names = [name for name, m in model.named_children() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert [s.layer for s in done] == names[:-1]
    assert all(s.channels == m.weight.shape[0] for s, m in zip(done, _layers(model)))
    after, expected = _state(model), _state(reference)
    for name in before:
        torch.testing.assert_close(after[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # Not a comparison of two no-ops: every hidden layer changed, the output layer did not.
    out = f"{names[-1]}.weight"
    assert all(not torch.equal(after[f"{n}.weight"], before[f"{n}.weight"]) for n in names[:-1])
    assert torch.equal(after[out], before[out])


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_hidden_outputs_get_mean_0_and_std_the_output_layer_is_kept(kind: str) -> None:
    model = _model(kind)
    x = _input(kind)
    last = _layers(model)[-1]
    kept = copy.deepcopy(last.state_dict())
    flats = [_per_channel(m, _first_output(m, lambda: model(x))) for m in _layers(model)[:-1]]
    off_before = [
        float((f.mean(1).abs() + (f.std(1, unbiased=False) - 0.5).abs()).max()) for f in flats
    ]
    standardize_layers(model, lambda: model(x), std=0.5)
    for layer in _layers(model)[:-1]:
        flat = _per_channel(layer, _first_output(layer, lambda: model(x)))
        channels = flat.shape[0]
        zeros, halves = torch.zeros(channels).double(), torch.full((channels,), 0.5).double()
        torch.testing.assert_close(flat.mean(1), zeros, atol=1e-5, rtol=0)
        torch.testing.assert_close(flat.std(1, unbiased=False), halves, atol=1e-5, rtol=0)
    assert min(off_before) > 0.05  # they were not already there
    assert all(torch.equal(v, kept[k]) for k, v in last.state_dict().items())


def test_frozen_layers_are_left_bit_for_bit_and_not_measured() -> None:
    model = _mlp()
    model[2].weight.requires_grad_(False)  # frozen: no escape may change it
    frozen = copy.deepcopy(model[2].state_dict())
    x = _input("mlp")
    assert list(measured_layers(model).values()) == ["0", "4", "6", "8"]
    done = standardize_layers(model, lambda: model(x), std=0.5)
    assert [s.layer for s in done] == ["0", "4", "6"]
    assert all(torch.equal(v, frozen[k]) for k, v in model[2].state_dict().items())
    # The layers after it are still standardized on what the frozen layer passes on (to 1e-3
    # only: layer 4's outputs start at |mean| ~ 87 std, see the float32 test below).
    flat = _per_channel(model[4], _first_output(model[4], lambda: model(x)))
    halves = torch.full((16,), 0.5).double()
    torch.testing.assert_close(flat.std(1, unbiased=False), halves, atol=1e-3, rtol=0)


class Shared(nn.Module):
    """One hidden layer called twice in the same forward (shared weights), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.sigmoid(self.inner(torch.sigmoid(self.inner(x)))))
        return out


def test_a_layer_called_twice_is_standardized_once_on_its_first_call() -> None:
    model = Shared()
    reference = copy.deepcopy(model)
    x = _input("mlp")
    done = standardize_layers(model, lambda: model(x), std=0.5)
    assert [s.layer for s in done] == ["inner"]
    flat = _per_channel(model.inner, model.inner(x).detach())  # the first call's input is x
    torch.testing.assert_close(
        flat.std(1, unbiased=False), torch.full((8,), 0.5).double(), atol=1e-5, rtol=0
    )
    _reference_lsuv([reference.inner], lambda: reference(x), std=0.5, center=True)
    torch.testing.assert_close(model.inner.weight, reference.inner.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.inner.bias, reference.inner.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("center", [True, False])
def test_a_channel_constant_on_the_batch_is_left_as_it_was(center: bool) -> None:
    torch.manual_seed(0)
    model = _mlp(depth=2)
    first = _linear(model, 0)
    with torch.no_grad():
        first.weight[3] = 0.0  # channel 3 of the first layer is its bias, for every example
    before = copy.deepcopy(first.state_dict())
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    done = standardize_layers(model, lambda: model(x), center=center)
    assert torch.equal(first.weight[3], before["weight"][3])
    assert torch.equal(first.bias[3], before["bias"][3])
    assert done[0].channels == 15


def test_a_channel_constant_on_the_batch_is_left_as_it_was_when_exactly_constant() -> None:
    # Bias 0 and a zero weight row: the channel is exactly 0, whatever the rounding.
    model = _mlp(depth=2)
    first = _linear(model, 0)
    with torch.no_grad():
        first.weight[3] = 0.0
        first.bias[3] = 0.0
    x = _input("mlp")
    done = standardize_layers(model, lambda: model(x))
    assert done[0].channels == 15
    assert torch.equal(first.weight[3], torch.zeros(8)) and float(first.bias[3].detach()) == 0.0
    assert torch.count_nonzero(first.weight[2]) == 8


def test_a_layer_whose_mean_dwarfs_its_spread_is_standardized_too() -> None:
    model = _mlp(depth=2)
    with torch.no_grad():
        _linear(model, 0).weight.mul_(1e-3)  # outputs 1 + a part that depends on the example
        _linear(model, 0).bias.fill_(1.0)
    reference = copy.deepcopy(model)
    x = _input("mlp")
    standardize_layers(model, lambda: model(x))
    _reference_lsuv([_linear(reference, 0)], lambda: reference(x), std=1.0, center=True)
    for net in (reference, model):  # the float64 reference does it; so must the step
        flat = _per_channel(net[0], _first_output(net[0], lambda: net(x)))  # noqa: B023
        torch.testing.assert_close(
            flat.std(1, unbiased=False), torch.ones(16).double(), atol=1e-3, rtol=0
        )


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, True, "1"])
def test_a_bad_std_is_refused_by_name(bad: Any) -> None:
    model = _mlp(depth=2)
    before = _state(model)
    x = _input("mlp")
    with pytest.raises(ValueError, match=rf"`std`.*{re.escape(repr(bad))}"):
        standardize_layers(model, lambda: model(x), std=bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_restandardize_refuses_bad_arguments_by_name() -> None:
    with pytest.raises(ValueError, match=r"`std`.*0"):
        Restandardize(std=0)
    with pytest.raises(ValueError, match=r"`center`.*'yes'"):
        Restandardize(center="yes")  # type: ignore[arg-type]


def test_two_batches_give_different_weights() -> None:
    # So replicas that each saw their own batch would differ without the statistics' average.
    first = _mlp()
    second = copy.deepcopy(first)
    x1, x2 = _input("mlp", seed=1), _input("mlp", seed=2)
    standardize_layers(first, lambda: first(x1))
    standardize_layers(second, lambda: second(x2))
    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        if name.startswith("8."):  # the output layer is kept on both
            assert torch.equal(a, b)
        else:
            assert not torch.allclose(a, b, rtol=1e-3, atol=0), name


def test_the_reduce_averages_the_mean_then_the_spread_of_each_hidden_layer() -> None:
    calls: list[tuple[int, ...]] = []

    def identity(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        return t  # one process's average: the result must equal the plain one

    model = _mlp()
    plain = copy.deepcopy(model)
    x = _input("mlp")
    standardize_layers(model, lambda: model(x), reduce=identity)
    standardize_layers(plain, lambda: plain(x))
    # Per hidden layer: the channels' means, then their variances around the averaged means.
    assert calls == [(16,), (16,)] * 4
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))


# ---------------------------------------------------------------------------- record_signal


def _deep(kind: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(6):
        linear = nn.Linear(32, 32)
        if kind == "tanh_orthogonal":
            nn.init.orthogonal_(linear.weight)
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.Tanh()]
        elif kind == "batchnorm":
            layers += [linear, nn.BatchNorm1d(32), nn.Sigmoid()]
        else:
            layers += [linear, nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(32, 4))


def _measure(model: nn.Module, x: torch.Tensor, reduce: Any = None) -> list[LayerSignal]:
    with torch.no_grad(), record_signal(model, reduce) as layers:
        model(x)
    return layers


def test_a_deep_sigmoid_stack_fades_and_a_well_scaled_one_does_not() -> None:
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    sigmoid = signal_fade(_measure(_deep("sigmoid"), x))
    assert sigmoid is not None and sigmoid.fade < 1e-2
    assert sigmoid.source == "0" and sigmoid.output == "12" and sigmoid.layers == 7
    assert sigmoid.fade == pytest.approx(sigmoid.output_share / sigmoid.source_share)
    for kind in ("tanh_orthogonal", "batchnorm"):
        healthy = signal_fade(_measure(_deep(kind), x))
        assert healthy is not None and healthy.fade > 0.1, kind


class Reordered(nn.Module):
    """Layers registered in one order and run in another; one is never run."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Linear(6, 2)
        self.unused = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid())
        self.early = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.late(self.block(self.early(x)))
        return out


def test_layers_are_listed_in_the_order_they_run_by_module_name() -> None:
    model = Reordered()
    x = torch.randn(10, 4)
    layers = _measure(model, x)
    assert [layer.layer for layer in layers] == ["early", "block.0", "late"]
    out = model.late(model.block(model.early(x))).detach()
    assert layers[-1].rms == pytest.approx(float(out.pow(2).mean().sqrt()), rel=1e-5)
    assert layers[-1].spread == pytest.approx(
        float(out.var(0, unbiased=False).mean().sqrt()), rel=1e-5
    )
    # The hooks are gone when the block ends.
    assert all(not m._forward_hooks for m in model.modules())


def test_one_example_gives_nan_shares_and_no_fade() -> None:
    layers = _measure(_deep("sigmoid"), torch.randn(1, 32))
    assert len(layers) == 7 and all(math.isnan(layer.share) for layer in layers)
    assert all(math.isfinite(layer.rms) and layer.rms > 0 for layer in layers)
    assert signal_fade(layers) is None


def test_no_fade_when_the_output_layers_share_is_not_finite() -> None:
    model = _deep("sigmoid")
    with torch.no_grad():
        _linear(model, -1).weight.zero_()
        _linear(model, -1).bias.zero_()  # the output is 0 everywhere: rms 0, share NaN
    layers = _measure(model, torch.randn(16, 32))
    assert math.isnan(layers[-1].share) and all(math.isfinite(s.share) for s in layers[:-1])
    assert signal_fade(layers) is None
    assert signal_fade(layers[:1]) is None  # fewer than two layers


def test_a_passed_reduce_is_applied_once_per_block() -> None:
    model = _deep("sigmoid")
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    calls: list[tuple[int, ...]] = []

    def double(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        return t * 2

    plain = _measure(model, x)
    with torch.no_grad(), record_signal(model, double) as reduced:
        model(x)
        model(x)  # a second forward in the block measures nothing more
    assert calls == [(7, 2)]
    assert [r.layer for r in reduced] == [p.layer for p in plain]
    for p, r in zip(plain, reduced):
        assert r.spread == pytest.approx(2 * p.spread, rel=1e-6)
        assert r.rms == pytest.approx(2 * p.rms, rel=1e-6)
        assert r.share == pytest.approx(p.share, rel=1e-6)


# ---------------------------------------------------------------------------- the diagnosis


def _stalled() -> StallTracker:
    tracker = StallTracker(patience=3, warmup_steps=0, smoothing=0.0)
    for step in range(6):
        tracker.update(step, 2.0, 1e-3)
    return tracker


FADING = SignalFade(source="net.0", output="net.12", source_share=0.9, output_share=9e-5, layers=7)


def test_a_stall_whose_signal_fades_is_a_vanishing_gradient() -> None:
    d = classify(_stalled().status(), fading=FADING)
    assert d.kind == "vanishing_gradient"
    assert d.evidence["signal_source"] == "net.0" and d.evidence["signal_output"] == "net.12"
    assert d.evidence["signal_fade"] == pytest.approx(1e-4)
    assert d.evidence["signal_layers"] == 7
    assert "`net.12`" in d.reason and "`net.0`" in d.reason and "7 layers" in d.reason
    # A contracting recurrence comes first.
    recurrent = [RecurrentEvidence("rnn.weight_hh_l0", 0.5, 32)]
    d = classify(_stalled().status(), recurrent=recurrent, fading=FADING)
    assert d.kind == "vanishing_gradient" and d.evidence["recurrent_layer"] == "rnn.weight_hh_l0"
    assert "signal_source" not in d.evidence
    # A run that is not stalled, or sits at its target, is not one.
    healthy = StallTracker(patience=3, warmup_steps=0)
    healthy.update(0, 2.0, 1.0)
    assert classify(healthy.status(), fading=FADING).kind == "healthy"
    assert classify(_stalled().status(), fading=FADING, target=3.0).kind == "converged"
    assert classify(_stalled().status()).kind != "vanishing_gradient"


def test_a_run_on_its_floor_is_not_a_vanishing_gradient() -> None:
    tracker = StallTracker(patience=3, warmup_steps=0, smoothing=0.0)
    tracker.update(0, 1.0, 1e-3)
    for step in range(1, 8):
        tracker.update(step, 1e-6, 1e-3 * 0.5**step)  # the gradient keeps falling
    d = classify(tracker.status(), fading=FADING)
    assert tracker.status().stalled and "start" in d.evidence  # on its floor
    assert d.kind != "vanishing_gradient" and "signal_source" not in d.evidence


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, "0.01"])
def test_a_bad_signal_fade_is_refused_by_name(bad: Any) -> None:
    with pytest.raises(ValueError, match="signal_fade"):
        StallClassifier(signal_fade=bad)


def _fade(fade: float) -> SignalFade:
    return SignalFade("0", "12", 0.5, 0.5 * fade, 7)


def test_the_classifier_passes_on_only_a_fade_below_its_limit() -> None:
    status = _stalled().status()
    default = StallClassifier(probe=False)
    assert default.signal_fade == 1e-2
    assert default.classify(status, fading=_fade(1e-4)).kind == "vanishing_gradient"
    assert default.classify(status, fading=_fade(0.5)).kind != "vanishing_gradient"
    off = StallClassifier(probe=False, signal_fade=0)
    assert off.classify(status, fading=_fade(1e-4)).kind != "vanishing_gradient"
    assert off.classify(status, fading=_fade(0.0)).kind != "vanishing_gradient"


# ---------------------------------------------------------------------------- the escape


def test_the_escape_needs_a_probe_batch_and_a_hidden_layer() -> None:
    mlp = _mlp(depth=2)
    x = _input("mlp")

    def loss() -> float:
        return float(mlp(x).detach().square().mean())

    assert "probe batch" in (Restandardize().unavailable(EscapeContext(mlp)) or "")
    single = nn.Linear(3, 3)
    assert Restandardize().unavailable(EscapeContext(single, loss=lambda: 0.0)) is not None
    assert Restandardize().unavailable(EscapeContext(mlp, loss=loss)) is None
    said = Restandardize().apply(EscapeContext(mlp, loss=loss))
    assert said.startswith("set the outputs of 2 hidden layers (0, 2)"), said


# ---------------------------------------------------------------------------- Lightning


class DeepSigmoid(pl.LightningModule):
    """Six sigmoid layers of width 16 (default init) on fixed random data; logs a flat ``flat``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = _mlp(depth=6, width=16, inputs=8, outputs=2)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 8, generator=g)
        self.y = torch.randint(0, 2, (64,), generator=g)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.log("flat", 1.0)
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


def _escape(**kwargs: Any) -> EscapeCallback:
    detector = StallDetector(
        monitor="flat",
        patience=10,
        warmup_steps=0,
        check_every_n_steps=5,
        # A stall of the flat metric while the training loss falls is not held off here.
        classifier=StallClassifier(probe=False, training_improves=False),
    )
    return EscapeCallback(
        detector,
        ladders={"vanishing_gradient": [Restandardize()]},
        probation_steps=10,
        max_escapes=1,
        max_failures=1,
        **kwargs,
    )


def test_the_escape_is_judged_and_rolled_back_bit_for_bit() -> None:
    escape = _escape()
    before, after = (
        StatesByStep(),
        StatesByStep(),
    )  # the parameters just before and just after the callback
    fit(DeepSigmoid(), [before, escape, after], max_steps=40)
    diagnosis = escape.detector.diagnoses[0]  # the flat metric stalls again after the rollback
    assert diagnosis.kind == "vanishing_gradient"  # from the fade, measured on the probe batch
    assert diagnosis.evidence["signal_output"] == "net.12"
    assert float(diagnosis.evidence["signal_fade"]) < 1e-2
    [event] = escape.events
    assert event.diagnosis == "vanishing_gradient"
    assert event.action.startswith("Restandardize(")
    assert event.verdict == "rolled_back" and event.end_step is not None  # the metric is flat
    pre, acted = before.by_step[event.step], after.by_step[event.step]
    hidden = [f"net.{i}.weight" for i in range(0, 12, 2)]
    assert all(not torch.equal(pre[k], acted[k]) for k in hidden)
    assert torch.equal(pre["net.12.weight"], acted["net.12.weight"])  # the output layer is kept
    post = after.by_step[event.end_step]
    assert pre.keys() == post.keys() and all(torch.equal(pre[k], post[k]) for k in pre)


@pytest.mark.ddp
def test_ddp_replicas_restandardize_alike(tmp_path: Path) -> None:
    escape = _escape(cooldown_steps=0)
    r0, r1 = fit_two_ranks(DeepSigmoid(), escape, tmp_path)
    assert r0["inputs"] != r1["inputs"]  # each rank sees its own batches
    assert (
        r0["actions"] == r1["actions"] == [["Restandardize(std=1.0, center=True)", "rolled_back"]]
    )
    assert len(r0["digests"]) == 30
    assert r0["digests"] == r1["digests"]  # the same parameters at every step, bit for bit


@pytest.mark.parametrize("wrap", ["weight_norm", "parametrizations.weight_norm", "spectral_norm"])
def test_parametrized_weights_are_neither_measured_nor_rescaled(wrap: str) -> None:
    # A parametrized or derived weight is recomputed at each read: a rescale of it was lost
    # (the old weight_norm), or the layer dropped out of the rescale while still counted by
    # `unavailable`, so a step that did nothing was judged as an escape.
    from torch.nn.utils import parametrizations, weight_norm

    norm = {
        "weight_norm": weight_norm,
        "parametrizations.weight_norm": parametrizations.weight_norm,
        "spectral_norm": parametrizations.spectral_norm,
    }[wrap]
    torch.manual_seed(0)
    net = nn.Sequential(
        norm(nn.Linear(8, 16)), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 2)
    )
    x = torch.randn(128, 8)
    assert list(measured_layers(net).values()) == ["2", "4"]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    ctx = EscapeContext(net, loss=lambda: float(net(x).square().mean()))
    assert Restandardize().unavailable(ctx) is None  # two trainable layers of its own
    said = Restandardize().apply(ctx)
    assert "1 hidden layers (2)" in said
    after = dict(net.named_parameters())
    assert [n for n in before if not torch.equal(before[n], after[n])] == ["2.weight", "2.bias"]


def test_a_weight_shared_by_two_layers_is_rescaled_once() -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight  # tied
    net = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(256, 8)
    done = standardize_layers(net, lambda: net(x))
    assert [s.layer for s in done] == ["0"]
    hidden = first(x).detach()
    assert float(hidden.std(0, unbiased=False).mean()) == pytest.approx(1.0, abs=1e-4)
