"""Writing an escape step: a dataclass subclass of ``EscapeStep``, put in a ladder, seen acting.

``Shake`` below is a complete custom escape step. Its fields are its settings (so YAML and
``LightningCLI`` can build it, and ``describe()`` and ``config()`` list them); ``radius`` is declared
with ``escalating(...)``, so when an attempt is rolled back and the ladder is climbed again,
``stronger()`` returns a copy with a larger radius. ``apply(ctx)`` acts once and says what it did;
``duration`` and ``before_optimizer_step(ctx, optimizer)`` make it also act on the gradients of the
next optimizer steps. The callback snapshots and restores the model and optimizers itself.

It is put alone in the ``saddle`` ladder and trained on ``StrictSaddle2D`` (``f = x² − y² + y⁴/4``
from ``(1, 0)``: gradient descent converges to the saddle at the origin and stays there). Its first
attempt is deliberately far too weak, so the run shows a roll back, the escalation, and an accepted
escape; the script prints each event with its verdict. (With ``keep_neutral=False`` only an escape
that helped by the detector's tolerance stays. At the default the weak first attempt, whose push
has barely begun to grow along the negative curvature when it is judged, ends better by less than
the tolerance and is kept as ``neutral``; the run then leaves the saddle from there by itself.)

Run it from the repository root::

    python examples/custom_step.py                  # 300 steps, logs under runs/custom_step
    python examples/custom_step.py --steps 250 --out /tmp/custom_step
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.optim import Optimizer

from lightning_escape import EscapeCallback, EscapeStep, StallDetector
from lightning_escape.demos.problems import StrictSaddle2D
from lightning_escape.escapes import EscapeContext, escalating


@dataclass(eq=False, repr=False)
class Shake(EscapeStep):
    """Jump once in a random direction, then add small gradient noise for a few steps.

    Args:
        radius: Length of the jump (all trainable parameters together). Escalates a hundredfold.
        noise_steps: Optimizer steps after the jump whose gradients get noise.
        noise: Standard deviation of that noise, relative to ``radius``.
        seed: This step's own stream of random draws (the callback's seed and the optimizer step
            are mixed in by ``ctx.generator``, so every process draws the same numbers).
    """

    radius: float = escalating(0.1, by=lambda r: r * 100)
    noise_steps: int = 10
    noise: float = 0.1
    seed: int = 0

    @property
    def duration(self) -> int:
        return self.noise_steps  # before_optimizer_step runs for this many steps after apply

    def apply(self, ctx: EscapeContext) -> str:
        params = ctx.params()
        g = ctx.generator(self.seed)
        direction = [torch.randn(p.shape, generator=g) for p in params]
        length = torch.sqrt(sum(float((d**2).sum()) for d in direction) * torch.ones(()))
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_((d * (self.radius / length)).to(p))
        return (
            f"jumped {self.radius:.3g} in a random direction, then gradient noise of "
            f"{self.noise * self.radius:.3g} for {self.noise_steps} steps"
        )

    def before_optimizer_step(self, ctx: EscapeContext, optimizer: Optimizer) -> None:
        g = ctx.generator(self.seed + 1)  # a new draw at each optimizer step (ctx.step changes)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.add_(torch.randn(p.shape, generator=g).to(p) * self.noise * self.radius)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (300)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs") / "custom_step", help="TensorBoard log directory"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    step = Shake(radius=1e-12)  # far too weak on purpose: rolled back, then escalated after a wait
    print(f"The ladder's step: {step.describe()}; stronger: {step.stronger().describe()}")
    escape = EscapeCallback(
        StallDetector(patience=30, warmup_steps=0, smoothing=0.0),
        # The other kinds keep their default ladders, except the minimum the escape leads to.
        ladders={"saddle": [step], "local_minimum": []},
        probation_steps=30,
        keep_neutral=False,  # roll back what did not help by the tolerance: shows the escalation
    )
    problem = StrictSaddle2D()
    logger = TensorBoardLogger(args.out, name="strict_saddle")
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
    trainer.fit(problem)

    for d in escape.diagnoses:
        print(f"diagnosis at step {d.step}: {d.kind}: {d.reason}")
    for e in escape.events:
        print(f"escape at step {e.step}: {e.action} against {e.diagnosis} -> {e.verdict}")
        did, _, verdict = e.reason.partition("Verdict: ")
        print(f"    did: {did.split('; because')[0]}")
        print(f"    verdict at step {e.end_step}: {verdict or 'pending'}")
    x, y = problem.xy.tolist()
    print(
        f"final point ({x:.3g}, {y:.3g}), f = {problem.metric():.4g} "
        f"(saddle f = 0, minima f = -1; solved: {problem.solved()})"
    )
    print(f"\nTensorBoard logs: {Path(logger.log_dir).resolve()}")
    print(
        "Look at: Text escape/escape and escape/verdict; Scalars escape/verdict and stall/monitored."
    )


if __name__ == "__main__":
    main(sys.argv[1:])
