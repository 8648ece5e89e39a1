"""Efficacy: plain training against ``EscapeCallback()`` at its defaults, on every demo problem.

Every problem in ``benchmarks.problems.PROBLEMS`` (stuck ones, a hidden-progress task and healthy
controls) is trained for its ``benchmark_steps`` with its own plain SGD, once without and once
with ``EscapeCallback(seed=seed)``, for each seed (the problem and the callback get the same seed;
the two-dimensional problems are deterministic, so there the seed only changes the escapes' random
draws). The metric is evaluated every 10 steps; steps-to-target is the first evaluation that meets
the target, censored at the budget. Runs are spread over two worker processes, one thread each.

    python3 dev.py efficacy                               # writes benchmarks/results/efficacy.md
    .venv/bin/python benchmarks/efficacy.py --problems strict_saddle,deep_linear --seeds 0
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "efficacy.md"
# The problems and the harness are imported as `benchmarks.problems`, also when run as a script.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
EVAL_EVERY = 10


def run(problem: str, seed: int, method: str) -> dict[str, Any]:
    """One training run; returns plain numbers."""
    import logging

    import torch

    from benchmarks.problems import PROBLEMS, train_plain
    from lightning_escape import EscapeCallback

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    steps = PROBLEMS[problem].benchmark_steps
    callbacks = [EscapeCallback(seed=seed)] if method == "escape" else []
    start = time.perf_counter()
    result = train_plain(
        problem, max_steps=steps, seed=seed, eval_every=EVAL_EVERY, callbacks=callbacks
    )
    wall = time.perf_counter() - start
    events = callbacks[0].events if callbacks else []
    return {
        "problem": problem,
        "seed": seed,
        "method": method,
        "steps": steps,
        "to_target": result.steps_to_target,
        "final": result.final_metric,
        "wall": wall,
        "accepted": sum(e.verdict == "accepted" for e in events),
        "rolled_back": sum(e.verdict == "rolled_back" for e in events),
        "actions": [f"{e.diagnosis}:{e.action.split('(')[0]}:{e.verdict[0]}" for e in events],
    }


def _median_steps(rows: list[dict[str, Any]]) -> str:
    values = [r["to_target"] if r["to_target"] is not None else None for r in rows]
    if sum(v is not None for v in values) * 2 <= len(values):
        return f"> {rows[0]['steps']}"
    censored = [v if v is not None else rows[0]["steps"] + 1 for v in values]
    return f"{statistics.median(censored):.0f}"


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def main() -> None:
    from benchmarks.problems import PROBLEMS, make_problem

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    problems = args.problems.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(p, s, m) for p in problems for s in seeds for m in ("plain", "escape")]
    started = time.time()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run, *zip(*jobs)))
    for r in results:
        print(r, flush=True)

    lines = [
        "# Efficacy: plain training against `EscapeCallback()`",
        "",
        f"Measured {datetime.date.today().isoformat()} with `python3 dev.py efficacy` "
        f"(`benchmarks/efficacy.py --seeds {args.seeds}`), {len(jobs)} runs in "
        f"{(time.time() - started) / 60:.1f} min on {args.workers} worker processes, one thread each; "
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores.",
        "",
        "Each problem trains for its budget with its own plain SGD, without and with "
        "`EscapeCallback(seed=seed)` (every other argument at its default). *Solved* counts the "
        "seeds whose metric met the target at an evaluation (every 10 steps); *median steps* is the "
        "median first such step, censored at the budget; *final* is the metric after the whole "
        "budget per seed. *Escapes* counts accepted / rolled-back escapes over all seeds; the "
        "actions column lists `diagnosis:step:verdict` per seed (a = accepted, r = rolled back).",
        "",
        "| problem | category | budget | target | plain: solved, median steps | escape: solved, median "
        "steps | plain final | escape final | escapes (a/r) | actions (per seed) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for problem in problems:
        module = make_problem(problem, 0)
        plain = [r for r in results if r["problem"] == problem and r["method"] == "plain"]
        escape = [r for r in results if r["problem"] == problem and r["method"] == "escape"]
        op = ">=" if module.higher_is_better else "<="
        target = f"{module.metric_name} {op} {_fmt(module.target)}"
        actions = " / ".join(", ".join(r["actions"]) or "none" for r in escape)
        lines.append(
            f"| `{problem}` | {PROBLEMS[problem].category} | {plain[0]['steps']} | {target} "
            f"| {sum(r['to_target'] is not None for r in plain)}/{len(plain)}, {_median_steps(plain)} "
            f"| {sum(r['to_target'] is not None for r in escape)}/{len(escape)}, "
            f"{_median_steps(escape)} "
            f"| {', '.join(_fmt(r['final']) for r in plain)} "
            f"| {', '.join(_fmt(r['final']) for r in escape)} "
            f"| {sum(r['accepted'] for r in escape)}/{sum(r['rolled_back'] for r in escape)} "
            f"| {actions} |"
        )
    walls = []
    for p in problems:
        per = {
            m: statistics.median(
                r["wall"] for r in results if r["problem"] == p and r["method"] == m
            )
            for m in ("plain", "escape")
        }
        walls.append(f"`{p}` {per['plain']:.1f} / {per['escape']:.1f}")
    lines += ["", "Median wall time per run in seconds (plain / escape): " + ", ".join(walls) + "."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
