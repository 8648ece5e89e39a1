"""Efficacy: plain training against ``EscapeCallback()`` at its defaults, on every demo problem.

Every problem in ``benchmarks.problems.PROBLEMS`` (stuck ones, a hidden-progress task and healthy
controls) is trained for its ``benchmark_steps`` with its own plain SGD, once without and once
with ``EscapeCallback(seed=seed)``, for each seed (the problem and the callback get the same seed;
the two-dimensional problems are deterministic, so there the seed only changes the escapes' random
draws). The metric is evaluated every 10 steps; steps-to-target is the first evaluation that meets
the target, censored at the budget. Runs are spread over two worker processes, one thread each.

A line per finished run says how long it took and about how long the rest will take (from the
wall times in the committed results, scaled to this machine's pace so far). The table goes to a
new file, ``benchmarks/results/efficacy-<time>.md``; ``--overwrite`` replaces the committed
``benchmarks/results/efficacy.md``, ``--out PATH`` writes PATH. Ctrl-C stops the workers at once
and writes nothing.

    python3 dev.py efficacy                               # every problem, seeds 0,1,2
    python3 dev.py efficacy --overwrite                   # the same, replacing the committed table
    .venv/bin/python benchmarks/efficacy.py --problems strict_saddle,deep_linear --seeds 0
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import signal
import statistics
import sys
import time
import warnings
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "efficacy.md"
# The problems and the harness are imported as `benchmarks.problems`, also when run as a script.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
EVAL_EVERY = 10
# The exit status of a run stopped by Ctrl-C, as a shell reports it (128 + SIGINT).
INTERRUPTED = 130


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
    detector = callbacks[0].detector if callbacks else None
    solved_at = result.steps_to_target
    wasted = [
        (e.step, (e.end_step if e.end_step is not None else steps) - e.step)
        for e in events
        if e.verdict == "rolled_back"
    ]
    return {
        "problem": problem,
        "seed": seed,
        "method": method,
        "steps": steps,
        "to_target": result.steps_to_target,
        "final": result.final_metric,
        "wall": wall,
        "accepted": sum(e.verdict == "accepted" for e in events),
        "neutral": sum(e.verdict == "neutral" for e in events),
        "rolled_back": sum(e.verdict == "rolled_back" for e in events),
        "actions": [f"{e.diagnosis}:{e.action.split('(')[0]}:{e.verdict[0]}" for e in events],
        # Probation steps thrown away by rolled-back trials, before and after the target was met.
        "wasted_before": sum(n for s, n in wasted if solved_at is None or s < solved_at),
        "wasted_after": sum(n for s, n in wasted if solved_at is not None and s >= solved_at),
        "diagnoses": [
            (d.kind, d.step, *(d.evidence.get(k, math.nan) for k in _MOTION))
            for d in (detector.diagnoses if detector is not None else [])
        ],
        "held_off": [
            (step, *(getattr(m, k) for k in _MOTION))
            for step, m in (detector.held_off if detector is not None else [])
        ],
    }


#: The motion numbers reported per diagnosis and per stall held off.
_MOTION = ("speed", "trend", "agreement")


def _median_steps(rows: list[dict[str, Any]]) -> str:
    values = [r["to_target"] if r["to_target"] is not None else None for r in rows]
    if sum(v is not None for v in values) * 2 <= len(values):
        return f"> {rows[0]['steps']}"
    censored = [v if v is not None else rows[0]["steps"] + 1 for v in values]
    return f"{statistics.median(censored):.0f}"


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _harm(
    problem: str, higher: bool, plain: list[dict[str, Any]], escape: list[dict[str, Any]]
) -> str:
    """A row of the no-harm table: each seed's final metric and steps against plain's."""
    finals, steps, held = [], [], True
    for p, e in zip(plain, escape, strict=True):
        # Accuracies within 0.5 points, losses within 1%.
        slack = 0.005 if higher else 0.01 * abs(p["final"])
        ok = e["final"] >= p["final"] - slack if higher else e["final"] <= p["final"] + slack
        fast = p["to_target"] is None or (
            e["to_target"] is not None and e["to_target"] <= 1.1 * p["to_target"]
        )
        held = held and ok and fast
        finals.append(f"{_fmt(e['final'])} vs {_fmt(p['final'])}")
        steps.append(f"{e['to_target']} / {p['to_target']}")
    escapes = sum(len(r["actions"]) for r in escape)
    held = held and escapes == 0
    return (
        f"| `{problem}` | {', '.join(finals)} | {', '.join(steps)} | {escapes} "
        f"| {'yes' if held else '**no**'} |"
    )


def _motion_line(problem: str, escape: list[dict[str, Any]]) -> str:
    """A row of the motion table: the numbers behind each hold and each diagnosis."""

    def numbers(values: tuple[Any, ...]) -> str:
        if all(math.isnan(v) for v in values):
            return "not measured"  # no two windows closed yet, or none since an escape
        return ", ".join(f"{v:.2g}" for v in values)

    held = "; ".join(
        " ".join(f"{h[0]} ({numbers(h[1:])})" for h in r["held_off"]) or "none" for r in escape
    )
    diagnosed = "; ".join(
        " ".join(f"{d[0]} at {d[1]} ({numbers(d[2:])})" for d in r["diagnoses"]) or "none"
        for r in escape
    )
    return f"| `{problem}` | {held} | {diagnosed} |"


def output_path(out: Path | None, overwrite: bool, name: str = "efficacy") -> Path:
    """Where the table goes: ``out``, the committed file with ``overwrite``, else a new file."""
    if out is not None:
        return out
    if overwrite:
        return RESULTS / f"{name}.md"
    return RESULTS / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}.md"


def expected_walls(path: Path = DEFAULT_OUT) -> dict[tuple[str, str], float]:
    """Median seconds per run, by (problem, method), from the wall-time line of a results file."""
    if not path.exists():
        return {}
    walls = {}
    for line in path.read_text().splitlines():
        if "wall time" in line.lower():
            # Numbers like 24.3, never followed by the sentence's full stop.
            for problem, plain, escape in re.findall(
                r"`(\w+)` (\d+(?:\.\d+)?) / (\d+(?:\.\d+)?)", line
            ):
                walls[problem, "plain"] = float(plain)
                walls[problem, "escape"] = float(escape)
    return walls


def duration(seconds: float) -> str:
    """``"under 1 s"``, ``"40 s"`` or ``"3 min"``."""
    if seconds < 1:
        return "under 1 s"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _ignore_sigint() -> None:
    # Workers leave Ctrl-C to the main process, which stops them; a worker interrupted on its own
    # would report the interruption as the run's result and take the next run.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel the runs not started and end the workers now, without waiting for running runs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
    # The executor's own handle on its workers (private; it drops it in `shutdown`).
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    # SIGKILL: Lightning answers SIGTERM by finishing the step first, and a run cut short holds
    # nothing worth saving.
    for process in processes:
        process.kill()
    for process in processes:
        process.join()


def run_all(
    jobs: list[tuple[str, int, str]], workers: int
) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Every job on ``workers`` processes, longest expected first, with a progress line per run."""
    walls = expected_walls()
    default = statistics.median(walls.values()) if walls else 1.0
    expected = {job: walls.get((job[0], job[2]), default) for job in jobs}
    # The long runs first, so that the workers finish together.
    order = sorted(jobs, key=lambda job: -expected[job])
    results: dict[tuple[str, int, str], dict[str, Any]] = {}
    started = time.perf_counter()
    pool = ProcessPoolExecutor(workers, initializer=_ignore_sigint)
    try:
        futures: dict[Future[dict[str, Any]], tuple[str, int, str]] = {
            pool.submit(run, *job): job for job in order
        }
        done_expected = 0.0
        for future in as_completed(futures):
            job = futures[future]
            result = results[job] = future.result()
            done_expected += expected[job]
            elapsed = time.perf_counter() - started
            left = sum(expected.values()) - done_expected
            eta = f"about {duration(elapsed * left / done_expected)} left" if left > 0 else "done"
            print(
                f"[{len(results)}/{len(jobs)}] {job[0]} seed {job[1]} {job[2]}: "
                f"{result['wall']:.1f} s; {eta}",
                flush=True,
            )
    except BaseException:
        stop_workers(pool)
        raise
    pool.shutdown()
    return results


def main() -> int:
    from benchmarks.problems import PROBLEMS, make_problem
    from lightning_escape.progress import MotionRule

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None, help="write the table to this file")
    where.add_argument(
        "--overwrite", action="store_true", help=f"replace {DEFAULT_OUT.relative_to(ROOT)}"
    )
    args = parser.parse_args()
    problems = args.problems.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(p, s, m) for p in problems for s in seeds for m in ("plain", "escape")]
    out = output_path(args.out, args.overwrite)
    print(
        f"{len(jobs)} runs on {args.workers} worker processes; the table goes to {out}", flush=True
    )
    started = time.time()
    try:
        by_job = run_all(jobs, args.workers)
    except KeyboardInterrupt:
        print(f"\ninterrupted: workers stopped, nothing written to {out}", file=sys.stderr)
        return INTERRUPTED
    results = [by_job[job] for job in jobs]

    lines = [
        "# Efficacy: plain training against `EscapeCallback()`",
        "",
        f"Measured {datetime.date.today().isoformat()} with `python3 dev.py efficacy` "
        f"(`benchmarks/efficacy.py --seeds {args.seeds}`), {len(jobs)} runs in "
        f"{(time.time() - started) / 60:.1f} min on {args.workers} worker processes, one thread each; "
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores.",
        "",
        "Each problem trains for its budget with its own optimizer (plain SGD unless its "
        "docstring says otherwise), without and with `EscapeCallback(seed=seed)` (every other "
        "argument at its default). *Solved* counts the seeds whose metric met the target at an "
        "evaluation (every 10 steps); *median steps* is the median first such step, censored at "
        "the budget; *final* is the metric after the whole budget per seed. *Escapes* counts "
        "accepted / neutral (kept without effect) / rolled-back escapes over all seeds; *wasted* "
        "sums the probation steps of the "
        "rolled-back trials over all seeds, split by whether the trial started before or after "
        "that run met its target; the actions column lists `diagnosis:step:verdict` per seed "
        "(a = accepted, n = neutral, r = rolled back).",
        "",
        "| problem | category | budget | target | plain: solved, median steps | escape: solved, median "
        "steps | plain final | escape final | escapes (a/n/r) | wasted before / after target "
        "| actions (per seed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks: list[str] = []
    motion: list[str] = []
    for problem in problems:
        module = make_problem(problem, 0)
        category = PROBLEMS[problem].category
        plain = [r for r in results if r["problem"] == problem and r["method"] == "plain"]
        escape = [r for r in results if r["problem"] == problem and r["method"] == "escape"]
        op = ">=" if module.higher_is_better else "<="
        target = f"{module.metric_name} {op} {_fmt(module.target)}"
        actions = " / ".join(", ".join(r["actions"]) or "none" for r in escape)
        lines.append(
            f"| `{problem}` | {category} | {plain[0]['steps']} | {target} "
            f"| {sum(r['to_target'] is not None for r in plain)}/{len(plain)}, {_median_steps(plain)} "
            f"| {sum(r['to_target'] is not None for r in escape)}/{len(escape)}, "
            f"{_median_steps(escape)} "
            f"| {', '.join(_fmt(r['final']) for r in plain)} "
            f"| {', '.join(_fmt(r['final']) for r in escape)} "
            f"| {sum(r['accepted'] for r in escape)}/{sum(r['neutral'] for r in escape)}/"
            f"{sum(r['rolled_back'] for r in escape)} "
            f"| {sum(r['wasted_before'] for r in escape)} / {sum(r['wasted_after'] for r in escape)} "
            f"| {actions} |"
        )
        if category != "stuck":
            checks.append(_harm(problem, module.higher_is_better, plain, escape))
        motion.append(_motion_line(problem, escape))
    lines += [
        "",
        "## Healthy runs: no harm",
        "",
        "Targets for the controls and the hidden-progress tasks, per seed: final metric within 0.5 "
        "accuracy points (accuracies) or 1% (losses) of plain, steps to target at most 1.1x plain, "
        "and no escape.",
        "",
        "| problem | final: escape vs plain per seed | steps to target: escape / plain per seed "
        "| escapes | held |",
        "|---|---|---|---|---|",
        *checks,
        "",
        "## Is the run still moving?",
        "",
        "The detector's motion numbers (`speed`: displacement of the parameters per window of "
        "`patience / 2` steps relative to their norm; `trend`: against the window before; "
        "`agreement`: cosine to the window before) at every stall it held off as a run still on its "
        "way, and at every stall it diagnosed, seed 0 first. A stall is held off while the run is "
        f"moving: {MotionRule().describe()} (`MotionRule()`). A stall diagnosed before two "
        "windows have closed (from the start, or since an escape's jump, which starts the "
        "measurement over) shows `not measured`.",
        "",
        "| problem | held off: step (speed, trend, agreement) | diagnosed: kind at step (speed, trend, "
        "agreement) |",
        "|---|---|---|",
        *motion,
    ]
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nWritten to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
