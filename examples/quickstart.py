"""Quickstart: ``EscapeCallback()`` dropped into an ordinary training run.

An MLP classifies scikit-learn's bundled 8x8 handwritten digits (``load_digits``: 1797 images, ten
classes; nothing is downloaded) with a train/validation split, logs ``train_loss`` and ``val_acc``,
and trains with ``Trainer(callbacks=[EscapeCallback()])`` and a ``TensorBoardLogger``. The callback
runs at its defaults: it watches the gradients every step, and only acts if the run stalls (a
healthy run like this one usually never does, and then it changes nothing). Afterwards the script
prints what the callback diagnosed and did (``escape.diagnoses``, ``escape.events``) and where the
TensorBoard logs are.

Run it from the repository root (needs scikit-learn)::

    python examples/quickstart.py                 # 1500 optimizer steps, logs under runs/quickstart
    python examples/quickstart.py --steps 200 --out /tmp/quickstart
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_escape import EscapeCallback


class DigitsMLP(pl.LightningModule):
    """A two-hidden-layer MLP on 64 pixel intensities, trained with Adam."""

    def __init__(self, hidden: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Digits, scaled to [0, 1], split 80/20 into training and validation loaders."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(x))
    train, val = order[:n_train], order[n_train:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs") / "quickstart", help="TensorBoard log directory"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="lightning")

    pl.seed_everything(0, verbose=False)
    train_loader, val_loader = digits_loaders()
    model = DigitsMLP()
    escape = EscapeCallback()  # the defaults: works on any LightningModule
    logger = TensorBoardLogger(args.out, name="digits_mlp")
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
    trainer.fit(model, train_loader, val_loader)

    val_acc = trainer.callback_metrics.get("val_acc")  # validation runs at the end of each epoch
    accuracy = "not validated yet" if val_acc is None else f"{float(val_acc):.4f}"
    print(f"\nTrained {trainer.global_step} steps; val_acc {accuracy}")
    if not escape.diagnoses:
        print("No stall diagnosed: the callback only watched and logged, and changed nothing.")
    for d in escape.diagnoses:  # frozen dataclasses: step, kind, reason, evidence
        print(f"Diagnosis at step {d.step}: {d.kind}: {d.reason}")
    for e in escape.events:  # step, diagnosis, action, verdict, reason, before, after, end_step
        print(f"Escape at step {e.step}: {e.action} against {e.diagnosis} -> {e.verdict}")

    logdir = Path(logger.log_dir).resolve()
    print(f"\nTensorBoard logs: {logdir}")
    print(f"Open them with:  tensorboard --logdir {logdir}")
    print(
        "Look at: Scalars train_loss, val_acc, grad/norm and stall/score (a stall is a score >= 1); "
        "Custom Scalars for the stall/escape/grad layout."
    )
    print(f"Run report:  lightning-escape report {logdir}")


if __name__ == "__main__":
    main(sys.argv[1:])
