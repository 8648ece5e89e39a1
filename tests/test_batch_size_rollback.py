"""`BatchSizeChange` through the dataloader, rolled back: the original size comes back for good.

Its switch back waits for an epoch's end. An escape that starts before then must neither take
the size being undone for the original (and put it back at its own undo) nor be judged under it;
a trial judged after its own switch back must still have the dataloader reloaded at that boundary.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from models import Net, fit, forcing_detector

from lightning_escape import BatchSizeChange, EscapeCallback
from lightning_escape.policy import ESCAPABLE


class EpochSizes(Callback):
    """Each epoch's first optimizer step and the sizes of its batches."""

    def __init__(self) -> None:
        self.first: dict[int, int] = {}
        self.sizes: dict[int, set[int]] = {}

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        epoch = trainer.current_epoch
        self.first.setdefault(epoch, trainer.global_step)
        self.sizes.setdefault(epoch, set()).add(len(batch[0]))


def _run(probation: int, max_epochs: int) -> tuple[Net, EpochSizes, EscapeCallback, Any]:
    """Batches of 16, 16 of them an epoch; every check a stall; halvings that are rolled back."""
    model = Net(n=256, batch_size=16, lr=1e-3)
    sizes = EpochSizes()
    escape = EscapeCallback(
        forcing_detector(),
        probation_steps=probation,
        cooldown_steps=0,
        max_failures=50,
        keep_neutral=False,
        ladders={
            kind: [BatchSizeChange(factor=0.5, steps=2, method="dataloader")] for kind in ESCAPABLE
        },
    )
    trainer = fit(model, [escape, sizes], max_epochs=max_epochs, max_steps=-1)
    return model, sizes, escape, trainer


def _trial_epochs(sizes: EpochSizes, escape: EscapeCallback) -> dict[int, int]:
    """The epoch each escape's size trained in (the one starting after it), and that size."""
    trials = {}
    for event in escape.events:
        epoch = min(e for e, first in sizes.first.items() if first > event.step)
        trials[epoch] = int(event.reason.split(" -> ")[1].split()[0])
    return trials


def test_an_escape_during_a_pending_switch_back_starts_from_the_original_size() -> None:
    # The first trial is rolled back a few steps into its epoch (32 batches of 8); the stall
    # goes on. The next escape started there read 8 as the original, restored 8 at its undo,
    # and every later trial halved again: 16 -> 8 -> 4 -> ..., the run ending at a rolled-back
    # trial's size with many times the steps.
    model, sizes, escape, trainer = _run(probation=4, max_epochs=5)
    assert len(escape.events) >= 2
    assert all(e.verdict == "rolled_back" for e in escape.events)
    # Every escape halves the original size, the second one included.
    assert all("batch_size 16 -> 8 " in e.reason for e in escape.events)
    # It waited for the switch back, no longer: it started in the epoch the original size came
    # back in (the first trial trained in epoch 1).
    assert sizes.first[2] <= escape.events[1].step < sizes.first[3]
    # Each trial trains for one epoch; every other epoch trains at the original size.
    trials = _trial_epochs(sizes, escape)
    assert len(trials) == len(escape.events)
    assert sizes.sizes == {e: {trials.get(e, 16)} for e in sizes.sizes}
    # Put back as it was: the attribute, and Lightning's reload setting.
    assert model.batch_size == 16
    assert trainer.reload_dataloaders_every_n_epochs == 0
    assert trainer.global_step == sum(256 // trials.get(e, 16) for e in sizes.sizes)


def test_a_trial_judged_after_its_switch_back_has_the_original_size_reloaded() -> None:
    # The trial's 2 steps end early in its epoch; its probation runs past the epoch's end. The
    # step, on probation and finishing at once, acted twice at that boundary: it switched back
    # and put Lightning's reload setting back in the same breath, so no reload came and the next
    # epochs trained at the rolled-back size while `batch_size` said 16.
    model, sizes, escape, trainer = _run(probation=40, max_epochs=3)
    assert [e.verdict for e in escape.events] == ["rolled_back"]
    assert escape.events[0].end_step > sizes.first[2]  # judged after the switch back
    assert sizes.sizes == {0: {16}, 1: {8}, 2: {16}}
    assert model.batch_size == 16
    assert trainer.reload_dataloaders_every_n_epochs == 0
