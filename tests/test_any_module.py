"""`EscapeCallback()` on modules it knows nothing about: it runs, or warns and stays passive."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins import MixedPrecision
from models import Net, fit, forcing_detector, same_state
from torch import nn

from lightning_escape import EscapeCallback


class WithBatchNormAndDropout(Net):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.3))


class ReturnsNothingSometimes(Net):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return None if batch_idx % 3 == 0 else super().training_step(batch, batch_idx)


class WithValidation(Net):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def val_dataloader(self) -> Any:
        return self.train_dataloader()


def _forcing(monitor: str | None = None) -> EscapeCallback:
    """Every check is a stall, so the whole loop runs within a few steps."""
    detector = forcing_detector(monitor)
    # Every trial fails (no neutral verdicts): the rollback runs each time.
    return EscapeCallback(
        detector, probation_steps=4, cooldown_steps=0, max_failures=50, keep_neutral=False
    )


def test_boring_model_with_defaults() -> None:
    escape = EscapeCallback()
    fit(BoringModel(), [escape], max_steps=64)
    assert escape.events == []


SETUPS = [
    ("batchnorm and dropout", WithBatchNormAndDropout, {}),
    ("training_step returns None", ReturnsNothingSometimes, {}),
    ("16-mixed scaler", Net, {"plugins": [MixedPrecision("16-mixed", "cpu")]}),
    ("bf16-mixed", Net, {"precision": "bf16-mixed"}),
    ("accumulation", Net, {"accumulate_grad_batches": 3}),
    ("clipping", Net, {"gradient_clip_val": 0.1}),
    ("validation metric", WithValidation, {"val_check_interval": 2}),
]


@pytest.mark.parametrize(
    ("module", "trainer_kwargs"), [s[1:] for s in SETUPS], ids=[s[0] for s in SETUPS]
)
def test_defaults_and_the_whole_loop_run_anywhere(
    module: Any, trainer_kwargs: dict[str, Any]
) -> None:
    fit(module(), [EscapeCallback()], max_steps=12, **trainer_kwargs)
    escape = _forcing()
    model = module()
    fit(model, [escape], max_steps=40, **trainer_kwargs)
    assert escape.events, "the forced loop never acted"
    assert all(e.verdict in ("accepted", "rolled_back") for e in escape.events)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_monitored_validation_metric() -> None:
    escape = _forcing(monitor="val_loss")
    fit(WithValidation(), [escape], max_steps=40, val_check_interval=2)
    assert escape.diagnoses
    assert escape.events


def test_manual_optimization_without_a_loss_stays_passive() -> None:
    class Manual(Net):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            super().training_step(batch, batch_idx)

    escape = _forcing()
    with pytest.warns(UserWarning, match="found no loss"):
        fit(Manual(manual=True), [escape], max_steps=20)
    assert escape.diagnoses == [] and escape.events == []


def test_no_false_no_loss_warning_when_the_last_step_is_a_check(recwarn: Any) -> None:
    # The end of fit reads back what is pending; finding nothing is not finding no loss.
    escape = _forcing()
    fit(Net(), [escape], max_steps=20)  # step 19 is a check: nothing is pending at the end
    assert escape.diagnoses
    assert not [w for w in recwarn if "found no loss" in str(w.message)]


def test_a_step_that_skips_some_batches_gets_no_false_no_loss_warning(recwarn: Any) -> None:
    # A check window of only skipped batches (None returned) warned that the detector found no
    # loss and "stays passive", while it went on diagnosing from the other batches.
    class Skips(Net):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            return None if batch_idx % 5 == 3 else loss

    # A check every step: a window of one skipped batch.
    escape = EscapeCallback(forcing_detector(check_every_n_steps=1), probation_steps=4)
    fit(Skips(n=160), [escape], max_steps=20)
    assert escape.diagnoses
    assert not [w for w in recwarn if "found no loss" in str(w.message)]


class PopsLabels(Net):
    """A `training_step` that takes its dict batch apart, as Hugging Face models' steps do."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        labels = batch.pop("labels")
        return nn.functional.mse_loss(self(batch["x"]), labels)

    def train_dataloader(self) -> Any:
        pairs = [{"x": x, "labels": y} for x, y in zip(self.x, self.y)]
        return torch.utils.data.DataLoader(pairs, batch_size=self.batch_size)  # type: ignore[arg-type]


class FrozenByRate(Net):
    """The first parameter group at learning rate 0: a backbone frozen by its rate."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(
            [{"params": self.l1.parameters(), "lr": 0.0}, {"params": self.l2.parameters()}],
            lr=self.lr,
        )


class EmptyParameter(Net):
    """A parameter with zero rows in the loss (a count of learned tokens set to 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(0, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.tokens.sum()


@pytest.mark.parametrize(
    "model",
    [PopsLabels, FrozenByRate, EmptyParameter],
    ids=["training_step pops its batch", "a group at lr 0", "a parameter of zero rows"],
)
def test_modules_that_crashed_the_diagnosis_or_an_escape_run_through_the_loop(model: Any) -> None:
    # Before: KeyError 'labels' (the probe called training_step on the batch it had taken apart),
    # ZeroDivisionError in classify (the rate of the first group only), IndexError in Perturb.
    escape = _forcing()
    fit(model(), [escape], max_steps=20)
    assert escape.events and all(e.verdict is not None for e in escape.events)
    assert all(d.evidence.get("lambda_max") is not None for d in escape.diagnoses)


class Collects(Net):
    """Side effects a `training_step` may have besides its loss (each is undone after a probe)."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[torch.Tensor] = []  # Lightning's docs' pattern for an epoch's mean
        self.calls = 0
        self.running = torch.zeros(())

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        self.outputs.append(loss.detach())
        self.calls += 1
        self.running = 0.9 * self.running + 0.1 * loss.detach()
        self.lr_schedulers().step()  # type: ignore[union-attr]
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        return [optimizer], [torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.99)]


def _twins(model: Any) -> tuple[Any, Any]:
    """Two modules alike at initialisation, the first fitted plainly for 16 steps."""
    torch.manual_seed(0)
    plain = model()
    torch.manual_seed(0)
    watched = model()
    fit(plain, [], max_steps=16)
    return plain, watched


def test_the_probe_undoes_what_training_step_does_besides_its_loss() -> None:
    # The probe calls training_step again: its outputs were collected twice (8 for 4 batches), the
    # learning rate decayed by probes too, the count and the running mean moved.
    plain, watched = _twins(Collects)
    detector = forcing_detector()
    fit(watched, [detector], max_steps=16)
    assert detector.diagnoses
    assert len(watched.outputs) == len(plain.outputs) == 16
    assert watched.calls == plain.calls == 16
    assert torch.equal(watched.running, plain.running)
    assert watched.optimizers().param_groups[0]["lr"] == plain.optimizers().param_groups[0]["lr"]  # type: ignore[union-attr]
    assert all(torch.equal(a, b) for a, b in zip(watched.parameters(), plain.parameters()))


class SteppedOutside(Net):
    """The optimizer also steps a tensor the module does not own (not an `nn.Parameter`)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.ones((), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([*self.parameters(), self.scale], lr=self.lr, momentum=0.9)


def test_a_tensor_the_optimizer_steps_outside_the_module_keeps_escapes_off() -> None:
    # A rollback restored the module and the momentum, not that tensor: it kept the trial's
    # value (-0.32 for 0.95) beside momentum from before the trial.
    escape = _forcing()
    with pytest.warns(
        UserWarning, match=r"the optimizers step 1 tensor\(s\) that are not parameters"
    ):
        fit(SteppedOutside(), [escape], max_steps=20)
    assert escape.diagnoses and escape.events == []


class StepsSeen(pl.Callback):
    """The optimizer steps taken, in the order their batches ended."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.steps.append(trainer.global_step)


def test_a_verdict_after_a_validation_inside_an_accumulation_window_names_the_steps_it_undid() -> (
    None
):
    # Batches of 4 per epoch in windows of 2, a validation after every 3rd batch: inside a window.
    # Its value is judged at the check after the window's step, and the rollback there throws
    # away that step too; the event ended one step early (8 for 9), and the waste was short by one.
    escape = _forcing("val_loss")
    seen = StepsSeen()
    fit(WithValidation(), [escape, seen], accumulate_grad_batches=2, val_check_interval=3)
    first = escape.events[0]
    assert first.verdict == "rolled_back"
    assert first.end_step is not None and first.end_step + 1 in seen.steps
    assert first.end_step == 9


class Warmup:
    """A learning-rate factor that reads the module's step (holds the module, as users write)."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    def __call__(self, epoch: int) -> float:
        return min(1.0, (self.module.global_step + 1) / 10)


class OddAttributes(Net):
    """Tensors held as plain attributes that cannot be written to, and a warm-up schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = torch.ones(1, 1).expand(16, 1)  # stride 0: no in-place write
        self.count = torch.zeros(())

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.count.add_(1)  # in place: the probe puts it back
        return (
            nn.functional.mse_loss(self(batch[0]), batch[1], reduction="none")
            .mul(self.weights)
            .mean()
        )

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, Warmup(self))
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


def test_the_probe_leaves_tensor_attributes_and_the_objects_a_schedule_holds_alone() -> None:
    # Written back in place, the stride-0 view crashed the fit (and a read-only memory map
    # killed the process); restored from a deep copy, the warm-up's object held a copy of the
    # module, whose step stayed 0: the rate stuck at a tenth.
    plain, watched = _twins(OddAttributes)
    detector = forcing_detector()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(watched, [detector], max_steps=16)
    assert not [w for w in caught if "tensor attribute" in str(w.message)]  # all put back
    assert detector.diagnoses
    # Counted once per batch trained, as without the probe's extra steps.
    assert int(watched.count) == int(plain.count) == 16
    schedule: Any = watched.lr_schedulers()
    assert schedule.lr_lambdas[0].module is watched
    rates = [m.optimizers().param_groups[0]["lr"] for m in (plain, watched)]  # type: ignore[union-attr]
    assert rates[0] == rates[1] == watched.lr


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: torch.Tensor
    y: torch.Tensor

    def to(self, device: Any) -> Frozen:
        return self


class FrozenBatches(Net):
    """Batches Lightning moves as one object: a frozen dataclass with its own `to`."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return nn.functional.mse_loss(self(batch.x), batch.y)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(self.x, self.y),
            batch_size=self.batch_size,
            collate_fn=_frozen,
        )


def _frozen(items: list[tuple[torch.Tensor, torch.Tensor]]) -> Frozen:
    return Frozen(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


class AddsInItsHook(Net):
    """The module's own `on_train_batch_start` (called after the callbacks') adds to the batch."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        batch["w"] = torch.ones(len(batch["x"]), 1)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return (
            nn.functional.mse_loss(self(batch["x"]), batch["y"], reduction="none") * batch["w"]
        ).mean()

    def train_dataloader(self) -> Any:
        pairs = [{"x": x, "y": y} for x, y in zip(self.x, self.y)]
        return torch.utils.data.DataLoader(pairs, batch_size=self.batch_size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "model", [FrozenBatches, AddsInItsHook], ids=["a frozen dataclass", "added by the module"]
)
def test_batches_the_probe_keeps_as_they_were_trained_on(model: Any) -> None:
    # A frozen dataclass failed the copy of its containers at the first batch; a key the module
    # added after the callbacks' hook was missing from the copy, and every probe failed.
    detector = forcing_detector()
    fit(model(), [detector], max_steps=8)
    assert detector.diagnoses
    assert all("lambda_max" in d.evidence for d in detector.diagnoses)


class Tally(Net):
    """Counts its batches in tensor attributes, one of them larger than the probe copies."""

    def __init__(self) -> None:
        super().__init__()
        self.count = torch.zeros(())
        self.per_example = torch.zeros(300_000)  # 1.2 MB

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.count += 1
        self.per_example[: len(batch[0])] += 1
        return super().training_step(batch, batch_idx)


def test_a_large_tensor_attribute_written_in_place_is_named() -> None:
    plain, watched = _twins(Tally)
    detector = forcing_detector()
    with pytest.warns(UserWarning, match=r"tensor attribute\(s\) per_example of Tally in place"):
        fit(watched, [detector], max_steps=16)
    assert detector.diagnoses
    assert int(watched.count) == int(plain.count) == 16  # put back: it is small
    assert float(watched.per_example[0]) > float(plain.per_example[0]) == 16  # not put back


class Renormed(pl.LightningModule):
    """An embedding with `max_norm` over 200 rows, two per example: each batch looks up a few."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(200, 8, max_norm=1.0)
        with torch.no_grad():
            self.emb.weight.mul_(3.0)  # rows above max_norm, renormalised where looked up
        self.head = nn.Linear(8, 1)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, 200, (128, 2), generator=g)
        self.y = torch.randn(128, 1, generator=g)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return nn.functional.mse_loss(self.head(self.emb(x).mean(1)), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(self.x, self.y), batch_size=32
        )


def test_the_probe_leaves_the_rows_an_embedding_renormalises_alone() -> None:
    # The probe's extra forward passes renormalised rows the run had not looked up yet (39 of
    # 200 at the diagnosis), and momentum carried the difference on: the detector changed the run.
    plain, watched = _twins(Renormed)
    detector = forcing_detector()
    fit(watched, [detector], max_steps=16)
    assert detector.diagnoses
    assert same_state(plain.state_dict(), watched.state_dict())
