"""Escape steps: small, typed, picklable classes that push a stalled run out of where it sits.

Each step is applied by :class:`~lightning_escape.EscapeCallback` through a narrow interface (the
:class:`EscapeStep` lifecycle) with an :class:`EscapeContext` that carries the module, its optimizers
and the step. A step only ever changes what its description says; restoring the run when an escape
fails is the callback's job (it snapshots everything first), except for settings outside the model
and optimizers (a batch size, the accumulation count), which each step undoes itself.

Every random draw comes from a generator seeded from ``(seed, global step)``, so all data-parallel
processes draw the same numbers and a resumed run repeats them.

Each step is a dataclass: its settings are the fields the constructor takes (so YAML configs and
``LightningCLI`` build it, :meth:`EscapeStep.config` lists them and :meth:`EscapeStep.stronger` scales
the fields declared with :func:`escalating`), and its runtime state is the fields it does not take
(``field(init=False)``), which :meth:`EscapeStep.state_dict` saves for a resume.

Writing a new step: subclass :class:`EscapeStep` as a ``@dataclass(eq=False, repr=False)`` with typed
fields, implement :meth:`EscapeStep.apply`, and, if it acts over several optimizer steps,
:attr:`EscapeStep.duration` and :meth:`EscapeStep.before_optimizer_step`. A plain subclass with its
own ``__init__``, ``config()`` and ``stronger()`` works too. Move only :meth:`EscapeContext.params`,
and write them inside :meth:`EscapeContext.keep_fixed`, as the steps here do: the entries training
never moves (embedding padding rows) then stay bitwise as they were.

Unusual parameters: complex ones are moved as their real and imaginary parts (each a coordinate of
its own); sparse gradients (``nn.Embedding(sparse=True)``) get noise on the entries they hold and
stay sparse, as sparse optimizers need; :class:`TrustRatioStep` leaves tensors with sparse
gradients to their optimizer, and :class:`Restandardize` complex layers as they are.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Literal, cast

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_escape._validation import (
    check_bool,
    check_choice,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
    check_range,
    check_seed,
)
from lightning_escape.curvature import Spectrum
from lightning_escape.recurrence import nearest_orthogonal, recurrent_matrices, spectral_radius
from lightning_escape.seeding import derive_generator
from lightning_escape.signal_flow import measured_layers, standardize_layers
from lightning_escape.signals import foreach_norms

__all__ = [
    "BatchSizeChange",
    "EscapeContext",
    "EscapeStep",
    "GradientNoise",
    "LRKick",
    "NegativeCurvatureStep",
    "OrthogonalRecurrence",
    "Perturb",
    "Restandardize",
    "TrustRatioStep",
    "escalating",
    "fixed_entries",
]


def escalating(default: Any, by: Callable[[Any], Any]) -> Any:
    """A dataclass field that :meth:`EscapeStep.stronger` replaces with ``by(value)``.

    Example:
        >>> @dataclass(eq=False, repr=False)
        ... class Shake(EscapeStep):
        ...     size: float = escalating(1.0, by=functools.partial(operator.mul, 3.0))
        >>> Shake().stronger().describe()
        'Shake(size=3.0)'
    """
    return field(default=default, metadata={"stronger": by})


def _state(default: Any = None) -> Any:
    """A runtime field: not a constructor argument, saved by ``state_dict`` for a resume."""
    return field(default=default, init=False, repr=False)


def fixed_entries(module: nn.Module) -> dict[int, Tensor]:
    """The entries of ``module``'s parameters that training never moves, by ``id(parameter)``.

    These are the padding rows of ``nn.Embedding`` and ``nn.EmbeddingBag`` (``padding_idx``):
    their gradient is always zero, so no optimizer step changes them (but for weight decay, which
    is the optimizer's own doing), and models rely on them staying as they were (a zero padding
    vector). Escape steps leave them bitwise as they found them (:meth:`EscapeContext.keep_fixed`).

    Args:
        module: The model.

    Returns:
        For each parameter with such entries, the sorted indices of its fixed rows (dimension 0),
        as an int64 tensor on the parameter's device.

    Example:
        >>> emb = nn.Embedding(5, 2, padding_idx=0)
        >>> fixed_entries(nn.Sequential(emb, nn.Linear(2, 1)))[id(emb.weight)]
        tensor([0])
    """
    rows: dict[int, tuple[Tensor, set[int]]] = {}
    for sub in module.modules():
        if not isinstance(sub, (nn.Embedding, nn.EmbeddingBag)):
            continue
        padding = sub.padding_idx
        weight = sub._parameters.get("weight")
        if padding is None or not isinstance(weight, Tensor) or weight.dim() == 0:
            continue
        # torch stores a negative `padding_idx` as counted from the end already; be safe anyway.
        index = int(padding) % weight.shape[0]
        rows.setdefault(id(weight), (weight, set()))[1].add(index)
    return {
        key: torch.tensor(sorted(found), dtype=torch.long, device=weight.device)
        for key, (weight, found) in rows.items()
    }


@contextmanager
def _keeping(fixed: Mapping[int, Tensor], tensors: Iterable[Tensor], grads: bool) -> Iterator[None]:
    """Save the fixed rows of ``tensors`` (and of their dense gradients); put them back on exit."""
    saved: list[tuple[Tensor, Tensor, Tensor]] = []
    with torch.no_grad():
        for p in tensors:
            rows = fixed.get(id(p))
            if rows is None:
                continue
            targets = [p]
            # A sparse gradient never holds a padding row (the embedding leaves it out).
            if grads and p.grad is not None and p.grad.layout == torch.strided:
                targets.append(p.grad)
            for t in targets:
                saved.append((t, rows, t.detach().index_select(0, rows)))
    try:
        yield
    finally:
        with torch.no_grad():
            for t, rows, values in saved:
                # A copy of the saved bits, not a subtraction of what was added: bitwise exact.
                t.detach().index_copy_(0, rows, values)


@dataclass
class EscapeContext:
    """What an escape step may act on.

    Attributes:
        module: The model (unwrapped LightningModule).
        optimizers: The optimizers (raw ``torch.optim.Optimizer`` objects).
        step: Index of the next optimizer step (the one the action precedes).
        seed: Seed of every random draw (combined with ``step``).
        spectrum: The curvature probe's result at the diagnosis, if it ran.
        loss: Evaluates the loss on the probe batch at the current parameters (averaged over
            processes), for line searches; None when unavailable.
        trainer: The Lightning trainer, for steps that change its settings (batch size).
        grad_scale: Returns the loss scale an optimizer's gradients still carry, or None.
        reduce: Averages a tensor over processes (None for one process), for steps that measure
            something on the probe batch and must act alike on every process.
        batch: The training batch about to be trained on, in :meth:`EscapeStep.at_batch_start`
            (as the dataloader yielded it, on the device); None elsewhere.
        last_step: The last optimizer step a verdict can be given at (the fit's last, or the
            one its last validation follows), when known; None elsewhere.
    """

    module: nn.Module
    optimizers: Sequence[Optimizer] = ()
    step: int = 0
    seed: int = 0
    spectrum: Spectrum | None = None
    loss: Callable[[], float] | None = None
    trainer: Any = None
    grad_scale: Callable[[Optimizer], Tensor | None] = field(default=lambda opt: None)
    reduce: Callable[[Tensor], Tensor] | None = None
    batch: Any = None
    last_step: int | None = None

    _fixed: dict[int, Tensor] | None = field(default=None, init=False, repr=False)

    def probed(self) -> list[Tensor]:
        """The parameters that require grad, in the module's order (the curvature probe's)."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def params(self) -> list[Tensor]:
        """The parameters training moves, in the module's order: an escape moves no other.

        Those that require grad and that an optimizer steps at a non-zero learning rate (all
        that require grad when no optimizer is given): a group at rate 0 is frozen, and a tensor
        in no optimizer (an average of the weights kept in the module) is not trained.

        Of those, only the ones with a gradient, when any has one: a tensor that got no gradient
        at the last step (a branch the loss does not reach) is one the optimizer skipped, and one
        the verdict cannot judge, since the loss does not depend on it; an escape leaves it as it
        is. Without any gradient (a context built outside a training step) that cannot be told,
        and all of them count.
        """
        probed = self.probed()
        if self.optimizers:
            stepped = {
                id(p)
                for opt in self.optimizers
                for group in opt.param_groups
                if float(group.get("lr", 1.0)) != 0.0
                for p in group["params"]
            }
            probed = [p for p in probed if id(p) in stepped]
        with_grad = [p for p in probed if p.grad is not None]
        return with_grad or probed

    def fixed(self) -> dict[int, Tensor]:
        """The rows training never moves (embedding padding rows), by ``id(parameter)``.

        See :func:`fixed_entries`; found once per context.
        """
        if self._fixed is None:
            self._fixed = fixed_entries(self.module)
        return self._fixed

    def keep_fixed(
        self, tensors: Iterable[Tensor] | None = None, *, grads: bool = False
    ) -> AbstractContextManager[None]:
        """A block after which the entries training never moves are bitwise as before it.

        Every step that writes parameters (or gradients) does so inside this block: the padding
        rows of ``nn.Embedding(padding_idx=...)`` are saved on entry and copied back on exit, so
        an escape never changes what training would not (a jump, noise or a line search along an
        eigenvector included), whatever it computes. A step written outside this package should
        do the same.

        Args:
            tensors: The parameters the block writes; ``None`` for :meth:`params`.
            grads: Also keep the fixed rows of their (dense) gradients: for steps that write
                gradients, such as gradient noise.

        Returns:
            The context manager.

        Example:
            >>> emb = nn.Embedding(4, 2, padding_idx=0)
            >>> ctx = EscapeContext(emb)
            >>> with ctx.keep_fixed():
            ...     _ = emb.weight.data.add_(1.0)
            >>> emb.weight[0].tolist()
            [0.0, 0.0]
        """
        return _keeping(self.fixed(), self.params() if tensors is None else tensors, grads)

    def generator(self, own_seed: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator for this step's draws: the callback's seed, the step's own, the global step."""
        return derive_generator(self.seed, own_seed, self.step, device)


class EscapeStep:
    """Base class of escape steps.

    Lifecycle, driven by :class:`~lightning_escape.EscapeCallback` on every process alike:

    1. :meth:`unavailable` says why the step cannot act here (the callback then tries the next one);
    2. :meth:`apply` acts once, between optimizer steps, and returns what it did;
    3. for :attr:`duration` optimizer steps after that, :meth:`before_optimizer_step` runs in
       ``on_before_optimizer_step`` (after Lightning unscaled the gradients, before clipping) and
       :meth:`after_optimizer_step` right after the parameter update, before any scheduler steps;
       :meth:`at_batch_start` and :meth:`at_epoch_end` run at those boundaries while
       :meth:`busy` is true;
    4. :meth:`undo` removes settings the step changed outside the model and optimizers (and, at
       the end of training, :meth:`settle` applies at once what still waits for a boundary);
       parameters and optimizer state are the callback's to restore;
    5. the verdict comes after the longer of the callback's probation and :attr:`min_probation`;
       where a failed trial cannot be rolled back (the run changed shape), :meth:`abandon` takes
       back what was meant to outlast the verdict, and a step with :attr:`once_per_run` is not
       tried again after a failure.

    Settings are the dataclass fields the constructor takes; runtime state is the fields declared
    with ``init=False``, saved by :meth:`state_dict`, so a resumed run continues the step exactly.
    """

    @property
    def duration(self) -> int:
        """Optimizer steps the step keeps acting after :meth:`apply` (0 for one-shot steps)."""
        return 0

    #: Whether the policy passes over every rung of this class once a trial of it failed: for a
    #: step whose change is the same at every stall of a run, where another try would only repeat
    #: the failure (at any strength).
    once_per_run: ClassVar[bool] = False

    @property
    def min_probation(self) -> int:
        """Optimizer steps its verdict waits at least (0: the callback's probation decides)."""
        return 0

    def unavailable(self, ctx: EscapeContext) -> str | None:
        """Why this step cannot act in ``ctx`` (None when it can)."""
        return None

    def apply(self, ctx: EscapeContext) -> str:
        """Act once; return a sentence saying what was done and how strongly."""
        raise NotImplementedError

    def before_optimizer_step(self, ctx: EscapeContext, optimizer: Optimizer) -> None:
        """Per-step action inside the optimizer-step window (gradients final, not yet clipped)."""

    def after_optimizer_step(self, ctx: EscapeContext, optimizer: Optimizer) -> None:
        """Per-step action right after the parameter update (also skipped steps never call it)."""

    def at_batch_start(self, ctx: EscapeContext, batch_idx: int) -> None:
        """Action at the start of a training batch (``ctx.batch`` is the batch)."""

    def at_epoch_end(self, ctx: EscapeContext) -> None:
        """Action at the end of a training epoch."""

    def busy(self) -> bool:
        """Whether the step still waits for a batch or epoch boundary to finish a change."""
        return False

    def waiting(self) -> bool:
        """Whether the change :meth:`apply` made waits for a boundary to come in force.

        While it does, nothing of the escape acts yet: its probation, and the window of
        :attr:`duration`, count from the first optimizer step under it.
        """
        return False

    def not_applied(self) -> str | None:
        """Why the change :meth:`apply` announced never came in force, once the step knows; else None.

        The escape engine then withdraws the trial unjudged: nothing of it acted, so there is
        nothing to judge and nothing to restore. A step that acts in :meth:`apply` keeps this.
        """
        return None

    def abandon(self, ctx: EscapeContext) -> str | None:
        """The trial failed but could not be rolled back: take back what would outlast it.

        For a change meant to last beyond the verdict (per-coordinate step sizes): the run goes on
        from the trial's state, without the change. Returns what was taken back, or None.
        """
        return None

    def undo(self, ctx: EscapeContext) -> None:
        """Remove settings this step changed outside the model and the optimizers."""

    def settle(self, ctx: EscapeContext) -> None:
        """Apply at once what waits for a boundary (training ended: none will come)."""

    def resume(self, ctx: EscapeContext) -> None:
        """After a resume from a checkpoint, set again what this step changed outside the model.

        The checkpoint holds the model and the optimizers, not the Trainer's settings.
        """

    def stronger(self) -> EscapeStep:
        """A fresh copy acting more strongly: each :func:`escalating` field scaled (for escalation)."""
        changes = {
            f.name: f.metadata["stronger"](getattr(self, f.name))
            for f in _fields(self)
            if "stronger" in f.metadata
        }
        # A fresh instance either way: runtime state is not copied.
        return type(self)(**{**self.config(), **changes})

    def config(self) -> dict[str, Any]:
        """The constructor arguments (plain values)."""
        return {f.name: getattr(self, f.name) for f in _fields(self) if f.init}

    def describe(self) -> str:
        """``Name(arg=value, ...)``."""
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def state_dict(self) -> dict[str, Any]:
        """Runtime state (plain values) for checkpoints: the ``init=False`` fields."""
        return {f.name.lstrip("_"): getattr(self, f.name) for f in self._resumable()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for f in self._resumable():
            key = f.name.lstrip("_")
            if key in state:
                setattr(self, f.name, state[key])

    def _resumable(self) -> list[Any]:
        return [f for f in _fields(self) if not f.init and f.metadata.get("resume", True)]

    def __repr__(self) -> str:
        return self.describe()


def _fields(step: EscapeStep) -> tuple[Any, ...]:
    # The base class is a plain class (so LightningCLI accepts any subclass by `class_path`); the
    # steps here are dataclasses, and a user's step may be either.
    return fields(step) if is_dataclass(step) else ()


def _short(value: Any) -> str:
    """A value as in a constructor call, floats without noise digits (``0.1``, ``10.0``)."""
    return repr(float(f"{value:.6g}")) if isinstance(value, float) else repr(value)


# ---------------------------------------------------------------------------- GradientNoise


@dataclass(eq=False, repr=False)
class GradientNoise(EscapeStep, Callback):
    r"""Add annealed Gaussian noise to the gradients: ``g += N(0, σ_t²)``, ``σ_t² = eta / (1 + t)^gamma``.

    As an escape step, ``t`` counts optimizer steps from the escape and the noise lasts ``steps``
    optimizer steps. As a callback (``Trainer(callbacks=[GradientNoise()])``) it is always on and
    ``t`` is the global step. The noise is added in ``on_before_optimizer_step``, to the unscaled,
    all-reduced gradients; Lightning clips after that hook, so with clipping on, the noise is
    clipped along with the gradient. Draws come from a generator seeded from ``(seed, step)``, so
    every data-parallel process adds the same noise and the replicas stay identical.

    Args:
        eta: Variance of the noise at ``t = 0``.
        gamma: Decay exponent of the variance.
        steps: Optimizer steps the noise lasts as an escape (ignored as a callback).
        seed: Seed of the noise.

    References:
        Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep Networks", 2015.

    Example:
        >>> noise = GradientNoise(eta=0.3, gamma=0.55)
        >>> round(noise.variance(0), 3), round(noise.variance(99), 4)
        (0.3, 0.0238)
    """

    eta: float = escalating(0.01, by=functools.partial(operator.mul, 4.0))
    gamma: float = 0.55
    steps: int = 200
    seed: int = 0
    _start: int = _state(0)

    def __post_init__(self) -> None:
        self.eta = check_positive_float("eta", self.eta)
        self.gamma = check_nonnegative_float("gamma", self.gamma)
        self.steps = check_positive_int("steps", self.steps)
        self.seed = check_seed("seed", self.seed)
        # As a callback: the module's fixed rows, found once per fit (a walk over every module
        # at every step cost more than the noise itself on a small model).
        self._fixed_rows: dict[int, Tensor] | None = None

    @property
    def duration(self) -> int:
        """Optimizer steps the noise lasts as an escape."""
        return self.steps

    def variance(self, t: int) -> float:
        """``eta / (1 + t) ** gamma``."""
        return float(self.eta / (1 + t) ** self.gamma)

    @override
    def apply(self, ctx: EscapeContext) -> str:
        self._start = ctx.step
        return (
            f"annealed gradient noise, variance {_short(self.eta)}/(1+t)^{_short(self.gamma)} "
            f"for {self.steps} steps"
        )

    @override
    def before_optimizer_step(self, ctx: EscapeContext, optimizer: Optimizer) -> None:
        self.add_noise(
            optimizer,
            t=ctx.step - self._start,
            step=ctx.step,
            scale=ctx.grad_scale(optimizer),
            seed=ctx.seed,
            fixed=ctx.fixed(),
        )

    def add_noise(
        self,
        optimizer: Optimizer,
        *,
        t: int,
        step: int,
        scale: Tensor | None = None,
        seed: int = 0,
        fixed: Mapping[int, Tensor] | None = None,
    ) -> None:
        """Add the noise of time ``t`` to ``optimizer``'s gradients, drawn for optimizer step ``step``.

        Every real coordinate gets variance :meth:`variance`: a complex gradient gets it on its
        real and its imaginary part alike. A sparse gradient (``nn.Embedding(sparse=True)``) gets
        noise on the entries it holds, the rows the batch touched, and stays sparse: a sparse
        optimizer (``SparseAdam``) takes no dense gradient, and a lazy one moves no other row.

        Args:
            optimizer: Its parameters' ``.grad`` receive the noise.
            t: Time in the annealing schedule.
            step: Optimizer step that seeds the draws.
            scale: Loss scale the gradients still carry (fused AMP optimizers), or None.
            seed: The escape callback's seed; this step's own ``seed`` picks the stream.
            fixed: Rows whose gradient stays as it is (:func:`fixed_entries`), by
                ``id(parameter)``; None for none.
        """
        sigma = math.sqrt(self.variance(t))
        factor = sigma if scale is None else scale * sigma
        generators: dict[torch.device, torch.Generator] = {}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        with torch.no_grad(), _keeping(fixed or {}, params, grads=True):
            for p in params:
                grad = p.grad
                if grad is None:
                    continue
                device = grad.device
                if device not in generators:
                    generators[device] = derive_generator(seed, self.seed, step, device)
                gen = generators[device]
                if grad.layout == torch.sparse_coo:
                    # One draw per entry held: coalesced, an index listed twice gets one draw.
                    held = grad.coalesce()
                    values = held.values()
                    noise = _cast(_draw(values, gen), values) * factor
                    # The indices of a coalesced tensor: valid, no need to check them again.
                    grad.add_(
                        torch.sparse_coo_tensor(
                            held.indices(),
                            noise,
                            grad.shape,
                            check_invariants=False,
                            is_coalesced=True,
                        )
                    )
                elif grad.layout != torch.strided:
                    grad.values().add_(_cast(_draw(grad.values(), gen), grad.values()) * factor)
                else:
                    grad.add_(_cast(_draw(grad, gen), grad) * factor)

    # As a callback: always on, t = the optimizer step, the same draws as an escape under seed 0.
    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._fixed_rows = None  # found again at the first step, on the device the fit uses

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Optimizer) -> None:
        from lightning_escape._lightning import amp_grad_scale, step_index

        if self._fixed_rows is None:
            self._fixed_rows = fixed_entries(pl_module)
        step = step_index(trainer)
        self.add_noise(
            optimizer,
            t=step,
            step=step,
            scale=amp_grad_scale(trainer, optimizer),
            fixed=self._fixed_rows,
        )


def _draw(like: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal float32 draws, one per real coordinate of ``like``.

    A complex tensor has two per entry, its real and imaginary parts (the last dimension, as in
    ``torch.view_as_real``): as coordinates of the parameter space each moves like a real weight
    (``torch.randn`` in a complex dtype would give each part variance 1/2). float32 whatever the
    dtype, so the stream of draws does not depend on it.
    """
    shape = (*like.shape, 2) if like.is_complex() else like.shape
    return torch.randn(shape, generator=generator, device=like.device)


def _cast(coords: Tensor, like: Tensor) -> Tensor:
    """Real coordinates from :func:`_draw` as a tensor of ``like``'s dtype and shape."""
    if like.is_complex():
        return torch.view_as_complex(coords.to(like.real.dtype))
    return coords.to(like.dtype)


# ---------------------------------------------------------------------------- Perturb


@dataclass(eq=False, repr=False)
class Perturb(EscapeStep):
    """One random jump of the weights: ``p += radius * s_p * z``, ``z ~ N(0, I)``, per tensor.

    ``s_p`` is each tensor's own scale. ``scale="auto"`` takes the larger of its root mean square and
    ``1 / sqrt(fan_in)`` (the size of a standard initialisation), so that weights stuck near zero
    (small initialisation, a plateau) still get a jump of useful size; ``"rms"`` takes the root mean
    square alone. ``fan_in`` is the product of all but the first dimension (the number of elements
    for vectors).

    Args:
        radius: Size of the jump relative to each tensor's scale.
        scale: ``"auto"`` or ``"rms"``, see above.
        seed: Seed of the jump.

    References:
        Jin et al., "How to Escape Saddle Points Efficiently", ICML 2017 (perturbed gradient descent).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> before = model.weight.detach().clone()
        >>> Perturb(radius=0.1).apply(EscapeContext(model, step=3))
        'perturbed 2 tensors by 0.1 x their scale (rms of the jump 0.05)'
        >>> bool((model.weight - before).abs().max() > 0)
        True
    """

    radius: float = escalating(0.1, by=functools.partial(operator.mul, 2.0))
    scale: Literal["auto", "rms"] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        self.radius = check_positive_float("radius", self.radius)
        self.scale = check_choice("scale", self.scale, ("auto", "rms"))
        self.seed = check_seed("seed", self.seed)

    def tensor_scale(self, p: Tensor) -> float:
        """``s_p`` of tensor ``p`` (see the class docstring).

        A complex tensor's root mean square is over its real coordinates (real and imaginary
        parts), which the jump moves alike.
        """
        coords = torch.view_as_real(p.detach()) if p.is_complex() else p.detach()
        rms = float(coords.float().pow(2).mean().sqrt()) if p.numel() else 0.0
        if self.scale == "rms":
            return rms
        fan_in = max(1, p[0].numel() if p.dim() >= 2 and len(p) else p.numel())
        return max(rms, 1 / math.sqrt(fan_in))

    @override
    def apply(self, ctx: EscapeContext) -> str:
        params = ctx.params()
        sizes = 0.0
        count = 0
        generators: dict[torch.device, torch.Generator] = {}
        with torch.no_grad(), ctx.keep_fixed(params):
            for p in params:
                gen = generators.get(p.device)
                if gen is None:
                    gen = generators[p.device] = ctx.generator(self.seed, p.device)
                jump = _draw(p, gen) * (self.radius * self.tensor_scale(p))
                p.add_(_cast(jump, p))
                sizes += float(jump.pow(2).sum())
                count += jump.numel()
        rms = math.sqrt(sizes / max(1, count))
        return (
            f"perturbed {len(params)} tensors by {_short(self.radius)} x their scale "
            f"(rms of the jump {rms:.2g})"
        )


# ---------------------------------------------------------------------------- LRKick


def _further_from_one(factor: float) -> float:
    """``factor`` doubled if above 1, halved if below: a kick of either sign made stronger."""
    return factor * 2.0 if factor > 1.0 else factor / 2.0


@dataclass(eq=False, repr=False)
class LRKick(EscapeStep):
    """Multiply the learning rate by ``factor`` for ``steps`` optimizer steps, invisibly to schedulers.

    The rate is multiplied in ``on_before_optimizer_step`` and restored right after the parameter
    update (an optimizer step post-hook), before Lightning steps any scheduler: schedulers, the
    checkpoint and ``LearningRateMonitor`` never see a kicked rate, and the un-kicked trajectory of
    the learning rate is exactly the one without the kick. A step whose gradients are not finite is
    not kicked: the AMP scaler skips such a step without calling ``optimizer.step``, so its post-hook
    would never restore the rate.

    Args:
        factor: Multiplier of every parameter group's learning rate. :meth:`stronger` doubles a
            factor above 1 and halves one below 1 (a deeper cut).
        steps: Optimizer steps the kick lasts.

    Example:
        >>> kick = LRKick(factor=10, steps=5)
        >>> kick.describe()
        'LRKick(factor=10.0, steps=5)'
        >>> LRKick(factor=0.5).stronger().factor
        0.25
    """

    # Stronger: twice as far from 1 by ratio (x2 for a raise, /2 for a cut), never towards it.
    factor: float = escalating(10.0, by=_further_from_one)
    steps: int = 50
    # Rates saved inside one optimizer-step window; checkpoints are written outside it.
    _saved: dict[int, list[Any]] = field(
        default_factory=dict, init=False, repr=False, metadata={"resume": False}
    )

    def __post_init__(self) -> None:
        self.factor = check_positive_float("factor", self.factor)
        if self.factor == 1.0:  # no kick at all, yet judged and counted as an escape
            raise ValueError(f"`factor` must differ from 1, got {self.factor!r}.")
        self.steps = check_positive_int("steps", self.steps)

    @property
    def duration(self) -> int:
        """Optimizer steps the kick lasts."""
        return self.steps

    @override
    def unavailable(self, ctx: EscapeContext) -> str | None:
        for opt in ctx.optimizers:
            if isinstance(opt, torch.optim.LBFGS):
                # It reads its rate before it first calls the closure, where the kick is made.
                return "LBFGS reads its learning rate before the step's closure, where a kick acts"
            if isinstance(opt, torch.optim.Rprop):
                # Its step sizes start at `lr` at its first step and adapt on their own after it.
                return (
                    "Rprop reads its learning rate only at its first step: a kick changes nothing"
                )
            if isinstance(opt, torch.optim.ASGD):
                # Each step uses the rate (`eta`) the step before computed from `lr`.
                return (
                    "ASGD steps with the rate its previous step computed: a kick would act one "
                    "step late, past its window"
                )
        return None

    @override
    def apply(self, ctx: EscapeContext) -> str:
        return f"learning rate x{_short(self.factor)} for {self.steps} steps"

    @override
    def before_optimizer_step(self, ctx: EscapeContext, optimizer: Optimizer) -> None:
        if id(optimizer) in self._saved:
            # Already kicked in this window: closure optimizers (LBFGS) evaluate the closure, and
            # so run this hook, several times per step. Kicking again would compound the factor.
            return
        if not _grads_finite(optimizer):
            return
        saved = []
        for group in optimizer.param_groups:
            lr = group["lr"]
            if isinstance(lr, Tensor):
                saved.append(lr.detach().clone())
                lr.mul_(self.factor)
            else:
                saved.append(lr)
                group["lr"] = lr * self.factor
        self._saved[id(optimizer)] = saved

    @override
    def after_optimizer_step(self, ctx: EscapeContext, optimizer: Optimizer) -> None:
        self.restore(optimizer)

    def restore(self, optimizer: Optimizer) -> None:
        """Put back the rates saved before the kick (exactly: the saved values, not a division)."""
        saved = self._saved.pop(id(optimizer), None)
        if saved is None:
            return
        for group, lr in zip(optimizer.param_groups, saved):
            if isinstance(group["lr"], Tensor):
                group["lr"].copy_(lr)
            else:
                group["lr"] = lr

    @override
    def undo(self, ctx: EscapeContext) -> None:
        for opt in ctx.optimizers:
            self.restore(opt)


def _grads_finite(optimizer: Optimizer) -> bool:
    # One host read, on kicked steps only.
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return True
    from lightning_escape.signals import foreach_norms, total_norm

    return bool(torch.isfinite(total_norm(foreach_norms(grads))))


# ---------------------------------------------------------------------------- TrustRatioStep


@dataclass(eq=False, repr=False)
class TrustRatioStep(EscapeStep):
    r"""For ``steps`` optimizer steps, move each weight tensor by the fraction ``trust`` of its own norm.

    Where the gradient-to-weight ratios ``‖g_l‖ / ‖θ_l‖`` of the layers span decades (deep and
    recurrent stacks with a vanishing signal), a global learning-rate kick or isotropic noise moves
    the wrong layers: the ones with a signal too far, the others not at all. This step keeps the
    optimizer's direction for each tensor and sets the length of its update: right after each
    optimizer step, each weight tensor's update ``Δ_l`` becomes ``Δ_l · trust · ‖θ_l‖ / ‖Δ_l‖``, so
    every layer moves by the same fraction of its norm (the layer-wise trust ratio of LARS and LAMB,
    a normalized gradient step per layer). It is applied to the update rather than the gradient,
    so it works the same under SGD, momentum and Adam (which is invariant to a gradient's scale);
    the optimizer's state (momentum, moments) is never touched, so the effect ends exactly with the
    window.

    Which tensors: those of two or more dimensions (the weights) that have a gradient. Biases and
    normalisation scales (one dimension), tensors without a gradient or with a sparse one (an
    embedding's update then touches only the batch's rows), a tensor whose update is zero
    (a frozen group, ``lr = 0``) and a tensor whose norm is zero (zero-initialised: a fraction of it
    would freeze it) keep the optimizer's own update, as does a tensor whose rescaled update would
    not be finite in its dtype, and so do embedding padding rows. The direction is the
    optimizer's, weight decay included.

    Evidence: the step is unavailable (the policy passes over it) unless the gradient-to-weight
    ratios of the weight tensors with a nonzero gradient and a nonzero norm span at least
    ``min_spread`` (largest over smallest), read from the gradients of the last optimizer step (a
    loss scale common to all of them cancels out); with fewer than two such tensors it is
    unavailable too, as under sharded parameters (FSDP, DeepSpeed, ``DTensor``), whose per-tensor
    norms would need communication.

    How: just before each optimizer step of the window the weights are copied (one buffer of their
    size, kept only during the window); right after it the update is measured and rescaled with
    fused ``torch._foreach_*`` kernels, norms accumulated in float32 (for float16 and bfloat16
    weights too; the rescaled update itself is formed in the weights' dtype), without reading
    anything back to the host. Data-parallel processes hold the same
    weights and updates, so each computes the same result without communication. A step the AMP
    scaler skips is left alone, and closure optimizers (LBFGS) have their whole step rescaled once.

    Args:
        trust: Fraction of its norm each weight tensor moves per optimizer step.
        steps: Optimizer steps the rescaling lasts.
        min_spread: Smallest spread of the gradient-to-weight ratios (largest over smallest) that
            calls for the step.

    References:
        Levy, "The Power of Normalization: Faster Evasion of Saddle Points", 2016
        (arXiv:1611.04831); You, Gitman and Ginsburg, "Large Batch Training of Convolutional
        Networks", 2017 (arXiv:1708.03888, LARS); You et al., "Large Batch Optimization for Deep
        Learning: Training BERT in 76 minutes", 2019 (arXiv:1904.00962, LAMB).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
        >>> with torch.no_grad():
        ...     _ = model[1].weight.mul_(1e-3)  # a small top layer: the first layer's signal fades
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        >>> model(torch.randn(16, 4)).pow(2).mean().backward()
        >>> step = TrustRatioStep(trust=0.01, steps=5)
        >>> ctx = EscapeContext(model, [optimizer], step=0)
        >>> step.unavailable(ctx) is None
        True
        >>> before = model[0].weight.detach().clone()
        >>> step.before_optimizer_step(ctx, optimizer)
        >>> optimizer.step()
        >>> step.after_optimizer_step(ctx, optimizer)
        >>> round(float((model[0].weight.detach() - before).norm() / before.norm()), 6)
        0.01
        >>> step.describe()
        'TrustRatioStep(trust=0.01, steps=5, min_spread=100.0)'
    """

    trust: float = escalating(0.01, by=functools.partial(operator.mul, 2.0))
    steps: int = 50
    min_spread: float = 100.0
    # Per optimizer: the step whose weights the buffer holds (-1 once used), the weights, the buffer.
    # Only inside one optimizer step does it hold anything to use; checkpoints are written outside.
    _saved: dict[int, tuple[int, list[Tensor], list[Tensor]]] = field(
        default_factory=dict, init=False, repr=False, metadata={"resume": False}
    )

    def __post_init__(self) -> None:
        self.trust = check_positive_float("trust", self.trust)
        self.steps = check_positive_int("steps", self.steps)
        self.min_spread = check_range("min_spread", self.min_spread, 1.0, math.inf, high_open=True)

    @property
    def duration(self) -> int:
        """Optimizer steps the rescaling lasts."""
        return self.steps

    def spread(self, ctx: EscapeContext) -> tuple[float, float, float, int] | str:
        """The evidence: (spread, smallest ratio, largest ratio, tensors), or why there is none.

        The ratios are ``‖g_l‖ / ‖θ_l‖`` of the trainable weight tensors (two or more dimensions)
        with a finite, nonzero gradient and a nonzero norm; one host read.
        """
        layers = [
            p
            for p in ctx.params()
            if p.dim() >= 2 and p.grad is not None and p.grad.layout == torch.strided
        ]
        sharded = _sharded(ctx, layers)
        if sharded is not None:
            return sharded
        if len(layers) < 2:
            return f"{len(layers)} weight tensor(s) with a gradient: no layers to balance"
        grads = foreach_norms([cast(Tensor, p.grad).detach() for p in layers])
        weights = foreach_norms([p.detach() for p in layers])
        device = weights[0].device
        # One host read for all of them (non_blocking: no synchronisation per tensor).
        pairs = (
            torch.stack(
                [
                    torch.stack([g.double(), w.double()]).to(device, non_blocking=True)
                    for g, w in zip(grads, weights)
                ]
            )
            .cpu()
            .tolist()
        )
        ratios = [g / w for g, w in pairs if 0 < w < math.inf and 0 < g < math.inf]
        if len(ratios) < 2:
            return (
                f"{len(ratios)} weight tensor(s) with a nonzero gradient and norm: no layers to "
                "balance"
            )
        lo, hi = min(ratios), max(ratios)
        return hi / lo, lo, hi, len(ratios)

    @override
    def unavailable(self, ctx: EscapeContext) -> str | None:
        evidence = self.spread(ctx)
        if isinstance(evidence, str):
            return evidence
        spread, lo, hi, count = evidence
        if spread < self.min_spread:
            return (
                f"the gradient-to-weight ratios of the {count} weight tensors span only "
                f"{spread:.3g}x ({lo:.2g} to {hi:.2g}), below min_spread={_short(self.min_spread)}"
            )
        return None

    @override
    def apply(self, ctx: EscapeContext) -> str:
        done = (
            f"each weight tensor's update set to {_short(self.trust)} x its norm, in the "
            f"optimizer's direction, for {self.steps} steps"
        )
        evidence = self.spread(ctx)
        if isinstance(evidence, str):
            return f"{done} ({evidence})"
        spread, lo, hi, count = evidence
        return (
            f"{done}: the gradient-to-weight ratios of the {count} weight tensors span "
            f"{spread:.3g}x ({lo:.2g} to {hi:.2g})"
        )

    @override
    def before_optimizer_step(self, ctx: EscapeContext, optimizer: Optimizer) -> None:
        saved = self._saved.get(id(optimizer))
        if saved is not None and saved[0] == ctx.step:
            # Closure optimizers (LBFGS) run this hook at every closure evaluation, after moving
            # the weights: the step's update is measured from the weights before the first one.
            return
        layers = [
            p
            for g in optimizer.param_groups
            for p in g["params"]
            # A sparse gradient's update touches the rows of one batch: a whole tensor's share
            # of its norm put there would throw those rows far. Its optimizer's update stays.
            if p.dim() >= 2 and p.grad is not None and p.grad.layout == torch.strided
        ]
        if not layers:
            self._saved.pop(id(optimizer), None)
            return
        with torch.no_grad():
            if (
                saved is not None
                and len(saved[1]) == len(layers)
                and all(a is b for a, b in zip(saved[1], layers))
            ):
                buffer = saved[2]  # the same weights as the last step: reuse the buffer
            else:
                buffer = [torch.empty_like(p) for p in layers]
            # A step the AMP scaler skipped left its copy unused: this one overwrites it.
            torch._foreach_copy_(buffer, [p.detach() for p in layers])
        self._saved[id(optimizer)] = (ctx.step, layers, buffer)

    @override
    def after_optimizer_step(self, ctx: EscapeContext, optimizer: Optimizer) -> None:
        saved = self._saved.get(id(optimizer))
        if saved is None or saved[0] != ctx.step:
            return
        _, layers, buffer = saved
        self._saved[id(optimizer)] = (-1, layers, buffer)
        # Padding rows keep the optimizer's own update (none, or its weight decay).
        with ctx.keep_fixed(layers):
            self.rescale(layers, buffer)

    def rescale(self, params: Sequence[Tensor], before: Sequence[Tensor]) -> None:
        """Set each update ``params - before`` to ``trust · ‖before‖`` in its own direction.

        Tensors whose update or norm is zero, or whose rescaled update is not finite in their
        dtype, keep their update. ``before`` is consumed (it ends up holding ``before - params``).

        Args:
            params: The parameters, just after the optimizer's step.
            before: Their values just before it, the same shapes and dtypes.
        """
        params = [p.detach() for p in params]
        before = list(before)
        if not params:
            return
        with torch.no_grad():
            weight_norms = foreach_norms(before)
            torch._foreach_sub_(before, params)  # -Δ
            update_norms = foreach_norms(before)
            factors = _trust_factors(weight_norms, update_norms, self.trust, params)
            # θ_before + s·Δ = θ_after + (1 - s)·(-Δ): one buffer, no second copy.
            torch._foreach_mul_(before, factors)
            torch._foreach_add_(params, before)

    @override
    def undo(self, ctx: EscapeContext) -> None:
        self._saved.clear()  # the buffers go with the window


def _trust_factors(
    weight_norms: Sequence[Tensor],
    update_norms: Sequence[Tensor],
    trust: float,
    like: Sequence[Tensor],
) -> list[Tensor]:
    """Per tensor ``1 - trust·‖θ‖/‖Δ‖`` in its dtype, or 0 (the update stays) where undefined.

    One vector per (device, dtype) group: no per-tensor kernels beyond the final split.
    """
    out: list[Tensor] = [torch.empty(0)] * len(like)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(like):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for (_, dtype), idx in groups.items():
        w = torch.stack([weight_norms[i] for i in idx])
        d = torch.stack([update_norms[i] for i in idx])
        scale = trust * w / d
        factor = (1 - scale).to(dtype)
        # Zero norms, and factors outside a low-precision dtype's range: the update stays.
        keep = (w > 0) & (d > 0) & torch.isfinite(scale) & torch.isfinite(factor)
        factor = torch.where(keep, factor, torch.zeros_like(factor))
        for i, f in zip(idx, factor.unbind()):
            out[i] = f
    return out


def _sharded(ctx: EscapeContext, params: Sequence[Tensor]) -> str | None:
    """Why the parameters are sharded (per-tensor norms would need communication), or None."""
    trainer = ctx.trainer
    if trainer is not None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        strategy = getattr(trainer, "strategy", None)
        if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
            return f"{type(strategy).__name__} shards the parameters"
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in params):
            return "the parameters are sharded DTensors"
    if any(getattr(p, "_is_flat_param", False) for p in params):
        return "the parameters are FSDP's flat parameters"
    return None


# ---------------------------------------------------------------------------- OrthogonalRecurrence


@dataclass(eq=False, repr=False)
class OrthogonalRecurrence(EscapeStep):
    """Set each vanilla recurrent matrix to ``gain`` times its nearest orthogonal matrix, once.

    ``W_hh = U S V^T`` becomes ``gain * U V^T``: the same singular directions, every singular
    value ``gain``. A contracting recurrence (spectral radius below 1, about 0.58 at PyTorch's
    default initialisation) lets the gradient of an input fade geometrically with its distance;
    an orthogonal one passes it through the linear part of every step at full size, which is why
    an orthogonal initialisation trains such networks on long-range dependencies where the default
    one stays at chance (Saxe, McClelland and Ganguli, 2014, arXiv:1312.6120; Le, Jaitly and
    Hinton, 2015, arXiv:1504.00941). As an escape it changes what the run computes, so probation
    judges it and a rollback restores the matrices bit for bit. It acts on the matrices
    :func:`~lightning_escape.recurrence.recurrent_matrices` finds (vanilla ``nn.RNN`` layers)
    and is passed over where there are none, or where the parameters are sharded.

    Args:
        gain: The singular value of every recurrent matrix after the step.

    Example:
        >>> rnn = torch.nn.RNN(3, 8)
        >>> OrthogonalRecurrence().apply(EscapeContext(rnn))  # doctest: +ELLIPSIS
        'set 1 recurrent matrix (8x8) to 1.0 x its nearest orthogonal matrix: spectral radius ...'
        >>> w = rnn.weight_hh_l0.detach()
        >>> torch.allclose(w @ w.T, torch.eye(8), atol=1e-5)
        True
    """

    gain: float = 1.0

    def __post_init__(self) -> None:
        self.gain = check_positive_float("gain", self.gain)

    @override
    def unavailable(self, ctx: EscapeContext) -> str | None:
        matrices = _trained_matrices(ctx)
        if not matrices:
            return "no trainable vanilla recurrent matrix (nn.RNN)"
        return _sharded(ctx, [p for _, p in matrices])

    @override
    def apply(self, ctx: EscapeContext) -> str:
        matrices = _trained_matrices(ctx)
        before = [spectral_radius(p) for _, p in matrices]
        # No `keep_fixed`: a recurrent matrix holds no fixed rows (those are embedding rows).
        with torch.no_grad():
            for _, p in matrices:
                p.copy_(nearest_orthogonal(p, self.gain))
        sizes = sorted({f"{p.shape[0]}x{p.shape[1]}" for _, p in matrices})
        count = f"{len(matrices)} recurrent matri" + ("x" if len(matrices) == 1 else "ces")
        return (
            f"set {count} ({', '.join(sizes)}) to {_short(self.gain)} x its nearest orthogonal "
            f"matrix: spectral radius {min(before):.3g}..{max(before):.3g} -> {_short(self.gain)}"
        )


# ---------------------------------------------------------------------------- Restandardize


@dataclass(eq=False, repr=False)
class Restandardize(EscapeStep):
    """Give every hidden layer's outputs mean 0 and deviation ``std`` per channel on the probe batch.

    Where the input's signal fades through a deep stack (sigmoid units near 0.5, a tanh network
    from a small initialisation), the output is nearly the same for every example and the lower
    layers get almost no gradient. This step rescales and shifts the weights and bias of each
    hidden linear and convolution layer, in the order they run, so that its outputs on the probe
    batch have, per channel, mean 0 and standard deviation ``std``: the data-dependent
    initialisation of LSUV (Mishkin and Matas, 2016, arXiv:1511.06422) and of Krähenbühl et al.
    (2016, arXiv:1511.06856), applied where the run is stuck. The output layer keeps its weights
    (the loss sets its scale), as do layers whose weights are frozen. Under data parallelism the
    statistics are averaged over processes first, so every replica rescales alike. As an escape
    it changes what the run computes, so probation judges it and a rollback restores every weight
    bit for bit. See :func:`~lightning_escape.signal_flow.standardize_layers`.

    It is passed over without a probe batch (a loss the callback can evaluate), with fewer than
    two trainable real linear or convolution layers (complex ones are left as they are), or where
    the parameters are sharded.

    Args:
        std: Standard deviation of each hidden channel after the step.
        center: Also shift each hidden channel's mean to 0 through its bias.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 8), torch.nn.Sigmoid(),
        ...     torch.nn.Linear(8, 2))
        >>> x = torch.randn(64, 4)
        >>> ctx = EscapeContext(net, loss=lambda: float(net(x).square().mean().detach()))
        >>> Restandardize().apply(ctx)  # doctest: +ELLIPSIS
        'set the outputs of 2 hidden layers (0, 2) to mean 0 and std 1.0 per channel ...'
    """

    std: float = 1.0
    center: bool = True

    def __post_init__(self) -> None:
        self.std = check_positive_float("std", self.std)
        self.center = check_bool("center", self.center)

    @override
    def unavailable(self, ctx: EscapeContext) -> str | None:
        if ctx.loss is None:
            return "no probe batch to measure the layers on"
        layers = _trained_layers(ctx)
        if len(layers) < 2:
            return f"{len(layers)} trainable linear or convolution layer(s): no hidden layer"
        return _sharded(ctx, [cast(Tensor, m.weight) for m in layers])

    @override
    def apply(self, ctx: EscapeContext) -> str:
        loss = ctx.loss
        if loss is None:
            return "nothing done: no probe batch to measure the layers on"
        params = ctx.params()
        with ctx.keep_fixed(params):
            done = standardize_layers(
                ctx.module,
                loss,
                std=self.std,
                center=self.center,
                reduce=ctx.reduce,
                params=[p for p in params if not p.is_complex()],
            )
        if not done:
            return "nothing done: no hidden linear or convolution layer ran on the probe batch"
        names = ", ".join(s.layer for s in done[:4]) + (", ..." if len(done) > 4 else "")
        before = [s.std_before for s in done]
        return (
            f"set the outputs of {len(done)} hidden layers ({names}) to mean "
            f"{'0' if self.center else 'unchanged'} and std {_short(self.std)} per channel on "
            f"the probe batch (mean std before: {min(before):.3g}..{max(before):.3g})"
        )


def _trained_matrices(ctx: EscapeContext) -> list[tuple[str, nn.Parameter]]:
    trained = {id(p) for p in ctx.params()}
    return [(name, p) for name, p in recurrent_matrices(ctx.module) if id(p) in trained]


def _trained_layers(ctx: EscapeContext) -> list[nn.Module]:
    # Complex layers are left out: a complex channel has no one standard deviation to set.
    trained = {id(p) for p in ctx.params() if not p.is_complex()}
    return [m for m in measured_layers(ctx.module) if id(m.weight) in trained]


# ---------------------------------------------------------------------------- BatchSizeChange


@dataclass(eq=False, repr=False)
class BatchSizeChange(EscapeStep):
    """Change the batch size by ``factor`` for ``steps`` optimizer steps, then change it back.

    Smaller batches (``factor < 1``) add gradient noise; larger ones remove it. Two ways, chosen by
    ``method``:

    - ``"accumulation"``: change the Trainer's ``accumulate_grad_batches``, only at a batch where both
      the old and the new accumulation window begin, so no optimizer step ever sums the gradients of
      two windows (elsewhere, Lightning would add the new window to gradients it has not zeroed).
    - ``"dataloader"``: set ``batch_size`` on the module (or its hyper-parameters or datamodule) at the
      end of an epoch and have Lightning reload the training dataloader for the next one.
    - ``"auto"``: accumulation when the new count is a whole number of batches, else the dataloader.

    Through the dataloader, the change counts only if the reloaded dataloader follows
    ``batch_size``. At the first batch after the reload the step compares the batches' size with
    the one before (the size the loader declares, its ``batch_size`` or its batch sampler's, else
    the size of the batches it yields). A loader that ignores the attribute (a hard-coded size, a
    batch sampler of its own, a dataset that batches itself) leaves them as they were: the step then
    puts ``batch_size`` back, :meth:`not_applied` says why, the escape is withdrawn unjudged, and the
    policy passes over its rung for the rest of the fit.

    The switch back, too, waits for a boundary (an epoch's end, or a batch where both windows
    begin): until it is in force the step is :meth:`busy`, and no other escape starts, so a new
    one neither reads the size being undone as its original nor trains under it.

    Args:
        factor: Multiplier of the batch size (``0.5`` halves it).
        steps: Optimizer steps before the original size comes back.
        method: ``"auto"``, ``"accumulation"`` or ``"dataloader"``.

    Example:
        >>> BatchSizeChange(factor=0.5).describe()
        "BatchSizeChange(factor=0.5, steps=200, method='auto')"
    """

    # Stronger: the factor applied twice.
    factor: float = escalating(0.5, by=functools.partial(pow, exp=2))
    steps: int = 200
    method: Literal["auto", "accumulation", "dataloader"] = "auto"
    _how: str | None = _state()
    _original: int | None = _state()
    _target: int | None = _state()  # value to set at the next safe boundary
    _reload: int | None = _state()  # Trainer's reload setting to put back after a reload
    _applied: int | None = _state()  # the changed value in force (None: the original is)
    _before: int | None = _state()  # the dataloader's batch size before the change, when known
    # The first dimension of each tensor of the batches before the change (largest seen): with
    # several training dataloaders (a dict of them) each has its own.
    _sizes: list[int] | None = field(default=None, init=False, repr=False)
    _verify: bool = _state(False)  # the reload that brings the change is still to be checked
    _ignored: str | None = _state()  # why the change never came in force
    _since: int | None = _state()  # the optimizer step the change was asked for at

    def __post_init__(self) -> None:
        factor = self.factor
        self.factor = check_positive_float("factor", factor)
        if self.factor == 1.0:
            raise ValueError(f"`factor` must differ from 1, got {factor!r}.")
        self.steps = check_positive_int("steps", self.steps)
        self.method = check_choice("method", self.method, ("auto", "accumulation", "dataloader"))

    @property
    def duration(self) -> int:
        """Optimizer steps before the original size comes back."""
        return self.steps

    def _plan(self, ctx: EscapeContext) -> tuple[str, int, int] | str:
        """(method, current, new) or why none works."""
        trainer = ctx.trainer
        module = ctx.module
        if trainer is None:
            return "it needs the Trainer"
        if not isinstance(module, LightningModule):
            return "it needs a LightningModule"
        if not getattr(module, "automatic_optimization", True):
            return "manual optimization handles batches itself"
        reasons = []
        if self.method in ("auto", "accumulation"):
            from lightning.pytorch.callbacks import GradientAccumulationScheduler

            current = int(trainer.accumulate_grad_batches)
            new = round(current * self.factor)
            if any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks):
                reasons.append("a GradientAccumulationScheduler owns `accumulate_grad_batches`")
            elif new < 1 or new == current or not math.isclose(new, current * self.factor):
                reasons.append(
                    f"accumulate_grad_batches={current} x {_short(self.factor)} is not a whole "
                    "number of batches"
                )
            else:
                return "accumulation", current, new
        if self.method in ("auto", "dataloader"):
            from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr

            late = _too_late(ctx, self.steps)
            if not lightning_hasattr(module, "batch_size"):
                reasons.append("neither the module nor its datamodule has a `batch_size`")
            elif late is not None:
                reasons.append(late)
            else:
                current = int(lightning_getattr(module, "batch_size") or 0)
                new = max(1, round(current * self.factor))
                if new == current:
                    reasons.append(f"batch_size={current} x {_short(self.factor)} rounds to itself")
                else:
                    return "dataloader", current, new
        return "; ".join(reasons)

    @override
    def unavailable(self, ctx: EscapeContext) -> str | None:
        plan = self._plan(ctx)
        return plan if isinstance(plan, str) else None

    @override
    def apply(self, ctx: EscapeContext) -> str:
        plan = self._plan(ctx)
        if isinstance(plan, str):
            raise RuntimeError(f"BatchSizeChange cannot act: {plan}")
        self._how, self._original, self._target = plan
        if self._how == "accumulation":
            return (
                f"accumulate_grad_batches {self._original} -> {self._target} for {self.steps} steps, "
                "from the next batch where both windows begin"
            )
        # The size the loader in force declares is what trains now; the attribute only says what
        # the loader was asked for (a loader may scale it, or ignore it).
        self._before = _declared_batch_size(ctx.trainer)
        self._since = ctx.step
        loader = (
            ""
            if self._before in (None, self._original)
            else f" (the training dataloader's batches: {self._before})"
        )
        return (
            f"batch_size {self._original} -> {self._target}{loader} for {self.steps} steps, "
            "from the next epoch"
        )

    @override
    def not_applied(self) -> str | None:
        return self._ignored

    @override
    def busy(self) -> bool:
        return self._target is not None or self._reload is not None

    @override
    def waiting(self) -> bool:
        # Applied, and the changed size not in force yet (the switch back clears `_original`).
        return self._original is not None and self._applied is None

    @override
    def at_batch_start(self, ctx: EscapeContext, batch_idx: int) -> None:
        if (
            self._how == "dataloader"
            and self._target is not None
            and self._original is not None
            and self._since is not None
            and ctx.step - self._since >= self.steps
            and not math.isfinite(getattr(ctx.trainer, "num_training_batches", 0))
        ):
            # An epoch of unknown length that has not ended within the window (an endless
            # stream): the size would change too late, or never. Nothing was set yet.
            self._ignored = (
                f"no epoch ended within {self.steps} steps of step {self._since}, where "
                f"batch_size={self._target} would have come in force"
            )
            self._original = self._target = None
            return
        if self._how == "dataloader":
            if batch_idx == 0 and self._reload is not None and self._original is None:
                self._reloaded(ctx)
            if self._verify and batch_idx == 0:
                self._check_reload(ctx)
            elif self.waiting() and _declared_batch_size(ctx.trainer) is None:
                # A loader that declares no size: its batches say it. The epoch's last batch may
                # be short, and is left out.
                size = _batch_size(ctx.batch)
                if size is not None and not _last_batch(ctx.trainer):
                    self._before = max(size, self._before or 0)
                    sizes = _tensor_sizes(ctx.batch)
                    if self._sizes is not None and len(self._sizes) == len(sizes):
                        sizes = [max(a, b) for a, b in zip(sizes, self._sizes)]
                    self._sizes = sizes
            return
        if self._target is None:
            return
        current = int(ctx.trainer.accumulate_grad_batches)
        # Lightning zeroes gradients at batch_idx % N == 0 and steps at (batch_idx + 1) % N == 0:
        # switching where both windows begin keeps every window whole.
        if batch_idx % current == 0 and batch_idx % self._target == 0:
            self._set(ctx, self._target)

    @override
    def at_epoch_end(self, ctx: EscapeContext) -> None:
        trainer = ctx.trainer
        if self._how == "accumulation":
            # The epoch's last batch always steps: the next epoch starts a fresh window.
            if self._target is not None:
                self._set(ctx, self._target)
            return
        if self._target is not None:
            # Changing to the new size (not back): the reload is checked at the next batch.
            self._verify = self._original is not None
            self._set(ctx, self._target)
            # Lightning reloads the training dataloader before the next epoch when this is set.
            # The user's setting is saved once: at the switch back, the 1 in force is this step's.
            if self._reload is None:
                self._reload = trainer.reload_dataloaders_every_n_epochs
            trainer.reload_dataloaders_every_n_epochs = 1
        elif self._reload is not None:
            trainer.reload_dataloaders_every_n_epochs = self._reload
            self._reload = None

    def _reloaded(self, ctx: EscapeContext) -> None:
        """At the first batch after the switch back: the Trainer's reload setting comes back.

        The reload that brought the original size has happened by then, so nothing of the step
        is left to wait for: it stops being :meth:`busy` here, not an epoch later, and the
        engine may start the next escape under the original size.
        """
        if self._target is None:  # else the switch back is still to come
            ctx.trainer.reload_dataloaders_every_n_epochs = self._reload
            self._reload = None

    def _check_reload(self, ctx: EscapeContext) -> None:
        """At the first batch from the reloaded dataloader: did its batches change size?

        When they did not, the dataloader ignores ``batch_size``: the attribute is put back (a
        change that is not in force must not stay claimed) and :meth:`not_applied` says why.
        """
        self._verify = False
        if self._original is None or self._applied is None:
            return
        trainer = ctx.trainer
        after = _declared_batch_size(trainer)
        if after is None:
            after = _batch_size(ctx.batch)
        # Without a size seen before the change, the attribute's is the best guess of it.
        before = self._original if self._before is None else self._before
        unchanged = after is not None and after == before
        sizes = _tensor_sizes(ctx.batch)
        if unchanged and self._sizes is not None and len(sizes) == len(self._sizes):
            # Several dataloaders (a dict of them): the change is in force where any one of them
            # follows it, and is judged (and later undone) as such.
            unchanged = sizes == self._sizes
        if ctx.reduce is not None:
            # Every process must decide alike (the engine withdraws the trial on all or none);
            # one whose batches changed keeps the change on all of them.
            device = trainer.strategy.root_device
            both = ctx.reduce(torch.tensor([float(unchanged), float(after or 0)], device=device))
            unchanged, after = bool(both[0].item() >= 1.0), round(float(both[1].item()))
        if not unchanged:
            return
        from lightning.pytorch.utilities.parsing import lightning_setattr

        self._ignored = (
            f"the training dataloader ignored batch_size={self._applied} (changed from "
            f"{self._original}): its batches stay at {after}"
        )
        lightning_setattr(cast(LightningModule, ctx.module), "batch_size", self._original)
        if self._reload is not None:
            trainer.reload_dataloaders_every_n_epochs = self._reload
        # Nothing left to change back: the step is no longer busy, nor waiting.
        self._original = self._applied = self._target = self._reload = None

    @override
    def settle(self, ctx: EscapeContext) -> None:
        if self._target is not None:
            self._set(ctx, self._target)
        if self._reload is not None:
            ctx.trainer.reload_dataloaders_every_n_epochs = self._reload
            self._reload = None

    @override
    def undo(self, ctx: EscapeContext) -> None:
        if self._original is not None and self._how is not None:
            self._target = self._original if self._current(ctx) != self._original else None
        self._original = None

    def _set(self, ctx: EscapeContext, value: int) -> None:
        """Put ``value`` in force: the accumulation count, or the module's batch size."""
        if self._how == "accumulation":
            ctx.trainer.accumulate_grad_batches = value
        else:
            from lightning.pytorch.utilities.parsing import lightning_setattr

            lightning_setattr(cast(LightningModule, ctx.module), "batch_size", value)
        self._target = None
        # While the effect lasts `_original` is known; switching back clears it first (undo).
        self._applied = value if self._original is not None else None

    @override
    def resume(self, ctx: EscapeContext) -> None:
        if self._applied is None:
            return
        if self._how == "accumulation":
            ctx.trainer.accumulate_grad_batches = self._applied
        elif self._target is None:
            # The resumed epoch's dataloader is built already: the size holds from the next one
            # (with a switch back pending, the next boundary brings the original size anyway).
            self._target, self._applied = self._applied, None

    def _current(self, ctx: EscapeContext) -> int:
        if self._how == "accumulation":
            return int(ctx.trainer.accumulate_grad_batches)
        from lightning.pytorch.utilities.parsing import lightning_getattr

        return int(lightning_getattr(cast(LightningModule, ctx.module), "batch_size") or 0)


def _declared_batch_size(trainer: Any) -> int | None:
    """The batch size the training dataloader in force is built with, when one loader says it."""
    from torch.utils.data import DataLoader

    loader = getattr(trainer, "train_dataloader", None)
    if not isinstance(loader, DataLoader):
        return None  # several loaders, or none yet
    size = loader.batch_size
    if size is None:
        # A batch sampler of the user's: `BatchSampler` and its kin say their size.
        size = getattr(loader.batch_sampler, "batch_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _batch_size(batch: Any) -> int | None:
    """The size of a training batch (its first tensor's first dimension), or None."""
    from lightning_escape._lightning import batch_size_of

    size = None if batch is None else batch_size_of(batch)
    return size if size is not None and size > 0 else None


def _tensor_sizes(batch: Any) -> list[int]:
    """The first dimension of each tensor in ``batch``, in its order (none for None)."""
    from lightning_utilities.core.apply_func import apply_to_collection

    sizes: list[int] = []
    if batch is not None:
        apply_to_collection(
            batch, Tensor, lambda t: sizes.append(int(t.shape[0])) if t.dim() else 0
        )
    return sizes


def _too_late(ctx: EscapeContext, steps: int) -> str | None:
    """Why a batch size changed at the epoch's end should not be tried now, or None.

    The change comes in force with the next epoch's dataloader: an epoch that ends too close to
    the fit's last step (``ctx.last_step``) for ``steps`` steps under the change is passed over.
    An epoch of unknown length (a dataloader without one) is tried, and :class:`BatchSizeChange`
    gives up when no epoch has ended ``steps`` steps after it was asked for.
    """
    trainer = ctx.trainer
    batches = getattr(trainer, "num_training_batches", None)
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    progress = getattr(getattr(loop, "batch_progress", None), "current", None)
    done = getattr(progress, "completed", None)
    if not isinstance(batches, (int, float)) or not math.isfinite(batches):
        return None  # an epoch of unknown length: the step gives up after waiting `steps`
    if not isinstance(done, int):
        return None
    every = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
    wait = math.ceil(max(0, int(batches) - done) / every)
    if ctx.last_step is not None and ctx.step + wait + steps - 1 > ctx.last_step:
        return (
            f"its change would come in force at the next epoch (step {ctx.step + wait}), too "
            f"late for {steps} steps before step {ctx.last_step}"
        )
    return None


def _last_batch(trainer: Any) -> bool:
    """Whether the batch starting now is the epoch's last (possibly short) one."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return bool(getattr(getattr(loop, "batch_progress", None), "is_last_batch", False))


# ---------------------------------------------------------------------------- NegativeCurvatureStep


@dataclass(eq=False, repr=False)
class NegativeCurvatureStep(EscapeStep):
    """A step along the eigenvector of the most negative Hessian eigenvalue, downhill.

    Uses the curvature probe's ``eigvec_min``, oriented so that it does not point uphill
    (``g · v <= 0``). The step length comes from a line search on the probe batch: starting at
    ``1e-3`` times the parameters' root mean square (at least ``1e-3``), the length doubles while the
    loss keeps falling, for at most ``max_evals`` loss evaluations; the best length found, times
    ``scale``, is taken.

    Args:
        scale: Multiplier of the line search's best length.
        max_evals: Loss evaluations the line search may spend.

    References:
        Dauphin et al., "Identifying and attacking the saddle point problem in high-dimensional
        non-convex optimization", 2014; Jin et al., 2017.

    Example:
        >>> NegativeCurvatureStep().describe()
        'NegativeCurvatureStep(scale=1.0, max_evals=24)'
    """

    # Stronger: twice the line search's best length.
    scale: float = escalating(1.0, by=functools.partial(operator.mul, 2.0))
    max_evals: int = 24

    def __post_init__(self) -> None:
        self.scale = check_positive_float("scale", self.scale)
        self.max_evals = check_positive_int("max_evals", self.max_evals)

    @override
    def unavailable(self, ctx: EscapeContext) -> str | None:
        spectrum = ctx.spectrum
        if spectrum is None:
            return "no curvature probe result"
        if not spectrum.lambda_min < 0:
            return f"no negative curvature (λ_min = {spectrum.lambda_min:.4g})"
        if ctx.loss is None:
            return "no probe batch for the line search"
        if not spectrum.eigvec_min:
            return "the probe's eigenvector was released (it serves one escape; memory)"
        if len(spectrum.eigvec_min) != len(ctx.probed()):
            return "the probe's parameters differ from the trainable parameters"
        return None

    @override
    def apply(self, ctx: EscapeContext) -> str:
        spectrum = ctx.spectrum
        assert spectrum is not None and ctx.loss is not None  # checked by `unavailable`
        # Along the eigenvector, restricted to what training moves (not a group at rate 0).
        trained = {id(p) for p in ctx.params()}
        pairs = [(p, v) for p, v in zip(ctx.probed(), spectrum.eigvec_min) if id(p) in trained]
        params = [p for p, _ in pairs]
        direction = [v for _, v in pairs]
        origin = [p.detach().clone() for p in params]
        rms = math.sqrt(
            sum(float(p.abs().float().pow(2).sum()) for p in origin) / max(1, spectrum.dim)
        )

        def move(alpha: float) -> None:
            # Every trial point too leaves the padding rows as they were: the loss is measured
            # where the step would land.
            with torch.no_grad(), ctx.keep_fixed(params):
                for p, p0, v in zip(params, origin, direction):
                    p.copy_(p0 + alpha * v.to(p0))

        f0 = ctx.loss()
        # Long enough to change the weights in their own dtype: a bfloat16 weight rounds away
        # a change below about 1/256 of itself, and the search would end at its first length.
        eps = max(
            (torch.finfo(p.dtype).eps for p in params if p.is_floating_point() or p.is_complex()),
            default=0.0,
        )
        first = max(1e-3 * max(rms, 1.0), 4 * eps * rms * math.sqrt(max(1, spectrum.dim)))
        alpha = first
        best_alpha, best_f = 0.0, f0
        for _ in range(self.max_evals):
            move(alpha)
            f = ctx.loss()
            if not f < best_f:
                break
            best_alpha, best_f = alpha, f
            alpha *= 2
        if best_alpha == 0.0:
            best_alpha = first
        move(best_alpha * self.scale)
        return (
            f"step of length {best_alpha * self.scale:.3g} along the eigenvector of "
            f"λ_min = {spectrum.lambda_min:.4g}; probe loss {f0:.4g} -> {best_f:.4g} at the "
            "line search's best length"
        )
