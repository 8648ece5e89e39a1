"""Each diagnosis kind on the constructed problem that has it; controls are never misdiagnosed."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.problems import make_problem, problem_loss, train_plain
from lightning_escape import StallClassifier, StallDetector


def _diagnose(
    problem: str,
    steps: int,
    seed: int = 0,
    classifier: StallClassifier | None = None,
    **kwargs: Any,
) -> StallDetector:
    settings: dict[str, Any] = {"patience": 60, "warmup_steps": 60, "check_every_n_steps": 10}
    settings.update(kwargs)
    detector = StallDetector(classifier=classifier, **settings)
    train_plain(problem, max_steps=steps, seed=seed, callbacks=[detector])
    return detector


CASES = [
    # (problem, steps, expected kind of the first diagnosis)
    ("strict_saddle", 300, "saddle"),  # f = x² − y² + y⁴/4 from (1, 0): GD stops at the saddle
    ("matrix_factorization", 400, "saddle"),  # ¼‖UUᵀ − M‖² with row 0 of U pinned at 0
    ("six_hump_camel", 400, "local_minimum"),  # from (1.6, −0.7): the basin of f = −0.2155
    ("deep_linear", 300, "plateau"),  # four 16×16 linear layers at init 1e-3
    ("symmetric_teacher_student", 300, "symmetric_units"),  # 8 identical tanh units
    ("dead_relu", 300, "dead_units"),  # every hidden ReLU unit off on every example
    ("diverging", 100, "diverging"),  # lr past the stability limit: the loss overflows
]


@pytest.mark.parametrize(("problem", "steps", "kind"), CASES, ids=[c[0] for c in CASES])
def test_each_kind_on_its_constructed_problem(problem: str, steps: int, kind: str) -> None:
    detector = _diagnose(problem, steps)
    assert detector.diagnoses, f"{problem}: no diagnosis"
    first = detector.diagnoses[0]
    assert first.kind == kind, first.reason
    assert first.reason and first.evidence


def test_saddle_evidence_has_the_eigenvalues() -> None:
    first = _diagnose("strict_saddle", 300).diagnoses[0]
    assert first.evidence["lambda_min"] == pytest.approx(-2.0, rel=1e-3)
    assert first.evidence["lambda_max"] == pytest.approx(2.0, rel=1e-3)
    assert "λ_min = -2 is negative" in first.reason


def test_symmetric_units_are_found_before_the_loss_stalls() -> None:
    # The symmetric student's loss creeps on for thousands of steps; the duplicate check needs none.
    detector = _diagnose("symmetric_teacher_student", 300, patience=1000, warmup_steps=60)
    first = detector.diagnoses[0]
    assert first.kind == "symmetric_units"
    assert first.step < 300
    assert "8 of 8 units in `hidden` are copies" in first.reason


def test_loss_fn_drives_the_probe_too() -> None:
    detector = _diagnose("strict_saddle", 300, classifier=StallClassifier(loss_fn=problem_loss))
    assert detector.diagnoses[0].kind == "saddle"


CONTROLS = [
    # (problem, steps during which it still improves, steps to convergence)
    ("logistic_regression", 150, 2000),
    ("digits_mlp", 300, 2500),
]


@pytest.mark.parametrize(
    ("problem", "improving", "converged"), CONTROLS, ids=[c[0] for c in CONTROLS]
)
def test_controls_are_never_misdiagnosed(problem: str, improving: int, converged: int) -> None:
    # The real defaults: no stall while the control still improves ...
    early = StallDetector()
    train_plain(problem, max_steps=improving, callbacks=[early])
    assert early.diagnoses == []
    # ... and once converged it may be called a local minimum (it is one), never anything else.
    late = _diagnose(problem, converged, patience=200, warmup_steps=200)
    assert {d.kind for d in late.diagnoses} <= {"local_minimum"}


def test_problem_loss_matches_training_step() -> None:
    problem = make_problem("deep_linear", 0)
    batch = problem.full_batch()
    assert problem_loss(problem, batch).item() == problem.loss(batch).item()
