"""Stalls caused by single units: symmetric (duplicated) units and dead ReLU units.

Symmetric units: two hidden units with the same incoming weights and the same gradient stay
identical under any gradient method, so the layer acts as if it were narrower, forever. Only
noise (or re-initialisation) can break the tie. Dead units: a ReLU unit that outputs zero on
every sample gets zero gradient and never recovers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_escape._validation import check_range
from lightning_escape.signal_flow import own_weight

__all__ = [
    "DeadUnits",
    "SymmetricGroup",
    "UnitActivity",
    "find_symmetric_units",
    "record_unit_activity",
]

# Candidate search: rows are projected on a few random directions; copies differ by at most a
# 6-sigma gate in each (missed with probability about 2e-9 per direction), and rows are compared
# with up to _WINDOW sorted neighbours along each direction.
_PROJECTIONS = 4
_SIGMAS = 6.0
_WINDOW = 64


@dataclass(frozen=True)
class SymmetricGroup:
    """Units of one layer whose incoming weights (and gradients) are copies of one another.

    Attributes:
        layer: Name of the layer in ``named_modules`` (``""`` for the root module).
        units: Indices of the output units (rows, or output channels), ascending.
        out_features: Number of output units of the layer.
    """

    layer: str
    units: tuple[int, ...]
    out_features: int

    def describe(self) -> str:
        """Say which units are copies.

        Returns:
            A sentence such as ``"8 of 8 units in `hidden` are copies of one another"``.

        Example:
            >>> SymmetricGroup("hidden", (0, 3), 8).describe()
            '2 of 8 units in `hidden` are copies of one another (units 0, 3)'
        """
        text = (
            f"{len(self.units)} of {self.out_features} units in `{self.layer}` "
            "are copies of one another"
        )
        if len(self.units) < self.out_features:
            shown = ", ".join(str(u) for u in self.units[:8])
            text += f" (units {shown}{', ...' if len(self.units) > 8 else ''})"
        return text


@dataclass(frozen=True)
class DeadUnits:
    """Units of one activation that never fired during a recording.

    Attributes:
        layer: Name of the activation module in ``named_modules``.
        dead: Number of units whose output was zero for every sample.
        total: Number of units.
        units: Indices of the dead units, ascending.
    """

    layer: str
    dead: int
    total: int
    units: tuple[int, ...] = field(default=(), repr=False)

    def describe(self) -> str:
        """Say how many units are dead.

        Returns:
            A sentence such as ``"12 of 32 units after `net.1` never activated"``.

        Example:
            >>> DeadUnits("net.1", 12, 32).describe()
            '12 of 32 units after `net.1` never activated'
        """
        return f"{self.dead} of {self.total} units after `{self.layer}` never activated"


def _check_cos_tol(cos_tol: object) -> float:
    return check_range("cos_tol", cos_tol, 0, 1, high_open=True)


def _rows(weight: Tensor, bias: Tensor | None) -> Tensor:
    rows = _coords(weight).reshape(weight.shape[0], -1)
    if bias is not None:
        rows = torch.cat([rows, _coords(bias).reshape(weight.shape[0], -1).to(rows.dtype)], dim=1)
    return rows


def _coords(t: Tensor) -> Tensor:
    # A complex unit's row as its real and imaginary parts: two units are copies when both agree,
    # and the float comparisons below would otherwise drop the imaginary parts.
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    return torch.view_as_real(t) if t.is_complex() else t


def _components(count: int, a: Tensor, b: Tensor) -> Tensor:
    """Label each of ``count`` nodes with the smallest node of its component under edges a-b."""
    labels = torch.arange(count, device=a.device)
    while True:
        low = torch.minimum(labels[a], labels[b])
        new = labels.scatter_reduce(0, a, low, "amin").scatter_reduce(0, b, low, "amin")
        new = new[new]  # pointer jumping: O(log n) rounds instead of O(diameter)
        if torch.equal(new, labels):
            return labels
        labels = new


def _candidates(rows: Tensor, cos_tol: float, generator: torch.Generator) -> list[Tensor]:
    """Clusters of rows that may be copies; every true group lies inside one (w.h.p.)."""
    out, width = rows.shape
    unit = rows.float()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    directions = torch.randn(width, _PROJECTIONS, generator=generator, dtype=torch.float32)
    proj = unit @ directions.to(unit.device)
    # Copies u, v (unit rows) satisfy ||u - v||^2 <= 2 cos_tol, so r.(u - v) ~ N(0, ||u - v||^2)
    # stays within the gate; the second term covers float32 rounding of the projections.
    gate = _SIGMAS * math.sqrt(2 * cos_tol) + 16 * torch.finfo(torch.float32).eps * math.sqrt(width)
    firsts: list[Tensor] = []
    seconds: list[Tensor] = []
    for k in range(_PROJECTIONS):
        order = torch.argsort(proj[:, k])
        ordered = proj[order, k]
        # Compare each row with its sorted neighbours, not only the next one: in a wide layer
        # unrelated rows can project between two copies. Pairs must pass the gate in every
        # projection, which rules out chance neighbours along one direction.
        for offset in range(1, min(_WINDOW, out - 1) + 1):
            near = ordered[offset:] - ordered[:-offset] <= gate
            if not bool(near.any()):
                break  # sorted: farther neighbours are farther still
            a, b = order[:-offset][near], order[offset:][near]
            close = ((proj[a] - proj[b]).abs() <= gate).all(dim=1)
            firsts.append(a[close])
            seconds.append(b[close])
    if not firsts:
        return []
    a, b = torch.cat(firsts), torch.cat(seconds)
    if a.numel() == 0:
        return []
    labels = _components(out, a, b)
    linked = torch.unique(torch.cat([a, b]))
    roots = labels[linked]
    order = torch.argsort(roots, stable=True)
    linked, roots = linked[order], roots[order]
    sizes = torch.unique_consecutive(roots, return_counts=True)[1]
    return [c for c in torch.split(linked, sizes.tolist()) if c.numel() > 1]


def _confirm(rows: Tensor, cluster: Tensor, cos_tol: float) -> list[list[int]]:
    """Exact grouping of one cluster: rows a, b are copies if ||a-b||^2 <= 2 cos_tol |a||b|."""
    data = rows[cluster].double()
    norms = data.norm(dim=1)
    remaining = list(range(cluster.numel()))
    groups: list[list[int]] = []
    while len(remaining) > 1:
        rep = remaining[0]
        rest = torch.tensor(remaining, device=data.device)
        dist2 = (data[rest] - data[rep]).pow(2).sum(dim=1)
        match = dist2 <= 2 * cos_tol * norms[rep] * norms[rest]
        matched = {remaining[i] for i in match.nonzero().flatten().tolist()}
        if len(matched) > 1:
            groups.append([int(cluster[i]) for i in sorted(matched)])
        # A NaN row matches nothing, not even itself: drop the representative regardless.
        remaining = [i for i in remaining if i != rep and i not in matched]
    return groups


def _layer_grad(
    weight: Tensor, bias: Tensor | None, grads: Mapping[nn.Parameter, Tensor] | None
) -> Tensor | None:
    params = [weight] if bias is None else [weight, bias]
    found: list[Tensor | None] = []
    for p in params:
        g = p.grad if grads is None else grads.get(p)  # type: ignore[call-overload]
        if g is not None and g.shape != p.shape:
            raise ValueError(
                f"`grads` must map each parameter to a tensor of its shape {tuple(p.shape)}, "
                f"got shape {tuple(g.shape)}."
            )
        found.append(g)
    if all(g is None for g in found):
        return None
    # A parameter without a gradient does not move, so its gradient counts as zero.
    g_weight = torch.zeros_like(weight) if found[0] is None else found[0]
    g_bias = None if bias is None else (torch.zeros_like(bias) if found[1] is None else found[1])
    return _rows(g_weight, g_bias)


def find_symmetric_units(
    module: nn.Module,
    grads: Mapping[nn.Parameter, Tensor] | None = None,
    *,
    cos_tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> list[SymmetricGroup]:
    """Find groups of output units with identical incoming weights and identical gradients.

    Checks every :class:`~torch.nn.Linear` and :class:`~torch.nn.Conv1d`/``2d``/``3d`` with more
    than one output unit. A unit's row is its flattened weight row (output channel for a
    convolution), with its bias appended. Rows ``a`` and ``b`` count as identical when
    ``||a - b||^2 <= 2 * cos_tol * ||a|| * ||b||``, which holds exactly when their cosine
    similarity is at least ``1 - cos_tol`` and their norms agree to the same order (two zero rows
    are identical; a zero and a non-zero row are not). Units of different groups of a grouped
    convolution see different inputs and are never compared.

    A group is reported only if the gradient rows are identical by the same test: identical
    weights with identical gradients stay identical under any gradient method, while identical
    weights with different gradients (a zero-initialised output layer, say) separate at the first
    step. Gradients come from ``grads``, else from each parameter's ``.grad``; a parameter without
    one counts as zero gradient, and a layer with none at all is judged on its weights alone.

    Cost ``O(out * in + out log out)`` per layer: rows are normalised, projected on a few random
    directions, sorted along each and split where neighbours differ by more than copies could
    (six standard deviations, so a true pair is missed with probability below ``1e-8``); only the
    surviving candidate groups are compared exactly, in float64.

    Args:
        module: The model; all its submodules are searched.
        grads: Gradient of each parameter, e.g. from a probe batch; ``None`` uses ``.grad``.
        cos_tol: Tolerance of the identity test; ``0`` asks for exact copies.
        generator: CPU generator for the projections; ``None`` uses a fixed seed, so results are
            reproducible and the global random state is untouched.

    Returns:
        One :class:`SymmetricGroup` per group of copies, ordered by layer and first unit.

    Raises:
        ValueError: If ``cos_tol`` or ``generator`` is invalid or a gradient has the wrong shape.

    Example:
        >>> layer = torch.nn.Linear(3, 4)
        >>> with torch.no_grad():
        ...     layer.weight[1] = layer.weight[0]
        ...     layer.bias[1] = layer.bias[0]
        >>> find_symmetric_units(torch.nn.Sequential(layer))
        [SymmetricGroup(layer='0', units=(0, 1), out_features=4)]
    """
    cos_tol = _check_cos_tol(cos_tol)
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"`generator` must be a CPU torch.Generator or None, got {generator!r}.")
    found: list[SymmetricGroup] = []
    for name, layer in module.named_modules():
        # A parametrized weight is skipped: reading it can run code (spectral norm's power
        # iteration updates its buffers in training mode).
        weight = own_weight(layer)
        if weight is None or isinstance(weight, nn.UninitializedParameter):
            continue
        out = weight.shape[0]
        if out < 2:
            continue
        rows = _rows(weight, layer.bias)
        grad_rows = _layer_grad(weight, layer.bias, grads)
        groups = getattr(layer, "groups", 1)
        per_group = out // groups
        layer_groups: list[list[int]] = []
        for g in range(groups):
            offset = g * per_group
            block = rows[offset : offset + per_group]
            for cluster in _candidates(block, cos_tol, generator):
                for members in _confirm(block, cluster, cos_tol):
                    members = [m + offset for m in members]
                    if grad_rows is None:
                        layer_groups.append(members)
                        continue
                    idx = torch.tensor(members, device=grad_rows.device)
                    for sub in _confirm(grad_rows, idx, cos_tol):
                        layer_groups.append(sub)
        for members in sorted(sorted(m) for m in layer_groups):
            found.append(SymmetricGroup(layer=name, units=tuple(members), out_features=out))
    return found


def _is_relu_like(module: nn.Module) -> bool:
    if isinstance(module, nn.ReLU):
        return True
    if isinstance(module, nn.Threshold):
        return float(module.value) == 0.0
    if isinstance(module, nn.Hardtanh):  # includes ReLU6
        return float(module.min_val) == 0.0
    return False


_Hook = Callable[[nn.Module, Any, Any], None]


class UnitActivity:
    """What :func:`record_unit_activity` saw: which units of each ReLU-like module ever fired.

    Attributes:
        forward_passes: Number of forward passes through the watched module recorded.
    """

    def __init__(self) -> None:
        self._active: dict[tuple[str, int], Tensor] = {}
        self._last: Literal["linear", "conv"] | None = None
        self.forward_passes = 0

    def _layer_hook(self, kind: Literal["linear", "conv"]) -> _Hook:
        def hook(module: nn.Module, args: object, output: object) -> None:
            self._last = kind

        return hook

    def _activation_hook(self, name: str) -> _Hook:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if not isinstance(output, Tensor) or output.dim() < 1:
                return
            # Linear layers put units last ((N, *, H)); convolutions put channels at dim 1.
            if output.dim() <= 2:
                axis = output.dim() - 1
            else:
                axis = output.dim() - 1 if self._last == "linear" else 1
            fired = (output.detach() != 0).movedim(axis, 0).reshape(output.shape[axis], -1)
            fired = fired.any(dim=1)
            key = (name, fired.numel())
            seen = self._active.get(key)
            self._active[key] = fired if seen is None else seen | fired

        return hook

    def dead_units(self) -> list[DeadUnits]:
        """Units that never fired, per ReLU-like module that ran.

        A module reused at places of different widths gets one entry per width; reused at
        places of the same width, a unit counts as alive if it fired at any of them.

        Returns:
            One :class:`DeadUnits` per recorded module (``dead`` may be 0), in the order the
            modules first ran.
        """
        result = []
        for (name, total), fired in self._active.items():
            dead = (~fired).nonzero().flatten().tolist()
            result.append(DeadUnits(layer=name, dead=len(dead), total=total, units=tuple(dead)))
        return result


@contextmanager
def record_unit_activity(module: nn.Module) -> Iterator[UnitActivity]:
    """Record which units of the ReLU-like activations fire during forward passes.

    Hooks every :class:`~torch.nn.ReLU`, :class:`~torch.nn.ReLU6`, :class:`~torch.nn.Threshold`
    with ``value=0`` and :class:`~torch.nn.Hardtanh` with ``min_val=0`` in ``module``. A unit
    fires when its output is non-zero for some sample. The unit axis of an output is its last
    dimension when the most recent layer run before the activation was a
    :class:`~torch.nn.Linear`, else dimension 1 (channels of a convolution; also for any 2-D
    output). Activations applied functionally (``F.relu``) cannot be seen. The hooks are removed
    on exit, also after an exception.

    Args:
        module: The model to watch.

    Yields:
        A :class:`UnitActivity` to read with :meth:`UnitActivity.dead_units`, during or after the
        block.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = net[0].bias.fill_(-100.0)
        >>> with record_unit_activity(net) as activity:
        ...     _ = net(torch.randn(5, 2))
        >>> activity.dead_units()
        [DeadUnits(layer='1', dead=3, total=3)]
    """
    activity = UnitActivity()
    handles = []
    try:
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear):
                handles.append(sub.register_forward_hook(activity._layer_hook("linear")))
            elif isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                handles.append(sub.register_forward_hook(activity._layer_hook("conv")))
            elif _is_relu_like(sub):
                handles.append(sub.register_forward_hook(activity._activation_hook(name)))

        def count(mod: nn.Module, args: object, output: object) -> None:
            activity.forward_passes += 1

        handles.append(module.register_forward_hook(count))
        yield activity
    finally:
        for handle in handles:
            handle.remove()
