"""Small adapters to Lightning's trainer, shared by the callbacks (private)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "ValidationMetrics",
    "amp_grad_scale",
    "batch_size_of",
    "global_batch_size",
    "last_validation_step",
    "log_dir",
    "optimizer_index",
    "param_names",
    "put_back_metrics",
    "run_validation",
    "set_step_index",
    "skip_validation_after_batch",
    "step_index",
    "unwrap_optimizer",
    "validates_after_batch",
    "warn_once",
]


def warn_once(seen: set[str], message: str) -> None:
    """Warn with ``message`` unless it is in ``seen`` (a callback's set, reset for each fit)."""
    if message not in seen:
        seen.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def step_index(trainer: pl.Trainer) -> int:
    """The x-axis Lightning logs this batch's metrics at: the count of batches that stepped.

    Equal to ``trainer.global_step`` under automatic optimization; with several optimizers stepped by
    hand in one batch, all of them share it (``global_step`` counts each optimizer step).
    """
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    value = getattr(loop, "_batches_that_stepped", None)
    return int(value) if isinstance(value, int) else int(trainer.global_step)


def stopping(trainer: pl.Trainer) -> bool:
    """Whether the fit ends after this batch: ``should_stop`` is set and Lightning may stop now.

    Lightning goes on while ``min_steps`` or ``min_epochs`` is not met, whatever ``should_stop`` says.
    """
    if not trainer.should_stop:
        return False
    return bool(getattr(trainer.fit_loop, "_can_stop_early", True))


def optimizer_index(trainer: pl.Trainer, optimizer: Optimizer) -> int:
    """Position of ``optimizer`` in ``trainer.optimizers`` (0 when it is not there)."""
    for i, opt in enumerate(trainer.optimizers):
        if opt is optimizer or unwrap_optimizer(opt) is optimizer:
            return i
    return 0


def param_names(module: torch.nn.Module) -> dict[int, str]:
    """Map ``id(parameter)`` to its qualified name in ``module``."""
    return {id(p): name for name, p in module.named_parameters()}


def amp_grad_scale(trainer: pl.Trainer, optimizer: Optimizer) -> Tensor | None:
    """The loss scale by which ``optimizer``'s gradients are still multiplied, or None.

    Lightning's 16-bit plugin unscales gradients before ``on_before_optimizer_step``, except for
    optimizers that unscale inside ``step()`` (fused Adam and friends): their gradients reach the
    hook still scaled. The scale is returned as the scaler's device tensor, so no host sync happens.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    if not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else None


def global_batch_size(trainer: pl.Trainer, batch: Any) -> int | None:
    """Examples that contribute to one optimizer step, None if unknown, 0 if the batch has none.

    The per-device batch size is read from the batch; it is multiplied by gradient accumulation and
    the number of data-parallel processes.
    """
    local = batch_size_of(batch)
    if local is None:
        return None
    if local < 1:
        return 0
    return local * int(trainer.accumulate_grad_batches) * int(trainer.world_size)


def batch_size_of(batch: Any) -> int | None:
    """The batch's size as Lightning reads it for ``self.log`` (quietly), None if it cannot."""
    from lightning.pytorch.utilities.data import extract_batch_size

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(extract_batch_size(batch))
    except Exception:
        return None


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer behind ``optimizer``, which may be Lightning's ``LightningOptimizer``.

    Lightning's wrappers (``LightningOptimizer``, Fabric's optimizer) imitate the wrapped class and
    pass ``isinstance(..., Optimizer)``, so they are recognised by the ``_optimizer`` they keep it
    in, not by their public ``optimizer`` property: optimizers that wrap another one (Lookahead
    and the like) and schedulers have an ``optimizer`` attribute too, and must not be unwrapped.

    Raises:
        TypeError: If ``optimizer`` is neither a torch optimizer nor a wrapper of one.
    """
    inner = getattr(optimizer, "_optimizer", None)
    if isinstance(inner, Optimizer):
        return inner
    if isinstance(optimizer, Optimizer):
        return optimizer
    raise TypeError(f"Expected a torch.optim.Optimizer, got {type(optimizer).__qualname__}.")


def log_dir(trainer: pl.Trainer) -> str | None:
    """Where the trainer's first TensorBoard logger writes, else its first logger; or None.

    The TensorBoard run is the one that holds everything (texts and layouts go only there) and
    the one ``lightning-escape report`` reads, whichever logger comes first in ``logger=[...]``.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = list(trainer.loggers)
    boards = [lg for lg in loggers if isinstance(lg, TensorBoardLogger)]
    logger = (boards or loggers or [None])[0]
    if logger is None:
        return None
    path = getattr(logger, "log_dir", None) or logger.save_dir
    return None if path is None else str(path)


def run_validation(trainer: pl.Trainer, count: int | None = None) -> None:
    """Run the fit's validation loop now, between two training batches, as a scheduled one runs.

    Lightning has no public call for a validation inside ``fit``; this does what its training epoch
    loop does at a validation check (``_TrainingEpochLoop.on_advance_end``, the same in Lightning
    2.4 to 2.6): it switches the trainer to validating, runs ``fit_loop.epoch_loop.val_loop`` (every
    callback's and the module's validation hooks, logging, metrics synced across processes) and
    switches back, keeping the logger connector's first-iteration flag. Unlike it, the gradients
    are not cleared first: that only frees memory, and a module that accumulates gradients by hand
    across batches must keep them. Every process must call it at the same batch.

    Called from ``on_train_batch_end`` of a batch that stepped, it runs where Lightning's own
    validation after that batch would, with the counters as Lightning has them there: the
    metrics are logged at the step the validation follows, and a checkpoint written in it is one
    Lightning resumes from as from any written at the end of a training batch (it counts the
    step and the batch when it restarts). Called later (``on_train_epoch_end``), where Lightning
    has counted the step already, ``count`` sets the count of batches that stepped while the
    loop runs, so that the metrics are logged at that step; the caller puts the true count back
    before checkpoints are written (:func:`set_step_index`), and it is put back at the end.

    Args:
        trainer: The trainer.
        count: The count of batches that stepped to show while the loop runs; None to leave it.
    """
    loop = trainer.fit_loop.epoch_loop
    connector = trainer._logger_connector
    first_loop_iter = connector._first_loop_iter
    stepped = loop._batches_that_stepped
    trainer.validating = True  # picks the validation loop as the trainer's active loop
    if count is not None:
        loop._batches_that_stepped = count
    try:
        loop.val_loop.run()
    finally:
        loop._batches_that_stepped = stepped
        trainer.training = True
        connector._first_loop_iter = first_loop_iter


def set_step_index(trainer: pl.Trainer, count: int) -> None:
    """Set the count of batches that stepped (see :func:`step_index`), for a checkpoint to hold."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = count


def validates_after_batch(trainer: pl.Trainer) -> bool:
    """Whether Lightning runs a validation after the training batch that is ending.

    Asked in ``on_train_batch_end``: Lightning decides it right after the batch
    (``_TrainingEpochLoop.on_advance_end``) with the same counters, unless a restart told it to
    skip that one. A validation due to elapsed time (``val_check_interval`` as a duration) may
    come true in between; every other reason is known here.
    """
    loop = trainer.fit_loop.epoch_loop
    if getattr(loop, "_skip_next_val", False):
        return False
    fetcher = trainer.fit_loop._data_fetcher
    if fetcher is None:  # not inside the training loop
        return False
    return bool(loop._should_check_val_fx(fetcher))


def last_validation_step(trainer: pl.Trainer, limit: int = 10_000_000) -> int | None:
    """The optimizer step the fit's last validation follows, as the fit is set up now.

    In the callback's count (:func:`step_index`): a validation inside an accumulation window
    follows the window's last step. Lightning's own rule (``_TrainingEpochLoop._should_check_val_fx``,
    the same in 2.4 to 2.6) is followed batch by batch from where training stands to
    ``max_steps`` or ``max_epochs``.

    Returns:
        The step's index; -1 when no validation will run; None when it cannot be known: data of
        unknown length, or reloaded during the fit (``reload_dataloaders_every_n_epochs``),
        validations by elapsed time, a fit that a ``Timer`` (``max_time``) may end, several
        optimizers, an accumulation count that a ``GradientAccumulationScheduler`` changes, an
        endless fit or more than ``limit`` batches to go.
    """
    from lightning.pytorch.callbacks import GradientAccumulationScheduler, Timer

    if not trainer.enable_validation:
        return -1
    per_epoch = trainer.num_training_batches
    every = trainer.val_check_batch
    epochs = (
        trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
    )
    steps_max = trainer.max_steps if trainer.max_steps >= 0 else None
    if (
        getattr(trainer, "_val_check_time_interval", None) is not None
        or not isinstance(per_epoch, int)
        or per_epoch <= 0
        or not isinstance(every, int)
        or len(trainer.optimizers) > 1
        or getattr(trainer, "reload_dataloaders_every_n_epochs", 0) > 0
        or any(
            isinstance(c, (GradientAccumulationScheduler, Timer))
            for c in getattr(trainer, "callbacks", [])
        )
        or (epochs is None and steps_max is None)
    ):
        return None
    n_epochs = trainer.check_val_every_n_epoch
    accumulate = max(1, int(trainer.accumulate_grad_batches))
    loop = trainer.fit_loop.epoch_loop
    epoch = trainer.current_epoch
    total = loop.total_batch_idx + 1  # batches begun in the fit
    # Batches begun in this epoch, from the fit's count (the epoch's own still holds the count
    # of a finished epoch, in a run resumed from its end): a run resumed mid-epoch goes on from
    # there, one resumed after its last batch but before Lightning closed it (a checkpoint
    # written at the validation after it) with the next epoch.
    start = total - per_epoch * epoch
    if start >= per_epoch:
        epoch, start = epoch + 1, 0
    if start < 0:
        return None
    steps = trainer.global_step
    last = -1
    while epochs is None or epoch < epochs:
        if steps_max is not None and steps >= steps_max:
            break
        if epochs is not None and (epochs - epoch) * per_epoch > limit:
            return None
        checks = n_epochs is None or (epoch + 1) % n_epochs == 0
        for idx in range(start, per_epoch):
            total += 1
            if (idx + 1) % accumulate == 0 or idx + 1 == per_epoch:
                steps += 1
            iteration = total - 1 if n_epochs is None else idx
            if checks and (iteration + 1) % every == 0:
                last = steps - 1
            if steps_max is not None and steps >= steps_max:
                return last
        if total > limit:
            return None
        start = 0
        epoch += 1
    return last


def skip_validation_after_batch(trainer: pl.Trainer) -> None:
    """Have Lightning skip the validation it would run after the training batch that is ending.

    For a validation the caller has just run after this batch: Lightning asks for one more when
    a callback asked it to stop in it (``EarlyStopping``), which would validate the same model
    twice and count the second toward ``patience``. Lightning's own flag for a validation done
    already (set when it resumes from a checkpoint written in one) is used.
    """
    loop = trainer.fit_loop.epoch_loop
    if hasattr(loop, "_skip_next_val"):
        loop._skip_next_val = True


@dataclasses.dataclass
class ValidationMetrics:
    """The latest value of every metric a validation inside the fit logged (name to value).

    Lightning puts a new tensor in ``callback_metrics`` for each metric a validation logged and
    leaves the others as they were: a tensor that is not the one there at the validation's start
    was logged by it. A rollback puts these values back (see :func:`put_back_metrics`): what was
    measured of the restored model, or of the model it came from, never of the trial.

    Attributes:
        latest: Metric name to its latest value (detached copies).
        before: ``callback_metrics`` when the running validation started; not saved.
    """

    latest: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    before: dict[str, Any] | None = None

    def start(self, trainer: pl.Trainer) -> None:
        """A validation starts."""
        self.before = dict(trainer.callback_metrics)

    def end(self, trainer: pl.Trainer, ignore: frozenset[str] = frozenset()) -> None:
        """A validation ends: take every metric it logged, but those named in ``ignore``."""
        before, self.before = self.before or {}, None
        for name, value in trainer.callback_metrics.items():
            if isinstance(value, Tensor) and value is not before.get(name) and name not in ignore:
                self.latest[name] = value.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values (loadable with ``weights_only=True``)."""
        return {name: value.cpu() for name, value in self.latest.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.latest = dict(state)
        self.before = None


def put_back_metrics(trainer: pl.Trainer, values: dict[str, Tensor]) -> None:
    """Make ``callback_metrics`` read ``values`` for the validation metrics a rollback undid.

    Every reader from now on gets ``values`` for the metrics named there (keys as in
    ``callback_metrics``, a ``/dataloader_idx_N`` suffix included) until a validation logs them
    anew: checkpoint callbacks, ``EarlyStopping`` and learning-rate schedulers that monitor them,
    the module's hooks. Lightning keeps what a validation logged in a store that outlives it
    (``_LoggerConnector._callback_metrics``), filled before any ``on_validation_end`` runs, and
    refreshes it at each access from the running loop's results while they are valid (a metric
    object reset at the epoch's end, or another dataloader's result, is not): at the end of a
    validation both are set (``_ResultMetric._computed`` for the results), outside one the store;
    the progress bar's own store (``_progress_bar_metrics``) too. The same in Lightning 2.4 to
    2.6. Loggers have written the logged values already and keep them. A metric that only the
    trial's validations logged is left as they logged it: removing it would fail a callback that
    monitors it.

    Args:
        trainer: The trainer.
        values: Metric name to value; a metric not in ``callback_metrics`` now is left out.
    """
    results = trainer._results
    if trainer.validating and results is not None:
        for result in results.values():
            meta = result.meta
            name = meta.name
            if meta.add_dataloader_idx and meta.dataloader_idx is not None:
                name += f"/dataloader_idx_{meta.dataloader_idx}"
            value = values.get(name)
            if value is not None and meta.on_epoch:
                # On the device the metric was logged on (a torchmetrics metric has one too).
                result._computed = value.to(getattr(result.value, "device", value.device))
    connector = trainer._logger_connector
    stored = getattr(connector, "_callback_metrics", None)
    if isinstance(stored, dict):
        for name, value in values.items():
            now = stored.get(name)
            if isinstance(now, Tensor) and now is not value:
                stored[name] = value.to(now.device)
    # The progress bar shows numbers (`prog_bar=True` metrics), kept in a store of their own.
    shown = getattr(connector, "_progress_bar_metrics", None)
    if isinstance(shown, dict):
        for name, value in values.items():
            if name in shown:
                shown[name] = value.item()


def restart_spike_detection(callbacks: list[Any]) -> None:
    """Start the loss reference of Lightning's ``SpikeDetection`` callbacks over.

    An escape's jump, or a rollback's, changes the loss at once: against the running mean of the
    losses before it, ``SpikeDetection`` takes the change for a spike and stops the run. Emptying
    its running mean (``running_mean``, a torchmetrics ``Running`` wrapper, the same in Lightning
    2.4 to 2.6) makes the next loss the start of a new reference: the batch after it is compared
    with the loss after the jump, and spikes are caught from there on as before.
    """
    from lightning.pytorch.callbacks.spike import SpikeDetection

    for callback in callbacks:
        if isinstance(callback, SpikeDetection):
            callback.running_mean.reset()
