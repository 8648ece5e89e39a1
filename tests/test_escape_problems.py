"""EscapeCallback() at its defaults on the constructed stuck problems and on healthy controls."""

from __future__ import annotations

import pytest

from benchmarks.problems import make_problem, train_plain
from lightning_escape import EscapeCallback

STUCK = [
    # (problem, budget in steps, target as the problem states it)
    ("strict_saddle", 800, "f <= -0.9"),
    ("deep_linear", 800, "loss <= 0.05 * L0"),
    ("symmetric_teacher_student", 2500, "1/2 MSE <= 0.02 * 1/2 E[y^2]"),
    ("six_hump_camel", 1000, "f <= -1.0 (the global basin)"),
]


@pytest.mark.parametrize(("problem", "budget", "target"), STUCK, ids=[s[0] for s in STUCK])
def test_defaults_reach_the_target_plain_training_misses(
    problem: str, budget: int, target: str
) -> None:
    plain = train_plain(problem, max_steps=budget, seed=0)
    escape = EscapeCallback()
    result = train_plain(problem, max_steps=budget, seed=0, callbacks=[escape])
    assert plain.steps_to_target is None, f"plain training reached {target}: not stuck"
    assert result.steps_to_target is not None, (target, escape.diagnoses, escape.events)
    assert make_problem(problem, 0).meets_target(result.final_metric)  # and it stays there
    assert any(e.verdict == "accepted" for e in escape.events)


CONTROLS = [("logistic_regression", 1500), ("digits_mlp", 1500), ("teacher_student", 1500)]


@pytest.mark.parametrize(("problem", "budget"), CONTROLS, ids=[c[0] for c in CONTROLS])
def test_healthy_controls_are_not_harmed(problem: str, budget: int) -> None:
    plain = train_plain(problem, max_steps=budget, seed=0)
    escape = EscapeCallback()
    result = train_plain(problem, max_steps=budget, seed=0, callbacks=[escape])
    # no escape fires, or the final metric is unchanged within 1%
    if escape.events:
        assert abs(result.final_metric - plain.final_metric) <= 0.01 * abs(plain.final_metric)
    else:
        assert result.final_metric == plain.final_metric


def test_kinds_answered_in_order() -> None:
    # The saddle is answered by the negative-curvature step, the plateau by a jump.
    saddle = EscapeCallback()
    train_plain("strict_saddle", max_steps=600, callbacks=[saddle])
    assert saddle.events[0].diagnosis == "saddle"
    assert saddle.events[0].action.startswith("NegativeCurvatureStep")
    plateau = EscapeCallback()
    train_plain("deep_linear", max_steps=500, callbacks=[plateau])  # the probation fits
    assert plateau.events[0].diagnosis == "plateau"
    assert plateau.events[0].action.startswith("Perturb(radius=0.5")
