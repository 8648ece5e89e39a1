"""`BatchSizeChange` through a training dataloader that does not follow `batch_size`.

A loader with a hard-coded size, a batch sampler of its own or a dataset that batches itself
yields the same batches after the reload: the change never came in force, and must be neither
claimed nor judged.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from models import Net, fit, fit_two_ranks
from test_probation import ScriptedRun, _engine, _stall
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    SequentialSampler,
    TensorDataset,
)

from lightning_escape import BatchSizeChange, EscapeCallback, Perturb, StallDetector
from lightning_escape.detectors import Check
from lightning_escape.escapes import EscapeContext, EscapeStep
from lightning_escape.policy import ESCAPABLE
from lightning_escape.probation import EscapeEvent, Note


class Chunks(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """A dataset that yields whole batches of `size` itself."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int) -> None:
        self.x, self.y, self.size = x, y, size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.x), self.size):
            yield self.x[i : i + self.size], self.y[i : i + self.size]


class Loader(Net):
    """`Net` whose training dataloader is built one of several ways, most ignoring `batch_size`."""

    def __init__(self, kind: str, batch_size: int = 16, fixed: int = 16, n: int = 64) -> None:
        super().__init__(n=n, batch_size=batch_size, lr=1e-3)
        self.kind, self.fixed = kind, fixed

    def train_dataloader(self) -> DataLoader[Any]:
        data = TensorDataset(self.x, self.y)
        n, fixed = len(data), self.fixed
        if self.kind == "hard-coded":
            return DataLoader(data, batch_size=fixed)
        if self.kind == "BatchSampler":
            return DataLoader(
                data, batch_sampler=BatchSampler(SequentialSampler(data), fixed, False)
            )
        if self.kind == "batch_sampler":  # declares no size
            return DataLoader(
                data, batch_sampler=[list(range(i, i + fixed)) for i in range(0, n, fixed)]
            )
        if self.kind == "sampler":  # yields whole batches of indices, no automatic batching
            return DataLoader(
                data, sampler=BatchSampler(SequentialSampler(data), fixed, False), batch_size=None
            )
        if self.kind == "iterable":
            return DataLoader(Chunks(self.x, self.y, fixed), batch_size=None)
        # Follows `batch_size` at half of it, through a batch sampler that declares no size.
        half = self.batch_size // 2
        return DataLoader(data, batch_sampler=[list(range(i, i + half)) for i in range(0, n, half)])


class Sizes(Callback):
    def __init__(self) -> None:
        self.sizes: set[int] = set()

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self.sizes.add(len(batch[0]))


def _escape() -> EscapeCallback:
    """A stall at once; a halving through the dataloader, then a perturbation."""
    return EscapeCallback(
        StallDetector(patience=4, warmup_steps=0, check_every_n_steps=1, min_delta_rel=0.9),
        probation_steps=4,
        max_escapes=2,
        ladders={
            kind: [BatchSizeChange(factor=0.5, steps=4, method="dataloader"), Perturb(radius=0.01)]
            for kind in ESCAPABLE
        },
    )


def _run(model: Net) -> tuple[EscapeCallback, Sizes, Any, list[str]]:
    """Four batches an epoch, with :func:`_escape`."""
    sizes, escape = Sizes(), _escape()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(model, [escape, sizes], max_steps=16)
    return escape, sizes, trainer, [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "kind", ["hard-coded", "BatchSampler", "batch_sampler", "sampler", "iterable"]
)
def test_a_dataloader_that_ignores_batch_size_is_not_claimed_nor_judged(kind: str) -> None:
    model = Loader(kind)
    escape, sizes, trainer, warned = _run(model)
    assert sizes.sizes == {16}  # the batches never changed
    # No escape claims the change, nor was judged on it; the ladder went on to the next rung,
    # which names why it passed over the batch size.
    why = "the training dataloader ignored batch_size=8 (changed from 16): its batches stay at 16"
    assert [e.action.split("(")[0] for e in escape.events] == ["Perturb"]
    assert why in escape.events[0].reason
    assert any("did not act" in w and why in w for w in warned)
    assert escape.policy.used == 1  # the withdrawn trial is not counted
    # Put back as it was: the attribute, and Lightning's reload setting.
    assert model.batch_size == 16
    assert trainer.reload_dataloaders_every_n_epochs == 0


def test_the_report_leaves_a_withdrawn_escape_out(tmp_path: Path) -> None:
    # Its text was logged when it was applied, and no verdict ever follows it: read back, it was
    # an escape pending for the rest of the run beside the Perturb that came after it.
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_escape.report import load_run

    logger = TensorBoardLogger(tmp_path, name="", version="run")
    fit(Loader("hard-coded"), [_escape()], max_steps=16, logger=logger)
    escapes = load_run(tmp_path / "run").escapes()
    assert [(e.action.split("(")[0], e.verdict != "pending") for e in escapes] == [
        ("Perturb", True)
    ]


def test_a_dataloader_that_follows_batch_size_its_own_way_keeps_the_change() -> None:
    # Batches of half `batch_size`, from a batch sampler that declares no size: 16, then 8.
    model = Loader("scaled", batch_size=32)
    escape, sizes, _, warned = _run(model)
    assert sizes.sizes == {16, 8}
    assert escape.events[0].action.startswith("BatchSizeChange(")
    assert escape.events[0].verdict != "pending"
    assert not any("did not act" in w for w in warned)
    assert model.batch_size == 32


def test_the_event_names_the_batch_size_the_loader_trains_with() -> None:
    # The attribute says 32, the loader in force yields 16: the event says both.
    model = Loader("hard-coded", batch_size=32)
    trainer = SimpleNamespace(train_dataloader=model.train_dataloader())
    step = BatchSizeChange(factor=0.5, steps=4, method="dataloader")
    done = step.apply(EscapeContext(model, trainer=trainer))
    assert done.startswith(
        "batch_size 32 -> 16 (the training dataloader's batches: 16) for 4 steps"
    )
    assert step.not_applied() is None


def test_a_change_found_not_in_force_resumes_as_such() -> None:
    # A checkpoint taken between the finding and the check that withdraws the trial.
    found = BatchSizeChange(factor=0.5, steps=4, method="dataloader")
    found._ignored = "the training dataloader ignored batch_size=8 (changed from 16)"
    resumed = BatchSizeChange(factor=0.5, steps=4, method="dataloader")
    resumed.load_state_dict(found.state_dict())
    assert resumed.not_applied() == found._ignored
    assert not resumed.busy() and not resumed.waiting()


@dataclass(eq=False, repr=False)
class Lapsing(EscapeStep):
    """A step that learns after `apply` that its change never came in force."""

    why: str | None = field(default=None, init=False)

    def apply(self, ctx: EscapeContext) -> str:
        return "changed something, from the next boundary"

    def not_applied(self) -> str | None:
        return self.why


@pytest.mark.parametrize("end", ["check", "finish", "abort"])
def test_the_engine_withdraws_a_trial_that_never_acted(end: str) -> None:
    run, engine = ScriptedRun(), _engine(Lapsing())
    [event] = engine.check(run, _stall(run))
    assert isinstance(event, EscapeEvent) and engine.policy.used == 1
    assert engine.trial is not None
    before = run.weights()
    step = engine.trial.step
    assert isinstance(step, Lapsing)
    step.why = "nothing changed"
    status = run.feed(1.0)
    if end == "check":
        news = engine.check(run, Check(status))
    elif end == "finish":
        news = engine.finish(run, status)
    else:
        news = engine.abort(run, status.step, "an error")
    # Neither judged nor restored (the run trained as without it), nor counted.
    assert engine.trial is None
    assert not any(isinstance(n, EscapeEvent) and n.step == event.step for n in news)
    assert [n.text for n in news if isinstance(n, Note) and n.warning] == [
        f"{event.action} from step {event.step} did not act (nothing changed): withdrawn, unjudged"
    ]
    assert event not in engine.events and engine.policy.used == 0
    assert all(torch.equal(before[k], v) for k, v in run.weights().items())


@pytest.mark.ddp
def test_every_process_withdraws_the_change_alike(tmp_path: Path) -> None:
    # A dataset that batches itself, whole on each of two processes: both read the size of the
    # batches they train on, agree that it did not change, and go on with the same escape.
    ranks = fit_two_ranks(Loader("iterable"), _escape(), tmp_path, max_steps=16)
    assert ranks[0]["actions"] == ranks[1]["actions"]
    assert [a.split("(")[0] for a, _ in ranks[0]["actions"]] == ["Perturb"]
    assert ranks[0]["digests"] == ranks[1]["digests"]


@pytest.mark.parametrize("follows", [False, True])
def test_the_reload_is_checked_on_the_batch_handed_to_the_step(follows: bool) -> None:
    # A loader that declares no size: the step reads the size of the batches it is handed at
    # batch start, not Lightning's private store of the batch (absent from this trainer).
    model = Loader("scaled" if follows else "batch_sampler", batch_size=32, fixed=16)
    trainer = SimpleNamespace(
        train_dataloader=model.train_dataloader(), reload_dataloaders_every_n_epochs=0
    )
    step = BatchSizeChange(factor=0.5, steps=4, method="dataloader")

    def ctx(batch_idx: int | None = None) -> EscapeContext:
        batch = None if batch_idx is None else next(iter(trainer.train_dataloader))
        return EscapeContext(model, trainer=trainer, batch=batch)

    step.apply(ctx())
    step.at_batch_start(ctx(1), 1)  # 16 a batch before the change
    step.at_epoch_end(ctx())  # batch_size 32 -> 16, the loader rebuilt
    assert model.batch_size == 16
    trainer.train_dataloader = model.train_dataloader()
    step.at_batch_start(ctx(0), 0)
    if follows:  # 16 -> 8: in force
        assert step.not_applied() is None and step.waiting() is False
        assert model.batch_size == 16
    else:  # still 16: withdrawn, the attribute put back
        assert step.not_applied() == (
            "the training dataloader ignored batch_size=16 (changed from 32): its batches stay at 16"
        )
        assert model.batch_size == 32


class TwoLoaders(Net):
    """Two training dataloaders in a dict: "a" at a fixed size, "b" following `batch_size`."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self.loss(batch["a"]) + self.loss(batch["b"])

    def train_dataloader(self) -> Any:
        data = TensorDataset(self.x, self.y)
        return {
            "a": DataLoader(data, batch_size=16),
            "b": DataLoader(data, batch_size=self.batch_size),
        }


class PairSizes(Callback):
    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self.sizes.append((len(batch["a"][0]), len(batch["b"][0])))


def test_a_change_one_of_several_dataloaders_follows_is_judged_and_undone() -> None:
    # Read on the first loader alone, the change was "ignored" and withdrawn, while the second
    # loader trained at 8 for the rest of the run, unjudged and never changed back.
    model, sizes = TwoLoaders(n=64, batch_size=16, lr=1e-3), PairSizes()
    escape = _escape()
    escape.policy.ladders = {
        kind: [BatchSizeChange(factor=0.5, steps=4, method="dataloader")] for kind in ESCAPABLE
    }
    escape.policy.max_escapes = 1
    fit(model, [escape, sizes], max_steps=40)
    [event] = escape.events
    assert event.action.startswith("BatchSizeChange(") and event.verdict != "pending"
    assert (16, 8) in sizes.sizes  # in force on the loader that follows it
    assert sizes.sizes[-1] == (16, 16)  # and changed back
    assert model.batch_size == 16
