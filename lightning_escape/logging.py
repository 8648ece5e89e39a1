"""One logging layer for every lightning_escape callback.

TensorBoard is first-class: scalars, histograms, text events and a custom-scalars layout that groups
the tags. The tags sort into four groups, what a person looks for first first: ``stall/`` (the
detector's view and its diagnoses), ``escape/`` (escapes, probation, verdicts; only a callback that
escapes writes them), ``grad/`` (global gradient statistics and the learning rate) and
``grad_layer/`` (per parameter). Any other Lightning logger (``CSVLogger``, ``WandbLogger``, ...) receives
the scalars through its ``log_metrics``. Without a logger nothing is written and nothing fails, and
only the global rank zero ever writes.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor

__all__ = [
    "ESCAPE",
    "GRAD",
    "GRAD_LAYER",
    "PROGRESS_BAR_FIELDS",
    "STALL",
    "EscapeLogger",
    "Layout",
    "describe_facts",
    "progress_bar",
    "to_host",
]

STALL = "stall"
ESCAPE = "escape"
GRAD = "grad"
GRAD_LAYER = "grad_layer"
# The fields the callbacks show in the progress bar (see `progress_bar`): never sent to a logger.
PROGRESS_BAR_FIELDS = frozenset({"stall", "probation"})
# The order of the custom-scalars categories, whichever callback writes its charts first.
_ORDER = (STALL, ESCAPE, GRAD)

# A custom-scalars layout: {category: {chart title: ["Multiline" | "Margin", [tag regexes]]}}.
Layout = Mapping[str, Mapping[str, Sequence[Any]]]

# The layout written so far to each SummaryWriter. Several callbacks add their charts to one
# writer; TensorBoard shows the layout event written last, so each write carries all of them.
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, list[Any]]]] = (
    weakref.WeakKeyDictionary()
)


def to_host(values: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Read a mapping of 0-d tensors back to Python floats with one device synchronisation.

    Args:
        values: Names to 0-d tensors (any devices) or floats.

    Returns:
        Names to floats, in the same order.

    Example:
        >>> to_host({"a": torch.tensor(1.5), "b": 2})
        {'a': 1.5, 'b': 2.0}
    """
    tensors = {k: v for k, v in values.items() if isinstance(v, Tensor)}
    host: dict[str, float] = {}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack(
            [t.detach().to(device, torch.float64, non_blocking=True) for t in tensors.values()]
        )
        host = dict(zip(tensors, stacked.tolist()))
    return {k: host[k] if k in host else float(v) for k, v in values.items()}


class EscapeLogger:
    """Writes ``escape/`` scalars, histograms, text and layouts to a trainer's loggers.

    Args:
        trainer: The running trainer; its loggers are looked up on every call, so loggers added
            after construction are honoured.

    Example:
        >>> import lightning.pytorch as pl
        >>> log = EscapeLogger(pl.Trainer(logger=False, enable_progress_bar=False))
        >>> log.enabled
        False
        >>> log.scalars({"grad/norm": 1.0}, step=0)  # no logger: nothing happens
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self._trainer = trainer

    @property
    def loggers(self) -> list[Logger]:
        """The trainer's loggers on global rank zero, and none on the other ranks."""
        if not self._trainer.is_global_zero:
            return []
        return list(self._trainer.loggers)

    @property
    def enabled(self) -> bool:
        """Whether anything would be written: on rank zero, with at least one logger."""
        return bool(self.loggers)

    @property
    def writers(self) -> list[Any]:
        """The TensorBoard ``SummaryWriter`` of each TensorBoard logger (created on first use)."""
        return [lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)]

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalars to every logger.

        Args:
            metrics: Tag to value; tags should start with ``escape/``.
            step: The x-axis value (the optimizer step).
        """
        if not metrics:
            return
        for lg in self.loggers:
            lg.log_metrics(dict(metrics), step=step)

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        """Log a histogram of ``values`` to every TensorBoard logger (others have no histograms)."""
        writers = self.writers
        if not writers:
            return
        data = values.detach().float().flatten().cpu()
        for w in writers:
            w.add_histogram(tag, data, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Log a markdown text event to every TensorBoard logger."""
        for w in self.writers:
            w.add_text(tag, text, step)

    def layout(self, charts: Layout) -> None:
        """Add charts to the custom-scalars layout of every TensorBoard logger.

        Args:
            charts: ``{category: {title: ["Multiline", [tag regex, ...]]}}``, as
                ``SummaryWriter.add_custom_scalars`` takes it. Categories from several callbacks
                are merged, and the whole layout is written again.
        """
        for w in self.writers:
            merged = _LAYOUTS.setdefault(w, {})
            for category, entries in charts.items():
                merged.setdefault(category, {}).update(
                    {title: list(spec) for title, spec in entries.items()}
                )
            rank = {name: i for i, name in enumerate(_ORDER)}
            ordered = dict(sorted(merged.items(), key=lambda kv: rank.get(kv[0], len(rank))))
            w.add_custom_scalars(ordered)

    def flush(self) -> None:
        """Flush every TensorBoard writer, so that event files can be read back."""
        for w in self.writers:
            w.flush()


def progress_bar(module: pl.LightningModule, name: str, value: float) -> None:
    """Show ``name`` in Lightning's progress bar (not sent to the loggers)."""
    module.log(name, float(value), prog_bar=True, logger=False, on_step=True, on_epoch=False)


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def describe_facts(facts: Mapping[str, Any]) -> str:
    r"""One paragraph from the facts of a run (see :meth:`EscapeCallback.summary`).

    Example:
        >>> facts = {"stalls": {"saddle": 1}, "escapes": {"Perturb": {"accepted": 1}}, "steps": 900,
        ...          "kept": 1, "rolled_back": 0, "probation_steps": 200, "wasted_steps": 0,
        ...          "log_dir": None}
        >>> print(describe_facts(facts).replace("; ", ";\n"))
        1 stall in 900 steps (saddle 1);
        1 escape (Perturb: 1 kept);
        200 steps on probation, 0 wasted in rollbacks. No logger: nothing was written.
    """
    stalls = facts["stalls"]
    n = sum(stalls.values())
    text = f"{n} stall{'' if n == 1 else 's'} in {facts['steps']} steps"
    text += f" ({_counts(stalls)})" if n else ""
    held = facts.get("held_off", 0)
    if held:
        text += f", {held} more held off (the parameters were still moving)"
    improving = facts.get("held_off_training", 0)
    if improving:
        text += f", {improving} more held off (the training loss still improved)"
    escapes = facts.get("escapes")
    if escapes is not None:
        total = sum(sum(c.values()) for c in escapes.values())
        if total:
            words = {
                "accepted": "kept",
                "neutral": "kept without effect",
                "rolled_back": "rolled back",
                "pending": "pending",
            }
            parts = [
                f"{name}: " + ", ".join(f"{c} {words.get(v, v)}" for v, c in counts.items())
                for name, counts in escapes.items()
            ]
            text += f"; {total} escape{'' if total == 1 else 's'} ({'; '.join(parts)}); "
            text += (
                f"{facts['probation_steps']} steps on probation, {facts['wasted_steps']} wasted "
                "in rollbacks"
            )
        else:
            text += "; nothing escaped"
    if facts.get("per_coordinate_steps"):
        # Said at the end of every fit: the update rule is no longer the user's alone.
        text += (
            ". The optimizers keep the per-coordinate step sizes a kept escape gave them (in their "
            "state: a run resumed from this fit's checkpoints keeps them with EscapeCallback only)"
        )
    where = facts.get("log_dir")
    text += f". Logs: {where}" if where else ". No logger: nothing was written"
    return text + "."
