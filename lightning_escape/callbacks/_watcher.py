"""Lightning's hooks as the steps of a watching callback (private)."""

from __future__ import annotations

from typing import Any, NamedTuple, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer
from typing_extensions import override

from lightning_escape.probe import as_kept, intact

_NOT_A_TRAINER = (
    "{name} works inside Lightning's `Trainer.fit` (lightning.pytorch), whose hooks it reads; it "
    "was called by {got!r} before any `Trainer.setup`. Fabric does not run these hooks: use a "
    "`lightning.pytorch.Trainer`, or remove the callback."
)


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
    :meth:`end_batch`, :meth:`end_epoch`, :meth:`validation_start`, :meth:`validation_end`,
    :meth:`detach`) are public, so a watcher that holds another as a part
    (``EscapeCallback`` holds a ``StallDetector``, which holds a ``GradientMonitor``) drives it by
    calling them from its own steps.
    """

    _attached = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        caller: Any = trainer  # typed as a Trainer, but Fabric passes itself
        if not isinstance(caller, pl.Trainer):
            self._refuse(caller)
        if stage == "fit":  # validating or testing after a fit keeps what the fit found
            self._attached = True
            self.attach(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._attached:
            self._refuse(trainer)
        self.start(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._attached:
            self._refuse(trainer)
        # `training_step` may take the batch apart (`batch.pop("labels")`): the batch passed on
        # at the end, which the probe calls `training_step` on again, gets back what it took
        # (and keeps what the module's own `on_train_batch_start`, called after this, added).
        self._started = (batch_idx, intact(batch))
        self.start_batch(trainer, batch, batch_idx)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self._attached:
            self._refuse(trainer)
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
        if not self._attached:
            self._refuse(trainer)
        started = self.__dict__.pop("_started", None)
        if started is not None and started[0] == batch_idx:
            batch = as_kept(started[1], batch)
        self.end_batch(Batch(trainer, pl_module, batch, batch_idx, outputs))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._attached:
            self._refuse(trainer)
        self.end_epoch(trainer)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validations inside a fit only: not the sanity check, not `validate` after the fit.
        if self._attached and not trainer.sanity_checking:
            self.validation_start(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._attached and not trainer.sanity_checking:
            self.validation_end(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._attached:
            self._attached = False
            self.detach()
        # Lightning lends every callback its module's `log` and `log_dict`: bound methods that
        # would keep the module, and through it the trainer, alive as long as the callback.
        for name in ("log", "log_dict"):
            self.__dict__.pop(name, None)

    def _refuse(self, trainer: Any) -> NoReturn:
        raise TypeError(_NOT_A_TRAINER.format(name=type(self).__name__, got=type(trainer)))

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Begin a fit (``setup``)."""

    def start(self, trainer: pl.Trainer) -> None:
        """Training starts (``on_train_start``)."""

    def start_batch(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> Any:
        """A training batch starts."""

    def observe(self, trainer: pl.Trainer, optimizer: Optimizer) -> Any:
        """Every optimizer step, inside its window: gradients final, not yet clipped."""

    def end_batch(self, batch: Batch) -> Any:
        """A training batch ends."""

    def end_epoch(self, trainer: pl.Trainer) -> None:
        """A training epoch ends (``on_train_epoch_end``, before the module's own hook)."""

    def validation_start(self, trainer: pl.Trainer) -> None:
        """A validation inside the fit starts (never the sanity check)."""

    def validation_end(self, trainer: pl.Trainer) -> None:
        """A validation inside the fit ends: its metrics are in ``trainer.callback_metrics``."""

    def detach(self) -> None:
        """End a fit (``teardown``): hold on to nothing of the run."""
