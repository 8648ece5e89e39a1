"""The run report: a short run that escapes a plateau, read back into a timeline PNG and a summary.

``DeepLinear`` (four linear layers initialised at 1e-3, from ``lightning_escape.demos.problems``)
sits on a plateau that plain SGD would need about 2·10⁵ steps to leave. ``EscapeCallback`` with a
shorter patience and probation than its defaults diagnoses it, escapes, and keeps the escape; the
run is logged with a ``TensorBoardLogger``. Then ``lightning_escape.report.write_report(logdir)``
reads the event files back and writes ``report.png`` (the monitored value, the gradient norm and
the Hessian eigenvalues over time, each escape shaded by its verdict, each diagnosis marked) and
``report.md`` (the diagnoses, escapes and verdicts as tables) next to them. The script prints both
paths, the markdown, and the equivalent command line.

Run it from the repository root (the PNG needs matplotlib: ``pip install "lightning-escape[report]"``)::

    python examples/read_report.py                  # 400 steps, logs under runs/read_report
    python examples/read_report.py --steps 250 --out /tmp/read_report
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

from lightning_escape import EscapeCallback, StallDetector
from lightning_escape.demos.problems import DeepLinear
from lightning_escape.report import write_report


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps (400)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs") / "read_report", help="TensorBoard log directory"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    pl.seed_everything(0, verbose=False)
    problem = DeepLinear(seed=0)
    # Patience and probation of 100 steps (the defaults are 200) keep the run short.
    escape = EscapeCallback(StallDetector(patience=100), probation_steps=100)
    logger = TensorBoardLogger(args.out, name="deep_linear")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        callbacks=[escape],
        logger=logger,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(problem)  # the logger's event files are flushed and closed at the end of fit
    print(
        f"Trained {trainer.global_step} steps: loss {problem.metric():.4g} "
        f"(target {problem.target:.4g}, solved: {problem.solved()}); "
        f"{len(escape.diagnoses)} diagnoses, {len(escape.events)} escapes"
    )

    logdir = Path(logger.log_dir).resolve()
    written = write_report(logdir)  # [report.png, report.md] for each run under logdir
    png = next(p for p in written if p.suffix == ".png")
    md = next(p for p in written if p.suffix == ".md")
    print(f"\nTimeline: {png}")
    print(f"Summary:  {md}\n")
    print(md.read_text(encoding="utf-8"))
    print("The same from the command line (any log directory; --out DIR writes elsewhere):")
    print(f"  lightning-escape report {logdir}")
    print(f"  python -m lightning_escape report {logdir}")


if __name__ == "__main__":
    main(sys.argv[1:])
