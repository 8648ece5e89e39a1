"""Reading an optimizer's gradients every step, cheaply (private; shared by the callbacks)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor
from torch.optim import Optimizer

from lightning_escape._lightning import amp_grad_scale, param_names
from lightning_escape.signals import foreach_norms, total_norm

__all__ = ["GradReader", "StepNorms"]


class GradReader:
    """The gradients of an optimizer's parameters, its parameter list cached between steps.

    Walking ``param_groups`` costs little, but it runs every optimizer step: the flat parameter list
    is kept per optimizer and rebuilt only when the groups change (a finetuning callback adding a
    group, say). Frozen parameters and parameters without a gradient this step are skipped.
    Sparse gradients (``nn.Embedding(sparse=True)``) are read like the others: every statistic here
    is a norm, which :func:`~lightning_escape.signals.foreach_norms` takes of the dense gradient
    they stand for.
    """

    def __init__(self, foreach: bool | None = None) -> None:
        self.foreach = foreach
        self._cache: dict[int, tuple[tuple[int, ...], list[Tensor]]] = {}  # by id(optimizer)
        self._names: dict[int, str] = {}
        self._sharded = False
        self._scaler: Any = None

    def attach(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """Start a fit: forget every cached list; read the parameter names and the precision."""
        self._cache = {}
        self._names = param_names(module)
        self._sharded = isinstance(trainer.strategy, FSDPStrategy)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None

    def clear(self) -> None:
        """Hold on to no parameter (the end of a fit)."""
        self._cache = {}
        self._names = {}
        self._scaler = None

    def _params(self, optimizer: Optimizer) -> list[Tensor]:
        groups = optimizer.param_groups
        key = tuple(len(g["params"]) for g in groups)
        cached = self._cache.get(id(optimizer))
        if cached is None or cached[0] != key:
            cached = (key, [p for g in groups for p in g["params"]])
            self._cache[id(optimizer)] = cached
        return cached[1]

    def grads(self, optimizer: Optimizer) -> list[Tensor]:
        """This step's gradients of ``optimizer``'s parameters."""
        return [g for p in self._params(optimizer) if (g := p.grad) is not None]

    def norms(self, optimizer: Optimizer) -> list[Tensor]:
        """Per-tensor norms of this step's gradients: the every-step path.

        :func:`~lightning_escape.signals.foreach_norms` makes it one fused launch when the
        gradients share a device and a dtype, as they usually do.
        """
        return foreach_norms(self.grads(optimizer), foreach=self.foreach)

    def named(
        self, optimizer: Optimizer, opt_idx: int
    ) -> tuple[list[str], list[Tensor], list[Tensor]]:
        """Names, parameters and gradients, for the steps that log per-parameter statistics."""
        names, params, grads = [], [], []
        for g_idx, group in enumerate(optimizer.param_groups):
            for p_idx, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                names.append(
                    self._names.get(id(p), f"optimizer{opt_idx}.group{g_idx}.param{p_idx}")
                )
                params.append(p)
                grads.append(grad)
        return names, params, grads

    def scale(self, trainer: pl.Trainer, optimizer: Optimizer) -> Tensor | None:
        """The loss scale ``optimizer``'s gradients still carry (fused AMP optimizers), or None."""
        return None if self._scaler is None else amp_grad_scale(trainer, optimizer)

    def reduce_total(self, trainer: pl.Trainer, total: Tensor) -> Tensor:
        """Combine per-process norms of gradient shards (FSDP); elsewhere ``total`` as it is.

        A collective under FSDP: call it on every process alike.
        """
        if not self._sharded:
            return total
        squared = trainer.strategy.reduce(total.square(), reduce_op="sum")
        return torch.as_tensor(squared).sqrt()


class StepNorms:
    """Gradient norms of every optimizer step, kept on the device, combined only when read.

    :meth:`add` is an append of norms a fused launch computed; nothing is read back to the host.
    :meth:`pop` turns what was recorded since the last call into one total norm per step (the
    records of one step, one per optimizer, add in squares), divided by the loss scale a record
    carries.

    Example:
        >>> norms = StepNorms()
        >>> norms.add(0, [torch.tensor(5.0)])
        >>> norms.add(1, [torch.tensor(1.0)], scale=torch.tensor(2.0))
        >>> [(step, total.item()) for step, total in norms.pop()]
        [(0, 5.0), (1, 0.5)]
    """

    def __init__(self) -> None:
        self._records: list[tuple[int, list[Tensor], Tensor | None]] = []

    def add(self, step: int, norms: list[Tensor], scale: Tensor | None = None) -> None:
        """Add per-tensor norms computed elsewhere (a monitor's) to step ``step``."""
        if norms:
            self._records.append((step, norms, scale))

    def pop(self) -> list[tuple[int, Tensor]]:
        """Total norm per recorded step, in order, as device tensors; forgets the records."""
        totals = self.totals()
        self._records = []
        return totals

    def totals(self) -> list[tuple[int, Tensor]]:
        """Total norm per recorded step, in order, as device tensors (the records stay)."""
        squares: dict[int, Tensor] = {}
        for step, norms, scale in self._records:
            total = total_norm(norms)
            if scale is not None:
                total = total / scale
            sq = total.square()
            squares[step] = sq if step not in squares else squares[step] + sq
        return [(step, sq.sqrt()) for step, sq in squares.items()]

    def clear(self) -> None:
        """Forget every record."""
        self._records = []
