"""Converged runs: a floor or a user's target is ``converged``, never escaped by default."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_escape import EscapeCallback, StallClassifier, StallDetector
from lightning_escape.detectors import CurvatureEvidence, DeadEvidence, StallTracker, classify
from lightning_escape.policy import default_ladders
from tests.models import fit


def _status(values: list[float], grads: float = 1e-3, mode: str = "min") -> Any:
    tracker = StallTracker(mode=mode, patience=5, warmup_steps=0, smoothing=0.0)  # type: ignore[arg-type]
    for step, v in enumerate(values):
        tracker.update(step, v, grads)
    status = tracker.status()
    assert status.stalled
    return status


MINIMUM = CurvatureEvidence(lambda_max=2.0, lambda_min=0.0, lr=0.1)
SADDLE = CurvatureEvidence(lambda_max=2.0, lambda_min=-1.0, lr=0.1)
WEAK = CurvatureEvidence(lambda_max=2.0, lambda_min=-0.04, lr=0.1)
TABLE = CurvatureEvidence(lambda_max=0.2745, lambda_min=-0.003856, lr=0.005)
# Measured on a noisy-moons MLP (SGD, batch 16) at its floor, 10% of its start: a batch's λ_min of
# -13% of λ_max, -3% along that direction on another batch, whose loss differs.
NOISY = CurvatureEvidence(
    lambda_max=0.5218,
    lambda_min=-0.06976,
    lr=0.05,
    lambda_min_other=-0.03059,
    loss=0.12,
    loss_other=0.17,
)
# The same numbers on one batch seen twice (full-batch training): no noise to see.
SAME_BATCH = dataclasses.replace(NOISY, loss_other=NOISY.loss)
# A direction that curves upward on the second batch.
FLIPS = dataclasses.replace(NOISY, lambda_min_other=0.02)
# A direction of descent that holds on both batches (-19% of λ_max on the second).
HOLDS = dataclasses.replace(NOISY, lambda_min_other=-0.1)


@pytest.mark.parametrize(
    ("values", "kwargs", "kind"),
    [
        # 1e-5 of its start, curvature non-negative: a floor.
        ([1.0, *[1e-5] * 8], {"curvature": MINIMUM}, "converged"),
        # The same without a probe: the loss alone says floor.
        ([1.0, *[1e-5] * 8], {}, "converged"),
        # A strong descent direction remains: a saddle however small the loss.
        ([1.0, *[1e-5] * 8], {"curvature": SADDLE}, "saddle"),
        # A weak one (2% of λ_max, as batch Hessians of trained networks show) is no reason.
        ([1.0, *[1e-5] * 8], {"curvature": WEAK}, "converged"),
        ([1.0, *[0.5] * 8], {"curvature": WEAK}, "saddle"),
        # 5% of its start is not a floor (a poor local minimum of Rastrigin's surface sits at
        # 5.6%): a minimum, escaped by default.
        ([1.0, *[5e-2] * 8], {"curvature": MINIMUM}, "local_minimum"),
        # 0.27% of its start with a weak negative direction (-1.4% of λ_max on a batch): a
        # classifier trained long past convergence on a small table, measured; once called a
        # saddle and given a negative-curvature step that cost test accuracy.
        ([1.0, *[2.7e-3] * 8], {"curvature": TABLE}, "converged"),
        ([1.0, *[7.8e-3] * 8], {"curvature": MINIMUM}, "converged"),
        # The floor rule switched off.
        ([1.0, *[1e-5] * 8], {"curvature": MINIMUM, "converged_rel": 0.0}, "local_minimum"),
        # Negative values have no floor to compare with (a surface's minimum is -1).
        ([1.0, *[-1.0] * 8], {"curvature": MINIMUM}, "local_minimum"),
        # A noise floor: a noisy loss at 10% of its start, whose batch's negative direction does
        # not hold on another batch (the weaker of the two, -6% of λ_max, is not strong).
        ([1.0, *[0.1] * 8], {"curvature": NOISY}, "converged"),
        # ...but not above a quarter of its start, nor with the rule off: a saddle (the weaker
        # of the two is still below -1% of λ_max)...
        ([1.0, *[0.3] * 8], {"curvature": NOISY}, "saddle"),
        ([1.0, *[0.1] * 8], {"curvature": NOISY, "noise_floor_rel": 0.0}, "saddle"),
        # ...unless that direction curves upward on the other batch: the batch's, not the loss's.
        ([1.0, *[0.3] * 8], {"curvature": FLIPS}, "local_minimum"),
        # One batch seen twice shows no noise: no noise floor.
        ([1.0, *[0.1] * 8], {"curvature": SAME_BATCH}, "saddle"),
        # A strong direction of descent on both batches is a saddle on any floor.
        ([1.0, *[0.1] * 8], {"curvature": HOLDS}, "saddle"),
        # A user's target reached: good enough, whatever the curvature.
        ([1.0, *[0.3] * 8], {"curvature": SADDLE, "target": 0.5}, "converged"),
        ([1.0, *[0.7] * 8], {"curvature": MINIMUM, "target": 0.5}, "local_minimum"),
    ],
)
def test_converged_is_a_floor_or_a_target(
    values: list[float], kwargs: dict[str, Any], kind: str
) -> None:
    diagnosis = classify(_status(values), **kwargs)
    assert diagnosis.kind == kind
    if kind == "converged":
        assert "target" in diagnosis.reason or "of its start" in diagnosis.reason


def test_a_target_in_max_mode_and_a_rising_gradient_are_respected() -> None:
    accuracy = _status([0.1, *[0.97] * 8], mode="max")
    assert classify(accuracy, mode="max", target=0.95, curvature=SADDLE).kind == "converged"
    assert classify(accuracy, mode="max", target=0.99, curvature=MINIMUM).kind == "local_minimum"
    # A floor needs the gradient not rising: a gradient on the rise is no floor...
    tracker = StallTracker(patience=5, warmup_steps=0, smoothing=0.0)
    for step, v in enumerate([1.0, *[1e-5] * 29]):
        tracker.update(step, v, 1e-3 * 1.2**step)
    status = tracker.status()
    assert status.stalled and status.grad_ratio > 1.1
    assert classify(status, curvature=MINIMUM).kind == "local_minimum"
    # ...but one that fluctuates a few percent above its level, as on any floor, is.
    tracker = StallTracker(patience=5, warmup_steps=0, smoothing=0.0)
    for step, v in enumerate([1.0, *[1e-5] * 29]):
        tracker.update(step, v, 1e-3 * (1.05 if step > 25 else 1.0))
    status = tracker.status()
    assert status.stalled and 1.0 < status.grad_ratio < 1.1
    assert classify(status, curvature=MINIMUM).kind == "converged"


class Regression(LightningModule):
    """Least squares on ``y = Xw + noise``: a floor at 0 without noise, at the noise with it."""

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x @ torch.randn(4, 1, generator=g) + noise * torch.randn(64, 1, generator=g)
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return nn.functional.mse_loss(self.layer(self.x), self.y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(list(range(10)), batch_size=1)


def _escape(**detector: Any) -> EscapeCallback:
    return EscapeCallback(
        StallDetector(patience=30, warmup_steps=0, check_every_n_steps=5, **detector),
        probation_steps=20,
    )


def test_a_run_on_its_floor_is_converged_and_left_alone() -> None:
    escape = _escape()
    fit(Regression(), [escape], max_steps=300)
    assert [d.kind for d in escape.diagnoses] == ["converged"]
    assert escape.events == []  # nothing escaped, nothing rolled back
    assert "lambda_min" in escape.diagnoses[0].evidence  # judged with its curvature

    # Before `converged` existed the same floor was a local minimum, perturbed and rolled back.
    ladders = {"local_minimum": default_ladders(20)["local_minimum"]}
    blind = EscapeCallback(
        StallDetector(
            patience=30,
            warmup_steps=0,
            check_every_n_steps=5,
            classifier=StallClassifier(converged_rel=0.0),
        ),
        probation_steps=20,
        ladders=ladders,
    )
    fit(Regression(), [blind], max_steps=300)
    assert blind.events and blind.events[0].diagnosis in ("local_minimum", "plateau")


def test_a_target_says_what_good_enough_means() -> None:
    # Noise puts the floor at about 0.25: no floor by the relative rule, a minimum to escape...
    plain = _escape()
    fit(Regression(noise=0.5), [plain], max_steps=300)
    assert plain.diagnoses and plain.diagnoses[0].kind != "converged"
    assert plain.events
    # ...unless the user says 0.5 is good enough.
    enough = _escape(target=0.5)
    fit(Regression(noise=0.5), [enough], max_steps=300)
    assert {d.kind for d in enough.diagnoses} == {"converged"}
    assert enough.events == []
    assert "has reached the target 0.5" in enough.diagnoses[0].reason


@pytest.mark.parametrize("target", [float("nan"), float("inf"), "0.5", True])
def test_a_bad_target_is_refused(target: Any) -> None:
    with pytest.raises(ValueError, match="`target` must be a finite number or None"):
        StallDetector(target=target)
    with pytest.raises(ValueError, match="`converged_rel` must be"):
        StallClassifier(converged_rel=2.0)


def test_a_classifier_trained_long_past_convergence_is_left_alone() -> None:
    # The benchmark's control: its loss creeps along at 0.2% to 2% of its start with weak
    # negative curvature on a batch, once called a saddle at step 1089 and escaped.
    from benchmarks.problems import train_plain

    escape = EscapeCallback()
    result = train_plain("tabular_mlp_long", max_steps=1500, seed=2, callbacks=[escape])
    assert result.steps_to_target is not None
    assert escape.diagnoses and {d.kind for d in escape.diagnoses} == {"converged"}
    assert escape.events == []


def test_a_schedule_that_annealed_the_rate_settles_the_run() -> None:
    stalled = _status([1.0, *[0.5] * 8])
    # At 1% of its peak or less the run is settling by design, whatever the curvature says...
    annealed = classify(stalled, curvature=SADDLE, lr=1e-3, lr_peak=0.1)
    assert annealed.kind == "converged"
    assert "0.01 of its peak 0.1" in annealed.reason
    assert annealed.evidence["lr_peak"] == 0.1
    # ...the rate of the curvature evidence stands in for a missing one...
    assert classify(stalled, curvature=SADDLE, lr_peak=10.0).kind == "converged"
    # ...above it, or with the rule off, or with no peak known, the curvature decides.
    assert classify(stalled, curvature=SADDLE, lr=2e-3, lr_peak=0.1).kind == "saddle"
    assert (
        classify(stalled, curvature=SADDLE, lr=1e-3, lr_peak=0.1, annealed_rel=0).kind == "saddle"
    )
    assert classify(stalled, curvature=SADDLE, lr=1e-3).kind == "saddle"
    with pytest.raises(ValueError, match="`annealed_rel` must be"):
        StallClassifier(annealed_rel=1.5)


class AnnealedRegression(Regression):
    """The noisy regression under a schedule that cuts the rate 1000-fold after 60 steps."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=60, gamma=1e-3)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


@pytest.mark.parametrize("annealed_rel", [1e-2, 0.0])
def test_a_stall_after_the_schedule_annealed_the_rate_is_not_escaped(annealed_rel: float) -> None:
    # The noisy regression's floor is a minimum to escape at a steady rate (see the test above);
    # with the rate cut to 1e-4 an escape could not be acted on, and never helped.
    escape = _escape(classifier=StallClassifier(annealed_rel=annealed_rel))
    fit(AnnealedRegression(noise=0.5), [escape], max_steps=300)
    assert escape.diagnoses
    if annealed_rel:
        assert {d.kind for d in escape.diagnoses} == {"converged"}
        assert "of its peak" in escape.diagnoses[0].reason
        assert escape.events == []
    else:
        assert escape.events and not any(e.verdict == "accepted" for e in escape.events)


class NoisyBlobs(LightningModule):
    """Two overlapping Gaussian classes, minibatches of 16: the loss settles at its noise, not 0."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 2, (256,), generator=g)
        self.x = torch.randn(256, 2, generator=g) + 3.0 * (labels[:, None] - 0.5)
        self.y = labels
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader[Any]:
        data = list(zip(self.x, self.y))
        return DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator())


def test_a_run_on_its_noise_floor_is_converged_and_left_alone() -> None:
    torch.manual_seed(0)
    escape = EscapeCallback(StallDetector(patience=100, check_every_n_steps=10), probation_steps=50)
    fit(NoisyBlobs(), [escape], max_steps=800)
    assert escape.diagnoses, "the loss levels off at the noise's floor: a stall"
    first = escape.diagnoses[0]
    assert first.kind == "converged"
    assert "a noise floor" in first.reason
    assert first.evidence["probe_loss"] != first.evidence["probe_loss_other"]
    assert escape.events == []

    # Judged on one batch's curvature, as before the second batch, the same stall is escaped.
    torch.manual_seed(0)
    blind = EscapeCallback(
        StallDetector(
            patience=100,
            check_every_n_steps=10,
            classifier=StallClassifier(noise_floor_rel=0.0, confirm_curvature=False),
        ),
        probation_steps=50,
    )
    fit(NoisyBlobs(), [blind], max_steps=800)
    assert blind.diagnoses and blind.diagnoses[0].kind in ("saddle", "local_minimum")
    assert blind.events


def test_a_held_out_metric_first_measured_late_is_judged_on_the_training_loss_floor() -> None:
    # A validation loss first measured after training began: 0.3 of that start is no floor, but
    # the training loss has fallen to 10% of its own start, on a noisy loss.
    held_out = _status([1.0, *[0.3] * 8])
    training = _status([2.0, *[0.2] * 8])
    assert classify(held_out, curvature=NOISY).kind == "saddle"
    diagnosis = classify(held_out, curvature=NOISY, training=training)
    assert diagnosis.kind == "converged"
    assert "the training loss: it has fallen to 0.1 of its start 2" in diagnosis.reason
    assert diagnosis.evidence["start"] == 2.0 and diagnosis.evidence["floor_best"] == 0.2
    # A training loss above a quarter of its start is no noise floor either.
    assert classify(held_out, curvature=NOISY, training=_status([2.0, *[0.6] * 8])).kind == (
        "saddle"
    )


def test_units_silent_on_a_floor_are_not_dead_units() -> None:
    # A breast-cancer classifier (batches of 8) at 0.07% of its start loss: half the units after
    # a ReLU were silent on the probe batch; it was diagnosed `dead_units` and perturbed, and the
    # trial was rolled back. Above the floor, the same count is dead units.
    silent = [DeadEvidence("net.1", 40, 64)]
    floor = classify(_status([1.0, *[7e-4] * 8]), dead=silent, curvature=MINIMUM)
    assert floor.kind == "converged"
    assert classify(_status([1.0, *[0.5] * 8]), dead=silent, curvature=MINIMUM).kind == (
        "dead_units"
    )
