"""StallDetector: the smoke alarm. Watches, diagnoses and logs; never changes the run."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, deque
from collections.abc import Sequence
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
    check_optional_finite_float,
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
    RecurrentEvidence,
    StallStatus,
    StallTracker,
    SymmetricEvidence,
    classify,
)
from lightning_escape.diagnosis import Reduce, StallClassifier
from lightning_escape.logging import (
    PROGRESS_BAR_FIELDS,
    STALL,
    EscapeLogger,
    describe_facts,
    progress_bar,
)
from lightning_escape.probe import ProbeUnavailable
from lightning_escape.progress import DriftMeter, Motion
from lightning_escape.signal_flow import SignalFade

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
        monitor: A metric logged with ``self.log`` to watch instead of the training loss, read
            from ``trainer.callback_metrics`` only when it holds a value measured since the last
            one taken. A metric logged at validation (``val_loss``) is taken at the end of each
            validation of the fit (not the sanity check), as the value after the optimizer step
            just taken, and used before the next training batch (see :meth:`start_batch`; an
            escape on probation is judged on it at the validation's end, one inside an
            accumulation window where the next window begins); between two validations no
            stall is declared and no escape judged, while gradient norms are still read at
            every check (a non-finite one is a divergence at once). A training metric is taken
            at each check where it was logged anew: every check for one logged per step, the
            first check after each epoch for one logged per epoch. Patience and probation count
            optimizer steps.
            Log it on every process (as ``self.log`` does); with ``sync_dist=True`` every process
            reads the same value, otherwise they are averaged.
        mode: ``"min"`` if lower is better, ``"max"`` if higher is better.
        strict: What if ``monitor`` is not among the logged metrics where it must be, with
            ``EarlyStopping``'s rule: at the end of the first epoch if validation runs once at
            the end of every epoch (``val_check_interval=1.0``, ``check_val_every_n_epoch=1``,
            also when no validation runs), else at the end of the first validation. ``True``
            raises a ``RuntimeError`` naming the metrics there are; ``False`` warns once and the
            detector stays passive until the metric appears. Before that point a missing metric
            is expected (not yet validated) and says nothing.
        patience: Optimizer steps without significant improvement that make a stall. Unlike
            ``EarlyStopping``'s, it counts optimizer steps, not checks.
        warmup_steps: Steps at the start with no decisions; ``None`` for ``patience``.
        min_delta: Absolute improvement that counts; ``None`` for ``1e-6`` times the first value.
        min_delta_rel: Improvement that counts, relative to the best value.
        smoothing: EMA decay of the monitored value, in ``[0, 1)``: per sample for the training
            loss (every step) and a ``monitor`` metric logged in training (every fresh value), per
            optimizer step for a metric logged at validation (a value ``k`` steps after the one
            before it decays the average by ``smoothing ** k``: whole-set values measured every
            few hundred steps are used nearly as they are, as ``EarlyStopping`` does).
        check_every_n_steps: Read values back and decide every this many optimizer steps.
        target: The monitored value that is good enough: once its best reaches it, a stall is
            diagnosed ``converged`` and nothing is escaped (``None``: no target; a run can still
            be diagnosed ``converged`` on a floor, see :func:`~lightning_escape.detectors.classify`).
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
        strict: bool = True,
        patience: int = 200,
        warmup_steps: int | None = None,
        min_delta: float | None = None,
        min_delta_rel: float = 1e-3,
        smoothing: float = 0.95,
        check_every_n_steps: int = 10,
        target: float | None = None,
        classifier: StallClassifier | None = None,
        gradients: GradientMonitor | bool = True,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"`monitor` must be a metric name or None, got {monitor!r}.")
        self.monitor = monitor
        self.mode: Mode = check_choice("mode", mode, ("min", "max"))
        if monitor is None and self.mode == "max":
            raise ValueError(
                "`mode='max'` watches for a value that should rise, but `monitor=None` watches "
                "the training loss, which falls: pass `monitor=` the metric to maximise, or "
                "leave `mode='min'`."
            )
        self.strict = check_bool("strict", strict)
        self.patience = check_positive_int("patience", patience)
        if warmup_steps is not None:
            check_nonnegative_int("warmup_steps", warmup_steps)
        self.warmup_steps = warmup_steps
        self.check_every_n_steps = check_positive_int("check_every_n_steps", check_every_n_steps)
        self.target = check_optional_finite_float("target", target)
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
        # With `monitor`, the loss `training_step` returns too: a stall of the monitored metric
        # while the training loss still improves is not the optimizer's (see `_training_improves`).
        self.training = StallTracker(
            patience=self.patience,
            warmup_steps=self.tracker.warmup_steps,
            min_delta=0.0,
            min_delta_rel=min_delta_rel,
            smoothing=smoothing,
            divergence_factor=self.classifier.divergence_factor,
        )
        self.diagnoses: list[Diagnosis] = []
        # The motion of each stall held off (one per stall episode), at the step it was held off.
        self.held_off: list[tuple[int, Motion]] = []
        # The stalls of the monitored metric held off while the training loss improved: (step,
        # the training loss' smoothed value, steps since it last improved), one per episode.
        self.held_off_training: list[tuple[int, float, int]] = []
        self.last_spectrum: Spectrum | None = None
        # The kind diagnosed in the current episode (None once the run improves again): one
        # diagnosis per stall, and a divergence is reported even inside a stall episode.
        self._reported: str | None = None
        self._symmetry_reported = False
        self._grads = GradReader()
        self._norms = StepNorms()
        self._values: list[tuple[int, Tensor | None]] = []
        self._window_loss: Tensor | None = None
        # With `monitor`: the training loss per optimizer step, read back at checks.
        self._train_values: list[tuple[int, Tensor | None]] = []
        self._monitored = _Monitored()
        self._batch_step: int | None = None
        # The latest batches the probe can evaluate (with automatic optimization and no
        # `loss_fn`, those whose `training_step` returned a loss): the probe's batch when the
        # current one was skipped (a module may return None to skip a batch on purpose), and
        # the one before, on which a probe's direction of descent is measured again
        # (`StallClassifier.confirm_curvature`; only the latest is kept without it).
        self._recent: deque[tuple[Any, int]] = self._recent_batches()
        # Step of the latest status logged: it is logged once per sample, not at every check.
        self._logged_step: int | None = None
        # The highest learning rate seen at a check: a schedule that has annealed the rate far
        # below it settles the run, and a stall then is not escaped (read at checks, where an
        # escape's learning-rate kick is never in place).
        self._lr_peak = math.nan
        # Batches that stepped by the end of the latest one (checkpointed), and that count from a
        # checkpoint until the first batch after the resume (see `recount`).
        self._stepped: int | None = None
        self._resumed_stepped: int | None = None
        self._log: EscapeLogger | None = None
        self._warned: set[str] = set()
        # Whether a training loss was found this fit (a step may skip its batch, returning None).
        self._found_loss = False
        self._scaled = False
        self._sharded = False
        self._log_dir: str | None = None
        # Whether the run moves: windows of about `patience` steps, sampled at every check.
        self.motion = DriftMeter(window=max(2, self.patience // (2 * self.check_every_n_steps)))
        self._held: bool = False

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
        self._found_loss = False
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
    def start_batch(
        self, trainer: pl.Trainer, batch: Any, batch_idx: int, *, diagnose: bool = True
    ) -> Check | None:
        """A batch starts: a value a validation logged after the last step is read now.

        The model is still the one the validation measured (the step before it, a complete
        accumulation window): a stall is decided on it before this batch trains, so that an
        escape starts from a model whose metrics are known and every checkpoint written at that
        validation holds that model beside them. A validation inside an accumulation window
        waits for the check after the window's step.

        Args:
            trainer: The trainer.
            batch: The batch about to train (the probe's, should it have no loss yet: the last
                batch with a loss serves, see :meth:`evidence_batch`).
            batch_idx: Its index in the epoch.
            diagnose: Whether a new stall is diagnosed (as in :meth:`end_batch`).

        Returns:
            What the check found, when a validation's value was read; else None.
        """
        self.recount(trainer)
        found = None
        if self.validation_value_waits and batch_idx % trainer.accumulate_grad_batches == 0:
            # The motion meter counts the regular checks; this one is between two of them.
            found = self.check(
                Batch(trainer, trainer.lightning_module, batch, batch_idx),
                diagnose=diagnose,
                measure=None,
            )
        if self.gradients is not None:
            self.gradients.start_batch(trainer, batch, batch_idx)
        self._batch_step = None
        if self._monitored.check_next:
            # The epoch that had to log the metric has ended, the module's own epoch hook too.
            self._require(trainer, "at the end of the first epoch")
        return found

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

    def recount(self, trainer: pl.Trainer) -> None:
        """At the first batch after a resume: put back the count of batches that stepped.

        Lightning 2.6 adds one to the count it restores, for a checkpoint written at a batch's
        end, before the count is; one written at an epoch's end already holds it, and the run
        resumed from it counted every step one ahead (a kick window, the noise's seeds and the
        checks moved by one, and the summary told 41 steps for 40).
        """
        expected, self._resumed_stepped = self._resumed_stepped, None
        loop = getattr(trainer.fit_loop, "epoch_loop", None)
        if expected is not None and getattr(loop, "_batches_that_stepped", None) == expected + 1:
            loop._batches_that_stepped = expected  # type: ignore[union-attr]

    @override
    def end_batch(
        self, batch: Batch, *, diagnose: bool = True, measure: bool = True
    ) -> Check | None:
        """A batch ends: record the loss; at a check, read back and decide.

        Args:
            batch: The batch that ended (the probe's batch, should a stall be diagnosed).
            diagnose: Whether new stalls are diagnosed at this check; a caller that is judging
                an escape passes False (divergence is reported all the same).
            measure: Whether the parameters' motion is measured; False releases the meter's
                anchors (an escape on probation moves the run by itself, and holds a snapshot).

        Returns:
            What the check found, at a check; None between checks.
        """
        if self.gradients is not None:
            self.gradients.end_batch(batch)
        loss = _loss_of(batch.outputs)
        if loss is not None:
            # Lightning divides each micro-batch loss by the accumulation count: the sum over an
            # accumulation window is the window's mean loss.
            self._window_loss = loss if self._window_loss is None else self._window_loss + loss
        if self._probe_can_use(batch):
            self._recent.append((batch.data, batch.idx))
        step = self._batch_step
        if step is None:
            return None  # accumulating: no optimizer step in this batch
        self._stepped = step + 1
        value, self._window_loss = self._window_loss, None
        if self.monitor is None:
            self._values.append((step, value))
        else:
            # The monitored value comes from `callback_metrics` (see `read_back`).
            self._values.append((step, None))
            self._train_values.append((step, value))
        if (step + 1) % self.check_every_n_steps == 0:
            if self._take_fresh(batch.trainer, step):
                return self.check(batch, diagnose=diagnose, measure=measure)
            # Nothing measured since the last value (between two validations): the gradient norms
            # are read (a non-finite one is a divergence at once) and nothing else is decided.
            found = dataclasses.replace(
                self.check(batch, diagnose=False, measure=measure), fresh=False
            )
            every = self.classifier.probe_every_n_steps
            if diagnose and every and (step + 1) % every == 0:
                self._probe(self.evidence_batch(batch))
            return found
        every = self.classifier.probe_every_n_steps
        if every and (step + 1) % every == 0:
            self._probe(self.evidence_batch(batch))
        return None

    def _recent_batches(self) -> deque[tuple[Any, int]]:
        """An empty store of the latest batches: two with ``confirm_curvature``, else one."""
        return deque(maxlen=2 if self.classifier.confirm_curvature else 1)

    def _probe_can_use(self, batch: Batch) -> bool:
        """Whether the probe can evaluate ``batch``: it calls ``training_step`` for its loss."""
        return (
            self.classifier.loss_fn is not None
            or not batch.module.automatic_optimization
            or _has_loss(batch.outputs)
        )

    def other_batch(self, batch: Batch) -> Batch | None:
        """A batch to measure the probe's direction on again: the latest that is not ``batch``.

        None before two batches have been kept, or with ``confirm_curvature`` off.
        """
        if not self.classifier.confirm_curvature:
            return None
        for data, idx in reversed(self._recent):
            if data is not batch.data:
                return batch._replace(data=data, idx=idx)
        return None

    def evidence_batch(self, batch: Batch) -> Batch:
        """The batch the probe and the escapes' line searches evaluate the loss on.

        ``batch`` itself, unless its ``training_step`` returned no loss (Lightning skips such a
        batch, and a module may skip batches on purpose) while an earlier batch's did: then that
        latest batch with a loss, since the probe calls ``training_step`` for its loss. With a
        ``loss_fn`` (or under manual optimization, which needs one) every batch serves.
        """
        if not self._recent or self._probe_can_use(batch):
            return batch
        data, idx = self._recent[-1]
        return batch._replace(data=data, idx=idx)

    @override
    def end_epoch(self, trainer: pl.Trainer) -> None:
        """A training epoch ends: where ``EarlyStopping`` would, require the metric to be there."""
        monitored = self._monitored
        if self.monitor is None or monitored.seen or monitored.checked:
            return
        if not _checks_at_epoch_end(trainer):
            return
        if self.monitor in trainer.callback_metrics:
            monitored.seen = True
        else:
            # The module's own `on_train_epoch_end` runs after this hook and may log it: look
            # again when the next batch starts (or training ends).
            monitored.check_next = True

    @override
    def validation_start(self, trainer: pl.Trainer) -> None:
        """A validation starts: note the monitored value, to tell whether it logs a new one."""
        if self.monitor is not None:
            self._monitored.before_validation = dict(trainer.callback_metrics)

    @override
    def validation_end(self, trainer: pl.Trainer, step: int | None = None) -> None:
        """A validation ends: take the monitored value if this validation logged it.

        Lightning puts a new tensor in ``callback_metrics`` for every metric the validation logged
        and leaves the others as they were, so a value that is not the one there at the start is
        fresh. It measures the model after the optimizer step just taken, and waits for the next
        check (which needs a training batch, for the curvature probe).

        Args:
            trainer: The trainer.
            step: The optimizer step the validation follows, when the caller knows it (one it
                ran itself between two batches); else the step just taken.
        """
        if self.monitor is None:
            return
        monitored = self._monitored
        metrics = trainer.callback_metrics
        value = metrics.get(self.monitor)
        before, monitored.before_validation = monitored.before_validation or {}, None
        if value is not None and value is not before.get(self.monitor):
            if step is None:
                step = self._batch_step if self._batch_step is not None else step_index(trainer) - 1
            taken = [s for s, _ in monitored.pending]
            if monitored.sampled is not None:
                taken.append(monitored.sampled)
            if taken and step <= max(taken):
                # A validation of a step already measured: Lightning 2.4 runs again, after a
                # resume, the validation its checkpoint was written in (and counts one step
                # short). The same model measured twice is not a new sample.
                return
            monitored.source = "validation"
            monitored.take(step, value)
        elif not _checks_at_epoch_end(trainer):
            self._require(trainer, "at the end of the first validation")

    def end_training(self, trainer: pl.Trainer) -> None:
        """Training ends: a metric required at the end of the last epoch must be there.

        The samples taken since the last check, and the last validation's value, are read back
        and fed (see :meth:`read_final`), so that the detector has seen every step of the fit.
        """
        if self._monitored.check_next:
            self._require(trainer, "at the end of the first epoch")
        monitored = self._monitored
        if self.monitor is not None and not (monitored.seen or monitored.checked):
            # No validation (or epoch end) came where it could have been logged: the fit was
            # not watched, which its summary alone would not say.
            warn_once(
                self._warned,
                f"{type(self).__name__} never read `{self.monitor}`: nothing in this fit logged "
                "it before training ended (no validation ran?), so no stall could be called.",
            )
        self.read_final(trainer)

    def read_final(self, trainer: pl.Trainer) -> StallStatus:
        """Training ends: feed every sample still pending, log the status once; return it.

        Every process calls it alike (it reads back, averaged over processes, what is pending).
        Nothing is diagnosed: there is no batch to probe and no training left to act on.
        """
        self.read_back(trainer, final=True)
        status = self.tracker.status()
        sampled = self.sampled_step
        if self.monitor is None or sampled is None or sampled >= status.step:
            # Not when the last samples fed are gradient norms read after the last value: the
            # status would repeat that value at a step no validation measured.
            self._log_status(status, diagnosed=False)
        return status

    @property
    def sampled_step(self) -> int | None:
        """Step at which the latest monitored value fed to the tracker was measured, or None."""
        return self._monitored.sampled

    @property
    def measured_step(self) -> int | None:
        """Step after which the latest fresh monitored value was measured, fed yet or not; or None.

        A value a validation logged waits for the next batch (or check) before it is fed to the
        tracker; it is counted here from the moment it is taken.
        """
        monitored = self._monitored
        steps = [step for step, _ in monitored.pending]
        if monitored.sampled is not None:
            steps.append(monitored.sampled)
        return max(steps, default=None)

    @property
    def validation_value_waits(self) -> bool:
        """Whether a value a validation logged waits to be read (before the next batch trains)."""
        monitored = self._monitored
        return bool(monitored.pending) and monitored.source == "validation"

    @property
    def awaits_validation(self) -> bool:
        """Whether the monitored value may come from a validation that is still to run.

        True for a metric logged at validation, and for a ``monitor`` not seen yet.
        """
        return self.monitor is not None and self._monitored.source != "training"

    def _take_fresh(self, trainer: pl.Trainer, step: int) -> bool:
        """Whether a fresh monitored value waits for the check of ``step`` (always, for the loss).

        A training metric is taken here when ``callback_metrics`` holds another tensor than the
        one taken last: Lightning replaces a metric's tensor only when it was logged anew.
        """
        if self.monitor is None:
            return True
        monitored = self._monitored
        if not monitored.pending and monitored.source != "validation":
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None and value is not monitored.polled:
                monitored.polled = value
                monitored.source = monitored.source or "training"
                monitored.take(step, value)
        return bool(monitored.pending)

    def _require(self, trainer: pl.Trainer, where: str) -> None:
        """The monitored metric must be logged by now: raise if ``strict``, else warn once."""
        monitored = self._monitored
        monitored.check_next = False
        if monitored.seen or monitored.checked:
            return
        monitored.checked = True
        metrics = trainer.callback_metrics
        if self.monitor in metrics:
            monitored.seen = True
            return
        # The callbacks' own progress-bar fields are in `callback_metrics` too, but not metrics to
        # monitor (EarlyStopping's message does not list them either: they are not logged).
        names = sorted(name for name in metrics if name not in PROGRESS_BAR_FIELDS)
        available = ", ".join(f"`{name}`" for name in names) or "none"
        text = (
            f"{type(self).__name__} could not find `{self.monitor}` in the logged metrics "
            f"{where}; the metrics logged are: {available}."
        )
        if self.strict:
            raise RuntimeError(
                f"{text} Pass one of them as `monitor=`, or `strict=False` to wait for it."
            )
        warn_once(self._warned, f"{text} It stays passive until the metric appears.")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end_training(trainer)
        rank_zero_info(self.summary_text())

    @property
    def steps_seen(self) -> int:
        """The optimizer steps read, from the fit's first (the run's, after a resume) to the last.

        0 before the first. A second ``fit`` of the same trainer, which goes on from the step the
        first ended at, counts its own. The parent process's copy under ``ddp_spawn`` never
        sees one.
        """
        first = self.tracker.first_step
        return 0 if first is None else self.tracker.status().step + 1 - first

    def summary(self) -> dict[str, Any]:
        """What was found so far, as plain values: the facts of the summary at the end of fit.

        Returns:
            ``stalls`` (diagnoses per kind), ``held_off`` (stalls held off because the run was
            moving), ``held_off_training`` (stalls of a ``monitor`` metric held off because the
            training loss still improved), ``steps`` (:attr:`steps_seen`) and ``log_dir`` (where
            the logs are, or None).
        """
        return {
            "stalls": dict(Counter(d.kind for d in self.diagnoses)),
            "held_off": len(self.held_off),
            "held_off_training": len(self.held_off_training),
            "steps": self.steps_seen,
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
        self._recent = self._recent_batches()
        self.motion.reset()  # the anchors are two copies of the parameters
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
        self.training.reset()
        self.diagnoses = []
        self.held_off = []
        self.held_off_training = []
        self.last_spectrum = None
        self._reported = None
        self._symmetry_reported = False
        self._values = []
        self._train_values = []
        self._norms.clear()
        self._window_loss = None
        self._batch_step = None
        self._recent = self._recent_batches()
        self._logged_step = None
        self._lr_peak = math.nan
        self._monitored = _Monitored()
        self.motion.forget()
        self._held = False

    # ------------------------------------------------------------------ decisions

    def check(
        self,
        batch: Batch,
        *,
        diagnose: bool = True,
        measure: bool | None = True,
        show: bool = True,
    ) -> Check:
        """Read the pending samples back, update the tracker and diagnose a new stall.

        Runs every ``check_every_n_steps``, on every rank alike; ``diagnose`` and ``measure`` as
        in :meth:`end_batch` (``measure=None`` leaves the motion meter as it is: a check between
        two of its samples, which counts checks). ``show``: whether the stall score goes to the
        progress bar; False from a validation hook, where Lightning takes no per-step values.
        """
        step = self._batch_step if self._batch_step is not None else step_index(batch.trainer) - 1
        batch = self.evidence_batch(batch)
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
        lr = _learning_rate(batch.trainer)
        if not lr <= self._lr_peak:  # NaN (no peak yet) too
            self._lr_peak = lr
        if measure:
            self._measure_motion(batch, step)
        elif measure is not None:
            self.motion.reset()
        diagnosis = self._decide(batch, status, step, diagnose)
        self._log_status(status, diagnosed=diagnosis is not None)
        # In the progress bar: how close the run is to a stall (1.0 is one).
        if show:
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
            self._held = False
            every = self.classifier.probe_every_n_steps
            if every and (step + 1) % every == 0:
                self._probe(batch)
            return self._check_symmetry(batch, status, step)
        if self._reported is not None:
            return None
        # A contracting recurrence is a structural trap, like duplicate units: the parameters that
        # get a gradient may keep moving while nothing reaches back in time, so motion does not
        # hold it off.
        recurrent = self.classifier.recurrent_evidence(batch.module)
        if not recurrent and (self._moving(status) or self._training_improves(status)):
            return None
        return self._record(self.diagnose(batch, status, recurrent))

    def _training_improves(self, status: StallStatus) -> bool:
        """Whether a stall of a ``monitor`` metric is held off: the training loss still improves.

        The monitored metric (a validation loss, say) has not improved in ``patience`` steps, but
        the loss the optimizer descends has, by the detector's own relative tolerance: the
        optimizer is not stuck, and the metric's plateau is one of generalisation (the model
        fits its training set further without doing better on held-out data), which no escape
        from a stall addresses. Said once per stall episode, in the logs and in TensorBoard.
        """
        if self.monitor is None or not self.classifier.training_improves:
            return False
        training = self.training.status()
        if not self.training.started or training.stalled or training.warming_up:
            return False
        if not self._held:
            self.held_off_training.append((status.step, training.smoothed, training.since))
            self._say_held_off(
                status,
                f"the training loss still improves (smoothed {training.smoothed:.4g}, a new best "
                f"by more than {training.threshold:.3g} {training.since} steps ago): a plateau of "
                f"{self.metric_name}, not of the optimizer",
            )
        return True

    def _say_held_off(self, status: StallStatus, why: str) -> None:
        """Say once per stall episode that the stall declared at ``status`` is held off, and why."""
        self._held = True
        text = (
            f"stall held off at step {status.step}: {self.metric_name} {status.smoothed:.4g} has "
            f"not improved in {status.since} steps, but {why}"
        )
        if self._log is not None:
            self._log.text(f"{STALL}/held_off", text, status.step)
        if self.verbose:
            rank_zero_info(f"[{type(self).__name__}] {text}")

    def _moving(self, status: StallStatus) -> bool:
        """Whether a declared stall is held off: the parameters move steadily at speed.

        A flat monitored value over a moving run is hidden progress (sparse parity, grokking), not
        a stall. Said once per stall episode, in the logs and in TensorBoard.
        """
        motion, rule = self.motion.last, self.classifier.motion
        if motion is None or rule is None or not rule.moving(motion):
            return False
        if not self._held:
            self.held_off.append((status.step, motion))
            self._say_held_off(
                status,
                f"the parameters move: drift {motion.drift:.3g}, speed {motion.speed:.3g} per "
                f"{motion.steps} steps, trend {motion.trend:.3g}, agreement "
                f"{motion.agreement:.3g} ({rule.describe()})",
            )
        return True

    def _measure_motion(self, batch: Batch, step: int) -> None:
        """Sample the parameters for the motion meter; log a window's motion when it completes."""
        rule = self.classifier.motion
        if rule is None:
            return
        params = [p for p in batch.module.parameters() if p.requires_grad]
        sum_squares = None
        if self._sharded:
            strategy = batch.trainer.strategy

            def sum_squares(t: Tensor) -> Tensor:
                return torch.as_tensor(strategy.reduce(t, reduce_op="sum"))

        motion = self.motion.sample(step, params, sum_squares)
        if motion is not None and self._log is not None:
            values = {
                f"{STALL}/speed": motion.speed,
                f"{STALL}/trend": motion.trend,
                f"{STALL}/agreement": motion.agreement,
                f"{STALL}/drift": motion.drift,
                f"{STALL}/moving": 1.0 if rule.moving(motion) else 0.0,
            }
            self._log.scalars({k: v for k, v in values.items() if math.isfinite(v)}, step)

    def jumped(self) -> None:
        """The parameters jumped (an escape acted, a rollback restored): measure the motion afresh."""
        self.motion.jumped()

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

    def diagnose(
        self,
        batch: Batch,
        status: StallStatus,
        recurrent: Sequence[RecurrentEvidence] | None = None,
    ) -> Diagnosis:
        """Gather the evidence about a declared stall on ``batch`` and classify it.

        ``recurrent``: the contracting recurrent matrices, when already measured.
        """
        if recurrent is None:
            recurrent = self.classifier.recurrent_evidence(batch.module)
        symmetric: list[SymmetricEvidence] = []
        dead: list[DeadEvidence] = []
        fading: SignalFade | None = None
        trainer = batch.trainer
        second = self.other_batch(batch)
        if self.probe_unavailable(trainer, batch.module) is None:
            try:
                symmetric, dead, fading = self.classifier.unit_evidence(
                    batch.module,
                    batch.data,
                    batch.idx,
                    self.reduce(trainer),
                    other=None if second is None else (second.data, second.idx),
                )
            except ProbeUnavailable as err:
                warn_once(
                    self._warned,
                    f"The units cannot be measured: {err}; stall diagnosis falls back to the "
                    "other evidence.",
                )
        spectrum: Spectrum | None = None
        other: tuple[float, float] | None = None
        if not self.classifier.probe:
            note: str | None = "the curvature probe is off (`probe=False`)"
        else:
            spectrum, note = self._probe(batch)
            if spectrum is not None and spectrum.eigvec_min and second is not None:
                try:
                    other = self.classifier.confirm(
                        batch.module, second.data, second.idx, self.reduce(trainer), spectrum
                    )
                except ProbeUnavailable as err:
                    # Alike on every rank (the module, the reduced numbers); the probe's own
                    # evidence stands.
                    warn_once(self._warned, f"The curvature probe's second batch failed: {err}")
        return self.classifier.classify(
            status,
            spectrum=spectrum,
            other=other,
            training=self.training.status()
            if self.monitor is not None and self.training.started
            else None,
            lr=_learning_rate(trainer),
            curvature_note=note,
            symmetric=symmetric,
            dead=dead,
            recurrent=recurrent,
            fading=fading,
            metric=self.metric_name,
            target=self.target,
            mode=self.mode,
            motion=self.motion.last,
            lr_peak=self._lr_peak,
        )

    def read_back(self, trainer: pl.Trainer, *, final: bool = False) -> None:
        """One host read of the pending samples (averaged over ranks); feed them to the tracker.

        With ``monitor``, the tracker is fed up to the step of the latest fresh value only: what
        was read after it (gradient norms) waits for the next fresh value, so that every stall
        the tracker declares stands on a value measured at its step. A non-finite sample is fed
        at once, and at the end of training (``final``) everything is.

        Args:
            trainer: The trainer.
            final: Training ends: take the monitored value if it is fresh, feed every sample.
        """
        values, self._values = self._values, []
        grads = dict(self._norms.pop())
        monitored = self._monitored
        self._read_training(trainer)
        if final and self.monitor is not None:
            last = self._batch_step if self._batch_step is not None else step_index(trainer) - 1
            measured = self.measured_step
            # Only a value logged after the last one taken: Lightning hands `callback_metrics` new
            # tensors at the end of an epoch and of training, with the values they held.
            if measured is None or last > measured:
                self._take_fresh(trainer, last)
        fresh, monitored.pending = monitored.pending, []
        if fresh:
            at = {step: i for i, (step, _) in enumerate(values)}
            for step, value in fresh:
                if step in at:
                    values[at[step]] = (step, value)
                else:
                    at[step] = len(values)
                    values.append((step, value))
        rows: dict[int, list[float | None]] = {}
        for step, sample, grad in [
            *monitored.queued,
            *_reduced_samples(trainer, values, grads, sharded=self._sharded),
        ]:
            # A non-finite gradient under a GradScaler is a skipped step, not a divergence.
            if self._scaled and grad is not None and not math.isfinite(grad):
                grad = None
            row = rows.setdefault(step, [None, None])
            if sample is not None:
                row[0] = sample
            if grad is not None:
                row[1] = grad
        ordered = sorted(rows.items())
        monitored.queued = []
        bad = any(x is not None and not math.isfinite(x) for _, row in ordered for x in row)
        if self.monitor is not None and not final and not bad:
            cut = max((step for step, _ in fresh), default=None)
            monitored.queued = [(s, v, g) for s, (v, g) in ordered if cut is None or s > cut]
            ordered = [(s, row) for s, row in ordered if cut is not None and s <= cut]
        for step, (sample, grad) in ordered:
            # A validation's value stands for the steps since the one before (a training value,
            # read at every step or every check, is one sample): smoothing per validation would
            # average whole-set values over many epochs and leave the smoothed value far behind.
            span = 1
            if monitored.source == "validation" and monitored.sampled is not None:
                span = step - monitored.sampled
            self.tracker.update(step, sample, grad, span=span)
            if sample is not None:
                monitored.sampled = step
        self._found_loss = self._found_loss or any(v is not None for _, v in values)
        if self.monitor is None and values and not self._found_loss:
            warn_once(
                self._warned,
                "StallDetector found no loss in what `training_step` returned (a tensor or a dict "
                "with 'loss'); pass `monitor=` with a metric you log. It stays passive until then.",
            )

    def _read_training(self, trainer: pl.Trainer) -> None:
        """Feed the training losses since the last check to :attr:`training` (with ``monitor``).

        One more host read per check, averaged over processes like the monitored value; a
        non-finite loss is left out (the monitored value's own tracker reports divergence).
        """
        values, self._train_values = self._train_values, []
        if not values or all(v is None for _, v in values):
            return
        for step, sample, _ in _reduced_samples(trainer, values, {}, sharded=False):
            if sample is not None and math.isfinite(sample):
                self.training.update(step, sample, None)

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
        """Log the status once per sample: at a check that fed the tracker, or made a diagnosis.

        A check between two validations reads only gradient norms, which wait for the next value
        (see :meth:`read_back`): logging there would repeat the last status at its step, and after
        a rollback put the restored value beside the trial's at that step.
        """
        fresh = self.tracker.started and (
            self._logged_step is None or status.step > self._logged_step
        )
        if not (fresh or diagnosed):
            return
        self._logged_step = status.step
        if self._log is None:
            return
        values = {
            f"{STALL}/monitored": status.smoothed,
            # The smoothed value's standard error: what a verdict has to see past.
            f"{STALL}/noise": status.noise,
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
        return {
            "tracker": self.tracker.state_dict(),
            "training": self.training.state_dict(),
            "reported": self._reported,
        }

    def roll_back(self, state: dict[str, Any]) -> None:
        """Restore :meth:`rollback_state`: the run is back where it was, but the clock is not."""
        now = self.tracker.status().step
        self.tracker.load_state_dict(state["tracker"])
        self.tracker.advance_to(now)
        if "training" in state:  # saved by a version that kept it
            trained = self.training.status().step
            self.training.load_state_dict(state["training"])
            self.training.advance_to(trained)
        self._train_values = []
        self._reported = state["reported"]
        # Values measured before the restore, and samples read but not fed, are of the model
        # rolled back: none of them may judge or diagnose what follows.
        self._monitored.pending = []
        self._monitored.queued = []
        self.jumped()

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
            "training": self.training.state_dict(),
            "training_pending": [
                [step, None if v is None else v.detach().cpu()] for step, v in self._train_values
            ],
            "held_off_training": [list(h) for h in self.held_off_training],
            "diagnoses": [d.to_dict() for d in self.diagnoses],
            "reported": self._reported,
            "symmetry_reported": self._symmetry_reported,
            "pending": pending,
            "window_loss": None if self._window_loss is None else self._window_loss.detach().cpu(),
            "gradients": {} if self.gradients is None else self.gradients.state_dict(),
            "motion": self.motion.state_dict(),
            "held_off": [[step, motion.to_dict()] for step, motion in self.held_off],
            "monitored": self._monitored.state_dict(),
            "logged_step": self._logged_step,
            "lr_peak": self._lr_peak,
            "stepped": self._stepped,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict["tracker"])
        self.training.reset()
        if "training" in state_dict:
            self.training.load_state_dict(state_dict["training"])
        self._train_values = [(int(s), v) for s, v in state_dict.get("training_pending", [])]
        self.held_off_training = [
            (int(s), float(v), int(n)) for s, v, n in state_dict.get("held_off_training", [])
        ]
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
        self.motion.load_state_dict(state_dict.get("motion", {}))
        self.held_off = [(int(step), Motion(**m)) for step, m in state_dict.get("held_off", [])]
        self._monitored = _Monitored.from_state_dict(state_dict.get("monitored", {}))
        self._logged_step = state_dict.get("logged_step")
        self._lr_peak = float(state_dict.get("lr_peak", math.nan))
        self._stepped = self._resumed_stepped = state_dict.get("stepped")


@dataclasses.dataclass
class _Monitored:
    """What the detector knows of its ``monitor`` metric between two reads (private).

    Attributes:
        pending: Fresh values not read back yet, with the optimizer step each was measured after.
        queued: Samples ``(step, value, grad norm)`` read back after the latest fresh value, not
            fed to the tracker yet: they wait for the next fresh value.
        source: ``"validation"`` once a validation logged the metric, ``"training"`` once a
            check found it logged anew, None before either.
        seen: Whether the metric was ever found.
        checked: Whether the place where it must be logged (see ``strict``) has been passed.
        check_next: Whether to look for it when the next batch starts (an epoch just ended).
        sampled: Step at which the latest value fed to the tracker was measured.
        polled: The tensor taken at the latest check (to tell a new one); not saved.
        before_validation: The metrics before the running validation (name to tensor); not
            saved.
    """

    pending: list[tuple[int, Tensor]] = dataclasses.field(default_factory=list)
    queued: list[tuple[int, float | None, float | None]] = dataclasses.field(default_factory=list)
    source: str | None = None
    seen: bool = False
    checked: bool = False
    check_next: bool = False
    sampled: int | None = None
    polled: Any = None
    before_validation: dict[str, Any] | None = None

    def take(self, step: int, value: Any) -> None:
        """A fresh value measured after optimizer ``step``."""
        self.seen = True
        self.pending.append((step, torch.as_tensor(value).detach().float()))

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values (loadable with ``weights_only=True``)."""
        return {
            "pending": [[step, value.cpu()] for step, value in self.pending],
            "queued": [list(sample) for sample in self.queued],
            "source": self.source,
            "seen": self.seen,
            "checked": self.checked,
            "check_next": self.check_next,
            "sampled": self.sampled,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> _Monitored:
        """Inverse of :meth:`state_dict` (an empty dict for a checkpoint from before it existed)."""
        return cls(
            pending=[(int(step), value) for step, value in state.get("pending", [])],
            queued=[(int(s), v, g) for s, v, g in state.get("queued", [])],
            source=state.get("source"),
            seen=bool(state.get("seen", False)),
            checked=bool(state.get("checked", False)),
            check_next=bool(state.get("check_next", False)),
            sampled=state.get("sampled"),
        )


def _checks_at_epoch_end(trainer: pl.Trainer) -> bool:
    """``EarlyStopping``'s rule (``check_on_train_epoch_end=None``) for where a metric must be.

    At the end of each training epoch if validation runs once at the end of every epoch (or never,
    with these defaults), at the end of each validation otherwise.
    """
    return trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1


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


def _has_loss(outputs: Any) -> bool:
    """Whether ``training_step`` returned a loss (a tensor, or a mapping with "loss")."""
    if isinstance(outputs, Tensor):
        return True
    return isinstance(outputs, dict) and isinstance(outputs.get("loss"), Tensor)


def _learning_rate(trainer: pl.Trainer) -> float:
    """The highest learning rate of any parameter group of any optimizer (NaN if none).

    The fastest group is the one a step along the curvature could move; a group at rate 0 (a
    backbone frozen by its rate) moves nothing. Without `configure_optimizers`, Lightning's
    stand-in optimizer has no parameter group.
    """
    rates = [
        float(group["lr"])
        for optimizer in trainer.optimizers
        for group in optimizer.param_groups
        if "lr" in group
    ]
    return max(rates) if rates else math.nan


_LAYOUT = {
    STALL: {
        "monitored value (smoothed) and its standard error": [
            "Multiline",
            [rf"^{STALL}/(monitored|noise)$"],
        ],
        "stall score (>= 1 is a stall)": ["Multiline", [rf"^{STALL}/score$"]],
        "parameter motion per window (moving = 1 holds a stall off)": [
            "Multiline",
            [rf"^{STALL}/(speed|trend|agreement|drift|moving)$"],
        ],
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
