"""Demo: train a small model with GradientMonitor and write TensorBoard logs.

Run with ``python3 dev.py demo`` (creates the virtual environment on first use).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_escape import GradientMonitor


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(1024, 16, generator=g)
        self.y = torch.sin(self.x @ torch.randn(16, 1, generator=g))
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=64, shuffle=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=Path("runs"))
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(args.logdir, name="demo")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=logger,
        callbacks=[GradientMonitor(histogram_every_n_steps=100)],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression())
    logdir = Path(logger.log_dir).resolve()
    print(f"\nTensorBoard logs: {logdir}")
    print(f"Open them with:  {Path(sys.executable).parent / 'tensorboard'} --logdir {logdir}")


if __name__ == "__main__":
    main(sys.argv[1:])
