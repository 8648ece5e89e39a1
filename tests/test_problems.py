from __future__ import annotations

import math
import pickle
from typing import Any

import pytest
import torch
from lightning.pytorch.utilities.parsing import lightning_setattr
from models import bare_trainer
from torch import nn

from benchmarks.problems import (
    PROBLEMS,
    DeepTanhDigits,
    DigitsMLP,
    Diverging,
    Rastrigin2D,
    SparseParity,
    TargetTracker,
    make_problem,
    problem_loss,
    train_plain,
)
from lightning_escape.demos.problems import (
    DeadReLU,
    DeepLinear,
    MatrixFactorization,
    MonkeySaddle2D,
    Problem,
    SixHumpCamel,
    StrictSaddle2D,
    SymmetricTeacherStudent,
    TeacherStudent,
)


def _parameters(problem: Problem) -> list[torch.Tensor]:
    return [p.detach().clone() for p in problem.parameters()]


# ------------------------------------------------------------------------------------------------
# Every problem
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_trains_a_few_steps_in_lightning_and_scores_itself(name: str) -> None:
    problem = make_problem(name, seed=0)
    tracker = TargetTracker(every_n_steps=1)
    trainer = bare_trainer(3, tracker)
    trainer.fit(problem)

    assert trainer.global_step == 3
    assert "train_loss" in trainer.callback_metrics
    assert [step for step, _ in tracker.history] == [0, 1, 2, 3]
    value = problem.metric()
    assert isinstance(value, float)
    assert problem.solved() is problem.meets_target(value)
    assert isinstance(problem.target, float)
    assert PROBLEMS[name].category in ("stuck", "control", "hidden-progress")
    assert PROBLEMS[name].benchmark_steps > 0


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_pickles_and_rebuilds_identically(name: str) -> None:
    problem = make_problem(name, seed=1)
    clone = pickle.loads(pickle.dumps(problem))
    rebuilt = make_problem(name, seed=1)

    for a, b, c in zip(_parameters(problem), _parameters(clone), _parameters(rebuilt)):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
    assert clone.metric() == problem.metric() == rebuilt.metric()
    assert clone.target == problem.target


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_loss_function_gives_a_differentiable_scalar(name: str) -> None:
    problem = make_problem(name, seed=0)
    batch = problem.full_batch()
    loss = problem_loss(problem, batch)
    assert loss.ndim == 0
    assert torch.equal(loss, problem.loss(batch))
    loss.backward()
    grads = [p.grad for p in problem.parameters() if p.grad is not None]
    assert grads
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_full_batch_loader_repeats_one_batch_per_step(name: str) -> None:
    problem = make_problem(name, seed=0)
    loader = problem.train_dataloader()
    if hasattr(problem, "batch_size"):
        first = next(iter(loader))
        assert first[0].shape[0] == problem.batch_size
    else:
        assert len(loader) == problem.steps_per_epoch
        full = problem.full_batch()
        batches = list(loader)
        assert all(type(b) is type(full) for b in batches)
        leaves = [b if isinstance(b, tuple) else (b,) for b in [full, *batches]]
        assert all(torch.equal(b, f) for leaf in leaves for b, f in zip(leaf, leaves[0]))


def test_batch_size_can_be_changed_by_lightning() -> None:
    problem = DigitsMLP()
    lightning_setattr(problem, "batch_size", 128)
    assert next(iter(problem.train_dataloader()))[0].shape[0] == 128


def test_seed_changes_data_and_initialisation() -> None:
    for cls in (MatrixFactorization, DeepLinear, TeacherStudent, DeadReLU, DigitsMLP):
        a, b = _parameters(cls(seed=0)), _parameters(cls(seed=1))
        assert not all(torch.equal(x, y) for x, y in zip(a, b)), cls.__name__


def test_unknown_problem_names_the_choices() -> None:
    with pytest.raises(ValueError, match="`problem` can be strict_saddle, "):
        make_problem("nope")


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (StrictSaddle2D, {"lr": 0.0}, "`lr` must be positive"),
        (MatrixFactorization, {"steps_per_epoch": 0}, "`steps_per_epoch` must be at least 1"),
        (MatrixFactorization, {"rank": 0}, "1 <= `rank`"),
        (DeepLinear, {"init_std": -1.0}, "`init_std` must be positive"),
        (DeepLinear, {"depth": 1}, "`depth` must be at least 2"),
        (DeadReLU, {"width": 0}, "`width` must be at least 1"),
        (DigitsMLP, {"batch_size": 0}, "`batch_size` must be at least 1"),
        (DeepTanhDigits, {"init_std": 0.0}, "`init_std` must be positive"),
        (SparseParity, {"batch_size": 0}, "`batch_size` must be at least 1"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(
    cls: type[Problem], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# Surfaces: the targets are attainable and the plain runs stop short of them
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "point", "value"),
    [
        (StrictSaddle2D, (0.0, math.sqrt(2)), -1.0),
        (MonkeySaddle2D, (-3.0, 0.0), -6.75),
        (SixHumpCamel, (0.0898, -0.7126), -1.0316),
        (Rastrigin2D, (0.0, 0.0), 0.0),
    ],
)
def test_surface_minima_meet_the_target(
    cls: type[StrictSaddle2D], point: tuple[float, float], value: float
) -> None:
    problem = cls()
    assert problem.surface(torch.tensor(point)).item() == pytest.approx(value, abs=1e-4)
    with torch.no_grad():
        problem.xy.copy_(torch.tensor(point))
    assert problem.solved()


def test_strict_saddle_converges_to_the_saddle_and_stays() -> None:
    problem = StrictSaddle2D()
    steps, final = train_plain(problem, max_steps=200)
    assert steps is None
    assert abs(final) < 1e-6
    assert problem.xy[1].item() == 0.0
    assert not problem.solved()


@pytest.mark.parametrize(
    ("cls", "settle", "radius", "within"),
    [(StrictSaddle2D, 100, 1e-3, 100), (MatrixFactorization, 300, 1e-3, 200)],
)
def test_a_small_perturbation_at_the_strict_saddle_escapes_it(
    cls: type[Problem], settle: int, radius: float, within: int
) -> None:
    # Plain GD only stalls because it starts exactly on the saddle's stable manifold.
    problem = cls()
    train_plain(problem, max_steps=settle, eval_every=settle)
    assert not problem.solved()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in problem.parameters():
            p.add_(torch.randn(p.shape, generator=g) * radius)
    steps, _ = train_plain(problem, max_steps=within, stop_when_solved=True)
    assert steps is not None


@pytest.mark.parametrize(
    ("cls", "steps", "stuck_at"),
    [(MonkeySaddle2D, 500, 0.0), (SixHumpCamel, 300, -0.2155), (Rastrigin2D, 300, 17.91)],
)
def test_surfaces_stall_short_of_the_target(
    cls: type[StrictSaddle2D], steps: int, stuck_at: float
) -> None:
    problem = cls()
    reached, final = train_plain(problem, max_steps=steps, eval_every=50)
    assert reached is None
    assert final == pytest.approx(stuck_at, abs=1e-3)


def test_monkey_saddle_keeps_y_exactly_zero() -> None:
    problem = MonkeySaddle2D()
    train_plain(problem, max_steps=300, eval_every=100)
    assert problem.xy[1].item() == 0.0
    assert problem.xy[0].item() > 0.0


# ------------------------------------------------------------------------------------------------
# Stuck networks
# ------------------------------------------------------------------------------------------------


def test_matrix_factorization_stays_on_the_saddle() -> None:
    problem = MatrixFactorization()
    assert torch.equal(problem.factor[0], torch.zeros(3))
    steps, final = train_plain(problem, max_steps=500, eval_every=100)
    assert steps is None
    assert final == pytest.approx(2.25, abs=1e-3)
    assert torch.equal(problem.factor[0], torch.zeros(3))


def test_deep_linear_stays_on_its_plateau() -> None:
    problem = DeepLinear()
    assert problem.initial_loss == pytest.approx(7.1, abs=0.5)
    assert problem.metric() == pytest.approx(problem.initial_loss, rel=1e-6)
    steps, final = train_plain(problem, max_steps=300, eval_every=100)
    assert steps is None
    assert final > 0.99 * problem.initial_loss


def test_deep_linear_with_a_large_init_leaves_the_plateau() -> None:
    # The plateau is the small initialisation's doing: at init_std 0.3 plain GD solves it quickly.
    steps, _ = train_plain("deep_linear", max_steps=300, init_std=0.3, stop_when_solved=True)
    assert steps is not None


def test_symmetric_student_stays_exactly_symmetric() -> None:
    problem = SymmetricTeacherStudent()
    assert isinstance(problem.hidden, nn.Linear)
    assert problem.hidden.out_features == 8
    initial = problem.metric()
    steps, final = train_plain(problem, max_steps=300, eval_every=100)

    assert steps is None
    assert final < initial
    weight, bias, out = problem.hidden.weight, problem.hidden.bias, problem.output.weight[0]
    assert all(torch.equal(weight[i], weight[0]) for i in range(8))
    assert torch.equal(bias, bias[0].expand(8))
    assert torch.equal(out, out[0].expand(8))
    assert problem.unit_spread() == 0.0
    cosine = nn.functional.cosine_similarity(weight[:, None], weight[None], dim=-1)
    assert torch.allclose(cosine, torch.ones(8, 8))


def test_dead_relu_stays_dead_and_revives() -> None:
    problem = DeadReLU()
    assert any(isinstance(m, nn.ReLU) for m in problem.modules())
    assert problem.dead_fraction() == 1.0
    before = problem.hidden.weight.detach().clone()
    steps, final = train_plain(problem, max_steps=200, eval_every=50)
    assert steps is None
    assert final == pytest.approx(0.5, abs=0.01)
    assert problem.dead_fraction() == 1.0
    assert torch.equal(problem.hidden.weight, before)

    with torch.no_grad():
        problem.hidden.bias.zero_()
    steps, _ = train_plain(problem, max_steps=400, stop_when_solved=True)
    assert steps is not None


def test_diverging_blows_up_and_a_stable_lr_solves_it() -> None:
    problem = Diverging()
    assert problem.lr > problem.max_stable_lr()
    steps, final = train_plain(problem, max_steps=60)
    assert steps is None
    assert not math.isfinite(final)

    stable = Diverging(lr=0.5)
    steps, _ = train_plain(stable, max_steps=60, eval_every=1, stop_when_solved=True)
    assert steps is not None


def test_deep_tanh_digits_stays_at_chance() -> None:
    steps, final = train_plain("deep_tanh_digits", max_steps=200, eval_every=100)
    assert steps is None
    assert final < 0.2


# ------------------------------------------------------------------------------------------------
# Controls
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "budget"),
    [("digits_mlp", 600), ("teacher_student", 800), ("logistic_regression", 500)],
)
def test_controls_solve_within_a_short_budget(name: str, budget: int) -> None:
    assert PROBLEMS[name].category == "control"
    steps, final = train_plain(name, max_steps=budget, stop_when_solved=True)
    assert steps is not None
    assert steps <= budget
    assert make_problem(name).meets_target(final)


# ------------------------------------------------------------------------------------------------
# Tracker
# ------------------------------------------------------------------------------------------------


def test_tracker_records_step_zero_when_already_solved() -> None:
    problem = StrictSaddle2D()
    with torch.no_grad():
        problem.xy.copy_(torch.tensor([0.0, math.sqrt(2)]))
    steps, final = train_plain(problem, max_steps=5, stop_when_solved=True)
    assert steps == 0
    assert final == pytest.approx(-1.0)


def test_tracker_evaluates_every_n_steps_and_at_the_end() -> None:
    tracker = TargetTracker(every_n_steps=4)
    bare_trainer(10, tracker).fit(StrictSaddle2D())
    assert [step for step, _ in tracker.history] == [0, 4, 8, 10]


def test_tracker_rejects_a_bad_interval() -> None:
    with pytest.raises(ValueError, match="`every_n_steps` must be at least 1"):
        TargetTracker(every_n_steps=0)
