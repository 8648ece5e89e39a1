"""`BatchSizeChange` through the dataloader waits for an epoch's end: what the wait must not cost.

The steps it waits trained as without it. A change that would come in force too late is not
tried, one that never came in force when training ends is withdrawn rather than rolled back,
and one that came in force is rolled back to the state at the epoch's end, not to the state
from before the wait.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from models import BatchSizes, Net, fit, forcing_detector, same_state
from torch.utils.data import DataLoader, IterableDataset

from lightning_escape import BatchSizeChange, EscapeCallback
from lightning_escape.policy import ESCAPABLE


class Endless(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Examples drawn for ever: the epoch never ends."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(8, generator=g), torch.randn(1, generator=g)


class Streamed(Net):
    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(Endless(), batch_size=self.batch_size)


def _escape(steps: int = 4, probation: int = 6) -> EscapeCallback:
    return EscapeCallback(
        forcing_detector(),
        probation_steps=probation,
        cooldown_steps=0,
        keep_neutral=False,
        ladders={
            kind: [BatchSizeChange(factor=0.5, steps=steps, method="dataloader")]
            for kind in ESCAPABLE
        },
    )


def _twins(
    make: Any, escape: EscapeCallback, **kwargs: Any
) -> tuple[Any, Any, BatchSizes, list[str]]:
    torch.manual_seed(0)
    plain = make()
    fit(plain, [], **kwargs)
    torch.manual_seed(0)
    watched, sizes = make(), BatchSizes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(watched, [escape, sizes], **kwargs)
    return plain, watched, sizes, [str(w.message) for w in caught]


def test_a_change_the_last_epoch_would_bring_too_late_is_not_tried() -> None:
    # One epoch of 40 batches: the next epoch, where the size would change, never comes. The
    # escape waited for it to the end and was rolled back there: 34 of 40 steps thrown away.
    escape = _escape()
    plain, watched, sizes, _ = _twins(
        lambda: Net(n=640, batch_size=16), escape, max_epochs=1, max_steps=-1
    )
    assert escape.events == [] and escape.diagnoses
    assert set(sizes.sizes) == {16}
    assert same_state(plain.state_dict(), watched.state_dict())


def test_an_endless_epoch_gives_the_change_up_unjudged() -> None:
    # An endless stream: no epoch ever ends, the size never changes. Withdrawn once it has
    # waited its window, not judged nor rolled back, and its rung passed over from then on.
    escape = _escape(steps=4)
    plain, watched, sizes, warned = _twins(lambda: Streamed(batch_size=16), escape, max_steps=40)
    assert escape.events == [] and escape.policy.used == 0
    assert any("did not act (no epoch ended within 4 steps of step" in w for w in warned), warned
    assert set(sizes.sizes) == {16}
    assert watched.batch_size == 16
    assert same_state(plain.state_dict(), watched.state_dict())


@pytest.mark.usefixtures("unforeseen_end")
def test_a_change_still_waiting_when_training_ends_is_withdrawn_not_rolled_back() -> None:
    # The end is not foreseen (as when another callback stops the run): the change asked for at
    # step 5 waits for an epoch that never comes. Rolled back, the run lost its last 34 steps.
    escape = _escape()
    plain, watched, sizes, warned = _twins(
        lambda: Net(n=640, batch_size=16), escape, max_epochs=1, max_steps=-1
    )
    assert escape.events == [] and escape.policy.used == 0
    assert any("training ended before its change came in force" in w for w in warned), warned
    assert set(sizes.sizes) == {16}
    assert same_state(plain.state_dict(), watched.state_dict())


class Starts(Callback):
    """The parameters at the start of each batch, by the optimizer step the batch takes."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.at[trainer.global_step] = {
            k: v.detach().clone() for k, v in pl_module.state_dict().items()
        }


def test_a_rolled_back_change_keeps_the_steps_it_waited_for() -> None:
    # Epochs of 16 batches; the change asked for at step 5 comes in force at step 16 and is
    # rolled back: to the state the epoch ended with, not to step 5's, which threw away the
    # ten steps it waited for.
    torch.manual_seed(0)
    model, escape, starts = Net(n=256, batch_size=16, lr=1e-3), _escape(steps=2), Starts()
    escape.policy.max_escapes = 1
    fit(model, [escape, starts], max_epochs=3, max_steps=-1)
    [event] = escape.events
    assert event.verdict == "rolled_back" and event.step == 5
    assert event.reason.endswith("restored the state of step 15")
    # The first batch after the verdict starts from the state step 16 started from.
    assert same_state(starts.at[event.end_step + 1], starts.at[16])
    assert not same_state(starts.at[event.end_step + 1], starts.at[6])
