"""The escape engine driven with numbers: no Trainer, a tiny module and a scripted monitored value."""

from __future__ import annotations

import dataclasses
import enum
import io
import math
import random
import sys
from typing import Any

import pytest
import torch
from torch import nn

from lightning_escape import EscapeEvent, LRKick, Perturb, Verdict
from lightning_escape.detectors import Check, Diagnosis, StallStatus, StallTracker
from lightning_escape.escapes import EscapeContext, EscapeStep
from lightning_escape.policy import EscapePolicy
from lightning_escape.probation import EscapeEngine, Note, Saved, WorldChanged
from lightning_escape.snapshot import TrainingSnapshot


class ScriptedRun:
    """A module, an optimizer and a tracker fed one value per step: what a detector would do."""

    def __init__(self, smoothing: float = 0.0) -> None:
        torch.manual_seed(0)
        self.module = nn.Linear(3, 2)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)
        self.tracker = StallTracker(patience=10, warmup_steps=0, smoothing=smoothing)
        self.step = -1
        self.restarts: list[int] = []

    def feed(self, value: float) -> StallStatus:
        self.step += 1
        self.tracker.update(self.step, value, 1.0)
        return self.tracker.status()

    def context(self) -> EscapeContext:
        return EscapeContext(self.module, [self.optimizer], step=self.step + 1, seed=0)

    def capture(self) -> Saved:
        snapshot = TrainingSnapshot.capture(self.module, [self.optimizer])
        return Saved(snapshot, {"tracker": self.tracker.state_dict()})

    def restore(self, saved: Saved) -> None:
        saved.snapshot.restore(self.module, [self.optimizer])
        now = self.tracker.status().step
        self.tracker.load_state_dict(saved.detector["tracker"])
        self.tracker.advance_to(now)

    def restart_window(self, step: int) -> None:
        self.restarts.append(step)
        self.tracker.mark_improved(step)

    def status(self) -> StallStatus:
        return self.tracker.status()

    def stop(self, reason: str) -> None:
        self.stopped = reason

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.module.state_dict().items()}


def _engine(*ladder: EscapeStep, **kwargs: Any) -> EscapeEngine:
    policy_kwargs = {
        k: kwargs.pop(k) for k in ("max_failures", "max_escapes", "cooldown_steps") if k in kwargs
    }
    policy = EscapePolicy({"plateau": list(ladder)}, **policy_kwargs)
    return EscapeEngine(policy, probation_steps=10, **kwargs)


def _stall(run: ScriptedRun) -> Check:
    """Feed a flat value until the tracker declares a stall; the check that diagnoses it."""
    status = run.feed(1.0)
    while not status.stalled:
        status = run.feed(1.0)
    diagnosis = Diagnosis(status.step, "plateau", "flat for 10 steps")
    return Check(status, diagnosis, episode="plateau")


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_escape_that_helps_is_kept() -> None:
    run, engine = ScriptedRun(), _engine(Perturb(radius=0.1))
    found = _stall(run)
    before = run.weights()
    [event] = engine.check(run, found)
    assert isinstance(event, EscapeEvent) and event.verdict == "pending"
    assert event.action == "Perturb(radius=0.1, scale='auto', seed=0)"
    assert engine.trial is not None and engine.trial.start == found.status.step + 1
    jumped = run.weights()
    assert not _equal(jumped, before)
    status = found.status
    while engine.trial is not None:
        status = run.feed(0.5)
        news = engine.check(run, Check(status))
    [verdict] = news
    assert isinstance(verdict, Verdict) and verdict.outcome == "accepted"
    assert (verdict.before, verdict.after, verdict.step) == (1.0, 0.5, found.status.step + 10)
    assert engine.events[0].verdict == "accepted" and engine.events[0].end_step == verdict.step
    assert _equal(run.weights(), jumped)  # kept
    assert run.restarts == [verdict.step]


def test_a_failed_escape_is_restored_bit_for_bit_and_the_rule_stops() -> None:
    run, engine = ScriptedRun(), _engine(Perturb(radius=0.1), max_failures=1)
    found = _stall(run)
    before = run.weights()
    engine.check(run, found)
    status = found.status
    news: list[Any] = []
    while engine.trial is not None:
        with torch.no_grad():
            run.module.weight.add_(1.0)  # training moves on during probation
        status = run.feed(1.0)
        news = engine.check(run, Check(status))
    verdict, stop = news
    assert isinstance(verdict, Verdict) and verdict.outcome == "rolled_back"
    assert isinstance(stop, Note) and "stopping escapes" in stop.text
    assert _equal(run.weights(), before)
    assert engine.policy.concluded
    assert run.tracker.status().step == status.step  # the clock is not rolled back


def test_a_failed_escape_backs_off_then_escalates() -> None:
    run, engine = ScriptedRun(), _engine(Perturb(radius=0.1), max_failures=3, cooldown_steps=20)
    engine.check(run, _stall(run))
    news: list[Any] = []
    while not news or not isinstance(news[0], Verdict):
        news = engine.check(run, Check(run.feed(1.0)))
    verdict, wait = news
    assert verdict.outcome == "rolled_back"
    # No escape at once: the next waits `cooldown_steps`, and the stall window starts over.
    assert isinstance(wait, Note) and f"not before step {verdict.step + 20}" in wait.text
    assert engine.trial is None and run.restarts == [verdict.step]
    waits = []
    for failures in (1, 2):
        rolled_back_at = run.step
        while engine.trial is None:
            status = run.feed(1.0)
            # A detector diagnoses each new stall afresh; within the episode it repeats the kind.
            diagnosis = Diagnosis(status.step, "plateau", "flat") if status.stalled else None
            engine.check(run, Check(status, diagnosis, episode="plateau" if diagnosis else None))
        waits.append(engine.events[-1].step - rolled_back_at)
        assert engine.trial.strength == failures  # stronger each time
        while engine.trial is not None:
            engine.check(run, Check(run.feed(1.0)))
    # The wait doubles with each failure in a row: 20, then 40 steps (counted to the next step to
    # be taken, one past the check's).
    assert waits == [20 - 1, 40 - 1]
    assert engine.policy.concluded


def test_an_escape_that_helps_too_little_gets_more_probation() -> None:
    run, engine = ScriptedRun(), _engine(Perturb(radius=0.1), probation_extensions=1)
    found = _stall(run)
    engine.check(run, found)
    assert engine.trial is not None
    end = engine.trial.end
    news: list[Any] = []
    while run.step < end:
        news = engine.check(run, Check(run.feed(1.0 - 1e-5)))  # better, not by 1e-3
    [note] = news
    assert isinstance(note, Note) and "extended to step" in note.text
    assert engine.trial is not None and engine.trial.end == end + 10


def test_a_trial_due_at_the_last_step_of_training_is_judged_not_extended() -> None:
    # It was "extended to step 63" at step 59, the last, and then kept as neutral at the end of
    # training: an extension with no step in it, and a final model of a trial never ahead by the
    # margin.
    run, engine = ScriptedRun(), _engine(Perturb(radius=0.1), probation_extensions=1)
    found = _stall(run)
    engine.check(run, found)
    assert engine.trial is not None
    end = engine.horizon = engine.trial.end  # training ends where its probation does
    news: list[Any] = []
    while run.step < end:
        news = engine.check(run, Check(run.feed(1.0 - 1e-5)))  # better, not by 1e-3
    assert not [n for n in news if isinstance(n, Note) and "extended" in n.text]
    [verdict] = [n for n in news if isinstance(n, Verdict)]
    assert verdict.outcome == "rolled_back"


def test_no_extension_runs_past_the_end_of_training() -> None:
    # It was extended past the last step and rolled back at the end of training: the extension's
    # steps thrown away with the trial's (290 of a 400-step run, with two extensions).
    run, engine = ScriptedRun(), _engine(Perturb(radius=0.1), probation_extensions=2)
    engine.check(run, _stall(run))
    assert engine.trial is not None
    end = engine.trial.end
    engine.horizon = end + 5  # a few steps left after the trial's probation, not a window
    news: list[Any] = []
    while run.step < end:
        news = engine.check(run, Check(run.feed(1.0 - 1e-5)))  # better, not by 1e-3
    assert not [n for n in news if isinstance(n, Note) and "extended" in n.text]
    assert [n.outcome for n in news if isinstance(n, Verdict)] == ["rolled_back"]


def test_a_rounding_sized_gain_earns_no_extension() -> None:
    # A step that did nothing, on a noise-free value: 7.072139263153077 -> ...078 earned two
    # extensions.
    run, engine = ScriptedRun(), _engine(Perturb(radius=0.1), probation_extensions=1)
    engine.check(run, _stall(run))
    assert engine.trial is not None
    end = engine.trial.end
    news: list[Any] = []
    while run.step < end:
        news = engine.check(run, Check(run.feed(1.0 - 1e-12)))
    assert not [n for n in news if isinstance(n, Note) and "extended" in n.text]
    assert [n.outcome for n in news if isinstance(n, Verdict)] == ["rolled_back"]


def test_without_a_cooldown_no_doubled_wait_is_announced() -> None:
    run, engine = ScriptedRun(), _engine(Perturb(radius=0.1), LRKick(), cooldown_steps=0)
    engine.check(run, _stall(run))
    news: list[Any] = []
    while engine.trial is not None:
        news = engine.check(run, Check(run.feed(1.0)))
    [wait] = [n for n in news if isinstance(n, Note)]
    assert wait.text == (
        "next escape at the next diagnosis: 1 failed escape(s) since the last one that helped "
        "(no wait to double)"
    )


def _verdicts_on_noise(
    shift: float,
    noise_margin: float,
    seeds: int = 100,
    reasons: list[str] | None = None,
    outcome: str = "accepted",
    keep_neutral: bool = True,
) -> int:
    """How many of ``seeds`` trials on a noisy plateau end with ``outcome``, when the escape moves
    the monitored value's mean by ``shift`` (a raw sample's noise is 0.05; smoothing 0.9)."""
    kept = 0
    for seed in range(seeds):
        noise = random.Random(seed)
        run, engine = ScriptedRun(smoothing=0.9), _engine(Perturb(radius=0.1))
        engine.noise_margin = noise_margin
        engine.keep_neutral = keep_neutral
        status = run.feed(1.0 + noise.gauss(0, 0.05))
        while not status.stalled:
            status = run.feed(1.0 + noise.gauss(0, 0.05))
        engine.check(run, Check(status, Diagnosis(status.step, "plateau", "flat"), episode="x"))
        assert engine.trial is not None
        news: list[Any] = []
        while engine.trial is not None:
            news = engine.check(run, Check(run.feed(1.0 + shift + noise.gauss(0, 0.05))))
        verdicts = [n for n in news if isinstance(n, Verdict)]
        kept += verdicts[0].outcome == outcome
        if reasons is not None:
            reasons.append(verdicts[0].reason)
    return kept


def test_an_escape_that_changes_nothing_is_not_kept_on_the_noise() -> None:
    # The threshold alone (1e-3 of the value) keeps about half of the escapes that did nothing:
    # the verdict is a coin toss. Beyond two standard errors of the difference, few (about 2%
    # with the noise known exactly; it is estimated from about 20 samples here).
    assert _verdicts_on_noise(0.0, noise_margin=0.0) >= 35
    assert _verdicts_on_noise(0.0, noise_margin=2.0) <= 10
    # An escape that helps by twice a raw sample's noise is kept either way.
    assert _verdicts_on_noise(-0.1, noise_margin=0.0) == 100
    assert _verdicts_on_noise(-0.1, noise_margin=2.0) == 100


def test_a_promising_trial_that_ends_better_is_kept_within_the_noise() -> None:
    # Given more probation for its gain and still better at the end: kept without credit, so a
    # real gain of one raw sample's noise is thrown away with its probation steps by 18 trials of
    # 100 instead of 29 (and a quarter of it by 58 instead of 72).
    assert _verdicts_on_noise(-0.05, noise_margin=2.0, outcome="rolled_back") <= 20
    strict = _verdicts_on_noise(-0.05, noise_margin=2.0, outcome="rolled_back", keep_neutral=False)
    assert strict >= 24
    assert _verdicts_on_noise(-0.025, noise_margin=2.0, outcome="rolled_back") <= 62
    # An escape that changed nothing is rarely ahead twice: mostly rolled back, as before.
    assert _verdicts_on_noise(0.0, noise_margin=2.0, outcome="neutral") <= 10
    assert _verdicts_on_noise(0.0, noise_margin=2.0, outcome="rolled_back") >= 80
    # An escape that hurts is rolled back.
    assert _verdicts_on_noise(0.05, noise_margin=2.0, outcome="rolled_back") == 100


def test_without_keep_neutral_a_trial_short_of_the_margin_is_rolled_back() -> None:
    run, engine = ScriptedRun(), _engine(Perturb(radius=0.1), keep_neutral=False)
    found = _stall(run)
    before = run.weights()
    engine.check(run, found)
    news: list[Any] = []
    while engine.trial is not None:
        news = engine.check(run, Check(run.feed(1.0 - 5e-4)))  # better, not by 1e-3
    assert isinstance(news[0], Verdict) and news[0].outcome == "rolled_back"
    assert _equal(run.weights(), before)


def test_a_neutral_escape_is_kept_and_the_ladder_moves_on() -> None:
    run, engine = ScriptedRun(), _engine(Perturb(radius=0.1), LRKick(), cooldown_steps=20)
    found = _stall(run)
    engine.check(run, found)
    jumped = run.weights()
    news: list[Any] = []
    while engine.trial is not None:
        news = engine.check(run, Check(run.feed(1.0 - 5e-4)))  # better, not by 1e-3
    verdict, wait = news
    assert isinstance(verdict, Verdict) and verdict.outcome == "neutral"
    assert "better but not by 0.001: kept, not counted as help" in verdict.reason
    assert _equal(run.weights(), jumped)  # not restored
    assert engine.events[0].verdict == "neutral"
    # To the policy it is a failure: the next rung, after a back-off.
    assert isinstance(wait, Note) and "next escape not before step" in wait.text
    assert engine.policy.position("plateau") == (1, 0)
    assert engine.policy.backoff == 1


def test_a_verdict_the_noise_decided_says_so() -> None:
    by_noise: list[str] = []
    by_tolerance: list[str] = []
    _verdicts_on_noise(-0.025, noise_margin=2.0, seeds=5, reasons=by_noise)
    _verdicts_on_noise(-0.025, noise_margin=0.0, seeds=5, reasons=by_tolerance)
    # Kept (with or without credit) against the margin, which the reason names; a rollback
    # needs no margin: the trial did not end better.
    judged = [reason for reason in by_noise if ", not better:" not in reason]
    assert judged and all("(set by the value's noise)" in reason for reason in judged)
    assert not any("noise" in reason for reason in by_tolerance)


def test_the_noise_margin_is_checked() -> None:
    with pytest.raises(ValueError, match=r"noise_margin.*-1"):
        _engine(Perturb(radius=0.1), noise_margin=-1.0)


def test_finish_settles_a_trial_and_undoes_its_effect() -> None:
    run, engine = ScriptedRun(), _engine(LRKick(factor=10.0, steps=50))
    engine.check(run, _stall(run))
    assert engine.acting(run.step + 1)
    [verdict] = engine.finish(run, run.feed(1.0))
    assert isinstance(verdict, Verdict) and verdict.final
    assert "settled at the end of training" in engine.events[0].reason
    assert engine.trial is None and not engine.acting(run.step + 1)


def test_a_passive_engine_never_acts() -> None:
    run, engine = ScriptedRun(), _engine(Perturb(radius=0.1))
    engine.passive = True
    before = run.weights()
    assert engine.check(run, _stall(run)) == []
    assert engine.events == [] and _equal(run.weights(), before)


def test_state_resumes_mid_probation_through_a_weights_only_checkpoint() -> None:
    run, engine = ScriptedRun(), _engine(LRKick(factor=10.0, steps=5), Perturb(radius=0.1))
    engine.check(run, _stall(run))
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    buffer.seek(0)
    resumed = _engine(LRKick(factor=10.0, steps=5), Perturb(radius=0.1))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.events == engine.events
    assert resumed.trial is not None and engine.trial is not None
    a, b = resumed.trial.state_dict(), engine.trial.state_dict()
    assert {k: v for k, v in a.items() if k != "saved"} == {
        k: v for k, v in b.items() if k != "saved"
    }
    assert resumed.trial.step.describe() == engine.trial.step.describe()


def test_records_are_frozen_and_round_trip() -> None:
    event = EscapeEvent(3, "plateau", "Perturb(radius=0.1)", "why", 1.0)
    assert EscapeEvent.from_dict(event.to_dict()) == event
    with pytest.raises(AttributeError):
        event.verdict = "accepted"  # type: ignore[misc]


def test_bad_engine_arguments() -> None:
    for kwargs, match in [
        ({"probation_steps": 0}, "`probation_steps` must be a positive integer, got 0"),
        ({"probation_extensions": -1}, "`probation_extensions` must be a non-negative integer"),
        ({"mode": "low"}, "`mode` can be 'min', 'max', got 'low'"),
        ({"guard_every_n_steps": 0}, "`guard_every_n_steps` must be a positive integer, got 0"),
        ({"keep_neutral": "yes"}, "`keep_neutral` must be a bool, got 'yes'"),
    ]:
        with pytest.raises(ValueError, match=match):
            EscapeEngine(EscapePolicy(), **kwargs)


@pytest.mark.parametrize("steps", [500, 2000, 8000])
def test_a_run_no_escape_helps_wastes_log_t_not_t(steps: int) -> None:
    # Every escape fails and the run stays stalled: the worst case the back-off bounds.
    cooldown, probation = 20, 10
    run = ScriptedRun()
    policy = EscapePolicy(
        {"plateau": [Perturb(radius=0.1)]},
        max_escapes=1000,
        max_failures=1000,
        cooldown_steps=cooldown,
    )
    engine = EscapeEngine(policy, probation_steps=probation, probation_extensions=0)
    while run.step < steps:
        status = run.feed(1.0)
        diagnosis = Diagnosis(status.step, "plateau", "flat") if status.stalled else None
        engine.check(run, Check(status, diagnosis, episode="plateau" if diagnosis else None))
    failed = [e for e in engine.events if e.verdict == "rolled_back"]
    # The waits before the n-th trial add up to cooldown * (2 ** (n - 1) - 1) <= steps.
    bound = 1 + math.log2(steps / cooldown + 1)
    assert len(failed) <= bound
    assert len(failed) >= bound - 2  # it does keep trying, ever more rarely
    wasted = sum(e.end_step - e.step for e in failed)
    assert wasted <= probation * bound


def test_no_escape_starts_while_the_run_diverges() -> None:
    # A stall diagnosed, then a kept escape, then a blow-up while the episode's stall lasts: the
    # check that would try again "from where we stand" must not act on the stale diagnosis.
    run, engine = ScriptedRun(), _engine(Perturb(radius=0.1), cooldown_steps=0)
    engine.check(run, _stall(run))
    while engine.trial is not None:
        engine.check(run, Check(run.feed(0.5)))
    assert engine.events[0].verdict == "accepted"
    news: list[Any] = []
    status = run.feed(0.5)
    while not (status.stalled and status.diverging):
        status = run.feed(3.0)  # worse than the best 0.5 by more than its scale
    weights = run.weights()
    news = engine.check(run, Check(status, None, episode="plateau"))
    assert len(engine.events) == 1 and engine.trial is None
    assert _equal(run.weights(), weights)
    assert not any(isinstance(n, EscapeEvent) for n in news)


def test_the_engine_and_the_policy_refuse_what_they_cannot_use() -> None:
    # An engine without a policy failed at its first reset (AttributeError), a policy given a
    # string at `.items()`, one step for a ladder at iteration, and a generator was spent by the
    # check, leaving the ladder empty.
    with pytest.raises(ValueError, match="`policy` must be an EscapePolicy, got None"):
        EscapeEngine(None)  # type: ignore[arg-type]
    for ladders, match in [
        ("x", "`ladders` must be a mapping of kind to escape steps, got 'x'"),
        ({"plateau": Perturb()}, r"`ladders\['plateau'\]` must be a list of EscapeStep"),
        ({"plateau": (s for s in [Perturb()])}, r"`ladders\['plateau'\]` must be a list"),
    ]:
        with pytest.raises(ValueError, match=match):
            EscapePolicy(ladders)  # type: ignore[arg-type]


class Shape(enum.Enum):
    ROUND = "round"


@dataclasses.dataclass(eq=False, repr=False)
class ShapedPerturb(Perturb):
    shape: Shape = Shape.ROUND


def test_a_trial_is_rebuilt_from_its_checkpoint_without_importing_anything(tmp_path: Any) -> None:
    # Settings a weights-only load refuses (an enum) made the checkpoint unloadable; a module the
    # checkpoint named was imported (its top-level code ran), and one renamed since failed.
    from lightning_escape.probation import _rebuilt, _step_state

    shaped = _step_state(ShapedPerturb())
    assert "step_config" not in shaped and "step_class" not in shaped
    torch.save(_step_state(Perturb(radius=0.3)), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    ladder = [Perturb(radius=0.5)]

    def make(kind: str, rung: int, strength: int) -> EscapeStep:
        return ladder[rung]

    where = {"kind": "plateau", "rung": 0, "strength": 0}
    assert _rebuilt({**where, **state}, make).describe() == Perturb(radius=0.3).describe()
    renamed = {**state, "step_class": "train_v1:Perturb", "step_config": ladder[0].config()}
    assert _rebuilt({**where, **renamed}, make) is ladder[0]
    foreign = {**state, "step_class": "this:Anything"}
    assert "this" not in sys.modules
    with pytest.raises(ValueError, match=r"this:Anything at rung 0 .* whose class is not imported"):
        _rebuilt({**where, **foreign}, make)
    assert "this" not in sys.modules


class _Reshaped(ScriptedRun):
    """A run whose shape changed since the trial began: the snapshot no longer fits it."""

    def restore(self, saved: Saved) -> None:
        raise WorldChanged("the module's buffers changed")


def test_a_trial_stopped_by_an_error_that_cannot_be_restored_is_kept_not_called_rolled_back() -> (
    None
):
    # The event and the verdict said "rolled_back" while the run went on with the trial's state.
    run, engine = _Reshaped(), _engine(Perturb(radius=0.1))
    engine.check(run, _stall(run))
    jumped = run.weights()
    news = engine.abort(run, run.tracker.status().step, "an error")
    [verdict] = [n for n in news if isinstance(n, Verdict)]
    assert verdict.outcome == engine.events[0].verdict == "neutral"
    assert "not restored" in verdict.reason
    assert _equal(run.weights(), jumped)


def test_a_withdrawn_rung_is_passed_over_uncounted_and_after_a_resume() -> None:
    run = ScriptedRun()
    policy = EscapePolicy({"plateau": [Perturb(radius=0.1), LRKick()]}, cooldown_steps=0)
    step, _ = policy.choose("plateau", run.context())
    assert isinstance(step, Perturb)
    policy.started()
    policy.withdrawn("plateau", 0, "it never acted")
    assert policy.used == 0
    resumed = EscapePolicy({"plateau": [Perturb(radius=0.1), LRKick()]}, cooldown_steps=0)
    resumed.load_state_dict(policy.state_dict())
    for each in (policy, resumed):
        step, note = each.choose("plateau", run.context())
        assert isinstance(step, LRKick)
        assert note == "skipped Perturb(radius=0.1, scale='auto', seed=0) (it never acted)"
