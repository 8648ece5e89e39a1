"""Per-coordinate step sizes for a run's own SGD: the escape for a stall SGD's scales cause.

Under SGD every coordinate moves in proportion to its gradient. Where the gradients of the weight
tensors differ in scale by decades (the query and key weights of attention against its output
layer), the small ones barely move, and a stall can last as long as training does; Adam, which
divides each coordinate by the root of its running mean square, leaves it (Zhang et al. 2020, 2024;
Kunstner et al. 2023). :class:`PerCoordinateSteps` gives the run's own SGD those step sizes from
the stall on: before each of its steps, each gradient coordinate is divided by the root of its
running mean square and scaled so that SGD, momentum included, moves it by about ``step_size``.
The user's optimizer, learning-rate schedule and weight decay stay in charge of everything else.

The state lives in the optimizer's own per-parameter state (keys starting with ``escape_``), so a
rollback restores it exactly with the rest of the optimizer, a checkpoint carries it, and a resumed
run with the callback continues it: whether the rescaling is on is read from the optimizer, not
kept beside it. :func:`rescale_gradients` is the fused per-step path (no host read);
:func:`scale_spread` the evidence, read once at a stall.

References:
    Zhang et al., "Why are Adaptive Methods Good for Attention Models?", NeurIPS 2020
    (arXiv:1912.03194); Zhang et al., "Why Transformers Need Adam: A Hessian Perspective", 2024
    (arXiv:2402.16788); Kunstner et al., "Noise Is Not the Main Factor Behind the Gap Between SGD
    and Adam on Transformers, but Sign Descent Might Be", ICLR 2023 (arXiv:2304.13960); Tieleman
    and Hinton, RMSprop, 2012.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_escape._validation import check_positive_float, check_positive_int, check_range
from lightning_escape.escapes import EscapeContext, EscapeStep, _sharded, _short
from lightning_escape.signals import foreach_norms

__all__ = [
    "PerCoordinateSteps",
    "ScaleSpread",
    "peak_rate",
    "rescale_gradients",
    "rescaling",
    "scale_spread",
    "start_rescaling",
    "stop_rescaling",
]

# Per-parameter optimizer state: the running mean square, the steps it has seen, the factor that
# turns a normalised coordinate into the gradient SGD needs, and the average's constants.
_SQUARE = "escape_square_avg"
_STEPS = "escape_steps"
_SCALE = "escape_scale"
_DECAY = "escape_decay"
_EPS = "escape_eps"
_KEYS = (_SQUARE, _STEPS, _SCALE, _DECAY, _EPS)


@dataclass(frozen=True)
class ScaleSpread:
    """How far apart the gradient scales (RMS) of the weight tensors are, and which are the ends.

    Attributes:
        spread: The largest RMS over the smallest.
        smallest: The smallest RMS, of the tensor ``smallest_name``.
        largest: The largest RMS, of the tensor ``largest_name``.
    """

    spread: float
    smallest: float
    largest: float
    smallest_name: str
    largest_name: str

    def describe(self) -> str:
        """``2.86e+03x, from query.weight's 1.7e-06 to head.weight's 0.0049``."""
        return (
            f"{self.spread:.3g}x, from {self.smallest_name}'s {self.smallest:.2g} to "
            f"{self.largest_name}'s {self.largest:.2g}"
        )


def scale_spread(named: Sequence[tuple[str, Tensor]]) -> ScaleSpread | None:
    """How far apart the gradient scales of several tensors are: largest RMS over smallest.

    The RMS of a tensor's gradient is the typical size of its coordinates, which SGD moves in
    proportion to; per-coordinate step sizes move them all alike. Tensors whose gradient is zero
    (or not finite) are left out. One host read.

    Args:
        named: ``(name, gradient)`` pairs, the gradients dense and real.

    Returns:
        The spread, or None with fewer than two tensors with a nonzero, finite gradient.

    Example:
        >>> found = scale_spread([("a", torch.full((4, 4), 1e-3)), ("b", torch.ones(2, 3))])
        >>> found.describe()
        "1e+03x, from a's 0.001 to b's 1"
    """
    if not named:
        return None
    grads = [g.detach() for _, g in named]
    device = grads[0].device
    norms = foreach_norms(grads)
    rms = [
        (n.double() / math.sqrt(max(1, g.numel()))).to(device, non_blocking=True)
        for n, g in zip(norms, grads, strict=True)
    ]
    values = [
        (value, name)
        for value, (name, _) in zip(torch.stack(rms).cpu().tolist(), named, strict=True)
        if 0 < value < math.inf
    ]
    if len(values) < 2:
        return None
    (lo, lo_name), (hi, hi_name) = min(values), max(values)
    return ScaleSpread(hi / lo, lo, hi, lo_name, hi_name)


def sgd_gain(group: Mapping[str, Any]) -> float:
    """How far SGD moves a coordinate per step per unit of a steady gradient, over its rate.

    Momentum ``μ`` with dampening ``d`` carries a steady gradient to ``(1 - d) / (1 - μ)`` times
    itself (Nesterov adds the gradient once more); without momentum it is 1.

    Example:
        >>> sgd_gain({"momentum": 0.9, "dampening": 0.0, "nesterov": False})
        10.000000000000002
    """
    momentum = float(group.get("momentum", 0.0) or 0.0)
    dampening = float(group.get("dampening", 0.0) or 0.0)
    if momentum == 0.0:
        return 1.0
    carried = (1.0 - dampening) / (1.0 - momentum)
    return 1.0 + momentum * carried if group.get("nesterov") else carried


def rescaling(optimizer: Optimizer) -> bool:
    """Whether per-coordinate step sizes are on for ``optimizer`` (a lookup per parameter group).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> rescaling(torch.optim.SGD(model.parameters(), lr=0.1))
        False
    """
    for group in optimizer.param_groups:
        params = group["params"]
        if params:
            entry = optimizer.state.get(params[0])
            if entry is not None and _SCALE in entry:
                return True
    return False


def peak_rate(group: Mapping[str, Any]) -> float:
    """The largest learning rate the group is known to reach: now, or where its schedule peaks.

    Schedulers keep the rate they start from in ``initial_lr`` (a warm-up rises to it, a decay
    falls from it) and ``OneCycleLR`` its peak in ``max_lr``.

    Example:
        >>> peak_rate({"lr": 0.001, "initial_lr": 0.1})
        0.1
    """
    rates = [group["lr"], group.get("initial_lr", 0.0), group.get("max_lr", 0.0)]
    return max(float(r) for r in rates)


def start_rescaling(optimizer: Optimizer, step_size: float, decay: float, eps: float) -> int:
    """Turn per-coordinate step sizes on for every group of ``optimizer`` with a non-zero rate.

    Each coordinate will move about ``step_size`` per step at the group's :func:`peak_rate`: the
    schedule's shape scales the steps, a warm-up up to ``step_size`` and a decay down from it.
    Tensors whose gradient is sparse keep their plain steps and get no buffer. Returns the
    tensors it covers.
    """
    covered = 0
    for group in optimizer.param_groups:
        if float(group["lr"]) == 0.0:
            continue  # a frozen group stays frozen
        scale = step_size / (peak_rate(group) * sgd_gain(group))
        for p in group["params"]:
            entry = optimizer.state[p]
            entry[_SCALE] = scale
            entry[_DECAY] = decay
            entry[_EPS] = eps
            if p.grad is not None and p.grad.is_sparse:
                continue
            entry[_SQUARE] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # A count per tensor, on its device, as torch's Adam keeps its `step`.
            entry[_STEPS] = torch.zeros((), dtype=p.dtype, device=p.device)
            covered += 1
    return covered


def stop_rescaling(optimizer: Optimizer) -> bool:
    """Take per-coordinate step sizes away from ``optimizer``: its state as SGD's alone.

    Returns whether they were on.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> start_rescaling(optimizer, 1e-3, 0.999, 1e-8), stop_rescaling(optimizer)
        (2, True)
        >>> rescaling(optimizer), len(optimizer.state)
        (False, 0)
    """
    was = rescaling(optimizer)
    for p in [p for p, entry in optimizer.state.items() if any(k in entry for k in _KEYS)]:
        entry = optimizer.state[p]
        for key in _KEYS:
            entry.pop(key, None)
        if not entry:
            del optimizer.state[p]  # SGD without momentum keeps none
    return was


def rescale_gradients(optimizer: Optimizer, *, skippable: bool = False) -> None:
    """Before ``optimizer``'s step: divide each gradient coordinate by its running RMS, in place.

    Does nothing unless :func:`rescaling` is on. Fused ``torch._foreach_*`` kernels, as in torch's
    own Adam, and no host read; a parameter without a gradient, or with a sparse one, is left
    alone.

    Args:
        optimizer: The optimizer about to step.
        skippable: Whether the step may be skipped for a gradient that is not finite (an AMP
            scaler's): then the running mean square and its count take the gradient in only when
            it is finite everywhere, decided on the device, as the scaler leaves the optimizer.
            Without a scaler a non-finite gradient reaches the weights anyway (the run diverges,
            and a rollback restores this state with them), and the update is made in place.

    Example:
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> start_rescaling(optimizer, step_size=0.01, decay=0.999, eps=1e-8)
        1
        >>> model.weight.grad = torch.tensor([[4.0, -0.001, 0.0]])
        >>> rescale_gradients(optimizer)
        >>> model.weight.grad  # each coordinate moves 0.01 at lr 0.1 (a zero one stays)
        tensor([[ 0.1000, -0.1000,  0.0000]])
    """
    if not rescaling(optimizer):
        return
    grads: list[Tensor] = []
    squares: list[Tensor] = []
    counts: list[Tensor] = []
    scales: list[float] = []
    entry: dict[str, Any] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            found = optimizer.state.get(p)
            if p.grad is None or p.grad.is_sparse or found is None or _SQUARE not in found:
                continue
            entry = found
            grads.append(p.grad)
            squares.append(found[_SQUARE])
            counts.append(found[_STEPS])
            scales.append(found[_SCALE])
    if not grads:
        return
    decay, eps = float(entry[_DECAY]), float(entry[_EPS])  # the same for every entry
    if skippable:
        device = grads[0].device
        norms = torch._foreach_norm(grads)
        finite = torch.stack([n.to(device, torch.float32) for n in norms]).isfinite().all()
        fresh = torch._foreach_mul(squares, decay)
        torch._foreach_addcmul_(fresh, grads, grads, value=1.0 - decay)
        for square, new in zip(squares, fresh, strict=True):
            square.copy_(torch.where(finite.to(square.device), new, square))
        torch._foreach_add_(counts, finite.to(counts[0].device, counts[0].dtype))
    else:
        torch._foreach_mul_(squares, decay)
        torch._foreach_addcmul_(squares, grads, grads, value=1.0 - decay)
        torch._foreach_add_(counts, 1.0)
    # sqrt(1 - decay^t): Adam's bias correction of the mean square, per parameter.
    corrections = torch._foreach_pow(decay, counts)
    torch._foreach_neg_(corrections)
    torch._foreach_add_(corrections, 1.0)
    torch._foreach_sqrt_(corrections)
    denominators = torch._foreach_sqrt(squares)
    torch._foreach_div_(denominators, corrections)
    torch._foreach_add_(denominators, eps)
    torch._foreach_div_(grads, denominators)
    torch._foreach_mul_(grads, scales)


@dataclass(eq=False, repr=False)
class PerCoordinateSteps(EscapeStep):
    """From the stall on, give the run's SGD per-coordinate step sizes (RMSprop's), for good.

    Before each optimizer step, each gradient coordinate is divided by the root of its running
    mean square (decay ``decay``, bias-corrected, as in Adam) and scaled so that SGD, with its
    momentum, moves it by about ``step_size`` per step at the largest rate the group is known to
    reach (:func:`peak_rate`: the rate now, or where its schedule starts or peaks), so the
    schedule's shape scales the steps: a warm-up up to ``step_size``, a decay down from it.
    Weights whose gradients are decades smaller than the others' then move as far as those, which
    SGD cannot do and Adam does. See :mod:`lightning_escape.coordinates`.

    Unlike the other steps it is not a window: it changes the update rule for the rest of the run,
    since a run handed back to SGD loses what per-coordinate steps found (measured on the
    attention pointer, README "Measured"). A trial that is rolled back takes it away exactly (its
    state is the optimizer's), and so is one that failed but could not be rolled back (the run
    changed shape during its probation: :meth:`abandon`); one that is kept keeps it, and the
    summary at the end of the fit says so. It takes longer to show than a window: its verdict
    waits ``probation`` optimizer steps (at least the callback's own probation).

    Evidence: the step is unavailable (the policy passes over it) unless the gradients of the
    weight tensors (two or more dimensions) at the last optimizer step differ in scale by at least
    ``min_spread``: the largest RMS over the smallest (:func:`scale_spread`). It is unavailable
    under optimizers other than SGD (adaptive ones have such step sizes already; LBFGS is not
    stepped per gradient), where the hook's gradients still carry an AMP loss scale (a fused step
    unscales them itself), for weights in other dtypes than float32 and float64 (a mean square in
    float16 underflows) or complex ones, under sharded parameters (the evidence needs every
    tensor), where it is on already, and where its probation would end after the last step a
    verdict can be given at.

    Args:
        step_size: About how far each coordinate moves per optimizer step.
        decay: Decay of the running mean square of each coordinate's gradient.
        eps: Added to the root mean square, against division by zero.
        min_spread: Smallest spread of the weight tensors' gradient scales (largest RMS over
            smallest) that calls for the step.
        probation: Optimizer steps before its verdict.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> for p, scale in zip(model.parameters(), [1e-4, 1e-4, 1.0, 1.0]):
        ...     p.grad = torch.full_like(p, scale)  # the first layer's gradient is 1e4x smaller
        >>> step = PerCoordinateSteps()
        >>> ctx = EscapeContext(model, [optimizer], step=0)
        >>> step.unavailable(ctx) is None
        True
        >>> print(step.apply(ctx))  # doctest: +NORMALIZE_WHITESPACE
        each gradient coordinate divided by the root of its running mean square, so that SGD moves
        it about 0.002 per step, for the rest of the run (the weights' gradient scales span 1e+04x,
        from 0.weight's 0.0001 to 1.weight's 1)
        >>> step.unavailable(ctx)
        'per-coordinate step sizes are on already'
    """

    once_per_run: ClassVar[bool] = True

    # Not escalating: once failed it is not tried again (once_per_run), so no stronger copy acts.
    step_size: float = 2e-3
    decay: float = 0.999
    eps: float = 1e-8
    min_spread: float = 100.0
    probation: int = 800

    def __post_init__(self) -> None:
        self.step_size = check_positive_float("step_size", self.step_size)
        self.decay = check_range("decay", self.decay, 0.0, 1.0, low_open=True, high_open=True)
        self.eps = check_positive_float("eps", self.eps)
        self.min_spread = check_range("min_spread", self.min_spread, 1.0, math.inf, high_open=True)
        self.probation = check_positive_int("probation", self.probation)

    @property
    def min_probation(self) -> int:
        """Optimizer steps its verdict waits at least."""
        return self.probation

    def spread(self, ctx: EscapeContext) -> ScaleSpread | None:
        """The evidence: :func:`scale_spread` of the weight tensors' gradients, named."""
        trained = {id(p) for p in ctx.params()}
        return scale_spread(
            [
                (name, p.grad)
                for name, p in ctx.module.named_parameters()
                if id(p) in trained
                and p.dim() >= 2
                and p.grad is not None
                and p.grad.layout == torch.strided
            ]
        )

    @override
    def unavailable(self, ctx: EscapeContext) -> str | None:
        if not ctx.optimizers:
            return "no optimizer to give step sizes to"
        for opt in ctx.optimizers:
            if not isinstance(opt, torch.optim.SGD):
                return (
                    f"per-coordinate step sizes are for SGD; {type(opt).__name__} sets its own"
                    if not isinstance(opt, torch.optim.LBFGS)
                    else "LBFGS does not step along a gradient per step"
                )
            if ctx.grad_scale(opt) is not None:
                return "the gradients still carry the AMP loss scale (a fused step unscales them)"
            if rescaling(opt):
                return "per-coordinate step sizes are on already"
        params = ctx.params()
        odd = sorted(
            {str(p.dtype) for p in params if p.dtype not in (torch.float32, torch.float64)}
        )
        if odd:
            return f"weights in {', '.join(odd)}: a running mean square there underflows"
        sharded = _sharded(ctx, params)
        if sharded is not None:
            return sharded
        if ctx.last_step is not None and ctx.step + self.probation > ctx.last_step:
            return (
                f"its probation of {self.probation} steps would end after step {ctx.last_step}, "
                "the last a verdict can be given at"
            )
        found = self.spread(ctx)
        if found is None:
            return "fewer than two weight tensors with a gradient: no scales to compare"
        if found.spread < self.min_spread:
            return (
                f"the weights' gradient scales span only {found.describe()}, below "
                f"min_spread={_short(self.min_spread)}"
            )
        return None

    @override
    def abandon(self, ctx: EscapeContext) -> str | None:
        stopped = [stop_rescaling(opt) for opt in ctx.optimizers]
        return "its per-coordinate step sizes are taken back" if any(stopped) else None

    @override
    def apply(self, ctx: EscapeContext) -> str:
        found = self.spread(ctx)
        for opt in ctx.optimizers:
            start_rescaling(opt, self.step_size, self.decay, self.eps)
        evidence = (
            "" if found is None else f" (the weights' gradient scales span {found.describe()})"
        )
        return (
            "each gradient coordinate divided by the root of its running mean square, so that SGD "
            f"moves it about {_short(self.step_size)} per step, for the rest of the run{evidence}"
        )
