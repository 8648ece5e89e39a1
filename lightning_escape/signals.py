"""Gradient statistics as pure tensor logic: fused norms, ratios and the gradient noise scale.

Nothing here knows about Lightning. Every function returns device tensors and never reads a value
back to the host, so a caller can compute statistics every optimizer step and synchronise once per
logging interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "NoiseScaleEstimator",
    "count_nonfinite",
    "foreach_norms",
    "reference_norms",
    "stored_values",
    "total_norm",
]


_HAS_FOREACH_NORM = hasattr(torch, "_foreach_norm")


def _groups(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype): a fused kernel needs one of each."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype a norm of ``dtype`` values is accumulated in: float32 at least."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def stored_values(t: Tensor) -> Tensor:
    """The entries of ``t`` that a norm or a count of non-finite values must read, as a strided tensor.

    A sparse COO tensor (the gradient of ``nn.Embedding(sparse=True)``) may hold one index several
    times, its values to be summed: it is coalesced first, so each entry counts once, with its
    value. The entries it does not store are zeros, which add nothing to a norm and are finite.
    Compressed layouts (CSR, CSC, BSR, BSC) never repeat an entry. Strided tensors come back as
    they are.

    Args:
        t: A tensor of any layout.

    Returns:
        ``t`` itself, or the values of its stored entries.

    Example:
        >>> g = torch.sparse_coo_tensor([[0, 0, 2]], [3.0, 1.0, 3.0], (4,))  # index 0 twice
        >>> stored_values(g)
        tensor([4., 3.])
    """
    if t.layout == torch.strided:
        return t
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    return t.values()


def _real(t: Tensor) -> Tensor:
    # A complex tensor as its real and imaginary parts (a view, no copy): its 2-norm is theirs,
    # and fused norms take a real accumulation dtype.
    return torch.view_as_real(t) if t.is_complex() else t


def reference_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Per-tensor 2-norms computed one tensor at a time: the plain reference implementation.

    Args:
        tensors: Tensors of any shapes, devices and floating or complex dtypes; sparse ones too.

    Returns:
        One real 0-d tensor per input (float32, or float64 for float64 and complex128 inputs), on
        the input's device.

    Example:
        >>> [round(n.item(), 4) for n in reference_norms([torch.tensor([3.0, 4.0])])]
        [5.0]
        >>> reference_norms([torch.tensor([3.0 + 4.0j])])
        [tensor(5.)]
    """
    out = []
    for t in tensors:
        values = stored_values(t)
        acc = _accumulator(values.dtype)
        if values.is_complex():
            # `vector_norm` accumulates complex values in a complex dtype and returns a real norm.
            acc = torch.complex128 if acc == torch.float64 else torch.complex64
        out.append(torch.linalg.vector_norm(values, 2, dtype=acc))
    return out


def foreach_norms(tensors: Sequence[Tensor], *, foreach: bool | None = None) -> list[Tensor]:
    """Per-tensor 2-norms with one fused ``torch._foreach_norm`` call per (device, dtype) group.

    Low-precision inputs (float16, bfloat16) are accumulated in float32, so the result does not
    depend on the gradient's dtype beyond its rounding; float64 inputs stay in float64. A complex
    tensor's norm is that of its real and imaginary parts together (real, as
    ``torch.linalg.vector_norm`` gives it); a sparse tensor's is that of the dense tensor it
    stands for (see :func:`stored_values`).

    Args:
        tensors: Tensors of any shapes, devices and floating or complex dtypes; sparse ones too.
        foreach: ``True`` forces the fused path, ``False`` the per-tensor loop
            (:func:`reference_norms`), ``None`` uses the fused path when torch provides it.

    Returns:
        One real 0-d tensor per input (float32, or float64 for float64 and complex128 inputs), on
        the input's device, in the input order.

    Example:
        >>> norms = foreach_norms([torch.ones(4), torch.full((2, 2), 2.0)])
        >>> [n.item() for n in norms]
        [2.0, 4.0]
    """
    fused = _HAS_FOREACH_NORM if foreach is None else foreach
    if not fused:
        return reference_norms(tensors)
    if not tensors:
        return []
    first = tensors[0]
    uniform = not first.dtype.is_complex and all(
        t.device == first.device and t.dtype == first.dtype and t.layout == torch.strided
        for t in tensors
    )
    if uniform:
        # The usual case, and the every-step path: one launch, no grouping.
        return list(torch._foreach_norm(list(tensors), 2, dtype=_accumulator(first.dtype)))
    plain = [_real(stored_values(t)) for t in tensors]
    out: list[Tensor] = [torch.empty(0)] * len(tensors)
    for (_, dtype), idx in _groups(plain).items():
        group = [plain[i] for i in idx]
        for i, n in zip(idx, torch._foreach_norm(group, 2, dtype=_accumulator(dtype))):
            out[i] = n
    return out


def total_norm(norms: Sequence[Tensor]) -> Tensor:
    """The 2-norm of the concatenation of tensors, from their per-tensor norms.

    Args:
        norms: Per-tensor 2-norms (0-d tensors), possibly on several devices.

    Returns:
        A 0-d tensor on the device of the first norm, float64 if any norm is, else float32
        (zero when ``norms`` is empty).

    Example:
        >>> total_norm([torch.tensor(3.0), torch.tensor(4.0)]).item()
        5.0
    """
    if not norms:
        return torch.zeros(())
    device = norms[0].device
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    # non_blocking: moving a scalar between devices must not force a host synchronisation.
    stacked = torch.stack([n.to(device, dtype, non_blocking=True) for n in norms])
    result: Tensor = torch.linalg.vector_norm(stacked, 2)
    return result


def count_nonfinite(tensors: Sequence[Tensor], norms: Sequence[Tensor] | None = None) -> Tensor:
    """Number of NaN and infinite elements across ``tensors``, as a 0-d int64 device tensor.

    Counting reads every element, and on the CPU ``isfinite`` is several times slower than a norm.
    Given the tensors' ``norms`` (finite exactly when every element is), CPU tensors with a finite
    norm are skipped: reading a CPU scalar costs no device synchronisation. Accelerator tensors are
    always counted on the device, so no synchronisation happens there either.

    Args:
        tensors: Tensors of any shapes and devices; sparse ones count their stored entries.
        norms: Optional per-tensor norms, as from :func:`foreach_norms`.

    Returns:
        The count, on the device of the first tensor (zero when ``tensors`` is empty).

    Example:
        >>> count_nonfinite([torch.tensor([1.0, float("nan"), float("inf")])]).item()
        2
    """
    if not tensors:
        return torch.zeros((), dtype=torch.int64)
    device = tensors[0].device
    counts = [torch.zeros((), dtype=torch.int64, device=device)]
    for i, t in enumerate(tensors):
        if norms is not None and t.device.type == "cpu" and math.isfinite(norms[i].item()):
            continue
        counts.append((~torch.isfinite(stored_values(t))).sum().to(device, non_blocking=True))
    return torch.stack(counts).sum()


@dataclass
class NoiseScaleEstimator:
    """Estimates the simple gradient noise scale ``B_simple = tr(Σ) / |G|²`` (McCandlish et al. 2018).

    ``G`` is the true gradient and ``Σ`` the per-example gradient covariance. The estimator uses two
    consecutive optimizer-step gradients ``g₁, g₂`` of ``b`` examples each as two "small batches" and
    their mean as one "big batch" of ``2b`` examples, and applies the paper's unbiased two-batch
    estimates (Appendix A.1):

    - ``|G|² ≈ 2|g_big|² − |g_small|²`` with ``|g_small|² = (|g₁|² + |g₂|²) / 2`` and
      ``g_big = (g₁ + g₂) / 2``;
    - ``tr(Σ) ≈ 2b (|g_small|² − |g_big|²)``.

    Each pair gives a noisy estimate, so numerator and denominator are averaged separately with an
    exponential moving average and divided only when read, as the paper recommends.

    Bias: the ratio of two averages is biased (consistent, not unbiased), and the two gradients are
    taken one step apart, so any change of the true gradient over that step counts as noise:
    the estimate is too high by about ``b·|H·Δθ|² / (2|G|²)`` when the curvature ``H`` along the step
    ``Δθ`` is large. Under data parallelism, ``b`` is the global batch of an optimizer step
    (per-device batch × accumulation × world size).

    Args:
        decay: EMA decay per estimate, in ``[0, 1)``.

    Example:
        >>> est = NoiseScaleEstimator(decay=0.0)
        >>> g1, g2 = [torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])]
        >>> est.update(g1, g2, batch_size=8)
        >>> round(est.value().item(), 3)  # |G|² ≈ 0 here: pure noise gives a huge noise scale
        inf
    """

    decay: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"`decay` must be in [0, 1), got {self.decay!r}.")
        self._g2: Tensor | None = None
        self._trace: Tensor | None = None

    def update(self, first: Sequence[Tensor], second: Sequence[Tensor], *, batch_size: int) -> None:
        """Add one estimate from two gradients of ``batch_size`` examples each.

        Args:
            first: The earlier step's gradient, one tensor per parameter. It is consumed: the
                estimator adds ``second`` into it in place to avoid another gradient-sized buffer.
            second: The later step's gradient, the same shapes.
            batch_size: Examples per step.
        """
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        n1 = total_norm(foreach_norms(first)) ** 2
        n2 = total_norm(foreach_norms(second)) ** 2
        torch._foreach_add_(list(first), list(second))
        big = (total_norm(foreach_norms(first)) / 2) ** 2
        small = (n1 + n2) / 2
        g2 = 2 * big - small
        trace = 2 * batch_size * (small - big)
        if self._g2 is None or self._trace is None:
            self._g2, self._trace = g2, trace
        else:
            self._g2 = self.decay * self._g2 + (1 - self.decay) * g2
            self._trace = self.decay * self._trace + (1 - self.decay) * trace

    def value(self) -> Tensor:
        """``B_simple`` in examples (a device tensor; NaN before the first update).

        A non-positive ``|G|²`` estimate (noise dominates the signal) reads as ``inf``.
        """
        if self._g2 is None or self._trace is None:
            return torch.tensor(float("nan"))
        value: Tensor = torch.where(
            self._g2 > 0, self._trace / self._g2, torch.full_like(self._g2, torch.inf)
        )
        return value

    def state_dict(self) -> dict[str, Tensor | None]:
        """The running averages (tensors or None)."""
        return {"g2": self._g2, "trace": self._trace}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._g2, self._trace = state.get("g2"), state.get("trace")
