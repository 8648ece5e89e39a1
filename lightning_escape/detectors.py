"""Stall detection and diagnosis as pure logic over host-side numbers.

:class:`StallTracker` follows a monitored value (the training loss by default) and the gradient norm,
one sample at a time, and says when training has stalled: the smoothed value has not improved by a
tolerance for a window of optimizer steps, weighed by how far the gradient norm has faded from its own
running level. :func:`classify` turns a stall and the evidence gathered about it (curvature, duplicate
units, dead units, contracting recurrences) into a :class:`Diagnosis` with its numbers and a sentence
a person can check.

Nothing here touches tensors or Lightning; the callbacks feed it numbers they read back once per check.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from lightning_escape._validation import (
    check_choice,
    check_nonnegative_int,
    check_positive_float,
    check_positive_int,
    check_range,
)
from lightning_escape.progress import Motion
from lightning_escape.signal_flow import SignalFade

__all__ = [
    "KINDS",
    "Check",
    "CurvatureEvidence",
    "DeadEvidence",
    "Diagnosis",
    "Kind",
    "RecurrentEvidence",
    "StallStatus",
    "StallTracker",
    "SymmetricEvidence",
    "classify",
]

Kind = Literal[
    "healthy",
    "plateau",
    "saddle",
    "local_minimum",
    "converged",
    "symmetric_units",
    "dead_units",
    "vanishing_gradient",
    "diverging",
]
KINDS: tuple[Kind, ...] = get_args(Kind)
Mode = Literal["min", "max"]

_TINY = 1e-30  # floor for logarithms of gradient norms that are exactly zero
# The longest patience the gradient averages take into account (see `StallTracker.reset`).
_LONGEST = 2**40
# On a floor, a saddle needs a negative eigenvalue this many times `saddle_tol` (relative).
_FLOOR_SADDLE = 10
# On a floor the gradient norm only fluctuates around its running level (the ratio of a fast to a
# slow average of its logarithm): a few percent either way is noise, not a run leaving the floor.
_FLOOR_GRAD_RISE = 1.1


def _fmt(x: float) -> str:
    """A number as a person reads it: 4 significant digits."""
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.4g}"


@dataclass(frozen=True)
class Diagnosis:
    """What kind of stuck a run is, the numbers that say so, and one sentence of why.

    Attributes:
        step: Optimizer step at which the diagnosis was made.
        kind: One of :data:`KINDS`.
        reason: One line a person can read and check against ``evidence``.
        evidence: The numbers behind the decision (plain floats, ints and strings).
    """

    step: int
    kind: Kind
    reason: str
    evidence: dict[str, float | int | str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (``step``, ``kind``, ``reason``, ``evidence``) for logs and checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Diagnosis:
        """Inverse of :meth:`to_dict`."""
        return cls(
            step=int(data["step"]),
            kind=data["kind"],
            reason=str(data["reason"]),
            evidence=dict(data.get("evidence", {})),
        )


@dataclass(frozen=True)
class StallStatus:
    """The tracker's view after the latest sample.

    Attributes:
        step: Step of the latest sample.
        stalled: Whether a stall is declared (warm-up over and ``score >= 1``).
        score: ``steps_since_improvement / patience`` times the gradient weight; ``>= 1`` is a stall.
        smoothed: Smoothed monitored value (in the user's sign convention).
        best: Best smoothed value so far (in the user's sign convention).
        since: Optimizer steps since the last significant improvement.
        threshold: The improvement that counts as significant now.
        noise: Standard error of ``smoothed`` from the samples' own noise (their scatter about a
            line through their neighbours), NaN before three samples.
        grad_norm: Recent gradient norm (geometric moving average), NaN without gradients.
        grad_ratio: Recent gradient norm over its long-run level, NaN without gradients.
        diverging: Why the run is diverging, or None.
        nonfinite: Whether the divergence is a non-finite value or gradient norm.
        warming_up: Whether the warm-up still forbids decisions.
        start: First smoothed value (in the user's sign convention), NaN before any.
    """

    step: int
    stalled: bool
    score: float
    smoothed: float
    best: float
    since: int
    threshold: float
    noise: float
    grad_norm: float
    grad_ratio: float
    diverging: str | None
    nonfinite: bool
    warming_up: bool
    start: float = math.nan


@dataclass(frozen=True)
class Check:
    """What a detector found at one check: the tracker's status and any news.

    Attributes:
        status: The tracker's status after the samples read back at this check.
        diagnosis: A diagnosis made at this check, or None when there is nothing new.
        improved: Whether the best smoothed value improved at this check.
        episode: The kind diagnosed in the current stall episode (None once the run improves).
        fresh: Whether a value of the monitored metric measured since the previous one was read at
            this check; ``status`` then stands at the step it was measured at. Always true for the
            training loss; for a metric logged at validation, only at the check that reads each
            validation's value (before the next batch trains, or at a validation's end for a
            trial's verdict). A check without one declares no stall and gives no verdict (a
            non-finite gradient norm is still a divergence).
    """

    status: StallStatus
    diagnosis: Diagnosis | None = None
    improved: bool = False
    episode: str | None = None
    fresh: bool = True


_NOISE_DECAY = 0.9
"""The least decay per sample of the samples' noise level: it averages about 10 samples or more."""
_LOG_CHI2_1 = -1.2703628454614782  # E[log X] for X ~ chi2(1): digamma(1/2) + log(2)
_GEOMETRIC_CAP = 8.0
"""The noise level is the arithmetic mean of the variances, at most this times their geometric
mean: on Gaussian noise the two agree, on a metric over a finite set (an accuracy) the geometric
mean reads 0.3 to 0.6 of the arithmetic, and after a transient it is far below it."""


class StallTracker:
    """Decides when a monitored value has stalled, with gradient evidence on the run's own scale.

    Each :meth:`update` adds one sample (an optimizer step's monitored value and gradient norm).

    - **Smoothing:** a bias-corrected exponential moving average of the monitored value with decay
      ``smoothing`` per sample.
    - **Improvement:** the smoothed value improves when it beats the best so far by
      ``max(min_delta, min_delta_rel * |best|)``. The relative part keeps the rule independent of the
      loss scale; the absolute part makes it fire when the loss creeps towards 0 (a relative rule alone
      never does). ``min_delta=None`` sets the absolute part to ``1e-6`` times the first smoothed value,
      so no default depends on the loss scale.
    - **Gradient evidence:** the gradient norm's geometric moving averages over about ``patience / 4``
      steps (recent) and ``4 * patience`` steps (running level); their ratio ``r`` is scale-free.
    - **Stall score:** ``since / patience * clip(r ** -0.5, 0.5, 2)``: a stall is declared at ``score >= 1``,
      so gradients faded to a quarter of their level or less halve the wait, and gradients growing to
      four times it or more double it.
    - **Divergence:** a non-finite value or gradient norm at once; after warm-up, a smoothed value
      worse than the best by more than ``divergence_factor`` times the larger of the starting and the
      best value's magnitude, or a recent gradient norm ``grad_spike_factor`` times its running level
      while the smoothed value is worse than its best by more than the tolerance and than the
      samples' spread around it (the root mean square deviation of a sample from the smoothed
      value before it): the level remembers a flat stretch long after the run has left it.

    Args:
        mode: ``"min"`` if lower is better (losses), ``"max"`` if higher is better.
        patience: Optimizer steps without significant improvement that make a stall.
        warmup_steps: Steps after the first sample during which no stall is declared.
        min_delta: Absolute improvement that counts; ``None`` for ``1e-6`` times the first value.
        min_delta_rel: Improvement that counts, relative to the best value.
        smoothing: EMA decay of the monitored value per sample, in ``[0, 1)``.
        divergence_factor: See above; ``inf`` disables the value rule.
        grad_spike_factor: See above; ``inf`` disables the gradient rule.

    Example:
        >>> tracker = StallTracker(patience=5, warmup_steps=0, smoothing=0.0)
        >>> for step in range(12):
        ...     tracker.update(step, 1.0, 0.1)
        >>> status = tracker.status()
        >>> status.stalled, status.since
        (True, 11)
    """

    def __init__(
        self,
        mode: Mode = "min",
        patience: int = 200,
        warmup_steps: int = 200,
        min_delta: float | None = None,
        min_delta_rel: float = 1e-3,
        smoothing: float = 0.95,
        divergence_factor: float = 1.0,
        grad_spike_factor: float = 1e3,
    ) -> None:
        self.mode: Mode = check_choice("mode", mode, ("min", "max"))
        self.patience = check_positive_int("patience", patience)
        self.warmup_steps = check_nonnegative_int("warmup_steps", warmup_steps)
        if min_delta is not None:
            min_delta = check_range("min_delta", min_delta, 0.0, math.inf, high_open=True)
        self.min_delta = min_delta
        self.min_delta_rel = check_range("min_delta_rel", min_delta_rel, 0.0, 1.0)
        self.smoothing = check_range("smoothing", smoothing, 0.0, 1.0, high_open=True)
        self.divergence_factor = _check_factor("divergence_factor", divergence_factor)
        self.grad_spike_factor = _check_factor("grad_spike_factor", grad_spike_factor)
        self.reset()

    def reset(self) -> None:
        """Forget every sample."""
        self._sign = 1.0 if self.mode == "min" else -1.0
        # Gradient averages over about patience / 4 (recent) and 4 * patience (level) steps. A
        # patience past 2**40 (no run is that long) counts as 2**40: at 2**52 the decay rounds to
        # 1 and the average would never start.
        span = min(self.patience, _LONGEST)
        self._fast_decay = 1 - min(1.0, 4 / span)
        self._slow_decay = 1 - 1 / (4 * span)
        self._s = _TrackerState()

    # ------------------------------------------------------------------ samples

    def update(
        self, step: int, value: float | None, grad_norm: float | None = None, *, span: int = 1
    ) -> None:
        """Add the sample of optimizer step ``step``.

        Args:
            step: The optimizer step (non-decreasing across calls).
            value: The monitored value, or None when this step has none.
            grad_norm: The global gradient norm, or None when unknown.
            span: How many samples' worth of decay ``value`` brings: the smoothed value decays by
                ``smoothing ** span`` before taking it. A metric measured at validation passes the
                optimizer steps since the previous validation, so a value measured every few
                hundred steps is not averaged with those of many epochs before.
        """
        self._s.step = step
        if self._s.first_step is None:
            self._s.first_step = step
        if value is not None:
            if not math.isfinite(value):
                self._s.nonfinite_step = step
                self._s.nonfinite = (
                    self._s.nonfinite or f"the monitored value is {value} at step {step}"
                )
            else:
                self._add_value(step, self._sign * value, max(1, span))
        if grad_norm is not None:
            if not math.isfinite(grad_norm):
                self._s.nonfinite_step = step
                self._s.nonfinite = (
                    self._s.nonfinite or f"the gradient norm is {grad_norm} at step {step}"
                )
            else:
                self._add_grad(grad_norm)

    def _add_value(self, step: int, v: float, span: int) -> None:
        s, alpha = self._s, self.smoothing
        if s.n:
            # The value's spread around its smoothed level, for the gradient-spike rule.
            residual = v - self._smoothed()
            s.spread = alpha * s.spread + (1 - alpha) * residual**2
        decay = alpha**span
        self._add_noise(step, v, max(decay, _NOISE_DECAY))
        s.n += 1
        s.ema = decay * s.ema + (1 - decay) * v
        # The weights of the samples in `ema` sum to `norm` (bias correction) and their squares to
        # `norm2`: the smoothed value's variance is noise**2 * norm2 / norm**2.
        s.norm = decay * s.norm + (1 - decay)
        s.norm2 = decay**2 * s.norm2 + (1 - decay) ** 2
        smoothed = self._smoothed()
        if self._s.start is None:
            self._s.start = smoothed
        if smoothed < self._s.best - self._threshold():
            self._s.best = smoothed
            self._s.best_step = step

    def _add_noise(self, step: int, v: float, decay: float) -> None:
        """Update the samples' noise from the residual of a line through the two before.

        A linear trend cancels out of ``v - (1 + r) v1 + r v2`` (``r`` the ratio of the two step
        gaps), so descent is not mistaken for noise; independent noise of variance ``s**2`` gives
        it the variance ``s**2 (1 + (1 + r)**2 + r**2)``. The level is the arithmetic mean of
        these variances, capped at :data:`_GEOMETRIC_CAP` times their geometric mean (of
        logarithms, corrected by ``E[log chi2_1]`` for Gaussian noise), which forgets a transient:
        the curvature of a steep start or of a jump stays in an average of squares for hundreds
        of samples (a ratio of 1e8 still weighs 1e8 * 0.95**100 = 6e5 after 100), in one of
        logarithms it is gone in about a hundred (1e8 ** 0.95**100 = 1.1). Both decay by
        ``decay``: the value's own decay for this sample, but at least :data:`_NOISE_DECAY`, since
        a level needs several samples to estimate even where the value is hardly smoothed (a
        validation's, every few hundred steps: its noise is that of its last ten or so).
        """
        s = self._s
        if (
            s.last is not None
            and s.last_step is not None
            and s.last2 is not None
            and s.last2_step is not None
        ):
            gap1, gap2 = step - s.last_step, s.last_step - s.last2_step
            r = gap1 / gap2 if gap1 > 0 and gap2 > 0 else 1.0
            residual = v - (1 + r) * s.last + r * s.last2
            variance = residual**2 / (1 + (1 + r) ** 2 + r**2)
            # Sums of the weights, for the bias correction (the decay varies by sample).
            s.noise = decay * s.noise + (1 - decay) * variance
            s.noise_norm = decay * s.noise_norm + (1 - decay)
            # An exact zero is no sample of the level: a metric on a finite set (an accuracy)
            # repeats its residuals exactly, and a logarithm would read them as no noise.
            if variance > 0:
                s.noise_log = decay * s.noise_log + (1 - decay) * math.log(variance)
                s.noise_log_norm = decay * s.noise_log_norm + (1 - decay)
        s.last2, s.last2_step = s.last, s.last_step
        s.last, s.last_step = v, step

    def _noise(self) -> float:
        """Standard error of the smoothed value from the samples' noise; NaN before 3 samples."""
        s = self._s
        if s.noise_norm <= 0 or s.norm <= 0:
            return math.nan
        arithmetic = s.noise / s.noise_norm
        geometric = math.inf
        if s.noise_log_norm > 0:
            geometric = math.exp(s.noise_log / s.noise_log_norm - _LOG_CHI2_1)
        sigma = math.sqrt(min(arithmetic, _GEOMETRIC_CAP * geometric))
        return sigma * math.sqrt(s.norm2) / s.norm

    def _add_grad(self, g: float) -> None:
        log_g = math.log(max(g, _TINY))
        fast, slow = self._fast_decay, self._slow_decay
        self._s.g_n += 1
        self._s.g_fast = fast * self._s.g_fast + (1 - fast) * log_g
        self._s.g_slow = slow * self._s.g_slow + (1 - slow) * log_g

    def _smoothed(self) -> float:
        return self._s.ema / self._s.norm if self._s.n else math.nan

    def _spread(self) -> float:
        """Root mean square deviation of a sample from the smoothed value before it (bias-corrected)."""
        count = self._s.n - 1  # samples with a smoothed value before them
        if count < 1:
            return 0.0
        return math.sqrt(self._s.spread / (1 - self.smoothing**count))

    def _threshold(self) -> float:
        absolute = self.min_delta
        if absolute is None:
            absolute = 1e-6 * abs(self._s.start) if self._s.start is not None else 0.0
        best = abs(self._s.best) if math.isfinite(self._s.best) else 0.0
        return max(absolute, self.min_delta_rel * best)

    def _grad_levels(self) -> tuple[float, float]:
        """Recent gradient norm and its ratio to the running level (bias-corrected geometric means).

        Both are NaN before the first gradient sample.
        """
        if not self._s.g_n:
            return math.nan, math.nan
        log_recent = self._s.g_fast / (1 - self._fast_decay**self._s.g_n)
        log_level = self._s.g_slow / (1 - self._slow_decay**self._s.g_n)
        recent = math.exp(log_recent)
        # Zero norms were floored to take logarithms; report them as zero.
        return (0.0 if recent < 2 * _TINY else recent), math.exp(log_recent - log_level)

    # ------------------------------------------------------------------ decisions

    def status(self) -> StallStatus:
        """The decision after the latest sample."""
        step = self._s.step
        first = self._s.first_step if self._s.first_step is not None else step
        warming_up = step - first < self.warmup_steps
        recent, ratio = self._grad_levels()
        since = step - self._s.best_step if self._s.n else 0
        weight = 1.0 if math.isnan(ratio) else min(2.0, max(0.5, ratio**-0.5))
        score = since / self.patience * weight
        smoothed = self._smoothed()
        best = self._s.best if math.isfinite(self._s.best) else math.nan
        return StallStatus(
            step=step,
            # The tolerance keeps a score of exactly 1 (equal gradient levels) from rounding below.
            stalled=not warming_up and self._s.n > 0 and score >= 1.0 - 1e-9,
            score=score,
            smoothed=self._sign * smoothed,
            best=self._sign * best,
            since=since,
            start=math.nan if self._s.start is None else self._sign * self._s.start,
            threshold=self._threshold(),
            noise=self._noise(),
            grad_norm=recent,
            grad_ratio=ratio,
            diverging=self._divergence(warming_up, smoothed, ratio),
            nonfinite=self._s.nonfinite is not None,
            warming_up=warming_up,
        )

    def _divergence(self, warming_up: bool, smoothed: float, ratio: float) -> str | None:
        if self._s.nonfinite is not None:
            return self._s.nonfinite
        if warming_up or self._s.start is None or not math.isfinite(self._s.best):
            return None
        scale = max(abs(self._s.start), abs(self._s.best))
        if smoothed - self._s.best > self.divergence_factor * scale:
            return (
                f"the smoothed monitored value {_fmt(self._sign * smoothed)} is worse than its best "
                f"{_fmt(self._sign * self._s.best)} by more than {_fmt(self.divergence_factor)}x "
                f"its scale {_fmt(scale)}"
            )
        # A gradient spike counts only while the value is worse than its best: after a run has
        # settled at a critical point its gradient level is near zero, and leaving it (an escape)
        # multiplies the gradient norm many times while the value improves. Worse by more than a
        # sample's spread: the running level remembers the flat stretch for thousands of steps,
        # and a noisy descent's smoothed value sits above its best from time to time.
        margin = max(self._threshold(), self._spread())
        if ratio > self.grad_spike_factor and smoothed > self._s.best + margin:
            return (
                f"the gradient norm rose to {_fmt(ratio)}x its running level "
                f"(limit {_fmt(self.grad_spike_factor)}x)"
            )
        return None

    @property
    def last_nonfinite_step(self) -> int | None:
        """Step of the latest non-finite sample, None if none since the last :meth:`recovered`."""
        return self._s.nonfinite_step

    def recovered(self) -> None:
        """Forget a non-finite sample: the run has been finite since (a caller's judgement).

        A non-finite value is a divergence at once, and it stays one until this is called: the
        tracker cannot tell a one-off NaN from a run that stays broken.
        """
        self._s.nonfinite = None
        self._s.nonfinite_step = None

    @property
    def started(self) -> bool:
        """Whether any sample was added (since the last :meth:`reset`)."""
        return self._s.first_step is not None

    @property
    def first_step(self) -> int | None:
        """The step of the first sample added (since the last :meth:`reset`), or None."""
        return self._s.first_step

    def advance_to(self, step: int) -> None:
        """Move the clock to ``step`` without a sample (after restoring an earlier state)."""
        self._s.step = max(self._s.step, step)

    def mark_improved(self, step: int) -> None:
        """Start a new stall window at ``step`` (after an escape changed the run's course)."""
        self._s.best_step = step
        smoothed = self._smoothed()
        if math.isfinite(smoothed):
            self._s.best = min(self._s.best, smoothed)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers that resume the tracker exactly."""
        return asdict(self._s)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.reset()
        state = dict(state)
        if "norm" not in state:  # from before the weights were kept: every sample spanned 1
            n = int(state.get("n", 0))
            state["norm"] = 1 - self.smoothing**n
            a = self.smoothing
            state["norm2"] = (1 - a) ** 2 * (1 - a ** (2 * n)) / (1 - a**2) if n else 0.0
        self._s = _TrackerState(**state)


@dataclass
class _TrackerState:
    """Everything a :class:`StallTracker` learns from its samples (declared once: it resumes)."""

    ema: float = 0.0
    n: int = 0
    start: float | None = None  # first smoothed value (sign-normalised)
    best: float = math.inf
    best_step: int = 0
    first_step: int | None = None
    step: int = 0
    g_fast: float = 0.0
    g_slow: float = 0.0
    g_n: int = 0
    spread: float = 0.0  # EMA of the squared deviation of a sample from the smoothed value
    norm: float = 0.0  # sum of the weights of the samples in `ema`
    norm2: float = 0.0  # sum of their squares
    noise: float = 0.0  # EMA of a sample's noise variance (see `_add_noise`)
    noise_norm: float = 0.0  # sum of its weights
    noise_log: float = 0.0  # EMA of its logarithm, over the residuals that are not exactly 0
    noise_log_norm: float = 0.0
    last: float | None = None  # the two latest values and their steps
    last_step: int | None = None
    last2: float | None = None
    last2_step: int | None = None
    nonfinite: str | None = None
    nonfinite_step: int | None = None


def _motion_words(motion: Motion) -> str:
    """How far the parameters moved in the latest window, against the window before."""
    window = f"in the {motion.steps} steps to step {motion.step}"
    if motion.speed == 0:  # updates that round away (low-precision weights) or no updates at all
        return f"the parameters did not move {window}"
    against = []
    if math.isfinite(motion.trend):
        against.append(f"{_fmt(motion.trend)}x the window before")
    else:
        against.append("the window before did not move")
    if math.isfinite(motion.agreement):
        against.append(f"at cosine {_fmt(motion.agreement)} to it")
    return (
        f"the parameters moved {_fmt(motion.speed)} of their norm {window} ({', '.join(against)})"
    )


def _check_factor(name: str, value: float) -> float:
    if value == math.inf:
        return math.inf
    return check_positive_float(name, value)


# ---------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class CurvatureEvidence:
    """Extreme Hessian eigenvalues of the loss at the stall, and the step size they are judged by.

    Attributes:
        lambda_max: Largest eigenvalue.
        lambda_min: Smallest eigenvalue.
        lr: The learning rate of the optimizer (its fastest parameter group).
        grad_norm: Gradient norm on the probe batch.
        lambda_min_other: The curvature along ``lambda_min``'s eigenvector on another batch
            (NaN if not measured): the smallest eigenvalue of one batch's Hessian is partly an
            extreme of that batch's noise, and a direction of descent that is the loss's holds
            on another batch too.
        loss: The loss on the probe batch (NaN if unknown).
        loss_other: The loss on the other batch (NaN if not measured); where it differs from
            ``loss``, training sees a different loss at every step (minibatches, augmentation).
    """

    lambda_max: float
    lambda_min: float
    lr: float
    grad_norm: float = math.nan
    lambda_min_other: float = math.nan
    loss: float = math.nan
    loss_other: float = math.nan

    @property
    def descent(self) -> float:
        """The curvature of the probe's direction of descent on both batches: the larger one.

        ``lambda_min`` where no other batch was measured.
        """
        if math.isnan(self.lambda_min_other):
            return self.lambda_min
        return max(self.lambda_min, self.lambda_min_other)

    @property
    def stochastic(self) -> bool:
        """Whether the two batches' losses differ (by more than 1e-3 relative): a noisy loss."""
        a, b = self.loss, self.loss_other
        if not (math.isfinite(a) and math.isfinite(b)):
            return False
        return abs(a - b) > 1e-3 * max(abs(a), abs(b))


@dataclass(frozen=True)
class SymmetricEvidence:
    """A group of hidden units that are copies of one another, with identical gradients."""

    layer: str
    units: int
    out_features: int


@dataclass(frozen=True)
class DeadEvidence:
    """Units of an activation layer that never activated on the probe batch.

    Attributes:
        layer: The activation module's name.
        dead: How many of its units never activated.
        total: Its units.
        batches: The batches looked at: the probe's, and the one before it when 2.
    """

    layer: str
    dead: int
    total: int
    batches: int = 1


@dataclass(frozen=True)
class RecurrentEvidence:
    """A vanilla recurrent matrix that contracts: the gradient through time fades geometrically.

    Attributes:
        layer: The recurrent matrix, as a parameter name (``"rnn.weight_hh_l0"``).
        radius: Its spectral radius (largest eigenvalue modulus): backpropagated through ``k``
            steps, a gradient shrinks at least like ``radius ** k`` (the tanh's slope only adds to
            it).
        size: The hidden size (the matrix is ``size × size``).
    """

    layer: str
    radius: float
    size: int

    def horizon(self, fade: float = 1e-3) -> float:
        """Time steps after which the gradient has faded below ``fade`` of its size."""
        if self.radius <= 0:
            return 1.0
        return math.inf if self.radius >= 1 else math.log(fade) / math.log(self.radius)


def classify(
    status: StallStatus,
    *,
    curvature: CurvatureEvidence | None = None,
    curvature_note: str | None = None,
    symmetric: Sequence[SymmetricEvidence] = (),
    dead: Sequence[DeadEvidence] = (),
    recurrent: Sequence[RecurrentEvidence] = (),
    fading: SignalFade | None = None,
    plateau_tol: float = 1e-3,
    saddle_tol: float = 1e-2,
    dead_fraction: float = 0.5,
    metric: str = "loss",
    target: float | None = None,
    mode: Mode = "min",
    converged_rel: float = 1e-2,
    noise_floor_rel: float = 0.25,
    training: StallStatus | None = None,
    motion: Motion | None = None,
    moving: bool = False,
    lr: float = math.nan,
    lr_peak: float = math.nan,
    annealed_rel: float = 1e-2,
) -> Diagnosis:
    """Name the kind of a stall from its evidence, most specific first.

    1. ``diverging``: the tracker saw a non-finite or runaway value (checked even without a stall).
    2. ``symmetric_units``: some layer has units with identical incoming weights and identical
       gradients: no gradient method can separate them (a trap with or without a stall).
    3. ``healthy``: no stall.
    4. ``converged``: the best value has reached ``target`` (good enough, by the user's measure),
       or a schedule has annealed the learning rate to at most ``annealed_rel`` of its peak in
       the run (``lr <= annealed_rel * lr_peak``): the run is settling by design, and whatever an
       escape changed, training at such a rate could not act on it within a probation window.
    5. ``dead_units``: at least ``dead_fraction`` of some activation layer's units never activate,
       unless the run sits on a floor (rule 7's, by the loss alone).
    6. ``vanishing_gradient``: a vanilla recurrent matrix contracts (``recurrent`` evidence, the
       layers whose spectral radius is below the classifier's limit): the gradient of an early
       input fades geometrically with the distance, so what the run has to remember gets no signal
       (Bengio, Simard and Frasconi, 1994; Pascanu, Mikolov and Bengio, 2013). Or the input's
       signal fades through a deep stack (``fading`` evidence: the part of the output layer's
       output that depends on the example, against its size, is a small fraction of what it is
       at the layer where it is largest): the output is nearly the same for every example, and
       the gradient reaching the lower layers fades in the same way (Glorot and Bengio, 2010).
    7. With curvature: ``converged`` when the run sits on a floor (a non-negative loss, with
       ``mode="min"``, at most ``converged_rel`` times its starting value, with the gradient norm
       not rising: at most 1.1 times its running level) and no strong direction of descent remains
       (``λ_min >= -10 * saddle_tol * |λ_max|``: real networks keep small negative eigenvalues
       at their minima). Or ``converged`` on a noise floor: the loss differs from batch to batch
       (``curvature.stochastic``), its best is at most ``noise_floor_rel`` times its start, the
       gradient norm is not rising, and no strong direction of descent holds on two batches (as
       above, with ``curvature.descent``): a run on noisy data settles at the noise's level, not
       at 0, and its minibatches' Hessians keep negative eigenvalues that are their own.
       Otherwise ``saddle`` when the direction of descent's curvature on both batches
       (``curvature.descent``, ``λ_min`` itself when no other batch was measured) is below
       ``-saddle_tol * |λ_max|``; ``plateau`` when
       ``lr * max|λ| < plateau_tol`` (a step along any measured direction would need more than
       ``1 / plateau_tol`` steps to change the gradient by its own size), else ``local_minimum``.
    8. Without curvature: ``converged`` on a floor as above, else ``plateau``, the generic stall,
       with ``curvature_note`` saying why.

    The parameters' ``motion`` over the last window, when measured, is part of the evidence.

    Args:
        status: The tracker's status at the step of the diagnosis.
        curvature: Extreme eigenvalues, if the probe ran.
        curvature_note: Why the probe did not run, when it did not.
        symmetric: Groups of duplicate units found.
        dead: Dead-unit counts per activation layer.
        recurrent: Contracting recurrent matrices (see rule 6).
        fading: How the input's signal fades through the layers, when it fades enough to be a
            cause (see rule 6).
        plateau_tol: See rule 7.
        saddle_tol: See rule 7.
        dead_fraction: See rule 5.
        metric: Name of the monitored value, for the sentence.
        target: The monitored value that is good enough (reached: rule 4), or None.
        mode: ``"min"`` if lower is better, ``"max"`` if higher is better.
        converged_rel: See rule 7; ``0`` turns the floor rule off.
        noise_floor_rel: See rule 7; ``0`` turns the noise-floor rule off.
        training: The training loss's status when ``status`` is another metric's (a validation
            loss, first measured after training has begun): the noise floor is the training
            loss's, judged against its own start.
        motion: How the parameters moved over the last window.
        moving: Whether ``motion`` counts as a run on its way (see
            :class:`~lightning_escape.progress.MotionRule`); only a trap that motion does not
            hold off (a contracting recurrence) is diagnosed over such a run.
        lr: The learning rate now (NaN if unknown; ``curvature.lr`` then stands in), for rule 4.
        lr_peak: The highest learning rate the run has had so far (NaN if unknown), for rule 4.
        annealed_rel: See rule 4; ``0`` turns the annealing rule off.

    Returns:
        The diagnosis.

    Example:
        >>> tracker = StallTracker(patience=3, warmup_steps=0, smoothing=0.0)
        >>> for step in range(5):
        ...     tracker.update(step, 0.5, 1e-3)
        >>> d = classify(tracker.status(), curvature=CurvatureEvidence(2.0, -2.0, lr=0.1))
        >>> d.kind
        'saddle'
        >>> classify(tracker.status(), target=0.6).kind
        'converged'
    """
    evidence: dict[str, float | int | str] = {
        "smoothed": status.smoothed,
        "best": status.best,
        "steps_since_improvement": status.since,
        "min_improvement": status.threshold,
        "stall_score": status.score,
        "grad_norm": status.grad_norm,
        "grad_ratio": status.grad_ratio,
    }
    if motion is not None:
        evidence.update(
            speed=motion.speed,
            trend=motion.trend,
            agreement=motion.agreement,
            drift=motion.drift,
            motion_steps=motion.steps,
            motion_step=motion.step,
        )
    step = status.step
    if status.diverging is not None:
        return Diagnosis(step, "diverging", status.diverging, evidence)
    if not status.stalled and not symmetric:
        return Diagnosis(step, "healthy", f"{metric} is still improving", evidence)

    if status.stalled:
        stall = (
            f"{metric} {_fmt(status.smoothed)} has not improved by {_fmt(status.threshold)} "
            f"in {status.since} steps"
        )
    else:
        stall = f"{metric} {_fmt(status.smoothed)} is still improving"
    if not math.isnan(status.grad_ratio):
        stall += (
            f"; grad norm {_fmt(status.grad_norm)} is {_fmt(status.grad_ratio)}x its running level"
        )
    if motion is not None:
        stall += f"; {_motion_words(motion)}: " + (
            "a run on its way, but a trap motion does not hold off"
            if moving
            else "not a run on its way"
        )

    if symmetric:
        units = sum(s.units for s in symmetric)
        first = symmetric[0]
        evidence.update(
            symmetric_units=units, symmetric_groups=len(symmetric), symmetric_layer=first.layer
        )
        return Diagnosis(
            step,
            "symmetric_units",
            f"{stall}; {first.units} of {first.out_features} units in `{first.layer}` are copies "
            "of one another with identical gradients, which no gradient step can separate"
            + (f" ({len(symmetric)} groups, {units} units in all)" if len(symmetric) > 1 else ""),
            evidence,
        )

    if target is not None and status.stalled and _reached(status.best, target, mode):
        evidence["target"] = target
        return Diagnosis(
            step,
            "converged",
            f"{stall}; its best {_fmt(status.best)} has reached the target {_fmt(target)}: "
            "good enough, nothing to escape",
            evidence,
        )
    if math.isnan(lr) and curvature is not None:
        lr = curvature.lr
    annealed = _annealed(lr, lr_peak, annealed_rel) if status.stalled else None
    if annealed is not None:
        evidence.update(lr=lr, lr_peak=lr_peak)
        return Diagnosis(step, "converged", f"{stall}; {annealed}", evidence)
    floor = _on_floor(status, mode, converged_rel)
    if floor is not None:
        evidence["start"] = status.start

    worst = max(dead, key=lambda d: d.dead / d.total if d.total else 0.0, default=None)
    # Not on a floor: a run that has reached it learned its task with the units it has, and a
    # trained network's specialised units stay silent on many a small batch (half of them on
    # the 8 examples of a breast-cancer classifier at 0.07% of its start loss).
    if (
        worst is not None
        and worst.total
        and worst.dead / worst.total >= dead_fraction
        and floor is None
    ):
        evidence.update(
            dead_units=worst.dead, dead_total=worst.total, dead_fraction=worst.dead / worst.total
        )
        return Diagnosis(
            step,
            "dead_units",
            f"{stall}; {worst.dead} of {worst.total} units after `{worst.layer}` never activate "
            f"on the probe batch{' nor the one before' if worst.batches > 1 else ''} "
            f"(limit {dead_fraction:.0%})",
            evidence,
        )

    if recurrent and floor is None:
        worst_rnn = min(recurrent, key=lambda r: r.radius)
        evidence.update(
            recurrent_layer=worst_rnn.layer,
            recurrent_radius=worst_rnn.radius,
            recurrent_layers=len(recurrent),
        )
        return Diagnosis(
            step,
            "vanishing_gradient",
            f"{stall}; the recurrent matrix `{worst_rnn.layer}` contracts (spectral radius "
            f"{_fmt(worst_rnn.radius)}): a gradient through time fades below 1e-3 within "
            f"{_fmt(worst_rnn.horizon())} steps, so inputs further back get no signal"
            + (f" ({len(recurrent)} contracting layers)" if len(recurrent) > 1 else ""),
            evidence,
        )

    if fading is not None and floor is None:
        evidence.update(
            signal_source=fading.source,
            signal_output=fading.output,
            signal_fade=fading.fade,
            signal_layers=fading.layers,
        )
        return Diagnosis(
            step,
            "vanishing_gradient",
            f"{stall}; the input's signal fades through the {fading.layers} layers: the part of "
            f"`{fading.output}`'s output that depends on the example is {_fmt(fading.output_share)}"
            f" of its size, against {_fmt(fading.source_share)} at `{fading.source}` "
            f"({_fmt(fading.fade)}x), so the output hardly depends on the input and the lower "
            "layers get almost no gradient",
            evidence,
        )

    if curvature is None:
        note = curvature_note or "no curvature probe ran"
        evidence["curvature"] = note
        if floor is not None:
            return Diagnosis(step, "converged", f"{stall}; {floor}", evidence)
        return Diagnosis(
            step,
            "plateau",
            f"{stall}; {note}, so a saddle, a minimum and a plateau cannot be told apart",
            evidence,
        )

    lmax, lmin, lr = curvature.lambda_max, curvature.lambda_min, curvature.lr
    top = max(abs(lmax), abs(lmin))
    evidence.update(lambda_max=lmax, lambda_min=lmin, lr=lr, probe_grad_norm=curvature.grad_norm)
    descent = curvature.descent
    other = ""
    if not math.isnan(curvature.lambda_min_other):
        evidence.update(
            lambda_min_other=curvature.lambda_min_other,
            probe_loss=curvature.loss,
            probe_loss_other=curvature.loss_other,
        )
        other = f", {_fmt(curvature.lambda_min_other)} along its direction on another batch"
    saddle = descent < -saddle_tol * abs(lmax)
    # On a floor only a strong negative direction is worth escaping: real networks' Hessians
    # (estimated on a batch) keep small negative eigenvalues at their minima.
    strong = descent < -_FLOOR_SADDLE * saddle_tol * abs(lmax)
    if floor is not None and not strong:
        return Diagnosis(
            step,
            "converged",
            f"{stall}; {floor}, and curvature is non-negative within "
            f"{_FLOOR_SADDLE * saddle_tol:.0%} (λ_min = {_fmt(lmin)}{other}, "
            f"λ_max = {_fmt(lmax)})",
            evidence,
        )
    # The level is the training loss's where `status` is another metric's, with the gradient
    # norm's trend the detector measured.
    level = (
        status if training is None else dataclasses.replace(training, grad_ratio=status.grad_ratio)
    )
    noise_floor = None
    if curvature.stochastic:
        noise_floor = _on_floor(level, mode if training is None else "min", noise_floor_rel)
    if noise_floor is not None and not strong:
        if training is not None:
            noise_floor = f"the training loss: {noise_floor}"
        evidence.update(start=level.start, floor_best=level.best)
        return Diagnosis(
            step,
            "converged",
            f"{stall}; a noise floor: the loss differs from batch to batch "
            f"({_fmt(curvature.loss)} and {_fmt(curvature.loss_other)}), {noise_floor}, and "
            f"no strong direction of descent holds on both batches (λ_min = {_fmt(lmin)}"
            f"{other}, λ_max = {_fmt(lmax)})",
            evidence,
        )
    if lr * top < plateau_tol:
        steps = math.inf if lr * top == 0 else 1 / (lr * top)
        evidence["curvature_steps"] = steps
        return Diagnosis(
            step,
            "plateau",
            f"{stall}; curvature is flat: max|λ| = {_fmt(top)}, so at lr {_fmt(lr)} a step along it "
            f"takes {_fmt(steps)} steps to matter (plateau below {_fmt(1 / plateau_tol)})",
            evidence,
        )
    if saddle:
        return Diagnosis(
            step,
            "saddle",
            f"{stall}; λ_min = {_fmt(lmin)}{other} is negative against λ_max = {_fmt(lmax)} "
            f"(ratio {_fmt(descent / abs(lmax)) if lmax else '-inf'}): a direction of descent "
            "remains",
            evidence,
        )
    return Diagnosis(
        step,
        "local_minimum",
        f"{stall}; curvature is non-negative within {saddle_tol:.0%} "
        f"(λ_min = {_fmt(lmin)}{other}, λ_max = {_fmt(lmax)}): a minimum",
        evidence,
    )


def _reached(best: float, target: float, mode: Mode) -> bool:
    if not math.isfinite(best):
        return False
    return best <= target if mode == "min" else best >= target


def _annealed(lr: float, lr_peak: float, annealed_rel: float) -> str | None:
    """Why a schedule has annealed the run (its rate a small fraction of its peak), or None."""
    if annealed_rel <= 0 or not (math.isfinite(lr) and math.isfinite(lr_peak)) or lr_peak <= 0:
        return None
    if lr > annealed_rel * lr_peak:
        return None
    return (
        f"the learning rate {_fmt(lr)} is {_fmt(lr / lr_peak)} of its peak {_fmt(lr_peak)} in "
        f"this run (annealed below {_fmt(annealed_rel)}x): a schedule settling the run, which "
        "could not act on an escape at this rate"
    )


def _on_floor(status: StallStatus, mode: Mode, converged_rel: float) -> str | None:
    """Why the run sits on a floor (tiny non-negative loss, gradient not rising), or None."""
    start, best = status.start, status.best
    if mode != "min" or converged_rel <= 0 or not (math.isfinite(start) and math.isfinite(best)):
        return None
    if start <= 0 or best < 0 or best > converged_rel * start:
        return None
    if status.grad_ratio > _FLOOR_GRAD_RISE:  # NaN (no gradients) passes
        return None
    return (
        f"it has fallen to {_fmt(best / start)} of its start {_fmt(start)} "
        f"(a floor below {_fmt(converged_rel)}x) with the gradient norm not rising "
        f"({_fmt(status.grad_ratio)}x its level)"
    )
