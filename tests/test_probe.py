from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from references import explicit_hessian
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric, MeanSquaredError, Metric

from lightning_escape.probe import (
    ProbeUnavailable,
    evaluate_loss,
    loss_from_training_step,
    preserved,
    probe_curvature,
    probe_direction,
)


class Net(pl.LightningModule):
    """Dropout, BatchNorm, logging and two metrics in `training_step`: everything a probe upsets."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 1)
        )
        self.train_mean = MeanMetric()
        self.train_mse = MeanSquaredError()
        self.val_mse = MeanSquaredError()

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).squeeze(-1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        pred = self(x)
        loss = F.mse_loss(pred, y)
        self.train_mean.update(loss)
        self.train_mse(pred, y)
        self.log("train_loss", loss)
        self.log("train_mean", self.train_mean, on_step=False, on_epoch=True)
        self.log_dict({"train_mse": self.train_mse})
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_mse(self(x), y)
        self.log("val_mse", self.val_mse)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, torch.sin(x.sum(dim=1)) + 0.1 * torch.randn(n, generator=g))


def _batch(n: int = 16, seed: int = 1) -> tuple[Tensor, Tensor]:
    x, y = _data(n, seed=seed).tensors
    return x, y


def _mse(module: pl.LightningModule, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.mse_loss(module(x), y)


def _metric_state(metric: Metric) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name in metric._defaults:
        value = getattr(metric, name)
        state[name] = (
            [v.clone() for v in value] if isinstance(value, list) else (value, value.clone())
        )
    for name in ("_update_count", "_computed", "_forward_cache"):
        value = getattr(metric, name)
        state[name] = value.clone() if isinstance(value, Tensor) else value
    return state


def _snapshot(module: nn.Module) -> dict[str, Any]:
    return {
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
        "grads": {
            n: (p.grad, None if p.grad is None else p.grad.clone())
            for n, p in module.named_parameters()
        },
        "buffers": {n: (b, b.clone()) for n, b in module.named_buffers()},
        "training": {n: m.training for n, m in module.named_modules()},
        "metrics": {
            n: _metric_state(m) for n, m in module.named_modules() if isinstance(m, Metric)
        },
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),  # noqa: NPY002
        "log": ("log" in module.__dict__, "log_dict" in module.__dict__),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return bool(np.array_equal(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _assert_untouched(before: dict[str, Any], module: nn.Module) -> None:
    after = _snapshot(module)
    for key in before:
        assert _same(before[key], after[key]), f"{key} changed"
    # The very same tensor objects, not only equal values.
    for n, p in module.named_parameters():
        assert p.grad is before["grads"][n][0], f"grad of {n} replaced"
    for n, b in module.named_buffers():
        assert b is before["buffers"][n][0], f"buffer {n} replaced"


def _trained_net() -> Net:
    """A Net with grads, BN statistics and metric states that are not defaults."""
    torch.manual_seed(0)
    net = Net()
    net.train()
    batch = _batch()
    loss = _mse(net, batch)
    loss.backward()
    net.train_mean.update(loss.detach())
    net.train_mse(net(batch[0]).detach(), batch[1])
    return net


@pytest.mark.parametrize("use_loss_fn", [False, True], ids=["training_step", "loss_fn"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_probe_leaves_everything_untouched(use_loss_fn: bool, mode: str) -> None:
    net = _trained_net()
    net.train(mode == "train")
    net.body[1].training = False  # mixed flags must come back as they were, one by one
    before = _snapshot(net)
    spec = probe_curvature(net, _batch(), loss_fn=_mse if use_loss_fn else None, steps=8)
    assert spec.iterations > 0
    _assert_untouched(before, net)
    evaluate_loss(net, _batch(), loss_fn=_mse if use_loss_fn else None)
    _assert_untouched(before, net)


def test_preserved_restores_after_an_exception() -> None:
    net = _trained_net()
    before = _snapshot(net)

    def meddle() -> None:
        with preserved(net, seed=3):
            net.eval()
            net.body[1].running_mean = torch.ones(12)  # replaced, not only written
            net(_batch()[0]).sum().backward()
            net.train_mean.reset()  # clears, and replaces the tensor states
            net.train_mse.update(torch.ones(3), torch.zeros(3))
            net.log("anything", 1.0)  # swallowed
            random.random()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        meddle()
    _assert_untouched(before, net)


def test_probe_is_deterministic_and_seed_dependent() -> None:
    net = _trained_net()
    first = probe_curvature(net, _batch(), steps=10, seed=7)
    second = probe_curvature(net, _batch(), steps=10, seed=7)
    other = probe_curvature(net, _batch(), steps=10, seed=8)
    assert first == second
    assert other != first  # another dropout mask, another start vector
    assert evaluate_loss(net, _batch(), seed=7) == first.loss
    assert evaluate_loss(net, _batch(), seed=7) == evaluate_loss(net, _batch(), seed=7)


def test_probe_direction_measures_the_probe_direction_on_another_batch() -> None:
    net = _trained_net().double()
    net.eval()
    batch = tuple(t.double() for t in _batch())
    other = tuple(t.double() for t in _batch(seed=2))
    before = _snapshot(net)
    spec = probe_curvature(net, batch, steps=40)
    # On its own batch the direction's curvature is the probe's eigenvalue...
    same, loss = probe_direction(net, batch, spec.eigvec_min)
    assert same == pytest.approx(spec.lambda_min, rel=1e-6)
    assert loss == spec.loss
    # ...on another batch, the Rayleigh quotient of that batch's Hessian.
    params = [p for p in net.parameters() if p.requires_grad]
    hess = explicit_hessian(lambda: _mse(net, other), params)  # type: ignore[arg-type]
    v = torch.cat([t.reshape(-1) for t in spec.eigvec_min])
    measured, other_loss = probe_direction(net, other, spec.eigvec_min, method="finite_difference")
    assert measured == pytest.approx(float(v @ hess @ v), rel=1e-4)
    assert other_loss == pytest.approx(float(_mse(net, other).detach()), rel=1e-12)
    _assert_untouched(before, net)


def test_probe_matches_explicit_hessian_in_eval_mode() -> None:
    net = _trained_net().double()
    net.eval()
    batch = tuple(t.double() for t in _batch())
    params = [p for p in net.parameters() if p.requires_grad]
    hess = explicit_hessian(lambda: _mse(net, batch), params)  # type: ignore[arg-type]
    evals = torch.linalg.eigvalsh(hess)
    spec = probe_curvature(net, batch, steps=len(evals))
    assert spec.lambda_max == pytest.approx(float(evals[-1]), rel=1e-6)
    assert spec.lambda_min == pytest.approx(float(evals[0]), rel=1e-6)


def test_probe_runs_under_no_grad_and_inference_mode() -> None:
    net = _trained_net()
    with torch.no_grad():
        under_no_grad = probe_curvature(net, _batch(), steps=5)
    with torch.inference_mode():
        frozen_batch = tuple(t.clone() for t in _batch())  # inference tensors
        under_inference = probe_curvature(net, frozen_batch, steps=5)
        assert torch.is_inference_mode_enabled()
    assert under_no_grad == under_inference == probe_curvature(net, _batch(), steps=5)


def test_probe_uses_only_trainable_parameters() -> None:
    net = _trained_net()
    net.body[0].requires_grad_(False)
    spec = probe_curvature(net, _batch(), steps=5)
    assert spec.dim == sum(p.numel() for p in net.parameters() if p.requires_grad) == 12 * 2 + 13


class Manual(Net):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        loss = _mse(self, batch)
        opt.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]
        return loss


def test_manual_optimization_needs_loss_fn() -> None:
    net = Manual()
    with pytest.raises(ProbeUnavailable, match=r"manual optimization.*loss_fn"):
        probe_curvature(net, _batch())
    with pytest.raises(ProbeUnavailable, match="manual optimization"):
        evaluate_loss(net, _batch())
    spec = probe_curvature(net, _batch(), loss_fn=_mse, steps=5)
    assert spec.iterations == 5


class Returns(Net):
    def __init__(self, output: Callable[[Tensor], Any]) -> None:
        super().__init__()
        self.output = output

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        return self.output(_mse(self, batch))


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (lambda loss: None, "returned no loss"),
        (lambda loss: {"other": loss}, "returned no loss"),
        (lambda loss: {"loss": loss.detach()}, "does not require grad"),
        (lambda loss: loss.expand(3), r"scalar floating-point loss, got shape \(3,\)"),
        (lambda loss: loss * torch.nan, "not finite"),
    ],
    ids=["none", "mapping_without_loss", "detached", "vector", "nan"],
)
def test_unusable_loss_raises_probe_unavailable(
    output: Callable[[Tensor], Any], message: str
) -> None:
    net = Returns(output)
    before = _snapshot(net)
    with pytest.raises(ProbeUnavailable, match=message):
        probe_curvature(net, _batch(), steps=3)
    _assert_untouched(before, net)


def test_loss_from_training_step_accepts_tensor_mapping_and_no_batch_idx() -> None:
    assert isinstance(
        loss_from_training_step(Returns(lambda loss: {"loss": loss}), _batch(), 0), Tensor
    )

    class NoIndex(Net):
        def training_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:  # type: ignore[override]
            return _mse(self, batch)

    with preserved(NoIndex(), seed=0):
        assert isinstance(loss_from_training_step(NoIndex(), _batch(), 5), Tensor)


def test_frozen_module_raises_probe_unavailable() -> None:
    net = Net().requires_grad_(False)
    with pytest.raises(ProbeUnavailable, match="no parameter that requires grad"):
        probe_curvature(net, _batch())


BAD_ARGUMENTS = [
    ({"steps": 0}, "`steps` must be a positive integer, got 0"),
    ({"seed": -1}, r"`seed` must be an integer in \[0, 2\*\*64\), got -1"),
    ({"seed": 1.5}, r"`seed` must be an integer in \[0, 2\*\*64\), got 1.5"),
    ({"batch_idx": -2}, "`batch_idx` must be a non-negative integer, got -2"),
    ({"tol": -1.0}, "`tol` must be a finite non-negative number, got -1.0"),
    ({"loss_fn": 3}, "`loss_fn` must be callable or None, got 3"),
    ({"reduce": "mean"}, "`reduce` must be callable or None, got 'mean'"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    net = _trained_net()
    before = _snapshot(net)
    with pytest.raises(ValueError, match=message):
        probe_curvature(net, _batch(), **kwargs)
    if "steps" not in kwargs and "tol" not in kwargs:
        with pytest.raises(ValueError, match=message):
            evaluate_loss(net, _batch(), **kwargs)
    _assert_untouched(before, net)


def test_plain_module_needs_loss_fn() -> None:
    plain = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"`module` must be a LightningModule .* got Linear"):
        probe_curvature(plain, torch.ones(1, 2))  # type: ignore[arg-type]
    spec = probe_curvature(plain, torch.ones(1, 2), loss_fn=lambda m, b: m(b).pow(2).sum())  # type: ignore[arg-type]
    assert spec.dim == 3
    with (
        pytest.raises(ValueError, match=r"`seed` must be an integer .* got 'x'"),
        preserved(
            plain,
            seed="x",  # type: ignore[arg-type]
        ),
    ):
        pass


# --- Inside a real Trainer.fit ---------------------------------------------------------------


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.history.append((step, dict(metrics)))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


class Probe(pl.Callback):
    """Probe from `on_train_batch_end` (grad mode) and `on_validation_epoch_end` (no_grad)."""

    def __init__(self, protected: bool = True) -> None:
        self.protected = protected
        self.batch: Any = None
        self.spectra: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batch = batch

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.protected:
            pl_module.training_step(batch, batch_idx)  # what the probe must not do
            return
        before = _snapshot(pl_module)
        self.spectra.append(probe_curvature(pl_module, batch, steps=6, seed=batch_idx).lambda_min)
        evaluate_loss(pl_module, batch)
        _assert_untouched(before, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.batch is not None and self.protected:
            assert not torch.is_grad_enabled()
            before = _snapshot(pl_module)
            self.spectra.append(probe_curvature(pl_module, self.batch, steps=6).lambda_min)
            _assert_untouched(before, pl_module)


def _fit(callbacks: list[pl.Callback]) -> tuple[Net, MemoryLogger, dict[str, Tensor]]:
    pl.seed_everything(0, verbose=False)
    net = Net()
    logger = MemoryLogger()
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=2,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Shuffling draws from the global RNG each epoch: a probe that leaked RNG state would
    # change the second epoch's batches.
    trainer.fit(
        net,
        DataLoader(_data(), batch_size=8, shuffle=True),
        DataLoader(_data(16, seed=2), batch_size=8),
    )
    return net, logger, dict(trainer.callback_metrics)


def _assert_same_run(
    a: tuple[Net, MemoryLogger, dict[str, Tensor]], b: tuple[Net, MemoryLogger, dict[str, Tensor]]
) -> None:
    for (name, p), q in zip(a[0].state_dict().items(), b[0].state_dict().values(), strict=True):
        assert torch.equal(p, q), f"{name} differs"
    assert a[1].history == b[1].history
    assert a[2].keys() == b[2].keys()
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_probe_inside_fit_changes_nothing() -> None:
    baseline = _fit([])
    probe = Probe()
    probed = _fit([probe])
    assert (
        len(probe.spectra) == 2 * 4 + 2
    )  # every batch, and each epoch end (none in the sanity check: no batch yet)
    assert {"train_loss", "train_mean", "train_mse", "val_mse"} <= baseline[2].keys()
    assert any("train_loss" in metrics for _, metrics in baseline[1].history)
    _assert_same_run(baseline, probed)
    # The comparison has teeth: calling `training_step` bare from the hook changes the run.
    with pytest.raises(AssertionError):
        _assert_same_run(baseline, _fit([Probe(protected=False)]))
