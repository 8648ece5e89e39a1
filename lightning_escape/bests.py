"""The best values other judges of a metric keep, put back by a rollback (private).

Lightning's :class:`~lightning.pytorch.callbacks.EarlyStopping` (``best_score``) and torch's
:class:`~torch.optim.lr_scheduler.ReduceLROnPlateau` (``best``) keep the best value of the
metric they watch and count the checks since it. A validation during a trial measures the
trial's model: when it sets their best, a rollback would leave them comparing the model training
goes on with to a value only a discarded model had (a scheduler that halved the learning rate
twice in 12 epochs, measured beside a rolled-back perturbation whose validation loss was 1.37
against the restored model's 2.14; without escapes it never cut). A rollback puts their best
back as it was when the trial started. Their counts stand where the checks during the trial
left them: those checks took time, as the trial's steps did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau


def _stoppers(callbacks: Sequence[Any]) -> list[tuple[int, Any]]:
    from lightning.pytorch.callbacks import EarlyStopping

    return [
        (index, callback)
        for index, callback in enumerate(callbacks)
        if isinstance(callback, EarlyStopping) and isinstance(callback.best_score, Tensor)
    ]


def capture_bests(callbacks: Sequence[Any]) -> list[tuple[int, Tensor]]:
    """The ``best_score`` of each ``EarlyStopping`` among ``callbacks``, with its position.

    Example:
        >>> from lightning.pytorch.callbacks import EarlyStopping
        >>> stop = EarlyStopping(monitor="val_loss")
        >>> [(index, float(best)) for index, best in capture_bests([object(), stop])]
        [(1, inf)]
    """
    return [
        (index, callback.best_score.detach().clone()) for index, callback in _stoppers(callbacks)
    ]


def restore_bests(callbacks: Sequence[Any], saved: Sequence[tuple[int, Tensor]]) -> None:
    """Put the bests of :func:`capture_bests` back; a callback that is gone is skipped.

    Example:
        >>> from lightning.pytorch.callbacks import EarlyStopping
        >>> stop = EarlyStopping(monitor="val_loss")
        >>> saved = capture_bests([stop])
        >>> stop.best_score = stop.best_score.new_tensor(0.5)
        >>> restore_bests([stop], saved)
        >>> float(stop.best_score)
        inf
    """
    stoppers = dict(_stoppers(callbacks))
    for index, best in saved:
        if index in stoppers:
            stoppers[index].best_score = best.to(stoppers[index].best_score.device)


def restore_plateau_best(scheduler: Any, state: dict[str, Any]) -> None:
    """Put a ``ReduceLROnPlateau``'s best back as ``state`` (its ``state_dict()``) holds it.

    Any other scheduler is left as it is.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> plateau = ReduceLROnPlateau(opt)
        >>> state = plateau.state_dict()
        >>> plateau.step(1.0)
        >>> restore_plateau_best(plateau, state)
        >>> plateau.best, plateau.last_epoch
        (inf, 1)
    """
    if isinstance(scheduler, ReduceLROnPlateau) and "best" in state:
        scheduler.best = state["best"]
