"""Accuracy of finite-difference Hessian-vector products against double backward.

``FiniteDifferenceHessianOperator`` takes ``H v`` as ``(g(theta + h v) - g(theta - h v)) / 2h``
with first-order gradients only, for modules that have no double backward (fused attention
kernels, ``torch.compile``). This script measures how far its products, and the extreme eigenvalues
Lanczos finds with them, are from the exact ones, on small models in float32 and float64:

- ``mlp``: 5-10-3 tanh MLP, mean squared error on 32 random examples (93 parameters);
- ``quadratic``: ``1/2 x^T A x + b^T x`` with ``A`` of known eigenvalues ``linspace(-3, 5, 24)``
  (the central difference of a quadratic's gradient is exact but for rounding);
- ``sdpa_block``: one self-attention block written with ``F.scaled_dot_product_attention`` (2 heads,
  width 8, residual and LayerNorm), MSE on 4 random sequences of 6 tokens;
- ``transformer``: ``nn.TransformerEncoderLayer(8, 2, 16, dropout=0, norm_first=True)`` (ReLU
  feed-forward), MSE, same data; ``transformer_gelu``: the same with ``activation="gelu"``.

Every loss is evaluated with the math attention backend (``sdpa_kernel(SDPBackend.MATH)``), which
has a double backward, so the exact product exists. The two attention models are also run with
the default CPU backend (flash attention, no double backward): the ``FD (default kernel)`` rows,
the case the fallback exists for.

Reference: the exact product in float64, at the same point (the float32 parameters cast up, which
is exact), so a float32 row shows the finite-difference error beside the float32 rounding of the
exact product itself (``exact`` rows). Reported:

- ``Hv rel. err.``: ``||Hv - Hv_ref|| / ||Hv_ref||`` over 20 random unit ``v``, median and max;
- ``lambda_max`` / ``lambda_min err.``: ``|lambda - lambda_ref| / max(|lambda_max_ref|,
  |lambda_min_ref|)`` (relative to the spectral radius, since ``lambda_min`` can be near zero) from
  ``hessian_spectrum`` with the same start vector and number of steps (40, ``tol=0``).

A second table varies the relative step ``eps`` around its default ``0.1 * eps_mach ** (1/3)``
(median and max Hv error on ``mlp``, smooth, and ``transformer``, whose feed-forward part is ReLU)
to show where the default sits between rounding error, truncation error and ReLU kinks.

Run: ``python benchmarks/fd_hvp_accuracy.py [--out benchmarks/results/fd_hvp_accuracy.md]``
(CPU, one thread, about a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_escape.curvature import (
    FiniteDifferenceHessianOperator,
    HessianOperator,
    flatten,
    hessian_spectrum,
)

STEPS = 40
N_VECTORS = 20
SWEEP = (0.1, 0.3, 1.0, 3.0, 10.0)
QUAD_EIGS = torch.linspace(-3.0, 5.0, 24, dtype=torch.float64)


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
        self.register_buffer("a", q @ torch.diag(QUAD_EIGS) @ q.T)
        self.register_buffer("b", torch.randn(24, generator=g, dtype=torch.float64))
        self.x = nn.Parameter(torch.randn(24, generator=g, dtype=torch.float64))

    def forward(self, batch: Tensor) -> Tensor:
        return 0.5 * self.x @ self.a @ self.x + self.b @ self.x


class SdpaBlock(nn.Module):
    def __init__(self, width: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, w // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return x + self.out(att.transpose(1, 2).reshape(b, t, w))


def _problems() -> dict[str, tuple[nn.Module, Tensor, Tensor | None]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Linear(10, 3))
    x_mlp, y_mlp = torch.randn(32, 5, generator=g), torch.randn(32, 3, generator=g)
    seq, target = torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g)
    torch.manual_seed(1)
    block = SdpaBlock()
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
    torch.manual_seed(2)
    gelu = nn.TransformerEncoderLayer(
        8, 2, 16, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return {
        "mlp": (mlp, x_mlp, y_mlp),
        "quadratic": (Quadratic(), torch.zeros(1), None),
        "sdpa_block": (block, seq, target),
        "transformer": (layer, seq, target),
        "transformer_gelu": (gelu, seq, target),
    }


def _loss_fn(module: nn.Module, x: Tensor, y: Tensor | None) -> Callable[[], Tensor]:
    if y is None:
        return lambda: module(x)
    return lambda: F.mse_loss(module(x), y)


def _at(
    dtype: torch.dtype, module: nn.Module, x: Tensor, y: Tensor | None
) -> tuple[nn.Module, Tensor, Tensor | None]:
    m = copy.deepcopy(module).to(dtype)
    return m, x.to(dtype), None if y is None else y.to(dtype)


@contextlib.contextmanager
def _kernel(math: bool) -> Iterator[None]:
    with sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext():
        yield


def _vectors(dim: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(N_VECTORS):
        v = torch.randn(dim, generator=g, dtype=torch.float64)
        out.append(v / v.norm())
    return out


def _products(
    op: Callable[[list[Tensor]], list[Tensor]], params: list[Tensor], vs: list[Tensor]
) -> tuple[list[Tensor], float]:
    from lightning_escape.curvature import unflatten

    out = []
    start = time.perf_counter()
    for v in vs:
        out.append(flatten(op(unflatten(v, params)), dtype=torch.float64))
    return out, (time.perf_counter() - start) / len(vs)


def _rel(a: list[Tensor], ref: list[Tensor]) -> list[float]:
    return [float((x - r).norm() / r.norm()) for x, r in zip(a, ref, strict=True)]


def _spectrum(module: nn.Module, x: Tensor, y: Tensor | None, method: str) -> tuple[float, float]:
    params = [p for p in module.parameters() if p.requires_grad]
    s = hessian_spectrum(
        _loss_fn(module, x, y),
        params,
        steps=STEPS,
        tol=0.0,
        generator=torch.Generator().manual_seed(0),
        method=method,
    )
    return s.lambda_max, s.lambda_min


def measure() -> tuple[list[list[str]], list[list[str]]]:
    rows: list[list[str]] = []
    for name, (module, x, y) in _problems().items():
        attention = name != "mlp" and name != "quadratic"
        for dtype in (torch.float32, torch.float64):
            m, xd, yd = _at(dtype, module, x, y)
            ref_m, xr, yr = _at(torch.float64, m, xd, yd)
            params = [p for p in m.parameters() if p.requires_grad]
            ref_params = [p for p in ref_m.parameters() if p.requires_grad]
            dim = sum(p.numel() for p in params)
            vs = _vectors(dim)
            with _kernel(True):
                ref, _ = _products(
                    HessianOperator(_loss_fn(ref_m, xr, yr), ref_params), ref_params, vs
                )
                ref_max, ref_min = _spectrum(ref_m, xr, yr, "exact")
            if name == "quadratic":
                ref_max, ref_min = float(QUAD_EIGS[-1]), float(QUAD_EIGS[0])
            scale = max(abs(ref_max), abs(ref_min))
            variants = [("exact", "exact", True), ("FD", "finite_difference", True)]
            if attention:
                variants.append(("FD (default kernel)", "finite_difference", False))
            for label, method, math in variants:
                with _kernel(math):
                    op: Callable[[list[Tensor]], list[Tensor]]
                    if method == "exact":
                        op = HessianOperator(_loss_fn(m, xd, yd), params)
                    else:
                        op = FiniteDifferenceHessianOperator(_loss_fn(m, xd, yd), params)
                    prods, seconds = _products(op, params, vs)
                    lam_max, lam_min = _spectrum(m, xd, yd, method)
                errs = _rel(prods, ref)
                rows.append(
                    [
                        name,
                        str(dim),
                        str(dtype).removeprefix("torch."),
                        label,
                        f"{statistics.median(errs):.1e}",
                        f"{max(errs):.1e}",
                        f"{abs(lam_max - ref_max) / scale:.1e}",
                        f"{abs(lam_min - ref_min) / scale:.1e}",
                        f"{ref_max:.4g} / {ref_min:.4g}",
                        f"{1e3 * seconds:.2f}",
                    ]
                )
    sweep: list[list[str]] = []
    for name in ("mlp", "transformer"):
        module, x, y = _problems()[name]
        for dtype in (torch.float32, torch.float64):
            m, xd, yd = _at(dtype, module, x, y)
            ref_m, xr, yr = _at(torch.float64, m, xd, yd)
            params = list(m.parameters())
            ref_params = list(ref_m.parameters())
            vs = _vectors(sum(p.numel() for p in params))
            with _kernel(True):
                ref, _ = _products(
                    HessianOperator(_loss_fn(ref_m, xr, yr), ref_params), ref_params, vs
                )
                default = FiniteDifferenceHessianOperator(_loss_fn(m, xd, yd), params).eps
                cells = [name, str(dtype).removeprefix("torch.")]
                for factor in SWEEP:
                    op = FiniteDifferenceHessianOperator(
                        _loss_fn(m, xd, yd), params, eps=factor * default
                    )
                    prods, _ = _products(op, params, vs)
                    errs = _rel(prods, ref)
                    cells.append(f"{statistics.median(errs):.1e} / {max(errs):.1e}")
            sweep.append(cells)
    return rows, sweep


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, sweep = measure()
    text = "\n".join(
        [
            "# Finite-difference Hessian-vector products: accuracy against double backward",
            "",
            f"Measured by `benchmarks/fd_hvp_accuracy.py` (torch {torch.__version__}, "
            f"{platform.machine()} CPU, one thread). Errors are against the exact (double backward) "
            "product in float64 at the same point; eigenvalue errors are relative to the spectral "
            "radius of the reference (for `quadratic`, the known eigenvalues). `FD` uses the default "
            "step `h = 0.1 * eps_mach ** (1/3) * (1 + ||theta||) / ||v||`; `FD (default kernel)` runs the "
            "attention models on the default CPU attention kernel (flash), which has no double "
            "backward. 40 Lanczos steps, `tol=0`, the same start vector for every row. "
            "`ms per product` is wall time on a shared machine: indicative only.",
            "",
            _table(
                [
                    "model",
                    "dim",
                    "dtype",
                    "product",
                    "Hv rel. err. (median)",
                    "Hv rel. err. (max)",
                    "lambda_max err.",
                    "lambda_min err.",
                    "reference lambda_max / lambda_min",
                    "ms per product",
                ],
                rows,
            ),
            "",
            "Hv relative error of finite differences (median / max over the 20 vectors) against the "
            "relative step `eps`, as multiples of the default `0.1 * eps_mach ** (1/3)` (10x is the "
            "nominal optimum `eps_mach ** (1/3)`); `transformer`'s feed-forward layer is ReLU:",
            "",
            _table(["model", "dtype", *[f"{f:g}x" for f in SWEEP]], sweep),
            "",
        ]
    )
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
