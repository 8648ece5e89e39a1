"""Demo: stalled runs, diagnosed and escaped by ``EscapeCallback()``, logged to TensorBoard.

Three small problems that plain SGD cannot leave, each trained twice with the same seed: once with
only a ``GradientMonitor`` (plain training, watched) and once with ``EscapeCallback()`` at its
defaults. The demo prints what the callback diagnosed, what it did, its verdicts, and when each run
reached its target, then where the TensorBoard logs are and the command that opens them.

Run with ``python3 dev.py demo`` (creates the virtual environment on first use).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_escape import EscapeCallback, GradientMonitor

# The problem registry and the target tracker are the benchmarks' (they are not installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.problems import TargetTracker, make_problem

# (problem, steps, what is wrong with it)
RUNS = [
    ("deep_linear", 800, "a plateau: four linear layers initialised at 1e-3"),
    ("matrix_factorization", 800, "a strict saddle: one row of U pinned at zero"),
    ("symmetric_teacher_student", 2000, "symmetric units: eight identical hidden units"),
]


def train(
    problem: str, steps: int, logdir: Path, escape: bool
) -> tuple[pl.Callback, TargetTracker, float]:
    pl.seed_everything(0, verbose=False)
    module = make_problem(problem, seed=0)
    tracker = TargetTracker(every_n_steps=10)
    watcher: pl.Callback = EscapeCallback() if escape else GradientMonitor()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=TensorBoardLogger(logdir, name=problem, version="escape" if escape else "plain"),
        callbacks=[watcher, tracker],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return watcher, tracker, module.metric()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=Path("runs") / "demo")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logdir = args.logdir.resolve()
    summary = []
    for problem, steps, what in RUNS:
        target = make_problem(problem, seed=0)
        print(
            f"\n=== {problem}: {what}; target {target.metric_name} "
            f"{'>=' if target.higher_is_better else '<='} {target.target:.4g} ===",
            flush=True,
        )
        start = time.perf_counter()
        _, plain, plain_final = train(problem, steps, logdir, escape=False)
        escape, tracked, escape_final = train(problem, steps, logdir, escape=True)
        assert isinstance(escape, EscapeCallback)
        for d in escape.diagnoses:
            print(f"  diagnosis at step {d.step}: {d.kind}: {d.reason}")
        for e in escape.events:
            print(
                f"  escape at step {e.step}: {e.action} -> {e.verdict} "
                f"(judged at step {e.end_step}): {e.reason.split('Verdict: ')[-1]}"
            )
        summary.append(
            (
                problem,
                steps,
                plain.steps_to_target,
                plain_final,
                tracked.steps_to_target,
                escape_final,
                time.perf_counter() - start,
            )
        )

    print(
        "\n| problem | steps | plain: reached target at | plain final | EscapeCallback: reached "
        "target at | EscapeCallback final |"
    )
    print("|---|---|---|---|---|---|")
    for problem, steps, p_at, p_final, e_at, e_final, _ in summary:
        print(
            f"| {problem} | {steps} | {p_at if p_at is not None else 'never'} | {p_final:.4g} "
            f"| {e_at if e_at is not None else 'never'} | {e_final:.4g} |"
        )
    print(f"\nTensorBoard logs: {logdir}")
    print(f"Open them with:  {Path(sys.executable).parent / 'tensorboard'} --logdir {logdir}")
    print(
        "(Scalars: stall/*, escape/*, grad/* and train_loss per run; Text: stall/diagnosis, "
        "escape/escape, escape/verdict; Custom Scalars: the grouped layout.)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
