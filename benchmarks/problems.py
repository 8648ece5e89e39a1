"""The benchmark problems and harness: a registry, step budgets and plain training with a tracker.

Not part of the installed package. The small problems come from
:mod:`lightning_escape.demos.problems`; this module adds the larger benchmark problems (some use
scikit-learn data sets, imported when they are built), the registry :data:`PROBLEMS` with each
problem's category and step budget, and :func:`train_plain`, which trains a problem with its own
optimizer (plain SGD unless the problem brings another) and records when it first meets its
target. The problems built from common architectures (CNNs, transformers, a recurrent network, a
grokking task) live in :mod:`benchmarks.architectures` and are registered here too.
``benchmarks/efficacy.py`` trains every problem with and without
:class:`~lightning_escape.EscapeCallback`; the tests import from here too.

Example:
    >>> spec = PROBLEMS["strict_saddle"]
    >>> spec.cls.__name__, spec.category, spec.benchmark_steps
    ('StrictSaddle2D', 'stuck', 1000)
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from benchmarks.architectures import (
    AttentionPointer,
    CNNDigitsCosine,
    DeepSigmoidCNN,
    ModularAddition,
    TabularMLPLong,
    TransformerSort,
    VanillaRNNLatch,
    WarmupTransformerLM,
    _digits,
    _SplitClassifier,
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
    _generator,
    _pair,
    _positive,
    _Surface2D,
    _unchanged,
)

__all__ = [
    "PROBLEMS",
    "Category",
    "DeepTanhDigits",
    "DigitsMLP",
    "Diverging",
    "LogisticRegression",
    "PlainResult",
    "ProblemSpec",
    "Rastrigin2D",
    "SparseParity",
    "TargetTracker",
    "make_problem",
    "problem_loss",
    "train_plain",
]

#: "stuck": plain training fails; "control": plain training succeeds and must not be harmed;
#: "hidden-progress": plain training succeeds after a long flat stretch.
Category = Literal["stuck", "control", "hidden-progress"]


def problem_loss(module: Problem, batch: Any) -> Tensor:
    """The training loss of ``module`` on ``batch``, as a plain function (for curvature probes).

    Args:
        module: A problem.
        batch: A batch as its data loader yields it, or ``module.full_batch()``.

    Returns:
        The scalar loss, differentiable in the module's parameters.
    """
    return module.loss(batch)


# --------------------------------------------------------------------------------------------------
# Two-dimensional surfaces and divergence
# --------------------------------------------------------------------------------------------------


class Rastrigin2D(_Surface2D):
    """The 2-D Rastrigin function from ``(2.98, 2.98)``: one local minimum among many.

    ``f = 20 + Σᵢ (xᵢ² − 10 cos 2πxᵢ)``. Gradient descent stops in the local minimum near
    ``(2.98, 2.98)`` with ``f = 17.91``; the global minimum is ``f = 0`` at the origin.

    Args:
        seed: Ignored (the problem is deterministic).
        lr: Learning rate of plain gradient descent; the curvature in a well is about 400, so it must
            stay below 0.005.
        steps_per_epoch: Steps per epoch.
    """

    target = 1.0
    start = (2.98, 2.98)

    def __init__(self, seed: int = 0, lr: float = 0.002, steps_per_epoch: int = 50) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        self.save_hyperparameters()

    @staticmethod
    @override
    def surface(xy: Tensor) -> Tensor:
        return 20 + (xy**2 - 10 * torch.cos(2 * math.pi * xy)).sum(-1)


class Diverging(Problem):
    """Linear regression with a step size past the stability limit: the loss blows up.

    Data: ``x`` ~ N(0, I) in 16 dimensions, 256 examples, ``y = xᵀw* + 0.1·ε``. Model: one
    ``nn.Linear`` from zero. The Hessian of ``½·MSE`` has largest eigenvalue about 1.5, so gradient
    descent is stable only for ``lr < 2/λ_max ≈ 1.3`` (:meth:`max_stable_lr`); at the default 3.0
    the error grows about 3.5× per step and the loss overflows to ``inf`` (then NaN) after 33 to 37
    steps.
    The target ``½·MSE ≤ 0.01`` (about twice the noise floor) is reached within a few dozen steps at
    any ``lr`` between 0.3 and 1.

    Args:
        seed: Seed of the data.
        lr: Learning rate of plain gradient descent.
        steps_per_epoch: Steps per epoch.
    """

    target = 0.01
    in_features: ClassVar[int] = 16
    n: ClassVar[int] = 256
    x: Tensor
    y: Tensor

    def __init__(self, seed: int = 0, lr: float = 3.0, steps_per_epoch: int = 50) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        self.save_hyperparameters()
        g = _generator(seed, 0)
        x = torch.randn(self.n, self.in_features, generator=g)
        w_star = torch.randn(self.in_features, generator=g)
        y = x @ w_star + 0.1 * torch.randn(self.n, generator=g)
        self.register_buffer("x", x, persistent=False)
        self.register_buffer("y", y[:, None], persistent=False)
        self.linear = nn.Linear(self.in_features, 1)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()

    def max_stable_lr(self) -> float:
        """``2/λ_max`` of the loss's (constant) Hessian: gradient descent diverges above it."""
        features = torch.cat([self.x, torch.ones_like(self.x[:, :1])], dim=1).double().cpu()
        hessian = features.T @ features / features.shape[0]
        return float(2 / torch.linalg.eigvalsh(hessian)[-1])

    @override
    def full_batch(self) -> tuple[Tensor, Tensor]:
        return self.x, self.y

    @override
    def loss(self, batch: Any) -> Tensor:
        x, y = _pair(batch)
        return 0.5 * F.mse_loss(self.linear(x), y)

    @override
    def metric(self) -> float:
        with torch.no_grad():
            return float(self.loss(self.full_batch()))


# --------------------------------------------------------------------------------------------------
# scikit-learn data sets
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _breast_cancer() -> tuple[Tensor, Tensor]:
    """The breast cancer data, each feature standardised to mean 0 and variance 1."""
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    x = torch.as_tensor(features, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0, unbiased=False)
    return x.float(), torch.as_tensor(labels, dtype=torch.float32)


class _DigitsClassifier(_SplitClassifier):
    """A tanh MLP classifying the digits images with minibatch SGD; the metric is test accuracy."""

    metric_name: ClassVar[str] = "test accuracy"

    def __init__(
        self, seed: int, lr: float, batch_size: int, widths: list[int], init_std: float | None
    ) -> None:
        super().__init__(seed=seed, lr=lr)
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size!r}.")
        self.batch_size = batch_size
        self._split(*_digits())
        g = _generator(seed, 1)
        sizes = [64, *widths, 10]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            linear = nn.Linear(fan_in, fan_out)
            std = 1 / math.sqrt(fan_in) if init_std is None else init_std
            with torch.no_grad():
                linear.weight.copy_(torch.randn(fan_out, fan_in, generator=g) * std)
                linear.bias.zero_()
            layers.append(linear)
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    @override
    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.net(x)
        return logits


class DeepTanhDigits(_DigitsClassifier):
    """A deep tanh network on digits with a too-small initialisation: a vanishing signal.

    64 → [50]×10 tanh → 10, weights N(0, 0.05²), zero biases, so each layer scales the signal by
    about 0.35 and the output barely depends on the input. Plain SGD (lr 0.1, batch 64) stays at
    chance (8 to 10% test accuracy) for well over 3000 steps. Target: test accuracy ≥ 0.90 on the
    fixed 360-image test split.

    Args:
        seed: Seed of the initialisation and of the shuffling.
        lr: Learning rate of SGD.
        batch_size: Minibatch size.
        init_std: Standard deviation of every weight.
        depth: Hidden layers.
    """

    target = 0.90

    def __init__(
        self,
        seed: int = 0,
        lr: float = 0.1,
        batch_size: int = 64,
        init_std: float = 0.05,
        depth: int = 10,
    ) -> None:
        _positive("init_std", init_std)
        if depth < 1:
            raise ValueError(f"`depth` must be at least 1, got {depth!r}.")
        super().__init__(seed, lr, batch_size, [50] * depth, init_std)
        self.save_hyperparameters()


class DigitsMLP(_DigitsClassifier):
    """A healthy tanh MLP on digits (control).

    64 → 50 → 50 → 10 tanh, weights N(0, 1/fan_in), zero biases, SGD lr 0.1, batch 64. Plain
    training reaches the target (test accuracy ≥ 0.95) in about 300 steps and ends near 0.978.

    Args:
        seed: Seed of the initialisation and of the shuffling.
        lr: Learning rate of SGD.
        batch_size: Minibatch size.
    """

    target = 0.95

    def __init__(self, seed: int = 0, lr: float = 0.1, batch_size: int = 64) -> None:
        super().__init__(seed, lr, batch_size, [50, 50], None)
        self.save_hyperparameters()


class LogisticRegression(Problem):
    """Logistic regression on the standardised breast cancer data (convex control).

    569 examples, 30 features, zero initialisation, full-batch gradient descent at lr 0.5 on the
    mean binary cross-entropy. The loss keeps falling slowly (0.0458 after 2000 steps) while the
    gradient becomes small, so a gradient-norm trigger fires here although nothing is wrong.
    Target: loss ≤ 0.06.

    Args:
        seed: Ignored (the data and the zero initialisation are fixed).
        lr: Learning rate of plain gradient descent.
        steps_per_epoch: Steps per epoch.
    """

    target = 0.06
    x: Tensor
    y: Tensor

    def __init__(self, seed: int = 0, lr: float = 0.5, steps_per_epoch: int = 50) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        self.save_hyperparameters()
        x, y = _breast_cancer()
        self.register_buffer("x", x.clone(), persistent=False)
        self.register_buffer("y", y.clone(), persistent=False)
        self.linear = nn.Linear(x.shape[1], 1)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()

    @override
    def full_batch(self) -> tuple[Tensor, Tensor]:
        return self.x, self.y

    @override
    def loss(self, batch: Any) -> Tensor:
        x, y = _pair(batch)
        return F.binary_cross_entropy_with_logits(self.linear(x)[:, 0], y)

    @override
    def metric(self) -> float:
        with torch.no_grad():
            return float(self.loss(self.full_batch()))


# --------------------------------------------------------------------------------------------------
# Sparse parity
# --------------------------------------------------------------------------------------------------


class _ParityBatches(Dataset[tuple[Tensor, Tensor]]):
    """``length`` batches of fresh parity examples; batch ``i`` is a function of ``(seed, i)``."""

    def __init__(
        self, seed: int, support: Tensor, n_bits: int, batch_size: int, length: int
    ) -> None:
        self.seed = seed
        self.support = support
        self.n_bits = n_bits
        self.batch_size = batch_size
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        # Seeding by index keeps batches reproducible under any sampler and on every rank.
        g = _generator(self.seed, 1000 + index)
        return _parity_examples(g, self.support, self.n_bits, self.batch_size)


def _parity_examples(
    g: torch.Generator, support: Tensor, n_bits: int, count: int
) -> tuple[Tensor, Tensor]:
    x = torch.randint(0, 2, (count, n_bits), generator=g).float() * 2 - 1
    return x, x[:, support].prod(dim=1)


class SparseParity(Problem):
    """Learning a sparse parity with online SGD: hidden progress behind a flat loss.

    ``x`` uniform in {±1}⁵⁰, ``y = Πᵢ∈S xᵢ`` for a random set ``S`` of 3 bits. ReLU MLP
    50 → 256 → 1 with ``W1``, ``b1`` ~ N(0, 1/50), ``W2`` ~ N(0, 1/256), ``b2 = 0``; hinge loss, SGD
    lr 0.1 on 32 fresh examples per step. The loss stays flat for a long time while the
    weights slowly align with ``S``, then drops abruptly; plain training succeeds (in a few thousand
    steps), and an escape method should not slow it down. Target: accuracy ≥ 0.99 on 2048
    held-out examples.

    An epoch is ``steps_per_epoch`` batches of fresh examples; a run longer than one epoch sees the
    same batches again.

    Args:
        seed: Seed of ``S``, the initialisation and the examples.
        lr: Learning rate of SGD.
        batch_size: Examples per step.
        steps_per_epoch: Batches per epoch.
    """

    target = 0.99
    higher_is_better = True
    metric_name: ClassVar[str] = "held-out accuracy"
    n_bits: ClassVar[int] = 50
    k: ClassVar[int] = 3
    width: ClassVar[int] = 256
    n_eval: ClassVar[int] = 2048
    support: Tensor
    x_eval: Tensor
    y_eval: Tensor

    def __init__(
        self, seed: int = 0, lr: float = 0.1, batch_size: int = 32, steps_per_epoch: int = 10_000
    ) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size!r}.")
        self.save_hyperparameters()
        self.batch_size = batch_size
        g = _generator(seed, 0)
        self.register_buffer(
            "support", torch.randperm(self.n_bits, generator=g)[: self.k], persistent=False
        )
        x_eval, y_eval = _parity_examples(
            _generator(seed, 2), self.support, self.n_bits, self.n_eval
        )
        self.register_buffer("x_eval", x_eval, persistent=False)
        self.register_buffer("y_eval", y_eval, persistent=False)
        self.hidden = nn.Linear(self.n_bits, self.width)
        self.act = nn.ReLU()
        self.output = nn.Linear(self.width, 1)
        g_init = _generator(seed, 1)
        with torch.no_grad():
            std = 1 / math.sqrt(self.n_bits)
            self.hidden.weight.copy_(torch.randn(self.width, self.n_bits, generator=g_init) * std)
            self.hidden.bias.copy_(torch.randn(self.width, generator=g_init) * std)
            self.output.weight.copy_(
                torch.randn(1, self.width, generator=g_init) / math.sqrt(self.width)
            )
            self.output.bias.zero_()

    @override
    def forward(self, x: Tensor) -> Tensor:
        score: Tensor = self.output(self.act(self.hidden(x)))
        return score[:, 0]

    @override
    def full_batch(self) -> tuple[Tensor, Tensor]:
        # There is no finite training set; the held-out examples stand in for "the whole data".
        return self.x_eval, self.y_eval

    @override
    def loss(self, batch: Any) -> Tensor:
        x, y = _pair(batch)
        score: Tensor = self(x)
        return torch.clamp(1 - y * score, min=0).mean()

    @override
    def metric(self) -> float:
        with torch.no_grad():
            return float((torch.sign(self(self.x_eval)) == self.y_eval).float().mean())

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        batches = _ParityBatches(
            self.seed, self.support.cpu(), self.n_bits, self.batch_size, self.steps_per_epoch
        )
        return DataLoader(batches, batch_size=None, collate_fn=_unchanged)


# --------------------------------------------------------------------------------------------------
# Registry and plain training
# --------------------------------------------------------------------------------------------------


class ProblemSpec(NamedTuple):
    """A benchmark problem: its class, its category and the steps a plain run gets.

    ``benchmark_steps`` is several times what an escape needs.
    """

    cls: type[Problem]
    category: Category
    benchmark_steps: int


PROBLEMS: dict[str, ProblemSpec] = {
    "strict_saddle": ProblemSpec(StrictSaddle2D, "stuck", 1000),
    "monkey_saddle": ProblemSpec(MonkeySaddle2D, "stuck", 6000),
    "matrix_factorization": ProblemSpec(MatrixFactorization, "stuck", 2000),
    "six_hump_camel": ProblemSpec(SixHumpCamel, "stuck", 3000),
    "rastrigin": ProblemSpec(Rastrigin2D, "stuck", 5000),
    "deep_linear": ProblemSpec(DeepLinear, "stuck", 4000),
    "symmetric_teacher_student": ProblemSpec(SymmetricTeacherStudent, "stuck", 3000),
    "dead_relu": ProblemSpec(DeadReLU, "stuck", 2000),
    "diverging": ProblemSpec(Diverging, "stuck", 200),
    "deep_tanh_digits": ProblemSpec(DeepTanhDigits, "stuck", 3000),
    "sparse_parity": ProblemSpec(SparseParity, "hidden-progress", 8000),
    "digits_mlp": ProblemSpec(DigitsMLP, "control", 3000),
    "teacher_student": ProblemSpec(TeacherStudent, "control", 3000),
    "logistic_regression": ProblemSpec(LogisticRegression, "control", 2000),
    "rnn_latch": ProblemSpec(VanillaRNNLatch, "stuck", 2000),
    "attention_pointer": ProblemSpec(AttentionPointer, "stuck", 1500),
    "deep_sigmoid_cnn": ProblemSpec(DeepSigmoidCNN, "stuck", 2000),
    "grokking": ProblemSpec(ModularAddition, "hidden-progress", 3000),
    "cnn_digits_cosine": ProblemSpec(CNNDigitsCosine, "control", 1500),
    "tabular_mlp_long": ProblemSpec(TabularMLPLong, "control", 3000),
    "transformer_tokens": ProblemSpec(TransformerSort, "control", 1000),
    "warmup_long": ProblemSpec(WarmupTransformerLM, "control", 2000),
}
"""The problems by name. First the constructed ones (stuck, then the hidden-progress task, then the
controls), then those built from common architectures (:mod:`benchmarks.architectures`), in the
same order."""


def make_problem(problem: str | type[Problem], seed: int = 0, **kwargs: Any) -> Problem:
    """Build a problem from its registry name or class.

    Args:
        problem: A key of :data:`PROBLEMS` or a :class:`Problem` subclass.
        seed: Seed of the problem.
        **kwargs: Further constructor arguments (``lr``, ``init_std``, ...).

    Returns:
        The problem.

    Raises:
        ValueError: If the name is not in :data:`PROBLEMS`.
    """
    if isinstance(problem, str):
        if problem not in PROBLEMS:
            raise ValueError(f"`problem` can be {', '.join(PROBLEMS)}, got {problem!r}.")
        problem = PROBLEMS[problem].cls
    return problem(seed=seed, **kwargs)


class PlainResult(NamedTuple):
    """The outcome of a run: first evaluated step at which the target held (or None), final metric."""

    steps_to_target: int | None
    final_metric: float


class TargetTracker(Callback):
    """Evaluate a problem's metric every ``every_n_steps`` and record when it first meets the target.

    The metric is also evaluated before the first step (step 0) and after the last one.

    Args:
        every_n_steps: Evaluation interval in optimizer steps.
        stop_when_solved: Stop training at the first evaluation that meets the target.
    """

    def __init__(self, every_n_steps: int = 10, stop_when_solved: bool = False) -> None:
        if every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be at least 1, got {every_n_steps!r}.")
        self.every_n_steps = every_n_steps
        self.stop_when_solved = stop_when_solved
        self.steps_to_target: int | None = None
        self.history: list[tuple[int, float]] = []

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, final: bool = False) -> None:
        if not isinstance(pl_module, Problem):
            raise TypeError(
                f"`TargetTracker` needs a `Problem` module, got {type(pl_module).__name__}."
            )
        step = trainer.global_step
        if self.history and self.history[-1][0] == step:
            if not final:
                return
            # Callbacks that run at the end of training may still change the model (a rollback):
            # the final evaluation is of the model as training leaves it.
            self.history.pop()
        value = pl_module.metric()
        self.history.append((step, value))
        if self.steps_to_target is None and pl_module.meets_target(value):
            self.steps_to_target = step
            if self.stop_when_solved:
                trainer.should_stop = True

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate(trainer, pl_module, final=True)


def train_plain(
    problem: str | type[Problem] | Problem,
    max_steps: int,
    seed: int = 0,
    *,
    eval_every: int = 10,
    stop_when_solved: bool = False,
    callbacks: list[Callback] | None = None,
    **kwargs: Any,
) -> PlainResult:
    """Train a problem with plain SGD in a CPU Lightning ``Trainer`` and score it.

    Args:
        problem: A key of :data:`PROBLEMS`, a :class:`Problem` subclass, or a built problem (then
            ``seed`` and ``kwargs`` are not used).
        max_steps: Training budget in optimizer steps.
        seed: Seed of the problem.
        eval_every: Evaluate the metric every this many steps (and at the start and the end).
        stop_when_solved: Stop at the first evaluation that meets the target; the final metric is
            then the metric at that step.
        callbacks: Further callbacks for the trainer (for example an escape callback).
        **kwargs: Constructor arguments of the problem.

    Returns:
        ``(steps_to_target, final_metric)``: the first evaluated step at which the target held, or
        None, and the metric after training.

    Example:
        >>> train_plain("strict_saddle", max_steps=200).steps_to_target is None
        True
    """
    module = problem if isinstance(problem, Problem) else make_problem(problem, seed, **kwargs)
    tracker = TargetTracker(every_n_steps=eval_every, stop_when_solved=stop_when_solved)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*(callbacks or []), tracker],
    )
    trainer.fit(module)
    return PlainResult(tracker.steps_to_target, module.metric())
