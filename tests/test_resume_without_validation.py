"""A fit with no validation at an epoch's end, resumed mid-trial from a checkpoint written there.

The callback's own state resumes exactly there. Lightning (2.4 to 2.6) restarts a fit that has
`max_steps` inside the epoch that was ending and trains one more batch in it (the first again), with
or without this callback: README's Limitations say so, and the fits here end by `max_epochs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from models import Net, fit, same_state
from torch.utils.data import DataLoader, TensorDataset

from lightning_escape import EscapeCallback, LRKick, Perturb, StallDetector
from lightning_escape.policy import ESCAPABLE

torch.set_num_threads(1)


class ValidatedEveryOtherEpoch(Net):
    """A validation loop that `check_val_every_n_epoch=2` skips at the end of every other epoch."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def val_dataloader(self) -> Any:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)


class Batches(Callback):
    """Epoch, index and step of each batch trained, and its first number (which batch it is)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, float]] = []

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seen.append(
            (trainer.current_epoch, batch_idx, trainer.global_step, batch[0][0, 0].item())
        )


def _kicking() -> EscapeCallback:
    return EscapeCallback(
        StallDetector(patience=4, warmup_steps=0, check_every_n_steps=2, min_delta_rel=0.9),
        probation_steps=4,
        cooldown_steps=0,
        max_failures=50,
        keep_neutral=False,
        ladders={kind: [LRKick(3.0, steps=4), Perturb(radius=0.5)] for kind in ESCAPABLE},
    )


@pytest.mark.parametrize(
    ("module", "settings"),
    [(Net, {}), (ValidatedEveryOtherEpoch, {"check_val_every_n_epoch": 2})],
    ids=["no validation loop", "no validation at that epoch"],
)
def test_a_run_resumed_mid_trial_from_an_epochs_end_without_validation_ends_as_the_uninterrupted_one(
    tmp_path: Path, module: type[Net], settings: dict[str, Any]
) -> None:
    every = ModelCheckpoint(
        dirpath=tmp_path, every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1
    )
    setup: dict[str, Any] = {"max_steps": -1, "max_epochs": 10, "num_sanity_val_steps": 0}
    setup.update(settings)
    torch.manual_seed(0)
    whole, writer, trained = module(n=32), _kicking(), Batches()  # two batches per epoch
    fit(whole, [writer, trained, every], enable_checkpointing=True, **setup)
    assert writer.events[0].verdict is not None
    pending = [
        path
        for path in sorted(tmp_path.glob("*.ckpt"))
        if torch.load(path, weights_only=True)["callbacks"][writer.state_key]["engine"]["trial"]
    ]
    assert len(pending) >= 4
    for path in pending:
        torch.manual_seed(0)
        resumed, again, retrained = module(n=32), _kicking(), Batches()
        fit(resumed, [again, retrained], ckpt_path=path, **setup)
        assert retrained.seen == trained.seen[len(trained.seen) - len(retrained.seen) :], path.name
        assert retrained.seen[0][1] == 0, path.name  # the next epoch's first batch
        assert [e.to_dict() for e in again.events] == [e.to_dict() for e in writer.events]
        assert same_state(resumed.state_dict(), whole.state_dict()), path.name
        assert again.detector.steps_seen == writer.detector.steps_seen == 20
