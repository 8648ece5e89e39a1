"""What per-coordinate step sizes cost per optimizer step, beside SGD's and Adam's own step.

Times, on one CPU thread, a step of ``torch.optim.SGD`` (momentum 0.9, foreach), the same step
after :func:`~lightning_escape.coordinates.rescale_gradients` (without and with the guard for
steps an AMP scaler may skip), ``torch.optim.Adam`` (foreach), and the call when per-coordinate
step sizes are off (the check every step of every run with ``EscapeCallback`` pays). Each setup is
a list of square float32 tensors with fresh random gradients; the median of ``--repeats`` timed
steps after 10 untimed ones.

    .venv/bin/python benchmarks/per_coordinate_cost.py
    .venv/bin/python benchmarks/per_coordinate_cost.py --out benchmarks/results/per_coordinate_cost.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._report import emit, heading  # noqa: E402
from lightning_escape.coordinates import rescale_gradients, start_rescaling  # noqa: E402

SETUPS = ((400, 64), (50, 512), (8, 2048))  # (tensors, side)


def _median_ms(step: Callable[[], None], repeats: int) -> float:
    for _ in range(10):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(tensors: int, side: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per step of each variant on ``tensors`` tensors of ``side`` squared."""
    torch.manual_seed(0)
    grads = [torch.randn(side, side) for _ in range(tensors)]

    def params() -> list[nn.Parameter]:
        made = [nn.Parameter(torch.randn(side, side)) for _ in range(tensors)]
        for p, g in zip(made, grads, strict=True):
            p.grad = g.clone()
        return made

    def refill(ps: list[nn.Parameter]) -> None:
        for p, g in zip(ps, grads, strict=True):
            assert p.grad is not None
            p.grad.copy_(g)

    def stepper(
        opt: torch.optim.Optimizer, ps: list[nn.Parameter], rescale: bool | None
    ) -> Callable[[], None]:
        def step() -> None:
            refill(ps)
            if rescale is not None:
                rescale_gradients(opt, skippable=rescale)
            opt.step()

        return step

    results = {}
    sgd_params = params()
    sgd = torch.optim.SGD(sgd_params, lr=0.1, momentum=0.9, foreach=True)
    results["sgd"] = _median_ms(stepper(sgd, sgd_params, None), repeats)
    results["off"] = _median_ms(lambda: rescale_gradients(sgd), repeats)
    for skippable in (False, True):
        ps = params()
        opt = torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True)
        start_rescaling(opt, 2e-3, 0.999, 1e-8)
        results[f"sgd_rescaled_{skippable}"] = _median_ms(stepper(opt, ps, skippable), repeats)
    adam_params = params()
    adam = torch.optim.Adam(adam_params, lr=1e-3, foreach=True)
    results["adam"] = _median_ms(stepper(adam, adam_params, None), repeats)
    refill_only = params()
    results["refill"] = _median_ms(lambda: refill(refill_only), repeats)
    return results


def main() -> int:
    """Time every setup; print or write the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    rows = {setup: measure(*setup, args.repeats) for setup in SETUPS}
    lines = [
        *heading(
            "Per-coordinate step sizes: cost per optimizer step",
            f"`benchmarks/per_coordinate_cost.py --repeats {args.repeats}` in "
            f"{time.time() - started:.0f} s on one thread; torch {torch.__version__}, Python "
            f"{platform.python_version()}, {platform.machine()}.",
            __doc__,
        ),
        "Milliseconds per step (median), the copy of the gradients into place taken out; the "
        "last column is the check alone, with per-coordinate step sizes off.",
        "",
        "| tensors x shape | SGD | SGD + rescaling | SGD + rescaling, AMP guard | Adam | "
        "check when off |",
        "|---|---|---|---|---|---|",
    ]
    for (tensors, side), r in rows.items():
        base = r["refill"]
        cells = [
            r["sgd"] - base,
            r["sgd_rescaled_False"] - base,
            r["sgd_rescaled_True"] - base,
            r["adam"] - base,
        ]
        lines.append(
            f"| {tensors} x {side}x{side} | "
            + " | ".join(f"{c:.2f}" for c in cells)
            + f" | {r['off'] * 1e3:.1f} µs |"
        )
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
