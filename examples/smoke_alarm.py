"""The smoke alarm: ``StallDetector`` alone tells when a run is stuck and why, and never acts.

Two small problems that plain SGD cannot leave (from ``lightning_escape.demos.problems``) and a
healthy control, each trained with only a ``StallDetector()`` at its defaults:

- ``DeepLinear``: four linear layers initialised at 1e-3, a plateau (gradients of order 1e-9);
- ``MatrixFactorization``: a strict saddle, one row of the factor pinned at zero;
- ``TeacherStudent``: a healthy control, which trains and is never diagnosed.

For each run the script prints every diagnosis in ``detector.diagnoses`` (frozen dataclasses with
``step``, ``kind``, ``reason`` and ``evidence``), then trains the same problem again without the
detector and checks that the final parameters are bitwise the same: the detector only watches.

Run it from the repository root::

    python examples/smoke_alarm.py                  # 600 steps per run, logs under runs/smoke_alarm
    python examples/smoke_alarm.py --steps 400 --out /tmp/smoke_alarm
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_escape import StallDetector
from lightning_escape.demos.problems import DeepLinear, MatrixFactorization, Problem, TeacherStudent

PROBLEMS: list[tuple[str, type[Problem]]] = [
    ("deep_linear", DeepLinear),
    ("matrix_factorization", MatrixFactorization),
    ("teacher_student", TeacherStudent),
]
# A few of the numbers in each diagnosis' evidence (a dict of plain values).
EVIDENCE = ("steps_since_improvement", "grad_norm", "grad_ratio", "lambda_min", "lambda_max")


def train(
    problem: type[Problem], steps: int, callbacks: list[pl.Callback], logger: object
) -> Problem:
    """Train a fresh problem (seed 0) with plain SGD for ``steps`` optimizer steps."""
    pl.seed_everything(0, verbose=False)
    module = problem(seed=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=logger or False,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return module


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run (600)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs") / "smoke_alarm", help="TensorBoard log directory"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # six fits: keep it short
    logdir = args.out.resolve()

    for name, problem in PROBLEMS:
        detector = StallDetector()  # patience 200 optimizer steps, after as many of warm-up
        watched = train(problem, args.steps, [detector], TensorBoardLogger(logdir, name=name))
        plain = train(problem, args.steps, [], None)
        same = all(
            torch.equal(a, b)
            for a, b in zip(watched.state_dict().values(), plain.state_dict().values())
        )
        print(
            f"\n=== {name}: {watched.metric_name} {watched.metric():.4g} after {args.steps} steps "
            f"(target {watched.target:.4g}, solved: {watched.solved()}) ==="
        )
        if not detector.diagnoses:
            print("  no diagnosis: the run never stalled")
        for d in detector.diagnoses:
            print(f"  diagnosis at step {d.step}: {d.kind}")
            print(f"    reason: {d.reason}")
            shown = [f"{k}={d.evidence[k]:.4g}" for k in EVIDENCE if k in d.evidence]
            print(f"    evidence: {', '.join(shown)}")
        print(f"  parameters bitwise identical to a run without the detector: {same}")

    print(f"\nTensorBoard logs: {logdir}  (one run per problem)")
    print(f"Open them with:  tensorboard --logdir {logdir}")
    print(
        "Look at: Scalars stall/score (>= 1 is a stall), stall/grad_ratio, stall/lambda_min and "
        "stall/lambda_max; Text stall/diagnosis for the sentences above."
    )


if __name__ == "__main__":
    main(sys.argv[1:])
