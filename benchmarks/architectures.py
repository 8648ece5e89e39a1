"""Benchmark problems built from architectures people train: CNNs, transformers and an RNN.

Not part of the installed package. Each class is a :class:`~lightning_escape.demos.problems.Problem`
that builds its data in code from its ``seed`` (or takes scikit-learn's bundled digits), evaluates
its metric cheaply (at most 512 held-out examples, without gradients, in eval mode) and brings its
own optimizer where practitioners would not use plain SGD. A whole benchmark run of each takes
seconds to tens of seconds on one CPU thread. They are registered in
``benchmarks.problems.PROBLEMS``:

- healthy controls, which plain training solves and an escape method must not harm:
  :class:`CNNDigitsCosine` (a small CNN with momentum SGD and cosine decay),
  :class:`TabularMLPLong` (an MLP on a small table, trained long past convergence),
  :class:`TransformerSort` (Lightning's demo ``Transformer``, AdamW) and
  :class:`WarmupTransformerLM` (a causal transformer language model with a long linear warm-up);
- a task with hidden progress: :class:`ModularAddition` (grokking);
- stalls documented in the literature, which plain training does not leave within its budget:
  :class:`VanillaRNNLatch` (vanishing gradients through time), :class:`AttentionPointer`
  (uniform attention whose query and key gradients vanish) and :class:`DeepSigmoidCNN` (saturated
  sigmoid units in a deep plain CNN). Each has a constructor argument that a practitioner would
  change to rescue it (an initialisation, an activation, a normalization or the optimizer), named
  in its docstring.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.demos import Transformer
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typing_extensions import override

from lightning_escape.demos.problems import Problem, _generator, _pair, _unchanged

__all__ = [
    "AttentionPointer",
    "CNNDigitsCosine",
    "DeepSigmoidCNN",
    "ModularAddition",
    "TabularMLPLong",
    "TransformerSort",
    "VanillaRNNLatch",
    "WarmupTransformerLM",
]

Batch = tuple[Tensor, ...]


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded_init(seed: int, stream: int) -> Iterator[None]:
    """Draw PyTorch's default initialisations from ``(seed, stream)``; the global RNG is left as is."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + stream)
        yield


@contextlib.contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode without gradients, then the module's previous mode."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size!r}.")


def _schedule_length(problem: Problem, total_steps: int | None) -> int:
    """The steps a learning-rate schedule spans: ``total_steps``, else the trainer's whole run."""
    if total_steps is not None:
        return total_steps
    estimate = problem.trainer.estimated_stepping_batches
    if not math.isfinite(estimate):
        raise ValueError("The schedule needs `total_steps` or a trainer with `max_steps`.")
    return max(1, int(estimate))


def _shuffled(tensors: Batch, batch_size: int, seed: int) -> DataLoader[Any]:
    """Minibatches of a fixed training set, reshuffled each epoch by a generator of the seed."""
    data = TensorDataset(*(t.cpu() for t in tensors))
    # A seeded generator makes the shuffling part of the problem, independent of global RNG state.
    shuffle = torch.Generator().manual_seed(seed * 1_000_003 + 2)
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=shuffle)


class _FreshBatches(Dataset[Batch]):
    """``length`` batches of freshly generated examples; batch ``i`` is a function of ``(seed, i)``."""

    def __init__(
        self,
        make: Callable[[torch.Generator, int], Batch],
        seed: int,
        batch_size: int,
        length: int,
    ) -> None:
        self.make = make
        self.seed = seed
        self.batch_size = batch_size
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Batch:
        # Seeding by index keeps batches reproducible under any sampler and on every rank.
        return self.make(_generator(self.seed, 1000 + index), self.batch_size)


def _fresh(
    make: Callable[[torch.Generator, int], Batch], seed: int, batch_size: int, length: int
) -> DataLoader[Any]:
    return DataLoader(
        _FreshBatches(make, seed, batch_size, length), batch_size=None, collate_fn=_unchanged
    )


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


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


class _Classifier(Problem):
    """Cross-entropy on its batches, scored by accuracy on the held-out ``x_test``, ``y_test``."""

    higher_is_better = True
    x_test: Tensor
    y_test: Tensor

    @override
    def loss(self, batch: Any) -> Tensor:
        x, y = _pair(batch)
        return F.cross_entropy(self(x), y)

    @override
    def metric(self) -> float:
        with _evaluating(self):
            return _accuracy(self(self.x_test), self.y_test)


class _SplitClassifier(_Classifier):
    """A classifier with a fixed training set and a held-out set, scored by held-out accuracy.

    Subclasses call :meth:`_split` with the data. Those with a ``batch_size`` attribute shuffle
    the training set into minibatches each epoch (seeded); without one (so that Lightning finds no
    batch size to change), every step takes the whole of it.
    """

    x_train: Tensor
    y_train: Tensor

    def _split(self, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor) -> None:
        """Keep the data as buffers (they follow the module's device, outside checkpoints)."""
        for name, value in zip(
            ("x_train", "y_train", "x_test", "y_test"), (x_train, y_train, x_test, y_test)
        ):
            self.register_buffer(name, value.clone(), persistent=False)

    @override
    def full_batch(self) -> tuple[Tensor, Tensor]:
        return self.x_train, self.y_train

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        batch_size = getattr(self, "batch_size", None)
        if batch_size is None:
            return super().train_dataloader()
        return _shuffled((self.x_train, self.y_train), batch_size, self.seed)


class _Streamed(Problem):
    """A problem trained on fresh examples every step: ``batch_size`` of them from ``_examples``."""

    batch_size: int

    def _examples(self, g: torch.Generator, count: int) -> Batch:
        """``count`` examples drawn with ``g``."""
        raise NotImplementedError

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        return _fresh(self._examples, self.seed, self.batch_size, self.steps_per_epoch)


class _StreamedClassifier(_Streamed, _Classifier):
    """A streamed problem with inputs and labels, scored by accuracy on held-out examples."""

    n_eval: ClassVar[int]

    def _hold_out(self, seed: int) -> None:
        """Draw the ``n_eval`` held-out examples (buffers, so they follow the module's device)."""
        x_test, y_test = self._examples(_generator(seed, 2), self.n_eval)
        self.register_buffer("x_test", x_test, persistent=False)
        self.register_buffer("y_test", y_test, persistent=False)

    @override
    def full_batch(self) -> tuple[Tensor, Tensor]:
        # There is no finite training set; the held-out sequences stand in for "the whole data".
        return self.x_test, self.y_test


# --------------------------------------------------------------------------------------------------
# Convolutional networks on scikit-learn's digits
# --------------------------------------------------------------------------------------------------


class _DigitImages(_SplitClassifier):
    """A classifier of the 8 × 8 digits images (1437 train, 360 test, the split of ``DigitsMLP``)."""

    metric_name: ClassVar[str] = "test accuracy"
    net: nn.Module

    def __init__(self, seed: int, lr: float, batch_size: int) -> None:
        super().__init__(seed=seed, lr=lr)
        _check_batch_size(batch_size)
        self.batch_size = batch_size
        x_train, y_train, x_test, y_test = _digits()
        self._split(x_train.reshape(-1, 1, 8, 8), y_train, x_test.reshape(-1, 1, 8, 8), y_test)

    @override
    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.net(x)
        return logits


class CNNDigitsCosine(_DigitImages):
    """A small CNN on the digits images with momentum SGD and cosine decay (control).

    ``Conv(1→16, 3×3, pad 1)`` → ReLU → 2×2 max-pool → ``Conv(16→32, 3×3, pad 1)`` → ReLU → 2×2
    max-pool → flatten (128) → ``Linear(128→64)`` → ReLU → ``Linear(64→10)``, PyTorch's default
    initialisation (seeded). SGD with momentum 0.9 and weight decay 5e-4, batch 64, learning rate
    0.05 decayed to 0 along a cosine over the whole run (``CosineAnnealingLR``, stepped every
    optimizer step; the run length is ``total_steps`` or the trainer's ``max_steps``). Target: test
    accuracy ≥ 0.95 on the fixed 360-image split; plain training reaches it in about 140 steps and
    ends near 0.99.

    Args:
        seed: Seed of the initialisation and of the shuffling.
        lr: Peak learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        batch_size: Minibatch size.
        total_steps: Length of the cosine schedule; None: the trainer's estimate of the run.
    """

    target = 0.95

    def __init__(
        self,
        seed: int = 0,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 64,
        total_steps: int | None = None,
    ) -> None:
        super().__init__(seed, lr, batch_size)
        self.save_hyperparameters()
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.total_steps = total_steps
        with _seeded_init(seed, 1):
            self.net = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(128, 64),
                nn.ReLU(),
                nn.Linear(64, 10),
            )

    @override
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:  # type: ignore[override]
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        steps = _schedule_length(self, self.total_steps)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


@functools.lru_cache(maxsize=1)
def _breast_cancer() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's breast cancer table standardized, split 455/114 by a fixed permutation."""
    from sklearn.datasets import load_breast_cancer

    table, labels = load_breast_cancer(return_X_y=True)
    x = torch.as_tensor(table, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:455], order[455:]
    # Standardized with the training part's statistics only, as a user's pipeline would.
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


class TabularMLPLong(_SplitClassifier):
    """An MLP on a small table, trained long past convergence with cosine decay (control).

    ``Linear(30→64)`` → ReLU → ``Linear(64→2)`` on scikit-learn's breast cancer table (569 rows,
    30 standardized features; a fixed 455/114 split), PyTorch's default initialisation (seeded).
    SGD with momentum 0.9 and weight decay 1e-4, batch 32, learning rate 0.05 decayed to 0 along a
    cosine over the whole run. The training loss falls to about 0.2% of its start within a few
    hundred steps and creeps on for the rest of the run, as on any small table trained for a fixed
    number of epochs: a converged run that an escape can only harm. Target: test accuracy ≥ 0.95;
    plain training reaches it within about 100 steps and ends at 0.96 to 0.98.

    Args:
        seed: Seed of the initialisation and of the shuffling.
        lr: Peak learning rate.
        batch_size: Minibatch size.
        total_steps: Length of the cosine schedule; None: the trainer's estimate of the run.
    """

    target = 0.95
    metric_name: ClassVar[str] = "test accuracy"

    def __init__(
        self,
        seed: int = 0,
        lr: float = 0.05,
        batch_size: int = 32,
        total_steps: int | None = None,
    ) -> None:
        super().__init__(seed=seed, lr=lr)
        _check_batch_size(batch_size)
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.total_steps = total_steps
        self._split(*_breast_cancer())
        with _seeded_init(seed, 1):
            self.net = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 2))

    @override
    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.net(x)
        return logits

    @override
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:  # type: ignore[override]
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)
        steps = _schedule_length(self, self.total_steps)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


Activation = Literal["sigmoid", "tanh", "relu"]
Init = Literal["default", "glorot", "he"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


class DeepSigmoidCNN(_DigitImages):
    """A deep plain CNN with sigmoid units on the digits images: saturation, a vanishing signal.

    ``depth`` convolutions ``3×3, pad 1`` with ``channels`` channels (the first from 1 channel),
    each followed by a sigmoid, no pooling or normalization, then flatten → ``Linear(64·channels →
    10)``; PyTorch's default initialisation, uniform in ±1/√fan_in: the "standard initialization"
    of Glorot & Bengio. Plain SGD, lr 0.1, batch 64. Every sigmoid unit sits near 0.5 with slope at
    most 1/4, so the input's signal and the gradients shrink layer by layer; the network's output
    hardly depends on the image and test accuracy stays at chance (8 to 11%). Target: test accuracy
    ≥ 0.90.

    Glorot and Bengio observed exactly this with sigmoid networks and the standard initialization:
    the top hidden layer saturates and training sits on a long plateau (X. Glorot and Y. Bengio,
    2010, "Understanding the difficulty of training deep feedforward neural networks", AISTATS,
    PMLR 9:249–256). The trap is escapable: with ``activation="relu", init="he"`` (He et al., 2015,
    "Delving Deep into Rectifiers", arXiv:1502.01852) or ``activation="tanh", init="glorot"`` the
    same network reaches the target within 100 steps, and so does the sigmoid network with
    ``batch_norm=True`` (Ioffe and Szegedy, 2015, arXiv:1502.03167). A larger initialisation alone
    (``init="glorot"`` or ``"he"`` with sigmoids) or Adam does not rescue it.

    Args:
        seed: Seed of the initialisation and of the shuffling.
        lr: Learning rate of SGD.
        batch_size: Minibatch size.
        depth: Convolution layers.
        channels: Channels of each convolution.
        activation: ``"sigmoid"``, ``"tanh"`` or ``"relu"``.
        init: ``"default"`` (PyTorch's), ``"glorot"`` (Xavier uniform) or ``"he"`` (Kaiming
            normal for ReLU); biases start at 0 with the latter two.
        batch_norm: Put a ``BatchNorm2d`` between each convolution and its activation.
    """

    target = 0.90

    def __init__(
        self,
        seed: int = 0,
        lr: float = 0.1,
        batch_size: int = 64,
        depth: int = 6,
        channels: int = 8,
        activation: Activation = "sigmoid",
        init: Init = "default",
        batch_norm: bool = False,
    ) -> None:
        super().__init__(seed, lr, batch_size)
        if depth < 1 or channels < 1:
            raise ValueError(f"`depth` and `channels` must be at least 1, got {depth}, {channels}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"`activation` can be {', '.join(_ACTIVATIONS)}, got {activation!r}.")
        if init not in ("default", "glorot", "he"):
            raise ValueError(f"`init` can be default, glorot, he, got {init!r}.")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        with _seeded_init(seed, 1):
            for i in range(depth):
                conv = nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1)
                if init == "glorot":
                    nn.init.xavier_uniform_(conv.weight)
                elif init == "he":
                    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                if init != "default":
                    nn.init.zeros_(conv.get_parameter("bias"))
                layers += [conv, nn.BatchNorm2d(channels)] if batch_norm else [conv]
                layers.append(_ACTIVATIONS[activation]())
            layers += [nn.Flatten(), nn.Linear(64 * channels, 10)]
        self.net = nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------------
# Transformers on synthetic token sequences
# --------------------------------------------------------------------------------------------------


def _sort_examples(g: torch.Generator, count: int, vocab: int, length: int) -> Batch:
    """``length`` distinct tokens below ``vocab``, the decoder's input and the sorted tokens."""
    source = torch.rand(count, vocab, generator=g).argsort(dim=1)[:, :length]
    ordered = source.sort(dim=1).values
    start = torch.full((count, 1), vocab, dtype=torch.long)
    return source, torch.cat([start, ordered[:, :-1]], dim=1), ordered


class TransformerSort(_Streamed):
    """Lightning's demo ``Transformer`` learning to sort token sequences, with AdamW (control).

    Each example is ``length`` = 8 distinct tokens drawn from ``vocab`` = 32; the target is the
    same tokens in increasing order. The model is ``lightning.pytorch.demos.Transformer``
    (``nn.Transformer`` encoder–decoder) with ``vocab_size = vocab + 1`` (one start token),
    ``ninp=64, nhead=4, nhid=128, nlayers=1, dropout=0``, default initialisation (seeded). Its
    encoder reads the unsorted tokens, its decoder reads the start token and the sorted tokens
    shifted by one (teacher forcing, causal mask) and predicts each sorted token. The demo's
    positional encoding adds the same vector at every position, so the model sees the source as a
    set, which is all sorting needs. AdamW lr 1e-3 (weight decay 0.01), batch 64, fresh examples
    every step. Metric: teacher-forced token accuracy on 256 held-out sequences; target ≥ 0.95,
    which plain training reaches in about 100 steps.

    Args:
        seed: Seed of the initialisation and of the examples.
        lr: Learning rate of AdamW.
        weight_decay: AdamW weight decay.
        batch_size: Sequences per step.
        steps_per_epoch: Batches per epoch.
    """

    target = 0.95
    higher_is_better = True
    metric_name: ClassVar[str] = "held-out token accuracy"
    vocab: ClassVar[int] = 32
    length: ClassVar[int] = 8
    n_eval: ClassVar[int] = 256
    eval_source: Tensor
    eval_decoder_input: Tensor
    eval_target: Tensor

    def __init__(
        self,
        seed: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        batch_size: int = 64,
        steps_per_epoch: int = 10_000,
    ) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        _check_batch_size(batch_size)
        self.save_hyperparameters()
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        source, decoder_input, target = self._examples(_generator(seed, 2), self.n_eval)
        self.register_buffer("eval_source", source, persistent=False)
        self.register_buffer("eval_decoder_input", decoder_input, persistent=False)
        self.register_buffer("eval_target", target, persistent=False)
        with _seeded_init(seed, 1):
            self.model = Transformer(
                vocab_size=self.vocab + 1, ninp=64, nhead=4, nhid=128, nlayers=1, dropout=0.0
            )

    def _examples(self, g: torch.Generator, count: int) -> Batch:
        return _sort_examples(g, count, self.vocab, self.length)

    @override
    def forward(self, source: Tensor, decoder_input: Tensor) -> Tensor:
        """Log-probabilities of every decoder position, shape ``(batch·length, vocab + 1)``."""
        log_probs: Tensor = self.model(source, decoder_input)
        return log_probs

    @override
    def full_batch(self) -> Batch:
        # There is no finite training set; the held-out examples stand in for "the whole data".
        return self.eval_source, self.eval_decoder_input, self.eval_target

    @override
    def loss(self, batch: Any) -> Tensor:
        source, decoder_input, target = batch
        return F.nll_loss(self(source, decoder_input), target.reshape(-1))

    @override
    def metric(self) -> float:
        with _evaluating(self):
            log_probs = self(self.eval_source, self.eval_decoder_input)
            return _accuracy(log_probs, self.eval_target.reshape(-1))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def _gpt2_init(module: nn.Module, std: float) -> None:
    """GPT-2's initialisation: linear, embedding and attention projection weights N(0, std²), biases 0."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "norm" in name:
                continue
            if name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.normal_(0.0, std)


def _markov_examples(g: torch.Generator, count: int, transitions: Tensor) -> Tensor:
    """``count`` sequences of a second-order Markov chain; the first two tokens are uniform."""
    vocab, length = transitions.shape[0], WarmupTransformerLM.context + 1
    tokens = torch.empty(count, length, dtype=torch.long)
    tokens[:, :2] = torch.randint(0, vocab, (count, 2), generator=g)
    for t in range(2, length):
        probs = transitions[tokens[:, t - 2], tokens[:, t - 1]]
        tokens[:, t] = torch.multinomial(probs, 1, generator=g)[:, 0]
    return tokens


class _CausalLM(nn.Module):
    """Token and learned position embeddings, a causal ``nn.TransformerEncoder`` and a linear head."""

    causal_mask: Tensor

    def __init__(
        self, vocab: int, context: int, width: int, heads: int, layers: int, init_std: float | None
    ) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)
        if init_std is not None:
            _gpt2_init(self, init_std)

    @override
    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        h = self.token(tokens) + self.position.weight[:t]
        h = self.blocks(h, mask=self.causal_mask[:t, :t], is_causal=True)
        logits: Tensor = self.head(h)
        return logits


class WarmupTransformerLM(_Streamed):
    """A causal transformer language model with a long linear warm-up, then cosine decay (control).

    Data: sequences of 17 tokens from a second-order Markov chain over 8 tokens whose transition
    distributions are ``softmax(2·N(0, 1))`` per pair of previous tokens (drawn from the seed);
    fresh sequences every step. Model: token and learned position embeddings (width 64), one
    post-norm ``nn.TransformerEncoderLayer`` block (4 heads, feed-forward 256, no dropout) with a
    causal mask, and a linear head; GPT-2's initialisation (every weight except the LayerNorms
    N(0, 0.02²), biases 0). AdamW (betas 0.9, 0.98, weight decay 0.01, batch 32) with the learning
    rate rising linearly from 0 to 3e-3 over the first ``warmup_fraction`` (40%) of the run, then
    decaying along a cosine to a tenth of the peak; the run length is ``total_steps`` or the
    trainer's ``max_steps``. While the learning rate is tiny the model only learns the token
    frequencies; from about step 100 to step 400 of the default 2000 the loss creeps (by about 1%
    of its value per 100 steps), and it falls once the learning rate has grown. The target is met
    near the end of the warm-up (about step 800).

    Metric: the next-token cross-entropy on 256 held-out sequences minus that of the true chain
    (the Bayes predictor, exact on the same tokens; the first prediction has one token of context
    and is uniform), in nats: about 0.75 at the start, 0.01 at the end of the run; target ≤ 0.1.

    Args:
        seed: Seed of the chain, the initialisation and the sequences.
        lr: Peak learning rate.
        warmup_fraction: Fraction of the run spent warming up.
        weight_decay: AdamW weight decay.
        batch_size: Sequences per step.
        total_steps: Length of the schedule; None: the trainer's estimate of the run.
        steps_per_epoch: Batches per epoch.
    """

    target = 0.1
    metric_name: ClassVar[str] = "held-out excess loss"
    vocab: ClassVar[int] = 8
    context: ClassVar[int] = 16
    depth: ClassVar[int] = 1
    init_std: ClassVar[float | None] = 0.02
    n_eval: ClassVar[int] = 256
    transitions: Tensor
    eval_tokens: Tensor

    def __init__(
        self,
        seed: int = 0,
        lr: float = 3e-3,
        warmup_fraction: float = 0.4,
        weight_decay: float = 0.01,
        batch_size: int = 32,
        total_steps: int | None = None,
        steps_per_epoch: int = 10_000,
    ) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        _check_batch_size(batch_size)
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"`warmup_fraction` must be in [0, 1), got {warmup_fraction!r}.")
        self.save_hyperparameters()
        self.warmup_fraction = warmup_fraction
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.total_steps = total_steps
        logits = 2 * torch.randn(self.vocab, self.vocab, self.vocab, generator=_generator(seed, 0))
        self.register_buffer("transitions", logits.softmax(-1), persistent=False)
        eval_tokens = _markov_examples(_generator(seed, 2), self.n_eval, self.transitions)
        self.register_buffer("eval_tokens", eval_tokens, persistent=False)
        self.bayes_loss = self._bayes_loss(eval_tokens)
        with _seeded_init(seed, 1):
            self.model = _CausalLM(
                self.vocab,
                self.context,
                width=64,
                heads=4,
                layers=self.depth,
                init_std=self.init_std,
            )

    def _bayes_loss(self, tokens: Tensor) -> float:
        """The true chain's mean next-token cross-entropy on ``tokens`` (the first is uniform)."""
        probs = self.transitions[tokens[:, :-2], tokens[:, 1:-1], tokens[:, 2:]]
        first = math.log(self.vocab) * tokens.shape[0]
        return float((first - probs.log().sum()) / (tokens.shape[0] * (tokens.shape[1] - 1)))

    def _examples(self, g: torch.Generator, count: int) -> Batch:
        return (_markov_examples(g, count, self.transitions.cpu()),)

    @override
    def forward(self, tokens: Tensor) -> Tensor:
        logits: Tensor = self.model(tokens)
        return logits

    def _next_token_loss(self, tokens: Tensor) -> Tensor:
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, self.vocab), tokens[:, 1:].reshape(-1))

    @override
    def full_batch(self) -> Batch:
        # There is no finite training set; the held-out sequences stand in for "the whole data".
        return (self.eval_tokens,)

    @override
    def loss(self, batch: Any) -> Tensor:
        (tokens,) = batch
        return self._next_token_loss(tokens)

    @override
    def metric(self) -> float:
        with _evaluating(self):
            return float(self._next_token_loss(self.eval_tokens)) - self.bayes_loss

    @override
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:  # type: ignore[override]
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.lr, betas=(0.9, 0.98), weight_decay=self.weight_decay
        )
        steps = _schedule_length(self, self.total_steps)
        warmup = max(1, round(self.warmup_fraction * steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(_warmup_cosine, warmup=warmup, total=steps, floor=0.1)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def _warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up from 0 to 1 over ``warmup`` steps, then a cosine from 1 down to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------
# Grokking
# --------------------------------------------------------------------------------------------------


class ModularAddition(_SplitClassifier):
    """Grokking modular addition: the training set is fitted long before the task is learnt.

    All ``p² = 961`` pairs ``(a, b)`` with ``p = 31``, labelled ``(a + b) mod p``; a random half
    (from the seed) is the training set, the rest (481 pairs) is held out. Model: a shared
    embedding of ``a`` and ``b`` (width 64), concatenated, → ``Linear(128→256)`` → ReLU →
    ``Linear(256→p)``; default initialisation (seeded). Full-batch AdamW, lr 0.01, betas (0.9,
    0.98), weight decay 2. Training accuracy is 100% after about 20 steps, while held-out accuracy
    stays below 0.02 (under chance) until step 300; weight decay then slowly turns the memorising
    solution into one that generalises: held-out accuracy passes 0.5 near step 600 and the target
    (≥ 0.95) near step 1000. Grokking was described by A. Power, Y. Burda, H. Edwards, I.
    Babuschkin and V. Misra (2022), "Grokking: Generalization Beyond Overfitting on Small
    Algorithmic Datasets", arXiv:2201.02177; learnt embeddings with an MLP decoder grok as well
    (Z. Liu, O. Kitouni, N. Nolte, E. J. Michaud, M. Tegmark and M. Williams, 2022, "Towards
    Understanding Grokking: An Effective Theory of Representation Learning", NeurIPS,
    arXiv:2205.10343; A. Gromov, 2023, "Grokking modular arithmetic", arXiv:2301.02679).

    Args:
        seed: Seed of the split and the initialisation.
        lr: Learning rate of AdamW.
        weight_decay: AdamW weight decay.
        p: The modulus.
        train_fraction: Fraction of the pairs used for training.
        steps_per_epoch: Steps per epoch.
    """

    target = 0.95
    metric_name: ClassVar[str] = "held-out accuracy"
    width: ClassVar[int] = 64
    hidden: ClassVar[int] = 256

    def __init__(
        self,
        seed: int = 0,
        lr: float = 0.01,
        weight_decay: float = 2.0,
        p: int = 31,
        train_fraction: float = 0.5,
        steps_per_epoch: int = 50,
    ) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        if p < 2:
            raise ValueError(f"`p` must be at least 2, got {p!r}.")
        if not 0 < train_fraction < 1:
            raise ValueError(f"`train_fraction` must be in (0, 1), got {train_fraction!r}.")
        self.save_hyperparameters()
        self.weight_decay = weight_decay
        self.p = p
        a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
        pairs = torch.stack([a.flatten(), b.flatten()], dim=1)
        labels = pairs.sum(1) % p
        order = torch.randperm(p * p, generator=_generator(seed, 0))
        n_train = round(train_fraction * p * p)
        train, test = order[:n_train], order[n_train:][:512]
        self._split(pairs[train], labels[train], pairs[test], labels[test])
        with _seeded_init(seed, 1):
            self.embedding = nn.Embedding(p, self.width)
            self.mlp = nn.Sequential(
                nn.Linear(2 * self.width, self.hidden), nn.ReLU(), nn.Linear(self.hidden, p)
            )

    @override
    def forward(self, pairs: Tensor) -> Tensor:
        logits: Tensor = self.mlp(self.embedding(pairs).flatten(1))
        return logits

    def train_accuracy(self) -> float:
        """Accuracy on the training pairs."""
        with _evaluating(self):
            return _accuracy(self(self.x_train), self.y_train)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.lr, betas=(0.9, 0.98), weight_decay=self.weight_decay
        )


# --------------------------------------------------------------------------------------------------
# Documented stalls: recurrent and attention
# --------------------------------------------------------------------------------------------------


def _latch_examples(g: torch.Generator, count: int, length: int, classes: int) -> Batch:
    """One-hot sequences: a class symbol first, then ``length − 1`` random distractor symbols."""
    symbols = torch.randint(classes, 2 * classes, (count, length), generator=g)
    labels = torch.randint(0, classes, (count,), generator=g)
    symbols[:, 0] = labels
    return F.one_hot(symbols, 2 * classes).float(), labels


class VanillaRNNLatch(_StreamedClassifier):
    """A vanilla tanh RNN that must remember its first input for 40 steps: vanishing gradients.

    Each sequence is 40 one-hot symbols over 16: the first is one of 8 class symbols, the other 39
    are random distractor symbols (the other 8); the label is the class, read from the last hidden
    state. Model: ``nn.RNN(16, 32, nonlinearity="tanh")`` and ``Linear(32→8)``, PyTorch's default
    initialisation (uniform in ±1/√32, so the recurrent matrix has spectral radius about 0.6).
    Adam, lr 1e-3, batch 64, fresh sequences every step. The gradient that reaches the first step
    shrinks by at least that factor per step (at initialisation the gradient with respect to the
    first input is 1e-8 to 1e-11 times that with respect to the last) and is buried under the
    gradients of the distractors: the loss stays at ``ln 8`` and accuracy at chance. Target:
    held-out accuracy ≥ 0.95 on 512 sequences.

    This is the "information latching" problem of Y. Bengio, P. Simard and P. Frasconi (1994),
    "Learning long-term dependencies with gradient descent is difficult", IEEE Transactions on
    Neural Networks 5(2):157–166 (also S. Hochreiter, 1991, diploma thesis, TU Munich), analysed
    by R. Pascanu, T. Mikolov and Y. Bengio (2013), "On the difficulty of training recurrent neural
    networks", ICML, arXiv:1211.5063. The trap is escapable: with ``init="orthogonal"`` (an
    orthogonal recurrent matrix, Saxe et al. 2014, arXiv:1312.6120) the same RNN and optimizer
    reach 100% within about 200 steps.

    Args:
        seed: Seed of the initialisation and of the sequences.
        lr: Learning rate of Adam.
        init: ``"default"`` (PyTorch's) or ``"orthogonal"`` (the recurrent matrix only).
        batch_size: Sequences per step.
        steps_per_epoch: Batches per epoch.
    """

    target = 0.95
    higher_is_better = True
    metric_name: ClassVar[str] = "held-out accuracy"
    length: ClassVar[int] = 40
    classes: ClassVar[int] = 8
    hidden: ClassVar[int] = 32
    n_eval: ClassVar[int] = 512

    def __init__(
        self,
        seed: int = 0,
        lr: float = 1e-3,
        init: Literal["default", "orthogonal"] = "default",
        batch_size: int = 64,
        steps_per_epoch: int = 10_000,
    ) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        _check_batch_size(batch_size)
        if init not in ("default", "orthogonal"):
            raise ValueError(f"`init` can be default, orthogonal, got {init!r}.")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self._hold_out(seed)
        with _seeded_init(seed, 1):
            self.rnn = nn.RNN(2 * self.classes, self.hidden, nonlinearity="tanh", batch_first=True)
            self.readout = nn.Linear(self.hidden, self.classes)
            if init == "orthogonal":
                nn.init.orthogonal_(self.rnn.get_parameter("weight_hh_l0"))

    def _examples(self, g: torch.Generator, count: int) -> Batch:
        return _latch_examples(g, count, self.length, self.classes)

    @override
    def forward(self, x: Tensor) -> Tensor:
        states, _ = self.rnn(x)
        logits: Tensor = self.readout(states[:, -1])
        return logits

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _pointer_examples(g: torch.Generator, count: int, length: int, values: int) -> Batch:
    """``length`` value tokens, then a query token naming a position; the label is its value."""
    content = torch.randint(0, values, (count, length), generator=g)
    position = torch.randint(0, length, (count,), generator=g)
    tokens = torch.cat([content, (values + position)[:, None]], dim=1)
    return tokens, content[torch.arange(count), position]


class AttentionPointer(_StreamedClassifier):
    """A one-block transformer that must attend to one of 64 tokens: attention stays uniform.

    Each sequence is 64 value tokens (16 values) followed by a query token naming a position; the
    label is the value at that position. Model: token and learned position embeddings (width 32),
    one pre-norm transformer block read out at the query position (single-head softmax attention
    with query, key, value and output projections, then a 4× GELU MLP, both residual), a final
    LayerNorm and a linear head. GPT-2's initialisation: every linear and embedding weight
    N(0, 0.02²), biases 0. Plain SGD with momentum 0.9, lr 0.1, batch 64, fresh sequences every
    step. The attention logits start near 0, so attention is uniform over 65 tokens and the block's
    output is an average in which the addressed value has weight 1/65; the gradients of the query
    and key weights are products of that weak signal and of the small softmax derivative, and the
    model stays near chance (held-out accuracy 0.04 to 0.09; chance is 1/16) for the whole budget,
    at learning rates from 0.02 to 0.5. Target: held-out accuracy ≥ 0.95 on 512 sequences.

    D. T. Hoffmann, S. Schrodi, J. Bratulić, N. Behrmann, V. Fischer and T. Brox (2024),
    "Eureka-Moments in Transformers: Multi-Step Tasks Reveal Softmax Induced Optimization
    Problems", ICML, arXiv:2310.12956, trace such plateaus to vanishing gradients of the query and
    key weights when the softmax attention is ill-distributed; J. Zhang et al. (2020), "Why are
    Adaptive Methods Good for Attention Models?", NeurIPS, arXiv:1912.03194, show that SGD trains
    attention models much worse than adaptive methods. The trap is escapable: with
    ``optimizer="adam"`` (per-parameter step sizes, lr 1e-3) the same model sits on a plateau for
    about 600 steps, then learns the task abruptly (a "Eureka moment") and reaches the target
    within 800 steps.

    Args:
        seed: Seed of the initialisation and of the sequences.
        lr: Learning rate.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        batch_size: Sequences per step.
        steps_per_epoch: Batches per epoch.
    """

    target = 0.95
    higher_is_better = True
    metric_name: ClassVar[str] = "held-out accuracy"
    length: ClassVar[int] = 64
    values: ClassVar[int] = 16
    width: ClassVar[int] = 32
    n_eval: ClassVar[int] = 512

    def __init__(
        self,
        seed: int = 0,
        lr: float = 0.1,
        optimizer: Literal["sgd", "adam"] = "sgd",
        batch_size: int = 64,
        steps_per_epoch: int = 10_000,
    ) -> None:
        super().__init__(seed=seed, lr=lr, steps_per_epoch=steps_per_epoch)
        _check_batch_size(batch_size)
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"`optimizer` can be sgd, adam, got {optimizer!r}.")
        self.save_hyperparameters()
        self.optimizer_name = optimizer
        self.batch_size = batch_size
        self._hold_out(seed)
        d = self.width
        self.token = nn.Embedding(self.values + self.length, d)
        self.position = nn.Embedding(self.length + 1, d)
        self.norm_attention = nn.LayerNorm(d)
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norm_final = nn.LayerNorm(d)
        self.head = nn.Linear(d, self.values)
        g = _generator(seed, 1)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()

    def _examples(self, g: torch.Generator, count: int) -> Batch:
        return _pointer_examples(g, count, self.length, self.values)

    def attention(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """The residual stream at the query position after attention, and the attention weights."""
        h = self.token(tokens) + self.position.weight
        a = self.norm_attention(h)
        q = self.query(a[:, -1:])
        logits = q @ self.key(a).transpose(1, 2) / math.sqrt(self.width)
        weights = logits.softmax(-1)
        return h[:, -1] + self.out((weights @ self.value(a))[:, 0]), weights[:, 0]

    @override
    def forward(self, tokens: Tensor) -> Tensor:
        z, _ = self.attention(tokens)
        z = z + self.mlp(self.norm_mlp(z))
        logits: Tensor = self.head(self.norm_final(z))
        return logits

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
