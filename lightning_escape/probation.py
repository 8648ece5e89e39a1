"""Judge escapes: trials on probation, verdicts, exact rollback and escalation (no Lightning here).

:class:`EscapeEngine` is the escape loop as plain logic. A caller feeds it what a detector found at
each check (a :class:`~lightning_escape.detectors.Check`); the engine decides with its
:class:`~lightning_escape.policy.EscapePolicy` whether to escape and with which step, applies the step,
keeps the trial on probation, judges it against the monitored value and rolls it back when it
did not end better (one that earned more probation and ends better within the noise is kept
without counting as help); the next, stronger attempt waits for a fresh diagnosis after a back-off. It returns
what happened as records (:class:`EscapeEvent`, :class:`Verdict`, :class:`Note`) for the caller to
log, and reaches the training run only through the narrow :class:`Run` interface: capture and
restore the state, build an :class:`~lightning_escape.escapes.EscapeContext`, restart the detector's
window.

Steps are optimizer-step indices throughout (the x-axis of the logs): a check at step ``s`` reads
the samples up to ``s`` and an escape applied there first acts on step ``s + 1``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, Protocol

from torch import Tensor
from torch.optim import Optimizer

from lightning_escape._validation import (
    check_bool,
    check_choice,
    check_nonnegative_int,
    check_optional_positive_int,
    check_positive_int,
    check_range,
)
from lightning_escape.averages import SavedAverage
from lightning_escape.curvature import ProbeUnavailable
from lightning_escape.detectors import Check, Diagnosis, Mode, StallStatus
from lightning_escape.escapes import EscapeContext, EscapeStep
from lightning_escape.policy import ESCAPABLE, EscapePolicy
from lightning_escape.snapshot import TrainingSnapshot

__all__ = [
    "EscapeEngine",
    "EscapeEvent",
    "News",
    "Note",
    "Run",
    "Saved",
    "Trial",
    "Verdict",
    "WorldChanged",
]

Outcome = Literal["pending", "accepted", "neutral", "rolled_back"]
Judged = Literal["accepted", "neutral", "rolled_back"]
# Relative changes this small are rounding (float32's epsilon is 1.2e-7), not progress.
_ROUNDING = 1e-6


@dataclass(frozen=True)
class EscapeEvent:
    """One escape (or a rollback after divergence) and, once judged, its verdict.

    Attributes:
        step: Optimizer step of the check that started it.
        diagnosis: The kind of stall it answered.
        action: The escape step, as ``Name(arg=value, ...)``, or ``"rollback"``.
        reason: What was done, why, and (once judged) the verdict's reason.
        before: Smoothed monitored value when it started (None for a rollback after divergence).
        verdict: ``"pending"`` while on probation, then ``"accepted"`` (kept: it helped),
            ``"neutral"`` (kept: extended for its gain, better at the end, not beyond the
            margin) or ``"rolled_back"``.
        after: Smoothed monitored value at the verdict (None until then).
        end_step: Optimizer step of the verdict (None until then).
    """

    step: int
    diagnosis: str
    action: str
    reason: str
    before: float | None
    verdict: Outcome = "pending"
    after: float | None = None
    end_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for checkpoints and tables."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EscapeEvent:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


@dataclass(frozen=True)
class Verdict:
    """The judgement of one escape at the end of its probation.

    Attributes:
        step: Optimizer step of the verdict.
        outcome: ``"accepted"`` (kept: better beyond the margin), ``"neutral"`` (kept, not
            counted as help: extended for its gain and better by less) or ``"rolled_back"``
            (restored exactly: otherwise, or diverged).
        action: The escape step judged.
        started: Optimizer step the escape started at.
        before: Smoothed monitored value when it started.
        after: Smoothed monitored value now.
        reason: One sentence with the numbers.
        final: Whether it was settled at the end of training.
    """

    step: int
    outcome: Judged
    action: str
    started: int
    before: float
    after: float
    reason: str
    final: bool = False


@dataclass(frozen=True)
class Note:
    """Something the engine says without an event (no escape possible, probation extended, ...).

    Attributes:
        step: Optimizer step it refers to.
        text: The sentence.
        warning: Whether the user should act on it (shown as a warning, once).
    """

    step: int
    text: str
    warning: bool = False


News = EscapeEvent | Verdict | Note


class WorldChanged(RuntimeError):
    """The run changed under a saved state: restoring it would not be exact.

    Another callback added a parameter group, swapped a scheduler or pruned a layer; the message
    says what changed.
    """


@dataclass
class Saved:
    """What a rollback restores: the training state and the detector's state.

    ``world`` is the shape of the run when it was saved (plain values that :meth:`Run.restore`
    compares before restoring); ``averages`` the weight averages other callbacks keep (see
    :mod:`lightning_escape.averages`); ``metrics`` the latest value of each metric the fit's
    validations logged when it was saved (name to value): measured of the saved model when it was
    saved right after a validation, else of a model before it; ``bests`` the best score of each
    ``EarlyStopping`` callback, by its position (see :mod:`lightning_escape.bests`).
    """

    snapshot: TrainingSnapshot
    detector: dict[str, Any]
    world: dict[str, Any] = field(default_factory=dict)
    averages: list[SavedAverage] = field(default_factory=list)
    metrics: dict[str, Tensor] = field(default_factory=dict)
    bests: list[tuple[int, Tensor]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values (loadable with ``weights_only=True``)."""
        return {
            "snapshot": self.snapshot.state_dict(),
            "detector": self.detector,
            "world": self.world,
            "averages": [average.state_dict() for average in self.averages],
            "metrics": {name: value.cpu() for name, value in self.metrics.items()},
            "bests": [[index, best.cpu()] for index, best in self.bests],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Saved:
        """Inverse of :meth:`state_dict`."""
        snapshot = TrainingSnapshot.from_state_dict(state["snapshot"])
        averages = [SavedAverage.from_state_dict(a) for a in state.get("averages", [])]
        metrics = dict(state.get("metrics", {}))
        bests = [(int(index), best) for index, best in state.get("bests", [])]
        return cls(snapshot, state["detector"], state.get("world", {}), averages, metrics, bests)


class Run(Protocol):
    """The training run as the engine sees it."""

    def context(self) -> EscapeContext:
        """What an escape step acts on now."""
        ...

    def capture(self) -> Saved:
        """Save everything a rollback restores."""
        ...

    def restore(self, saved: Saved) -> None:
        """Restore ``saved`` exactly (the step counter goes on).

        Raises:
            WorldChanged: If the run changed shape since ``saved`` (nothing is restored then).
        """
        ...

    def restart_window(self, step: int) -> None:
        """The run changed course at ``step``: the detector's stall window starts again."""
        ...

    def status(self) -> StallStatus:
        """The detector's status now (after a restore, the restored one)."""
        ...

    def stop(self, reason: str) -> None:
        """End training after the current step, for ``reason`` (every process alike)."""
        ...


@dataclass
class Trial:
    """An escape on probation.

    Attributes:
        kind: The diagnosis it answers.
        rung: Its rung on the ladder of ``kind``.
        strength: How many times it was made stronger.
        step: The escape step itself.
        start: First optimizer step under its effect.
        end: First check step at which the verdict may be given.
        before: Smoothed monitored value when it started.
        threshold: The improvement that counts as help.
        noisy: Whether the value's noise set ``threshold`` (``noise_margin`` standard errors),
            not the detector's tolerance.
        event: Its index in the engine's events.
        saved: The state to restore if it fails.
        effect_done: Whether its per-step effect is over (or it had none).
        extensions: Probation windows added because it was helping, not yet enough.
        since: The optimizer step whose state ``saved`` holds, when later than the escape's
            own (a change that waited for a boundary); None otherwise.
    """

    kind: str
    rung: int
    strength: int
    step: EscapeStep
    start: int
    end: int
    before: float
    threshold: float
    event: int
    saved: Saved
    effect_done: bool = False
    extensions: int = 0
    noisy: bool = False
    since: int | None = None

    def acting(self, step: int) -> bool:
        """Whether the escape acts on optimizer step ``step``."""
        return not self.effect_done and self.start <= step < self.start + self.step.duration

    def state_dict(self) -> dict[str, Any]:
        """Plain values; the step and the saved state by their own ``state_dict``."""
        state = _fields_of(self)
        state.update(_step_state(self.step))
        state["saved"] = self.saved.state_dict()
        return state

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], make: Callable[[str, int, int], EscapeStep]
    ) -> Trial:
        """Inverse of :meth:`state_dict`; ``make(kind, rung, strength)`` rebuilds the step."""
        step = _rebuilt(state, make)
        fields_ = {k: v for k, v in state.items() if k not in ("step_class", "step_config")}
        return cls(**{**fields_, "step": step, "saved": Saved.from_state_dict(state["saved"])})


def _restored_step(trial: Trial, event: EscapeEvent) -> int:
    """The step whose state a rollback of ``trial`` restores."""
    return event.step if trial.since is None else trial.since


def _abandoned(run: Run, trial: Trial) -> str:
    """A failed trial stays (it cannot be rolled back): take back what would outlast it; what."""
    taken = trial.step.abandon(run.context())
    return f"; {taken}" if taken else ""


def _step_state(step: EscapeStep) -> dict[str, Any]:
    """A step's runtime state, and its class and settings: enough to rebuild it alone.

    The settings only when they are plain values, which a checkpoint loaded with
    ``weights_only=True`` can hold (an enum, say, is not).
    """
    state: dict[str, Any] = {"step": step.state_dict()}
    config = step.config()
    if _plain(config):
        state["step_class"] = f"{type(step).__module__}:{type(step).__qualname__}"
        state["step_config"] = config
    return state


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _rebuilt(state: dict[str, Any], make: Callable[[str, int, int], EscapeStep]) -> EscapeStep:
    """The step a checkpoint's trial (or finishing step) was acting with, its state loaded.

    From this callback's ladders when the rung there is the same step (the same class name and
    settings: a script renamed since moves its module); else from the class and settings the
    checkpoint names, if that class is imported (a run resumed with other ladders still
    finishes, judges and can roll back the escape it was trying).
    """
    kind, rung, strength = state["kind"], state["rung"], state["strength"]
    try:
        step: EscapeStep | None = make(kind, rung, strength)
    except (IndexError, KeyError):
        step = None
    name, config = state.get("step_class"), state.get("step_config")
    if name is not None and not (
        step is not None
        and type(step).__qualname__ == name.partition(":")[2]
        and step.config() == config
    ):
        found = _loaded_class(name)
        step = None if found is None else found(**(config or {}))
    if step is None:
        raise ValueError(
            f"The checkpoint holds an escape on probation ({name or 'a step'} at rung {rung} of "
            f"the {kind!r} ladder) that this callback's ladders do not have, and whose class is "
            "not imported: resume with the ladders it was written with."
        )
    step.load_state_dict(state["step"])
    return step


def _loaded_class(name: str) -> type[EscapeStep] | None:
    """The escape step class ``module:qualname`` names, if its module is imported already.

    A checkpoint never has a module imported (its top-level code would run).
    """
    module_name, _, qualname = name.partition(":")
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) and issubclass(found, EscapeStep) else None


@dataclass
class _Finishing:
    """An escape step whose effect is over but that still waits for a boundary to finish."""

    kind: str
    rung: int
    strength: int
    step: EscapeStep

    def state_dict(self) -> dict[str, Any]:
        return {**_fields_of(self), **_step_state(self.step)}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], make: Callable[[str, int, int], EscapeStep]
    ) -> _Finishing:
        return cls(state["kind"], state["rung"], state["strength"], _rebuilt(state, make))


def _margin(trial: Trial) -> str:
    """The improvement a trial must show, and what set it."""
    if trial.noisy:
        return f"{trial.threshold:.3g} (set by the value's noise)"
    return f"{trial.threshold:.3g}"


def _fields_of(record: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict, without copying (or recursing into) the values."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


class EscapeEngine:
    """The escape loop: decide, act, keep on probation, judge, roll back and escalate.

    Args:
        policy: Which step for which diagnosis, escalation, budget, cooldown and stopping rule.
        probation_steps: Optimizer steps an escape runs before its verdict.
        probation_extensions: Times a verdict may be put off by another ``probation_steps`` while
            the escape helps but not yet by the tolerance.
        mode: ``"min"`` if a lower monitored value is better, ``"max"`` if higher.
        guard_every_n_steps: Keep the last healthy state every this many steps, to roll back to
            when the run diverges outside probation; None keeps none.
        noise_margin: An escape counts as help when its smoothed value beats the one before it
            by more than the detector's threshold and by more than this many standard errors of
            their difference (from the samples' noise, :attr:`StallStatus.noise`), not by chance.
            One better by less whose probation was extended for it is kept without credit
            (``"neutral"``: a failure to the policy, whose steps are not thrown away); any other
            is rolled back. 0 uses the threshold alone.
        keep_neutral: Whether an escape extended for its gain that ends better, by less than the
            margin, is kept (``"neutral"``); False rolls it back like one not better.

    Example:
        >>> engine = EscapeEngine(EscapePolicy(), probation_steps=50)
        >>> engine.trial is None, engine.events
        (True, [])
    """

    def __init__(
        self,
        policy: EscapePolicy,
        *,
        probation_steps: int = 200,
        probation_extensions: int = 2,
        mode: Mode = "min",
        guard_every_n_steps: int | None = None,
        noise_margin: float = 2.0,
        keep_neutral: bool = True,
    ) -> None:
        if not isinstance(policy, EscapePolicy):
            raise ValueError(f"`policy` must be an EscapePolicy, got {policy!r}.")
        self.policy = policy
        self.probation_steps = check_positive_int("probation_steps", probation_steps)
        self.probation_extensions = check_nonnegative_int(
            "probation_extensions", probation_extensions
        )
        self.mode: Mode = check_choice("mode", mode, ("min", "max"))
        self.guard_every_n_steps = check_optional_positive_int(
            "guard_every_n_steps", guard_every_n_steps
        )
        self.noise_margin = check_range("noise_margin", noise_margin, 0.0, math.inf, high_open=True)
        self.keep_neutral = check_bool("keep_neutral", keep_neutral)
        self.passive = False
        # The last optimizer step of the fit, when known: no escape starts that could not be judged.
        self.horizon: int | None = None
        # The step the fit's last validation follows, when known and a verdict waits for one.
        self.validation_horizon: int | None = None
        self.events: list[EscapeEvent] = []
        self.trial: Trial | None = None
        self.diagnosis: Diagnosis | None = None  # the latest stall diagnosis (not a divergence)
        self._finishing: list[_Finishing] = []  # undone steps still waiting for a boundary
        self._guard: tuple[int, Saved] | None = None
        self._rollbacks = 0  # rollbacks to the guard since the last healthy check

    def reset(self) -> None:
        """Forget every escape, trial and budget spent: a fresh start (a new fit)."""
        self.policy.reset()
        self.passive = False
        self.events = []
        self.trial = None
        self.diagnosis = None
        self._finishing = []
        self._guard = None
        self._rollbacks = 0

    @property
    def _sign(self) -> float:
        return 1.0 if self.mode == "min" else -1.0

    # ------------------------------------------------------------------ at each check

    def check(self, run: Run, found: Check) -> list[News]:
        """Act on what a detector found at a check; return what happened.

        Args:
            run: The training run.
            found: The detector's status and news at this check.

        Returns:
            The events, verdicts and notes of this check, in order.
        """
        news: list[News] = []
        status, diagnosis = found.status, found.diagnosis
        self._withdraw_void(run, status.step, news)
        if self.trial is None and found.improved:
            self.policy.improved()  # a trial's improvements are judged by its verdict
        if diagnosis is not None and diagnosis.kind != "diverging":
            self.diagnosis = diagnosis
        trial = self.trial
        if trial is not None:
            # A trial may worsen the loss before it helps: only non-finite values cut it short.
            # Its verdict waits for the first fresh value measured once probation is over: a metric
            # logged at validation is fresh only after a validation, and a value measured earlier
            # (before the escape, or of a model since rolled back) says nothing about the trial.
            due = found.fresh and status.step >= trial.end
            if status.nonfinite or (due and not self._extend(status, news)):
                self._judge(run, status, news)
            return news
        if self.passive:
            return news
        if diagnosis is not None and diagnosis.kind == "diverging":
            self._rollback_to_guard(run, diagnosis, news)
        elif diagnosis is not None and diagnosis.kind in ESCAPABLE:
            self._escape(run, status, news)
        elif status.stalled and self.diagnosis is not None and found.episode is not None:
            # Still stuck after a cooldown or a conclusion ended: try again from where we stand,
            # unless the run now diverges (the stored diagnosis no longer describes it, and
            # divergence is never escaped).
            if (
                self.diagnosis.kind in ESCAPABLE
                and not self.policy.concluded
                and status.diverging is None
            ):
                self._escape(run, status, news, quiet=True)
        elif not status.stalled and status.diverging is None:
            self._keep_guard(run, status)
        return news

    def finish(self, run: Run, status: StallStatus, sampled: int | None = None) -> list[News]:
        """Training ends: judge a trial with what it has and settle what waits for a boundary.

        A trial is judged on the latest monitored value if that value was measured after the
        escape started (``sampled >= trial.start``: at least one optimizer step under it), as a
        verdict at the end of probation would be. Without such a value (a metric logged at
        validation, and no validation since the escape), nothing measured the escape: it is rolled
        back, unjudged, since keeping an untested change would be a guess, and restoring gives
        back the state the run had reached before it. The final model is never a failed trial's.

        Args:
            run: The training run.
            status: The detector's status now.
            sampled: Optimizer step at which the latest monitored value fed to the detector was
                measured; None for ``status.step`` (a value every step, the training loss).
        """
        news: list[News] = []
        self._withdraw_void(run, status.step, news, ending="training ended")
        trial = self.trial
        if trial is not None:
            measured = status.step if sampled is None else sampled
            if status.nonfinite or measured >= trial.start:
                self._judge(run, status, news, final=True)
            else:
                what = (
                    "no value of the monitored metric was measured after it started (step "
                    f"{trial.start}), so nothing judged it"
                )
                self._restore_unjudged(run, status.step, what, news, final=True)
        ctx = run.context()
        for pending in self._finishing:
            pending.step.settle(ctx)  # no more boundaries will come
        self._finishing = []
        self._guard = None
        return news

    def abort(self, run: Run, step: int, why: str) -> list[News]:
        """Training stopped by an error: restore a trial on probation, unjudged, and settle.

        The model a user keeps after the error is then never an unjudged trial's.
        """
        news: list[News] = []
        self._withdraw_void(run, step, news, ending=f"training stopped ({why})")
        if self.trial is not None:
            self._restore_unjudged(run, step, f"training stopped ({why}) during probation", news)
        ctx = run.context()
        for pending in self._finishing:
            pending.step.settle(ctx)
        self._finishing = []
        self._guard = None
        return news

    def _withdraw_void(
        self, run: Run, step: int, news: list[News], ending: str | None = None
    ) -> None:
        """Withdraw the trial on probation if its step found its change never came in force.

        A step may learn that only after :meth:`~lightning_escape.escapes.EscapeStep.apply` (a
        ``BatchSizeChange`` whose reloaded dataloader ignores the batch size); its
        ``not_applied()`` then says why. When training ends (``ending`` says how), a step still
        :meth:`~lightning_escape.escapes.EscapeStep.waiting` for the boundary that brings its
        change never acted either. Nothing of it acted, so there is nothing to judge and
        nothing to restore (a rollback would throw away steps that trained as without it): its
        event is withdrawn, it does not count against the budget, and the policy passes over its
        rung from then on.
        """
        why = None if self.trial is None else self.trial.step.not_applied()
        if not why and ending is not None and self.trial is not None and self.trial.step.waiting():
            why = f"{ending} before its change came in force"
        if not why:
            return
        trial, event = self._close_trial(run)
        del self.events[trial.event]  # the latest: none is recorded while a trial is on
        self.policy.withdrawn(trial.kind, trial.rung, why)
        news.append(
            Note(
                step,
                f"{event.action} from step {event.step} did not act ({why}): withdrawn, unjudged",
                warning=True,
            )
        )

    def _restore_unjudged(
        self, run: Run, step: int, what: str, news: list[News], *, final: bool = False
    ) -> None:
        """Restore the trial on probation without a verdict on its value; record why."""
        trial, event = self._close_trial(run)
        outcome: Judged = "rolled_back"
        try:
            run.restore(trial.saved)
            reason = f"{what}: restored the state of step {_restored_step(trial, event)}"
        except WorldChanged as err:
            outcome = "neutral"  # the run goes on with the trial's state: kept, unjudged
            reason = f"{what}; not restored: {err}{_abandoned(run, trial)}"
            news.append(Note(step, f"{event.action} from step {event.step}: {reason}", True))
        if final:
            reason += " (settled at the end of training)"
        self.events[trial.event] = replace(
            event,
            verdict=outcome,
            end_step=step,
            reason=f"{event.reason}. Verdict: {reason}",
        )
        news.append(
            Verdict(step, outcome, event.action, event.step, trial.before, math.nan, reason, True)
        )

    # ------------------------------------------------------------------ between checks

    def acting(self, step: int) -> bool:
        """Whether an escape acts on optimizer step ``step`` (cheap: checked every step)."""
        return self.trial is not None and self.trial.acting(step)

    def before_optimizer_step(self, ctx: EscapeContext, optimizer: Optimizer) -> None:
        """Inside the optimizer-step window of step ``ctx.step``: an acting escape changes it."""
        trial = self.trial
        if trial is not None and trial.acting(ctx.step):
            trial.step.before_optimizer_step(ctx, optimizer)

    def after_optimizer_step(self, ctx: EscapeContext, optimizer: Optimizer) -> None:
        """Right after the parameter update, before any scheduler steps."""
        trial = self.trial
        # Only while the step acts: one-shot steps and finished effects have nothing to do here.
        if trial is not None and not trial.effect_done:
            trial.step.after_optimizer_step(ctx, optimizer)

    def after_batch(self, run: Run, step: int) -> None:
        """Optimizer step ``step`` is done: end an escape's effect when its duration is over."""
        trial = self.trial
        if trial is not None and trial.step.waiting():
            # Not in force yet (a batch size waits for an epoch's end): its probation and its
            # window count from the first step under it, not from a step it did not act on.
            trial.end += step + 1 - trial.start
            trial.start = step + 1
            return
        if (
            trial is not None
            and not trial.effect_done
            and step + 1 >= trial.start + trial.step.duration
        ):
            self._end_effect(run.context(), trial)

    @property
    def busy(self) -> bool:
        """Whether an escape is on probation or a step still waits for a boundary."""
        return self.trial is not None or bool(self._finishing)

    def live_steps(self) -> list[EscapeStep]:
        """Steps that may still act at batch and epoch boundaries."""
        if not self._finishing:
            return [] if self.trial is None else [self.trial.step]
        self._finishing = [p for p in self._finishing if p.step.busy()]
        live = [p.step for p in self._finishing]
        # A trial whose effect ended is finishing too: acting twice at one boundary, its step
        # would both switch back and put the Trainer's settings back before the switch came in.
        if self.trial is None or any(step is self.trial.step for step in live):
            return live
        return [*live, self.trial.step]

    def resume(self, ctx: EscapeContext) -> None:
        """After a resume from a checkpoint: re-apply settings outside the model and optimizers.

        The checkpoint holds the model and the optimizers, not the Trainer's settings an escape
        changed (``accumulate_grad_batches``, a batch size): each step still acting sets them
        again, so the resumed run continues exactly.
        """
        for step in self.live_steps():
            step.resume(ctx)

    def at_batch_start(
        self,
        context: Callable[[], EscapeContext],
        batch_idx: int,
        run: Callable[[], Run] | None = None,
    ) -> None:
        """A batch starts: steps waiting for a boundary may act (the context is built if needed).

        ``run`` builds the run, for the snapshot of a trial whose change comes in force here.
        """
        steps = self.live_steps()
        if steps:
            waiting = self._waiting()
            ctx = context()
            for step in steps:
                step.at_batch_start(ctx, batch_idx)
            self._in_force(waiting, run)

    def at_epoch_end(
        self, context: Callable[[], EscapeContext], run: Callable[[], Run] | None = None
    ) -> None:
        """An epoch ends: steps waiting for a boundary may act (see :meth:`at_batch_start`)."""
        steps = self.live_steps()
        if steps:
            waiting = self._waiting()
            ctx = context()
            for step in steps:
                step.at_epoch_end(ctx)
            self._in_force(waiting, run)

    def _waiting(self) -> Trial | None:
        """The trial on probation if its change waits for a boundary."""
        trial = self.trial
        return trial if trial is not None and trial.step.waiting() else None

    def _in_force(self, waited: Trial | None, run: Callable[[], Run] | None) -> None:
        """A trial that waited for a boundary and whose change came in force there starts now.

        The steps it waited for trained as without it: its snapshot is taken again here, so a
        rollback restores the state from the boundary, not from before the wait, and throws away
        only the steps under the change.
        """
        if waited is None or waited is not self.trial or waited.step.waiting() or run is None:
            return
        if waited.step.not_applied() is None:
            now = run()
            waited.saved = now.capture()
            waited.since = now.context().step - 1

    # ------------------------------------------------------------------ the loop

    def _escape(
        self,
        run: Run,
        status: StallStatus,
        news: list[News],
        *,
        quiet: bool = False,
    ) -> None:
        diagnosis = self.diagnosis
        if diagnosis is None:
            return
        kind = diagnosis.kind
        ctx = run.context()
        # The escape acts after the last optimizer step taken. With a metric logged at validation
        # that is later than the step the value was measured at (`status.step`), which probation
        # counts from: its verdict falls on the validation `probation_steps` after that one.
        acted = ctx.step - 1
        limit, what = self._limit()
        if limit is not None and status.step + self.probation_steps > limit:
            # A trial cut short by the end of training is judged on what it has (or, with no
            # validation left to measure it, rolled back); one rolled back there also throws away
            # the last steps of training. Neither is worth the risk.
            if not quiet:
                news.append(
                    Note(
                        status.step,
                        f"no escape at step {acted} ({kind}): its probation would end after "
                        f"{what} (step {limit})",
                    )
                )
            return
        finishing = next((p.step for p in self._finishing if p.step.busy()), None)
        if finishing is not None:
            # Until the boundary, the setting it put back is not in force: a new trial would
            # train and be judged under the old escape's setting, and a step that reads that
            # setting would take it for the original and restore it at its own undo.
            if not quiet:
                news.append(
                    Note(
                        status.step,
                        f"no escape at step {acted} ({kind}): {finishing.describe()} still waits "
                        "for a batch or epoch boundary to finish its undo",
                    )
                )
            return
        ctx.last_step = limit  # a step whose change waits for a boundary may come too late
        step, note = self.policy.choose(kind, ctx)
        if step is None:
            if not quiet:
                news.append(Note(status.step, f"no escape at step {acted} ({kind}): {note}"))
            return
        saved = run.capture()
        try:
            done = step.apply(ctx)
        except ProbeUnavailable as err:
            run.restore(saved)
            news.append(Note(status.step, f"{step.describe()} could not act: {err}"))
            return
        self.policy.started()
        rung, strength = self.policy.position(kind)
        event = EscapeEvent(
            step=acted,
            diagnosis=kind,
            action=step.describe(),
            reason=f"{done}; because {diagnosis.reason}" + (f" ({note})" if note else ""),
            before=status.smoothed,
        )
        self.events.append(event)
        news.append(event)
        threshold, noisy = self._significant(status)
        self.trial = Trial(
            kind=kind,
            rung=rung,
            strength=strength,
            step=step,
            start=ctx.step,
            end=status.step + max(self.probation_steps, step.min_probation),
            before=status.smoothed,
            threshold=threshold,
            noisy=noisy,
            event=len(self.events) - 1,
            saved=saved,
            effect_done=step.duration == 0,
        )

    def _significant(self, status: StallStatus) -> tuple[float, bool]:
        """The improvement a trial started now must show, and whether the noise sets it.

        The value after probation is smoothed like the one before it and carries noise of the
        same size, so their difference has ``sqrt(2)`` times the standard error of one.
        """
        margin = self.noise_margin * math.sqrt(2.0) * status.noise
        if not margin > status.threshold:  # also when the noise is not known yet (NaN)
            return status.threshold, False
        return margin, True

    def _limit(self) -> tuple[int | None, str]:
        """The last step a verdict can be given at (None: not known), and what sets it."""
        limit, what = self.horizon, "training does"
        if self.validation_horizon is not None and (
            limit is None or self.validation_horizon < limit
        ):
            limit, what = (
                self.validation_horizon,
                "the fit's last validation, which its verdict needs",
            )
        return limit, what

    def _extend(self, status: StallStatus, news: list[News]) -> bool:
        """Give a trial that helps, but not yet by the tolerance, another probation window.

        Escapes take problem-dependent time to show (a saddle left along a shallow direction, units
        drifting apart): judging them all after the same window rolls back slow successes.
        """
        trial = self.trial
        assert trial is not None
        gain = self._sign * (trial.before - status.smoothed)
        if trial.extensions >= self.probation_extensions or status.diverging is not None:
            return False
        limit, _ = self._limit()
        if limit is not None and status.step + self.probation_steps > limit:
            # As no escape starts that training would end before judging: a trial rolled back
            # at the end would also throw away the last steps of training. Judged on what it has.
            return False
        # Within the noise, only a gain past half the margin (one standard error of the
        # difference, at the default margin) earns more time: a trial that did nothing is ahead
        # half the time by chance. Without noise, a gain within float32's rounding of the value
        # (a step that did nothing: 7.072139263153077 -> 7.072139263153078) earns none either.
        low = trial.threshold / 2 if trial.noisy else _ROUNDING * abs(trial.before)
        if not (math.isfinite(gain) and low < gain <= trial.threshold):
            return False
        trial.extensions += 1
        trial.end = status.step + self.probation_steps
        action = self.events[trial.event].action
        news.append(
            Note(
                status.step,
                f"probation of {action} extended to step {trial.end}: the monitored value "
                f"{trial.before:.4g} -> {status.smoothed:.4g} is better, not yet by "
                f"{_margin(trial)}",
            )
        )
        return True

    def _end_effect(self, ctx: EscapeContext, trial: Trial) -> None:
        trial.effect_done = True
        trial.step.undo(ctx)
        if trial.step.busy():
            self._finishing.append(_Finishing(trial.kind, trial.rung, trial.strength, trial.step))

    def _close_trial(self, run: Run) -> tuple[Trial, EscapeEvent]:
        """End the trial on probation (and its step's effect, if still on); it and its event."""
        trial = self.trial
        assert trial is not None
        self.trial = None
        if not trial.effect_done:
            self._end_effect(run.context(), trial)
        return trial, self.events[trial.event]

    def _judge(self, run: Run, status: StallStatus, news: list[News], final: bool = False) -> None:
        trial, event = self._close_trial(run)
        # A non-finite value (or gradient) is what the trial measured: the smoothed value skips
        # it and still holds the last finite one, at worst the value from before the escape.
        after = math.nan if status.nonfinite else status.smoothed
        gain = self._sign * (trial.before - after)
        measured = status.diverging is None and math.isfinite(after)
        helped = measured and gain > trial.threshold
        # Promising enough to be given more probation (ahead by the bar `_extend` sets), and still
        # better at the end, but not by the margin: kept without credit. Restoring it would throw
        # away its probation steps, which on a run that trains well by itself are steps of real
        # progress. A trial never ahead by that bar is rolled back: its gain is a draw of the
        # noise, and so is any harm it did. Not better at all: rolled back (an escape that lands
        # in an equally poor basin goes back, so the next, stronger one jumps from where the stall
        # was called).
        harmless = (
            self.keep_neutral and measured and not helped and gain > 0 and trial.extensions > 0
        )
        resume_at = status.step
        outcome: Judged = "accepted" if helped else "neutral" if harmless else "rolled_back"
        if helped:
            reason = (
                f"{trial.before:.4g} -> {after:.4g}, better by more than {_margin(trial)}: kept"
            )
            self.policy.accepted(trial.kind, status.step)
            run.restart_window(status.step)
        elif harmless:
            reason = (
                f"{trial.before:.4g} -> {after:.4g}, better but not by {_margin(trial)}: kept, "
                "not counted as help"
            )
            # A failure to the policy (next rung, longer back-off, the stopping rule), but the
            # run goes on from where the trial brought it.
            resume_at = self.policy.rejected(trial.kind, status.step, trial.step)
        else:
            if status.diverging is not None:
                why = f"the run diverged ({status.diverging})"
            else:
                why = f"{trial.before:.4g} -> {after:.4g}, not better" + (
                    f" by {_margin(trial)}" if gain > 0 else ""
                )
            try:
                run.restore(trial.saved)
            except WorldChanged as err:
                # Kept, since a blind restore would mix two runs (said loudly), but it did not
                # help: to the policy a failure, as a trial kept without effect is. What it meant
                # to outlast its verdict goes.
                outcome = "neutral"
                reason = (
                    f"{why}, but kept: it cannot be rolled back exactly ({err}); "
                    f"not counted as help{_abandoned(run, trial)}"
                )
                news.append(
                    Note(status.step, f"{event.action} from step {event.step}: {reason}", True)
                )
            else:
                reason = f"{why}: restored the state of step {_restored_step(trial, event)}"
            resume_at = self.policy.rejected(trial.kind, status.step, trial.step)
        if final:
            reason += " (settled at the end of training)"
        self.events[trial.event] = replace(
            event,
            verdict=outcome,
            after=after,
            end_step=status.step,
            reason=f"{event.reason}. Verdict: {reason}",
        )
        news.append(
            Verdict(
                status.step, outcome, event.action, event.step, trial.before, after, reason, final
            )
        )
        if outcome == "accepted" or final:
            return
        if self.policy.concluded:
            news.append(
                Note(
                    status.step,
                    f"stopping escapes at step {status.step}: {self.policy.failures} consecutive "
                    "escapes failed from this point, the best basin found",
                )
            )
        else:
            # Back at the stalled point (or where a trial without effect brought it): wait, then
            # diagnose afresh (the run may be moving by then, or have converged) and take the next
            # rung. Each failure doubles the wait (none with `cooldown_steps=0`).
            failed = f"{self.policy.backoff} failed escape(s) since the last one that helped"
            news.append(
                Note(
                    status.step,
                    f"next escape not before step {resume_at}: {failed}, so the wait doubles"
                    if resume_at > status.step
                    else f"next escape at the next diagnosis: {failed} (no wait to double)",
                )
            )
        run.restart_window(status.step)

    def _keep_guard(self, run: Run, status: StallStatus) -> None:
        every = self.guard_every_n_steps
        # Also during the detector's warm-up: it holds off stall decisions, but a run can diverge
        # from its first steps (a learning rate too high), and the guard is there for that.
        if every is None:
            return
        self._rollbacks = 0  # a healthy check: the run recovered from any rollback
        if self._guard is None or status.step >= self._guard[0] + every:
            self._guard = (status.step, run.capture())

    def _rollback_to_guard(self, run: Run, diagnosis: Diagnosis, news: list[News]) -> None:
        if self._guard is None:
            if self.guard_every_n_steps is None:
                text = (
                    "The run diverges and EscapeCallback keeps no healthy snapshot to roll back "
                    "to; set `guard_every_n_steps` to keep one."
                )
            else:
                text = (
                    f"The run diverges at step {diagnosis.step}, before EscapeCallback kept its "
                    "first healthy snapshot (at the first check with a healthy value): nothing "
                    "was rolled back."
                )
            news.append(Note(diagnosis.step, text, warning=True))
            return
        if self._rollbacks >= self.policy.max_failures:
            # The same divergence after every rollback: rolling back again would only loop.
            reason = (
                f"stopping training at step {diagnosis.step}: the run diverged "
                f"{self._rollbacks} times in a row right after rollbacks to the healthy snapshot "
                f"of step {self._guard[0]} ({diagnosis.reason}). Lower the learning rate or look "
                "for the cause before resuming from a checkpoint."
            )
            news.append(Note(diagnosis.step, reason, warning=True))
            run.stop(reason)
            return
        try:
            run.restore(self._guard[1])
        except WorldChanged as err:
            stale, self._guard = self._guard, None
            text = (
                f"diverging at step {diagnosis.step}, and the healthy snapshot of step {stale[0]} "
                f"no longer fits the run ({err}): not rolled back"
            )
            news.append(Note(diagnosis.step, text, warning=True))
            return
        self._rollbacks += 1
        event = EscapeEvent(
            step=diagnosis.step,
            diagnosis="diverging",
            action="rollback",
            reason=f"{diagnosis.reason}: restored the last healthy snapshot",
            before=None,
            verdict="rolled_back",
            end_step=diagnosis.step,
        )
        self.events.append(event)
        news.append(event)
        news.append(
            Note(
                diagnosis.step,
                f"diverging at step {diagnosis.step}: rolled back to the last healthy snapshot",
            )
        )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, mid-probation included (tensors and plain values)."""
        return {
            "policy": self.policy.state_dict(),
            "events": [e.to_dict() for e in self.events],
            "diagnosis": None if self.diagnosis is None else self.diagnosis.to_dict(),
            "trial": None if self.trial is None else self.trial.state_dict(),
            "finishing": [p.state_dict() for p in self._finishing],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.policy.load_state_dict(state["policy"])
        self.events = [EscapeEvent.from_dict(e) for e in state["events"]]
        diagnosis = state.get("diagnosis")
        self.diagnosis = None if diagnosis is None else Diagnosis.from_dict(diagnosis)
        trial = state.get("trial")
        self.trial = None if trial is None else Trial.from_state_dict(trial, self.policy.make)
        self._finishing = [
            _Finishing.from_state_dict(p, self.policy.make) for p in state.get("finishing", [])
        ]
