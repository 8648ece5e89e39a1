"""EscapeCallback: diagnose a stalled run, escape it, judge the escape, roll back what failed."""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_escape._lightning import (
    ValidationMetrics,
    amp_grad_scale,
    last_validation_step,
    log_dir,
    put_back_metrics,
    restart_spike_detection,
    run_validation,
    set_step_index,
    skip_validation_after_batch,
    step_index,
    stopping,
    unwrap_optimizer,
    validates_after_batch,
    warn_once,
)
from lightning_escape._validation import (
    check_bool,
    check_choice,
    check_nonnegative_int,
    check_positive_int,
    check_seed,
)
from lightning_escape.averages import capture_averages, restore_averages
from lightning_escape.bests import capture_bests, restore_bests, restore_plateau_best
from lightning_escape.callbacks._watcher import Batch, Watcher
from lightning_escape.callbacks.detector import StallDetector
from lightning_escape.coordinates import rescale_gradients, rescaling
from lightning_escape.detectors import Check, Diagnosis, StallStatus
from lightning_escape.diagnosis import StallClassifier
from lightning_escape.escapes import EscapeContext, EscapeStep
from lightning_escape.logging import (
    ESCAPE,
    PROGRESS_BAR_FIELDS,
    STALL,
    EscapeLogger,
    describe_facts,
    progress_bar,
)
from lightning_escape.policy import EscapePolicy, check_ladders, default_ladders
from lightning_escape.probation import (
    EscapeEngine,
    EscapeEvent,
    News,
    Note,
    Saved,
    Verdict,
    WorldChanged,
)
from lightning_escape.probe import evaluate_loss
from lightning_escape.snapshot import TrainingSnapshot
from lightning_escape.tables import escape_facts

__all__ = ["EscapeCallback"]

#: The ``escape/verdict`` scalar of each outcome (0 where nothing was judged).
VERDICT_MARKS = {"accepted": 1.0, "neutral": 0.5, "rolled_back": -1.0}


class EscapeCallback(Watcher):
    r"""Watch, diagnose, escape, judge and roll back: the whole loop, as one drop-in callback.

    ``Trainer(callbacks=[EscapeCallback()])`` works on any LightningModule. It holds two parts and
    its hooks only pass Lightning's events on to them:

    - a :class:`~lightning_escape.StallDetector` (``detector``), which watches the gradients and the
      monitored value, declares stalls and diagnoses them;
    - an :class:`~lightning_escape.probation.EscapeEngine`, which takes the next escape step from the
      diagnosis' ladder (see :func:`~lightning_escape.policy.default_ladders`; steps that cannot act
      here are passed over), snapshots the model, the optimizers, the schedulers and the AMP scaler
      first, and after ``probation_steps`` compares the smoothed monitored value with its level
      before the escape: better by the detector's tolerance and beyond the value's own noise
      (``noise_margin``), the escape is kept; better by less (past half the margin where the noise
      sets it), probation is extended (up to ``probation_extensions`` times), and a trial extended
      that way that still ends better is kept without counting as help (``"neutral"``: restoring
      would throw away its steps, progress on a healthy run); otherwise everything is restored bit
      for bit. After a rollback or a neutral verdict the next
      escape (the next rung, or the ladder again, stronger) waits for a fresh diagnosis after a
      back-off that doubles with each failure until one helps.

    After ``max_failures`` consecutive failed escapes from the same point it concludes that the run
    sits in the best basin it can find and stops escaping there (Jin et al. 2017), until the run
    improves by itself. ``max_escapes`` bounds the whole run, ``cooldown_steps`` the pace. Divergence
    is never escaped: during probation it rolls the trial back; otherwise it rolls back to the last
    good snapshot when ``guard_every_n_steps`` keeps one. No escape starts whose probation would
    end after training's known last step; a trial still on probation when training ends anyway is
    judged with what it has, so the final model is never a failed trial's.

    Every escape is an :class:`~lightning_escape.probation.EscapeEvent` in :attr:`events` and in
    TensorBoard: a text event saying what was done, how strongly and why, the scalars
    ``escape/escape`` (1 at each escape), ``escape/verdict`` (+1 accepted, +0.5 kept without
    effect, -1 rolled back) with
    ``escape/verdict_before`` and ``escape/verdict_after``, and the effective learning rate.

    Random draws come from generators derived from ``seed`` and the optimizer step: every DDP
    process applies the same noise and jumps, and a resumed run repeats them. Everything needed to
    resume, mid-probation or mid-kick, is in the callback's ``state_dict`` (tensors and plain
    values). Under FSDP and DeepSpeed (sharded state) it warns and only detects and diagnoses.

    Args:
        detector: How stalls are detected and named (what is monitored, patience, tolerances, the
            curvature probe); ``None`` for ``StallDetector()`` with the probe seeded by ``seed``.
            Its tolerance is also the help an escape must bring, and verdicts are given at its
            checks.
        ladders: Escape steps per diagnosis kind (``plateau``, ``saddle``, ``local_minimum``,
            ``symmetric_units``, ``dead_units``, ``vanishing_gradient``); kinds not given keep their
            default ladder, and an empty list switches escapes off for that kind.
        probation_steps: Optimizer steps an escape runs before its verdict. With a ``monitor``
            metric logged at validation, the verdict is given on the first validation after
            them, at its end (before ``ModelCheckpoint`` saves there, so checkpoints hold the
            model the run goes on with); for a validation inside an accumulation window, where
            the next window begins (that window's step is thrown away with the trial); a trial
            still waiting at the end of training is judged on the last validation if that one
            ran after the escape started, and rolled back otherwise (unless
            ``validate_verdicts`` runs one).
        probation_extensions: Times a verdict may be put off by another ``probation_steps`` while
            the escape helps but not yet by the tolerance.
        cooldown_steps: Steps after an accepted escape before the next; ``None`` for the
            detector's ``patience``.
        max_escapes: Escapes allowed in the whole run.
        max_failures: Consecutive failed escapes after which it stops escaping from that point.
        snapshot_device: ``"same"`` keeps snapshots on the parameters' devices, ``"cpu"`` on the host.
        guard_every_n_steps: Keep a snapshot of the last healthy state every this many steps (at a
            check), to roll back to when the run diverges outside probation. Off by default: it
            holds a copy of the model and optimizer state.
        seed: Seed of the escapes' random draws (noise, jumps).
        verbose: Also print each diagnosis, escape and verdict (a summary is always logged at the
            end of ``fit``, at Lightning's INFO level, on rank zero).
        report: At the end of training, draw the run report's timeline (see
            :mod:`lightning_escape.report`) into TensorBoard as the image ``escape/report``.
            Needs matplotlib (the ``report`` extra).
        noise_margin: How many standard errors of the difference between the smoothed values
            before and after a trial (from the samples' scatter, see
            :attr:`~lightning_escape.detectors.StallStatus.noise`) a kept escape must beat;
            ``0`` for the detector's tolerance alone. An escape better by less is at best kept
            without credit (``keep_neutral``), never counted as help on a lucky draw of the noise.
        keep_neutral: Keep an escape whose probation was extended for its gain and that ends
            better, but not by the margin (verdict ``"neutral"``); False rolls it back too, so
            that only an escape that helped beyond the margin stays (and every other trial's
            steps are thrown away).
        validate_verdicts: With a ``monitor`` metric logged at validation, run the fit's validation
            loop when a verdict is due and no validation has measured the trial since its
            probation ended, instead of waiting for the next scheduled validation: at the end of
            the batch whose step ends probation, where Lightning's own would run (unless
            Lightning validates after that step itself: none is doubled; a stop asked for in it
            takes effect before another batch trains), and at the end of training for a trial
            still waiting. These are real
            validations: every callback and logger sees them (``EarlyStopping`` counts them
            toward its ``patience``; ``ModelCheckpoint`` may save on them). Needs a ``monitor``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_escape.demos.problems import StrictSaddle2D
        >>> detector = StallDetector(patience=30, warmup_steps=0, smoothing=0.0)
        >>> escape = EscapeCallback(detector, probation_steps=30)
        >>> trainer = pl.Trainer(callbacks=[escape], max_steps=100, logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False,
        ...                      enable_checkpointing=False)
        >>> problem = StrictSaddle2D()  # gradient descent from (1, 0) converges to the saddle
        >>> trainer.fit(problem)
        >>> [(e.diagnosis, e.action, e.verdict) for e in escape.events]
        [('saddle', 'NegativeCurvatureStep(scale=1.0, max_evals=24)', 'accepted')]
        >>> problem.solved()
        True
    """

    def __init__(
        self,
        detector: StallDetector | None = None,
        ladders: Mapping[str, Sequence[EscapeStep]] | None = None,
        probation_steps: int = 200,
        probation_extensions: int = 2,
        cooldown_steps: int | None = None,
        max_escapes: int = 10,
        max_failures: int = 5,
        snapshot_device: Literal["same", "cpu"] = "same",
        guard_every_n_steps: int | None = None,
        seed: int = 0,
        verbose: bool = False,
        report: bool = False,
        validate_verdicts: bool = False,
        noise_margin: float = 2.0,
        keep_neutral: bool = True,
    ) -> None:
        super().__init__()
        self.seed = check_seed("seed", seed)
        self.report = check_bool("report", report)
        self.validate_verdicts = check_bool("validate_verdicts", validate_verdicts)
        if report:
            _require_matplotlib()
        if detector is None:
            detector = StallDetector(classifier=StallClassifier(seed=self.seed))
        elif not isinstance(detector, StallDetector):
            raise ValueError(f"`detector` must be a StallDetector or None, got {detector!r}.")
        self.detector = detector
        if validate_verdicts and detector.monitor is None:
            raise ValueError(
                "`validate_verdicts=True` runs validations to judge escapes on a `monitor` metric "
                "logged at validation, but the detector monitors the training loss "
                "(`monitor=None`): pass `StallDetector(monitor=...)` or leave it False."
            )
        if cooldown_steps is not None:
            check_nonnegative_int("cooldown_steps", cooldown_steps)
        self.snapshot_device: Literal["same", "cpu"] = check_choice(
            "snapshot_device", snapshot_device, ("same", "cpu")
        )
        self.verbose = check_bool("verbose", verbose)
        probation_steps = check_positive_int("probation_steps", probation_steps)
        given = check_ladders(ladders or {})
        for kind, ladder in given.items():
            for rung, step in enumerate(ladder):
                if step.duration > probation_steps:
                    # The verdict ends a step's effect: it would act for less than it says.
                    raise ValueError(
                        f"`ladders[{kind!r}][{rung}]` {step.describe()} acts for {step.duration} "
                        f"steps, longer than `probation_steps={probation_steps}`, whose verdict "
                        "would end it: shorten it or lengthen the probation."
                    )
        merged = {**default_ladders(probation_steps), **given}
        self.engine = EscapeEngine(
            EscapePolicy(
                merged,
                max_escapes=max_escapes,
                max_failures=max_failures,
                cooldown_steps=detector.patience if cooldown_steps is None else cooldown_steps,
            ),
            probation_steps=probation_steps,
            probation_extensions=probation_extensions,
            mode=detector.mode,
            guard_every_n_steps=guard_every_n_steps,
            noise_margin=noise_margin,
            keep_neutral=keep_neutral,
        )
        self._fit: tuple[pl.Trainer, pl.LightningModule] | None = None
        # Whether the optimizers kept per-coordinate step sizes when the last fit ended.
        self._rescaled = False
        # Whether an AMP scaler may skip this fit's steps (per-coordinate step sizes then guard).
        self._skippable = False
        self._hooks: list[Any] = []
        self._log: EscapeLogger | None = None
        self._warned: set[str] = set()
        # The parameters jumped (an escape acted, a rollback restored): loss references other
        # callbacks keep start over before the next batch trains.
        self._jumped = False
        self._log_dir: str | None = None
        # A trial was on probation at the last step and waits for the final validation.
        self._settle_due = False
        # The optimizer step a validation run for a verdict follows, while it runs.
        self._validating_after: int | None = None
        # The true count of batches that stepped, to put back before the checkpoints of a
        # validation run for a verdict after Lightning counted its step (see `run_validation`).
        self._step_count: int | None = None
        # The latest batch that stepped (without its outputs): the evidence of a verdict given
        # at the end of a validation after it.
        self._last_batch: Batch | None = None
        # The step of the latest markers written, and their values: one point per step.
        self._marked: tuple[int, dict[str, float]] | None = None
        # What the validations measured, for a rollback to put back in place of the trial's.
        self._validation = ValidationMetrics()
        # The step the fit's last validation follows (see `last_validation_step`), and the
        # epoch length and reload setting it was foreseen from.
        self._last_validation: int | None = None
        self._foreseen_from: tuple[Any, int] | None = None

    def __repr__(self) -> str:
        events = self.events
        kept = sum(e.verdict == "accepted" for e in events)
        return (
            f"{type(self).__name__}({self.detector!r}, probation_steps="
            f"{self.engine.probation_steps}, {len(events)} escapes, {kept} kept)"
        )

    @property
    def events(self) -> list[EscapeEvent]:
        """Every escape so far, with its verdict once judged."""
        return self.engine.events

    @property
    def diagnoses(self) -> list[Diagnosis]:
        """Every diagnosis the detector made."""
        return self.detector.diagnoses

    @property
    def policy(self) -> EscapePolicy:
        """The ladders, budget, cooldown and stopping rule."""
        return self.engine.policy

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints: one per ``monitor`` and ``mode``."""
        # Lightning reads it around every hook call (to name profiler sections): build it once.
        key: str | None = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = self._generate_state_key(
                monitor=self.detector.monitor, mode=self.detector.mode
            )
        return key

    # ------------------------------------------------------------------ steps
    # Its hooks (see Watcher) call these, and these call the detector's and the engine's.

    @override
    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(callback is self.detector for callback in getattr(trainer, "callbacks", [])):
            # Lightning would call its hooks too: every batch counted twice, two diagnoses each.
            raise ValueError(
                f"The detector given to {type(self).__name__}, {self.detector!r}, is also in the "
                "Trainer's `callbacks`: the escape callback drives it itself. Remove it from "
                "`callbacks`."
            )
        # A new fit starts from scratch; a resumed one gets its state back from the checkpoint.
        self.engine.reset()
        self.detector.attach(trainer, pl_module)
        self._fit = (trainer, pl_module)
        self._rescaled = False
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._skippable = scaler is not None and scaler.is_enabled()
        self._log = EscapeLogger(trainer)
        self._warned = set()
        self._log_dir = log_dir(trainer)
        self._settle_due = False
        self._jumped = False
        self._validating_after = None
        self._step_count = None
        self._last_batch = None
        self._marked = None
        self._validation = ValidationMetrics()

    @override
    def start(self, trainer: pl.Trainer) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        self.detector.start(trainer)
        self.engine.passive = isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy))
        self.engine.horizon = _horizon(trainer)
        # A verdict on a metric logged at validation waits for one (unless it runs its own).
        self._foresee_last_validation(trainer)
        if self.engine.passive:
            warn_once(
                self._warned,
                f"EscapeCallback does not escape under {type(trainer.strategy).__name__} (sharded "
                "parameters and optimizer state); it only detects and diagnoses.",
            )
        foreign = _foreign_tensors(trainer)
        if foreign and not self.engine.passive:
            # A rollback restores the module and the optimizers' state: a tensor the optimizer
            # steps outside the module would keep the trial's value beside restored momentum.
            self.engine.passive = True
            warn_once(
                self._warned,
                f"EscapeCallback does not escape here: the optimizers step {foreign} tensor(s) "
                f"that are not parameters of {type(trainer.lightning_module).__name__}, which a "
                "rollback could not restore; make them `nn.Parameter`s of the module. It only "
                "detects and diagnoses.",
            )
        # Right after each parameter update, before Lightning steps any scheduler.
        self._hooks = [opt.register_step_post_hook(self._after_step) for opt in trainer.optimizers]
        if self.engine.busy:  # resumed from a checkpoint taken while an escape acted
            self.engine.resume(self._context(trainer, step_index(trainer)))
        if self._log is not None:
            self._log.layout(_LAYOUT)

    def _foresee_last_validation(self, trainer: pl.Trainer) -> None:
        """The step the fit's last validation follows, as the fit is set up now (or None)."""
        self._foreseen_from = _epoch_setup(trainer)
        self._last_validation = None if self.validate_verdicts else last_validation_step(trainer)

    @override
    def start_batch(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        self.detector.recount(trainer)  # after a resume, before any step is read
        module = self._module(trainer)
        if batch_idx == 0 and self._foreseen_from != _epoch_setup(trainer):
            # A dataloader reloaded at another length (a `BatchSizeChange` through it): foresee
            # again from the epoch that starts.
            self._foresee_last_validation(trainer)
        if (
            self.engine.trial is not None
            and self.detector.validation_value_waits
            and batch_idx % trainer.accumulate_grad_batches == 0
        ):
            # A validation inside an accumulation window measured the trial (one after a step
            # was judged at its end): judge it where the next window begins, not at the next
            # check; a rollback inside the window would leave the trial's gradients in it. The
            # window's step trained on the trial too, and is thrown away with it.
            self._judge_validation(
                Batch(trainer, module, batch, batch_idx), last=step_index(trainer) - 1
            )
        last = self.detector.last_step
        idle = self.engine.trial is None
        found = self.detector.start_batch(trainer, batch, batch_idx, diagnose=idle)
        if found is not None:
            # A validation measured the model the last step left: an escape decided on its
            # value starts from that model (see `StallDetector.start_batch`).
            step = step_index(trainer) - 1 if last is None else last
            self._act_on(Batch(trainer, module, batch, batch_idx), found, step)
        if self._jumped:
            # Here, not where the jump happened: a SpikeDetection listed after this callback
            # took that batch's loss (from before the jump) into its reference since.
            self._jumped = False
            restart_spike_detection(getattr(trainer, "callbacks", []))
        if self.engine.busy:
            self.engine.at_batch_start(
                lambda: self._context(trainer, step_index(trainer), batch=batch),
                batch_idx,
                lambda: self._run(trainer, step_index(trainer)),
            )

    @override
    def observe(self, trainer: pl.Trainer, optimizer: Optimizer) -> None:
        step = step_index(trainer)
        # Observe first: the detector sees the gradient itself, not an escape's noise.
        self.detector.observe(trainer, optimizer, step)
        # Per-coordinate step sizes a kept escape gave the optimizer (its state says so).
        rescale_gradients(optimizer, skippable=self._skippable)
        if not self.engine.acting(step):
            return
        self.engine.before_optimizer_step(self._context(trainer, step), optimizer)
        if self.detector.gradients is not None:
            # A kick changed the rate after the monitor read it: log the rate the step uses.
            self.detector.gradients.refresh_learning_rates(trainer, optimizer)

    def _module(self, trainer: pl.Trainer) -> pl.LightningModule:
        return trainer.lightning_module if self._fit is None else self._fit[1]

    def _judge_validation(self, batch: Batch, last: int) -> None:
        """Read the value a validation logged and give the trial on probation its news.

        Every process alike (they all ran the validation): at the validation's end when it
        follows a step, else before the batch where the next accumulation window begins. It
        diagnoses nothing new (the trial is what is being measured) and reports a divergence at
        once, as a check would.

        Args:
            batch: The batch the escapes' line searches would evaluate the loss on.
            last: The last optimizer step taken: a rollback now throws away every step up to
                it, which the verdict then names (a step taken after the validation inside its
                accumulation window included), not only those up to the value's step.
        """
        detector = self.detector
        validating = batch.trainer.validating
        found = detector.check(batch, diagnose=False, measure=False, show=not validating)
        if found.status.step < last:
            found = dataclasses.replace(found, status=dataclasses.replace(found.status, step=last))
        run = _FitRun(self, batch.trainer, batch.module, detector.evidence_batch(batch), last + 1)
        self._report(found.status.step, self.engine.check(run, found))
        if self.engine.trial is None and not validating:
            progress_bar(batch.module, "probation", 0.0)

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._fit is None or self.engine.trial is None:
            return
        trainer = self._fit[0]
        self.engine.after_optimizer_step(self._context(trainer, step_index(trainer)), optimizer)

    def _act_on(self, batch: Batch, found: Check | None, step: int) -> None:
        """Give the engine a check's news after optimizer step ``step``; end a finished effect."""
        run = _FitRun(
            self, batch.trainer, batch.module, self.detector.evidence_batch(batch), step + 1
        )
        self.engine.validation_horizon = (
            self._last_validation if self.detector.awaits_validation else None
        )
        # Without a fresh monitored value (between two validations) only a divergence is news.
        if found is not None and (
            found.fresh or found.status.nonfinite or found.diagnosis is not None
        ):
            if self.engine.trial is not None and found.status.step < step:
                # A value measured before the last step taken (a validation inside the
                # accumulation window that just stepped): a rollback now throws away every step
                # up to `step`, which the verdict names, as at a validation's end.
                found = dataclasses.replace(
                    found, status=dataclasses.replace(found.status, step=step)
                )
            self._report(found.status.step, self.engine.check(run, found))
            if self.engine.trial is not None:
                # The escape that needed the probe's eigenvector has acted; a trial holds a
                # snapshot, and the eigenvector would be one more copy of the parameters.
                self.detector.release_eigenvector()
        self.engine.after_batch(run, step)

    @override
    def end_batch(self, batch: Batch) -> None:
        idle = self.engine.trial is None
        found = self.detector.end_batch(batch, diagnose=idle, measure=idle)
        step = self.detector.last_step
        if step is None or (found is None and self.engine.trial is None):
            return  # accumulating, or nothing to decide or end in this batch
        # The batch a validation after this step judges a trial on (only a trial needs it).
        self._last_batch = batch._replace(outputs=None)
        if len(batch.trainer.optimizers) > 1 and batch.trainer.global_step > step + 1:
            # Several optimizers step in a batch: the end of the fit, in batches, is known better
            # with every batch.
            self.engine.horizon = _horizon(batch.trainer, stepped=step + 1)
        self._act_on(batch, found, step)
        if self.engine.trial is not None and (
            _last_step(batch.trainer, batch.idx) or stopping(batch.trainer)
        ):
            # Judge now, not in `on_train_end`: the checkpoints written at the end of this epoch
            # (`last.ckpt`) must hold the final model, never a trial's that is rolled back later,
            # and other callbacks' `on_train_end` may change the model first (ModelPruning makes
            # its pruning permanent, renaming the parameters: no exact rollback after that).
            # A metric logged at validation waits for the validation after this step, if one
            # runs (judged at its end, before checkpoints are written there), else for the end
            # of the epoch.
            if self.detector.awaits_validation:
                self._settle_due = True
            else:
                self._settle(batch.trainer, batch.module)
        trial = self.engine.trial
        if trial is not None:
            # In the progress bar: how far the escape on probation has come (0 when none is).
            done = (step - trial.start + 1) / max(1, trial.end - trial.start + 1)
            progress_bar(batch.module, "probation", min(1.0, done))
        elif found is not None and self.events:
            progress_bar(batch.module, "probation", 0.0)
        trainer = batch.trainer
        if (
            not self._settle_due
            and self._verdict_needs_validation(trainer, at_end=False, last=step)
            and not validates_after_batch(trainer)
        ):
            # Last, once this batch is done with: the validation runs where Lightning's own
            # after this step would (its end judges the trial, before checkpoints are written),
            # so a checkpoint written in it resumes as one written at the end of a batch, and a
            # stop asked for in it takes effect before another batch trains.
            self._validate_for_verdict(trainer, step)
            if validates_after_batch(trainer):
                # A stop asked for in it: Lightning would validate this step again, and
                # EarlyStopping count that one too.
                skip_validation_after_batch(trainer)

    @override
    def detach(self) -> None:
        self.detector.detach()
        self._remove_hooks()
        self._rescaled = self._rescaling()
        self._fit = None
        self._log = None
        self._last_batch = None

    @override
    def end_epoch(self, trainer: pl.Trainer) -> None:
        self.detector.end_epoch(trainer)
        if self.engine.trial is not None and stopping(trainer):
            # Stopped after this batch's end (EarlyStopping at a validation, a Timer): judge the
            # trial before any callback's `on_train_end`, for the reasons in `end_batch`.
            self._settle_due = True
        if self._settle_due and self._verdict_needs_validation(trainer, at_end=True):
            self._validate_for_verdict(trainer)  # its end settles the trial
        if self._settle_due and self._fit is not None:
            self._settle(trainer, self._fit[1])  # no validation after the last step
        self.engine.at_epoch_end(
            lambda: self._context(trainer, step_index(trainer)),
            lambda: self._run(trainer, step_index(trainer)),
        )

    @override
    def validation_start(self, trainer: pl.Trainer) -> None:
        self._validation.start(trainer)
        self.detector.validation_start(trainer)

    @override
    def validation_end(self, trainer: pl.Trainer) -> None:
        if self._step_count is not None:
            # Before ModelCheckpoint saves (Lightning calls checkpoint callbacks last): the count
            # a restart expects; the metrics were logged at the step the validation follows.
            set_step_index(trainer, self._step_count)
            self._step_count = None
        self._validation.end(trainer, ignore=PROGRESS_BAR_FIELDS)
        self.detector.validation_end(trainer, step=self._validating_after)
        if self._settle_due and self._fit is not None:
            self._settle(trainer, self._fit[1])  # the validation after the last step
        elif (
            self.engine.trial is not None
            and self.detector.validation_value_waits
            and self.detector.last_step is not None
            and self._last_batch is not None
        ):
            # The validation follows a step (a complete accumulation window): judge the trial
            # now, before ModelCheckpoint's `on_validation_end` saves, so that checkpoints hold
            # the model the run goes on with (never a trial rolled back after them) and a stop
            # asked for at this validation leaves the final model in `last.ckpt`.
            self._judge_validation(self._last_batch, last=self.detector.last_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._settle(trainer, pl_module)
        self.detector.end_training(trainer)
        self._remove_hooks()
        if self._log is not None and self.report:
            self._log_report_image(self.detector.tracker.status().step)
        rank_zero_info(self.summary_text())

    def _verdict_needs_validation(
        self, trainer: pl.Trainer, *, at_end: bool, last: int | None = None
    ) -> bool:
        """Whether ``validate_verdicts`` runs a validation now, for the trial on probation.

        After a step: once probation is over (after optimizer step ``trial.end``) and no fresh
        value was measured since. At the end of training: unless a value measured the final model.
        Every process decides alike (the same steps, the same validations).

        Args:
            trainer: The trainer.
            at_end: Whether training has ended.
            last: The optimizer step the model has just taken; None where Lightning has counted
                it already (the end of an epoch).
        """
        trial = self.engine.trial
        if (
            not self.validate_verdicts
            or trial is None
            or self._fit is None
            or not self.detector.awaits_validation
            or not trainer.enable_validation
        ):
            return False
        if last is None:
            last = step_index(trainer) - 1  # the optimizer step the model has just taken
        measured = self.detector.measured_step
        measured = -1 if measured is None else measured
        if at_end:
            return measured < last
        return last >= trial.end > measured

    def _validate_for_verdict(self, trainer: pl.Trainer, step: int | None = None) -> None:
        """Run a validation for the trial's verdict, after optimizer step ``step``.

        Args:
            trainer: The trainer.
            step: The step the model has just taken; None where Lightning has counted it
                already (the end of an epoch): the count is set back while the validation
                logs, and put back at its end, before checkpoints are written.
        """
        trial = self.engine.trial
        assert trial is not None
        if step is None:
            step = step_index(trainer) - 1
            self._step_count = step_index(trainer)
        action = self.events[trial.event].action
        self._say(f"validation run after step {step} for the verdict on {action}", step)
        self._validating_after = step
        try:
            run_validation(trainer, count=None if self._step_count is None else step)
        finally:
            self._validating_after = None
            self._step_count = None

    def _settle(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Training ends: judge a trial with what it has; settle steps waiting for a boundary."""
        self._settle_due = False
        status = self.detector.read_final(trainer)
        run = _FitRun(self, trainer, pl_module, None, step_index(trainer))
        news = self.engine.finish(run, status, sampled=self.detector.sampled_step)
        self._report(status.step, news)

    def summary(self) -> dict[str, Any]:
        """What happened so far, as plain values: the facts of the summary at the end of fit.

        Returns:
            ``stalls`` (diagnoses per kind), ``held_off`` (stalls held off because the run was
            moving), ``held_off_training`` (because the training loss still improved, with a
            ``monitor`` metric), ``escapes`` (per escape step, counts per verdict),
            ``kept``, ``neutral``, ``rolled_back``, ``probation_steps`` (steps spent on probation),
            ``wasted_steps`` (steps of trials rolled back), ``steps``
            (:attr:`StallDetector.steps_seen`), ``per_coordinate_steps`` (whether the optimizers
            keep the per-coordinate step sizes a kept :class:`~lightning_escape.PerCoordinateSteps`
            gave them) and ``log_dir`` (where the logs are, or None).
        """
        now = self.detector.tracker.status().step
        facts = escape_facts(self.diagnoses, self.events, now)
        facts["held_off"] = len(self.detector.held_off)
        facts["held_off_training"] = len(self.detector.held_off_training)
        facts["steps"] = self.detector.steps_seen
        facts["per_coordinate_steps"] = self._rescaling()
        facts["log_dir"] = self._log_dir
        return facts

    def _rescaling(self) -> bool:
        """Whether the fit's optimizers have per-coordinate step sizes on (after it: had)."""
        if self._fit is None:
            return self._rescaled
        return any(rescaling(unwrap_optimizer(opt)) for opt in self._fit[0].optimizers)

    def summary_text(self) -> str:
        """:meth:`summary` as the paragraph logged at the end of fit."""
        return f"{type(self).__name__}: {describe_facts(self.summary())}"

    def _log_report_image(self, step: int) -> None:
        """Draw the run report into TensorBoard (rank zero, TensorBoard loggers only)."""
        from matplotlib.image import imread

        from lightning_escape.report import ReportError, load_run, render_png

        assert self._log is not None
        for writer in self._log.writers:
            writer.flush()
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    path = render_png(load_run(writer.get_logdir()), Path(tmp) / "report.png")
                    image = imread(path)
            except ReportError as err:
                warn_once(self._warned, f"EscapeCallback could not draw the run report: {err}")
                continue
            writer.add_image(f"{ESCAPE}/report", image, step, dataformats="HWC")

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Another callback (SpikeDetection, say) or the user's code ended the run: put back what
        # an unjudged escape changed, so the model left behind is the one before the escape.
        if self._fit is None:
            return
        step = self.detector.tracker.status().step
        run = _FitRun(self, trainer, pl_module, None, step_index(trainer))
        why = f"{type(exception).__name__}: {exception}".strip()
        self._report(step, self.engine.abort(run, step, why))
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------ reporting

    def _run(self, trainer: pl.Trainer, step: int) -> _FitRun:
        assert self._fit is not None, "the escape callback acts only inside a fit"
        return _FitRun(self, trainer, self._fit[1], None, step)

    def _context(self, trainer: pl.Trainer, step: int, batch: Any = None) -> EscapeContext:
        ctx = self._run(trainer, step).context()
        ctx.batch = batch  # the batch starting now, for the steps' `at_batch_start`
        return ctx

    def _report(self, step: int, news: list[News]) -> None:
        """Log what the engine did at the check of ``step``, with 0/1 markers for every check.

        The markers are 0 at every check and nonzero only at an event, so TensorBoard draws
        spikes at the events rather than smoothing them into a level.
        """
        markers = {f"{ESCAPE}/escape": 0.0, f"{ESCAPE}/verdict": 0.0}
        for item in news:
            if isinstance(item, EscapeEvent):
                if item.verdict == "pending":
                    markers[f"{ESCAPE}/escape"] = 1.0
                    self.detector.jumped()  # the escape moved the parameters, not training
                    self._jumped = True
                    self._report_escape(item)
                else:
                    markers[f"{ESCAPE}/verdict"] = -1.0  # a rollback after divergence
            elif isinstance(item, Verdict):
                markers[f"{ESCAPE}/verdict"] = VERDICT_MARKS[item.outcome]
                markers[f"{ESCAPE}/verdict_before"] = item.before
                markers[f"{ESCAPE}/verdict_after"] = item.after
                self._report_verdict(item)
            elif isinstance(item, Note):
                if item.warning:
                    warn_once(self._warned, item.text)
                self._say(item.text, item.step)
        markers[f"{ESCAPE}/probation"] = 0.0 if self.engine.trial is None else 1.0
        # One point per step: a second report at a step (the end of training after the last
        # check, a verdict at the validation after a check) writes only the markers it changes,
        # and never an event marker's 0 over the event it marked there.
        if self._marked is not None and self._marked[0] == step:
            written = self._marked[1]
            markers = {
                tag: v
                for tag, v in markers.items()
                if written.get(tag) != v and not (tag in _EVENT_MARKERS and v == 0.0)
            }
            written.update(markers)
        else:
            self._marked = (step, dict(markers))
        if self._log is not None and markers:
            self._log.scalars(markers, step)

    def _report_escape(self, event: EscapeEvent) -> None:
        if self._log is not None:
            self._log.text(
                f"{ESCAPE}/escape",
                f"**{event.action}** at step {event.step} against **{event.diagnosis}**: "
                f"{event.reason}. {self._judged_when()}.",
                event.step,
            )
        if self.verbose:
            rank_zero_info(f"[EscapeCallback] step {event.step}: {event.action}: {event.reason}")

    def _judged_when(self) -> str:
        """When the trial just started will be judged, as the engine and the detector decide it.

        Probation ends at ``trial.end``, counted from the step of the sample that called the
        stall (for a metric logged at validation, the validation's step, which is the escape's
        unless that validation fell inside an accumulation window). The verdict then waits for
        the first fresh value from there: the next validation, or the next check for the
        training loss.
        """
        trial = self.engine.trial
        if trial is None:
            return "Judged at the end of probation"
        end = trial.end
        detector = self.detector
        if detector.awaits_validation:
            return f"Judged at the first validation after step {end}"
        if detector.monitor is not None:
            return f"Judged at the first check from step {end} with a new {detector.monitor}"
        every = detector.check_every_n_steps
        return f"Judged at step {-(-(end + 1) // every) * every - 1}"  # the first check >= end

    def _report_verdict(self, verdict: Verdict) -> None:
        metric = self.detector.metric_name
        if self._log is not None:
            self._log.text(
                f"{ESCAPE}/verdict",
                f"**{verdict.outcome}**: {verdict.action} from step {verdict.started}: "
                f"{metric} {verdict.reason}",
                verdict.step,
            )
        if self.verbose:
            rank_zero_info(
                f"[EscapeCallback] step {verdict.step}: {verdict.outcome}: {metric} {verdict.reason}"
            )

    def _warn_early_readers(self, trainer: pl.Trainer) -> None:
        """Name the stopping callbacks listed before this one: they read the trial's values.

        At a validation that rolls a trial back, a callback whose ``on_validation_end`` ran
        before this one's has counted the trial's value, a value no model the run goes on with
        has (``EarlyStopping`` takes a rolled-back trial's gain for the run's best).
        """
        from lightning.pytorch.callbacks import EarlyStopping

        callbacks = list(getattr(trainer, "callbacks", []))
        before = callbacks[: callbacks.index(self)] if self in callbacks else []
        early = sorted({type(c).__name__ for c in before if isinstance(c, EarlyStopping)})
        if early:
            warn_once(
                self._warned,
                f"{', '.join(early)} is listed before EscapeCallback in `callbacks`: at a "
                "validation that rolls a trial back it reads the trial's values, not the restored "
                "model's (it may count them, or stop the run on them); list EscapeCallback before "
                "it.",
            )

    def _say(self, text: str, step: int) -> None:
        if self._log is not None:
            self._log.text(f"{ESCAPE}/escape", text, step)
        if self.verbose:
            rank_zero_info(f"[EscapeCallback] {text}")

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector.state_dict(),
            "engine": self.engine.state_dict(),
            "validation": self._validation.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.load_state_dict(state_dict["detector"])
        self.engine.load_state_dict(state_dict["engine"])
        validation = state_dict.get("validation")
        if validation is None:
            # Written by a version whose detector kept the latest validation of its monitor.
            measured = state_dict["detector"].get("monitored", {}).get("measured")
            validation = {} if measured is None else dict(measured[1])
        self._validation.load_state_dict(validation)


# Markers that are nonzero only at the step of an event (an escape, a verdict).
_EVENT_MARKERS = frozenset({f"{ESCAPE}/escape", f"{ESCAPE}/verdict"})


def _foreign_tensors(trainer: pl.Trainer) -> int:
    """How many tensors the optimizers step that are not the module's parameters."""
    owned = {id(p) for p in trainer.lightning_module.parameters()}
    return sum(
        id(p) not in owned
        for optimizer in trainer.optimizers
        for group in optimizer.param_groups
        for p in group["params"]
    )


def _epoch_setup(trainer: pl.Trainer) -> tuple[Any, int]:
    """What the fit's schedule of validations depends on that a dataloader reload changes."""
    return trainer.num_training_batches, getattr(trainer, "reload_dataloaders_every_n_epochs", 0)


def _reshaping_callbacks() -> tuple[type, ...]:
    from lightning.pytorch.callbacks import (
        BaseFinetuning,
        ModelPruning,
        StochasticWeightAveraging,
    )

    return (BaseFinetuning, ModelPruning, StochasticWeightAveraging)


# Lightning's callbacks that add parameter groups, swap schedulers or rename parameters.
_RESHAPING_CALLBACKS = _reshaping_callbacks()


def _horizon(trainer: pl.Trainer, stepped: int | None = None) -> int | None:
    """Index of the last optimizer step the fit will take, or None when it is not known.

    In the callback's count (:func:`step_index`): one step per batch that stepped. ``stepped``:
    the batches that stepped so far, where Lightning has not counted the current one yet.
    """
    # inf for endless runs; with unsized data `max_steps`, which is -1 when it is not set.
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total) or total < 0:
        return None
    last = int(total) - 1
    stepped = step_index(trainer) if stepped is None else stepped
    steps = trainer.global_step
    if len(trainer.optimizers) > 1 and trainer.max_steps >= 0 and steps > stepped > 0:
        # Several optimizers stepped in a batch (manual optimization): `max_steps` counts each of
        # their steps. Convert the steps left at the rate seen so far. (With one optimizer the two
        # counts can differ by one for a moment, at the start of a run resumed mid-epoch.)
        last = min(last, stepped - 1 + math.ceil((trainer.max_steps - steps) * stepped / steps))
    return last


def _last_step(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether the optimizer step just taken is the run's last (by max_steps or max_epochs).

    A stop another callback decides later (EarlyStopping at validation) cannot be foreseen.
    """
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0:
        return False
    last_batch = batch_idx + 1 >= trainer.num_training_batches
    return last_batch and trainer.current_epoch + 1 >= max_epochs


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's hyper-parameters (not its parameters), copied."""
    return {
        k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
        for k, v in group.items()
        if k != "params"
    }


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ValueError(
            "`report=True` draws the run report with matplotlib, which is not installed: "
            'pip install "lightning-escape[report]" (or pip install matplotlib).'
        ) from err


class _FitRun:
    """The running fit as the escape engine sees it (built per call, never kept).

    Args:
        callback: The escape callback.
        trainer: The trainer.
        module: The module.
        batch: The batch a line search evaluates the loss on, or None.
        step: Index of the next optimizer step.
    """

    def __init__(
        self,
        callback: EscapeCallback,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        batch: Batch | None,
        step: int,
    ) -> None:
        self._callback = callback
        self._trainer = trainer
        self._module = module
        self._batch = batch
        self._step = step

    def context(self) -> EscapeContext:
        trainer, module, detector = self._trainer, self._module, self._callback.detector
        batch = self._batch
        loss = None
        reduce = detector.reduce(trainer)
        if batch is not None and detector.probe_unavailable(trainer, module) is None:
            classifier = detector.classifier

            def loss() -> float:
                return evaluate_loss(
                    module,
                    batch.data,
                    loss_fn=classifier.loss_fn,
                    batch_idx=batch.idx,
                    seed=classifier.seed,
                    reduce=reduce,
                )

        return EscapeContext(
            module=module,
            optimizers=list(trainer.optimizers),
            step=self._step,
            seed=self._callback.seed,
            spectrum=detector.last_spectrum,
            loss=loss,
            trainer=trainer,
            grad_scale=lambda opt: amp_grad_scale(trainer, opt),
            reduce=reduce,
        )

    def capture(self) -> Saved:
        trainer = self._trainer
        snapshot = TrainingSnapshot.capture(
            self._module,
            trainer.optimizers,
            trainer.lr_scheduler_configs,
            getattr(trainer.precision_plugin, "scaler", None),
            device=self._callback.snapshot_device,
        )
        averages = capture_averages(
            getattr(trainer, "callbacks", []), device=self._callback.snapshot_device
        )
        detector = self._callback.detector
        # What the latest validations measured: of this model when one just did (a trial on a
        # metric logged at validation starts there), else of the model this one came from.
        metrics = dict(self._callback._validation.latest)
        bests = capture_bests(getattr(trainer, "callbacks", []))
        return Saved(snapshot, detector.rollback_state(), self._world(), averages, metrics, bests)

    def _world(self) -> dict[str, Any]:
        """The shape of the run a restore must find again: what other callbacks may change."""
        trainer = self._trainer
        return {
            # Another optimizer's state does not fit (SGD's momentum into Adam: KeyError later).
            "optimizers": [type(opt).__name__ for opt in trainer.optimizers],
            "groups": [[len(g["params"]) for g in opt.param_groups] for opt in trainer.optimizers],
            "schedulers": [type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs],
            "parameters": [name for name, _ in self._module.named_parameters()],
            # A cache rebuilt at another size (rotary embeddings, masks) cannot take the old one.
            "buffers": [(name, tuple(b.shape)) for name, b in self._module.named_buffers()],
        }

    def _changed(self, saved: Saved) -> str | None:
        """What changed since ``saved`` was taken, and who may have changed it; None if nothing."""
        now = self._world()
        what = [
            label
            for key, label in (
                ("optimizers", "the optimizers"),
                ("groups", "the optimizers' parameter groups"),
                ("schedulers", "the learning-rate schedulers"),
                ("parameters", "the module's parameters"),
                ("buffers", "the module's buffers"),
            )
            if key in saved.world and saved.world[key] != now[key]
        ]
        if not what:
            return None
        callbacks = [c for c in getattr(self._trainer, "callbacks", []) if c is not self._callback]
        # Name only Lightning's callbacks known to reshape a run (once each): any other callback
        # is as likely innocent as the module itself (a Timer never touches the optimizers).
        reshaping = dict.fromkeys(
            type(c).__name__ for c in callbacks if isinstance(c, _RESHAPING_CALLBACKS)
        )
        who = ", ".join(reshaping) if reshaping else "the module or another callback"
        return f"{' and '.join(what)} changed during the escape (by {who})"

    def restore(self, saved: Saved) -> None:
        """Restore the model, the optimizer state and the scaler; leave the schedules in time.

        A rollback undoes the escape, not the passage of time: the learning-rate schedules, and
        the hyper-parameters they set in the parameter groups, stand where the steps since the
        escape brought them, which is where they would stand without it (escapes never show a
        scheduler a changed rate). A schedule that reads a metric (``ReduceLROnPlateau``), and
        ``EarlyStopping``, may have seen the trial's values: their best value is put back as it
        was when the trial started (see :mod:`lightning_escape.bests`), their counts stand.
        """
        changed = self._changed(saved)
        if changed is not None:
            raise WorldChanged(changed)
        trainer = self._trainer
        configs = trainer.lr_scheduler_configs
        schedules = [copy.deepcopy(config.scheduler.state_dict()) for config in configs]
        # Pruning masks are another callback's (an escape never prunes): they stay as they are.
        masks = {
            name: b.detach().clone()
            for name, b in self._module.named_buffers()
            if name.endswith("_mask")
        }
        groups = [[_hyper(g) for g in opt.param_groups] for opt in trainer.optimizers]
        saved.snapshot.restore(
            self._module,
            trainer.optimizers,
            configs,
            getattr(trainer.precision_plugin, "scaler", None),
        )
        for config, state in zip(configs, schedules):
            started = config.scheduler.state_dict()  # as the trial found it
            config.scheduler.load_state_dict(state)
            restore_plateau_best(config.scheduler, started)
        if masks:
            with torch.no_grad():
                for name, buffer in self._module.named_buffers():
                    if name in masks:
                        buffer.copy_(masks[name])
        for opt, hyper in zip(trainer.optimizers, groups):
            for group, values in zip(opt.param_groups, hyper):
                for key, value in values.items():
                    if isinstance(group.get(key), Tensor):
                        group[key].copy_(value)
                    else:
                        group[key] = value
        # Averages of the weights other callbacks keep (SWA, EMA) took in the trial's weights.
        restore_averages(getattr(trainer, "callbacks", []), saved.averages)
        restore_bests(getattr(trainer, "callbacks", []), saved.bests)
        self._callback.detector.roll_back(saved.detector)
        self._callback._jumped = True
        # Every reader of the validation metrics from now on (ModelCheckpoint, which saves the
        # restored model at the end of the validation that judged the trial, or every `n`
        # training steps) reads what was measured of the restored model, not of the trial.
        if saved.metrics:
            put_back_metrics(trainer, saved.metrics)
            self._callback._validation.latest.update(saved.metrics)
            if trainer.validating:
                self._callback._warn_early_readers(trainer)

    def restart_window(self, step: int) -> None:
        self._callback.detector.restart_window(step)

    def status(self) -> StallStatus:
        return self._callback.detector.tracker.status()

    def stop(self, reason: str) -> None:
        # The decision comes from values reduced across processes: every rank stops alike.
        self._trainer.should_stop = True


_LAYOUT = {
    ESCAPE: {
        "escapes (1 at each) and probation (1 while on it)": [
            "Multiline",
            [rf"^{ESCAPE}/(escape|probation)$"],
        ],
        "verdicts (+1 kept, -1 rolled back)": ["Multiline", [rf"^{ESCAPE}/verdict$"]],
        "monitored value, and before and after each escape": [
            "Multiline",
            [rf"^{ESCAPE}/verdict_(before|after)$", rf"^{STALL}/monitored$"],
        ],
    },
}
