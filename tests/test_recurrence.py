"""Contracting recurrences: their evidence, the ``vanishing_gradient`` kind and its escape."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from models import StatesByStep, fit, fit_two_ranks
from torch import nn
from torch.utils.data import DataLoader

from lightning_escape import (
    EscapeCallback,
    MotionRule,
    OrthogonalRecurrence,
    Perturb,
    StallClassifier,
    StallDetector,
)
from lightning_escape.detectors import RecurrentEvidence, StallTracker, classify
from lightning_escape.escapes import EscapeContext
from lightning_escape.policy import ESCAPABLE, default_ladders
from lightning_escape.progress import Motion
from lightning_escape.recurrence import nearest_orthogonal, recurrent_matrices, spectral_radius


def _reference_polar(w: torch.Tensor) -> torch.Tensor:
    """The polar factor the plain way: ``W (W^T W)^(-1/2)`` from an eigendecomposition."""
    w = w.double()
    values, vectors = torch.linalg.eigh(w.T @ w)
    return w @ vectors @ torch.diag(values.rsqrt()) @ vectors.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_nearest_orthogonal_matrix_agrees_with_a_plain_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(12, 12, generator=g) / 4).to(dtype)
    q = nearest_orthogonal(w)
    assert q.dtype == dtype and w.dtype == dtype  # the input is not changed in place
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(q.double(), _reference_polar(w), atol=tol, rtol=0)
    torch.testing.assert_close(
        (q.double() @ q.double().T), torch.eye(12).double(), atol=tol, rtol=0
    )
    # nearest: no other orthogonal matrix tried is closer (in the Frobenius norm)
    for _ in range(5):
        other, _ = torch.linalg.qr(torch.randn(12, 12, generator=g).double())
        assert torch.dist(w.double(), q.double()) <= torch.dist(w.double(), other)


def test_an_orthogonal_matrix_is_its_own_nearest_and_gain_scales_it() -> None:
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(nearest_orthogonal(q), q, atol=1e-6, rtol=0)
    scaled = nearest_orthogonal(q, gain=0.5)
    assert spectral_radius(scaled) == pytest.approx(0.5, abs=1e-6)
    torch.testing.assert_close(
        torch.linalg.svdvals(scaled), torch.full((6,), 0.5), atol=1e-6, rtol=0
    )


def test_a_non_square_matrix_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"`weight` must be a square matrix, got shape \(3, 4\)"):
        nearest_orthogonal(torch.zeros(3, 4))


def test_spectral_radius_is_the_largest_eigenvalue_modulus() -> None:
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # eigenvalues ±i
    assert spectral_radius(0.3 * rotation) == pytest.approx(0.3)
    # PyTorch's default initialisation contracts: radius about 1/sqrt(3)
    torch.manual_seed(0)
    assert 0.45 < spectral_radius(nn.RNN(4, 64).weight_hh_l0) < 0.7


class _Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.RNN(3, 5, num_layers=2, bidirectional=True)
        self.gated = nn.LSTM(3, 5)
        self.gru = nn.GRU(3, 5)
        self.head = nn.Linear(5, 5)


def test_recurrent_matrices_are_the_vanilla_rnns_of_every_layer_and_direction() -> None:
    model = _Tagger()
    names = [name for name, _ in recurrent_matrices(model)]
    assert names == [
        "encoder.weight_hh_l0",
        "encoder.weight_hh_l0_reverse",
        "encoder.weight_hh_l1",
        "encoder.weight_hh_l1_reverse",
    ]
    model.encoder.weight_hh_l1.requires_grad_(False)  # frozen: no escape may change it
    assert "encoder.weight_hh_l1" not in [name for name, _ in recurrent_matrices(model)]
    assert recurrent_matrices(nn.LSTM(3, 5)) == [] and recurrent_matrices(nn.GRU(3, 5)) == []


def test_the_classifier_reports_only_contracting_recurrences() -> None:
    torch.manual_seed(0)
    default = nn.RNN(4, 32)
    [evidence] = StallClassifier(probe=False).recurrent_evidence(default)
    assert evidence.layer == "weight_hh_l0" and evidence.size == 32
    assert evidence.radius == pytest.approx(spectral_radius(default.weight_hh_l0))
    orthogonal = nn.RNN(4, 32)
    nn.init.orthogonal_(orthogonal.weight_hh_l0)
    assert StallClassifier(probe=False).recurrent_evidence(orthogonal) == []
    assert StallClassifier(probe=False, recurrent_radius=0).recurrent_evidence(default) == []


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, "0.9"])
def test_a_bad_recurrent_radius_is_refused_by_name(bad: Any) -> None:
    with pytest.raises(ValueError, match="recurrent_radius"):
        StallClassifier(recurrent_radius=bad)


def _stalled() -> StallTracker:
    tracker = StallTracker(patience=3, warmup_steps=0, smoothing=0.0)
    for step in range(6):
        tracker.update(step, 2.0, 1e-3)
    return tracker


def test_a_stall_with_a_contracting_recurrence_is_a_vanishing_gradient() -> None:
    evidence = [RecurrentEvidence("rnn.weight_hh_l0", 0.5, 32)]
    d = classify(_stalled().status(), recurrent=evidence)
    assert d.kind == "vanishing_gradient"
    assert d.evidence["recurrent_layer"] == "rnn.weight_hh_l0"
    assert d.evidence["recurrent_radius"] == 0.5
    assert "spectral radius 0.5" in d.reason and "within 9.966 steps" in d.reason
    assert "vanishing_gradient" in ESCAPABLE
    # A run that is not stalled, or sits at its target, is not one.
    healthy = StallTracker(patience=3, warmup_steps=0)
    healthy.update(0, 2.0, 1.0)
    assert classify(healthy.status(), recurrent=evidence).kind == "healthy"
    assert classify(_stalled().status(), recurrent=evidence, target=3.0).kind == "converged"


def test_a_contracting_recurrence_over_a_moving_run_says_motion_does_not_hold_it_off() -> None:
    evidence = [RecurrentEvidence("rnn.weight_hh_l0", 0.5, 32)]
    moving = Motion(step=5, steps=3, displacement=0.07, previous=0.07, span=0.1, scale=1.0,
                    speed=0.07, trend=1.0, agreement=0.0, drift=0.71)  # fmt: skip
    d = StallClassifier().classify(_stalled().status(), recurrent=evidence, motion=moving)
    assert d.kind == "vanishing_gradient"
    assert "in the 3 steps to step 5" in d.reason
    assert "a run on its way, but a trap motion does not hold off" in d.reason
    assert "not a run on its way" not in d.reason
    crawl = dataclasses.replace(moving, speed=0.001)
    d = StallClassifier().classify(_stalled().status(), recurrent=evidence, motion=crawl)
    assert "not a run on its way" in d.reason


def test_the_escape_needs_a_vanilla_recurrence() -> None:
    assert OrthogonalRecurrence().unavailable(EscapeContext(nn.Linear(3, 3))) == (
        "no trainable vanilla recurrent matrix (nn.RNN)"
    )
    assert OrthogonalRecurrence().unavailable(EscapeContext(nn.LSTM(3, 3))) is not None
    assert OrthogonalRecurrence().unavailable(EscapeContext(nn.RNN(3, 3))) is None
    with pytest.raises(ValueError, match=r"`gain`.*-1"):
        OrthogonalRecurrence(gain=-1)


def test_the_escape_makes_every_recurrent_matrix_orthogonal_and_nothing_else() -> None:
    torch.manual_seed(0)
    model = _Tagger()
    before = copy.deepcopy(model.state_dict())
    said = OrthogonalRecurrence(gain=1.0).apply(EscapeContext(model))
    assert said.startswith("set 4 recurrent matrices (5x5) to 1.0 x its nearest orthogonal")
    for name, value in model.state_dict().items():
        if "weight_hh" in name and name.startswith("encoder"):
            torch.testing.assert_close(value @ value.T, torch.eye(5), atol=1e-5, rtol=0)
            torch.testing.assert_close(value, nearest_orthogonal(before[name]), atol=0, rtol=0)
        else:
            assert torch.equal(value, before[name]), name


def test_the_default_ladder_of_a_vanishing_gradient() -> None:
    ladder = default_ladders()["vanishing_gradient"]
    assert [step.describe() for step in ladder] == [
        "OrthogonalRecurrence(gain=1.0)",
        "Restandardize(std=1.0, center=True)",
        "Perturb(radius=0.5, scale='auto', seed=0)",
    ]


class FlatLatch(pl.LightningModule):
    """A small tanh RNN reading its last state; it logs a flat ``flat`` metric (a stall by design)."""

    def __init__(self, orthogonal: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(4, 16, batch_first=True)
        self.head = nn.Linear(16, 2)
        if orthogonal:
            nn.init.orthogonal_(self.rnn.weight_hh_l0)
        g = torch.Generator().manual_seed(0)
        self.x, self.y = (
            torch.randn(32, 10, 4, generator=g),
            torch.randint(0, 2, (32,), generator=g),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.log("flat", 1.0)
        states, _ = self.rnn(x)
        return nn.functional.cross_entropy(self.head(states[:, -1]), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader([(self.x, self.y)] * 4, batch_size=None)


def _detector(**classifier: Any) -> StallDetector:
    # Every window counts as moving: only a structural trap is diagnosed at all. The flat metric
    # stalls while the training loss falls: that does not hold a stall off here.
    always = MotionRule(min_speed=0.0, min_trend=0.0, min_agreement=-1.0)
    return StallDetector(
        monitor="flat",
        patience=10,
        warmup_steps=0,
        check_every_n_steps=5,
        classifier=StallClassifier(
            probe=False, motion=always, training_improves=False, **classifier
        ),
    )


def test_a_moving_run_with_a_contracting_recurrence_is_diagnosed_not_held_off() -> None:
    detector = _detector()
    fit(FlatLatch(), [detector], max_steps=40)
    assert [d.kind for d in detector.diagnoses] == ["vanishing_gradient"]
    assert detector.held_off == []
    # The same run with an orthogonal recurrence is held off once its motion is measured (its
    # first stall comes before the first window ends): its motion may be progress.
    detector = _detector()
    fit(FlatLatch(orthogonal=True), [detector], max_steps=40)
    assert [d.kind for d in detector.diagnoses] == ["plateau"] and len(detector.held_off) == 1


def test_the_escape_is_judged_and_rolled_back_bit_for_bit() -> None:
    escape = EscapeCallback(
        _detector(),
        ladders={"vanishing_gradient": [OrthogonalRecurrence(), Perturb(radius=0.5)]},
        probation_steps=10,
        max_escapes=1,
        max_failures=1,
    )
    before, after = (
        StatesByStep(),
        StatesByStep(),
    )  # the parameters just before and just after the callback
    fit(FlatLatch(), [before, escape, after], max_steps=40)
    [event] = escape.events
    assert event.diagnosis == "vanishing_gradient"
    assert event.action.startswith("OrthogonalRecurrence(")
    assert event.verdict == "rolled_back" and event.end_step is not None  # the metric is flat
    acted = after.by_step[event.step]["rnn.weight_hh_l0"]
    assert spectral_radius(before.by_step[event.step]["rnn.weight_hh_l0"]) < 0.9
    assert spectral_radius(acted) == pytest.approx(1.0, abs=1e-5)
    pre, post = before.by_step[event.step], after.by_step[event.end_step]
    assert pre.keys() == post.keys() and all(torch.equal(pre[k], post[k]) for k in pre)


@pytest.mark.ddp
def test_ddp_replicas_make_the_same_matrix_orthogonal(tmp_path: Path) -> None:
    escape = EscapeCallback(
        _detector(), probation_steps=10, max_escapes=1, max_failures=1, cooldown_steps=0
    )
    r0, r1 = fit_two_ranks(FlatLatch(), escape, tmp_path)
    assert r0["actions"] == r1["actions"] == [["OrthogonalRecurrence(gain=1.0)", "rolled_back"]]
    # The same parameters at every step, bit for bit.
    assert len(r0["digests"]) == 30 and r0["digests"] == r1["digests"]
