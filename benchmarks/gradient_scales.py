"""The evidence for per-coordinate step sizes: how far apart the weights' gradient scales are at each stall.

Each problem trains with its own optimizer for its budget beside an ``EscapeCallback`` whose every
ladder holds one step that never acts: each time the policy would choose an escape (at each check
of a stall), it records the step and the spread of the weight tensors' gradient scales at the last
optimizer step (:func:`~lightning_escape.coordinates.scale_spread`: the largest RMS over the
smallest, over the tensors of two or more dimensions), and passes. The runs are plain training
with the detector, so only the stalls the detector calls are seen, the first of each as the
default ladders would meet it. :class:`~lightning_escape.coordinates.PerCoordinateSteps` comes
first in the saddle, plateau and local-minimum ladders and acts only under SGD with a spread of
at least ``min_spread`` (100): the table shows which stalls that is.

    .venv/bin/python benchmarks/gradient_scales.py
    .venv/bin/python benchmarks/gradient_scales.py --out benchmarks/results/gradient_scales.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._report import emit, heading  # noqa: E402
from lightning_escape.coordinates import PerCoordinateSteps  # noqa: E402
from lightning_escape.escapes import EscapeContext, EscapeStep  # noqa: E402

#: (step, spread, its smallest / largest tensor, optimizer) per policy decision in this process.
_SEEN: list[tuple[int, float, str, str]] = []


@dataclass(eq=False, repr=False)
class Record(EscapeStep):
    """Records the gradient scales' spread where an escape would be chosen; never acts."""

    def unavailable(self, ctx: EscapeContext) -> str | None:
        names = ",".join(sorted({type(o).__name__ for o in ctx.optimizers}))
        found = PerCoordinateSteps().spread(ctx)
        if found is None:
            _SEEN.append((ctx.step, float("nan"), "", names))
        else:
            ends = f"{found.smallest_name} / {found.largest_name}"
            _SEEN.append((ctx.step, found.spread, ends, names))
        return "recording only"

    def apply(self, ctx: EscapeContext) -> str:
        raise AssertionError("never chosen")


def run(problem: str, seed: int) -> dict[str, Any]:
    """Train ``problem`` with the detector; the stalls' kinds and every decision's spread."""
    import logging
    import warnings

    import torch

    from benchmarks.problems import PROBLEMS, train_plain
    from lightning_escape import EscapeCallback
    from lightning_escape.policy import ESCAPABLE

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    _SEEN.clear()
    callback = EscapeCallback(seed=seed, ladders={kind: [Record()] for kind in ESCAPABLE})
    train_plain(
        problem, max_steps=PROBLEMS[problem].benchmark_steps, seed=seed, callbacks=[callback]
    )
    kinds = [(d.step, d.kind) for d in callback.detector.diagnoses]
    return {"problem": problem, "seed": seed, "seen": list(_SEEN), "kinds": kinds}


def _spread(value: float) -> str:
    return "-" if value != value else f"{value:.3g}"


def _run(job: tuple[str, int]) -> dict[str, Any]:
    return run(*job)


def main() -> int:
    """Run every problem and seed; print or write the table."""
    from benchmarks.problems import PROBLEMS

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    problems = args.problems.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.time()
    jobs = [(p, s) for p in problems for s in seeds]
    with Pool(args.workers) as pool:
        results = {(r["problem"], r["seed"]): r for r in pool.imap_unordered(_run, jobs)}
    bar = PerCoordinateSteps().min_spread
    lines = [
        *heading(
            "Gradient scales at the stalls",
            f"`benchmarks/gradient_scales.py --seeds {args.seeds}`, {len(jobs)} runs in "
            f"{(time.time() - started) / 60:.1f} min on {args.workers} worker processes, one "
            f"thread each; Python {platform.python_version()}, {platform.machine()}.",
            __doc__,
        ),
        "Per seed: the step and kind of the first stall diagnosis an escape answers, and the "
        "spread of the weights' gradient scales there (`-`: fewer than two weight tensors), with "
        "the tensors of the smallest and the largest; then "
        "the range over every check of every stall of the run. Per-coordinate step sizes act "
        f"under SGD from a spread of {bar:g}.",
        "",
        "| problem | optimizer | first stall per seed: step, kind, spread (smallest / largest) "
        "| range at any stall |",
        "|---|---|---|---|",
    ]
    for problem in problems:
        cells, values, optimizers = [], [], set()
        for seed in seeds:
            r = results[problem, seed]
            seen = r["seen"]
            if not seen:
                cells.append("none")
                continue
            step, value, ends, names = seen[0]
            optimizers.add(names)
            kind = next((k for s, k in reversed(r["kinds"]) if s <= step), "?")
            cells.append(f"{step} {kind} {_spread(value)}" + (f" ({ends})" if ends else ""))
            values += [v for _, v, _, _ in seen if v == v]  # not NaN
        span = f"{_spread(min(values))} to {_spread(max(values))}" if values else "-"
        lines.append(
            f"| `{problem}` | {', '.join(sorted(optimizers)) or '-'} | {'; '.join(cells)} | {span} |"
        )
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
