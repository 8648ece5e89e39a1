"""Run the curvature probe on a held batch inside a running ``Trainer.fit``, leaving no trace.

A probe evaluates the loss on a batch and differentiates it twice. Done naively from a callback
that changes the run: dropout draws from the global RNG, BatchNorm updates its running statistics,
``training_step`` logs (overwriting what the real step logged) and updates metrics. The helpers
here run the loss under :func:`preserved`, which puts all of that back bit for bit, so a run with
probes trains to bitwise the same parameters as a run without.

What is not undone: side effects of user code beyond the module's own state, such as counters
kept outside the module's buffers and metrics, direct writes to a logger's ``experiment``,
prints, file writes, or metrics held in plain Python containers that are not registered
submodules. A ``training_step`` with such side effects should be given a ``loss_fn`` instead.

Hessian-vector products are taken by double backward where the module allows it. Where it does not
(fused attention kernels such as ``F.scaled_dot_product_attention`` on its flash or
memory-efficient backends, ``torch.compile``d modules, ``once_differentiable`` functions), the
probe falls back to central differences of gradients, which need only a first-order backward, and
remembers that for the module; the parameters are moved for those and copied back bit for bit.
"""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_escape.curvature import (
    METHODS,
    DoubleBackwardUnsupported,
    ProbeUnavailable,
    Spectrum,
    _check_steps,
    _check_tol,
    curvature_along,
    hessian_spectrum,
)

__all__ = [
    "PROBE_METHODS",
    "ProbeUnavailable",
    "as_kept",
    "checked_loss",
    "evaluate_loss",
    "hvp_method",
    "intact",
    "loss_from_training_step",
    "preserved",
    "probe_curvature",
    "probe_direction",
]

# Metric bookkeeping besides the declared states (which the public `Metric.metric_state` gives):
# the update counter, cached results and the sync flags that `forward` and `compute` flip.
# torchmetrics (1.4 to 1.9) has no public way to set these: `update_count` is read-only and the
# rest have no public accessor at all, so they are saved and put back under their private names.
_METRIC_ATTRS = (
    "_update_count",
    "_computed",
    "_forward_cache",
    "_cache",
    "_is_synced",
    "_should_unsync",
    "_to_sync",
)
_MISSING = object()

#: Ways :func:`probe_curvature` may take Hessian-vector products: ``"auto"`` tries double
#: backward and falls back to finite differences, the others force one (see ``METHODS``).
PROBE_METHODS = ("auto", *METHODS)

# Modules whose graph has no double backward, with the error that said so: later probes of them
# go straight to finite differences. Weak, so that a probed module can still be freed.
_NO_DOUBLE_BACKWARD: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def _check_method(method: object) -> str:
    if method not in PROBE_METHODS:
        raise ValueError(f"`method` must be one of {PROBE_METHODS}, got {method!r}.")
    assert isinstance(method, str)
    return method


def hvp_method(module: torch.nn.Module) -> str:
    """How ``method="auto"`` probes of ``module`` take Hessian-vector products now.

    Args:
        module: A module, probed or not.

    Returns:
        ``"finite_difference"`` once a probe found that the module's loss has no double backward,
        else ``"exact"``.

    Example:
        >>> hvp_method(torch.nn.Linear(2, 1))
        'exact'
    """
    return "finite_difference" if module in _NO_DOUBLE_BACKWARD else "exact"


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"`seed` must be an integer in [0, 2**64), got {seed!r}.")
    return seed


def _check_batch_idx(batch_idx: object) -> int:
    if isinstance(batch_idx, bool) or not isinstance(batch_idx, int) or batch_idx < 0:
        raise ValueError(f"`batch_idx` must be a non-negative integer, got {batch_idx!r}.")
    return batch_idx


def _cuda_devices(module: torch.nn.Module) -> list[int]:
    devices = {
        t.device.index if t.device.index is not None else torch.cuda.current_device()
        for t in [*module.parameters(), *module.buffers()]
        if t.device.type == "cuda"
    }
    return sorted(devices)


def _seed_all(seed: int, cuda_devices: list[int]) -> None:
    # Seed only the generators the module can draw from: `torch.manual_seed` would also reseed
    # every other GPU of the process, which `fork_rng` below does not restore.
    torch.default_generator.manual_seed(seed)
    for index in cuda_devices:
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch in practice
        return
    # The legacy global generator is the one user code reaches through `np.random.*`.
    np.random.seed(seed % 2**32)  # noqa: NPY002


@contextmanager
def _python_rngs() -> Iterator[None]:
    state = random.getstate()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None  # type: ignore[assignment]
    np_state = None if np is None else np.random.get_state()
    try:
        yield
    finally:
        random.setstate(state)
        if np is not None:
            np.random.set_state(np_state)


def _copy_back(dst: Tensor, src: Tensor) -> None:
    # An inference tensor (a metric state reset under `Trainer.validate`, say) can only be
    # written inside inference mode; a normal tensor only outside it. `inference_mode(False)`
    # turns grad mode back on, so `no_grad` comes inside it (a tensor may require grad).
    with torch.inference_mode(dst.is_inference()), torch.no_grad():
        dst.copy_(src)


def _snapshot(value: Any, clone: bool = True) -> Any:
    """``(value, saved)`` for :func:`_restore`: lists and dicts keep their members, tensors a copy.

    With ``clone=False`` tensors are kept by identity, neither copied nor written back: a tensor
    held as an attribute (a dataset, an epoch's outputs) may be a view with stride 0 or a read-only
    memory map, and a tensor written in place is told by its version counter instead.
    """
    if isinstance(value, Tensor):
        return value, value.detach().clone() if clone else None
    if isinstance(value, list):
        return value, [_snapshot(v, clone) for v in value]
    if isinstance(value, dict):
        return value, {k: _snapshot(v, clone) for k, v in value.items()}
    return value, None


def _restore(saved: Any) -> Any:
    ref, copy = saved
    if copy is None:  # kept by identity only
        return ref
    if isinstance(ref, Tensor):
        if ref.shape == copy.shape:
            _copy_back(ref, copy)
        return ref
    if isinstance(ref, list):
        # `Metric.reset` clears list states in place, so refill the original list object.
        ref[:] = [_restore(item) for item in copy]
        return ref
    if isinstance(ref, dict):
        restored = {k: _restore(v) for k, v in copy.items()}
        ref.clear()
        ref.update(restored)
        return ref
    return ref


def _attributes(module: torch.nn.Module) -> dict[str, Any]:
    """The module's own public attributes (not submodules, parameters or buffers), saved.

    ``training_step`` may keep things there: outputs collected for the epoch's end (the pattern
    Lightning's docs show), a count, a running statistic held as a plain tensor.
    """
    return {
        name: _snapshot(value, clone=False) for name, value in vars(module).items() if _public(name)
    }


# A tensor attribute up to this size is copied before the probe, so that one written in place
# (a count, a running statistic held as a plain tensor) can be put back; larger ones (a dataset
# held by the module) are only watched, and named if written.
_COPIED_ATTRIBUTE_BYTES = 1 << 20


def _versions(module: torch.nn.Module) -> dict[str, tuple[int, Tensor | None]]:
    """The version counters of the tensors in the module's public attributes, with small copies.

    Each tensor's copy is kept when it is at most :data:`_COPIED_ATTRIBUTE_BYTES` and can be
    written back (not a view whose elements share memory, such as ``expand``'s).
    """
    versions: dict[str, tuple[int, Tensor | None]] = {}
    for name, value in vars(module).items():
        if isinstance(value, Tensor) and _public(name) and not value.is_inference():
            small = value.numel() * value.element_size() <= _COPIED_ATTRIBUTE_BYTES
            # A stride of 0 over a dimension longer than 1: several elements in one place.
            shared = any(st == 0 and n > 1 for st, n in zip(value.stride(), value.shape))
            keep = small and not shared and value.layout == torch.strided
            versions[name] = (value._version, value.detach().clone() if keep else None)
    return versions


def _put_back_written(module: torch.nn.Module, versions: Mapping[str, Any]) -> list[str]:
    """Copy back the tensor attributes written in place; the names of those that could not be."""
    lost = []
    for name, (version, copy) in versions.items():
        value = vars(module).get(name)
        if not isinstance(value, Tensor) or value._version == version:
            continue
        try:
            if copy is None or copy.shape != value.shape or copy.dtype != value.dtype:
                raise RuntimeError("no copy to put back")
            _copy_back(value, copy)
        except RuntimeError:  # and a write into memory its elements share
            lost.append(name)
    return lost


def _put_back(
    owner: MutableMapping[str, Any], saved: Mapping[str, Any], covers: Callable[[str], bool]
) -> None:
    """Drop the keys of ``owner`` that ``covers`` and the block set; put the ``saved`` ones back."""
    for key in [k for k in owner if covers(k) and k not in saved]:
        del owner[key]
    for key, entry in saved.items():
        owner[key] = _restore(entry)


def _written_by_forward(module: torch.nn.Module) -> list[Tensor]:
    """The parameters a forward pass writes in place: the weights of embeddings with ``max_norm``.

    ``nn.Embedding(max_norm=...)`` (and ``nn.EmbeddingBag``) renormalise the rows they look up,
    in place, in every forward: the probe's extra passes would renormalise rows the run itself
    had not looked up yet.
    """
    found: dict[int, Tensor] = {}
    for sub in module.modules():
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and sub.max_norm is not None:
            weight = sub._parameters.get("weight")
            if isinstance(weight, Tensor):
                found[id(weight)] = weight
    return list(found.values())


def _public(name: str) -> bool:
    return not name.startswith("_") and name != "training"


def _schedules(module: torch.nn.Module) -> list[tuple[Any, Any, Any]]:
    """The trainer's schedulers and optimizers' group settings (a scheduler stepped in a step)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return []
    saved: list[tuple[Any, Any, Any]] = [
        ("scheduler", scheduler, {k: _snapshot(v, clone=False) for k, v in vars(scheduler).items()})
        for config in getattr(trainer, "lr_scheduler_configs", [])
        for scheduler in _with_children(config.scheduler)
    ]
    for optimizer in getattr(trainer, "optimizers", []):
        for group in optimizer.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            saved.append(("group", group, {k: _snapshot(v) for k, v in settings.items()}))
    return saved


def _with_children(scheduler: Any) -> list[Any]:
    """A scheduler and those it steps (``SequentialLR``, ``ChainedScheduler``)."""
    children = getattr(scheduler, "_schedulers", [])
    return [scheduler, *(s for child in children for s in _with_children(child))]


def _put_back_schedules(saved: list[tuple[Any, Any, Any]]) -> None:
    for kind, owner, state in saved:
        if kind == "scheduler":
            # Its own attributes, by identity (a lambda's object keeps its module), lists and
            # dicts with their members: what `step` changes, and nothing it refers to.
            _put_back(vars(owner), state, lambda key: True)
        else:
            _put_back(owner, state, lambda key: key != "params")


def _noop_log(*args: Any, **kwargs: Any) -> None:
    """Swallow a ``log`` call made while the module is being probed."""


@contextmanager
def preserved(module: torch.nn.Module, *, seed: int) -> Iterator[None]:
    """Run code on a module and then put everything back as it was, bit for bit.

    On entry the random generators are seeded with ``seed``; on exit, even after an exception,
    these are restored:

    - the global random state: torch's CPU generator, the CUDA generators of the devices the
      module lives on, Python's :mod:`random` and NumPy's legacy global generator;
    - every buffer (BatchNorm running statistics and ``num_batches_tracked``): the same tensor
      object, with its old values;
    - each submodule's ``training`` flag;
    - each parameter's ``.grad``: the same tensor object (or ``None``), with its old values;
    - the state of every :class:`torchmetrics.Metric` registered in the module: the declared
      states (tensors and lists, the same objects with their old contents), the update count and
      the cached ``compute`` and ``forward`` results;
    - the module's own public attributes (``self.outputs = []`` and the like): the same
      objects, and lists and dicts with their old members; an attribute set inside the block is
      removed; a tensor attribute written in place there gets its old values back when it is at
      most 1 MiB (a count, a running statistic), else a warning names it;
    - with a trainer attached, its learning-rate schedulers' attributes and every optimizer
      parameter group's settings (the learning rate a scheduler stepped inside ``training_step``
      set);
    - if ``module`` is a :class:`~lightning.pytorch.LightningModule`, ``module.log`` and
      ``module.log_dict`` do nothing inside the block, so a ``training_step`` called there cannot
      overwrite what the real step logged.

    - the weights of embeddings with ``max_norm``, which every forward pass renormalises in
      place where it looks rows up.

    Other parameters are not saved: code run inside must not change them. Buffers and
    gradients are cloned, so the block needs memory for one extra copy of each. State kept
    elsewhere (in a submodule's plain attributes, a global, a file) is not put back.

    Args:
        module: The module to protect.
        seed: Seed for the random generators inside the block.

    Raises:
        ValueError: If ``seed`` is not an integer in ``[0, 2**64)``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Dropout(0.5))
        >>> before = torch.get_rng_state()
        >>> with preserved(net, seed=0):
        ...     _ = net(torch.randn(4, 3))
        >>> torch.equal(torch.get_rng_state(), before), int(net[0].num_batches_tracked)
        (True, 0)
    """
    seed = _check_seed(seed)
    cuda_devices = _cuda_devices(module)
    modes = [(m, m.training) for m in module.modules()]
    buffers = [
        (owner, name, _snapshot(buf))
        for owner in module.modules()
        for name, buf in owner._buffers.items()
        if buf is not None
    ]
    grads = [(p, _snapshot(p.grad) if p.grad is not None else None) for p in module.parameters()]
    written = [(p, p._version, p.detach().clone()) for p in _written_by_forward(module)]
    metrics = [
        (
            metric,
            {name: _snapshot(state) for name, state in metric.metric_state.items()},
            {name: getattr(metric, name, _MISSING) for name in _METRIC_ATTRS},
        )
        for metric in module.modules()
        if isinstance(metric, Metric)
    ]
    attributes = _attributes(module)
    versions = _versions(module)
    schedules = _schedules(module)
    patched: dict[str, Any] = {}
    if isinstance(module, LightningModule):
        for name in ("log", "log_dict"):
            patched[name] = module.__dict__.get(name, _MISSING)
            module.__dict__[name] = _noop_log
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
        stack.enter_context(_python_rngs())
        try:
            _seed_all(seed, cuda_devices)
            yield
        finally:
            _put_back(vars(module), attributes, _public)
            _put_back_schedules(schedules)
            lost = _put_back_written(module, versions)
            if lost:
                rank_zero_warn(
                    f"The probe's extra `training_step` changed the tensor attribute(s) "
                    f"{', '.join(lost)} of {type(module).__name__} in place, which cannot be "
                    "put back (larger than 1 MiB, or a view that shares memory between its "
                    "elements); keep such state in a buffer (`register_buffer`), which is.",
                )
            for name, old in patched.items():
                if old is _MISSING:
                    module.__dict__.pop(name, None)
                else:
                    module.__dict__[name] = old
            for metric, states, attrs in metrics:
                for name, saved in states.items():
                    setattr(metric, name, _restore(saved))
                for name, value in attrs.items():
                    if value is _MISSING:
                        metric.__dict__.pop(name, None)
                    else:
                        setattr(metric, name, value)
            for p, saved_grad in grads:
                p.grad = None if saved_grad is None else _restore(saved_grad)
            for weight, version, values in written:
                if weight._version != version:
                    _copy_back(weight, values)
            for owner, name, saved in buffers:
                owner._buffers[name] = _restore(saved)
            for m, training in modes:
                m.training = training


def intact(batch: Any) -> Any:
    """A copy of ``batch``'s containers (dicts, lists, tuples, dataclasses) around its tensors.

    ``training_step`` may take its batch apart (``labels = batch.pop("labels")``): each call
    the probe makes gets its own containers, and so does the batch kept for it, copied before
    the real step. Tensors are shared, not copied.

    Example:
        >>> batch = {"x": torch.ones(2), "labels": torch.zeros(2)}
        >>> kept = intact(batch)
        >>> _ = batch.pop("labels")
        >>> sorted(kept), kept["x"] is batch["x"]
        (['labels', 'x'], True)
    """
    try:
        return apply_to_collection(batch, Tensor, _same)
    except Exception:
        # Containers that cannot be rebuilt (a frozen dataclass, a mapping whose constructor
        # takes more than its items): the batch itself, as a step that does not take it apart
        # needs.
        return batch


def _same(tensor: Tensor) -> Tensor:
    return tensor


def as_kept(before: Any, after: Any) -> Any:
    """The batch to keep for the probe: ``after`` the step, with what the step took from it.

    ``before`` is :func:`intact`'s copy from before any hook ran, ``after`` the batch as it is at
    the step's end: a module's ``on_train_batch_start`` may have added to it (kept), and its
    ``training_step`` may have taken from it (put back from ``before``).

    Example:
        >>> before = {"x": torch.ones(2), "labels": torch.zeros(2)}
        >>> after = {"x": before["x"], "mask": torch.ones(2)}  # labels popped, mask added
        >>> sorted(as_kept(before, after))
        ['labels', 'mask', 'x']
    """
    if isinstance(before, Mapping) and isinstance(after, Mapping) and type(before) is type(after):
        missing = [key for key in before if key not in after]
        if missing:
            kept = intact(after)
            try:
                for key in missing:
                    kept[key] = before[key]
            except TypeError:  # a mapping without item assignment
                return after
            return kept
    if isinstance(before, list) and isinstance(after, list) and len(after) < len(before):
        return before  # items popped from a list batch
    return after


def loss_from_training_step(module: LightningModule, batch: Any, batch_idx: int) -> Tensor | None:
    """Call ``module.training_step`` and pick the loss out of what it returns.

    ``batch_idx`` is passed only if ``training_step`` takes it, as Lightning does, with a copy
    of the batch's containers (:func:`intact`). This does not protect anything else: run it under
    :func:`preserved`.

    Args:
        module: The LightningModule.
        batch: The batch, already on the module's device.
        batch_idx: Index passed to ``training_step``.

    Returns:
        The returned tensor, or the ``"loss"`` entry of a returned mapping; ``None`` when
        ``training_step`` returns neither.

    Raises:
        ProbeUnavailable: If ``training_step`` raises when called again outside Lightning's own
            step (it may rely on what only that step sets up).

    Example:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> model = BoringModel()
        >>> with preserved(model, seed=0):
        ...     loss = loss_from_training_step(model, torch.randn(2, 32), 0)
        >>> loss.shape
        torch.Size([])
    """
    args: tuple[Any, ...] = (intact(batch),)
    if is_param_in_hook_signature(module.training_step, "batch_idx", min_args=2):
        args = (*args, batch_idx)
    try:
        output = module.training_step(*args)
    except Exception as err:
        # The user's code, called where Lightning does not call it: a run must not die of it.
        raise ProbeUnavailable(
            f"`training_step` raised {type(err).__name__}: {err} when called again on a kept "
            "batch; pass `StallClassifier(loss_fn=...)` to measure without it"
        ) from err
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        loss = output.get("loss")
        return loss if isinstance(loss, Tensor) else None
    return None


@contextmanager
def _probe_region(module: torch.nn.Module, seed: int) -> Iterator[None]:
    devices = {"cpu"} | {p.device.type for p in module.parameters()}
    with ExitStack() as stack:
        # Validation inside `fit` runs under no_grad and `validate` under inference mode; the
        # probe needs a graph either way, and fp32 whatever the precision plugin does.
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(preserved(module, seed=seed))
        for device_type in sorted(devices):
            if device_type in ("cpu", "cuda", "xpu", "mps"):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


def _trainable(module: torch.nn.Module) -> list[Tensor]:
    """The parameters the probe differentiates: those with ``requires_grad``; there must be one."""
    params: list[Tensor] = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ProbeUnavailable(f"{type(module).__name__} has no parameter that requires grad.")
    return params


def _usable_batch(batch: Any) -> Any:
    # Tensors created under inference mode cannot enter an autograd graph; clone those.
    try:
        return apply_to_collection(batch, Tensor, lambda t: t.clone() if t.is_inference() else t)
    except Exception:  # containers that cannot be rebuilt (a frozen dataclass): as they are
        return batch


def _make_loss(
    module: torch.nn.Module,
    batch: Any,
    loss_fn: Callable[[LightningModule, Any], Tensor] | None,
    batch_idx: int,
    seed: int,
    need_grad: bool,
) -> Callable[[], Tensor]:
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable or None, got {loss_fn!r}.")
    if loss_fn is None:
        if not isinstance(module, LightningModule):
            raise ValueError(
                "`module` must be a LightningModule when no `loss_fn` is given, "
                f"got {type(module).__name__}."
            )
        if not module.automatic_optimization:
            raise ProbeUnavailable(
                f"{type(module).__name__} uses manual optimization, so its `training_step` may "
                "step optimizers and cannot be called by the probe. Pass "
                "`loss_fn=lambda module, batch: ...` computing the loss with `module.forward`."
            )
    cuda_devices = _cuda_devices(module)

    def closure() -> Tensor:
        # Reseed before each evaluation: the same dropout masks every time, so the loss is a
        # deterministic function of the parameters.
        _seed_all(seed, cuda_devices)
        return checked_loss(module, _usable_batch(batch), batch_idx, loss_fn, need_grad=need_grad)

    return closure


def checked_loss(
    module: torch.nn.Module,
    batch: Any,
    batch_idx: int,
    loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
    *,
    need_grad: bool = False,
) -> Tensor:
    """The loss on ``batch`` from ``loss_fn`` or ``training_step``: a scalar float tensor.

    Protects nothing: run it under :func:`preserved`.

    Args:
        module: The module (a LightningModule unless ``loss_fn`` is given).
        batch: The batch; ``loss_fn`` gets a copy of its containers (:func:`intact`).
        batch_idx: Passed to ``training_step``.
        loss_fn: ``loss_fn(module, batch) -> loss``; None calls ``training_step``.
        need_grad: Also require a finite loss that reaches a trainable parameter.

    Returns:
        The loss, reshaped to a 0-d tensor.

    Raises:
        ProbeUnavailable: If the user's code raises, or its loss is not one the probe can use
            (not a scalar float tensor; with ``need_grad``, no graph or not finite).

    Example:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> model = BoringModel()
        >>> with preserved(model, seed=0):
        ...     checked_loss(model, torch.randn(2, 32), 0).shape
        torch.Size([])
        >>> try:
        ...     checked_loss(model, torch.randn(2, 32), 0, lambda m, b: m(b))
        ... except ProbeUnavailable as err:
        ...     print(err)
        `loss_fn` must give a scalar floating-point loss, got shape (2, 2) and dtype torch.float32.
    """
    if loss_fn is not None:
        try:
            loss: Any = loss_fn(module, intact(batch))  # type: ignore[arg-type]
        except Exception as err:
            # The user's code, called where training does not call it: a run must not die of it.
            raise ProbeUnavailable(f"`loss_fn` raised {type(err).__name__}: {err}") from err
    else:
        assert isinstance(module, LightningModule)
        loss = loss_from_training_step(module, batch, batch_idx)
    source = "`loss_fn`" if loss_fn is not None else "`training_step`"
    if loss is None:
        raise ProbeUnavailable(
            f"{source} returned no loss; return a tensor or a mapping with a 'loss' tensor."
        )
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        got = (
            f"shape {tuple(loss.shape)} and dtype {loss.dtype}"
            if isinstance(loss, Tensor)
            else type(loss).__name__
        )
        raise ProbeUnavailable(f"{source} must give a scalar floating-point loss, got {got}.")
    if need_grad and not loss.requires_grad:
        raise ProbeUnavailable(
            f"The loss from {source} does not require grad: no trainable parameter reaches "
            "it, or it was computed under `torch.no_grad`."
        )
    if need_grad and not bool(torch.isfinite(loss).all()):
        raise ProbeUnavailable(f"The loss from {source} is not finite: {float(loss.detach())}.")
    return loss.reshape(())


def probe_curvature(
    module: LightningModule,
    batch: Any,
    *,
    loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
    batch_idx: int = 0,
    steps: int = 30,
    seed: int = 0,
    tol: float = 1e-6,
    reduce: Callable[[Tensor], Tensor] | None = None,
    method: str = "auto",
) -> Spectrum:
    """Extreme Hessian eigenpairs of the loss on a batch, leaving the module as it was.

    The loss is ``loss_fn(module, batch)`` if given, else the loss returned by
    ``module.training_step(batch, batch_idx)`` (only with automatic optimization: a manual
    ``training_step`` steps optimizers). It is evaluated under :func:`preserved`, with grad
    enabled (also inside validation, which runs under ``no_grad``), outside inference mode, with
    autocast off, and with the module in its current train/eval mode; the random generators are
    seeded with ``seed`` before the evaluation, so the probe is a deterministic function of the
    parameters and the batch. The Lanczos start vector comes from a CPU generator seeded with
    ``seed`` too. Differentiation is with respect to every parameter with ``requires_grad``.

    Under DDP call it on every rank with the same ``seed`` and a ``reduce`` that averages across
    ranks (e.g. ``lambda t: trainer.strategy.reduce(t, reduce_op="mean")``), with the unwrapped
    ``pl_module``; all ranks then get the same spectrum. A rank that raises leaves the others
    waiting in the all-reduce, so make the conditions for running the probe rank-independent.

    Hessian-vector products are taken by double backward (``Spectrum.method == "exact"``). If
    the module's graph has none (autograd raises "derivative for ... is not implemented", "does
    not currently support double backward" and the like, or anything at all in the second
    backward), the probe starts again with central differences of gradients
    (``"finite_difference"``, two first-order forward-backward passes per product, accurate to
    about ``1e-4`` relative in float32), warns once, and remembers that for the module: its later
    probes go straight to finite differences. The parameters are moved in place for those and
    copied back after each gradient, so they too are bitwise unchanged afterwards.

    Side effects of user code outside the module's buffers, metrics, gradients and logging (see
    the module docstring) are not undone.

    Args:
        module: The LightningModule, on its training device.
        batch: A batch as ``training_step`` receives it, already on the device.
        loss_fn: Computes the scalar loss from the module and the batch; required with manual
            optimization.
        batch_idx: Passed to ``training_step``.
        steps: Maximum number of Lanczos steps (Hessian-vector products).
        seed: Seed for dropout and the like during the evaluation, and for the start vector.
        tol: Relative residual tolerance for stopping Lanczos early.
        reduce: Averages a flat tensor over processes; ``None`` for one process.
        method: ``"auto"`` (double backward, else finite differences), ``"exact"`` (double
            backward only) or ``"finite_difference"`` (finite differences only).

    Returns:
        The spectrum, with the loss, gradient norm, ``g . eigvec_min`` and the ``method`` used.

    Raises:
        ProbeUnavailable: If there is no usable loss: manual optimization without ``loss_fn``,
            no loss returned, a non-scalar loss, a loss that does not require grad, a non-finite
            loss or Hessian-vector product, or no trainable parameters; or if no
            Hessian-vector product works (finite differences of gradients fail too).
        DoubleBackwardUnsupported: With ``method="exact"``, if the graph has no double backward.
        ValueError: If an argument is invalid.

    Example:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> model = BoringModel()
        >>> s = probe_curvature(model, torch.randn(4, 32), steps=5)
        >>> s.dim, s.lambda_max >= s.lambda_min
        (66, True)
    """
    _check_steps(steps)
    _check_tol(tol)
    seed = _check_seed(seed)
    batch_idx = _check_batch_idx(batch_idx)
    if reduce is not None and not callable(reduce):
        raise ValueError(f"`reduce` must be callable or None, got {reduce!r}.")
    method = _check_method(method)
    params = _trainable(module)
    closure = _make_loss(module, batch, loss_fn, batch_idx, seed, need_grad=True)

    def spectrum(how: str) -> Spectrum:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        # A fresh region per attempt: a failed exact attempt leaves nothing for the next.
        with _probe_region(module, seed):
            try:
                return hessian_spectrum(
                    closure,
                    params,
                    steps=steps,
                    generator=generator,
                    tol=tol,
                    reduce=reduce,
                    method=how,
                )
            except FloatingPointError as err:
                raise ProbeUnavailable(f"The Hessian-vector product is not finite: {err}") from err

    if method == "exact" or (method == "auto" and module not in _NO_DOUBLE_BACKWARD):
        try:
            return spectrum("exact")
        except DoubleBackwardUnsupported as err:
            if method == "exact":
                raise
            reason = str(err)
        # Out of the `except` block, so that the failed graph is freed before the retry.
        _NO_DOUBLE_BACKWARD[module] = reason
        rank_zero_warn(
            f"{type(module).__name__} cannot be differentiated twice ({reason}); the curvature "
            "probe takes Hessian-vector products by finite differences of gradients instead "
            "(slower and less accurate, see `lightning_escape.curvature."
            "FiniteDifferenceHessianOperator`).",
            category=UserWarning,
        )
    try:
        return spectrum("finite_difference")
    except ProbeUnavailable:
        raise
    except RuntimeError as err:
        exact = _NO_DOUBLE_BACKWARD.get(module)
        why = "" if exact is None else f"double backward failed ({exact}) and "
        raise ProbeUnavailable(
            f"No Hessian-vector product works on {type(module).__name__}: {why}finite "
            f"differences of gradients failed too ({type(err).__name__}: {err})."
        ) from err


def evaluate_loss(
    module: LightningModule,
    batch: Any,
    *,
    loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
    batch_idx: int = 0,
    seed: int = 0,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """The loss on a batch, under the same protection and seeding as :func:`probe_curvature`.

    Meant for line searches: with the same ``seed`` the loss is a deterministic function of the
    parameters, and it equals the ``loss`` of a probe at the same point.

    Args:
        module: The LightningModule.
        batch: A batch as ``training_step`` receives it, already on the device.
        loss_fn: Computes the scalar loss from the module and the batch; required with manual
            optimization.
        batch_idx: Passed to ``training_step``.
        seed: Seed for dropout and the like during the evaluation.
        reduce: Averages a tensor over processes; ``None`` for one process.

    Returns:
        The loss as a float (averaged by ``reduce`` if given).

    Raises:
        ProbeUnavailable: If there is no usable loss (see :func:`probe_curvature`).
        ValueError: If an argument is invalid.

    Example:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> model, batch = BoringModel(), torch.randn(4, 32)
        >>> evaluate_loss(model, batch) == evaluate_loss(model, batch)
        True
    """
    seed = _check_seed(seed)
    batch_idx = _check_batch_idx(batch_idx)
    if reduce is not None and not callable(reduce):
        raise ValueError(f"`reduce` must be callable or None, got {reduce!r}.")
    closure = _make_loss(module, batch, loss_fn, batch_idx, seed, need_grad=False)
    with _probe_region(module, seed):
        loss = closure().detach()
        if reduce is not None:
            loss = reduce(loss)
        return float(loss)


def probe_direction(
    module: LightningModule,
    batch: Any,
    direction: list[Tensor],
    *,
    loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
    batch_idx: int = 0,
    seed: int = 0,
    reduce: Callable[[Tensor], Tensor] | None = None,
    method: str = "exact",
) -> tuple[float, float]:
    """The curvature along ``direction`` and the loss on a batch, leaving the module as it was.

    One Hessian-vector product under the protection and seeding of :func:`probe_curvature`
    (see :func:`~lightning_escape.curvature.curvature_along`): given a probe's ``eigvec_min``
    and another batch, it says whether the probe's direction of descent is the loss's or only
    its batch's. Pass the probe's ``method``; under DDP call it on every rank with the same
    ``seed`` and an averaging ``reduce``.

    Args:
        module: The LightningModule, on its training device.
        batch: A batch as ``training_step`` receives it, already on the device.
        direction: One tensor per trainable parameter (those with ``requires_grad``, in
            ``module.parameters()`` order), shaped like it.
        loss_fn: Computes the scalar loss from the module and the batch; required with manual
            optimization.
        batch_idx: Passed to ``training_step``.
        seed: Seed for dropout and the like during the evaluation.
        reduce: Averages a flat tensor over processes; ``None`` for one process.
        method: ``"exact"`` (double backward) or ``"finite_difference"``.

    Returns:
        ``(vᵀHv / vᵀv, loss)`` on the batch.

    Raises:
        ProbeUnavailable: If there is no usable loss (see :func:`probe_curvature`) or the product
            is not finite.
        DoubleBackwardUnsupported: With ``method="exact"``, if the graph has no double backward.
        ValueError: If an argument is invalid.

    Example:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> model, batch = BoringModel(), torch.randn(4, 32)
        >>> s = probe_curvature(model, batch, steps=5)
        >>> curvature, loss = probe_direction(model, batch, s.eigvec_min)
        >>> abs(curvature - s.lambda_min) < 1e-4, loss == s.loss
        (True, True)
    """
    seed = _check_seed(seed)
    batch_idx = _check_batch_idx(batch_idx)
    method = _check_method(method)
    if method == "auto":
        method = hvp_method(module)
    params = _trainable(module)
    closure = _make_loss(module, batch, loss_fn, batch_idx, seed, need_grad=True)
    with _probe_region(module, seed):
        curvature, loss = curvature_along(closure, params, direction, reduce=reduce, method=method)
    if not (math.isfinite(curvature) and math.isfinite(loss)):
        raise ProbeUnavailable(
            f"The curvature along the direction is not finite: {curvature} (loss {loss})."
        )
    return curvature, loss
