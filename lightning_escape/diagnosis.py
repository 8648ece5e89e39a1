"""Name a stall: gather evidence on a batch (curvature, duplicate and dead units) and classify it.

:class:`StallClassifier` holds every setting of the diagnosis (the curvature probe, the tolerances
that separate a plateau from a saddle from a local minimum, the divergence rule) and the evidence
gathering itself, on a module and a batch. It knows nothing of the Trainer: the
:class:`~lightning_escape.StallDetector` that holds it passes the module, the batch and, under data
parallelism, a function that averages a tensor over the processes.

Example:
    >>> classifier = StallClassifier(lanczos_steps=10, saddle_tol=0.05)
    >>> classifier
    StallClassifier(probe=True, lanczos_steps=10, saddle_tol=0.05)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from lightning_escape._validation import (
    check_bool,
    check_optional_positive_int,
    check_positive_float,
    check_positive_int,
    check_range,
    check_seed,
)
from lightning_escape.curvature import (
    DoubleBackwardUnsupported,
    ProbeUnavailable,
    Spectrum,
    flatten,
    unflatten,
)
from lightning_escape.detectors import (
    CurvatureEvidence,
    DeadEvidence,
    Diagnosis,
    Mode,
    RecurrentEvidence,
    StallStatus,
    SymmetricEvidence,
    classify,
)
from lightning_escape.probe import (
    PROBE_METHODS,
    checked_loss,
    preserved,
    probe_curvature,
    probe_direction,
)
from lightning_escape.progress import Motion, MotionRule
from lightning_escape.recurrence import recurrent_matrices, spectral_radius
from lightning_escape.seeding import derive_generator
from lightning_escape.signal_flow import SignalFade, record_signal, signal_fade
from lightning_escape.units import find_symmetric_units, record_unit_activity

__all__ = ["LossFn", "Reduce", "StallClassifier"]


def _default(f: Field[Any]) -> Any:
    """A dataclass field's default value, made by its factory if it has one."""
    factory = f.default_factory
    return factory() if f.default is MISSING and callable(factory) else f.default


#: ``loss_fn(module, batch) -> loss``: the loss the probe differentiates.
LossFn = Callable[[Any, Any], Tensor]
#: Averages a tensor over data-parallel processes (None on one process).
Reduce = Callable[[Tensor], Tensor] | None


def _check_loss_fn(loss_fn: Any) -> None:
    """``loss_fn`` must be callable as ``loss_fn(module, batch)``: checked before any fit."""
    if not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable as loss_fn(module, batch), got {loss_fn!r}.")
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # a builtin without one: called as it is
        return
    try:
        signature.bind(None, None)
    except TypeError as err:
        raise ValueError(
            f"`loss_fn` must be callable as loss_fn(module, batch), got {loss_fn!r} with "
            f"signature {signature}: {err}."
        ) from None


@dataclass(eq=False, repr=False)
class StallClassifier:
    """How a declared stall is diagnosed: which evidence is gathered, and the tolerances.

    Args:
        probe: Run the curvature probe (Lanczos on Hessian-vector products) at a stall.
        lanczos_steps: Hessian-vector products per probe, at least 2.
        probe_every_n_steps: Also probe (and log the eigenvalues) every this many steps.
        symmetry_every_n_steps: Also look for duplicate units every this many steps, stalled or
            not (``None``: only at stalls).
        loss_fn: ``loss_fn(module, batch) -> loss`` for the probe; without it the probe calls
            ``training_step`` with logging silenced (automatic optimization only).
        plateau_tol: A stall is a plateau when ``lr * max|λ| < plateau_tol``.
        saddle_tol: A stall is a saddle when ``λ_min < -saddle_tol * |λ_max|``.
        dead_fraction: A stall is ``dead_units`` when this fraction of a ReLU layer never fires.
        divergence_factor: The run diverges when its smoothed value is worse than its best by more
            than this many times its scale (see :class:`~lightning_escape.detectors.StallTracker`).
        seed: Seed of the probe's start vector and of its dropout masks.
        probe_method: How the probe takes Hessian-vector products: ``"auto"`` (double backward,
            falling back to finite differences of gradients where the module has none, such as
            fused attention kernels or ``torch.compile``), ``"exact"`` or
            ``"finite_difference"``.
        converged_rel: A stall on a non-negative loss at most this fraction of its starting value
            (and not at a saddle) is ``converged``, never escaped by default; ``0`` turns it off.
        noise_floor_rel: A stall on a non-negative loss at most this fraction of its starting
            value, where the loss differs from batch to batch and no strong direction of descent
            holds on two batches, is ``converged`` too (a noise floor: noisy data keeps the
            loss above 0, and a minibatch's Hessian has negative eigenvalues of its own); ``0``
            turns it off.
        confirm_curvature: At a stall, look at a second batch (the one before the probe's):
            the curvature along the probe's direction of descent is measured on it too (one
            more Hessian-vector product), a saddle is diagnosed only where that direction's
            curvature is negative on both, and the noise-floor rule needs it; a unit counts as
            dead only if it fires on neither batch (one more forward pass).
        annealed_rel: A stall while a schedule holds the learning rate at most this fraction of
            its peak in the run (``ReduceLROnPlateau`` after its cuts, the tail of a cosine) is
            ``converged``: training at such a rate could not act on an escape within a
            probation window; ``0`` turns it off.
        motion: When the run counts as still moving, which holds a declared stall off (the
            parameters' speed, trend and direction over windows of ``patience / 2`` steps);
            ``None`` never holds off and keeps no parameter anchors.
        training_improves: With a ``monitor`` metric, hold a stall of it off while the loss
            ``training_step`` returns still improves (by the detector's relative tolerance within
            ``patience`` steps): the optimizer is not stuck, and a plateau of a held-out metric
            while the model fits its training set further is not a stall an escape answers.
            Like ``motion``, it does not hold off a contracting recurrence.
        recurrent_radius: A stall is ``vanishing_gradient`` when the recurrent matrix of a vanilla
            ``nn.RNN`` has a spectral radius below this (PyTorch's default initialisation gives
            about 0.58); such a stall is not held off by ``motion``, since the parameters that do
            get a gradient can move while nothing reaches back in time. ``0`` turns it off.
        signal_fade: A stall is ``vanishing_gradient`` when the part of the output layer's output
            that depends on the example, against its size, is below this fraction of what it is
            at the layer where it is largest (measured on the probe batch: see
            :func:`~lightning_escape.signal_flow.record_signal`); ``0`` turns it off. Unlike a
            contracting recurrence, such a stall is held off while the parameters move.

    Example:
        >>> StallClassifier(probe=False).probe
        False
    """

    probe: bool = True
    lanczos_steps: int = 20
    probe_every_n_steps: int | None = None
    symmetry_every_n_steps: int | None = 50
    loss_fn: LossFn | None = None
    plateau_tol: float = 1e-3
    saddle_tol: float = 1e-2
    dead_fraction: float = 0.5
    divergence_factor: float = 1.0
    seed: int = 0
    probe_method: str = "auto"
    converged_rel: float = 1e-2
    noise_floor_rel: float = 0.25
    confirm_curvature: bool = True
    annealed_rel: float = 1e-2
    motion: MotionRule | None = field(default_factory=MotionRule)
    training_improves: bool = True
    recurrent_radius: float = 0.9
    signal_fade: float = 1e-2

    def __post_init__(self) -> None:
        check_bool("probe", self.probe)
        self.lanczos_steps = check_positive_int("lanczos_steps", self.lanczos_steps)
        if self.lanczos_steps < 2:
            # One step gives one Ritz value, so λ_min = λ_max: no saddle could ever show.
            raise ValueError(
                f"`lanczos_steps` must be at least 2 (one step cannot tell λ_min from λ_max), "
                f"got {self.lanczos_steps!r}."
            )
        check_optional_positive_int("probe_every_n_steps", self.probe_every_n_steps)
        check_optional_positive_int("symmetry_every_n_steps", self.symmetry_every_n_steps)
        if self.loss_fn is not None:
            _check_loss_fn(self.loss_fn)
        if not self.probe and self.probe_every_n_steps is not None:
            raise ValueError(
                f"`probe_every_n_steps={self.probe_every_n_steps}` runs the curvature probe, "
                "which `probe=False` turns off: pass one or the other."
            )
        self.plateau_tol = check_positive_float("plateau_tol", self.plateau_tol)
        self.saddle_tol = check_range("saddle_tol", self.saddle_tol, 0.0, 1.0)
        self.dead_fraction = check_range(
            "dead_fraction", self.dead_fraction, 0.0, 1.0, low_open=True
        )
        if self.divergence_factor != math.inf:
            self.divergence_factor = check_positive_float(
                "divergence_factor", self.divergence_factor
            )
        self.seed = check_seed("seed", self.seed)
        self.converged_rel = check_range("converged_rel", self.converged_rel, 0.0, 1.0)
        self.noise_floor_rel = check_range("noise_floor_rel", self.noise_floor_rel, 0.0, 1.0)
        check_bool("confirm_curvature", self.confirm_curvature)
        self.annealed_rel = check_range("annealed_rel", self.annealed_rel, 0.0, 1.0)
        self.recurrent_radius = check_range("recurrent_radius", self.recurrent_radius, 0.0, 1.0)
        self.signal_fade = check_range("signal_fade", self.signal_fade, 0.0, 1.0)
        check_bool("training_improves", self.training_improves)
        if self.motion is not None and not isinstance(self.motion, MotionRule):
            raise ValueError(f"`motion` must be a MotionRule or None, got {self.motion!r}.")
        if self.probe_method not in PROBE_METHODS:
            raise ValueError(
                f"`probe_method` must be one of {PROBE_METHODS}, got {self.probe_method!r}."
            )

    def __repr__(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name == "probe" or getattr(self, f.name) != _default(f)
        ]
        return f"{type(self).__name__}({', '.join(changed)})"

    # ------------------------------------------------------------------ evidence

    def spectrum(
        self, module: LightningModule, batch: Any, batch_idx: int, reduce: Reduce
    ) -> Spectrum:
        """The extreme Hessian eigenvalues on ``batch``, leaving no trace on the module.

        Its ``method`` says how the Hessian-vector products were taken (see ``probe_method``).

        Raises:
            ProbeUnavailable: If the probe cannot run on this module or batch (the same on every
                process: its causes are the module and the reduced numbers), including when no
                Hessian-vector product works on the module.
        """
        try:
            return probe_curvature(
                module,
                batch,
                loss_fn=self.loss_fn,
                batch_idx=batch_idx,
                steps=self.lanczos_steps,
                seed=self.seed,
                reduce=reduce,
                method=self.probe_method,
            )
        except DoubleBackwardUnsupported as err:  # only with probe_method="exact"
            raise ProbeUnavailable(
                f"{err} (with `probe_method='exact'`; 'auto' falls back to finite differences)"
            ) from err

    def confirm(
        self,
        module: LightningModule,
        batch: Any,
        batch_idx: int,
        reduce: Reduce,
        spectrum: Spectrum,
    ) -> tuple[float, float]:
        """The curvature along ``spectrum``'s direction of descent on another batch, and its loss.

        One Hessian-vector product, taken the way the probe took its own (``spectrum.method``).

        Raises:
            ProbeUnavailable: If the loss or the product cannot be evaluated on ``batch``.
        """
        return probe_direction(
            module,
            batch,
            spectrum.eigvec_min,
            loss_fn=self.loss_fn,
            batch_idx=batch_idx,
            seed=self.seed,
            reduce=reduce,
            method=spectrum.method,
        )

    def symmetric_units(
        self, module: nn.Module, grads: Mapping[nn.Parameter, Tensor]
    ) -> list[SymmetricEvidence]:
        """Duplicate units of trainable layers (frozen ones cannot be escaped, so are not news).

        Units with identical weights and identical gradients stay identical forever: that trap
        needs no loss plateau to be real.
        """
        generator = derive_generator(self.seed)
        trainable = []
        for group in find_symmetric_units(module, grads, generator=generator):
            weight = getattr(module.get_submodule(group.layer), "weight", None)
            if isinstance(weight, Tensor) and weight in grads:
                trainable.append(
                    SymmetricEvidence(group.layer, len(group.units), group.out_features)
                )
        return trainable

    def unit_evidence(
        self,
        module: LightningModule,
        batch: Any,
        batch_idx: int,
        reduce: Reduce,
        other: tuple[Any, int] | None = None,
    ) -> tuple[list[SymmetricEvidence], list[DeadEvidence], SignalFade | None]:
        """Duplicate and dead units, and how the input's signal fades through the layers.

        From one forward and backward pass on ``batch``. A unit is dead when it fires on no
        example of ``batch``, nor of ``other`` (a second batch and its index) when given: a
        small batch leaves units silent that other examples wake, and one forward pass more
        tells them apart.

        Raises:
            ProbeUnavailable: If the loss cannot be evaluated on a batch (see
                :func:`~lightning_escape.probe.checked_loss`).
        """
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            return [], [], None
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            preserved(module, seed=self.seed),
        ):
            with record_unit_activity(module) as activity:
                with record_signal(module, reduce) as layers:
                    loss = self._loss(module, batch, batch_idx)
                if other is not None:
                    with torch.no_grad():
                        self._loss(module, *other)
            if not isinstance(loss, Tensor) or not loss.requires_grad:
                return [], [], None
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        filled = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if reduce is not None:
            filled = unflatten(reduce(flatten(filled)), params)
        symmetric = self.symmetric_units(module, dict(zip(params, filled)))
        dead_units = activity.dead_units()
        batches = 1 if other is None else 2
        if reduce is not None and dead_units:
            # Processes saw different batches: they agree on the mean count.
            counts = reduce(
                torch.tensor([float(d.dead) for d in dead_units], device=params[0].device)
            )
            dead = [
                DeadEvidence(d.layer, round(c), d.total, batches)
                for d, c in zip(dead_units, counts.tolist())
            ]
        else:
            dead = [DeadEvidence(d.layer, d.dead, d.total, batches) for d in dead_units]
        return symmetric, dead, signal_fade(layers)

    def _loss(self, module: LightningModule, batch: Any, batch_idx: int) -> Tensor:
        """The loss on ``batch``: ``loss_fn``'s, else what ``training_step`` returns."""
        return checked_loss(module, batch, batch_idx, self.loss_fn)

    def recurrent_evidence(self, module: nn.Module) -> list[RecurrentEvidence]:
        """The recurrent matrices whose spectral radius is below ``recurrent_radius``.

        Those of :func:`~lightning_escape.recurrence.recurrent_matrices`; one small eigenvalue
        problem each, on the host.

        Example:
            >>> rnn = nn.RNN(4, 16)
            >>> [e.layer for e in StallClassifier(probe=False).recurrent_evidence(rnn)]
            ['weight_hh_l0']
        """
        if self.recurrent_radius == 0:
            return []
        found = []
        for name, weight in recurrent_matrices(module):
            radius = spectral_radius(weight)
            if radius < self.recurrent_radius:
                found.append(RecurrentEvidence(name, radius, weight.shape[0]))
        return found

    # ------------------------------------------------------------------ classification

    def classify(
        self,
        status: StallStatus,
        *,
        spectrum: Spectrum | None = None,
        other: tuple[float, float] | None = None,
        training: StallStatus | None = None,
        lr: float = math.nan,
        curvature_note: str | None = None,
        symmetric: Sequence[SymmetricEvidence] = (),
        dead: Sequence[DeadEvidence] = (),
        recurrent: Sequence[RecurrentEvidence] = (),
        fading: SignalFade | None = None,
        metric: str = "loss",
        target: float | None = None,
        mode: Mode = "min",
        motion: Motion | None = None,
        lr_peak: float = math.nan,
    ) -> Diagnosis:
        """Name the stall from its evidence with this classifier's tolerances (see :func:`classify`).

        ``other``: what :meth:`confirm` measured on a second batch, if it ran; ``training``: the
        training loss's status when ``status`` is another metric's (for the noise floor).
        """
        curvature = None
        if spectrum is not None:
            curvature = CurvatureEvidence(
                lambda_max=spectrum.lambda_max,
                lambda_min=spectrum.lambda_min,
                lr=lr,
                grad_norm=spectrum.grad_norm,
                lambda_min_other=math.nan if other is None else other[0],
                loss=spectrum.loss,
                loss_other=math.nan if other is None else other[1],
            )
        return classify(
            status,
            curvature=curvature,
            curvature_note=curvature_note,
            symmetric=symmetric,
            dead=dead,
            recurrent=recurrent,
            fading=fading if fading is not None and fading.fade < self.signal_fade else None,
            plateau_tol=self.plateau_tol,
            saddle_tol=self.saddle_tol,
            dead_fraction=self.dead_fraction,
            metric=metric,
            target=target,
            mode=mode,
            converged_rel=self.converged_rel,
            noise_floor_rel=self.noise_floor_rel,
            training=training,
            lr=lr,
            lr_peak=lr_peak,
            annealed_rel=self.annealed_rel,
            motion=motion,
            moving=motion is not None and self.motion is not None and self.motion.moving(motion),
        )
