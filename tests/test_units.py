from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_escape.units import (
    DeadUnits,
    SymmetricGroup,
    find_symmetric_units,
    record_unit_activity,
)


class MLP(nn.Module):
    def __init__(self, width: int = 8, outputs: int = 3) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, width)
        self.out = nn.Linear(width, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def _xy(n: int = 32, outputs: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randn(n, outputs, generator=g)


def _backward(model: nn.Module, outputs: int = 3) -> None:
    x, y = _xy(outputs=outputs)
    model.zero_grad()
    F.mse_loss(model(x), y).backward()


def _copy_unit(model: MLP, src: int, dst: int, outgoing: bool = True) -> None:
    with torch.no_grad():
        model.hidden.weight[dst] = model.hidden.weight[src]
        model.hidden.bias[dst] = model.hidden.bias[src]
        if outgoing:
            model.out.weight[:, dst] = model.out.weight[:, src]


def constant_init() -> MLP:
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.3)
    return model


def planted_copies() -> MLP:
    torch.manual_seed(0)
    model = MLP()
    for src, dst in [(1, 3), (1, 6), (2, 5)]:
        _copy_unit(model, src, dst)
    return model


def copies_with_other_outgoing_weights() -> MLP:
    # Same incoming weights, different outgoing ones: the gradients differ, the tie breaks.
    torch.manual_seed(0)
    model = MLP()
    _copy_unit(model, 1, 3, outgoing=False)
    return model


def zero_output_layer() -> MLP:
    # All output rows are zero (identical), but distinct targets give them distinct gradients.
    torch.manual_seed(0)
    model = MLP()
    nn.init.zeros_(model.out.weight)
    nn.init.zeros_(model.out.bias)
    return model


def scaled_copy() -> MLP:
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.hidden.weight[4] = 2 * model.hidden.weight[0]
        model.hidden.bias[4] = 2 * model.hidden.bias[0]
    return model


def random_init() -> MLP:
    torch.manual_seed(0)
    return MLP(width=64)


SYMMETRIC_CASES: list[tuple[Callable[[], MLP], list[SymmetricGroup]]] = [
    (constant_init, [SymmetricGroup("hidden", tuple(range(8)), 8)]),
    (planted_copies, [SymmetricGroup("hidden", (1, 3, 6), 8), SymmetricGroup("hidden", (2, 5), 8)]),
    (copies_with_other_outgoing_weights, []),
    (zero_output_layer, []),
    (scaled_copy, []),
    (random_init, []),
]


@pytest.mark.parametrize(
    ("build", "expected"), SYMMETRIC_CASES, ids=lambda v: getattr(v, "__name__", "")
)
def test_symmetric_units_with_gradients(
    build: Callable[[], MLP], expected: list[SymmetricGroup]
) -> None:
    model = build()
    _backward(model)
    assert find_symmetric_units(model) == expected
    # The same through an explicit gradient mapping, with `.grad` cleared.
    grads = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert find_symmetric_units(model, grads) == expected


def test_without_gradients_only_weights_are_compared() -> None:
    model = copies_with_other_outgoing_weights()
    assert find_symmetric_units(model) == [SymmetricGroup("hidden", (1, 3), 8)]
    zero = zero_output_layer()
    assert find_symmetric_units(zero) == [SymmetricGroup("out", (0, 1, 2), 3)]


def test_missing_bias_gradient_counts_as_zero() -> None:
    model = planted_copies()
    model.hidden.bias.requires_grad_(False)
    _backward(model)
    assert model.hidden.bias.grad is None
    assert find_symmetric_units(model) == SYMMETRIC_CASES[1][1]


def test_tolerance_near_copies() -> None:
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.hidden.weight[5] = model.hidden.weight[0] * (1 + 1e-5 * torch.randn(4))
        model.hidden.bias[5] = model.hidden.bias[0]
    assert find_symmetric_units(model) == [SymmetricGroup("hidden", (0, 5), 8)]
    assert find_symmetric_units(model, cos_tol=0.0) == []


def test_single_output_layers_are_skipped_and_zero_rows_are_identical() -> None:
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 1))
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[1].weight)
    assert find_symmetric_units(model) == [SymmetricGroup("0", (0, 1, 2, 3), 4)]


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.mix = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.mix(torch.relu(self.conv(x))))
        return self.head(h.mean(dim=(2, 3)))


def test_conv_channels() -> None:
    torch.manual_seed(0)
    model = ConvNet()
    with torch.no_grad():
        model.conv.weight[4] = model.conv.weight[0]
        model.conv.bias[4] = model.conv.bias[0]
        model.mix.weight[:, 4] = model.mix.weight[:, 0]
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    F.mse_loss(model(x), torch.randn(5, 2, generator=torch.Generator().manual_seed(2))).backward()
    assert find_symmetric_units(model) == [SymmetricGroup("conv", (0, 4), 6)]
    with torch.no_grad():
        model.mix.weight[:, 4] += 0.1  # other outgoing weights: other gradients
    model.zero_grad()
    F.mse_loss(model(x), torch.randn(5, 2, generator=torch.Generator().manual_seed(2))).backward()
    assert find_symmetric_units(model) == []


def test_grouped_conv_compares_within_groups_only() -> None:
    conv = nn.Conv2d(4, 4, 1, groups=2, bias=False)  # weight (4, 2, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(
            torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [3.0, 4.0]]).view(4, 2, 1, 1)
        )
    # Channels 0 and 1 read inputs 0-1 with equal weights; channel 2 has the same numbers but
    # reads inputs 2-3, so it is no copy of them.
    assert find_symmetric_units(conv) == [SymmetricGroup("", (0, 1), 4)]


def test_search_is_fast_on_a_wide_layer() -> None:
    layer = nn.Linear(64, 20_000)
    with torch.no_grad():
        layer.weight[11_000] = layer.weight[17]
        layer.bias[11_000] = layer.bias[17]
    start = time.perf_counter()
    found = find_symmetric_units(layer)
    elapsed = time.perf_counter() - start
    assert found == [SymmetricGroup("", (17, 11_000), 20_000)]
    assert elapsed < 5.0, f"{elapsed:.2f}s"


def test_describe() -> None:
    assert (
        SymmetricGroup("hidden", tuple(range(8)), 8).describe()
        == "8 of 8 units in `hidden` are copies of one another"
    )
    assert DeadUnits("0", 3, 16).describe() == "3 of 16 units after `0` never activated"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cos_tol": -0.1}, r"`cos_tol` must be a number in \[0, 1\), got -0.1"),
        ({"cos_tol": 1.0}, r"`cos_tol` must be a number in \[0, 1\), got 1.0"),
        ({"cos_tol": math.nan}, r"`cos_tol` must be a number in \[0, 1\), got nan"),
        ({"cos_tol": True}, r"`cos_tol` must be a number in \[0, 1\), got True"),
        ({"cos_tol": "1e-6"}, r"`cos_tol` must be a number in \[0, 1\), got '1e-6'"),
        ({"generator": 3}, "`generator` must be a CPU torch.Generator or None, got 3"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        find_symmetric_units(MLP(), **kwargs)


def test_bad_gradient_shape() -> None:
    model = MLP()
    with pytest.raises(ValueError, match=r"`grads` must map .* \(8, 4\), got shape \(4, 8\)"):
        find_symmetric_units(model, {model.hidden.weight: torch.zeros(4, 8)})


# --- Dead units -------------------------------------------------------------------------------


def relu_net(dead: tuple[int, ...] = ()) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        for unit in dead:
            net[0].bias[unit] = -100.0
    return net


DEAD_CASES = [
    ("all_dead", tuple(range(16)), [DeadUnits("1", 16, 16)]),
    ("some_dead", (2, 5), [DeadUnits("1", 2, 16)]),
    ("healthy", (), [DeadUnits("1", 0, 16)]),
]


@pytest.mark.parametrize(
    ("dead", "expected"), [c[1:] for c in DEAD_CASES], ids=[c[0] for c in DEAD_CASES]
)
def test_dead_relu_units(dead: tuple[int, ...], expected: list[DeadUnits]) -> None:
    net = relu_net(dead)
    with torch.no_grad(), record_unit_activity(net) as activity:
        for seed in range(2):
            net(torch.randn(32, 4, generator=torch.Generator().manual_seed(seed)))
    result = activity.dead_units()
    assert [(d.layer, d.dead, d.total) for d in result] == [
        (d.layer, d.dead, d.total) for d in expected
    ]
    assert result[0].units == dead
    assert activity.forward_passes == 2


def test_dead_units_unit_axis() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.act = nn.ReLU6()
            self.proj = nn.Linear(5, 7)  # applied to (N, L, 5): units are the last dimension
            self.act2 = nn.Threshold(0.0, 0.0)
            self.act3 = nn.Hardtanh(0.0, 1.0)

        def forward(self, x: Tensor, seq: Tensor) -> Tensor:
            a = self.act(self.bn(self.conv(x)))
            b = self.act3(self.act2(self.proj(seq)))
            return a.mean() + b.mean()

    torch.manual_seed(0)
    net = Mixed().eval()
    with torch.no_grad():
        net.bn.bias[1] = -100.0
        net.proj.bias[6] = -100.0
    with record_unit_activity(net) as activity:
        net(torch.randn(4, 3, 6, 6), torch.randn(4, 3, 5))
    assert [(d.layer, d.dead, d.total, d.units) for d in activity.dead_units()] == [
        ("act", 1, 8, (1,)),
        ("act2", 1, 7, (6,)),
        ("act3", 1, 7, (6,)),
    ]


def test_only_relu_family_is_hooked_and_hooks_are_removed() -> None:
    net = nn.Sequential(
        nn.Linear(3, 4),
        nn.LeakyReLU(),
        nn.Threshold(0.1, 20.0),
        nn.Hardtanh(-1.0, 1.0),
        nn.Tanh(),
        nn.ReLU(),
    )
    seen: list[Any] = []

    def interrupted() -> None:
        with record_unit_activity(net) as activity:
            seen.append(activity)
            net(torch.randn(2, 3))
            assert [d.layer for d in activity.dead_units()] == ["5"]
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        interrupted()
    activity = seen[0]
    assert all(not m._forward_hooks for m in net.modules())
    net(torch.randn(2, 3))  # no hook left to record it
    assert activity.forward_passes == 1


def test_a_spectral_norm_layer_is_not_read_and_its_buffers_stay() -> None:
    # Each read of a spectral-normed weight in training mode runs a power-iteration step that
    # rewrites `_u` and `_v`: the check changed the run it watched.
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    net = nn.Sequential(spectral_norm(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 4))
    norm = net[0].parametrizations.weight[0]
    u, v = norm._u.clone(), norm._v.clone()
    with torch.no_grad():
        net[2].weight[1] = net[2].weight[0]
        net[2].bias[1] = net[2].bias[0]
    assert [g.layer for g in find_symmetric_units(net)] == ["2"]  # plain layers still checked
    assert torch.equal(norm._u, u) and torch.equal(norm._v, v)
