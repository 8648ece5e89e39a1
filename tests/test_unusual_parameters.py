"""Parameters off the beaten path: embedding padding rows, sparse gradients, complex values.

Each must be watched, probed, escaped and rolled back as correctly as a plain float weight, or be
left alone with a clear reason; never crash the fit or change what training would not change.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from models import fit, forcing_detector, same_state
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_escape
from lightning_escape import (
    EscapeCallback,
    GradientMonitor,
    GradientNoise,
    NegativeCurvatureStep,
    Perturb,
    Restandardize,
    TrustRatioStep,
)
from lightning_escape._lightning import step_index
from lightning_escape.curvature import Spectrum, hessian_spectrum
from lightning_escape.escapes import EscapeContext, EscapeStep
from lightning_escape.policy import ESCAPABLE
from lightning_escape.probe import probe_curvature
from lightning_escape.signals import count_nonfinite, foreach_norms, reference_norms


class StatesByStep(pl.Callback):
    """The module's state after each batch, by the step index events use (a batch stepping two
    optimizers by hand is one step); before or after the escape callback, by its place."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, Tensor]] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        step = step_index(trainer)
        self.by_step[step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _forced(steps: list[EscapeStep], *, monitor: str | None = None, **kwargs: Any) -> Any:
    """An escape callback that calls a stall at its first checks and escapes with ``steps``."""
    detector = forcing_detector(monitor, smoothing=0.0)
    settings: dict[str, Any] = {"probation_steps": 4, "cooldown_steps": 0, "max_failures": 50}
    settings.update(kwargs)
    return EscapeCallback(detector, ladders={k: list(steps) for k in ESCAPABLE}, **settings)


def _assert_rollbacks_exact(escape: Any, before: StatesByStep, after: StatesByStep) -> int:
    """Every rolled-back escape left the state it started from, bit for bit; how many there were."""
    checked = 0
    events = escape.events
    for i, event in enumerate(events):
        if event.verdict != "rolled_back" or event.end_step is None:
            continue
        if i + 1 < len(events) and events[i + 1].step == event.end_step:
            continue  # the next escape acted at once: the state after it is its own
        assert same_state(before.by_step[event.step], after.by_step[event.end_step]), event
        checked += 1
    return checked


# ---------------------------------------------------------------------------- padding rows


class Padded(pl.LightningModule):
    """An embedding with a padding row (and padding in the data) under a linear head."""

    def __init__(self, sparse: bool = False, unused: bool = False, score: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4, padding_idx=0, sparse=sparse)
        self.head = nn.Linear(4, 1)
        self.unused = nn.Parameter(torch.zeros(3)) if unused else None
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, 10, (64, 5), generator=g)
        self.x[:, -1] = 0  # padding in every example
        self.y = torch.randn(64, 1, generator=g)
        self.score = score

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(x)).mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        if self.score:
            # Flat, then far better after step 12: an escape at step 5 is kept.
            self.log("score", 1.0 if self.global_step < 12 else 0.01)
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


def _padded_context(model: Padded) -> tuple[EscapeContext, torch.optim.Optimizer]:
    """A context after one backward on a batch with padding, gradients in place."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (model.x[:16], model.y[:16])

    def loss() -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(model(batch[0]), batch[1]))

    nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
    return EscapeContext(model, [opt], step=3, loss=loss), opt


def test_fixed_entries_are_the_padding_rows() -> None:
    from lightning_escape.escapes import fixed_entries

    emb = nn.Embedding(10, 4, padding_idx=-2)  # normalised to 8 by torch
    bag = nn.EmbeddingBag(6, 3, padding_idx=1)
    model = nn.ModuleDict({"emb": emb, "bag": bag, "plain": nn.Embedding(5, 2)})
    fixed = fixed_entries(model)
    assert {k: v.tolist() for k, v in fixed.items()} == {id(emb.weight): [8], id(bag.weight): [1]}


def _negative_spectrum(model: nn.Module) -> Spectrum:
    """A made-up probe result whose eigenvector moves every entry, padding rows included."""
    g = torch.Generator().manual_seed(3)
    params = [p for p in model.parameters() if p.requires_grad]
    vec = [torch.randn(p.shape, generator=g) for p in params]
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in vec))
    vec = [v / norm for v in vec]
    dim = sum(p.numel() for p in params)
    return Spectrum(1.0, -1.0, vec, 0.0, 0.0, 5, dim)


@pytest.mark.parametrize("kind", ["perturb", "noise", "ncs", "trust"])
def test_escapes_leave_padding_rows_bitwise(kind: str) -> None:
    model = Padded()
    with torch.no_grad():
        model.emb.weight[0] = -0.0  # a sign bit an escape adding zeros would flip
    pad = model.emb.weight[0].clone()
    ctx, opt = _padded_context(model)
    assert bool((model.emb.weight.grad[0] == 0).all())
    if kind == "perturb":
        Perturb(radius=1.0).apply(ctx)
    elif kind == "noise":
        noise = GradientNoise(eta=1.0)
        noise.apply(ctx)
        noise.before_optimizer_step(ctx, opt)
        assert torch.equal(model.emb.weight.grad[0], torch.zeros(4))
        opt.step()
    elif kind == "ncs":
        ctx.spectrum = _negative_spectrum(model)
        assert NegativeCurvatureStep().unavailable(ctx) is None
        NegativeCurvatureStep().apply(ctx)
    else:
        with torch.no_grad():
            model.emb.weight[0] = 0.5  # weight decay moves a nonzero padding row
        opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5)
        ctx.optimizers = [opt]
        trust = TrustRatioStep(trust=0.5, min_spread=1.0)
        trust.before_optimizer_step(ctx, opt)
        opt.step()
        trained = model.emb.weight[0].clone()
        trust.after_optimizer_step(ctx, opt)
        # The optimizer's own move of the row (weight decay) stays; the escape adds nothing.
        assert torch.equal(model.emb.weight[0].view(torch.int32), trained.view(torch.int32))
        return
    assert torch.equal(model.emb.weight[0].view(torch.int32), pad.view(torch.int32))
    assert not torch.equal(model.emb.weight[1:], Padded().emb.weight[1:])  # the rest moved


@pytest.mark.parametrize("kind", ["perturb", "noise", "ncs"])
def test_a_kept_escape_leaves_the_padding_row(kind: str) -> None:
    step = {
        "perturb": Perturb(radius=0.5),
        "noise": GradientNoise(eta=1.0, steps=10),
        "ncs": NegativeCurvatureStep(),
    }[kind]
    model = Padded(score=True)
    escape = _forced([step], monitor="score", probation_steps=10, max_escapes=1)
    fit(model, [escape], max_steps=30)
    assert [e.verdict for e in escape.events] == ["accepted"]
    assert torch.equal(model.emb.weight[0], torch.zeros(4))


def test_a_tensor_without_a_gradient_is_left_alone() -> None:
    model = Padded(unused=True)
    ctx, _ = _padded_context(model)
    assert model.unused is not None and model.unused.grad is None
    assert id(model.unused) not in {id(p) for p in ctx.params()}
    head = model.head.weight.clone()
    Perturb(radius=1.0).apply(ctx)
    assert torch.equal(model.unused, torch.zeros(3))
    assert not torch.equal(model.head.weight, head)


def test_without_any_gradient_every_trained_tensor_is_moved() -> None:
    # A context built outside a training step (no gradients at all): nothing to tell them apart.
    model = nn.Linear(3, 2)
    ctx = EscapeContext(model, [torch.optim.SGD(model.parameters(), lr=0.1)])
    assert len(ctx.params()) == 2


# ---------------------------------------------------------------------------- sparse gradients


def _sparse_grad() -> tuple[Tensor, Tensor]:
    """An uncoalesced sparse embedding gradient (repeated rows) and its dense counterpart."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True, padding_idx=0)
    x = torch.tensor([[0, 1, 1, 3], [2, 0, 3, 3]])
    emb(x).pow(2).sum().backward()
    grad = emb.weight.grad
    assert grad is not None and grad.is_sparse and not grad.is_coalesced()
    return grad, grad.to_dense()


@pytest.mark.parametrize("foreach", [True, False])
def test_sparse_gradient_norms_match_the_dense_reference(foreach: bool) -> None:
    sparse, dense = _sparse_grad()
    other = torch.randn(3, 5)
    got = foreach_norms([sparse, other], foreach=foreach)
    want = [torch.linalg.vector_norm(t.double()) for t in (dense, other)]
    for g, w in zip(got, want):
        assert float(g) == pytest.approx(float(w), rel=1e-6)
    bad = sparse.coalesce()
    bad.values()[0, 0] = math.inf
    assert int(count_nonfinite([bad, other])) == 1
    assert int(count_nonfinite([bad], foreach_norms([bad]))) == 1


class SparseEmb(pl.LightningModule):
    """An embedding with sparse gradients, trained by SGD (or, by hand, SparseAdam and Adam)."""

    def __init__(self, sparse: bool = True, adam: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4, sparse=sparse)
        self.hidden = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, 10, (64, 5), generator=g)
        self.y = torch.randn(64, 1, generator=g)
        self.adam = adam
        # Two optimizers: Lightning steps them only by hand.
        self.automatic_optimization = not adam

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        hidden = torch.tanh(self.hidden(torch.tanh(self.emb(x)).mean(1)))
        loss = nn.functional.mse_loss(self.head(hidden), y)
        self.log("train_loss", loss)
        if self.adam:
            opts = self.optimizers()
            for opt in opts:
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in opts:
                opt.step()
        return loss

    def configure_optimizers(self) -> Any:
        if self.adam:
            return [
                torch.optim.SparseAdam([self.emb.weight], lr=1e-2),
                torch.optim.Adam([*self.hidden.parameters(), *self.head.parameters()], lr=1e-2),
            ]
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


class DenseNorms(pl.Callback):
    """Reference: the total gradient norm of every step, from densified float64 gradients."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        total = sum(
            float(p.grad.to_dense().double().pow(2).sum())
            for p in pl_module.parameters()
            if p.grad is not None
        )
        self.norms.append(math.sqrt(total))


class LastNorm(pl.Callback):
    def __init__(self, monitor: GradientMonitor) -> None:
        self.monitor = monitor
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        norm = self.monitor.grad_norm
        self.norms.append(math.nan if norm is None else float(norm))


def test_the_monitor_counts_sparse_gradients() -> None:
    monitor = GradientMonitor(log_every_n_steps=2, histogram_every_n_steps=2)
    reference, last = DenseNorms(), LastNorm(monitor)
    fit(SparseEmb(), [monitor, reference, last], max_steps=6)
    assert last.norms == pytest.approx(reference.norms, rel=1e-5)


def test_the_probe_handles_sparse_gradients() -> None:
    batch = (SparseEmb().x[:16], SparseEmb().y[:16])
    sparse = probe_curvature(SparseEmb(sparse=True), batch, steps=8, method="exact")
    dense = probe_curvature(SparseEmb(sparse=False), batch, steps=8, method="exact")
    assert sparse.lambda_min == pytest.approx(dense.lambda_min, rel=1e-4, abs=1e-6)
    assert sparse.lambda_max == pytest.approx(dense.lambda_max, rel=1e-4)
    assert sparse.grad_norm == pytest.approx(dense.grad_norm, rel=1e-5)
    fd = probe_curvature(SparseEmb(sparse=True), batch, steps=8, method="finite_difference")
    assert fd.lambda_max == pytest.approx(dense.lambda_max, rel=1e-2)


def test_gradient_noise_on_a_sparse_gradient_stays_sparse() -> None:
    grad, _ = _sparse_grad()
    rows = sorted(set(grad.coalesce().indices()[0].tolist()))
    weight = nn.Parameter(torch.zeros(10, 4))
    weight.grad = grad.clone()
    opt = torch.optim.SGD([weight], lr=0.1)
    GradientNoise(eta=1.0).add_noise(opt, t=0, step=0)
    noisy = weight.grad
    assert noisy is not None and noisy.is_sparse
    moved = (noisy.to_dense() - grad.to_dense()).abs().sum(1)
    assert sorted(moved.nonzero().flatten().tolist()) == rows  # noise on the rows it holds


# Under manual optimization (SparseAdam) the probe has no batch without a `loss_fn`, so the
# negative-curvature step runs under SGD only.
@pytest.mark.parametrize(
    ("kind", "adam"),
    [
        (k, a)
        for k in ("noise", "perturb", "trust", "ncs")
        for a in (False, True)
        if (k, a) != ("ncs", True)
    ],
)
def test_escapes_run_on_sparse_gradients(kind: str, adam: bool) -> None:
    step = {
        "noise": GradientNoise(eta=1.0, steps=4),
        "perturb": Perturb(radius=0.5),
        "trust": TrustRatioStep(min_spread=1.0, steps=3),
        "ncs": NegativeCurvatureStep(),
    }[kind]
    model = SparseEmb(adam=adam)
    before, after = StatesByStep(), StatesByStep()
    escape = _forced([step], monitor="train_loss" if adam else None)
    # By hand, each of the two optimizers counts a step.
    fit(model, [before, escape, after], max_steps=40 if adam else 16)
    assert escape.events, "the forced detector should have escaped"
    _assert_rollbacks_exact(escape, before, after)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------------------- complex parameters


class ComplexNet(pl.LightningModule):
    """A complex linear map, its magnitude read out by a real linear layer: a real loss."""

    def __init__(self, score: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(8, 4, dtype=torch.complex64) * 0.3)
        self.b = nn.Parameter(torch.zeros(4, dtype=torch.complex64))
        self.out = nn.Linear(4, 1)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 8, dtype=torch.complex64, generator=g)
        self.y = torch.randn(64, 1, generator=g)
        self.score = score

    def forward(self, x: Tensor) -> Tensor:
        return self.out((x @ self.w + self.b).abs())

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("foreach", [True, False])
def test_complex_norms_match_torch(dtype: torch.dtype, foreach: bool) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, 3, dtype=dtype, generator=g), torch.randn(4, generator=g)]
    got = foreach_norms(tensors, foreach=foreach)
    for n, t in zip(got, tensors):
        assert not n.is_complex()
        assert float(n) == pytest.approx(float(torch.linalg.vector_norm(t)), rel=1e-6)
    assert got[0].dtype == (torch.float64 if dtype == torch.complex128 else torch.float32)
    assert torch.equal(reference_norms(tensors)[0], torch.linalg.vector_norm(tensors[0]))


@pytest.mark.parametrize("name", ["GradientMonitor", "StallDetector", "EscapeCallback"])
def test_every_callback_runs_on_complex_parameters(name: str) -> None:
    callback = getattr(lightning_escape, name)()
    fit(ComplexNet(), [callback], max_steps=10, log_every_n_steps=2)


def test_the_hessian_of_complex_parameters_is_that_of_their_real_parts() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.complex128, generator=g)
    y = torch.randn(6, dtype=torch.float64, generator=g)
    w0 = torch.randn(3, dtype=torch.complex128, generator=g)

    def loss_of(w: Tensor) -> Tensor:
        return ((x @ w).abs() - y).pow(2).mean() + (w.abs() ** 4).sum() * 0.1

    z = w0.clone().requires_grad_(True)
    r = torch.view_as_real(w0).clone().requires_grad_(True)
    kw: dict[str, Any] = {"steps": 6, "generator": None, "tol": 0.0}
    for method in ("exact", "finite_difference"):
        got = hessian_spectrum(lambda: loss_of(z), [z], method=method, **kw)
        want = hessian_spectrum(lambda: loss_of(torch.view_as_complex(r)), [r], **kw)
        assert got.dim == want.dim == 6
        assert got.lambda_min == pytest.approx(want.lambda_min, rel=1e-5)
        assert got.lambda_max == pytest.approx(want.lambda_max, rel=1e-5)
        assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-9)
        assert got.eigvec_min[0].dtype == torch.complex128


def test_complex_escapes_move_real_and_imaginary_parts() -> None:
    model = ComplexNet()
    nn.functional.mse_loss(model(model.x[:16]), model.y[:16]).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctx = EscapeContext(model, [opt], step=1)
    w = model.w.detach().clone()
    Perturb(radius=0.5).apply(ctx)
    jump = model.w.detach() - w
    assert float(jump.real.abs().max()) > 0 and float(jump.imag.abs().max()) > 0
    grad = model.w.grad.clone()
    GradientNoise(eta=1.0).before_optimizer_step(ctx, opt)
    noise = model.w.grad - grad
    assert float(noise.real.abs().max()) > 0 and float(noise.imag.abs().max()) > 0


def test_complex_gradient_noise_has_the_variance_of_each_real_coordinate() -> None:
    weight = nn.Parameter(torch.zeros(200_000, dtype=torch.complex64))
    weight.grad = torch.zeros_like(weight)
    GradientNoise(eta=0.3).add_noise(torch.optim.SGD([weight], lr=0.1), t=0, step=0)
    parts = torch.view_as_real(weight.grad)
    assert float(parts.var()) == pytest.approx(0.3, rel=0.02)


@pytest.mark.parametrize("kind", ["perturb", "noise", "ncs", "trust", "default"])
def test_forced_escapes_on_complex_parameters_roll_back_exactly(kind: str) -> None:
    ladder = {
        "perturb": [Perturb(radius=1.0)],
        "noise": [GradientNoise(eta=1.0, steps=4)],
        "ncs": [NegativeCurvatureStep()],
        "trust": [TrustRatioStep(min_spread=1.0, steps=3)],
        "default": [Perturb(), Restandardize(), NegativeCurvatureStep()],
    }[kind]
    model = ComplexNet()
    before, after = StatesByStep(), StatesByStep()
    escape = _forced(ladder)
    fit(model, [before, escape, after], max_steps=24)
    assert escape.events
    if kind != "default":
        assert escape.events[0].action.startswith(type(ladder[0]).__name__)
    _assert_rollbacks_exact(escape, before, after)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_complex_units_are_copies_only_if_their_imaginary_parts_agree() -> None:
    from lightning_escape.units import find_symmetric_units

    layer = nn.Linear(3, 4, dtype=torch.complex64)
    with torch.no_grad():
        layer.weight[1] = layer.weight[0]
        layer.bias[1] = layer.bias[0]
        layer.weight[2] = layer.weight[0].real + 1j * (layer.weight[0].imag + 1.0)
        layer.bias[2] = layer.bias[0]
    groups = find_symmetric_units(nn.Sequential(layer))
    assert [g.units for g in groups] == [(0, 1)]
