"""Is the run still moving? The motion numbers of plain training on every benchmark problem.

Each problem trains plainly (no escape) for its budget while a :class:`~lightning_escape.progress.
DriftMeter` samples the parameters every 10 steps, in windows of 10 samples (100 steps: the
detector's default of ``patience / 2`` with ``patience=200``). For the stretch before the run
first meets its target (the whole run if it never does), the table gives the median speed, trend
and agreement over the windows after the detector's warm-up (200 steps), and how many of those
windows :class:`~lightning_escape.progress.MotionRule` calls "moving" (a stall declared there would
be held off). On the stuck problems that share should be 0; on the hidden-progress ones, 1.

    .venv/bin/python benchmarks/progress_signal.py                        # every problem, seed 0
    .venv/bin/python benchmarks/progress_signal.py --seeds 0,1,2 --out benchmarks/results/progress_signal.md
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
EVERY = 10  # steps between samples (the detector's check interval)
WINDOW = 10  # samples per window
WARMUP = 200  # the detector's default warm-up: no stall is declared before it


def measure(problem: str, seed: int) -> dict[str, Any]:
    """Train ``problem`` plainly; the motion of every window and the step the target was met."""
    import torch
    from lightning.pytorch import Callback, LightningModule, Trainer

    from benchmarks.problems import PROBLEMS, train_plain
    from lightning_escape.progress import DriftMeter, MotionRule

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rule = MotionRule()

    class Meter(Callback):
        def __init__(self) -> None:
            self.meter = DriftMeter(window=WINDOW)
            self.windows: list[tuple[int, float, float, float, bool]] = []

        def on_train_batch_end(self, trainer: Trainer, module: LightningModule, *args: Any) -> None:
            step = trainer.global_step - 1
            if (step + 1) % EVERY == 0:
                params = [p for p in module.parameters() if p.requires_grad]
                m = self.meter.sample(step, params)
                if m is not None:
                    self.windows.append((step, m.speed, m.trend, m.agreement, rule.moving(m)))

    meter = Meter()
    result = train_plain(
        problem, max_steps=PROBLEMS[problem].benchmark_steps, seed=seed, callbacks=[meter]
    )
    return {"solved_at": result.steps_to_target, "windows": meter.windows}


def _median(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return f"{statistics.median(finite):.2g}" if finite else "n/a"


def main() -> int:
    from benchmarks.problems import PROBLEMS
    from lightning_escape.progress import MotionRule

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    lines = [
        "# Is the run still moving? Motion of plain training",
        "",
        f"Measured {datetime.date.today().isoformat()} with `benchmarks/progress_signal.py "
        f"--seeds {args.seeds}`: windows of {WINDOW * EVERY} steps after the first {WARMUP}, up "
        "to the step the run first met its target (the whole budget if it never did); medians "
        f"over the windows and seeds. A window is *moving* ({MotionRule().describe()}, "
        "`MotionRule()`) when a stall declared there would be held off.",
        "",
        "| problem | category | windows | speed | trend | agreement | moving |",
        "|---|---|---|---|---|---|---|",
    ]
    for problem in args.problems.split(","):
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            out = measure(problem, seed)
            end = out["solved_at"] if out["solved_at"] is not None else math.inf
            rows += [w for w in out["windows"] if WARMUP <= w[0] < end]
            print(f"{problem} seed {seed}: {len(out['windows'])} windows", flush=True)
        moving = sum(w[4] for w in rows)
        lines.append(
            f"| `{problem}` | {PROBLEMS[problem].category} | {len(rows)} "
            f"| {_median([w[1] for w in rows])} | {_median([w[2] for w in rows])} "
            f"| {_median([w[3] for w in rows])} | {moving}/{len(rows)} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
