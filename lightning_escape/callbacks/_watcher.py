"""Lightning's hooks as the steps of a watching callback (private)."""

from __future__ import annotations

from typing import Any, NamedTuple

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer
from typing_extensions import override


class Batch(NamedTuple):
    """A training batch as a watcher sees it at its end (a named tuple: built on every step).

    Attributes:
        trainer: The trainer.
        module: The module.
        data: The batch (the probe's batch, should a stall be diagnosed on it).
        idx: Its index in the epoch.
        outputs: What ``training_step`` returned.
    """

    trainer: pl.Trainer
    module: pl.LightningModule
    data: Any
    idx: int
    outputs: Any = None


class Watcher(Callback):
    """A callback whose hooks only pass Lightning's events on to its steps.

    The steps (:meth:`attach`, :meth:`start`, :meth:`start_batch`, :meth:`observe`,
    :meth:`end_batch`, :meth:`detach`) are public, so a watcher that holds another as a part
    (``EscapeCallback`` holds a ``StallDetector``, which holds a ``GradientMonitor``) drives it by
    calling them from its own steps.
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.attach(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.start_batch(trainer, batch, batch_idx)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self.observe(trainer, optimizer)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.end_batch(Batch(trainer, pl_module, batch, batch_idx, outputs))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.detach()

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Begin a fit (``setup``)."""

    def start(self, trainer: pl.Trainer) -> None:
        """Training starts (``on_train_start``)."""

    def start_batch(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        """A training batch starts."""

    def observe(self, trainer: pl.Trainer, optimizer: Optimizer) -> Any:
        """Every optimizer step, inside its window: gradients final, not yet clipped."""

    def end_batch(self, batch: Batch) -> Any:
        """A training batch ends."""

    def detach(self) -> None:
        """End a fit (``teardown``): hold on to nothing of the run."""
