"""A callback across fits and outside them: reuse, what it keeps after fit, and where it refuses."""

from __future__ import annotations

import gc
import math
import pickle
import weakref
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric
from lightning.pytorch.demos.boring_classes import BoringModel
from models import Net, Scripted, fit
from torch.utils.data import DataLoader, TensorDataset

from lightning_escape import EscapeCallback, GradientMonitor, StallDetector


def _escape() -> EscapeCallback:
    return EscapeCallback(StallDetector(patience=20, warmup_steps=0, check_every_n_steps=5))


def test_a_second_fit_starts_fresh() -> None:
    escape = _escape()
    fit(Scripted([1.0] * 5 + [math.nan] * 15), [escape], max_steps=20)
    assert [d.kind for d in escape.diagnoses] == ["diverging"]
    fit(Scripted([1.0] * 30), [escape], max_steps=30)
    # Nothing of the first fit leaks in: no divergence at the first check, the budget is whole.
    assert [(d.step, d.kind) for d in escape.diagnoses] == [(24, "plateau")]
    assert escape.policy.used == len(escape.events)


class ScriptedWithValidation(Scripted):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.layer(batch[0]).sum())


def test_validating_after_fit_keeps_what_fit_found() -> None:
    escape = _escape()
    model = ScriptedWithValidation([1.0] * 30)
    trainer = fit(model, [escape], max_steps=30)
    found, events = list(escape.diagnoses), list(escape.events)
    trainer.validate(model, dataloaders=model.train_dataloader(), verbose=False)
    assert found and escape.diagnoses == found and escape.events == events


class LambdaCollate(Net):
    def train_dataloader(self) -> DataLoader[Any]:
        data = TensorDataset(self.x, self.y)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            collate_fn=lambda b: [torch.stack(t) for t in zip(*b)],
        )


@pytest.mark.parametrize("make", [_escape, StallDetector, GradientMonitor])
def test_nothing_of_the_run_is_kept_after_fit(make: Any) -> None:
    callback = make()
    model = LambdaCollate()
    trainer = fit(model, [callback], max_steps=12)
    # The callback pickles alone: it holds neither the trainer nor its lambda collate_fn.
    pickle.loads(pickle.dumps(callback))
    refs = [weakref.ref(trainer), weakref.ref(model)]
    del trainer, model
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_fabric_is_refused_clearly() -> None:
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[EscapeCallback()])
    with pytest.raises(TypeError, match=r"EscapeCallback works inside Lightning's `Trainer.fit`"):
        fabric.call("setup", fabric, BoringModel(), "fit")
    with pytest.raises(TypeError, match="Fabric does not run these hooks"):
        fabric.call("on_train_batch_start", fabric, BoringModel(), None, 0)


class Frozen(Net):
    def __init__(self) -> None:
        super().__init__()
        self.extra = torch.nn.Parameter(torch.zeros(1))  # so that an optimizer can be built
        for p in (*self.l1.parameters(), *self.l2.parameters()):
            p.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return super().training_step(batch, batch_idx) + 0.0 * self.extra.sum()


class NoOptimizer(Net):
    def configure_optimizers(self) -> Any:
        return None


@pytest.mark.parametrize("module", [Frozen, NoOptimizer])
def test_modules_with_nothing_to_train_run_without_a_crash(module: Any) -> None:
    forcing = StallDetector(patience=4, warmup_steps=0, check_every_n_steps=2, min_delta_rel=0.9)
    escape = EscapeCallback(forcing, probation_steps=4, cooldown_steps=0, keep_neutral=False)
    fit(module(), [escape], max_steps=12)
    assert all(e.verdict in ("accepted", "rolled_back") for e in escape.events)
