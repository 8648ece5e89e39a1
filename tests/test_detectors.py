from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_escape.detectors import (
    KINDS,
    CurvatureEvidence,
    DeadEvidence,
    Diagnosis,
    StallTracker,
    SymmetricEvidence,
    classify,
)


def _run(values: list[float], grads: list[float] | None = None, **kwargs: Any) -> int | None:
    """Feed a trace; return the first step at which a stall is declared, or None."""
    tracker = StallTracker(**kwargs)
    for step, v in enumerate(values):
        tracker.update(step, v, None if grads is None else grads[step])
        if tracker.status().stalled:
            return step
    return None


FLAT = [1.0] * 400
DECAY = [math.exp(-0.01 * t) for t in range(400)]
TO_ZERO = [1.0 / (1 + t) ** 2 for t in range(400)]  # relative improvement stays large
DROP_THEN_FLAT = [1.0 - 0.004 * t if t < 100 else 0.6 for t in range(400)]

TRACES = [
    # (name, values, grads, kwargs, expected step or None)
    ("flat stalls after warm-up and patience", FLAT, None, {"patience": 50, "warmup_steps": 0}, 50),
    ("warm-up delays the decision", FLAT, None, {"patience": 50, "warmup_steps": 120}, 120),
    ("steady decay never stalls", DECAY, None, {"patience": 50, "warmup_steps": 0}, None),
    (
        "decay slower than min_delta_rel stalls",
        DECAY,
        None,
        {"patience": 50, "warmup_steps": 0, "min_delta_rel": 0.6},
        50,
    ),
    (
        "relative rule alone never fires as the loss creeps to 0",
        TO_ZERO,
        None,
        {"patience": 50, "warmup_steps": 0, "min_delta": 0.0},
        None,
    ),
    (
        "the absolute tolerance fires as the loss creeps to 0",
        TO_ZERO,
        None,
        {"patience": 50, "warmup_steps": 0, "min_delta": 1e-4, "smoothing": 0.0},
        # the last drop of 1e-4 below the anchored best is at step 85 (f = 1.35e-4); the next
        # would need f < 3.5e-5, at step 168: the stall is declared 50 steps after 85
        135,
    ),
    (
        "drop then flat stalls patience steps after the last improvement",
        DROP_THEN_FLAT,
        None,
        {"patience": 50, "warmup_steps": 0, "smoothing": 0.0},
        150,
    ),
    (
        "faded gradients halve the wait",
        DROP_THEN_FLAT,
        [1.0 if t < 100 else 1e-4 for t in range(400)],
        {"patience": 50, "warmup_steps": 0, "smoothing": 0.0},
        125,
    ),
    (
        "growing gradients double the wait",
        DROP_THEN_FLAT,
        [1.0 if t < 100 else 100.0 for t in range(400)],
        {"patience": 50, "warmup_steps": 0, "smoothing": 0.0},
        200,
    ),
    (
        "max mode: a flat accuracy stalls",
        [0.1 + 0.002 * min(t, 100) for t in range(300)],
        None,
        {"mode": "max", "patience": 40, "warmup_steps": 0, "smoothing": 0.0},
        140,
    ),
    (
        "max mode: a rising accuracy does not",
        [0.1 + 0.002 * t for t in range(300)],
        None,
        {"mode": "max", "patience": 40, "warmup_steps": 0, "smoothing": 0.0},
        None,
    ),
]


@pytest.mark.parametrize(
    ("values", "grads", "kwargs", "expected"),
    [t[1:] for t in TRACES],
    ids=[t[0] for t in TRACES],
)
def test_stall_step(
    values: list[float], grads: list[float] | None, kwargs: dict[str, Any], expected: int | None
) -> None:
    assert _run(values, grads, **kwargs) == expected


def test_nonfinite_value_is_divergence_at_once() -> None:
    tracker = StallTracker(patience=10, warmup_steps=100)
    for step in range(5):
        tracker.update(step, 1.0, 1.0)
    assert tracker.status().diverging is None
    tracker.update(5, math.nan, 1.0)
    status = tracker.status()
    assert status.diverging == "the monitored value is nan at step 5"
    diagnosis = classify(status)
    # The reason follows the kind wherever both are printed: "diverging: diverging: ..." before.
    assert (diagnosis.kind, diagnosis.reason) == ("diverging", status.diverging)


def test_runaway_value_and_gradient_spike_are_divergence() -> None:
    tracker = StallTracker(patience=10, warmup_steps=0, smoothing=0.0)
    for step, v in enumerate([2.0, 1.0, 0.5, 0.5, 3.0]):
        tracker.update(step, v, 1.0)
    assert "worse than its best 0.5" in (tracker.status().diverging or "")
    tracker = StallTracker(patience=10, warmup_steps=0, smoothing=0.0, grad_spike_factor=10)
    for step in range(60):  # gradients explode while the value worsens a little
        tracker.update(step, 1.0 + 0.01 * max(0, step - 40), 1.0 if step < 40 else 1e4)
    assert "gradient norm rose" in (tracker.status().diverging or "")
    tracker = StallTracker(patience=10, warmup_steps=0, smoothing=0.0, grad_spike_factor=10)
    for step in range(
        60
    ):  # gradients grow a lot while the value improves: an escape, not a blow-up
        tracker.update(step, 1.0 - 0.01 * max(0, step - 40), 1e-6 if step < 40 else 1.0)
    assert tracker.status().diverging is None


def test_a_noisy_descent_after_a_flat_stretch_is_not_a_divergence() -> None:
    # The gradient's running level remembers the flat stretch (1e-7) for thousands of steps, so the
    # descent's gradients (1e-2) stay far above it; the smoothed value of a noisy descent sits
    # above its best from time to time by less than the samples' spread.
    import random

    tracker = StallTracker()
    rng = random.Random(0)
    for step in range(400):
        tracker.update(step, 7.0 + 0.3 * rng.gauss(0, 1), 1e-7)
    flagged, spiked = [], 0
    for step in range(400, 600):
        tracker.update(step, 7.0 - 4.0 * (step - 400) / 200 + 0.5 * rng.gauss(0, 1), 1e-2)
        status = tracker.status()
        spiked += status.grad_ratio > tracker.grad_spike_factor
        if status.diverging is not None:
            flagged.append(step)
    assert spiked > 50  # the gradients stand over 1000x their running level on those steps
    assert flagged == []
    # The same descent turning into a blow-up is one: worse than the best by more than the spread.
    for step in range(600, 640):
        tracker.update(step, 3.0 + 0.2 * (step - 600) + 0.5 * rng.gauss(0, 1), 1e2)
    assert "gradient norm rose" in (tracker.status().diverging or "")


def test_state_round_trip_continues_exactly() -> None:
    values = [1.0 / (1 + 0.1 * t) for t in range(300)]
    a = StallTracker(patience=30, warmup_steps=10)
    b = StallTracker(patience=30, warmup_steps=10)
    for step, v in enumerate(values):
        a.update(step, v, 0.5)
        if step == 150:
            b.load_state_dict(a.state_dict())
        if step > 150:
            b.update(step, v, 0.5)
    assert a.status() == b.status()


def test_a_checkpoint_from_before_the_sample_weights_resumes_the_same_average() -> None:
    a = StallTracker(patience=30, warmup_steps=10)
    for step in range(50):
        a.update(step, 1.0 / (1 + 0.1 * step), 0.5)
    old = {k: v for k, v in a.state_dict().items() if k in _OLD_STATE}
    b = StallTracker(patience=30, warmup_steps=10)
    b.load_state_dict(old)
    assert b.status().smoothed == pytest.approx(a.status().smoothed, rel=1e-12)
    assert b.state_dict()["norm2"] == pytest.approx(a.state_dict()["norm2"], rel=1e-12)


_OLD_STATE = {"ema", "n", "start", "best", "best_step", "first_step", "step", "g_fast", "g_slow"}
_OLD_STATE |= {"g_n", "spread", "nonfinite", "nonfinite_step"}


def test_a_sample_that_spans_steps_decays_the_average_once_per_step() -> None:
    tracker = StallTracker(smoothing=0.9)
    tracker.update(0, 1.0)
    tracker.update(10, 0.0, span=10)
    decay = 0.9**10
    assert tracker.status().smoothed == pytest.approx(decay * 0.1 / (decay * 0.1 + 1 - decay))


@pytest.mark.parametrize("slope", [0.0, -1e-3, -1e-2])
def test_the_noise_is_the_samples_scatter_not_their_trend(slope: float) -> None:
    rng = random.Random(0)
    sigma, alpha = 0.1, 0.95
    tracker = StallTracker(smoothing=alpha)
    errors = []
    for step in range(4000):
        tracker.update(step, 50.0 + slope * step + rng.gauss(0, sigma))
        if step >= 2000:
            errors.append(tracker.status().noise)
    # A stationary EMA of independent samples has the standard error sigma*sqrt((1-a)/(1+a)).
    expected = sigma * math.sqrt((1 - alpha) / (1 + alpha))
    assert sum(errors) / len(errors) == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("quantum", [1 / 300, 1 / 100])
def test_a_metric_over_a_finite_set_has_its_noise(quantum: float) -> None:
    # An accuracy repeats its values, and some residuals are exactly 0: a geometric mean over
    # them read 1% of the spread (q = 1/100), and a verdict then saw no noise at all.
    rng = random.Random(0)
    tracker = StallTracker(mode="max", smoothing=0.0)  # the standard error is a sample's spread
    errors = []
    for step in range(3000):
        tracker.update(
            step * 100, round((0.95 + rng.gauss(0, 0.005)) / quantum) * quantum, span=100
        )
        if step >= 100:
            errors.append(tracker.status().noise)
    assert 0.7 * 0.005 < sum(errors) / len(errors) < 1.2 * 0.005


def test_a_steep_start_is_forgotten_within_a_hundred_samples() -> None:
    # Exponential convergence to a floor of tiny noise: the curvature of the first steps is no
    # noise of the floor (an average of squares alone still read 70 times the floor's noise).
    rng = random.Random(0)
    tracker = StallTracker(smoothing=0.0)
    for step in range(150):
        tracker.update(step, 10.0 * math.exp(-step / 3) + 1.0 + rng.gauss(0, 1e-6))
    assert tracker.status().noise < 1e-5


def test_a_straight_descent_has_no_noise() -> None:
    tracker = StallTracker()
    assert math.isnan(tracker.status().noise)
    for step in range(100):
        tracker.update(step, 5.0 - 0.01 * step)
    assert tracker.status().noise < 1e-9
    # Unevenly spaced samples of a line (validations at irregular steps) too.
    tracker = StallTracker()
    for step in (0, 40, 100, 130, 250, 260):
        tracker.update(step, 5.0 - 0.01 * step, span=40)
    assert tracker.status().noise < 1e-9


FLOATS = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0]),
)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.one_of(st.none(), FLOATS), min_size=1, max_size=120),
    grads=st.lists(
        st.one_of(st.none(), st.floats(0, 1e6), st.sampled_from([math.nan, math.inf])),
        min_size=1,
        max_size=120,
    ),
    patience=st.integers(1, 40),
    warmup=st.integers(0, 40),
    mode=st.sampled_from(["min", "max"]),
    smoothing=st.floats(0, 0.99),
)
def test_any_trace_is_safe_and_invariants_hold(
    values: list[float | None],
    grads: list[float | None],
    patience: int,
    warmup: int,
    mode: str,
    smoothing: float,
) -> None:
    tracker = StallTracker(
        mode=mode,
        patience=patience,
        warmup_steps=warmup,  # type: ignore[arg-type]
        smoothing=smoothing,
    )
    seen_nonfinite = False
    for step, v in enumerate(values):
        g = grads[step % len(grads)]
        tracker.update(step, v, g)
        seen_nonfinite |= (v is not None and not math.isfinite(v)) or (
            g is not None and not math.isfinite(g)
        )
        status = tracker.status()
        # never a decision during warm-up
        if step < warmup:
            assert not status.stalled
        # a stall needs at least half the patience without improvement
        if status.stalled:
            assert status.since >= patience / 2
        assert 0 <= status.since <= step
        assert status.score >= 0
        # a non-finite sample is divergence, and it stays so
        assert (status.diverging is not None) or not seen_nonfinite
        diagnosis = classify(status)
        assert diagnosis.kind in KINDS
        assert diagnosis.reason


CURVATURE_CASES = [
    ("strict saddle", CurvatureEvidence(2.0, -2.0, lr=0.1), "saddle"),
    (
        "tiny negative eigenvalue is a minimum",
        CurvatureEvidence(10.0, -0.01, lr=0.1),
        "local_minimum",
    ),
    ("positive curvature", CurvatureEvidence(3.0, 0.5, lr=0.1), "local_minimum"),
    ("flat in every direction", CurvatureEvidence(2e-6, -1e-6, lr=0.05), "plateau"),
]


@pytest.mark.parametrize(
    ("curvature", "kind"), [c[1:] for c in CURVATURE_CASES], ids=[c[0] for c in CURVATURE_CASES]
)
def test_classify_by_curvature(curvature: CurvatureEvidence, kind: str) -> None:
    status = _stalled_status()
    diagnosis = classify(status, curvature=curvature)
    assert diagnosis.kind == kind
    assert diagnosis.evidence["lambda_min"] == curvature.lambda_min
    assert "has not improved" in diagnosis.reason


def _stalled_status() -> Any:
    tracker = StallTracker(patience=5, warmup_steps=0, smoothing=0.0)
    for step in range(10):
        tracker.update(step, 1.0, 1e-3)
    status = tracker.status()
    assert status.stalled
    return status


def test_unit_evidence_takes_precedence_and_reads_well() -> None:
    status = _stalled_status()
    sym = classify(
        status,
        symmetric=[SymmetricEvidence("hidden", 8, 8)],
        curvature=CurvatureEvidence(1.0, -1.0, lr=0.1),
    )
    assert sym.kind == "symmetric_units"
    assert "8 of 8 units in `hidden` are copies" in sym.reason
    dead = classify(status, dead=[DeadEvidence("net.1", 12, 16)])
    assert dead.kind == "dead_units" and dead.evidence["dead_fraction"] == 0.75
    assert classify(status, dead=[DeadEvidence("net.1", 2, 16)]).kind == "plateau"
    fallback = classify(status, curvature_note="manual optimization without `loss_fn`")
    assert fallback.kind == "plateau"
    assert "manual optimization without `loss_fn`" in fallback.reason


def test_healthy_when_not_stalled_and_round_trip() -> None:
    tracker = StallTracker(patience=5, warmup_steps=0)
    tracker.update(0, 1.0, 1.0)
    diagnosis = classify(tracker.status())
    assert diagnosis.kind == "healthy"
    assert Diagnosis.from_dict(diagnosis.to_dict()) == diagnosis


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "mean"}, "`mode` can be 'min', 'max', got 'mean'"),
        ({"patience": 0}, "`patience` must be a positive integer, got 0"),
        ({"warmup_steps": -1}, "`warmup_steps` must be a non-negative integer, got -1"),
        ({"min_delta": -1.0}, r"`min_delta` must be a number in \[0.0, inf\), got -1.0"),
        ({"min_delta_rel": 2.0}, r"`min_delta_rel` must be a number in \[0.0, 1.0\], got 2.0"),
        ({"smoothing": 1.0}, r"`smoothing` must be a number in \[0.0, 1.0\), got 1.0"),
        (
            {"divergence_factor": 0.0},
            "`divergence_factor` must be a positive finite number, got 0.0",
        ),
        ({"grad_spike_factor": "big"}, "`grad_spike_factor` .* got 'big'"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StallTracker(**kwargs)
