"""What the callbacks hold, measured as live tensor storage (every tensor the process can reach).

The unit is one copy of the training state: the parameters and Adam's two moments. A trial on
probation may hold one copy (its snapshot), two with a guard; nothing is held after fit; the
curvature probe peaks at about ``lanczos_steps + 7`` parameter-sized vectors.
"""

from __future__ import annotations

import gc
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from models import fit
from torch import nn

from lightning_escape import (
    EscapeCallback,
    NegativeCurvatureStep,
    Perturb,
    StallDetector,
    curvature,
)
from lightning_escape.policy import ESCAPABLE
from lightning_escape.probe import probe_curvature


def _storages() -> dict[int, int]:
    """Every live tensor storage: data pointer -> bytes."""
    gc.collect()
    live: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            try:
                storage = obj.untyped_storage()
                pointer, size = storage.data_ptr(), storage.nbytes()
            except (RuntimeError, NotImplementedError):
                continue  # tensors without data (fake or meta ones left by torch.compile)
            if size:
                live[pointer] = size
    return live


class Wide(pl.LightningModule):
    """About 300k parameters against a small batch: parameter-sized tensors dominate."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 1)
        )
        self.x = torch.randn(64, 64, generator=g)
        self.y = torch.randn(64, 1, generator=g)

    def loss(self, batch: Any) -> torch.Tensor:
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> Any:
        data = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(data, batch_size=16)

    def state_bytes(self) -> int:
        return 3 * sum(p.numel() * p.element_size() for p in self.parameters())


class Measure(pl.Callback):
    """Live storage beyond the training state itself (parameters, gradients, Adam's moments)."""

    def __init__(self, escape: EscapeCallback, steps: set[int]) -> None:
        self.escape, self.steps = escape, steps
        self.extra: dict[int, tuple[float, bool]] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step not in self.steps:
            return
        training = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}
        training |= {
            p.grad.untyped_storage().data_ptr()
            for p in pl_module.parameters()
            if p.grad is not None
        }
        for state in trainer.optimizers[0].state.values():
            training |= {v.untyped_storage().data_ptr() for v in state.values() if v.dim()}
        extra = sum(n for ptr, n in _storages().items() if ptr not in training)
        on_trial = self.escape.engine.trial is not None
        self.extra[trainer.global_step] = (extra / pl_module.state_bytes(), on_trial)


@pytest.mark.parametrize(("guard", "limit"), [(None, 1.0), (4, 2.0)])
def test_a_trial_holds_one_copy_of_the_training_state_two_with_a_guard(
    guard: int | None, limit: float
) -> None:
    escape = EscapeCallback(
        StallDetector(patience=6, warmup_steps=0, check_every_n_steps=2, min_delta_rel=0.9),
        probation_steps=20,
        max_escapes=1,
        guard_every_n_steps=guard,
        # The negative-curvature step uses the probe's eigenvector: it must not outlive the escape.
        ladders={k: [NegativeCurvatureStep(), Perturb(radius=0.1)] for k in ESCAPABLE},
    )
    measure = Measure(escape, {1, 12, 20})
    model = Wide()
    fit(model, [escape, measure], max_steps=40)  # room for the probation to end before training
    base, _ = measure.extra[1]  # the data set and Lightning's own tensors, before any snapshot
    assert [on_trial for _, on_trial in (measure.extra[12], measure.extra[20])] == [True, True]
    for step in (12, 20):
        assert measure.extra[step][0] - base <= limit + 0.01, (step, measure.extra)


def test_nothing_is_held_after_fit() -> None:
    before = sum(_storages().values())
    escape = EscapeCallback(
        StallDetector(patience=6, warmup_steps=0, check_every_n_steps=2, min_delta_rel=0.9),
        probation_steps=8,
        guard_every_n_steps=4,
        ladders={k: [NegativeCurvatureStep(), Perturb(radius=0.1)] for k in ESCAPABLE},
    )
    model = Wide()
    unit = model.state_bytes()
    trainer = fit(model, [escape], max_steps=30)
    assert escape.events
    del trainer, model
    after = sum(_storages().values())
    assert (after - before) / unit < 0.01  # what is left is the callback's: no tensor of the run


@pytest.mark.parametrize("steps", [10, 20])
def test_the_probe_peaks_at_about_lanczos_steps_plus_seven_vectors(
    steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Wide()
    vector = sum(p.numel() * p.element_size() for p in model.parameters())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    base = sum(n for ptr, n in _storages().items() if ptr not in params)
    peak = [0]
    product = curvature.HessianOperator.__call__

    def measured(self: Any, vec: Any) -> Any:
        out = product(self, vec)
        extra = sum(n for ptr, n in _storages().items() if ptr not in params) - base
        peak[0] = max(peak[0], extra)
        return out

    monkeypatch.setattr(curvature.HessianOperator, "__call__", measured)
    spectrum = probe_curvature(
        model, (model.x, model.y), loss_fn=lambda m, b: m.loss(b), steps=steps, method="exact"
    )
    assert spectrum.method == "exact"
    assert peak[0] / vector <= steps + 8
