"""Argument checks shared by every public constructor (private).

Each check raises ``ValueError`` naming the argument, what it expects and the value it got, so a
bad setting fails in ``__init__`` instead of steps into a run.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = [
    "check_bool",
    "check_choice",
    "check_nonnegative_float",
    "check_nonnegative_int",
    "check_optional_finite_float",
    "check_optional_positive_int",
    "check_positive_float",
    "check_positive_int",
    "check_range",
    "check_seed",
]

T = TypeVar("T")


def _is_int(value: Any) -> bool:
    # numbers.Integral takes NumPy's integers too; a bool is one, but never meant as a number.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {value!r}.")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def check_nonnegative_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    return int(value)


def check_seed(name: str, value: Any) -> int:
    """Return ``value`` if it is an int in ``[0, 2**63)``, the range a generator seed fits in."""
    if not _is_int(value) or not 0 <= value < 2**63:
        raise ValueError(f"`{name}` must be an integer in [0, 2**63), got {value!r}.")
    return int(value)


def check_optional_positive_int(name: str, value: Any) -> int | None:
    """Return ``value`` if it is None or an int >= 1."""
    return None if value is None else check_positive_int(name, value)


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite number > 0."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")
    return float(value)


def check_nonnegative_float(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite number >= 0."""
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite non-negative number, got {value!r}.")
    return float(value)


def check_optional_finite_float(name: str, value: Any) -> float | None:
    """Return ``value`` as a float if it is a finite number, or None if it is None."""
    if value is None:
        return None
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number or None, got {value!r}.")
    return float(value)


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it lies in the interval from ``low`` to ``high``."""
    lo_ok = _is_real(value) and (value > low if low_open else value >= low)
    hi_ok = _is_real(value) and (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok) or not math.isfinite(value):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}.")
    return float(value)


def check_choice(name: str, value: T, choices: Sequence[T]) -> T:
    """Return ``value`` if it is one of ``choices``."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` can be {options}, got {value!r}.")
    return value
