"""Can per-coordinate step sizes, fed to the run's own SGD, rescue the attention pointer?

The attention pointer (``benchmarks.architectures.AttentionPointer``) stays at chance under SGD
with momentum and is solved by Adam: its remedy is per-coordinate step sizes. This script trains
it in a plain loop (SGD, momentum 0.9, lr 0.1, batch 64, the benchmark's 1500 steps) and, from
step 300 (where its stall is first called) to the end, divides each gradient coordinate by the
root of its running second moment (RMSprop's estimate: decay 0.999, bias-corrected) times ``c``
before the run's own SGD steps on it, so each coordinate moves about ``c`` per step through the
momentum. The first column is the run without it; *solved at* is the first evaluation (every 10
steps, 512 held-out sequences) at accuracy 0.95 or more.

    .venv/bin/python benchmarks/attention_pointer_rescue.py
    .venv/bin/python benchmarks/attention_pointer_rescue.py \
        --out benchmarks/results/attention_pointer_rescue.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._report import emit, heading  # noqa: E402
from benchmarks.architectures import AttentionPointer  # noqa: E402

BUDGET = 1500
START = 300
EVERY = 10
DECAY = 0.999
SIZES = (1e-3, 2e-3, 3e-3, 5e-3, 7e-3, 1e-2)


def _accuracy(model: AttentionPointer) -> float:
    with torch.no_grad():
        return float((model(model.x_test).argmax(-1) == model.y_test).float().mean())


def run(seed: int, c: float | None) -> tuple[int | None, float]:
    """First step at the target (None: never) and the final accuracy; ``c=None``: plain SGD."""
    torch.set_num_threads(1)
    model = AttentionPointer(seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=model.lr, momentum=0.9)
    params = [p for p in model.parameters() if p.requires_grad]
    second = [torch.zeros_like(p) for p in params]
    solved = None
    for step, (x, y) in enumerate(model.train_dataloader()):
        if step >= BUDGET:
            break
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if c is not None and step >= START:
            t = step - START + 1
            for p, v in zip(params, second, strict=True):
                assert p.grad is not None
                v.mul_(DECAY).addcmul_(p.grad, p.grad, value=1 - DECAY)
                p.grad.div_((v / (1 - DECAY**t)).sqrt_().add_(1e-8)).mul_(c)
        optimizer.step()
        if solved is None and (step + 1) % EVERY == 0 and _accuracy(model) >= model.target:
            solved = step + 1
    return solved, _accuracy(model)


def _run(job: tuple[int, float | None]) -> tuple[int, float | None, int | None, float]:
    return (*job, *run(*job))


def main() -> int:
    """Run every seed without and with each step size; print or write the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.time()
    sizes: list[float | None] = [None, *SIZES]
    jobs = [(seed, c) for seed in range(args.seeds) for c in sizes]
    with Pool(args.workers) as pool:
        results = {(s, c): (at, final) for s, c, at, final in pool.imap(_run, jobs)}
    columns = ["SGD", *(f"c = {c:g}" for c in SIZES)]
    lines = [
        *heading(
            "Attention pointer: per-coordinate step sizes from its stall",
            f"`benchmarks/attention_pointer_rescue.py --seeds {args.seeds}`, {len(jobs)} runs in "
            f"{(time.time() - started) / 60:.1f} min on {args.workers} worker processes, one "
            f"thread each; Python {platform.python_version()}, {platform.machine()}.",
            __doc__,
        ),
        "Each cell: solved at (or `-`) / final accuracy.",
        "",
        "| seed | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for seed in range(args.seeds):
        cells = []
        for c in sizes:
            at, final = results[seed, c]
            cells.append(f"{at if at is not None else '-'} / {final:.2f}")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    solved = [sum(results[s, c][0] is not None for s in range(args.seeds)) for c in sizes]
    lines.append("| solved | " + " | ".join(f"{n}/{args.seeds}" for n in solved) + " |")
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
