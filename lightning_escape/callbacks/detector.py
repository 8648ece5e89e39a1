"""StallDetector: the smoke alarm. Watches, diagnoses and logs; never changes the run."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_escape._lightning import log_dir, step_index, warn_once
from lightning_escape._validation import (
    check_bool,
    check_choice,
    check_nonnegative_int,
    check_positive_int,
)
from lightning_escape.callbacks._grads import GradReader, StepNorms
from lightning_escape.callbacks._watcher import Batch, Watcher
from lightning_escape.callbacks.monitor import GradientMonitor
from lightning_escape.curvature import Spectrum
from lightning_escape.detectors import (
    Check,
    DeadEvidence,
    Diagnosis,
    Mode,
    StallStatus,
    StallTracker,
    SymmetricEvidence,
    classify,
)
from lightning_escape.diagnosis import Reduce, StallClassifier
from lightning_escape.logging import STALL, EscapeLogger, describe_facts, progress_bar
from lightning_escape.probe import ProbeUnavailable

__all__ = ["StallDetector"]


class StallDetector(Watcher):
    r"""Detect that training is stuck, diagnose what kind of stuck, and log why.

    Every optimizer step it records, on the device, the monitored value (the training loss returned
    by ``training_step`` by default) and the gradient norms: one fused norm launch and an append.
    Every ``check_every_n_steps`` it reads them back once (averaged across processes, so every rank
    decides alike) and feeds a :class:`~lightning_escape.detectors.StallTracker`. When the tracker
    declares a stall, its :class:`~lightning_escape.StallClassifier` gathers evidence on the current
    batch and names the stall:

    - a curvature probe (Lanczos on Hessian-vector products) for the largest and smallest Hessian
      eigenvalues; it runs only when a stall is suspected (and, optionally, every
      ``probe_every_n_steps``) and leaves parameters, gradients, buffers, RNG state and logged
      metrics exactly as they were;
    - duplicate hidden units (identical incoming weights and gradients) and dead ReLU units.

    Each diagnosis is a :class:`~lightning_escape.detectors.Diagnosis` appended to :attr:`diagnoses`,
    logged as a TensorBoard text event, and a new one is made only after the run has improved again
    (or has diverged).

    Args:
        monitor: A metric logged with ``self.log`` to watch instead of the training loss (read at
            each check from ``trainer.callback_metrics``).
        mode: ``"min"`` if lower is better, ``"max"`` if higher is better.
        patience: Optimizer steps without significant improvement that make a stall. Unlike
            ``EarlyStopping``'s, it counts optimizer steps, not checks.
        warmup_steps: Steps at the start with no decisions; ``None`` for ``patience``.
        min_delta: Absolute improvement that counts; ``None`` for ``1e-6`` times the first value.
        min_delta_rel: Improvement that counts, relative to the best value.
        smoothing: EMA decay of the monitored value per sample (every step for the training loss,
            every check for a ``monitor`` metric), in ``[0, 1)``.
        check_every_n_steps: Read values back and decide every this many optimizer steps.
        classifier: How a stall is named: the curvature probe, its tolerances, the divergence rule,
            the seed (``None`` for :class:`~lightning_escape.StallClassifier`'s defaults).
        gradients: ``True`` logs the gradient statistics with a default
            :class:`~lightning_escape.GradientMonitor`, a ``GradientMonitor`` logs them with its
            settings, ``False`` only measures the gradient norm.
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
        classifier: StallClassifier | None = None,
        gradients: GradientMonitor | bool = True,
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
        if classifier is not None and not isinstance(classifier, StallClassifier):
            raise ValueError(f"`classifier` must be a StallClassifier or None, got {classifier!r}.")
        self.classifier = StallClassifier() if classifier is None else classifier
        if not isinstance(gradients, (bool, GradientMonitor)):
            raise ValueError(f"`gradients` must be a bool or a GradientMonitor, got {gradients!r}.")
        self.gradients = GradientMonitor() if gradients is True else gradients or None
        self.verbose = check_bool("verbose", verbose)
        # The tracker validates its own arguments here, in the constructor.
        self.tracker = StallTracker(
            mode=self.mode,
            patience=self.patience,
            warmup_steps=self.patience if warmup_steps is None else warmup_steps,
            min_delta=min_delta,
            min_delta_rel=min_delta_rel,
            smoothing=smoothing,
            divergence_factor=self.classifier.divergence_factor,
        )
        self.diagnoses: list[Diagnosis] = []
        self.last_spectrum: Spectrum | None = None
        # The kind diagnosed in the current episode (None once the run improves again): one
        # diagnosis per stall, and a divergence is reported even inside a stall episode.
        self._reported: str | None = None
        self._symmetry_reported = False
        self._grads = GradReader()
        self._norms = StepNorms()
        self._values: list[tuple[int, Tensor | None]] = []
        self._window_loss: Tensor | None = None
        self._batch_step: int | None = None
        self._log: EscapeLogger | None = None
        self._warned: set[str] = set()
        self._scaled = False
        self._sharded = False
        self._log_dir: str | None = None

    def __repr__(self) -> str:
        watched = self.monitor or "training loss"
        return (
            f"{type(self).__name__}({watched}, mode={self.mode!r}, patience={self.patience}, "
            f"{len(self.diagnoses)} diagnoses)"
        )

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints: one per ``monitor`` and ``mode``."""
        # Lightning reads it around every hook call (to name profiler sections): build it once.
        key: str | None = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = self._generate_state_key(
                monitor=self.monitor, mode=self.mode
            )
        return key

    @property
    def last_step(self) -> int | None:
        """Index of the optimizer step taken in the current batch; None while accumulating."""
        return self._batch_step

    @property
    def metric_name(self) -> str:
        """The monitored value's name in sentences."""
        return self.monitor or "loss"

    # ------------------------------------------------------------------ the detector's steps
    # Its hooks (see Watcher) only call these; EscapeCallback, which holds a detector, calls them too.

    @override
    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Begin a fit from scratch: the logger, the gradient reader, the precision's conventions.

        What an earlier fit found is forgotten; a resumed fit gets it back from the checkpoint
        (Lightning loads callback state after ``setup``).
        """
        self.reset()
        if self.gradients is not None:
            self.gradients.attach(trainer, pl_module)
        self._grads.attach(trainer, pl_module)
        self._log = EscapeLogger(trainer)
        self._log_dir = log_dir(trainer)
        self._warned = set()
        if self.gradients is not None and any(
            _logs_gradients(c)
            and c is not self
            and c is not self.gradients
            and getattr(c, "detector", None) is not self
            for c in getattr(trainer, "callbacks", [])
        ):
            warn_once(
                self._warned,
                f"{type(self).__name__} already logs the gradient statistics that another "
                "GradientMonitor (or detector) in `callbacks` logs too; pass `gradients=False` "
                "to one of them to compute them once.",
            )
        # Under a GradScaler, non-finite gradients are routine: the scaler skips those steps.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaled = scaler is not None and scaler.is_enabled()
        from lightning.pytorch.strategies import FSDPStrategy

        self._sharded = isinstance(trainer.strategy, FSDPStrategy)

    @override
    def start(self, trainer: pl.Trainer) -> None:
        """Training starts: write the TensorBoard layout."""
        if self._log is not None:
            self._log.layout(_LAYOUT)
        if self.gradients is not None:
            self.gradients.start(trainer)

    @override
    def start_batch(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        """A batch starts."""
        if self.gradients is not None:
            self.gradients.start_batch(trainer, batch, batch_idx)
        self._batch_step = None

    @override
    def observe(self, trainer: pl.Trainer, optimizer: Optimizer, step: int | None = None) -> None:
        """Every optimizer step: record the gradient norms on the device (no host read).

        Args:
            trainer: The trainer.
            optimizer: The optimizer about to step.
            step: The optimizer step's index, if the caller has it already.
        """
        step = step_index(trainer) if step is None else step
        if self.gradients is not None:
            norms, scale = self.gradients.observe(trainer, optimizer, step)
        else:
            norms = self._grads.norms(optimizer)
            scale = self._grads.scale(trainer, optimizer)
        self._norms.add(step, norms, scale)
        self._batch_step = step

    @override
    def end_batch(self, batch: Batch, *, diagnose: bool = True) -> Check | None:
        """A batch ends: record the loss; at a check, read back and decide.

        Args:
            batch: The batch that ended (the probe's batch, should a stall be diagnosed).
            diagnose: Whether new stalls are diagnosed at this check; a caller that is judging
                an escape passes False (divergence is reported all the same).

        Returns:
            What the check found, at a check; None between checks.
        """
        if self.gradients is not None:
            self.gradients.end_batch(batch)
        if self.monitor is None:
            loss = _loss_of(batch.outputs)
            if loss is not None:
                # Lightning divides each micro-batch loss by the accumulation count: the sum over
                # an accumulation window is the window's mean loss.
                self._window_loss = loss if self._window_loss is None else self._window_loss + loss
        step = self._batch_step
        if step is None:
            return None  # accumulating: no optimizer step in this batch
        value, self._window_loss = self._window_loss, None
        self._values.append((step, value))
        if (step + 1) % self.check_every_n_steps == 0:
            return self.check(batch, diagnose=diagnose)
        every = self.classifier.probe_every_n_steps
        if every and (step + 1) % every == 0:
            self._probe(batch)
        return None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(self.summary_text())

    def summary(self) -> dict[str, Any]:
        """What was found so far, as plain values: the facts of the summary at the end of fit.

        Returns:
            ``stalls`` (diagnoses per kind), ``steps`` (the last optimizer step read, plus one)
            and ``log_dir`` (where the logs are, or None).
        """
        return {
            "stalls": dict(Counter(d.kind for d in self.diagnoses)),
            "steps": self.tracker.status().step + 1,
            "log_dir": self._log_dir,
        }

    def summary_text(self) -> str:
        """:meth:`summary` as the paragraph logged at the end of fit."""
        return f"{type(self).__name__}: {describe_facts(self.summary())}"

    @override
    def detach(self) -> None:
        """End a fit: flush the logs; hold on to nothing of the run (findings stay)."""
        if self.gradients is not None:
            self.gradients.detach()
        self._log = None
        self._norms.clear()
        self._grads.clear()
        self.release_eigenvector()

    def release_eigenvector(self) -> None:
        """Drop the probe's eigenvector (one parameter-sized vector), keep the eigenvalues.

        It serves the escape chosen right after the diagnosis; kept any longer it would add a
        copy of the parameters to what a trial on probation (which holds a snapshot) costs.
        """
        spectrum = self.last_spectrum
        if spectrum is not None and spectrum.eigvec_min:
            self.last_spectrum = dataclasses.replace(spectrum, eigvec_min=[])

    def reset(self) -> None:
        """Forget every finding: the tracker's samples, the diagnoses, what is pending."""
        self.tracker.reset()
        self.diagnoses = []
        self.last_spectrum = None
        self._reported = None
        self._symmetry_reported = False
        self._values = []
        self._norms.clear()
        self._window_loss = None
        self._batch_step = None

    # ------------------------------------------------------------------ decisions

    def check(self, batch: Batch, *, diagnose: bool = True) -> Check:
        """Read the pending samples back, update the tracker and diagnose a new stall.

        Runs every ``check_every_n_steps``, on every rank alike.
        """
        step = self._batch_step if self._batch_step is not None else step_index(batch.trainer) - 1
        best_before = self.tracker.status().best
        first = self._values[0][0] if self._values else None
        self.read_back(batch.trainer)
        status = self.tracker.status()
        last_bad = self.tracker.last_nonfinite_step
        reported = status.nonfinite and self._reported == "diverging"
        if reported and first is not None and last_bad is not None and last_bad < first:
            # Reported at an earlier check, and every sample read since is finite: the run
            # recovered (a one-off NaN batch), so stalls are diagnosed again.
            self.tracker.recovered()
            status = self.tracker.status()
        diagnosis = self._decide(batch, status, step, diagnose)
        self._log_status(status, diagnosed=diagnosis is not None)
        # In the progress bar: how close the run is to a stall (1.0 is one).
        progress_bar(batch.module, "stall", min(status.score, 99.0))
        improved = status.best != best_before and math.isfinite(status.best)
        return Check(status, diagnosis, improved, self._reported)

    def _decide(
        self, batch: Batch, status: StallStatus, step: int, diagnose: bool
    ) -> Diagnosis | None:
        if status.diverging is not None and (status.nonfinite or diagnose):
            if self._reported == "diverging":
                return None
            return self._record(classify(status, metric=self.metric_name))
        if self._reported == "diverging" and status.diverging is None:
            self._reported = None  # recovered: a stall from here on is news again
        if not diagnose:
            return None
        if not status.stalled:
            self._reported = None
            every = self.classifier.probe_every_n_steps
            if every and (step + 1) % every == 0:
                self._probe(batch)
            return self._check_symmetry(batch, status, step)
        if self._reported is not None:
            return None
        return self._record(self.diagnose(batch, status))

    def _check_symmetry(self, batch: Batch, status: StallStatus, step: int) -> Diagnosis | None:
        """Look for duplicate units every ``symmetry_every_n_steps``, stalled or not.

        The check uses the gradients of the step just taken (all-reduced, so every rank agrees)
        and costs about one pass over the weights.
        """
        every = self.classifier.symmetry_every_n_steps
        if every is None or status.warming_up or (step + 1) % every >= self.check_every_n_steps:
            return None
        module = batch.module
        if self.probe_unavailable(batch.trainer, module) is not None:
            return None
        grads = {p: p.grad for p in module.parameters() if p.requires_grad and p.grad is not None}
        symmetric = self.classifier.symmetric_units(module, grads)
        if not symmetric:
            self._symmetry_reported = False
            return None
        if self._symmetry_reported:
            return None
        self._symmetry_reported = True
        return self._record(classify(status, symmetric=symmetric, metric=self.metric_name))

    def diagnose(self, batch: Batch, status: StallStatus) -> Diagnosis:
        """Gather the evidence about a declared stall on ``batch`` and classify it."""
        symmetric: list[SymmetricEvidence] = []
        dead: list[DeadEvidence] = []
        trainer = batch.trainer
        if self.probe_unavailable(trainer, batch.module) is None:
            symmetric, dead = self.classifier.unit_evidence(
                batch.module, batch.data, batch.idx, self.reduce(trainer)
            )
        spectrum: Spectrum | None = None
        if not self.classifier.probe:
            note: str | None = "the curvature probe is off (`probe=False`)"
        else:
            spectrum, note = self._probe(batch)
        return self.classifier.classify(
            status,
            spectrum=spectrum,
            lr=_learning_rate(trainer),
            curvature_note=note,
            symmetric=symmetric,
            dead=dead,
            metric=self.metric_name,
        )

    def read_back(self, trainer: pl.Trainer) -> None:
        """One host read of the pending samples (averaged over ranks); feed them to the tracker."""
        values, self._values = self._values, []
        grads = dict(self._norms.pop())
        if self.monitor is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                available = ", ".join(sorted(trainer.callback_metrics)) or "none"
                warn_once(
                    self._warned,
                    f"StallDetector could not find `{self.monitor}` in the logged metrics "
                    f"(available: {available}); it stays passive until the metric appears.",
                )
            elif values:
                values[-1] = (values[-1][0], torch.as_tensor(value).detach().float())
        samples = _reduced_samples(trainer, values, grads, sharded=self._sharded)
        for step, sample, grad in samples:
            # A non-finite gradient under a GradScaler is a skipped step, not a divergence.
            skipped = self._scaled and grad is not None and not math.isfinite(grad)
            self.tracker.update(step, sample, None if skipped else grad)
        if self.monitor is None and values and all(v is None for _, v in values):
            warn_once(
                self._warned,
                "StallDetector found no loss in what `training_step` returned (a tensor or a dict "
                "with 'loss'); pass `monitor=` with a metric you log. It stays passive until then.",
            )

    def _record(self, diagnosis: Diagnosis) -> Diagnosis:
        self._reported = diagnosis.kind
        self.diagnoses.append(diagnosis)
        if self._log is not None:
            self._log.text(
                f"{STALL}/diagnosis",
                f"**{diagnosis.kind}** at step {diagnosis.step}: {diagnosis.reason}",
                diagnosis.step,
            )
        if self.verbose:
            rank_zero_info(
                f"[{type(self).__name__}] step {diagnosis.step}: {diagnosis.kind}: "
                f"{diagnosis.reason}"
            )
        return diagnosis

    def _log_status(self, status: StallStatus, diagnosed: bool) -> None:
        if self._log is None:
            return
        values = {
            f"{STALL}/monitored": status.smoothed,
            f"{STALL}/score": status.score,
            f"{STALL}/grad_ratio": status.grad_ratio,
            # A marker, not a level: 1 at the check that made a diagnosis (its kind is the text
            # event of the same step), 0 at every other check.
            f"{STALL}/diagnosis": 1.0 if diagnosed else 0.0,
        }
        self._log.scalars({k: v for k, v in values.items() if math.isfinite(v)}, status.step)

    # ------------------------------------------------------------------ rollback support

    def rollback_state(self) -> dict[str, Any]:
        """What an exact rollback restores of the detector (plain values)."""
        return {"tracker": self.tracker.state_dict(), "reported": self._reported}

    def roll_back(self, state: dict[str, Any]) -> None:
        """Restore :meth:`rollback_state`: the run is back where it was, but the clock is not."""
        now = self.tracker.status().step
        self.tracker.load_state_dict(state["tracker"])
        self.tracker.advance_to(now)
        self._reported = state["reported"]

    def restart_window(self, step: int) -> None:
        """The run changed course at ``step`` (an escape was kept): a new stall window starts."""
        self.tracker.mark_improved(step)
        self._reported = None

    # ------------------------------------------------------------------ evidence

    @staticmethod
    def reduce(trainer: pl.Trainer) -> Reduce:
        """A function that averages a tensor over the processes; None on one process."""
        if trainer.world_size <= 1:
            return None
        strategy = trainer.strategy

        def mean(t: Tensor) -> Tensor:
            return torch.as_tensor(strategy.reduce(t, reduce_op="mean"))

        return mean

    def probe_unavailable(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        """Why the probe cannot run here (the same answer on every rank), or None."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            return f"the curvature probe does not support {type(trainer.strategy).__name__}"
        if self.classifier.loss_fn is None and not pl_module.automatic_optimization:
            return "the curvature probe needs `loss_fn` under manual optimization"
        return None

    def _probe(self, batch: Batch) -> tuple[Spectrum | None, str | None]:
        """Run the curvature probe on ``batch``; log the eigenvalues. Returns (spectrum, note)."""
        trainer = batch.trainer
        note = self.probe_unavailable(trainer, batch.module)
        if note is not None:
            warn_once(self._warned, f"{note}; stall diagnosis falls back to the other evidence.")
            return None, note
        try:
            spectrum = self.classifier.spectrum(
                batch.module, batch.data, batch.idx, self.reduce(trainer)
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
                    f"{STALL}/lambda_max": spectrum.lambda_max,
                    f"{STALL}/lambda_min": spectrum.lambda_min,
                },
                step,
            )
        return spectrum, None

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        grads = dict(self._norms.totals())
        pending = [
            [
                step,
                None if v is None else v.detach().cpu(),
                None if step not in grads else grads[step].detach().cpu(),
            ]
            for step, v in self._values
        ]
        return {
            "tracker": self.tracker.state_dict(),
            "diagnoses": [d.to_dict() for d in self.diagnoses],
            "reported": self._reported,
            "symmetry_reported": self._symmetry_reported,
            "pending": pending,
            "window_loss": None if self._window_loss is None else self._window_loss.detach().cpu(),
            "gradients": {} if self.gradients is None else self.gradients.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict["tracker"])
        self.diagnoses = [Diagnosis.from_dict(d) for d in state_dict.get("diagnoses", [])]
        self._reported = state_dict.get("reported")
        self._symmetry_reported = bool(state_dict.get("symmetry_reported", False))
        self._values = []
        self._norms.clear()
        for step, value, grad in state_dict.get("pending", []):
            self._values.append((int(step), value))
            if grad is not None:
                self._norms.add(int(step), [grad])
        self._window_loss = state_dict.get("window_loss")
        if self.gradients is not None:
            self.gradients.load_state_dict(state_dict.get("gradients", {}))


def _reduced_samples(
    trainer: pl.Trainer,
    values: list[tuple[int, Tensor | None]],
    grads: dict[int, Tensor],
    *,
    sharded: bool,
) -> list[tuple[int, float | None, float | None]]:
    """``(step, value, grad norm)`` per sample, averaged over processes with one host read.

    A value or a norm counts only if every process had one (None otherwise); under FSDP each
    process holds a shard of every gradient, so the squared norms are summed instead.
    """
    if not values:
        return []
    zero = torch.zeros((), dtype=torch.float64)
    device = next(
        (t.device for s, v in values for t in (v, grads.get(s)) if t is not None), zero.device
    )

    def cell(t: Tensor | None) -> list[Tensor]:
        # (value, missing): a placeholder 0 keeps true NaNs apart from absent values.
        if t is None:
            return [zero.to(device), torch.ones((), dtype=torch.float64, device=device)]
        return [t.to(device, torch.float64).reshape(()), zero.to(device)]

    def grad_cell(step: int) -> list[Tensor]:
        g = grads.get(step)
        return cell(g.square() if g is not None and sharded else g)

    table = torch.stack([torch.stack([*cell(v), *grad_cell(s)]) for s, v in values])
    if trainer.world_size > 1:
        table = trainer.strategy.reduce(table, reduce_op="mean")  # the missing flags too
    if sharded:
        table[:, 2] = (table[:, 2] * trainer.world_size).sqrt()  # mean of squares -> norm
    return [
        (step, None if v_missing > 0 else v, None if g_missing > 0 else g)
        for (step, _), (v, v_missing, g, g_missing) in zip(values, table.tolist())
    ]


def _logs_gradients(callback: Any) -> bool:
    """Whether ``callback`` logs gradient statistics (a monitor, or a detector holding one)."""
    if isinstance(callback, GradientMonitor):
        return True
    detector = (
        callback if isinstance(callback, StallDetector) else getattr(callback, "detector", None)
    )
    return isinstance(detector, StallDetector) and detector.gradients is not None


def _loss_of(outputs: Any) -> Tensor | None:
    """The loss in what ``training_step`` returned (a tensor or a mapping with "loss")."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        return None
    # Each call below costs a dispatch on every step: make only the ones that change something.
    if loss.requires_grad:
        loss = loss.detach()
    if loss.dtype != torch.float32:
        loss = loss.float()
    return loss if loss.dim() == 0 else loss.reshape(())


def _learning_rate(trainer: pl.Trainer) -> float:
    """The learning rate of the first parameter group of the first optimizer (NaN if none)."""
    groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
    # Without `configure_optimizers`, Lightning's stand-in optimizer has no parameter group.
    return float(groups[0].get("lr", math.nan)) if groups else math.nan


_LAYOUT = {
    STALL: {
        "monitored value (smoothed)": ["Multiline", [rf"^{STALL}/monitored$"]],
        "stall score (>= 1 is a stall)": ["Multiline", [rf"^{STALL}/score$"]],
        "gradient norm / its running level": ["Multiline", [rf"^{STALL}/grad_ratio$"]],
        "diagnoses (1 at each; the kind is in the text tab)": [
            "Multiline",
            [rf"^{STALL}/diagnosis$"],
        ],
        "extreme Hessian eigenvalues (where probed)": [
            "Multiline",
            [rf"^{STALL}/lambda_(max|min)$"],
        ],
    },
}
