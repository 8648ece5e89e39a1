"""EscapeCallback: diagnose a stalled run, escape it, judge the escape, roll back what failed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer
from typing_extensions import override

from lightning_escape._lightning import amp_grad_scale, warn_once
from lightning_escape._validation import (
    check_choice,
    check_nonnegative_int,
    check_optional_positive_int,
    check_positive_int,
)
from lightning_escape.callbacks.detector import LossFn, StallDetector
from lightning_escape.detectors import Diagnosis, Mode, StallStatus
from lightning_escape.escapes import EscapeContext, EscapeStep
from lightning_escape.logging import PREFIX
from lightning_escape.policy import ESCAPABLE, EscapePolicy, default_ladders
from lightning_escape.probe import ProbeUnavailable, evaluate_loss
from lightning_escape.snapshot import TrainingSnapshot

__all__ = ["EscapeCallback"]

Verdict = Literal["accepted", "rolled_back", "pending"]


@dataclass
class _Trial:
    """An escape on probation."""

    kind: str
    rung: int
    strength: int
    step: EscapeStep
    start: int  # optimizer step the escape was applied after
    end: int  # first step at which the verdict may be given
    before: float  # smoothed monitored value when the escape started
    threshold: float  # improvement that counts as help
    event: int  # index in `events`
    snapshot: TrainingSnapshot
    detector: dict[str, Any]  # the detector's state to restore with the snapshot
    effect_done: bool = False
    extensions: int = 0  # probation windows added because the escape was helping, not yet enough


class EscapeCallback(StallDetector):
    r"""Watch, diagnose, escape, judge and roll back: the whole loop, as one drop-in callback.

    ``Trainer(callbacks=[EscapeCallback()])`` works on any LightningModule:

    1. It detects and diagnoses stalls exactly as :class:`~lightning_escape.StallDetector` does (all
       of its arguments apply) and logs the gradients as :class:`~lightning_escape.GradientMonitor`.
    2. On a stall it takes the next escape step from the diagnosis' ladder (see
       :func:`~lightning_escape.policy.default_ladders`; steps that cannot act here are passed over).
    3. Before acting it snapshots the model, the optimizers (state and learning rates), the
       schedulers and the AMP scaler, on the device or on the CPU.
    4. After ``probation_steps`` it compares the smoothed monitored value with its level before the
       escape: better by the detector's tolerance, the escape is kept; better by less, probation is
       extended (up to ``probation_extensions`` times); otherwise everything is restored bit for bit
       and it escalates at once (the next rung, or the ladder again, stronger).
    5. After ``max_failures`` consecutive failed escapes from the same point it concludes that the
       run sits in the best basin it can find and stops escaping there (Jin et al. 2017), until the
       run improves by itself. ``max_escapes`` bounds the whole run, ``cooldown_steps`` the pace.
    6. Divergence is never escaped: during probation it rolls the trial back; otherwise it rolls
       back to the last good snapshot when ``guard_every_n_steps`` keeps one.
    7. At the end of training a trial on probation is judged with what it has, so the final model
       is never a failed trial's.

    Every escape is in :attr:`events` (plain dicts: ``step``, ``diagnosis``, ``action``,
    ``verdict``, ``reason``, ``before``, ``after``, ``end_step``) and in TensorBoard: a text event
    saying what was done, how strongly and why, the scalars ``escape/escape`` (1 at each escape),
    ``escape/verdict`` (+1 accepted, -1 rolled back) with ``escape/verdict_before`` and
    ``escape/verdict_after``, and the effective learning rate.

    Random draws come from generators seeded from ``seed`` and the global step: every DDP process
    applies the same noise and jumps, and a resumed run repeats them. Everything needed to resume,
    mid-probation or mid-kick, is in the callback's ``state_dict`` (tensors and plain values).

    It stays passive, with a warning, where it cannot act safely: under FSDP and DeepSpeed (sharded
    state), it still detects and diagnoses but does not escape.

    Args:
        monitor: See :class:`~lightning_escape.StallDetector`.
        mode: See :class:`~lightning_escape.StallDetector`.
        patience: See :class:`~lightning_escape.StallDetector`.
        warmup_steps: See :class:`~lightning_escape.StallDetector`.
        min_delta: See :class:`~lightning_escape.StallDetector`; also the help an escape must bring.
        min_delta_rel: See :class:`~lightning_escape.StallDetector`; likewise.
        smoothing: See :class:`~lightning_escape.StallDetector`.
        check_every_n_steps: See :class:`~lightning_escape.StallDetector`; verdicts are given at
            checks too.
        probe: See :class:`~lightning_escape.StallDetector`.
        lanczos_steps: See :class:`~lightning_escape.StallDetector`.
        loss_fn: See :class:`~lightning_escape.StallDetector`; also used by the line search of
            :class:`~lightning_escape.escapes.NegativeCurvatureStep`.
        plateau_tol: See :class:`~lightning_escape.StallDetector`.
        saddle_tol: See :class:`~lightning_escape.StallDetector`.
        dead_fraction: See :class:`~lightning_escape.StallDetector`.
        divergence_factor: See :class:`~lightning_escape.StallDetector`.
        ladders: Escape steps per diagnosis kind (``plateau``, ``saddle``, ``local_minimum``,
            ``symmetric_units``, ``dead_units``); kinds not given keep their default ladder, and an
            empty list switches escapes off for that kind.
        probation_steps: Optimizer steps an escape runs before its verdict.
        probation_extensions: Times a verdict may be put off by another ``probation_steps`` while
            the escape helps but not yet by the tolerance.
        cooldown_steps: Steps after an accepted escape before the next; ``None`` for ``patience``.
        max_escapes: Escapes allowed in the whole run.
        max_failures: Consecutive failed escapes after which it stops escaping from that point.
        snapshot_device: ``"same"`` keeps snapshots on the parameters' devices, ``"cpu"`` on the host.
        guard_every_n_steps: Keep a snapshot of the last healthy state every this many steps (at a
            check), to roll back to when the run diverges outside probation. Off by default: it
            holds a copy of the model and optimizer state.
        log_gradients: See :class:`~lightning_escape.StallDetector`.
        seed: Seed of every random draw (noise, jumps, probes).
        verbose: Also print each diagnosis, escape and verdict.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_escape.demos.problems import StrictSaddle2D
        >>> escape = EscapeCallback(patience=30, warmup_steps=0, probation_steps=30, smoothing=0.0)
        >>> trainer = pl.Trainer(callbacks=[escape], max_steps=100, logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False,
        ...                      enable_checkpointing=False)
        >>> problem = StrictSaddle2D()  # gradient descent from (1, 0) converges to the saddle
        >>> trainer.fit(problem)
        >>> [(e["diagnosis"], e["action"], e["verdict"]) for e in escape.events]
        [('saddle', 'NegativeCurvatureStep(scale=1.0, max_evals=24)', 'accepted')]
        >>> problem.solved()
        True
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
        lanczos_steps: int = 20,
        loss_fn: LossFn | None = None,
        plateau_tol: float = 1e-3,
        saddle_tol: float = 1e-2,
        dead_fraction: float = 0.5,
        divergence_factor: float = 1.0,
        ladders: Mapping[str, Sequence[EscapeStep]] | None = None,
        probation_steps: int = 200,
        probation_extensions: int = 2,
        cooldown_steps: int | None = None,
        max_escapes: int = 10,
        max_failures: int = 3,
        snapshot_device: Literal["same", "cpu"] = "same",
        guard_every_n_steps: int | None = None,
        log_gradients: bool = True,
        seed: int = 0,
        verbose: bool = False,
    ) -> None:
        super().__init__(
            monitor=monitor,
            mode=mode,
            patience=patience,
            warmup_steps=warmup_steps,
            min_delta=min_delta,
            min_delta_rel=min_delta_rel,
            smoothing=smoothing,
            check_every_n_steps=check_every_n_steps,
            probe=probe,
            lanczos_steps=lanczos_steps,
            loss_fn=loss_fn,
            plateau_tol=plateau_tol,
            saddle_tol=saddle_tol,
            dead_fraction=dead_fraction,
            divergence_factor=divergence_factor,
            log_gradients=log_gradients,
            seed=seed,
            verbose=verbose,
        )
        self.probation_steps = check_positive_int("probation_steps", probation_steps)
        self.probation_extensions = check_nonnegative_int(
            "probation_extensions", probation_extensions
        )
        if cooldown_steps is not None:
            check_nonnegative_int("cooldown_steps", cooldown_steps)
        self.cooldown_steps = cooldown_steps
        self.snapshot_device: Literal["same", "cpu"] = check_choice(
            "snapshot_device", snapshot_device, ("same", "cpu")
        )
        self.guard_every_n_steps = check_optional_positive_int(
            "guard_every_n_steps", guard_every_n_steps
        )
        if ladders is not None and not isinstance(ladders, Mapping):
            raise ValueError(
                f"`ladders` must be a mapping of kind to escape steps, got {ladders!r}."
            )
        merged = default_ladders(self.probation_steps)
        merged.update({k: list(v) for k, v in (ladders or {}).items()})
        self.policy = EscapePolicy(
            merged,
            max_escapes=max_escapes,
            max_failures=max_failures,
            cooldown_steps=patience if cooldown_steps is None else cooldown_steps,
        )
        self.events: list[dict[str, Any]] = []
        self._trial: _Trial | None = None
        self._finishing: list[EscapeStep] = []  # undone steps still waiting for a boundary
        self._guard: tuple[TrainingSnapshot, dict[str, Any]] | None = None
        self._diagnosis: Diagnosis | None = None
        self._passive: str | None = None
        self._hooks: list[Any] = []
        self._batch: tuple[Any, int] | None = None
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None

    # ------------------------------------------------------------------ hooks

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        self._passive = None
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            self._passive = (
                f"EscapeCallback does not escape under {type(trainer.strategy).__name__} (sharded "
                "parameters and optimizer state); it only detects and diagnoses."
            )
            warn_once(self._warned, self._passive)
        # Right after each parameter update, before Lightning steps any scheduler.
        self._hooks = [opt.register_step_post_hook(self._after_step) for opt in trainer.optimizers]
        if self._log is not None:
            self._log.layout(_LAYOUT)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        ctx = None
        for step in self._live_steps():
            ctx = ctx or self._context(trainer, pl_module)
            step.at_batch_start(ctx, batch_idx)
        self._finishing = [s for s in self._finishing if s.busy()]

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        trial = self._trial
        if trial is None or trial.effect_done:
            return
        step = trainer.global_step
        if trial.start <= step < trial.start + trial.step.duration:
            ctx = self._context(trainer, pl_module)
            trial.step.before_optimizer_step(ctx, optimizer)
            self.grads.record_lr(trainer, optimizer)

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        trial = self._trial
        # Only while the step acts: one-shot steps and finished effects have nothing to do here.
        if trial is None or trial.effect_done or self._trainer is None or self._module is None:
            return
        trial.step.after_optimizer_step(self._context(self._trainer, self._module), optimizer)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._trainer, self._module = trainer, pl_module
        self._batch = (batch, batch_idx)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        trial = self._trial
        if (
            trial is not None
            and not trial.effect_done
            and trainer.global_step >= trial.start + trial.step.duration
        ):
            self._end_effect(trainer, pl_module, trial)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctx = None
        for step in self._live_steps():
            ctx = ctx or self._context(trainer, pl_module)
            step.at_epoch_end(ctx)
        self._finishing = [s for s in self._finishing if s.busy()]

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trial = self._trial
        if trial is not None:
            # Judge with what the trial has: the final model is never a failed trial's.
            self._read_back(trainer)
            self._verdict(trainer, pl_module, self.tracker.status(), final=True)
        ctx = self._context(trainer, pl_module)
        for step in self._finishing:
            step.settle(ctx)  # no more boundaries will come
        self._finishing = []
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer, self._module = trainer, pl_module

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------ the loop

    @override
    def check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> Diagnosis | None:
        best_before = self.tracker.status().best
        diagnosis = super().check(trainer, pl_module, batch, batch_idx)
        status = self.tracker.status()
        if self._trial is None and status.best != best_before and math.isfinite(status.best):
            # The run improved by itself (a trial's improvements are judged by its verdict).
            self.policy.improved()
        if diagnosis is not None and diagnosis.kind != "diverging":
            self._diagnosis = diagnosis
        trial = self._trial
        if trial is not None:
            # A trial may worsen the loss before it helps: only non-finite values cut it short.
            if status.nonfinite or (status.step >= trial.end and not self._extend(trial, status)):
                self._verdict(trainer, pl_module, status)
            return diagnosis
        if self._passive is not None:
            return diagnosis
        if diagnosis is not None and diagnosis.kind == "diverging":
            self._rollback_to_guard(trainer, pl_module, diagnosis)
        elif diagnosis is not None and diagnosis.kind in ESCAPABLE:
            self._escape(trainer, pl_module, status)
        elif status.stalled and self._diagnosis is not None and self._reported is not None:
            # Still stuck after a cooldown or a conclusion ended: try again from where we stand.
            if self._diagnosis.kind in ESCAPABLE and not self.policy.concluded:
                self._escape(trainer, pl_module, status, quiet=True)
        elif not status.stalled and status.diverging is None:
            self._keep_guard(trainer, pl_module, status)
        return diagnosis

    @override
    def _diagnosing(self) -> bool:
        # While an escape is on probation its effects are judged by the verdict, not re-diagnosed.
        return self._trial is None

    def _context(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> EscapeContext:
        batch = self._batch
        loss = None
        if batch is not None and self._probe_unavailable(trainer, pl_module) is None:
            reduce = self._reduce(trainer)

            def loss() -> float:
                return evaluate_loss(
                    pl_module,
                    batch[0],
                    loss_fn=self.loss_fn,
                    batch_idx=batch[1],
                    seed=self.seed,
                    reduce=reduce,
                )

        return EscapeContext(
            module=pl_module,
            optimizers=list(trainer.optimizers),
            step=int(trainer.global_step),
            seed=self.seed,
            spectrum=self.last_spectrum,
            loss=loss,
            trainer=trainer,
            grad_scale=lambda opt: amp_grad_scale(trainer, opt),
        )

    def _capture(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TrainingSnapshot:
        return TrainingSnapshot.capture(
            pl_module,
            trainer.optimizers,
            trainer.lr_scheduler_configs,
            getattr(trainer.precision_plugin, "scaler", None),
            device=self.snapshot_device,
        )

    def _restore(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        snapshot: TrainingSnapshot,
        detector: dict[str, Any],
    ) -> None:
        snapshot.restore(
            pl_module,
            trainer.optimizers,
            trainer.lr_scheduler_configs,
            getattr(trainer.precision_plugin, "scaler", None),
        )
        now = self.tracker.status().step
        self.tracker.load_state_dict(detector["tracker"])
        # The run is back where it was, but the clock is not.
        self.tracker.advance_to(now)
        self._reported = detector["reported"]

    def _detector_state(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "reported": self._reported}

    def _escape(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        status: StallStatus,
        quiet: bool = False,
        restored: tuple[TrainingSnapshot, dict[str, Any]] | None = None,
    ) -> None:
        diagnosis = self._diagnosis
        if diagnosis is None:
            return
        kind = diagnosis.kind
        ctx = self._context(trainer, pl_module)
        step, note = self.policy.choose(kind, ctx)
        if step is None:
            if not quiet:
                self._say(f"no escape at step {status.step} ({kind}): {note}", status.step)
            return
        # Right after a rollback the run is exactly the restored snapshot: reuse it, not a copy.
        if restored is not None:
            snapshot, detector = restored
        else:
            snapshot, detector = self._capture(trainer, pl_module), self._detector_state()
        try:
            done = step.apply(ctx)
        except ProbeUnavailable as err:
            self._restore(trainer, pl_module, snapshot, detector)
            self._say(f"{step.describe()} could not act: {err}", status.step)
            return
        self.policy.started()
        rung, strength = self.policy.position(kind)
        start = int(trainer.global_step)
        self.events.append(
            {
                "step": status.step,
                "diagnosis": kind,
                "action": step.describe(),
                "verdict": "pending",
                "reason": f"{done}; because {diagnosis.reason}" + (f" ({note})" if note else ""),
                "before": status.smoothed,
                "after": math.nan,
                "end_step": -1,
            }
        )
        self._trial = _Trial(
            kind=kind,
            rung=rung,
            strength=strength,
            step=step,
            start=start,
            end=status.step + self.probation_steps,
            before=status.smoothed,
            threshold=status.threshold,
            event=len(self.events) - 1,
            snapshot=snapshot,
            detector=detector,
        )
        if self._log is not None:
            self._log.text(
                f"{PREFIX}/escape",
                f"**{step.describe()}** at step {status.step} against **{kind}**: {done}. "
                f"Why: {diagnosis.reason}. Judged at step {status.step + self.probation_steps}.",
                status.step,
            )
            self._log.scalars({f"{PREFIX}/escape": 1.0}, status.step)
        if self.verbose:
            rank_zero_info(f"[EscapeCallback] step {status.step}: {step.describe()}: {done}")
        if step.duration == 0:
            self._trial.effect_done = True

    def _extend(self, trial: _Trial, status: StallStatus) -> bool:
        """Give a trial that helps, but not yet by the tolerance, another probation window.

        Escapes take problem-dependent time to show (a saddle left along a shallow direction, units
        drifting apart): judging them all after the same window rolls back slow successes.
        """
        sign = 1.0 if self.mode == "min" else -1.0
        gain = sign * (trial.before - status.smoothed)
        if trial.extensions >= self.probation_extensions or status.diverging is not None:
            return False
        if not (math.isfinite(gain) and 0 < gain <= trial.threshold):
            return False
        trial.extensions += 1
        trial.end = status.step + self.probation_steps
        self._say(
            f"probation of {self.events[trial.event]['action']} extended to step {trial.end}: "
            f"{self._metric_name()} {trial.before:.4g} -> {status.smoothed:.4g} is better, "
            f"not yet by {trial.threshold:.3g}",
            status.step,
        )
        return True

    def _end_effect(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, trial: _Trial
    ) -> None:
        trial.effect_done = True
        trial.step.undo(self._context(trainer, pl_module))
        if trial.step.busy():
            self._finishing.append(trial.step)

    def _verdict(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        status: StallStatus,
        final: bool = False,
    ) -> None:
        trial = self._trial
        if trial is None:
            return
        self._trial = None
        if not trial.effect_done:
            self._end_effect(trainer, pl_module, trial)
        event = self.events[trial.event]
        sign = 1.0 if self.mode == "min" else -1.0
        after = status.smoothed
        helped = (
            status.diverging is None
            and math.isfinite(after)
            and sign * (after - trial.before) < -trial.threshold
        )
        metric = self._metric_name()
        if helped:
            verdict: Verdict = "accepted"
            reason = (
                f"{metric} {trial.before:.4g} -> {after:.4g}, better by more than "
                f"{trial.threshold:.3g}: kept"
            )
            self.policy.accepted(trial.kind, status.step)
            self.tracker.mark_improved(status.step)
            self._reported = None
        else:
            verdict = "rolled_back"
            if status.diverging is not None:
                why = f"the run diverged ({status.diverging})"
            else:
                why = f"{metric} {trial.before:.4g} -> {after:.4g}, not better by {trial.threshold:.3g}"
            reason = f"{why}: restored the state of step {event['step']}"
            self._restore(trainer, pl_module, trial.snapshot, trial.detector)
            self.policy.rejected(trial.kind)
        if final:
            reason += " (settled at the end of training)"
        event.update(verdict=verdict, after=after, end_step=status.step)
        event["reason"] = f"{event['reason']}. Verdict: {reason}"
        if self._log is not None:
            self._log.scalars(
                {
                    f"{PREFIX}/verdict": 1.0 if helped else -1.0,
                    f"{PREFIX}/verdict_before": trial.before,
                    f"{PREFIX}/verdict_after": after if math.isfinite(after) else math.nan,
                },
                status.step,
            )
            self._log.text(
                f"{PREFIX}/verdict",
                f"**{verdict}**: {event['action']} from step {event['step']}: {reason}",
                status.step,
            )
        if self.verbose:
            rank_zero_info(f"[EscapeCallback] step {status.step}: {verdict}: {reason}")
        if not helped and not final and self.policy.concluded:
            self._say(
                f"stopping escapes at step {status.step}: {self.policy.failures} consecutive "
                "escapes failed from this point, the best basin found",
                status.step,
            )
        elif not helped and not final and self._passive is None:
            # Restored to the stalled point: escalate at once.
            self._escape(
                trainer,
                pl_module,
                self.tracker.status(),
                restored=(trial.snapshot, trial.detector),
            )

    def _keep_guard(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, status: StallStatus
    ) -> None:
        every = self.guard_every_n_steps
        if every is None or status.warming_up:
            return
        if self._guard is None or (status.step + 1) % every < self.check_every_n_steps:
            self._guard = (self._capture(trainer, pl_module), self._detector_state())

    def _rollback_to_guard(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, diagnosis: Diagnosis
    ) -> None:
        if self._guard is None:
            warn_once(
                self._warned,
                "The run diverges and EscapeCallback keeps no healthy snapshot to roll back to; "
                "set `guard_every_n_steps` to keep one.",
            )
            return
        snapshot, detector = self._guard
        self._restore(trainer, pl_module, snapshot, detector)
        self.events.append(
            {
                "step": diagnosis.step,
                "diagnosis": "diverging",
                "action": "rollback",
                "verdict": "rolled_back",
                "reason": f"{diagnosis.reason}: restored the last healthy snapshot",
                "before": math.nan,
                "after": math.nan,
                "end_step": diagnosis.step,
            }
        )
        self._say(
            f"diverging at step {diagnosis.step}: rolled back to the last healthy snapshot",
            diagnosis.step,
        )

    def _live_steps(self) -> list[EscapeStep]:
        live = list(self._finishing)
        if self._trial is not None:
            live.append(self._trial.step)
        return live

    def _say(self, text: str, step: int) -> None:
        if self._log is not None:
            self._log.text(f"{PREFIX}/escape", text, step)
        if self.verbose:
            rank_zero_info(f"[EscapeCallback] {text}")

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        trial = self._trial
        state["escape"] = {
            "policy": self.policy.state_dict(),
            "events": [dict(e) for e in self.events],
            "diagnosis": None if self._diagnosis is None else self._diagnosis.to_dict(),
            "trial": None
            if trial is None
            else {
                "kind": trial.kind,
                "rung": trial.rung,
                "strength": trial.strength,
                "step": trial.step.state_dict(),
                "start": trial.start,
                "end": trial.end,
                "before": trial.before,
                "threshold": trial.threshold,
                "event": trial.event,
                "snapshot": trial.snapshot.state_dict(),
                "detector": trial.detector,
                "effect_done": trial.effect_done,
                "extensions": trial.extensions,
            },
        }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        state = state_dict.get("escape")
        if state is None:
            return
        self.policy.load_state_dict(state["policy"])
        self.events = [dict(e) for e in state["events"]]
        diagnosis = state.get("diagnosis")
        self._diagnosis = None if diagnosis is None else Diagnosis.from_dict(diagnosis)
        trial = state.get("trial")
        if trial is None:
            self._trial = None
            return
        step = self.policy.make(trial["kind"], trial["rung"], trial["strength"])
        step.load_state_dict(trial["step"])
        self._trial = _Trial(
            kind=trial["kind"],
            rung=int(trial["rung"]),
            strength=int(trial["strength"]),
            step=step,
            start=int(trial["start"]),
            end=int(trial["end"]),
            before=float(trial["before"]),
            threshold=float(trial["threshold"]),
            event=int(trial["event"]),
            snapshot=TrainingSnapshot.from_state_dict(trial["snapshot"]),
            detector=trial["detector"],
            effect_done=bool(trial["effect_done"]),
            extensions=int(trial.get("extensions", 0)),
        )


_LAYOUT = {
    "escape: escapes": {
        "escapes (1 at each)": ["Multiline", [rf"^{PREFIX}/escape$"]],
        "verdicts (+1 kept, -1 rolled back)": ["Multiline", [rf"^{PREFIX}/verdict$"]],
        "monitored value before and after": [
            "Multiline",
            [rf"^{PREFIX}/verdict_(before|after)$", rf"^{PREFIX}/monitored$"],
        ],
    },
}
