from __future__ import annotations

import math
import pickle
from typing import Any

import pytest
import torch
from torch import nn

from lightning_escape import (
    BatchSizeChange,
    GradientNoise,
    LRKick,
    NegativeCurvatureStep,
    Perturb,
    Restandardize,
)
from lightning_escape.curvature import hessian_spectrum
from lightning_escape.escapes import EscapeContext, EscapeStep


def _zero_grad_model(n: int) -> nn.Module:
    model = nn.Linear(n, 1, bias=False)
    model.weight.grad = torch.zeros_like(model.weight)
    return model


@pytest.mark.parametrize(("eta", "gamma"), [(0.01, 0.55), (0.3, 0.55), (1.0, 1.0)])
@pytest.mark.parametrize("t", [0, 9, 99, 999])
def test_noise_variance_follows_the_annealing_law(eta: float, gamma: float, t: int) -> None:
    model = _zero_grad_model(400_000)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noise = GradientNoise(eta=eta, gamma=gamma, steps=10_000)
    noise.apply(EscapeContext(model, [opt], step=50))
    noise.before_optimizer_step(EscapeContext(model, [opt], step=50 + t), opt)
    grad = model.weight.grad
    want = eta / (1 + t) ** gamma
    # 4e5 draws: the sample variance is within 1% of the truth with overwhelming probability
    assert grad.var().item() == pytest.approx(want, rel=0.01)
    assert abs(grad.mean().item()) < 5 * math.sqrt(want / grad.numel())


def test_noise_is_the_same_for_the_same_step_and_differs_across_steps() -> None:
    draws = []
    for step in (7, 7, 8):
        model = _zero_grad_model(64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        GradientNoise(seed=3).add_noise(opt, t=0, step=step)
        draws.append(model.weight.grad.clone())
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_noise_is_multiplied_by_the_loss_scale_of_scaled_gradients() -> None:
    a, b = _zero_grad_model(32), _zero_grad_model(32)
    GradientNoise().add_noise(torch.optim.SGD(a.parameters(), lr=1), t=0, step=0)
    GradientNoise().add_noise(
        torch.optim.SGD(b.parameters(), lr=1), t=0, step=0, scale=torch.tensor(1024.0)
    )
    assert torch.allclose(b.weight.grad, a.weight.grad * 1024)


def test_perturb_scales_to_each_tensor() -> None:
    model = nn.Sequential(nn.Linear(100, 400), nn.Linear(400, 1))
    with torch.no_grad():
        model[0].weight.mul_(0).add_(3.0)  # rms 3 > 1/sqrt(100)
        model[1].weight.mul_(0)  # rms 0: the initialisation scale 1/sqrt(400) applies
    before = [p.detach().clone() for p in model.parameters()]
    Perturb(radius=0.2).apply(EscapeContext(model, step=5))
    jumps = [p.detach() - b for p, b in zip(model.parameters(), before)]
    assert jumps[0].std().item() == pytest.approx(0.2 * 3.0, rel=0.02)
    assert jumps[2].std().item() == pytest.approx(0.2 / 20, rel=0.1)
    # rms scale only: a zero tensor does not move
    model2 = nn.Linear(4, 4)
    with torch.no_grad():
        model2.weight.zero_()
    Perturb(radius=0.2, scale="rms").apply(EscapeContext(model2, step=5))
    assert torch.equal(model2.weight, torch.zeros(4, 4))


def test_perturb_is_deterministic_in_seed_and_step() -> None:
    def jump(seed: int, step: int) -> torch.Tensor:
        torch.manual_seed(123)
        model = nn.Linear(8, 8)
        before = model.weight.detach().clone()
        Perturb(seed=seed).apply(EscapeContext(model, step=step))
        return model.weight.detach() - before

    assert torch.equal(jump(0, 10), jump(0, 10))
    assert not torch.equal(jump(0, 10), jump(0, 11))
    assert not torch.equal(jump(1, 10), jump(0, 10))


class _Saddle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.xy = nn.Parameter(torch.tensor([1e-4, 0.0], dtype=torch.float64))

    def loss(self) -> torch.Tensor:
        x, y = self.xy
        return x**2 - y**2 + y**4 / 4


def test_negative_curvature_step_goes_down_the_saddle() -> None:
    model = _Saddle()
    spectrum = hessian_spectrum(model.loss, [model.xy], generator=torch.Generator().manual_seed(0))
    assert spectrum.lambda_min == pytest.approx(-2.0)
    ctx = EscapeContext(model, step=0, spectrum=spectrum, loss=lambda: float(model.loss()))
    step = NegativeCurvatureStep()
    assert step.unavailable(ctx) is None
    text = step.apply(ctx)
    assert abs(model.xy[0].item()) < 1e-3  # moved along y only
    assert 0.5 < abs(model.xy[1].item()) < 2.0
    assert float(model.loss()) < -0.7
    assert "λ_min = -2" in text


def test_negative_curvature_step_needs_negative_curvature() -> None:
    model = _Saddle()
    ctx = EscapeContext(model, step=0)
    assert NegativeCurvatureStep().unavailable(ctx) == "no curvature probe result"


def test_lr_kick_restores_exact_values_including_tensor_rates() -> None:
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = torch.optim.SGD(
        [{"params": [p], "lr": 0.1}, {"params": [], "lr": torch.tensor(0.03)}], lr=0.1
    )
    kick = LRKick(factor=3.0, steps=2)
    ctx = EscapeContext(nn.Linear(1, 1), [opt], step=0)
    kick.before_optimizer_step(ctx, opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.3)
    assert opt.param_groups[1]["lr"].item() == pytest.approx(0.09)
    kick.after_optimizer_step(ctx, opt)
    assert opt.param_groups[0]["lr"] == 0.1  # the saved value, not 0.3 / 3
    assert opt.param_groups[1]["lr"].item() == torch.tensor(0.03).item()


def test_lr_kick_skips_steps_with_nonfinite_gradients() -> None:
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, math.inf, 0.0])
    opt = torch.optim.SGD([p], lr=0.1)
    kick = LRKick()
    kick.before_optimizer_step(EscapeContext(nn.Linear(1, 1), [opt]), opt)
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize(
    "step",
    [
        GradientNoise(eta=0.1, gamma=0.3, steps=5, seed=2),
        Perturb(radius=0.3, scale="rms"),
        LRKick(factor=4.0, steps=7),
        BatchSizeChange(factor=2.0, steps=9, method="accumulation"),
        NegativeCurvatureStep(scale=0.5, max_evals=3),
    ],
)
def test_steps_pickle_describe_and_get_stronger(step: Any) -> None:
    clone = pickle.loads(pickle.dumps(step))
    assert clone.describe() == step.describe()
    stronger = step.stronger()
    assert type(stronger) is type(step)
    assert stronger.describe() != step.describe()
    assert type(step)(**step.config()).describe() == step.describe()


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: GradientNoise(eta=0), "`eta` must be a positive finite number, got 0"),
        (lambda: GradientNoise(gamma=-1), "`gamma` must be a finite non-negative number, got -1"),
        (lambda: GradientNoise(gamma=math.inf), "`gamma` must be a finite non-negative number"),
        (lambda: GradientNoise(steps=0), "`steps` must be a positive integer, got 0"),
        (lambda: Perturb(radius=-0.1), "`radius` must be a positive finite number, got -0.1"),
        (lambda: Perturb(scale="max"), "`scale` can be 'auto', 'rms', got 'max'"),
        (lambda: LRKick(factor=0.0), "`factor` must be a positive finite number, got 0.0"),
        (lambda: LRKick(steps=1.5), "`steps` must be a positive integer, got 1.5"),
        (lambda: LRKick(factor=1), "`factor` must differ from 1, got 1.0"),
        (lambda: BatchSizeChange(factor=1.0), "`factor` must differ from 1, got 1.0"),
        (
            lambda: BatchSizeChange(method="sampler"),
            "`method` can be 'auto', 'accumulation', 'dataloader', got 'sampler'",
        ),
        (
            lambda: NegativeCurvatureStep(scale=math.inf),
            "`scale` must be a positive finite number, got inf",
        ),
        (
            lambda: NegativeCurvatureStep(max_evals=0),
            "`max_evals` must be a positive integer, got 0",
        ),
    ],
)
def test_bad_arguments(factory: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


def _partly_frozen() -> tuple[nn.Sequential, nn.ModuleDict, torch.optim.Optimizer]:
    """A tanh net whose first layer is in a group at rate 0, beside an average in no optimizer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    model = nn.ModuleDict({"net": net, "average": torch.optim.swa_utils.AveragedModel(net)})
    trained = [*net[2].parameters(), *net[4].parameters()]
    opt = torch.optim.SGD([{"params": net[0].parameters(), "lr": 0.0}, {"params": trained}], lr=0.1)
    return net, model, opt


@pytest.mark.parametrize(
    "step", [Perturb(0.5), Restandardize()], ids=lambda step: type(step).__name__
)
def test_escapes_move_only_what_the_optimizers_train(step: EscapeStep) -> None:
    # A group at learning rate 0 is frozen by its user, and a tensor in no optimizer (an average
    # of the weights kept in the module) is not trained: Perturb and Restandardize moved both.
    net, model, opt = _partly_frozen()
    x = torch.randn(64, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = EscapeContext(model, [opt], loss=lambda: float(net(x).square().mean()))
    trained = [*net[2].parameters(), *net[4].parameters()]
    assert [id(p) for p in ctx.params()] == [id(p) for p in trained]
    assert step.unavailable(ctx) is None
    step.apply(ctx)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= {"net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias"}, moved


def test_a_negative_curvature_step_leaves_a_group_at_rate_zero_where_it_is() -> None:
    # The probe differentiates every parameter that requires grad; the step moves the trained ones.
    net, model, opt = _partly_frozen()
    x = torch.randn(64, 4)

    def loss() -> torch.Tensor:
        return (net(x) - torch.sin(x[:, :1] * 3)).square().mean()

    probed = [p for p in model.parameters() if p.requires_grad]
    spectrum = hessian_spectrum(loss, probed, generator=torch.Generator().manual_seed(0))
    assert spectrum.lambda_min < 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = EscapeContext(model, [opt], spectrum=spectrum, loss=lambda: float(loss()))
    assert NegativeCurvatureStep().unavailable(ctx) is None
    NegativeCurvatureStep().apply(ctx)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= {"net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias"}, moved


def test_lr_kick_is_passed_over_under_lbfgs() -> None:
    # LBFGS reads its rate before it first calls the closure, inside which the kick is made:
    # the kick changed nothing, yet was judged as an escape.
    net = nn.Linear(2, 1)
    lbfgs = torch.optim.LBFGS(net.parameters())
    assert "LBFGS" in (LRKick().unavailable(EscapeContext(net, [lbfgs])) or "")
    assert LRKick().unavailable(EscapeContext(net, [torch.optim.SGD(net.parameters())])) is None


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=0.01),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1),
        lambda ps: torch.optim.Rprop(ps, lr=0.01),
        lambda ps: torch.optim.ASGD(ps, lr=0.01),
    ],
    ids=["SGD", "Adam", "Adagrad", "Rprop", "ASGD"],
)
def test_lr_kick_is_offered_where_it_changes_the_kicked_steps(make: Any) -> None:
    # Rprop reads its rate once, at its first step; ASGD steps with the rate its previous step
    # computed. A kick there left its window's steps as they were, yet was judged as an escape.
    x, y = torch.randn(32, 2, generator=torch.Generator().manual_seed(0)), torch.randn(32, 1)

    def updates(kick: LRKick | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = nn.Linear(2, 1)
        opt = make(net.parameters())
        moved = []
        for step in range(4):
            opt.zero_grad()
            (net(x) - y).square().mean().backward()
            before = net.weight.detach().clone()
            kicked = kick is not None and step >= 2  # two plain steps, then the window
            if kicked:
                kick.before_optimizer_step(EscapeContext(net, [opt], step=step), opt)
            opt.step()
            if kicked:
                kick.after_optimizer_step(EscapeContext(net, [opt], step=step), opt)
            moved.append(net.weight.detach() - before)
        return moved

    kick = LRKick(factor=10.0, steps=2)
    plain, kicked = updates(None), updates(kick)
    changed = [not torch.equal(a, b) for a, b in zip(plain, kicked)]
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    offered = kick.unavailable(EscapeContext(net, [make(net.parameters())])) is None
    # Offered exactly where the window's own steps (and no step before them) change.
    assert changed[:2] == [False, False]
    assert offered == (changed[2:] == [True, True]), (offered, changed)


def test_a_negative_curvature_step_moves_bfloat16_weights() -> None:
    # A saddle at w = 1 (64 coordinates, curvature -1 along the first): the first length of the
    # line search, 1e-3, is below bfloat16's rounding of 1 (1/128), so the search ended at once
    # and the step changed nothing.
    module = nn.Module()
    module.w = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))

    def loss(w: torch.Tensor) -> torch.Tensor:
        d = w.float() - 1
        return d.square().sum() - 1.5 * d[0].square() + 0.1 * d[0] ** 4

    w32 = torch.ones(64, requires_grad=True)
    spectrum = hessian_spectrum(
        lambda: loss(w32), [w32], generator=torch.Generator().manual_seed(0)
    )
    assert spectrum.lambda_min == pytest.approx(-1.0, abs=1e-4)
    ctx = EscapeContext(module, spectrum=spectrum, loss=lambda: float(loss(module.w)))
    said = NegativeCurvatureStep().apply(ctx)
    assert float(loss(module.w)) < 0, said  # down the saddle (it was 0)
    assert module.w.dtype == torch.bfloat16 and float((module.w.float() - 1).abs()[1:].max()) < 0.01


def test_a_kick_below_one_is_made_stronger_away_from_one() -> None:
    # Doubling a cut of 0.5 made it 1.0, which the constructor refuses: the fit crashed at the
    # first escalation; 0.1 doubled towards 1 and then into a raise (0.2, 0.4, 0.8, 1.6).
    factors = [LRKick(factor=0.5)]
    for _ in range(3):
        factors.append(factors[-1].stronger())
    assert [k.factor for k in factors] == [0.5, 0.25, 0.125, 0.0625]
    assert LRKick(factor=10.0).stronger().factor == 20.0
    assert LRKick(factor=1.5).stronger().factor == 3.0
