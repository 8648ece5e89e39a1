"""The weight averages other callbacks keep, saved and restored with a trial (private).

Lightning's :class:`~lightning.pytorch.callbacks.StochasticWeightAveraging` and, from Lightning
2.5, :class:`~lightning.pytorch.callbacks.WeightAveraging` (EMA) keep a running average of the
weights in a copy of the module. An average updated while a trial is on probation takes in the
trial's weights: rolled back, the trial would still be in the model SWA hands back at the end
(an average of 30 epochs, 13 of them from a rolled-back perturbation, in one measured run). So
a trial saves each such average with the training state, as a
:class:`~lightning_escape.snapshot.TrainingSnapshot` of the averaged module, and a rollback
restores it with the same exactness.

The averages are read through these callbacks' attributes (``_average_model``, ``n_averaged``,
``_latest_update_epoch``, ``_latest_update_step``), which are not public API: a callback without
them is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_escape.snapshot import SnapshotDevice, TrainingSnapshot

_COUNTERS = ("_latest_update_epoch", "_latest_update_step")


@dataclass
class SavedAverage:
    """One callback's weight average, as it was when a trial started.

    Attributes:
        index: The callback's position in the trainer's callbacks (to find it again).
        kind: The callback's class name (a callback of another kind there is not it).
        model: The averaged module's parameters and buffers.
        n_averaged: The callback's own count of averaged models, where it keeps one outside the
            module (SWA; an ``AveragedModel`` keeps it as a buffer, in ``model``).
        counters: The callback's last update epoch or step, which decide its next update.
    """

    index: int
    kind: str
    model: TrainingSnapshot
    n_averaged: Tensor | None
    counters: dict[str, int]

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values (loadable with ``weights_only=True``)."""
        return {
            "index": self.index,
            "kind": self.kind,
            "model": self.model.state_dict(),
            "n_averaged": self.n_averaged,
            "counters": dict(self.counters),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SavedAverage:
        """Inverse of :meth:`state_dict`."""
        return cls(
            index=int(state["index"]),
            kind=state["kind"],
            model=TrainingSnapshot.from_state_dict(state["model"]),
            n_averaged=state["n_averaged"],
            counters=dict(state["counters"]),
        )


def _average_model(callback: Any) -> nn.Module | None:
    model = getattr(callback, "_average_model", None)
    return model if isinstance(model, nn.Module) else None


def capture_averages(
    callbacks: Sequence[Any], device: SnapshotDevice = "same"
) -> list[SavedAverage]:
    """Save every weight average kept by ``callbacks``.

    Args:
        callbacks: The trainer's callbacks.
        device: ``"same"`` keeps the copies on the averages' devices, ``"cpu"`` on the host.

    Returns:
        One record per callback that keeps an average.

    Example:
        >>> from torch.optim.swa_utils import AveragedModel
        >>> class Averaging:  # what Lightning's averaging callbacks hold
        ...     def __init__(self):
        ...         self._average_model = AveragedModel(torch.nn.Linear(2, 1))
        ...         self._latest_update_step = 3
        >>> [saved] = capture_averages([object(), Averaging()])
        >>> saved.index, saved.kind, saved.counters
        (1, 'Averaging', {'_latest_update_step': 3})
    """
    records = []
    for index, callback in enumerate(callbacks):
        model = _average_model(callback)
        if model is None:
            continue
        n_averaged = getattr(callback, "n_averaged", None)
        if isinstance(n_averaged, Tensor):
            n_averaged = n_averaged.detach().clone()
            n_averaged = n_averaged.cpu() if device == "cpu" else n_averaged
        records.append(
            SavedAverage(
                index=index,
                kind=type(callback).__name__,
                model=TrainingSnapshot.capture(model, device=device),
                n_averaged=n_averaged if isinstance(n_averaged, Tensor) else None,
                counters={
                    name: getattr(callback, name)
                    for name in _COUNTERS
                    if isinstance(getattr(callback, name, None), int)
                },
            )
        )
    return records


def restore_averages(callbacks: Sequence[Any], saved: Sequence[SavedAverage]) -> None:
    """Put the averages of :func:`capture_averages` back into the same callbacks.

    A record whose callback is gone, is of another kind, or whose average has no longer the
    structure it had (the snapshot refuses it before writing anything) is skipped.
    """
    for record in saved:
        index = record.index
        if index >= len(callbacks) or type(callbacks[index]).__name__ != record.kind:
            continue
        callback = callbacks[index]
        model = _average_model(callback)
        if model is None:
            continue
        try:
            record.model.restore(model)
        except ValueError:
            continue
        n_averaged = getattr(callback, "n_averaged", None)
        if isinstance(n_averaged, Tensor) and record.n_averaged is not None:
            with torch.no_grad():
                n_averaged.copy_(record.n_averaged)
        for name, value in record.counters.items():
            setattr(callback, name, value)
