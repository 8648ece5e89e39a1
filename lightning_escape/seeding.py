"""The one place random generators are derived: from a seed, a stream and an optimizer step.

Every random draw of the package (escape noise and jumps, probes, constructed problems) comes from a
dedicated ``torch.Generator`` derived here, never from the global RNG: every data-parallel process
derives the same generator from the same numbers, so the replicas stay bit-identical without any
communication, and a resumed run draws the same numbers again.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_SEED", "derive_generator", "derive_seed"]

#: Seeds are kept below 2**63 so that they fit a signed 64-bit integer (``manual_seed`` takes one).
MAX_SEED = 2**63 - 1

_MASK = (1 << 63) - 1
# Streams of one seed are spaced by a prime larger than any stream index in use.
_STREAM_STRIDE = 1_000_003
# A fixed odd multiplier (2**64 / golden ratio) spreads (seed, step) pairs over the 63-bit space.
_STEP_MULTIPLIER = 0x9E3779B97F4A7C15


def derive_seed(seed: int, stream: int = 0, step: int | None = None) -> int:
    """The 63-bit seed of stream ``stream`` of ``seed``, at optimizer step ``step`` if given.

    Args:
        seed: The user's seed.
        stream: Which independent stream of draws (an escape step's own seed, a data set's part).
        step: The optimizer step the draw belongs to, or None for draws that do not depend on it.

    Returns:
        A non-negative integer below ``2**63``.

    Example:
        >>> derive_seed(1, stream=2)
        1000005
        >>> derive_seed(0, step=5) == derive_seed(0, step=5) != derive_seed(0, step=6)
        True
    """
    base = seed * _STREAM_STRIDE + stream
    if step is None:
        return base & _MASK
    return (base * _STEP_MULTIPLIER + step) & _MASK


def derive_generator(
    seed: int, stream: int = 0, step: int | None = None, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A fresh generator on ``device`` seeded with :func:`derive_seed` of the same arguments.

    Example:
        >>> a = torch.randn(2, generator=derive_generator(0, step=5))
        >>> b = torch.randn(2, generator=derive_generator(0, step=5))
        >>> torch.equal(a, b)
        True
    """
    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream, step))
