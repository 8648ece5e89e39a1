"""Tiny models and reference callbacks shared by the tests (module level, so they pickle)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_escape import StallClassifier, StallDetector

# Lightning 2.4 resumes a checkpoint written at a training batch's end one batch behind: it trains
# that batch again and counts the batches that stepped one short (Lightning issues #18060, #19815);
# later versions make up for it on restart.
RESUMES_AFTER_THE_BATCH = hasattr(_TrainingEpochLoop, "restarted_on_train_batch_end")


class Net(pl.LightningModule):
    """A two-layer MLP on fixed random data, with switches for the setups the monitor must handle.

    Args:
        optimizer: "sgd", "adam" or "adam_fused".
        manual: manual optimization (one optimizer per layer when ``two_optimizers``); its
            ``training_step`` returns no loss unless ``manual_loss``.
        two_optimizers: one optimizer per layer.
        freeze_first: freeze the first layer's weight.
        unused: add a parameter that never gets a gradient.
        n: examples; batch_size: per batch.
    """

    def __init__(
        self,
        optimizer: str = "sgd",
        manual: bool = False,
        two_optimizers: bool = False,
        freeze_first: bool = False,
        unused: bool = False,
        n: int = 64,
        batch_size: int = 16,
        lr: float = 0.05,
        seed: int = 0,
        manual_loss: bool = False,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 1)
        self.unused = nn.Parameter(torch.zeros(3)) if unused else None
        if freeze_first:
            self.l1.weight.requires_grad_(False)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.randn(n, 1, generator=g)
        self.optimizer = optimizer
        self.automatic_optimization = not manual
        self.manual_loss = manual_loss
        self.two_optimizers = two_optimizers
        self.batch_size = batch_size
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        if self.automatic_optimization:
            return loss
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in opts:
            opt.step()
        return loss if self.manual_loss else None

    def _make(self, params: Any) -> torch.optim.Optimizer:
        params = [p for p in params if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr / 10)
        if self.optimizer == "adam_fused":
            return torch.optim.Adam(params, lr=self.lr / 10, fused=True)
        raise ValueError(self.optimizer)

    def configure_optimizers(self) -> Any:
        if self.two_optimizers:
            return [self._make(self.l1.parameters()), self._make(self.l2.parameters())]
        return self._make(self.parameters())

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)


class ReferenceNorms(pl.Callback):
    """Independent reference: float64 gradient norms per optimizer step, computed one tensor at a time.

    ``norms[(step, opt_idx)]`` is the global norm the optimizer saw, divided by the AMP loss scale
    when the optimizer unscales inside ``step()`` (documented behaviour of the monitor).
    """

    def __init__(self) -> None:
        self.norms: dict[tuple[int, int], float] = {}
        self.layers: dict[tuple[int, str], float] = {}
        self.lrs: dict[int, float] = {}
        self.before: dict[str, torch.Tensor] = {}
        self.updates: dict[tuple[int, str], float] = {}
        self.clipped: dict[int, float] = {}
        self._step = 0

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self._step = step
        idx = next(i for i, o in enumerate(trainer.optimizers) if o is optimizer)
        scale = 1.0
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scale = float(scaler.get_scale())
        names = {id(p): n for n, p in pl_module.named_parameters()}
        total = 0.0
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                sq = float(p.grad.double().pow(2).sum()) / scale**2
                total += sq
                self.layers[(step, names[id(p)])] = math.sqrt(sq)
                self.before[names[id(p)]] = p.detach().clone()
        self.norms[(step, idx)] = math.sqrt(total)
        self.lrs[step] = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        step = self._step
        total = 0.0
        for name, p in pl_module.named_parameters():
            if name in self.before:
                diff = (p.detach().double() - self.before[name].double()).norm()
                self.updates[(step, name)] = float(diff / p.detach().double().norm())
            if p.grad is not None:
                total += float(p.grad.double().pow(2).sum())
        self.clipped[step] = math.sqrt(total)
        self.before.clear()


class LeaveTogether(pl.Callback):
    """Spawned DDP processes leave the process group together, at the end of each fit.

    Left to the interpreter's exit, a gloo process group is torn down while the other process may
    still be writing its results; now and then the exiting process then aborts ("terminate called
    without an active exception") after its fit has finished, which fails the test. A barrier and
    an explicit ``destroy_process_group`` (what Lightning already does for NCCL) close it cleanly.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class BatchSizes(pl.Callback):
    """The size of each training batch, in order (the first tensor's first dimension)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self.sizes.append(len(batch[0]))


def forcing_detector(monitor: str | None = None, **kwargs: Any) -> StallDetector:
    """A detector on which every check is a stall: the whole escape loop runs within a few steps.

    ``kwargs`` override its settings (``smoothing``, say).
    """
    settings: dict[str, Any] = {
        "patience": 4,
        "warmup_steps": 0,
        "check_every_n_steps": 2,
        "min_delta_rel": 0.9,
        # A training run moves: without this the stalls forced here would be held off.
        "classifier": StallClassifier(motion=None),
    }
    settings.update(kwargs)
    return StallDetector(monitor=monitor, **settings)


def with_leave_together(callbacks: list[pl.Callback], strategy: Any) -> list[pl.Callback]:
    """``callbacks``, plus :class:`LeaveTogether` last when the strategy spawns DDP processes."""
    if isinstance(strategy, str) and strategy.startswith("ddp"):
        return [*callbacks, LeaveTogether()]
    return callbacks


def digest(module: nn.Module) -> str:
    """A hash of the module's parameters, bit for bit (equal digests: identical replicas)."""
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


class StatesByStep(pl.Callback):
    """The module's state dict after each optimizer step, by step; where it sits in the callback
    list decides what it sees (before or after another callback's ``on_train_batch_end``)."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.by_step[trainer.global_step - 1] = copy.deepcopy(pl_module.state_dict())


class Digests(pl.Callback):
    """The parameters' digest after each optimizer step, by the step's index."""

    def __init__(self) -> None:
        self.by_step: dict[int, str] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.by_step[trainer.global_step - 1] = digest(pl_module)


class RankRecord(pl.Callback):
    """Writes each rank's escapes, parameter digests and input sums per step to ``out``.

    Placed after ``escape``, the digests are those the escape left; the report is
    ``rank{global_rank}.json`` with ``digests``, ``actions`` (action, verdict) and ``inputs``.
    """

    def __init__(self, out: str, escape: Any) -> None:
        self.out = out
        self.escape = escape
        self.digests: list[str] = []
        self.inputs: list[float] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, *args: Any) -> None:
        self.inputs.append(float(batch[0].double().sum()))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.digests.append(digest(pl_module))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        actions = [(e.action, e.verdict) for e in self.escape.events]
        report = {"digests": self.digests, "actions": actions, "inputs": self.inputs}
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def read_ranks(out: str | Path, ranks: int = 2) -> list[dict[str, Any]]:
    """The reports :class:`RankRecord` wrote to ``out``, by rank."""
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]


def fit_two_ranks(
    model: pl.LightningModule, escape: Any, out: str | Path, max_steps: int = 30
) -> list[dict[str, Any]]:
    """Fit ``model`` with ``escape`` on two ``ddp_spawn`` ranks; their :class:`RankRecord` reports."""
    fit(
        model,
        [escape, RankRecord(str(out), escape)],
        max_steps=max_steps,
        strategy="ddp_spawn",
        devices=2,
    )
    return read_ranks(out)


def same_state(a: Any, b: Any) -> bool:
    """Whether two nested states (dicts, lists, tuples of tensors and values) are bit-equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return bool(a == b)


def bare_trainer(max_steps: int, *callbacks: pl.Callback) -> pl.Trainer:
    """A CPU trainer with no logger, checkpoints, progress bar or summary."""
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def fit(
    model: pl.LightningModule, callbacks: list[pl.Callback], **trainer_kwargs: Any
) -> pl.Trainer:
    """Fit on the CPU with everything but the callbacks and the given options switched off."""
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 20,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 5,
    }
    kwargs.update(trainer_kwargs)
    ckpt_path = kwargs.pop("ckpt_path", None)
    callbacks = with_leave_together(callbacks, kwargs.get("strategy"))
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
    """All scalars of the TensorBoard event files in ``logdir``: tag -> step -> value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(logdir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


def inverse_decay(step: int) -> float:
    """A LambdaLR schedule (module level, so it pickles)."""
    return 1.0 / (1.0 + 0.1 * step)


SCHEDULERS = ["none", "StepLR", "CosineAnnealingLR", "OneCycleLR", "LambdaLR", "ReduceLROnPlateau"]


def make_scheduler(name: str, opt: torch.optim.Optimizer, total_steps: int) -> Any:
    """A Lightning scheduler config for ``name`` (see SCHEDULERS), or None."""
    sched = torch.optim.lr_scheduler
    if name == "none":
        return None
    if name == "StepLR":
        return {"scheduler": sched.StepLR(opt, step_size=7, gamma=0.5), "interval": "step"}
    if name == "CosineAnnealingLR":
        return {
            "scheduler": sched.CosineAnnealingLR(opt, T_max=30, eta_min=0.05),
            "interval": "step",
        }
    if name == "OneCycleLR":
        return {
            "scheduler": sched.OneCycleLR(opt, max_lr=1.0, total_steps=total_steps),
            "interval": "step",
        }
    if name == "LambdaLR":
        return {"scheduler": sched.LambdaLR(opt, inverse_decay), "interval": "step"}
    if name == "ReduceLROnPlateau":
        return {
            "scheduler": sched.ReduceLROnPlateau(opt, patience=1, factor=0.5),
            "monitor": "train_loss",
            "interval": "epoch",
        }
    raise ValueError(name)


class Scripted(pl.LightningModule):
    """Returns a scripted loss per optimizer step: ``trace[step]`` plus a zero-gradient term.

    The parameters get exactly zero gradients, so the run itself never changes; only the monitored
    value follows the script. ``rank_offset`` adds ``rank * rank_offset`` on DDP rank ``rank``.
    """

    def __init__(
        self,
        trace: list[float],
        rank_offset: float = 0.0,
        log_name: str | None = None,
        scheduler: str = "none",
    ):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.trace = list(trace)
        self.rank_offset = rank_offset
        self.log_name = log_name
        self.scheduler = scheduler

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        value = self.trace[min(self.global_step, len(self.trace) - 1)]
        value += self.global_rank * self.rank_offset
        out = self.layer(batch[0]).sum() * 0.0 + value
        if self.log_name:
            self.log(self.log_name, value)
        return out

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        config = make_scheduler(self.scheduler, opt, len(self.trace) + 1)
        return opt if config is None else {"optimizer": opt, "lr_scheduler": config}

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)
