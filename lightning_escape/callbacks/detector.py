"""StallDetector: the smoke alarm. Watches, diagnoses and logs; never changes the run."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_escape._lightning import step_index, warn_once
from lightning_escape._validation import (
    check_bool,
    check_choice,
    check_nonnegative_int,
    check_optional_positive_int,
    check_positive_float,
    check_positive_int,
    check_range,
)
from lightning_escape.callbacks.monitor import GradientMonitor
from lightning_escape.curvature import Spectrum, flatten, unflatten
from lightning_escape.detectors import (
    KINDS,
    CurvatureEvidence,
    DeadEvidence,
    Diagnosis,
    Mode,
    StallStatus,
    StallTracker,
    SymmetricEvidence,
    classify,
)
from lightning_escape.logging import PREFIX, EscapeLogger
from lightning_escape.probe import (
    ProbeUnavailable,
    loss_from_training_step,
    preserved,
    probe_curvature,
)
from lightning_escape.units import find_symmetric_units, record_unit_activity

__all__ = ["LossFn", "StallDetector"]

LossFn = Callable[[pl.LightningModule, Any], Tensor]


class StallDetector(Callback):
    r"""Detect that training is stuck, diagnose what kind of stuck, and log why.

    Every optimizer step it records, on the device, the monitored value (the training loss returned
    by ``training_step`` by default) and the global gradient norm. Every ``check_every_n_steps`` it
    reads them back once (averaged across processes, so every rank decides alike) and feeds a
    :class:`~lightning_escape.detectors.StallTracker`. When the tracker declares a stall, it gathers
    evidence on the current batch and names the stall with
    :func:`~lightning_escape.detectors.classify`:

    - a curvature probe (Lanczos on Hessian-vector products, :func:`~lightning_escape.probe.probe_curvature`)
      for the largest and smallest Hessian eigenvalues; it runs only when a stall is suspected (and,
      optionally, every ``probe_every_n_steps``) and leaves parameters, gradients, buffers, RNG state
      and logged metrics exactly as they were;
    - duplicate hidden units (identical incoming weights and gradients) and dead ReLU units.

    Each diagnosis is appended to :attr:`diagnoses` as a plain dict with ``step``, ``kind``,
    ``reason`` and ``evidence``, logged as a TensorBoard text event, and a new one is made only after
    the run has improved again (or has diverged).

    It also runs a :class:`~lightning_escape.GradientMonitor` for the gradient norm, whose logging
    can be switched off with ``log_gradients=False``.

    Args:
        monitor: A metric logged with ``self.log`` to watch instead of the training loss (read at
            each check from ``trainer.callback_metrics``).
        mode: ``"min"`` if lower is better, ``"max"`` if higher is better.
        patience: Optimizer steps without significant improvement that make a stall.
        warmup_steps: Steps at the start with no decisions; ``None`` for ``patience``.
        min_delta: Absolute improvement that counts; ``None`` for ``1e-6`` times the first value.
        min_delta_rel: Improvement that counts, relative to the best value.
        smoothing: EMA decay of the monitored value per sample (every step for the training loss,
            every check for a ``monitor`` metric), in ``[0, 1)``.
        check_every_n_steps: Read values back and decide every this many optimizer steps.
        probe: Run the curvature probe when a stall is declared.
        probe_every_n_steps: Also probe (and log the eigenvalues) every this many steps.
        lanczos_steps: Hessian-vector products per probe.
        loss_fn: ``loss_fn(module, batch) -> loss`` for the probe; without it the probe calls
            ``training_step`` with logging silenced (automatic optimization only).
        plateau_tol: A stall is a plateau when ``lr * max|λ| < plateau_tol``.
        saddle_tol: A stall is a saddle when ``λ_min < -saddle_tol * |λ_max|``.
        dead_fraction: A stall is ``dead_units`` when this fraction of a ReLU layer never fires.
        divergence_factor: See :class:`~lightning_escape.detectors.StallTracker`.
        symmetry_every_n_steps: Also look for duplicate units every this many steps, stalled or
            not (``None``: only at stalls).
        log_gradients: Let the inner gradient monitor log its statistics.
        seed: Seed of the probe's random start vector and dropout masks.
        verbose: Also print each diagnosis.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> detector = StallDetector(patience=5, warmup_steps=0)
        >>> trainer = pl.Trainer(callbacks=[detector], max_steps=3, logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False,
        ...                      enable_checkpointing=False)
        >>> trainer.fit(BoringModel())
        >>> detector.diagnoses
        []
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: Mode = "min",
        patience: int = 200,
        warmup_steps: int | None = None,
        min_delta: float | None = None,
        min_delta_rel: float = 1e-3,
        smoothing: float = 0.95,
        check_every_n_steps: int = 10,
        probe: bool = True,
        probe_every_n_steps: int | None = None,
        lanczos_steps: int = 20,
        loss_fn: LossFn | None = None,
        plateau_tol: float = 1e-3,
        saddle_tol: float = 1e-2,
        dead_fraction: float = 0.5,
        divergence_factor: float = 1.0,
        symmetry_every_n_steps: int | None = 50,
        log_gradients: bool = True,
        seed: int = 0,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"`monitor` must be a metric name or None, got {monitor!r}.")
        self.monitor = monitor
        self.mode: Mode = check_choice("mode", mode, ("min", "max"))
        self.patience = check_positive_int("patience", patience)
        if warmup_steps is not None:
            check_nonnegative_int("warmup_steps", warmup_steps)
        self.warmup_steps = warmup_steps
        self.check_every_n_steps = check_positive_int("check_every_n_steps", check_every_n_steps)
        self.probe = check_bool("probe", probe)
        self.probe_every_n_steps = check_optional_positive_int(
            "probe_every_n_steps", probe_every_n_steps
        )
        self.lanczos_steps = check_positive_int("lanczos_steps", lanczos_steps)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(
                f"`loss_fn` must be callable as loss_fn(module, batch), got {loss_fn!r}."
            )
        self.loss_fn = loss_fn
        self.plateau_tol = check_positive_float("plateau_tol", plateau_tol)
        self.saddle_tol = check_range("saddle_tol", saddle_tol, 0.0, 1.0)
        self.dead_fraction = check_range("dead_fraction", dead_fraction, 0.0, 1.0, low_open=True)
        self.symmetry_every_n_steps = check_optional_positive_int(
            "symmetry_every_n_steps", symmetry_every_n_steps
        )
        self.log_gradients = check_bool("log_gradients", log_gradients)
        self.seed = check_nonnegative_int("seed", seed)
        self.verbose = check_bool("verbose", verbose)
        # The tracker validates its own arguments here, in the constructor.
        self.tracker = StallTracker(
            mode=self.mode,
            patience=self.patience,
            warmup_steps=self.patience if warmup_steps is None else warmup_steps,
            min_delta=min_delta,
            min_delta_rel=min_delta_rel,
            smoothing=smoothing,
            divergence_factor=divergence_factor,
        )
        self.grads = GradientMonitor() if log_gradients else _SilentMonitor()
        self.diagnoses: list[dict[str, Any]] = []
        self.last_spectrum: Spectrum | None = None
        # The kind diagnosed in the current episode (None once the run improves again): one
        # diagnosis per stall, and a divergence is reported even inside a stall episode.
        self._reported: str | None = None
        self._symmetry_reported = False
        self._samples: list[tuple[int, Tensor | None, Tensor | None]] = []
        self._window_loss: Tensor | None = None
        self._batch_step: int | None = None
        self._log: EscapeLogger | None = None
        self._warned: set[str] = set()
        self._scaled = False

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints: one per ``monitor`` and ``mode``."""
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.grads.setup(trainer, pl_module, stage)
        self._log = EscapeLogger(trainer)
        self._warned = set()
        if self.log_gradients and any(
            isinstance(c, GradientMonitor)
            or (isinstance(c, StallDetector) and c is not self and c.log_gradients)
            for c in getattr(trainer, "callbacks", [])
        ):
            warn_once(
                self._warned,
                f"{type(self).__name__} already logs the gradient statistics that another "
                "GradientMonitor (or detector) in `callbacks` logs too; pass `log_gradients=False` "
                "to one of them to compute them once.",
            )
        # Under a GradScaler, non-finite gradients are routine: the scaler skips those steps.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaled = scaler is not None and scaler.is_enabled()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.grads.on_train_start(trainer, pl_module)
        if self._log is not None:
            self._log.layout(_LAYOUT)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.grads.on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._batch_step = None

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self.grads.on_before_optimizer_step(trainer, pl_module, optimizer)
        self._batch_step = step_index(trainer)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.grads.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.monitor is None:
            loss = _loss_of(outputs)
            if loss is not None:
                # Lightning divides each micro-batch loss by the accumulation count: the sum over
                # an accumulation window is the window's mean loss.
                self._window_loss = loss if self._window_loss is None else self._window_loss + loss
        step = self._batch_step
        if step is None:
            return  # accumulating: no optimizer step in this batch
        value, self._window_loss = self._window_loss, None
        self._samples.append((step, value, self.grads.batch_grad_norm))
        if (step + 1) % self.check_every_n_steps == 0:
            self.check(trainer, pl_module, batch, batch_idx)
        elif self.probe_every_n_steps and (step + 1) % self.probe_every_n_steps == 0:
            self._probe(trainer, pl_module, batch, batch_idx)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.grads.teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------ decisions

    def check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> Diagnosis | None:
        """Read the pending samples back, update the tracker and diagnose a new stall.

        Called from ``on_train_batch_end`` every ``check_every_n_steps``, on every rank.

        Returns:
            The new diagnosis, or None when nothing new was found.
        """
        step = self._batch_step if self._batch_step is not None else step_index(trainer) - 1
        self._read_back(trainer)
        status = self.tracker.status()
        self._log_status(status)
        if status.diverging is not None and (status.nonfinite or self._diagnosing()):
            if self._reported == "diverging":
                return None
            return self._record(trainer, classify(status, metric=self._metric_name()))
        if self._reported == "diverging" and status.diverging is None:
            self._reported = None  # recovered: a stall from here on is news again
        if not self._diagnosing():
            return None
        if not status.stalled:
            self._reported = None
            if self.probe_every_n_steps and (step + 1) % self.probe_every_n_steps == 0:
                self._probe(trainer, pl_module, batch, batch_idx)
            return self._check_symmetry(trainer, pl_module, status, step)
        if self._reported is not None:
            return None
        return self._record(trainer, self.diagnose(trainer, pl_module, batch, batch_idx, status))

    def _check_symmetry(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, status: StallStatus, step: int
    ) -> Diagnosis | None:
        """Look for duplicate units every ``symmetry_every_n_steps``, stalled or not.

        Units with identical weights and identical gradients stay identical forever: that trap
        needs no loss plateau to be real (the loss may creep on for thousands of steps). The check
        uses the gradients of the step just taken (all-reduced, so every rank agrees) and costs
        about one pass over the weights.
        """
        every = self.symmetry_every_n_steps
        if every is None or status.warming_up or (step + 1) % every >= self.check_every_n_steps:
            return None
        if self._probe_unavailable(trainer, pl_module) is not None:
            return None
        grads = {
            p: p.grad for p in pl_module.parameters() if p.requires_grad and p.grad is not None
        }
        symmetric = self._symmetric_groups(pl_module, grads)
        if not symmetric:
            self._symmetry_reported = False
            return None
        if self._symmetry_reported:
            return None
        self._symmetry_reported = True
        return self._record(
            trainer, classify(status, symmetric=symmetric, metric=self._metric_name())
        )

    def _symmetric_groups(
        self, pl_module: pl.LightningModule, grads: dict[Any, Tensor]
    ) -> list[SymmetricEvidence]:
        """Duplicate units of trainable layers (frozen ones cannot be escaped, so they are not news)."""
        generator = torch.Generator().manual_seed(self.seed)
        groups = find_symmetric_units(pl_module, grads, generator=generator)
        trainable = []
        for g in groups:
            weight = getattr(pl_module.get_submodule(g.layer), "weight", None)
            if isinstance(weight, Tensor) and weight in grads:
                trainable.append(SymmetricEvidence(g.layer, len(g.units), g.out_features))
        return trainable

    def _diagnosing(self) -> bool:
        """Whether stalls are diagnosed now (subclasses pause it while they act)."""
        return True

    def diagnose(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        status: StallStatus,
    ) -> Diagnosis:
        """Gather the evidence about a declared stall on ``batch`` and classify it."""
        symmetric, dead = self._unit_evidence(trainer, pl_module, batch, batch_idx)
        curvature: CurvatureEvidence | None = None
        note: str | None = None
        if not self.probe:
            note = "the curvature probe is off (`probe=False`)"
        else:
            spectrum, note = self._probe(trainer, pl_module, batch, batch_idx)
            if spectrum is not None:
                curvature = CurvatureEvidence(
                    lambda_max=spectrum.lambda_max,
                    lambda_min=spectrum.lambda_min,
                    lr=_learning_rate(trainer),
                    grad_norm=spectrum.grad_norm,
                )
        return classify(
            status,
            curvature=curvature,
            curvature_note=note,
            symmetric=symmetric,
            dead=dead,
            plateau_tol=self.plateau_tol,
            saddle_tol=self.saddle_tol,
            dead_fraction=self.dead_fraction,
            metric=self._metric_name(),
        )

    def _metric_name(self) -> str:
        return self.monitor or "loss"

    def _read_back(self, trainer: pl.Trainer) -> None:
        """One host read of the pending samples (averaged over ranks); feed them to the tracker."""
        samples, self._samples = self._samples, []
        if self.monitor is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                available = ", ".join(sorted(trainer.callback_metrics)) or "none"
                warn_once(
                    self._warned,
                    f"StallDetector could not find `{self.monitor}` in the logged metrics "
                    f"(available: {available}); it stays passive until the metric appears.",
                )
            elif samples:
                step, _, grad = samples[-1]
                samples[-1] = (step, torch.as_tensor(value).detach().float(), grad)
        if not samples:
            return
        zero = torch.zeros((), dtype=torch.float64)
        device = next(
            (t.device for _, v, g in samples for t in (v, g) if t is not None), zero.device
        )

        def cell(t: Tensor | None) -> list[Tensor]:
            # (value, missing): a placeholder 0 keeps true NaNs apart from absent values.
            if t is None:
                return [zero.to(device), torch.ones((), dtype=torch.float64, device=device)]
            return [t.to(device, torch.float64).reshape(()), zero.to(device)]

        table = torch.stack([torch.stack([*cell(v), *cell(g)]) for _, v, g in samples])
        if trainer.world_size > 1:
            table = trainer.strategy.reduce(table, reduce_op="mean")
        for (step, _, _), (v, v_missing, g, g_missing) in zip(samples, table.tolist()):
            # The missing flags are averaged too: a value counts only if every rank had one. A
            # non-finite gradient under a GradScaler is a skipped step, not a divergence.
            skipped = self._scaled and not math.isfinite(g)
            grad = None if g_missing > 0 or skipped else g
            self.tracker.update(step, None if v_missing > 0 else v, grad)
        if self.monitor is None and all(v is None for _, v, _ in samples):
            warn_once(
                self._warned,
                "StallDetector found no loss in what `training_step` returned (a tensor or a dict "
                "with 'loss'); pass `monitor=` with a metric you log. It stays passive until then.",
            )

    def _record(self, trainer: pl.Trainer, diagnosis: Diagnosis) -> Diagnosis:
        self._reported = diagnosis.kind
        self.diagnoses.append(diagnosis.to_dict())
        if self._log is not None:
            self._log.text(
                f"{PREFIX}/diagnosis",
                f"**{diagnosis.kind}** at step {diagnosis.step}: {diagnosis.reason}",
                diagnosis.step,
            )
            self._log.scalars(
                {f"{PREFIX}/diagnosis_kind": float(KINDS.index(diagnosis.kind))}, diagnosis.step
            )
        if self.verbose:
            rank_zero_info(
                f"[{type(self).__name__}] step {diagnosis.step}: {diagnosis.kind}: "
                f"{diagnosis.reason}"
            )
        return diagnosis

    def _log_status(self, status: StallStatus) -> None:
        if self._log is None:
            return
        values = {
            f"{PREFIX}/monitored": status.smoothed,
            f"{PREFIX}/stall_score": status.score,
            f"{PREFIX}/grad_ratio": status.grad_ratio,
        }
        self._log.scalars({k: v for k, v in values.items() if math.isfinite(v)}, status.step)

    # ------------------------------------------------------------------ evidence

    def _reduce(self, trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
        if trainer.world_size <= 1:
            return None
        strategy = trainer.strategy

        def mean(t: Tensor) -> Tensor:
            return torch.as_tensor(strategy.reduce(t, reduce_op="mean"))

        return mean

    def _probe_unavailable(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        """Why the probe cannot run here (the same answer on every rank), or None."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            return f"the curvature probe does not support {type(trainer.strategy).__name__}"
        if self.loss_fn is None and not pl_module.automatic_optimization:
            return "the curvature probe needs `loss_fn` under manual optimization"
        return None

    def _probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> tuple[Spectrum | None, str | None]:
        """Run the curvature probe on ``batch``; log the eigenvalues. Returns (spectrum, note)."""
        note = self._probe_unavailable(trainer, pl_module)
        if note is not None:
            warn_once(self._warned, f"{note}; stall diagnosis falls back to the other evidence.")
            return None, note
        try:
            spectrum = probe_curvature(
                pl_module,
                batch,
                loss_fn=self.loss_fn,
                batch_idx=batch_idx,
                steps=self.lanczos_steps,
                seed=self.seed,
                reduce=self._reduce(trainer),
            )
        except ProbeUnavailable as err:
            # Raised alike on every rank: its causes are the module and the (reduced) numbers.
            warn_once(self._warned, f"The curvature probe cannot run: {err}")
            return None, f"the curvature probe could not run ({err})"
        self.last_spectrum = spectrum
        if self._log is not None:
            step = self._batch_step if self._batch_step is not None else step_index(trainer)
            self._log.scalars(
                {
                    f"{PREFIX}/lambda_max": spectrum.lambda_max,
                    f"{PREFIX}/lambda_min": spectrum.lambda_min,
                },
                step,
            )
        return spectrum, None

    def _unit_evidence(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> tuple[list[SymmetricEvidence], list[DeadEvidence]]:
        """Duplicate and dead units, from one forward and backward pass on ``batch``."""
        if self._probe_unavailable(trainer, pl_module) is not None:
            return [], []
        params = [p for p in pl_module.parameters() if p.requires_grad]
        reduce = self._reduce(trainer)
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            preserved(pl_module, seed=self.seed),
            record_unit_activity(pl_module) as activity,
        ):
            loss: Tensor | None
            if self.loss_fn is not None:
                loss = self.loss_fn(pl_module, batch)
            else:
                loss = loss_from_training_step(pl_module, batch, batch_idx)
            if not isinstance(loss, Tensor) or not loss.requires_grad:
                return [], []
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        filled = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if reduce is not None:
            filled = unflatten(reduce(flatten(filled)), params)
        symmetric = self._symmetric_groups(pl_module, dict(zip(params, filled)))
        dead_units = activity.dead_units()
        if reduce is not None and dead_units:
            counts = torch.tensor([float(d.dead) for d in dead_units], device=params[0].device)
            # ranks saw different batches: they agree on the mean count
            counts = reduce(counts)
            dead = [
                DeadEvidence(d.layer, round(c), d.total)
                for d, c in zip(dead_units, counts.tolist())
            ]
        else:
            dead = [DeadEvidence(d.layer, d.dead, d.total) for d in dead_units]
        return symmetric, dead

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        pending = [
            [step, None if v is None else v.detach().cpu(), None if g is None else g.detach().cpu()]
            for step, v, g in self._samples
        ]
        return {
            "tracker": self.tracker.state_dict(),
            "diagnoses": [dict(d) for d in self.diagnoses],
            "reported": self._reported,
            "symmetry_reported": self._symmetry_reported,
            "pending": pending,
            "window_loss": None if self._window_loss is None else self._window_loss.detach().cpu(),
            "grads": self.grads.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict["tracker"])
        self.diagnoses = [dict(d) for d in state_dict.get("diagnoses", [])]
        self._reported = state_dict.get("reported")
        self._symmetry_reported = bool(state_dict.get("symmetry_reported", False))
        self._samples = [(int(s), v, g) for s, v, g in state_dict.get("pending", [])]
        self._window_loss = state_dict.get("window_loss")
        self.grads.load_state_dict(state_dict.get("grads", {}))


class _SilentMonitor(GradientMonitor):
    """A gradient monitor that computes the norm every step but never logs."""

    def __init__(self) -> None:
        super().__init__(per_layer=False, update_ratios=False, noise_scale=False)

    @override
    def is_logging_step(self, step: int) -> bool:
        return False


def _loss_of(outputs: Any) -> Tensor | None:
    """The loss in what ``training_step`` returned (a tensor or a mapping with "loss")."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if isinstance(loss, Tensor) and loss.numel() == 1:
        return loss.detach().float().reshape(())
    return None


def _learning_rate(trainer: pl.Trainer) -> float:
    """The learning rate of the first parameter group of the first optimizer (NaN if none)."""
    if not trainer.optimizers:
        return math.nan
    lr = trainer.optimizers[0].param_groups[0].get("lr", math.nan)
    return float(lr)


_LAYOUT = {
    "escape: stall": {
        "monitored value (smoothed)": ["Multiline", [rf"^{PREFIX}/monitored$"]],
        "stall score (>= 1 is a stall)": ["Multiline", [rf"^{PREFIX}/stall_score$"]],
        "gradient norm / its running level": ["Multiline", [rf"^{PREFIX}/grad_ratio$"]],
        "diagnosis (index in KINDS)": ["Multiline", [rf"^{PREFIX}/diagnosis_kind$"]],
    },
    "escape: curvature": {
        "extreme Hessian eigenvalues": ["Multiline", [rf"^{PREFIX}/lambda_(max|min)$"]],
    },
}
