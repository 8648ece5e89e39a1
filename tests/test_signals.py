from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_escape.signals import (
    NoiseScaleEstimator,
    count_nonfinite,
    foreach_norms,
    reference_norms,
    total_norm,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 7), min_size=0, max_size=3), min_size=1, max_size=6),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_foreach_matches_forloop(
    shapes: list[list[int]], dtypes: list[torch.dtype], seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = [
        (torch.randn(tuple(shape), generator=g) * 3).to(dtypes[i % len(dtypes)])
        for i, shape in enumerate(shapes)
    ]
    fused = foreach_norms(tensors, foreach=True)
    plain = foreach_norms(tensors, foreach=False)
    ref = reference_norms(tensors)
    assert len(fused) == len(plain) == len(tensors)
    for f, p, r, t in zip(fused, plain, ref, tensors):
        assert f.dtype == (torch.float64 if t.dtype == torch.float64 else torch.float32)
        assert f.shape == ()
        want = float(t.double().norm())
        assert math.isclose(float(f), want, rel_tol=1e-5, abs_tol=1e-6)
        assert torch.equal(p, r)
        assert math.isclose(float(f), float(p), rel_tol=1e-5, abs_tol=1e-6)
    want_total = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))
    assert math.isclose(float(total_norm(fused)), want_total, rel_tol=1e-5, abs_tol=1e-6)


def test_total_norm_of_nothing_is_zero() -> None:
    assert float(total_norm([])) == 0.0


def test_count_nonfinite() -> None:
    a = torch.tensor([1.0, float("nan"), float("-inf")])
    b = torch.tensor([[float("inf"), 0.0]])
    c = torch.ones(4)
    assert int(count_nonfinite([a, b, c])) == 3
    assert int(count_nonfinite([])) == 0


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(
        st.lists(
            st.one_of(st.floats(-1e3, 1e3), st.sampled_from([math.nan, math.inf, -math.inf])),
            min_size=0,
            max_size=8,
        ),
        min_size=1,
        max_size=5,
    )
)
def test_count_nonfinite_fast_path_matches_plain_count(values: list[list[float]]) -> None:
    tensors = [torch.tensor(v, dtype=torch.float32) for v in values]
    want = sum(1 for v in values for x in v if not math.isfinite(x))
    assert int(count_nonfinite(tensors)) == want
    assert int(count_nonfinite(tensors, foreach_norms(tensors))) == want


def test_noise_scale_recovers_known_value() -> None:
    # Per-example gradients G + ξ with ξ ~ N(0, σ² I): tr(Σ) = d σ², so B_simple = d σ² / |G|².
    d, b, sigma = 200, 16, 0.5
    gen = torch.Generator().manual_seed(0)
    true_g = torch.randn(d, generator=gen) * 0.1
    want = d * sigma**2 / float(true_g.pow(2).sum())
    est = NoiseScaleEstimator(decay=0.995)
    for _ in range(3000):
        g1 = true_g + torch.randn(d, generator=gen) * sigma / math.sqrt(b)
        g2 = true_g + torch.randn(d, generator=gen) * sigma / math.sqrt(b)
        est.update([g1[:50].clone(), g1[50:].clone()], [g2[:50], g2[50:]], batch_size=b)
    got = float(est.value())
    assert abs(got - want) / want < 0.15, (got, want)


def test_noise_scale_state_round_trip() -> None:
    est = NoiseScaleEstimator()
    assert math.isnan(float(est.value()))
    est.update([torch.ones(3)], [torch.ones(3) * 1.1], batch_size=4)
    clone = NoiseScaleEstimator()
    clone.load_state_dict(est.state_dict())
    assert torch.equal(clone.value(), est.value())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"decay": 1.0}, "`decay` must be in \\[0, 1\\), got 1.0"), ({"decay": -0.1}, "got -0.1")],
)
def test_bad_decay(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NoiseScaleEstimator(**kwargs)


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        NoiseScaleEstimator().update([torch.ones(1)], [torch.ones(1)], batch_size=0)
