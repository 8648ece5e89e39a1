from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from references import explicit_hessian
from torch import Tensor

from lightning_escape.curvature import (
    HessianOperator,
    curvature_along,
    flatten,
    hessian_spectrum,
    hvp,
    lanczos,
    unflatten,
)


class Problem(NamedTuple):
    loss_fn: Callable[[], Tensor]
    params: list[Tensor]
    steps: int


def _mlp(dtype: torch.dtype) -> Problem:
    # 5 -> 10 -> 3 with tanh: 93 parameters, an indefinite Hessian away from a minimum.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=g, dtype=dtype)
    y = torch.randn(32, 3, generator=g, dtype=dtype)
    w1 = (torch.randn(10, 5, generator=g, dtype=dtype) / 5**0.5).requires_grad_()
    b1 = (0.1 * torch.randn(10, generator=g, dtype=dtype)).requires_grad_()
    w2 = (torch.randn(3, 10, generator=g, dtype=dtype) / 10**0.5).requires_grad_()
    b2 = (0.1 * torch.randn(3, generator=g, dtype=dtype)).requires_grad_()

    def loss() -> Tensor:
        return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()

    return Problem(loss, [w1, b1, w2, b2], 30)


_QUAD_EIGS = torch.linspace(-3.0, 5.0, 24, dtype=torch.float64)


def _quadratic(dtype: torch.dtype) -> Problem:
    # f(x) = 1/2 x^T A x + b^T x with A = Q diag(eigs) Q^T: eigenvalues known exactly.
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    a = (q @ torch.diag(_QUAD_EIGS) @ q.T).to(dtype)
    b = torch.randn(24, generator=g, dtype=dtype)
    x = torch.randn(24, generator=g, dtype=dtype).requires_grad_()
    # Split the variable in two tensors to exercise flattening across parameters.
    head, tail = x[:10].detach().clone().requires_grad_(), x[10:].detach().clone().requires_grad_()

    def loss() -> Tensor:
        z = torch.cat([head, tail])
        return 0.5 * z @ a @ z + b @ z

    return Problem(loss, [head, tail], 24)


def _saddle_2d(dtype: torch.dtype) -> Problem:
    # f = x^2 - y^2 + y^4 / 4 at (0, 0): eigenvalues 2 and -2.
    xy = torch.zeros(2, dtype=dtype, requires_grad=True)
    return Problem(lambda: xy[0] ** 2 - xy[1] ** 2 + xy[1] ** 4 / 4, [xy], 30)


def _factorisation(dtype: torch.dtype) -> Problem:
    # f(U) = 1/4 ||U U^T - M||^2 with M = Q diag(m) Q^T, at U = [sqrt(m2) q2, sqrt(m3) q3]: a
    # critical point that skips the top eigenvector, hence a saddle (lambda_min = m3 - m1 < 0).
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    m_eigs = torch.tensor([4.0, 2.5, 1.5, 0.7, 0.3, 0.1], dtype=torch.float64)
    m = (q @ torch.diag(m_eigs) @ q.T).to(dtype)
    u = (q[:, 1:3] * m_eigs[1:3].sqrt()).to(dtype).requires_grad_()
    return Problem(lambda: 0.25 * ((u @ u.T - m) ** 2).sum(), [u], 12)


PROBLEMS = {
    "mlp_tanh": _mlp,
    "quadratic": _quadratic,
    "saddle_2d": _saddle_2d,
    "factorisation": _factorisation,
}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _random_like(params: list[Tensor], seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_hvp_matches_explicit_hessian(name: str) -> None:
    problem = PROBLEMS[name](torch.float64)
    hess = explicit_hessian(problem.loss_fn, problem.params)
    torch.testing.assert_close(hess, hess.T, rtol=0, atol=1e-12)
    for seed in range(3):
        vec = _random_like(problem.params, seed)
        got = flatten(hvp(problem.loss_fn, problem.params, vec))
        want = hess @ flatten(vec)
        err = float((got - want).abs().max())
        assert err <= 1e-6 * max(1.0, float(want.abs().max())), f"{name}: max error {err:.2e}"


def test_hessian_operator_reuses_one_graph() -> None:
    calls = 0
    problem = _mlp(torch.float64)

    def counted() -> Tensor:
        nonlocal calls
        calls += 1
        return problem.loss_fn()

    op = HessianOperator(counted, problem.params)
    products = [op(_random_like(problem.params, s)) for s in range(4)]
    assert calls == 1
    assert len(products) == 4
    assert all(p.grad is None for p in problem.params)  # autograd.grad only, never .grad
    grad = torch.autograd.grad(problem.loss_fn(), problem.params)
    for got, want in zip(op.grad, grad, strict=True):
        torch.testing.assert_close(got, want)
    assert float(op.loss) == pytest.approx(float(problem.loss_fn().detach()))


def test_unused_and_linear_parameters_give_zero_blocks() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    linear = torch.tensor([3.0], requires_grad=True)
    unused = torch.ones(2, 2, requires_grad=True)
    params = [x, linear, unused]

    def loss() -> Tensor:
        return (x**2).sum() + 5 * linear.sum()

    out = hvp(loss, params, [torch.ones(2), torch.ones(1), torch.ones(2, 2)])
    assert torch.equal(out[0], torch.tensor([2.0, 2.0]))
    assert torch.equal(out[1], torch.zeros(1))
    assert torch.equal(out[2], torch.zeros(2, 2))
    op = HessianOperator(loss, params)
    assert torch.equal(op.grad[2], torch.zeros(2, 2))
    hess = explicit_hessian(loss, params)
    assert torch.equal(hess, torch.diag(torch.tensor([2.0, 2, 0, 0, 0, 0, 0], dtype=torch.float64)))
    # A loss linear in everything has a zero Hessian: Lanczos stops at once on it.
    spec = hessian_spectrum(lambda: 5 * linear.sum(), [linear])
    assert (spec.lambda_min, spec.lambda_max, spec.iterations) == (0.0, 0.0, 1)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_lanczos_matches_eigvalsh(
    name: str, dtype_name: str, record_property: Callable[[str, object], None]
) -> None:
    dtype = DTYPES[dtype_name]
    problem = PROBLEMS[name](dtype)
    hess = explicit_hessian(problem.loss_fn, problem.params)
    evals, evecs = torch.linalg.eigh(hess)
    gen = torch.Generator().manual_seed(0)
    spec = hessian_spectrum(problem.loss_fn, problem.params, steps=problem.steps, generator=gen)
    rel_max = abs(spec.lambda_max - float(evals[-1])) / abs(float(evals[-1]))
    rel_min = abs(spec.lambda_min - float(evals[0])) / abs(float(evals[0]))
    # The bottom eigenvector is defined (up to sign) only when the eigenvalue is simple.
    simple = float(evals[1] - evals[0]) > 1e-3 * float(evals.abs().max())
    cos = abs(float(flatten(spec.eigvec_min).double() @ evecs[:, 0])) if simple else math.nan
    report = (
        f"{name}/{dtype_name}: lambda_max {spec.lambda_max:.6g} vs {float(evals[-1]):.6g} "
        f"(rel err {rel_max:.1e}), lambda_min {spec.lambda_min:.6g} vs {float(evals[0]):.6g} "
        f"(rel err {rel_min:.1e}), |cos| {cos:.7f}, {spec.iterations} steps of dim {spec.dim}"
    )
    print(report)
    record_property("report", report)
    assert rel_max < 1e-3, report
    assert rel_min < 1e-3, report
    if simple:
        assert cos > 0.999, report
    assert spec.dim == hess.shape[0]
    assert spec.iterations <= min(problem.steps, spec.dim)
    assert float(flatten(spec.eigvec_min).double().norm()) == pytest.approx(1.0, abs=1e-6)
    for v, p in zip(spec.eigvec_min, problem.params, strict=True):
        assert (v.shape, v.dtype, v.device) == (p.shape, p.dtype, p.device)


def test_quadratic_eigenvalues_are_the_known_ones() -> None:
    problem = _quadratic(torch.float64)
    spec = hessian_spectrum(problem.loss_fn, problem.params, generator=torch.Generator())
    assert spec.lambda_min == pytest.approx(float(_QUAD_EIGS[0]), rel=1e-6)
    assert spec.lambda_max == pytest.approx(float(_QUAD_EIGS[-1]), rel=1e-6)


def test_spectrum_carries_loss_and_gradient_with_descent_orientation() -> None:
    problem = _mlp(torch.float64)
    spec = hessian_spectrum(problem.loss_fn, problem.params, generator=torch.Generator())
    grad = flatten(torch.autograd.grad(problem.loss_fn(), problem.params))
    assert spec.loss == pytest.approx(float(problem.loss_fn().detach()), rel=1e-12)
    assert spec.grad_norm == pytest.approx(float(grad.norm()), rel=1e-12)
    assert spec.grad_dot_eigvec <= 0
    assert spec.grad_dot_eigvec == pytest.approx(float(grad @ flatten(spec.eigvec_min)), rel=1e-9)


def test_reduce_sees_every_product_and_the_gradient() -> None:
    # Doubling in `reduce` is the Hessian of 2 f: every number doubles, the vector does not.
    problem = _quadratic(torch.float64)
    seen: list[int] = []

    def double(t: Tensor) -> Tensor:
        seen.append(t.numel())
        return 2 * t

    plain = hessian_spectrum(problem.loss_fn, problem.params, generator=torch.Generator())
    spec = hessian_spectrum(
        problem.loss_fn, problem.params, generator=torch.Generator(), reduce=double
    )
    assert seen == [25] + [24] * spec.iterations  # gradient + loss packed, then each product
    assert spec.lambda_min == pytest.approx(2 * plain.lambda_min, rel=1e-9)
    assert spec.lambda_max == pytest.approx(2 * plain.lambda_max, rel=1e-9)
    assert spec.loss == pytest.approx(2 * plain.loss, rel=1e-12)
    assert spec.grad_norm == pytest.approx(2 * plain.grad_norm, rel=1e-12)


@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_curvature_along_is_the_rayleigh_quotient_of_the_explicit_hessian(
    name: str, method: str
) -> None:
    # The plain reference: vᵀHv / vᵀv from the whole Hessian, against one product.
    problem = PROBLEMS[name](torch.float64)
    direction = _random_like(problem.params, seed=5)
    v = flatten(direction)
    hess = explicit_hessian(problem.loss_fn, problem.params)
    expected = float(v @ hess @ v / (v @ v))
    curvature, loss = curvature_along(problem.loss_fn, problem.params, direction, method=method)
    assert curvature == pytest.approx(expected, rel=1e-6 if method == "exact" else 1e-4)
    assert loss == float(problem.loss_fn().detach())
    # Along an eigenvector it is the eigenvalue; the scale of the direction does not matter.
    spec = hessian_spectrum(problem.loss_fn, problem.params, generator=torch.Generator())
    scaled = [3.0 * t for t in spec.eigvec_min]
    along, _ = curvature_along(problem.loss_fn, problem.params, scaled, method=method)
    assert along == pytest.approx(spec.lambda_min, rel=1e-6 if method == "exact" else 1e-4)


def test_curvature_along_averages_through_reduce_and_refuses_a_zero_direction() -> None:
    problem = _quadratic(torch.float64)
    direction = _random_like(problem.params, seed=6)
    seen: list[int] = []

    def double(t: Tensor) -> Tensor:
        seen.append(t.numel())
        return 2 * t

    plain = curvature_along(problem.loss_fn, problem.params, direction)
    doubled = curvature_along(problem.loss_fn, problem.params, direction, reduce=double)
    assert seen == [25]  # the product and the loss, packed into one call
    assert doubled == pytest.approx((2 * plain[0], 2 * plain[1]), rel=1e-12)
    zero = [torch.zeros_like(p) for p in problem.params]
    with pytest.raises(ValueError, match="`direction` must not be zero"):
        curvature_along(problem.loss_fn, problem.params, zero)
    with pytest.raises(ValueError, match="`method` must be one of"):
        curvature_along(problem.loss_fn, problem.params, direction, method="lanczos")


def test_same_generator_seed_gives_identical_spectrum() -> None:
    problem = _mlp(torch.float32)
    runs = [
        hessian_spectrum(
            problem.loss_fn, problem.params, steps=10, generator=torch.Generator().manual_seed(3)
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    other = hessian_spectrum(
        problem.loss_fn, problem.params, steps=10, generator=torch.Generator().manual_seed(4)
    )
    assert other != runs[0]


def test_lanczos_stops_on_invariant_subspace_and_caps_steps() -> None:
    # Three distinct eigenvalues: the Krylov space is invariant after three steps.
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=torch.Generator().manual_seed(5)))
    a = q @ torch.diag(torch.tensor([-1.0] * 10 + [2.0] * 10 + [7.0] * 10)) @ q.T
    spec = lanczos(lambda v: [a @ v[0]], [torch.empty(30)], steps=20, generator=torch.Generator())
    assert spec.iterations == 3
    assert (spec.lambda_min, spec.lambda_max) == (pytest.approx(-1.0), pytest.approx(7.0))
    assert spec.residual_min < 1e-4
    tiny = lanczos(lambda v: [2 * v[0]], [torch.empty(1)], steps=50)
    assert (tiny.iterations, tiny.dim, tiny.lambda_min) == (1, 1, pytest.approx(2.0))


def test_lanczos_stops_early_on_residual_tolerance() -> None:
    problem = _quadratic(torch.float64)
    op = HessianOperator(problem.loss_fn, problem.params)
    loose = lanczos(op, problem.params, steps=24, tol=0.05, generator=torch.Generator())
    assert loose.iterations < 24
    scale = max(abs(loose.lambda_min), abs(loose.lambda_max))
    assert max(loose.residual_min, loose.residual_max) <= 0.05 * scale


def test_flatten_unflatten_round_trip() -> None:
    like = [torch.empty(2, 3), torch.empty(4, dtype=torch.float64), torch.empty(())]
    vec = torch.arange(11.0)
    pieces = unflatten(vec, like)
    assert [(p.shape, p.dtype) for p in pieces] == [(t.shape, t.dtype) for t in like]
    assert torch.equal(flatten(pieces, dtype=torch.float32), vec)
    assert flatten(pieces).dtype == torch.float64


def test_non_finite_product_raises() -> None:
    x = torch.tensor([0.0], requires_grad=True)
    with pytest.raises(FloatingPointError, match="not finite"):
        hessian_spectrum(lambda: (x.abs() ** 0.5).sum(), [x])


def test_spectrum_repr_and_describe() -> None:
    spec = hessian_spectrum(*_saddle_2d(torch.float64)[:2], generator=torch.Generator())
    assert "eigvec_min" not in repr(spec)
    assert spec.describe().startswith("negative curvature: lambda_min -2")
    assert dataclasses.replace(spec, loss=1.0) != spec


def _x() -> Tensor:
    return torch.ones(2, requires_grad=True)


def _good_loss() -> Tensor:
    return (_X**2).sum()


_X = _x()

BAD_LANCZOS = [
    ({"steps": 0}, "`steps` must be a positive integer, got 0"),
    ({"steps": -3}, "`steps` must be a positive integer, got -3"),
    ({"steps": 2.5}, "`steps` must be a positive integer, got 2.5"),
    ({"steps": True}, "`steps` must be a positive integer, got True"),
    ({"tol": -1e-3}, "`tol` must be a finite non-negative number, got -0.001"),
    ({"tol": math.nan}, "`tol` must be a finite non-negative number, got nan"),
    ({"tol": math.inf}, "`tol` must be a finite non-negative number, got inf"),
    ({"generator": 7}, "`generator` must be a CPU torch.Generator or None, got 7"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_LANCZOS)
def test_bad_lanczos_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("`", ".")):
        lanczos(lambda v: v, [torch.empty(3)], **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("`", ".")):
        hessian_spectrum(_good_loss, [_X], **kwargs)  # type: ignore[arg-type]


BAD_CALLS: list[tuple[Callable[[], object], str]] = [
    (lambda: flatten([]), r"`tensors` must hold at least one tensor, got \[\]"),
    (lambda: unflatten(torch.zeros(3), [torch.empty(2)]), r"`vec` must be .* got shape \(3,\)"),
    (lambda: lanczos(lambda v: v, []), r"`like` must hold tensors .* got \[\]"),
    (lambda: lanczos(lambda v: [v[0][:1]], [torch.empty(3)]), r"`matvec` must return .*\(1,\)"),
    (lambda: hvp(_good_loss, [], []), r"`params` must hold at least one tensor, got \[\]"),
    (lambda: hvp(_good_loss, [torch.ones(2)], [torch.ones(2)]), r"`params\[0\]` must require"),
    (lambda: hvp(_good_loss, [_X], []), r"`vec` must hold one tensor per parameter \(1\), got 0"),
    (lambda: hvp(_good_loss, [_X], [torch.ones(3)]), r"`vec\[0\]` must have .* got \(3,\)"),
    (lambda: hvp(lambda: _X * 2, [_X], [torch.ones(2)]), r"`loss_fn` must return .*shape \(2,\)"),
    (lambda: hvp(lambda: 1.0, [_X], [torch.ones(2)]), "`loss_fn` must return .*got float"),  # type: ignore[arg-type, return-value]
    (
        lambda: hessian_spectrum(_good_loss, [_X], reduce=lambda t: t[:1]),
        r"`reduce` must return a tensor of the shape of its input \(3,\), got torch.Size\(\[1\]\)",
    ),
    (
        lambda: hessian_spectrum(_good_loss, [_X], reduce=3),
        "`reduce` must be callable or None, got 3",
    ),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("call", "message"), BAD_CALLS)
def test_bad_arguments(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def _rank_problem(rank: int) -> Problem:
    # The same network on every rank, a different half of the data on each.
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(3, 4, generator=g, dtype=torch.float64) / 2).requires_grad_()
    x = torch.randn(2, 16, 4, generator=g, dtype=torch.float64)
    y = torch.randn(2, 16, 3, generator=g, dtype=torch.float64)
    half = slice(None) if rank < 0 else slice(rank, rank + 1)

    def loss() -> Tensor:
        return ((torch.tanh(x[half] @ w.T) - y[half]) ** 2).mean()

    return Problem(loss, [w], 12)


def _mean_over_ranks(t: Tensor) -> Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _ddp_worker(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        problem = _rank_problem(rank)
        spec = hessian_spectrum(
            problem.loss_fn,
            problem.params,
            generator=torch.Generator().manual_seed(0),
            reduce=_mean_over_ranks,
        )
        torch.save(dataclasses.asdict(spec), f"{store}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_reduce_under_two_processes_gives_identical_spectra(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # fork, not spawn: the children need nothing the parent has not imported, and re-importing
    # torch in two fresh processes would take most of the test's time.
    mp.start_processes(_ddp_worker, args=(store,), nprocs=2, join=True, start_method="fork")
    results = [torch.load(f"{store}.{rank}") for rank in range(2)]
    assert results[0].keys() == results[1].keys()
    for key, value in results[0].items():
        other = results[1][key]
        if key == "eigvec_min":
            assert all(torch.equal(a, b) for a, b in zip(value, other, strict=True))
        else:
            assert value == other, key
    # The averaged products are the products of the averaged loss: one process on all data.
    whole = _rank_problem(-1)
    single = hessian_spectrum(
        whole.loss_fn, whole.params, generator=torch.Generator().manual_seed(0)
    )
    assert results[0]["lambda_min"] == pytest.approx(single.lambda_min, rel=1e-9)
    assert results[0]["lambda_max"] == pytest.approx(single.lambda_max, rel=1e-9)
    assert results[0]["grad_norm"] == pytest.approx(single.grad_norm, rel=1e-9)
    assert results[0]["loss"] == pytest.approx(single.loss, rel=1e-12)
