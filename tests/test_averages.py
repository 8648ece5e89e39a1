"""Weight averages other callbacks keep (SWA, EMA) are rolled back with the trial."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from models import Net, fit, forcing_detector

from lightning_escape import EscapeCallback, Perturb
from lightning_escape.policy import ESCAPABLE


class AverageByStep(pl.Callback):
    """The averaging callback's average (and count) at the end of every batch, after the others."""

    def __init__(self, averaging: pl.Callback) -> None:
        self.averaging = averaging
        self.by_step: dict[int, tuple[dict[str, torch.Tensor], int]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        model = self.averaging._average_model
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        count = getattr(self.averaging, "n_averaged", None)
        if count is None:
            count = state.get("n_averaged", torch.tensor(-1))
        self.by_step[trainer.global_step - 1] = (state, int(count))


def _escape() -> EscapeCallback:
    return EscapeCallback(
        forcing_detector(),
        # A jump the loss cannot come back from within probation: rolled back.
        ladders={kind: [Perturb(radius=5.0)] for kind in ESCAPABLE},
        probation_steps=9,
        max_escapes=1,
    )


def _rolled_back_trial_across_updates(averaging: pl.Callback) -> tuple[Any, AverageByStep]:
    escape = _escape()
    spy = AverageByStep(averaging)
    torch.manual_seed(0)
    fit(Net(), [averaging, escape, spy], max_steps=40, max_epochs=10)
    [event] = escape.events
    assert event.verdict == "rolled_back" and event.end_step is not None
    return event, spy


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_rolled_back_trial_leaves_no_trace_in_swa() -> None:
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    event, spy = _rolled_back_trial_across_updates(swa)
    before, count_before = spy.by_step[event.step]
    during, count_during = spy.by_step[event.end_step - 1]
    after, count_after = spy.by_step[event.end_step]
    # SWA averaged the trial's weights at an epoch start (4 batches per epoch, 9 steps on
    # probation); the rollback takes them out again, bit for bit.
    assert count_during > count_before and not _equal(during, before)
    assert count_after == count_before and _equal(after, before)


def test_a_rolled_back_trial_leaves_no_trace_in_an_ema() -> None:
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    if not hasattr(callbacks, "EMAWeightAveraging"):
        pytest.skip("Lightning before 2.5 has no EMAWeightAveraging")
    ema = callbacks.EMAWeightAveraging()
    event, spy = _rolled_back_trial_across_updates(ema)
    before, count_before = spy.by_step[event.step]
    during, _ = spy.by_step[event.end_step - 1]
    after, count_after = spy.by_step[event.end_step]
    assert not _equal(during, before)  # updated at every step of the trial
    assert count_after == count_before and _equal(after, before)


def test_a_run_resumed_mid_trial_still_rolls_back_swa(tmp_path: Path) -> None:
    # Checkpoints at every epoch end (4 batches): one falls inside the 9-step trial, after SWA
    # has averaged a trial's weights. Resumed from it, the rollback restores the average saved
    # with the trial in the checkpoint: the one from before the trial. (Lightning's SWA itself
    # does not resume bit for bit, so the two runs part after the resume.)
    def run(ckpt_path: str | None = None) -> tuple[EscapeCallback, AverageByStep]:
        escape = _escape()
        swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
        spy = AverageByStep(swa)
        saving = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
        torch.manual_seed(0)
        callbacks: list[pl.Callback] = [swa, escape, spy] + ([] if ckpt_path else [saving])
        fit(
            Net(),
            callbacks,
            max_steps=40,
            max_epochs=10,
            enable_checkpointing=ckpt_path is None,
            ckpt_path=ckpt_path,
        )
        return escape, spy

    full, full_spy = run()
    [event] = full.events
    assert event.verdict == "rolled_back" and event.end_step is not None
    inside = [
        path
        for path in sorted(tmp_path.glob("*.ckpt"))
        if event.step + 4 < int(path.stem.split("step=")[1]) <= event.end_step
    ]
    assert inside, "no checkpoint after an SWA update inside the trial"
    state = torch.load(inside[0], weights_only=True)["callbacks"][full.state_key]
    assert state["engine"]["trial"] is not None  # it holds the trial on probation
    resumed, spy = run(str(inside[0]))
    [again] = resumed.events
    assert again.verdict == "rolled_back" and again.end_step is not None
    before, count_before = full_spy.by_step[event.step]
    after, count_after = spy.by_step[again.end_step]
    assert count_after == count_before and _equal(after, before)
