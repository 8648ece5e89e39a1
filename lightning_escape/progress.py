"""Is the run still moving? Speed, trend and direction of the parameters, as pure tensor logic.

A flat loss does not mean a stuck run: sparse parity, grokking and other tasks with hidden progress
keep moving their parameters at a steady pace long before the loss shows it, while a run stuck at a
saddle, on a small-initialisation plateau or in a basin creeps, slows down towards a point, or is
pulled back and forth around one. :class:`DriftMeter` tells them apart from the parameters alone,
comparing the displacements of two consecutive windows of checks:

- **Speed**: the latest window's displacement against the size of the parameters (the largest of
  their norms at the window's ends and at the first sample): how far the run moves per window on
  its own scale. Slow growth away from a small initialisation or a saddle is directed but tiny.
- **Trend**: the latest window's displacement over the previous one's: below 1 a run settles
  towards a point (geometrically at a saddle's stable manifold), near 1 it keeps its pace.
- **Agreement**: the cosine between the two displacements (for SGD, between the two windows' mean
  gradients): near 1 for motion in one direction, near 0 for a random walk, negative for a run
  pulled back and forth across a basin.
- **Drift**: the net displacement over both windows against the path of the two,
  ``|a + b| / (|a| + |b|)``: 1 for straight motion, about ``1 / sqrt(2)`` for a random walk.

:class:`MotionRule` says when these numbers mean "still moving" (a declared stall is held off).
Two parameter-sized anchors are kept (the starts of the two windows) on the parameters' own device
and dtype; nothing is computed between window ends, every reduction is a fused norm, and the host
reads five numbers once per window.

Example:
    >>> import torch
    >>> meter = DriftMeter(window=2)
    >>> w = torch.zeros(3)
    >>> for _ in range(5):
    ...     w += torch.tensor([0.1, 0.0, 0.0])  # steady motion in one direction
    ...     motion = meter.sample(0, [w]) or meter.last
    >>> round(motion.agreement, 3), round(motion.trend, 3), MotionRule().moving(motion)
    (1.0, 1.0, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_escape._validation import check_positive_int, check_range
from lightning_escape.signals import foreach_norms, total_norm

__all__ = ["DriftMeter", "Motion", "MotionRule", "reference_motion"]

#: Sums a 0-d tensor of squared norms over the processes that hold shards of the parameters.
SumSquares = Callable[[Tensor], Tensor] | None


@dataclass(frozen=True)
class Motion:
    """How the parameters moved over the latest window, against the window before.

    Attributes:
        step: Optimizer step of the window's last check.
        steps: Optimizer steps the latest window covers.
        displacement: Norm of the latest window's displacement ``a``.
        previous: Norm of the previous window's displacement ``b``.
        span: Norm of the displacement over both windows, ``|a + b|``.
        scale: The parameter norm the speed is relative to.
        speed: ``displacement / scale`` (NaN when the parameters are all zero).
        trend: ``displacement / previous`` (NaN when the previous window did not move).
        agreement: Cosine between ``a`` and ``b`` (NaN when either is zero).
        drift: ``span / (displacement + previous)`` in ``[0, 1]`` (NaN when nothing moved).
    """

    step: int
    steps: int
    displacement: float
    previous: float
    span: float
    scale: float
    speed: float
    trend: float
    agreement: float
    drift: float

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers, for logs and checkpoints."""
        return asdict(self)


@dataclass(frozen=True)
class MotionRule:
    """When a run counts as still moving: fast enough, keeping its pace, not pulled back.

    Calibrated on the benchmark problems (``benchmarks/progress_signal.py`` records the values):
    sparse parity during its flat stretch moves about 7% of its norm per 100-step window at a
    steady pace (trend about 1, agreement about -0.2), while the stuck problems at their stalls
    move under 0.5% per window, or slow down towards a saddle (trend 0.5 to 0.9), or are pulled
    back and forth (agreement -0.5 to -0.9).

    Args:
        min_speed: Least displacement per window, relative to the parameters' norm.
        min_trend: Least ratio of the latest window's displacement to the previous one's.
        min_agreement: Least cosine between the two windows' displacements.

    Example:
        >>> rule = MotionRule()
        >>> rule.moving(Motion(199, 100, 0.07, 0.07, 0.09, 1.0, 0.07, 1.0, -0.2, 0.64))
        True
        >>> rule.moving(Motion(199, 100, 0.004, 0.005, 0.004, 1.0, 0.004, 0.8, -0.6, 0.4))
        False
    """

    min_speed: float = 0.02
    min_trend: float = 0.7
    min_agreement: float = -0.5

    def __post_init__(self) -> None:
        check_range("min_speed", self.min_speed, 0.0, math.inf, high_open=True)
        check_range("min_trend", self.min_trend, 0.0, math.inf, high_open=True)
        check_range("min_agreement", self.min_agreement, -1.0, 1.0)

    def moving(self, motion: Motion) -> bool:
        """Whether ``motion`` is a run still on its way (NaNs never are)."""
        return (
            motion.speed >= self.min_speed
            and motion.trend >= self.min_trend
            and motion.agreement >= self.min_agreement
        )

    def describe(self) -> str:
        """The rule in words."""
        return (
            f"moving means speed >= {self.min_speed:g}, trend >= {self.min_trend:g} and "
            f"agreement >= {self.min_agreement:g}"
        )


class DriftMeter:
    """Compares the parameters' displacements over consecutive windows of ``window`` checks.

    Call :meth:`sample` at every check with the same list of parameter tensors; every ``window``
    calls it closes a window, and from the second window on it returns a :class:`Motion` (also kept
    in :attr:`last`). :meth:`reset` starts over (a change of the parameter set, an escape's
    probation); :meth:`jumped` also drops :attr:`last` after a jump the meter did not make (an
    escape, a rollback).

    Args:
        window: Checks per window.
    """

    def __init__(self, window: int = 10) -> None:
        self.window = check_positive_int("window", window)
        self.last: Motion | None = None
        # The parameter set `last` measured (ids and shapes; unknown after a resume).
        self._last_key: tuple[tuple[int, tuple[int, ...]], ...] | None = None
        self._scale0: float | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the anchors: the next sample starts a first window."""
        self._older: list[Tensor] | None = None  # start of the previous window
        self._start: list[Tensor] | None = None  # start of the current window
        self._previous = math.nan  # norm of the previous window's displacement
        self._start_step = 0
        self._checks = 0
        self._key: tuple[tuple[int, tuple[int, ...]], ...] | None = None

    def jumped(self) -> None:
        """:meth:`reset`, and drop the last motion: the parameters jumped.

        The last motion describes a run that is no longer this one: an escape moved the
        parameters, or a rollback undid the steps since one did.
        """
        self.reset()
        self.last = None

    def forget(self) -> None:
        """:meth:`jumped`, and forget the first scale (a new fit)."""
        self.jumped()
        self._scale0 = None

    @property
    def holding(self) -> bool:
        """Whether the meter holds parameter anchors (up to two parameter-sized copies)."""
        return self._start is not None

    def sample(
        self, step: int, params: Sequence[Tensor], sum_squares: SumSquares = None
    ) -> Motion | None:
        """Add the parameters at optimizer step ``step``; return the motion of a closed window.

        Args:
            step: The optimizer step of this check.
            params: The trainable parameter tensors (the same list, in the same order, every time).
            sum_squares: Sums squared norms over processes (sharded parameters), or None.

        Returns:
            The :class:`Motion` when this sample closes a window that has one before it, else None.
        """
        if not params:
            return None
        key = tuple((id(p), tuple(p.shape)) for p in params)
        if self._last_key is not None and key != self._last_key:
            # Parameters were frozen or unfrozen, or added: the last motion is another set's.
            self.last = self._last_key = None
        if self._start is None or key != self._key:
            self.reset()
            self._key = key
            with torch.no_grad():
                self._start = [p.detach().clone() for p in params]
            self._start_step = step
            return None
        self._checks += 1
        if self._checks < self.window:
            return None
        with torch.no_grad():
            current = [p.detach() for p in params]
            squares = [_squares(torch._foreach_sub(current, self._start))]
            squares.append(_squares(current))
            squares.append(_squares(self._start))
            if self._older is not None:
                squares.append(_squares(torch._foreach_sub(current, self._older)))
            totals = torch.stack([s.to(squares[0].device) for s in squares])
            if sum_squares is not None:
                totals = sum_squares(totals)
            # One host read per window.
            values = totals.sqrt().tolist()
            # The current window's start becomes the previous one's; the oldest copy is reused.
            if self._older is None:
                buffer = [t.clone() for t in current]
            else:
                buffer = self._older
                torch._foreach_copy_(buffer, current)
            self._older, self._start = self._start, buffer
        displacement, here, there = values[0], values[1], values[2]
        if self._scale0 is None:
            self._scale0 = there
        steps, self._start_step, self._checks = step - self._start_step, step, 0
        previous, self._previous = self._previous, displacement
        if len(values) < 4:
            return None  # a first window: nothing to compare it with
        motion = _motion(
            step, steps, displacement, previous, values[3], max(here, there, self._scale0)
        )
        self.last, self._last_key = motion, key
        return motion

    def state_dict(self) -> dict[str, Any]:
        """The last motion and the first scale (the anchors are rebuilt after a resume)."""
        return {
            "last": None if self.last is None else self.last.to_dict(),
            "scale0": self._scale0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the next sample starts a fresh window."""
        self.reset()
        last = state.get("last")
        self.last = None if last is None else Motion(**last)
        self._scale0 = state.get("scale0")


def _squares(tensors: Sequence[Tensor]) -> Tensor:
    """The sum of squares of ``tensors`` in float64 (summed over shards before the root is taken)."""
    return total_norm([n.double() for n in foreach_norms(tensors)]).square()


def _motion(
    step: int, steps: int, displacement: float, previous: float, span: float, scale: float
) -> Motion:
    a, b = displacement, previous
    speed = a / scale if scale > 0 else math.nan
    trend = a / b if b > 0 else math.nan
    # The law of cosines: |a + b|^2 = |a|^2 + |b|^2 + 2 a.b
    agreement = (span**2 - a**2 - b**2) / (2 * a * b) if a > 0 and b > 0 else math.nan
    if math.isfinite(agreement):
        agreement = max(-1.0, min(1.0, agreement))
    drift = min(1.0, span / (a + b)) if a + b > 0 else math.nan
    return Motion(step, steps, a, b, span, scale, speed, trend, agreement, drift)


def reference_motion(
    step: int,
    steps: int,
    older: Sequence[Tensor],
    start: Sequence[Tensor],
    now: Sequence[Tensor],
    scale0: float | None = None,
) -> Motion:
    """The :class:`Motion` of two windows from their three end points: the plain reference.

    Args:
        step: Optimizer step of ``now``.
        steps: Optimizer steps between ``start`` and ``now``.
        older: The parameters at the start of the previous window.
        start: The parameters at the start of the latest window.
        now: The parameters now.
        scale0: The norm of the first sample, if known (defaults to ``|older|``).

    Returns:
        The motion, computed one tensor at a time in float64 with an explicit dot product.

    Example:
        >>> import torch
        >>> m = reference_motion(2, 1, [torch.tensor([0.0, 0.0])], [torch.tensor([1.0, 0.0])],
        ...                      [torch.tensor([1.0, 1.0])])
        >>> m.agreement, round(m.drift, 4), m.trend
        (0.0, 0.7071, 1.0)
    """

    def flat(ts: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.detach().double().flatten() for t in ts])

    o, s, n = flat(older), flat(start), flat(now)
    a, b = n - s, s - o
    na, nb = float(a.norm()), float(b.norm())
    scale = max(float(n.norm()), float(s.norm()), float(o.norm()) if scale0 is None else scale0)
    motion = _motion(step, steps, na, nb, float((a + b).norm()), scale)
    if na > 0 and nb > 0:
        cosine = float(a @ b) / (na * nb)
        motion = Motion(**{**motion.to_dict(), "agreement": max(-1.0, min(1.0, cosine))})
    return motion
