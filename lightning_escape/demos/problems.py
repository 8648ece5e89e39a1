"""Small constructed training problems: stuck ones and healthy controls.

Each problem is a :class:`~lightning.pytorch.LightningModule` that builds its data in code from a
``seed`` (nothing is downloaded), trains with plain SGD and no scheduler, logs ``train_loss`` every
step, and can score itself: :meth:`Problem.metric` evaluates the success metric on the whole data set
and :meth:`Problem.solved` compares it with :attr:`Problem.target`.

The stuck problems fail under plain training for a structural reason (a saddle, a plateau, a local
minimum, duplicated or dead units, a step size past the stability limit); the controls train without
trouble and show what an escape method must not harm. ``benchmarks/efficacy.py`` trains each one
with and without :class:`~lightning_escape.EscapeCallback`.

Problems that use scikit-learn data sets (:class:`DeepTanhDigits`, :class:`DigitsMLP`,
:class:`LogisticRegression`) import it when they are built, since scikit-learn is not a runtime
dependency of the package.

Example:
    >>> problem = StrictSaddle2D()
    >>> problem.metric(), problem.target, problem.solved()
    (1.0, -0.9, False)
    >>> problem.loss(problem.full_batch()).item()
    1.0
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
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typing_extensions import override

__all__ = [
    "PROBLEMS",
    "DeadReLU",
    "DeepLinear",
    "DeepTanhDigits",
    "DigitsMLP",
    "Diverging",
    "LogisticRegression",
    "MatrixFactorization",
    "MonkeySaddle2D",
    "PlainResult",
    "Problem",
    "Rastrigin2D",
    "SixHumpCamel",
    "SparseParity",
    "StrictSaddle2D",
    "SymmetricTeacherStudent",
    "TargetTracker",
    "TeacherStudent",
    "make_problem",
    "problem_loss",
    "train_plain",
]

Category = Literal["stuck", "control", "hidden-progress"]


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"`{name}` must be positive, got {value!r}.")


def _generator(seed: int, stream: int = 0) -> torch.Generator:
    # Separate streams (data, initialisation, evaluation) so that changing one part of a construction
    # does not shift the random draws of another.
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


class _RepeatedBatch(Dataset[Any]):
    """A data set whose every item is the same (full) batch: one batch per step, ``length`` per epoch."""

    def __init__(self, batch: Any, length: int) -> None:
        self.batch = batch
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.batch


class Problem(LightningModule):
    """Base class of the problems: training step, plain SGD, a metric and a target.

    Subclasses implement :meth:`loss`, :meth:`full_batch` and :meth:`metric`, and set :attr:`target`,
    :attr:`higher_is_better`, :attr:`category` and :attr:`benchmark_steps`.

    Args:
        seed: Seed of the data and of the initialisation.
        lr: Learning rate of plain SGD.
        steps_per_epoch: For full-batch problems, how many (identical) batches make an epoch.
    """

    higher_is_better: ClassVar[bool] = False
    #: What :meth:`metric` measures, for reports.
    metric_name: ClassVar[str] = "loss"
    #: "stuck": plain training fails; "control": plain training succeeds and must not be harmed;
    #: "hidden-progress": plain training succeeds after a long flat stretch.
    category: ClassVar[Category] = "stuck"
    #: Steps a plain run gets in the benchmarks: several times what an escape needs, see
    #: ``benchmarks/plain_baselines.py``.
    benchmark_steps: ClassVar[int] = 1000

    def __init__(self, seed: int = 0, lr: float = 0.1, steps_per_epoch: int = 50) -> None:
        super().__init__()
        _positive("lr", lr)
        if steps_per_epoch < 1:
            raise ValueError(f"`steps_per_epoch` must be at least 1, got {steps_per_epoch!r}.")
        self.seed = seed
        self.lr = lr
        self.steps_per_epoch = steps_per_epoch

    @property
    def target(self) -> float:
        """The value :meth:`metric` must reach (at most, or at least if :attr:`higher_is_better`)."""
        raise NotImplementedError

    def loss(self, batch: Any) -> Tensor:
        """The training loss on ``batch``, differentiable in the parameters."""
        raise NotImplementedError

    def full_batch(self) -> Any:
        """The whole training set as one batch, on the module's device."""
        raise NotImplementedError

    def metric(self) -> float:
        """The success metric on the whole data (a loss or an accuracy), without gradients."""
        raise NotImplementedError

    def meets_target(self, value: float) -> bool:
        """Whether a metric value reaches :attr:`target`; NaN never does."""
        return value >= self.target if self.higher_is_better else value <= self.target

    def solved(self) -> bool:
        """Whether the current parameters reach :attr:`target`."""
        return self.meets_target(self.metric())

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=False)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        # Full batch: the same batch every step. The loader holds CPU copies because Lightning moves
        # each batch to the device itself; ``batch_size=None`` with ``_unchanged`` hands the batch
        # over as built (the default would turn tuples into lists).
        batch = _to_cpu(self.full_batch())
        return DataLoader(
            _RepeatedBatch(batch, self.steps_per_epoch), batch_size=None, collate_fn=_unchanged
        )


def _unchanged(batch: Any) -> Any:
    return batch


def _pair(batch: Any) -> tuple[Tensor, Tensor]:
    """Unpack an ``(inputs, targets)`` batch."""
    x, y = batch
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"Expected a batch `(inputs, targets)` of tensors, got {type(batch).__name__}."
        )
    return x, y


def _to_cpu(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.detach().cpu()
    if isinstance(batch, tuple):
        return tuple(_to_cpu(b) for b in batch)
    return batch


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
# Two-dimensional surfaces
# --------------------------------------------------------------------------------------------------


class _Surface2D(Problem):
    """Gradient descent on a function of two variables; the parameter is the point ``xy``.

    The problem is deterministic: ``seed`` is accepted for a uniform interface and changes nothing.
    """

    start: ClassVar[tuple[float, float]] = (0.0, 0.0)
    metric_name: ClassVar[str] = "f"

    def __init__(self, seed: int = 0, lr: float = 0.01, steps_per_epoch: int = 50) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        self.xy = nn.Parameter(torch.tensor(self.start, dtype=torch.float32))

    @staticmethod
    def surface(xy: Tensor) -> Tensor:
        """The function at points ``xy`` of shape ``(..., 2)`` (vectorised, e.g. for contour plots)."""
        raise NotImplementedError

    @override
    def full_batch(self) -> Tensor:
        # There is no data; Lightning still needs something to iterate over.
        return torch.zeros(0, device=self.xy.device)

    @override
    def loss(self, batch: Any) -> Tensor:
        return self.surface(self.xy)

    @override
    def metric(self) -> float:
        with torch.no_grad():
            return float(self.surface(self.xy))


class StrictSaddle2D(_Surface2D):
    """A strict saddle: ``f = x² − y² + y⁴/4`` from ``(1, 0)``.

    Gradient descent keeps ``y = 0`` exactly, so it converges to the saddle at the origin (``f = 0``,
    Hessian eigenvalues 2 and −2) and stays there. The minima are at ``(0, ±√2)`` with ``f = −1``.
    The default step 0.1 keeps runs short: the curvature is at most 4 along the
    way, far inside the stability limit ``lr < 0.5``.

    Args:
        seed: Ignored (the problem is deterministic).
        lr: Learning rate of plain gradient descent.
        steps_per_epoch: Steps per epoch.
    """

    target = -0.9
    start = (1.0, 0.0)
    benchmark_steps = 1000

    def __init__(self, seed: int = 0, lr: float = 0.1, steps_per_epoch: int = 50) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        self.save_hyperparameters()

    @staticmethod
    @override
    def surface(xy: Tensor) -> Tensor:
        x, y = xy[..., 0], xy[..., 1]
        return x**2 - y**2 + y**4 / 4


class MonkeySaddle2D(_Surface2D):
    """A degenerate (monkey) saddle: ``f = x³ − 3xy² + (x² + y²)²/4`` from ``(1, 0)``.

    The Hessian vanishes at the origin, so there is no negative curvature to detect there; gradient
    descent keeps ``y = 0`` and creeps towards the origin (``f ≈ 1e-6`` after 3000 steps at lr 0.01).
    The three minima lie at radius 3 with ``f = −6.75``.

    Args:
        seed: Ignored (the problem is deterministic).
        lr: Learning rate of plain gradient descent; the largest curvature at the minima is 27, so it
            must stay below 2/27.
        steps_per_epoch: Steps per epoch.
    """

    target = -6.0
    start = (1.0, 0.0)
    benchmark_steps = 6000

    def __init__(self, seed: int = 0, lr: float = 0.01, steps_per_epoch: int = 50) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        self.save_hyperparameters()

    @staticmethod
    @override
    def surface(xy: Tensor) -> Tensor:
        x, y = xy[..., 0], xy[..., 1]
        return x**3 - 3 * x * y**2 + (x**2 + y**2) ** 2 / 4


class SixHumpCamel(_Surface2D):
    """The six-hump camel function from ``(1.6, −0.7)``: a local minimum.

    ``f = (4 − 2.1x² + x⁴/3)x² + xy + (−4 + 4y²)y²``. Gradient descent settles in the local minimum
    near ``(1.70, −0.80)`` with ``f = −0.2155``; the global minima have ``f = −1.0316``. Escaping takes
    a jump of about the basin's width, not noise.

    Args:
        seed: Ignored (the problem is deterministic).
        lr: Learning rate of plain gradient descent.
        steps_per_epoch: Steps per epoch.
    """

    target = -1.0
    start = (1.6, -0.7)
    benchmark_steps = 3000

    def __init__(self, seed: int = 0, lr: float = 0.01, steps_per_epoch: int = 50) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        self.save_hyperparameters()

    @staticmethod
    @override
    def surface(xy: Tensor) -> Tensor:
        x, y = xy[..., 0], xy[..., 1]
        return (4 - 2.1 * x**2 + x**4 / 3) * x**2 + x * y + (-4 + 4 * y**2) * y**2


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
    benchmark_steps = 5000

    def __init__(self, seed: int = 0, lr: float = 0.002, steps_per_epoch: int = 50) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        self.save_hyperparameters()

    @staticmethod
    @override
    def surface(xy: Tensor) -> Tensor:
        return 20 + (xy**2 - 10 * torch.cos(2 * math.pi * xy)).sum(-1)


# --------------------------------------------------------------------------------------------------
# Matrix factorisation and deep linear network
# --------------------------------------------------------------------------------------------------


class MatrixFactorization(Problem):
    """Symmetric matrix factorisation at a strict saddle (Jin et al.'s example).

    ``f(U) = ¼‖UUᵀ − M‖²_F`` with ``M = diag(3, 2, 1, 0, …)`` of size 20 × 20 and ``U`` of size
    20 × 3 drawn from N(0, 0.1²), then row 0 set to zero. The gradient of row 0 is ``−3·U[0] = 0``
    exactly, so gradient descent stays on the saddle's stable manifold: it fits the eigenvalues 2 and
    1 and stops at ``f = 9/4 = 2.25`` (smallest Hessian eigenvalue −3). ``M`` is diagonal because a
    rotated ``M`` would leak rounding error into the escape direction and free the run by itself.

    Args:
        seed: Seed of ``U``.
        lr: Learning rate of plain gradient descent.
        size: Size of ``M``.
        rank: Columns of ``U``.
        init_std: Standard deviation of ``U``.
        steps_per_epoch: Steps per epoch.
    """

    target = 0.01
    metric_name: ClassVar[str] = "f"
    benchmark_steps = 2000
    m: Tensor

    def __init__(
        self,
        seed: int = 0,
        lr: float = 0.05,
        size: int = 20,
        rank: int = 3,
        init_std: float = 0.1,
        steps_per_epoch: int = 50,
    ) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        if size < 3 or not 1 <= rank <= size:
            raise ValueError(f"Expected `size` >= 3 and 1 <= `rank` <= `size`, got {size}, {rank}.")
        _positive("init_std", init_std)
        self.save_hyperparameters()
        eigenvalues = torch.zeros(size)
        eigenvalues[:3] = torch.tensor([3.0, 2.0, 1.0])
        self.register_buffer("m", torch.diag(eigenvalues), persistent=False)
        u = torch.randn(size, rank, generator=_generator(seed, 1)) * init_std
        u[0] = 0.0
        self.factor = nn.Parameter(u)

    @override
    def full_batch(self) -> Tensor:
        return torch.zeros(0, device=self.factor.device)

    @override
    def loss(self, batch: Any) -> Tensor:
        residual = self.factor @ self.factor.T - self.m
        return 0.25 * (residual * residual).sum()

    @override
    def metric(self) -> float:
        with torch.no_grad():
            return float(self.loss(None))


class DeepLinear(Problem):
    """A deep linear network from a small initialisation: a degenerate saddle and plateau.

    Data: ``X`` ~ N(0, I) of size 256 × 16 and ``Y = XAᵀ`` with ``A = U·diag(3, 2, 1, 0.5, 0, …)·Vᵀ``
    (``U``, ``V`` random orthogonal). Model: four bias-free 16 × 16 layers (``layers``), weights
    N(0, ``init_std``²). Loss ``½·mean‖f(x) − y‖²``. Near zero the end-to-end map is a product of four
    tiny matrices, so gradients are of order ``init_std³``: with the default 1e-3, plain gradient
    descent would need about 2·10⁵ steps to leave the plateau (the time scales like ``init_std⁻²``).

    The target is ``0.05·L₀``, where ``L₀ = ½·mean‖y‖²`` (about 7) is the loss of the zero map.

    Args:
        seed: Seed of the data and the initialisation.
        lr: Learning rate of plain gradient descent.
        init_std: Standard deviation of the initial weights.
        depth: Number of layers.
        steps_per_epoch: Steps per epoch.
    """

    benchmark_steps = 4000
    x: Tensor
    y: Tensor

    def __init__(
        self,
        seed: int = 0,
        lr: float = 0.05,
        init_std: float = 1e-3,
        depth: int = 4,
        steps_per_epoch: int = 50,
    ) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        _positive("init_std", init_std)
        if depth < 2:
            raise ValueError(f"`depth` must be at least 2, got {depth!r}.")
        self.save_hyperparameters()
        width, n = 16, 256
        g = _generator(seed, 0)
        x = torch.randn(n, width, generator=g)
        u, _ = torch.linalg.qr(torch.randn(width, width, generator=g))
        v, _ = torch.linalg.qr(torch.randn(width, width, generator=g))
        singular = torch.zeros(width)
        singular[:4] = torch.tensor([3.0, 2.0, 1.0, 0.5])
        a = u @ torch.diag(singular) @ v.T
        self.register_buffer("x", x, persistent=False)
        self.register_buffer("y", x @ a.T, persistent=False)
        self.initial_loss = float(0.5 * (self.y**2).sum(1).mean())
        g_init = _generator(seed, 1)
        self.layers = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(depth)))
        with torch.no_grad():
            for layer in self.layers:
                assert isinstance(layer, nn.Linear)
                layer.weight.copy_(torch.randn(width, width, generator=g_init) * init_std)

    @property
    @override
    def target(self) -> float:
        return 0.05 * self.initial_loss

    @override
    def full_batch(self) -> tuple[Tensor, Tensor]:
        return self.x, self.y

    @override
    def loss(self, batch: Any) -> Tensor:
        x, y = _pair(batch)
        prediction: Tensor = self.layers(x)
        return 0.5 * ((prediction - y) ** 2).sum(1).mean()

    @override
    def metric(self) -> float:
        with torch.no_grad():
            return float(self.loss(self.full_batch()))


# --------------------------------------------------------------------------------------------------
# Teacher-student
# --------------------------------------------------------------------------------------------------


class TeacherStudent(Problem):
    """A tanh student fitting a tanh teacher; ``symmetric=True`` starts it on a symmetry saddle.

    Teacher: ``y = Σⱼ aⱼ·tanh(wⱼᵀx)`` with 4 units, ``w`` ~ N(0, I/10), ``a`` ~ N(0, 1); ``x`` ~ N(0, I)
    in 10 dimensions, 512 examples. Student: 8 tanh units (the rows of ``hidden``, an ``nn.Linear``)
    and a linear read-out ``output``. Loss ``½·MSE``, full-batch gradient descent; the target is
    ``½·MSE ≤ 0.02·½·mean(y²)``.

    * ``symmetric=False`` (the healthy control): ``hidden.weight`` ~ N(0, I/10),
      ``output.weight`` ~ N(0, 1/8), zero biases. Plain training reaches the target.
    * ``symmetric=True`` (:class:`SymmetricTeacherStudent`): all rows of ``hidden.weight``
      are one draw, ``hidden.bias = 0``, ``output.weight = 0.1``, ``output.bias = 0``. Identical
      units get identical gradients, so the student behaves as one unit and stalls at the one-unit
      floor (3 to 7.5% of ``½·mean(y²)``).

    Each unit is computed with its own kernel call from a fresh copy of its row: one matrix product
    over all units rounds differently per output column and would break the symmetry on its own.

    Args:
        seed: Seed of the teacher, the data and the student's initialisation.
        lr: Learning rate of plain gradient descent.
        symmetric: Start with all hidden units identical.
        steps_per_epoch: Steps per epoch.
    """

    category: ClassVar[Category] = "control"
    benchmark_steps = 3000
    in_features: ClassVar[int] = 10
    teacher_units: ClassVar[int] = 4
    student_units: ClassVar[int] = 8
    n: ClassVar[int] = 512
    x: Tensor
    y: Tensor

    def __init__(
        self, seed: int = 0, lr: float = 0.1, symmetric: bool = False, steps_per_epoch: int = 50
    ) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        self.save_hyperparameters()
        self.symmetric = symmetric
        d, scale = self.in_features, math.sqrt(0.1)
        g = _generator(seed, 0)
        x = torch.randn(self.n, d, generator=g)
        teacher_w = torch.randn(self.teacher_units, d, generator=g) * scale
        teacher_a = torch.randn(self.teacher_units, generator=g)
        y = torch.tanh(x @ teacher_w.T) @ teacher_a
        self.register_buffer("x", x, persistent=False)
        self.register_buffer("y", y, persistent=False)
        self.half_mean_square = float(0.5 * (y**2).mean())

        g_init = _generator(seed, 1)
        self.hidden = nn.Linear(d, self.student_units)
        self.output = nn.Linear(self.student_units, 1)
        with torch.no_grad():
            if symmetric:
                row = torch.randn(d, generator=g_init) * scale
                self.hidden.weight.copy_(row.expand(self.student_units, d))
                self.output.weight.fill_(0.1)
            else:
                self.hidden.weight.copy_(
                    torch.randn(self.student_units, d, generator=g_init) * scale
                )
                self.output.weight.copy_(
                    torch.randn(1, self.student_units, generator=g_init)
                    / math.sqrt(self.student_units)
                )
            self.hidden.bias.zero_()
            self.output.bias.zero_()

    @property
    @override
    def target(self) -> float:
        return 0.02 * self.half_mean_square

    @override
    def forward(self, x: Tensor) -> Tensor:
        out = self.output.bias[0].expand(x.shape[0])
        for i in range(self.student_units):
            # ``clone`` gives every unit's weights the same fresh, aligned storage, so identical
            # units run through the same kernel path and stay bitwise identical.
            unit = torch.tanh(torch.mv(x, self.hidden.weight[i].clone()) + self.hidden.bias[i])
            out = out + self.output.weight[0, i] * unit
        return out

    @override
    def full_batch(self) -> tuple[Tensor, Tensor]:
        return self.x, self.y

    @override
    def loss(self, batch: Any) -> Tensor:
        x, y = _pair(batch)
        prediction: Tensor = self(x)
        return 0.5 * ((prediction - y) ** 2).mean()

    @override
    def metric(self) -> float:
        with torch.no_grad():
            return float(self.loss(self.full_batch()))

    def unit_spread(self) -> float:
        """The largest coordinate difference between a hidden unit's ``(weight, bias)`` and unit 0's."""
        with torch.no_grad():
            units = torch.cat([self.hidden.weight, self.hidden.bias[:, None]], dim=1)
            return float((units - units[0]).abs().max())


class SymmetricTeacherStudent(TeacherStudent):
    """:class:`TeacherStudent` started with all hidden units identical.

    Args:
        seed: Seed of the teacher, the data and the student's initialisation.
        lr: Learning rate of plain gradient descent.
        symmetric: Start with all hidden units identical.
        steps_per_epoch: Steps per epoch.
    """

    category: ClassVar[Category] = "stuck"

    def __init__(
        self, seed: int = 0, lr: float = 0.1, symmetric: bool = True, steps_per_epoch: int = 50
    ) -> None:
        super().__init__(seed=seed, lr=lr, symmetric=symmetric, steps_per_epoch=steps_per_epoch)


# --------------------------------------------------------------------------------------------------
# Dead ReLU units and divergence
# --------------------------------------------------------------------------------------------------


class DeadReLU(Problem):
    """A ReLU network whose hidden units are all dead from the start.

    Data: ``x`` ~ N(0, I) in 8 dimensions, 256 examples; ``y`` from a random ReLU teacher
    (8 → 16 → 1), standardised to mean 0 and variance 1. Student: ``hidden`` (8 → 64, weights
    N(0, 1/8)), ``act`` (``nn.ReLU``) and ``output`` (64 → 1). The hidden biases start at
    ``dead_bias`` (−10), about ten standard deviations below the pre-activations, so every unit is
    zero on every example and gets no gradient: plain training only fits ``output.bias`` to the mean
    and stalls at ``½·MSE = 0.5``. The target ``½·MSE ≤ 0.05`` (10% of the variance) is reached
    within a few hundred steps once the units are revived (for example by resetting the biases to 0).

    Args:
        seed: Seed of the teacher, the data and the student's initialisation.
        lr: Learning rate of plain gradient descent.
        dead_bias: Initial bias of every hidden unit.
        width: Hidden units of the student.
        steps_per_epoch: Steps per epoch.
    """

    target = 0.05
    benchmark_steps = 2000
    in_features: ClassVar[int] = 8
    n: ClassVar[int] = 256
    x: Tensor
    y: Tensor

    def __init__(
        self,
        seed: int = 0,
        lr: float = 0.1,
        dead_bias: float = -10.0,
        width: int = 64,
        steps_per_epoch: int = 50,
    ) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        if width < 1:
            raise ValueError(f"`width` must be at least 1, got {width!r}.")
        self.save_hyperparameters()
        d = self.in_features
        g = _generator(seed, 0)
        x = torch.randn(self.n, d, generator=g)
        teacher_w = torch.randn(16, d, generator=g) / math.sqrt(d)
        teacher_b = torch.randn(16, generator=g) * 0.5
        teacher_a = torch.randn(16, generator=g)
        y = torch.relu(x @ teacher_w.T + teacher_b) @ teacher_a
        y = (y - y.mean()) / y.std()
        self.register_buffer("x", x, persistent=False)
        self.register_buffer("y", y[:, None], persistent=False)

        g_init = _generator(seed, 1)
        self.hidden = nn.Linear(d, width)
        self.act = nn.ReLU()
        self.output = nn.Linear(width, 1)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.randn(width, d, generator=g_init) / math.sqrt(d))
            self.hidden.bias.fill_(dead_bias)
            self.output.weight.copy_(torch.randn(1, width, generator=g_init) / math.sqrt(width))
            self.output.bias.zero_()

    @override
    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.output(self.act(self.hidden(x)))
        return out

    @override
    def full_batch(self) -> tuple[Tensor, Tensor]:
        return self.x, self.y

    @override
    def loss(self, batch: Any) -> Tensor:
        x, y = _pair(batch)
        prediction: Tensor = self(x)
        return 0.5 * F.mse_loss(prediction, y)

    @override
    def metric(self) -> float:
        with torch.no_grad():
            return float(self.loss(self.full_batch()))

    def dead_fraction(self) -> float:
        """The fraction of hidden units that are zero on every training example."""
        with torch.no_grad():
            active = self.act(self.hidden(self.x)) > 0
            return float((~active.any(dim=0)).float().mean())


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
    benchmark_steps = 200
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
def _digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits images scaled to [0, 1], split 1437/360 by a fixed permutation (same for all seeds)."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.as_tensor(images, dtype=torch.float32) / 16.0
    y = torch.as_tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    return x[train], y[train], x[test], y[test]


@functools.lru_cache(maxsize=1)
def _breast_cancer() -> tuple[Tensor, Tensor]:
    """The breast cancer data, each feature standardised to mean 0 and variance 1."""
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    x = torch.as_tensor(features, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0, unbiased=False)
    return x.float(), torch.as_tensor(labels, dtype=torch.float32)


class _DigitsClassifier(Problem):
    """A tanh MLP classifying the digits images with minibatch SGD; the metric is test accuracy."""

    higher_is_better = True
    metric_name: ClassVar[str] = "test accuracy"
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def __init__(
        self, seed: int, lr: float, batch_size: int, widths: list[int], init_std: float | None
    ) -> None:
        super().__init__(seed=seed, lr=lr)
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size!r}.")
        self.batch_size = batch_size
        x_train, y_train, x_test, y_test = _digits()
        self.register_buffer("x_train", x_train.clone(), persistent=False)
        self.register_buffer("y_train", y_train.clone(), persistent=False)
        self.register_buffer("x_test", x_test.clone(), persistent=False)
        self.register_buffer("y_test", y_test.clone(), persistent=False)
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

    @override
    def full_batch(self) -> tuple[Tensor, Tensor]:
        return self.x_train, self.y_train

    @override
    def loss(self, batch: Any) -> Tensor:
        x, y = _pair(batch)
        logits: Tensor = self(x)
        return F.cross_entropy(logits, y)

    @override
    def metric(self) -> float:
        with torch.no_grad():
            return float((self(self.x_test).argmax(1) == self.y_test).float().mean())

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        data = TensorDataset(self.x_train.cpu(), self.y_train.cpu())
        # A seeded generator makes the shuffling part of the problem, independent of global RNG state.
        shuffle = torch.Generator().manual_seed(self.seed * 1_000_003 + 2)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True, generator=shuffle)


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
    benchmark_steps = 3000

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
    category: ClassVar[Category] = "control"
    benchmark_steps = 3000

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
    category: ClassVar[Category] = "control"
    benchmark_steps = 2000
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
    category: ClassVar[Category] = "hidden-progress"
    benchmark_steps = 8000
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

PROBLEMS: dict[str, type[Problem]] = {
    "strict_saddle": StrictSaddle2D,
    "monkey_saddle": MonkeySaddle2D,
    "matrix_factorization": MatrixFactorization,
    "six_hump_camel": SixHumpCamel,
    "rastrigin": Rastrigin2D,
    "deep_linear": DeepLinear,
    "symmetric_teacher_student": SymmetricTeacherStudent,
    "dead_relu": DeadReLU,
    "diverging": Diverging,
    "deep_tanh_digits": DeepTanhDigits,
    "sparse_parity": SparseParity,
    "digits_mlp": DigitsMLP,
    "teacher_student": TeacherStudent,
    "logistic_regression": LogisticRegression,
}
"""The problems by name: stuck ones first, then the hidden-progress task, then the controls."""


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
        problem = PROBLEMS[problem]
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
