"""The weight averages other callbacks keep, saved and restored with a trial (private).

Lightning's :class:`~lightning.pytorch.callbacks.StochasticWeightAveraging` and, from Lightning
2.5, :class:`~lightning.pytorch.callbacks.WeightAveraging` (EMA) keep a running average of the
weights in a copy of the module. An average updated while a trial is on probation takes in the
trial's weights: rolled back, the trial would still be in the model SWA hands back at the end
(an average of 30 epochs, 13 of them from a rolled-back perturbation, in one measured run). So
a trial saves each such average with the training state, and a rollback restores it with the
same exactness.

The averages are read through these callbacks' attributes (``_average_model``, ``n_averaged``,
``_latest_update_epoch``, ``_latest_update_step``), which are not public API: a callback without
them is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

_COUNTERS = ("_latest_update_epoch", "_latest_update_step")


def _average_model(callback: Any) -> nn.Module | None:
    model = getattr(callback, "_average_model", None)
    return model if isinstance(model, nn.Module) else None


def capture_averages(callbacks: Sequence[Any], device: str = "same") -> list[dict[str, Any]]:
    """Copy every weight average kept by ``callbacks``: tensors and plain values.

    Args:
        callbacks: The trainer's callbacks.
        device: ``"same"`` keeps the copies on the averages' devices, ``"cpu"`` on the host.

    Returns:
        One record per callback that keeps an average: its index and type (to find it again),
        the average's state and its counters.

    Example:
        >>> from torch.optim.swa_utils import AveragedModel
        >>> class Averaging:  # what Lightning's averaging callbacks hold
        ...     def __init__(self):
        ...         self._average_model = AveragedModel(torch.nn.Linear(2, 1))
        ...         self._latest_update_step = 3
        >>> [record] = capture_averages([object(), Averaging()])
        >>> record["index"], record["type"], record["counters"]
        (1, 'Averaging', {'_latest_update_step': 3})
    """
    records = []
    for index, callback in enumerate(callbacks):
        model = _average_model(callback)
        if model is None:
            continue
        state = {
            name: _copy(value, device)
            for name, value in model.state_dict().items()
            if isinstance(value, Tensor)
        }
        n_averaged = getattr(callback, "n_averaged", None)
        records.append(
            {
                "index": index,
                "type": type(callback).__name__,
                "model": state,
                "n_averaged": _copy(n_averaged, device) if isinstance(n_averaged, Tensor) else None,
                "counters": {
                    name: getattr(callback, name)
                    for name in _COUNTERS
                    if isinstance(getattr(callback, name, None), int)
                },
            }
        )
    return records


def restore_averages(callbacks: Sequence[Any], records: Sequence[dict[str, Any]]) -> None:
    """Put back what :func:`capture_averages` copied, into the same callbacks' averages.

    A record whose callback is gone, is of another type or has no average any more is skipped.
    """
    for record in records:
        index = record["index"]
        if index >= len(callbacks) or type(callbacks[index]).__name__ != record["type"]:
            continue
        callback = callbacks[index]
        model = _average_model(callback)
        if model is None:
            continue
        with torch.no_grad():
            current = model.state_dict()
            for name, value in record["model"].items():
                if name in current:
                    current[name].copy_(value)
            n_averaged = getattr(callback, "n_averaged", None)
            saved = record["n_averaged"]
            if isinstance(n_averaged, Tensor) and saved is not None:
                n_averaged.copy_(saved)
        for name, value in record["counters"].items():
            setattr(callback, name, value)


def _copy(tensor: Tensor, device: str) -> Tensor:
    copied = tensor.detach().clone()
    return copied.cpu() if device == "cpu" else copied
