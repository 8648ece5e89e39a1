"""Small constructed training problems: stuck ones and a healthy control.

Like :mod:`lightning.pytorch.demos`, these are small self-contained modules for examples and
documentation. Each problem is a :class:`~lightning.pytorch.LightningModule` that builds its data in
code from a ``seed`` (nothing is downloaded, nothing beyond the package's own dependencies is
imported), trains with plain SGD and no scheduler, logs ``train_loss`` every step, and can score
itself: :meth:`Problem.metric` evaluates the success metric on the whole data set and
:meth:`Problem.solved` compares it with :attr:`Problem.target`.

The stuck problems fail under plain training for a structural reason (a saddle, a plateau, a local
minimum, duplicated or dead units); :class:`TeacherStudent` is a healthy control that trains without
trouble. The benchmark harness, the benchmark budgets and the larger benchmark problems are not part
of the package: they live in ``benchmarks/problems.py`` of the repository.

Example:
    >>> problem = StrictSaddle2D()
    >>> problem.metric(), problem.target, problem.solved()
    (1.0, -0.9, False)
    >>> problem.loss(problem.full_batch()).item()
    1.0
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

__all__ = [
    "DeadReLU",
    "DeepLinear",
    "MatrixFactorization",
    "MonkeySaddle2D",
    "Problem",
    "SixHumpCamel",
    "StrictSaddle2D",
    "SymmetricTeacherStudent",
    "TeacherStudent",
]


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

    Subclasses implement :meth:`loss`, :meth:`full_batch` and :meth:`metric`, and set :attr:`target`
    and :attr:`higher_is_better`.

    Args:
        seed: Seed of the data and of the initialisation.
        lr: Learning rate of plain SGD.
        steps_per_epoch: For full-batch problems, how many (identical) batches make an epoch.
    """

    higher_is_better: ClassVar[bool] = False
    #: What :meth:`metric` measures, for reports.
    metric_name: ClassVar[str] = "loss"

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

    def __init__(self, seed: int = 0, lr: float = 0.01, steps_per_epoch: int = 50) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        self.save_hyperparameters()

    @staticmethod
    @override
    def surface(xy: Tensor) -> Tensor:
        x, y = xy[..., 0], xy[..., 1]
        return (4 - 2.1 * x**2 + x**4 / 3) * x**2 + x * y + (-4 + 4 * y**2) * y**2


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

    def __init__(
        self, seed: int = 0, lr: float = 0.1, symmetric: bool = True, steps_per_epoch: int = 50
    ) -> None:
        super().__init__(seed=seed, lr=lr, symmetric=symmetric, steps_per_epoch=steps_per_epoch)


# --------------------------------------------------------------------------------------------------
# Dead ReLU units
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
