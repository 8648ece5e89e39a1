from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from models import bare_trainer

from benchmarks.architectures import (
    AttentionPointer,
    CNNDigitsCosine,
    DeepSigmoidCNN,
    ModularAddition,
    TabularMLPLong,
    TransformerSort,
    VanillaRNNLatch,
    WarmupTransformerLM,
)
from benchmarks.problems import PROBLEMS, TargetTracker, make_problem
from lightning_escape.demos.problems import Problem

NEW = {
    "rnn_latch": (VanillaRNNLatch, "stuck"),
    "attention_pointer": (AttentionPointer, "stuck"),
    "deep_sigmoid_cnn": (DeepSigmoidCNN, "stuck"),
    "grokking": (ModularAddition, "hidden-progress"),
    "cnn_digits_cosine": (CNNDigitsCosine, "control"),
    "tabular_mlp_long": (TabularMLPLong, "control"),
    "transformer_tokens": (TransformerSort, "control"),
    "warmup_long": (WarmupTransformerLM, "control"),
}


def _first_batch(problem: Problem) -> Any:
    return next(iter(problem.train_dataloader()))


def _first_loss(name: str, seed: int) -> float:
    problem = make_problem(name, seed=seed)
    with torch.no_grad():
        return float(problem.loss(_first_batch(problem)))


def test_registered_after_the_existing_problems() -> None:
    names = list(PROBLEMS)
    assert names[: names.index("logistic_regression") + 1][0] == "strict_saddle"
    assert names[-len(NEW) :] == list(NEW)
    for name, (cls, category) in NEW.items():
        assert PROBLEMS[name].cls is cls
        assert PROBLEMS[name].category == category


@pytest.mark.parametrize("name", list(NEW))
def test_builds_deterministically_from_the_seed(name: str) -> None:
    first = _first_loss(name, 0)
    assert first == _first_loss(name, 0)
    assert first != _first_loss(name, 1)


@pytest.mark.parametrize("name", list(NEW))
def test_loss_is_finite_and_differentiable_and_metric_in_range(name: str) -> None:
    problem = make_problem(name, seed=0)
    loss = problem.loss(_first_batch(problem))
    assert loss.ndim == 0
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    grads = [p.grad for p in problem.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    value = problem.metric()
    if problem.higher_is_better:
        assert 0.0 <= value <= 1.0
    else:
        assert math.isfinite(value)
        assert value > -0.1  # an excess over the Bayes loss
    assert not problem.meets_target(value), "nothing is solved at initialisation"
    assert problem.training, "the metric restores training mode"


@pytest.mark.parametrize("name", list(NEW))
def test_two_steps_in_a_cpu_trainer(name: str) -> None:
    problem = make_problem(name, seed=0)
    before = [p.detach().clone() for p in problem.parameters()]
    tracker = TargetTracker(every_n_steps=1)
    bare_trainer(2, tracker).fit(problem)
    assert [step for step, _ in tracker.history] == [0, 1, 2]
    assert all(math.isfinite(v) for _, v in tracker.history)
    assert any(not torch.equal(a, b) for a, b in zip(before, problem.parameters()))


def test_cosine_schedule_decays_to_zero_over_the_run() -> None:
    problem = CNNDigitsCosine(total_steps=100)
    config: Any = problem.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    for _ in range(100):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_warmup_is_linear_then_decays_to_a_tenth() -> None:
    problem = WarmupTransformerLM(total_steps=100, warmup_fraction=0.4)
    config: Any = problem.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(3e-3 / 40)
    assert rates[39] == pytest.approx(3e-3)
    assert rates[:40] == sorted(rates[:40])
    assert rates[40:] == sorted(rates[40:], reverse=True)
    assert rates[-1] == pytest.approx(3e-4, rel=0.01)


def test_sort_examples_are_sorted_and_teacher_forced() -> None:
    source, decoder_input, target = _first_batch(TransformerSort())
    assert torch.equal(target, source.sort(dim=1).values)
    assert (decoder_input[:, 0] == TransformerSort.vocab).all()
    assert torch.equal(decoder_input[:, 1:], target[:, :-1])
    assert all(len(set(row.tolist())) == TransformerSort.length for row in source)


def test_markov_lm_is_scored_against_the_true_chain() -> None:
    problem = WarmupTransformerLM()
    (tokens,) = _first_batch(problem)
    assert tokens.shape == (32, WarmupTransformerLM.context + 1)
    assert 0 < problem.bayes_loss < math.log(WarmupTransformerLM.vocab)
    # At initialisation the model is about as good as a uniform guess.
    assert problem.metric() == pytest.approx(
        math.log(WarmupTransformerLM.vocab) - problem.bayes_loss, abs=0.3
    )


def test_modular_addition_split() -> None:
    problem = ModularAddition(seed=0)
    train = {tuple(pair) for pair in problem.x_train.tolist()}
    test = {tuple(pair) for pair in problem.x_test.tolist()}
    assert len(train) == 480
    assert len(test) == 481
    assert not train & test
    assert torch.equal(problem.y_train, problem.x_train.sum(1) % 31)
    assert 0.0 <= problem.train_accuracy() <= 1.0


def test_rnn_gradient_vanishes_towards_the_first_input() -> None:
    problem = VanillaRNNLatch(seed=0)
    x, y = problem.full_batch()
    x = x[:64].clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(problem(x), y[:64]).backward()
    assert x.grad is not None
    per_step = x.grad.abs().sum(dim=(0, 2))
    assert per_step[0] < 1e-6 * per_step[-1]
    rescued = VanillaRNNLatch(seed=0, init="orthogonal")
    x = x.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(rescued(x), y[:64]).backward()
    assert x.grad is not None
    per_step = x.grad.abs().sum(dim=(0, 2))
    assert per_step[0] > 1e-3 * per_step[-1]


def test_attention_starts_uniform() -> None:
    problem = AttentionPointer(seed=0)
    tokens, _ = problem.full_batch()
    with torch.no_grad():
        _, weights = problem.attention(tokens)
    assert weights.shape == (512, AttentionPointer.length + 1)
    assert weights.max() < 1.1 / (AttentionPointer.length + 1)


def test_sigmoid_cnn_output_hardly_depends_on_the_image() -> None:
    images, _ = DeepSigmoidCNN(seed=0).full_batch()

    def spread(**kwargs: Any) -> float:
        with torch.no_grad():
            return float(DeepSigmoidCNN(seed=0, **kwargs)(images).std(0).mean())

    # The logits vary across images by about 1e-6 with sigmoids, by about 0.04 with a rescue.
    assert spread() < 1e-4
    assert spread(activation="relu", init="he") > 1e-2
    assert spread(batch_norm=True) > 1e-2


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (DeepSigmoidCNN, {"activation": "gelu"}, "`activation` can be"),
        (DeepSigmoidCNN, {"init": "lecun"}, "`init` can be"),
        (VanillaRNNLatch, {"init": "identity"}, "`init` can be"),
        (AttentionPointer, {"optimizer": "lion"}, "`optimizer` can be"),
        (ModularAddition, {"train_fraction": 1.0}, "`train_fraction`"),
        (WarmupTransformerLM, {"warmup_fraction": 1.0}, "`warmup_fraction`"),
        (TransformerSort, {"batch_size": 0}, "`batch_size`"),
        (TabularMLPLong, {"batch_size": 0}, "`batch_size`"),
    ],
)
def test_rejects_bad_arguments(cls: type[Problem], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_the_table_is_standardized_on_its_training_part() -> None:
    problem = TabularMLPLong()
    x_train, y_train = problem.full_batch()
    assert x_train.shape == (455, 30) and problem.x_test.shape == (114, 30)
    assert torch.allclose(x_train.mean(0), torch.zeros(30), atol=1e-5)
    assert torch.allclose(x_train.std(0), torch.ones(30), atol=1e-5)
    assert set(y_train.tolist()) == {0, 1}
