"""How much of the input reaches each layer, and layer-wise restandardization (pure tensor logic).

A deep stack whose units sit in the flat or contracting part of their activation (sigmoids near
0.5, a tanh network from a small initialisation) passes on less of its input at every layer: the
output ends up the same for every example, and the gradient that reaches the early layers fades
the same way (Glorot and Bengio, 2010). :func:`record_signal` measures this on a batch: for each
linear or convolution layer, the part of its output that varies from example to example, against
the output's size. :func:`standardize_layers` is the matching repair, the data-dependent
initialisation of Mishkin and Matas (2016, "All you need is a good init", arXiv:1511.06422, LSUV)
and Krähenbühl et al. (2016, arXiv:1511.06856), applied to a network in training: every hidden
layer's weights and bias are rescaled and shifted so that its outputs have, per channel, mean 0
and a chosen standard deviation on the batch.

Only modules that run through their own ``forward`` are seen (``nn.Linear``, ``nn.Conv1d``,
``nn.Conv2d``, ``nn.Conv3d`` and subclasses); weights used functionally are not. Dimension 0 of an
output is taken to be the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_escape._validation import check_positive_float

__all__ = [
    "LayerSignal",
    "SignalFade",
    "Standardized",
    "measured_layers",
    "record_signal",
    "signal_fade",
    "standardize_layers",
]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_DIMS = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}

Reduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LayerSignal:
    """How much of a layer's output depends on the example.

    Attributes:
        layer: The module's name.
        spread: ``sqrt(mean over output elements of the variance across the batch)``: the part of
            the output that changes from one example to another.
        rms: The root mean square of the whole output.
    """

    layer: str
    spread: float
    rms: float

    @property
    def share(self) -> float:
        """``spread / rms``: near 1 when the output is mostly the example's, near 0 when constant."""
        return self.spread / self.rms if self.rms > 0 else math.nan


@dataclass(frozen=True)
class SignalFade:
    """The example's share of the output fades from one layer to the output layer.

    Attributes:
        source: The layer where the example's share is largest.
        output: The last layer to run (the output layer).
        source_share: :attr:`LayerSignal.share` at ``source``.
        output_share: :attr:`LayerSignal.share` at ``output``.
        layers: Layers measured.
    """

    source: str
    output: str
    source_share: float
    output_share: float
    layers: int

    @property
    def fade(self) -> float:
        """``output_share / source_share``: 1 when nothing is lost, 0 when the output is constant."""
        return self.output_share / self.source_share if self.source_share > 0 else math.nan


@dataclass(frozen=True)
class Standardized:
    """One layer :func:`standardize_layers` rescaled.

    Attributes:
        layer: The module's name.
        channels: Output channels rescaled (a channel constant on the batch is left as it was).
        std_before: The mean over channels of their standard deviation before.
    """

    layer: str
    channels: int
    std_before: float


def _channel_axis(module: nn.Module, output: Tensor) -> int | None:
    """Where the channels of ``output`` are, or None for an output without a batch dimension."""
    for kind, dims in _CONV_DIMS.items():
        if isinstance(module, kind):
            return 1 if output.dim() == dims else None
    return output.dim() - 1 if output.dim() >= 2 else None


def own_weight(layer: nn.Module) -> nn.Parameter | None:
    """The weight of a linear or convolution layer if it is a parameter of its own, else None.

    A parametrized weight (``torch.nn.utils.parametrize``: weight or spectral norm) or one derived
    from other parameters (the older ``torch.nn.utils.weight_norm``) is computed at each read;
    spectral norm's read in training mode also runs a power iteration that updates its buffers.
    Such a weight is neither read nor changed here: a change would be lost at the next read.
    """
    weight = layer._parameters.get("weight") if isinstance(layer, _LAYERS) else None
    return weight if isinstance(weight, nn.Parameter) else None


def measured_layers(module: nn.Module) -> dict[nn.Module, str]:
    """The trainable linear and convolution layers of ``module`` (weights of their own), by name.

    Example:
        >>> list(measured_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU())).values())
        ['0']
    """
    layers = {}
    for name, sub in module.named_modules():
        weight = own_weight(sub)
        if weight is not None and weight.requires_grad:
            layers[sub] = name
    return layers


@contextmanager
def _first_calls(
    module: nn.Module, hook: Callable[[nn.Module, str, Tensor], Any]
) -> Iterator[None]:
    """Call ``hook(layer, name, output)`` at the first run of each trainable layer of ``module``.

    What ``hook`` returns replaces the output (``None`` keeps it). Batched floating-point outputs
    only; the hooks are removed on exit, also after an exception.
    """
    seen: set[nn.Module] = set()

    def make(name: str) -> Callable[[nn.Module, Any, Any], Any]:
        def forward_hook(layer: nn.Module, args: Any, output: Any) -> Any:
            if layer in seen or not isinstance(output, Tensor):
                return None
            seen.add(layer)
            if not output.is_floating_point() or _channel_axis(layer, output) is None:
                return None
            return hook(layer, name, output)

        return forward_hook

    handles = [
        sub.register_forward_hook(make(name)) for sub, name in measured_layers(module).items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_signal(module: nn.Module, reduce: Reduce | None = None) -> Iterator[list[LayerSignal]]:
    """Measure, during the block's forward passes, how much of each layer's output is the example's.

    Each trainable linear or convolution layer is measured at its first run, in the order the
    layers run (with a spread of NaN on a batch of one example). The statistics stay on the device until the
    block ends; then one host read fills the yielded list (averaged over processes by ``reduce``,
    so that every process reads the same numbers).

    Args:
        module: The model.
        reduce: Averages a tensor over processes; ``None`` for one process.

    Yields:
        A list, filled with one :class:`LayerSignal` per measured layer when the block ends.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(16, 16), nn.Sigmoid())])
        >>> with record_signal(net) as layers:
        ...     _ = net(torch.randn(64, 16))
        >>> [round(layer.share, 3) for layer in layers]
        [0.969, 0.279, 0.083, 0.008]
    """
    names: list[str] = []
    stats: list[Tensor] = []

    def measure(layer: nn.Module, name: str, output: Tensor) -> None:
        with torch.no_grad():
            out = output.detach().float()
            if out.shape[0] < 2:  # no spread to measure: a row all the same (processes agree)
                spread = torch.full((), math.nan, device=out.device)
            else:
                spread = out.var(0, unbiased=False).mean().sqrt()
            stats.append(torch.stack([spread, out.pow(2).mean().sqrt()]))
        names.append(name)

    found: list[LayerSignal] = []
    with _first_calls(module, measure):
        yield found
    if not stats:
        return
    table = torch.stack([s.to(stats[0].device) for s in stats])
    if reduce is not None:
        table = reduce(table)
    found.extend(
        LayerSignal(name, spread, rms) for name, (spread, rms) in zip(names, table.cpu().tolist())
    )


def signal_fade(layers: list[LayerSignal]) -> SignalFade | None:
    """How much the example's share fades from the layer where it is largest to the output layer.

    Args:
        layers: What :func:`record_signal` measured, in the order the layers ran.

    Returns:
        The fade, or None with fewer than two layers or no finite share.

    Example:
        >>> signal_fade([LayerSignal("a", 0.5, 1.0), LayerSignal("b", 1e-4, 2.0)]).fade
        0.0001
    """
    finite = [layer for layer in layers if math.isfinite(layer.share)]
    if len(layers) < 2 or not finite or not math.isfinite(layers[-1].share):
        return None
    source = max(finite, key=lambda layer: layer.share)
    output = layers[-1]
    return SignalFade(source.layer, output.layer, source.share, output.share, len(layers))


def standardize_layers(
    module: nn.Module,
    forward: Callable[[], object],
    *,
    std: float = 1.0,
    center: bool = True,
    reduce: Reduce | None = None,
    params: Collection[Tensor] | None = None,
) -> list[Standardized]:
    """Rescale each hidden layer so that its outputs have mean 0 and deviation ``std`` per channel.

    ``forward`` runs the model on a batch twice: once to learn the order in which the trainable
    linear and convolution layers run, then once more while each of them but the last (the output
    layer, whose scale the loss sets) is standardized at its first run, in that order, each seeing
    the outputs of the layers before it as already rescaled (so one pass does what the sequential
    procedure of LSUV does in one pass per layer). For a layer with output ``y = W x + b`` and, per
    output channel ``c``, mean ``m_c`` and deviation ``s_c`` over the batch and every position:
    ``W_c ← W_c · std / s_c`` and ``b_c ← (b_c - m_c) · std / s_c`` (without ``center``, or without
    a bias, ``b_c ← b_c · std / s_c``). A channel that is constant on the batch (``s_c = 0``) is left
    as it is, as is one whose spread is below the rounding of its mean in the output's dtype.
    Statistics are in float64, the mean first and then the spread around it; under data
    parallelism ``reduce`` averages each over processes, so every replica rescales by the same
    factors.

    Args:
        module: The model; its parameters are changed in place.
        forward: Runs the model on a batch (its result is ignored); called twice.
        std: The standard deviation each channel gets.
        center: Also shift each channel's mean to 0 through the bias.
        reduce: Averages a tensor over processes; ``None`` for one process.
        params: Only layers whose weight is one of these are rescaled (the parameters training
            moves); ``None`` for every trainable layer. A weight shared by several layers is
            rescaled once, at the first of them to run.

    Returns:
        The layers rescaled, in the order they ran.

    Raises:
        ValueError: If ``std`` is not a positive finite number.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Linear(16, 2))
        >>> x = torch.randn(256, 8)
        >>> [s.layer for s in standardize_layers(net, lambda: net(x))]
        ['0', '2']
        >>> hidden = net[0](x).detach()
        >>> abs(float(hidden.mean())) < 1e-6, round(float(hidden.std(0, unbiased=False).mean()), 4)
        (True, 1.0)
    """
    std = check_positive_float("std", std)
    order: list[nn.Module] = []
    with torch.no_grad(), _first_calls(module, lambda layer, name, out: order.append(layer)):
        forward()
    allowed = None if params is None else {id(p) for p in params}
    hidden = {
        layer
        for layer in order[:-1]
        if allowed is None or id(cast(Tensor, layer.weight)) in allowed
    }
    rescaled: set[int] = set()  # weights already rescaled (tied between layers)
    done: list[Standardized] = []

    def rescale(layer: nn.Module, name: str, output: Tensor) -> Tensor | None:
        weight = cast(Tensor, layer.weight)
        if layer not in hidden or id(weight) in rescaled:
            return None
        rescaled.add(id(weight))
        axis = _channel_axis(layer, output)
        assert axis is not None
        with torch.no_grad():
            # float64 and a centred second pass: a faded layer's mean can dwarf its spread by
            # 1e3 to 1e5, which E[y^2] - E[y]^2 in float32 would lose (MPS has no float64).
            wide = torch.float32 if output.device.type == "mps" else torch.float64
            flat = output.detach().to(wide).movedim(axis, 0).reshape(output.shape[axis], -1)
            mean = flat.mean(1)
            if reduce is not None:
                mean = reduce(mean)
            var = (flat - mean[:, None]).square().mean(1)
            if reduce is not None:
                var = reduce(var)
            dev = var.sqrt()
            # A spread below the output's own rounding is no spread: the channel is constant.
            usable = dev > torch.finfo(output.dtype).eps * mean.abs()
            usable &= dev > 0
            factor = torch.where(usable, std / dev, torch.ones_like(dev))
            shift = torch.where(usable, mean, torch.zeros_like(mean))
            weight.mul_(factor.view(-1, *[1] * (weight.dim() - 1)).to(weight.dtype))
            bias = cast("Tensor | None", layer.bias)
            shifted = center and bias is not None
            if bias is not None:
                if shifted:
                    bias.sub_(shift.to(bias.dtype))
                bias.mul_(factor.to(bias.dtype))
            view = [1] * output.dim()
            view[axis] = -1
            out = (output - shift.view(view).to(output.dtype)) if shifted else output
            out = out * factor.view(view).to(output.dtype)
        done.append(Standardized(name, int(usable.sum()), float(dev.mean())))
        return out

    with _first_calls(module, rescale):
        forward()
    return done
