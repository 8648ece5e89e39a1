"""Snapshots of the training state an escape step may change, restorable bit for bit.

An escape step (a learning-rate kick, gradient noise, a reset of optimizer moments) changes the
parameters, the optimizer state, the learning rates and the schedulers. When the step fails, the
run goes back to where it was: :class:`TrainingSnapshot` holds a copy of that state and writes it
back *in place*, so that the tensors DDP, FSDP and the optimizers hold references to stay the same
objects, and a run continued after :meth:`TrainingSnapshot.restore` is bitwise identical to one that
never left the snapshot.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_escape._lightning import unwrap_optimizer
from lightning_escape._validation import check_choice

__all__ = ["SnapshotDevice", "TrainingSnapshot"]

SnapshotDevice = Literal["same", "cpu"]
_DEVICES: tuple[SnapshotDevice, ...] = ("same", "cpu")
# Bumped when the layout of `state_dict` changes, so an old checkpoint fails with a clear message.
_FORMAT = 1
_SCALARS = (str, int, float, bool, type(None))
# The one key of a param group that is not a hyper-parameter.
_GROUP_PARAMS = "params"
_KEYS = ("format", "device", "parameters", "buffers", "optimizers", "schedulers", "scaler")


def _describe(value: Any) -> str:
    """Name a value in an error message without printing a whole model or optimizer."""
    if isinstance(value, _SCALARS):
        return repr(value)
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"an object of type {type(value).__qualname__}"


def _as_sequence(name: str, value: Any) -> Sequence[Any]:
    """Return ``value`` if it is a list or tuple (passing a lone optimizer is a common slip)."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"`{name}` must be a list or tuple, got {_describe(value)}.")
    return value


def _check_module(module: Any) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise ValueError(f"`module` must be a torch.nn.Module, got {_describe(module)}.")
    return module


def _unwrap_scheduler(name: str, scheduler: Any) -> Any:
    """The scheduler behind ``scheduler``, which may be a Lightning ``LRSchedulerConfig``."""
    if not hasattr(scheduler, "load_state_dict") and hasattr(scheduler, "scheduler"):
        scheduler = scheduler.scheduler
    if not (
        callable(getattr(scheduler, "state_dict", None))
        and callable(getattr(scheduler, "load_state_dict", None))
    ):
        raise ValueError(
            f"`{name}` must be a learning-rate scheduler with `state_dict` and `load_state_dict` "
            f"(or a Lightning scheduler config holding one), got {_describe(scheduler)}."
        )
    return scheduler


def _check_scaler(scaler: Any) -> torch.amp.GradScaler | None:
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise ValueError(
            f"`scaler` must be a torch.amp.GradScaler or None, got {_describe(scaler)}."
        )
    return scaler


def _map_tree(
    value: Any,
    leaf: Callable[[Any, str], Any],
    path: str,
    check_key: Callable[[Any, str], None] | None = None,
) -> Any:
    """Copy the dicts, lists and tuples of ``value``, mapping every other value with ``leaf``.

    ``leaf`` and ``check_key`` (called on each dict key) get the path of keys and indices joined by
    ``/``. Dict subclasses (a ``Counter``) come back as plain dicts and list or tuple subclasses
    (named tuples) count as leaves, as ``torch.load(weights_only=True)`` needs. Lightning's
    ``apply_to_collection`` gives no paths, keeps container types and fails on a ``range``.
    """
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if check_key is not None:
                check_key(k, path)
            out[k] = _map_tree(v, leaf, f"{path}/{k}", check_key)
        return out
    if type(value) in (list, tuple):
        items = [_map_tree(v, leaf, f"{path}/{i}", check_key) for i, v in enumerate(value)]
        return items if type(value) is list else tuple(items)
    return leaf(value, path)


def _copy_tensor(tensor: Tensor, to_cpu: bool) -> Tensor:
    return tensor.detach().to("cpu", copy=True) if to_cpu else tensor.detach().clone()


def _capture_entry(
    entry: Mapping[Any, Any], to_cpu: bool, reference: torch.device, skip: str | None = None
) -> dict[str, Any]:
    """Capture one optimizer state entry or param group as ``{"values": ..., "devices": ...}``.

    Tensors are cloned (to the CPU when ``to_cpu``), other leaves deep-copied. A tensor that does
    not live on ``reference`` (the parameter's device) has its device recorded under its path: Adam
    keeps its ``step`` counters on the CPU next to CUDA parameters, and a tensor recreated at
    restore must go back where the optimizer expects it.
    """
    devices: dict[str, str] = {}

    def copy_leaf(value: Any, path: str) -> Any:
        if not isinstance(value, Tensor):
            return copy.deepcopy(value)
        if value.device != reference:
            devices[path] = str(value.device)
        return _copy_tensor(value, to_cpu)

    values = {
        key: _map_tree(value, copy_leaf, str(key)) for key, value in entry.items() if key != skip
    }
    return {"values": values, "devices": devices}


def _restore_entry(
    current: dict[Any, Any],
    saved: Mapping[str, Any],
    reference: torch.device,
    skip: str | None = None,
) -> None:
    """Make ``current`` equal to the captured entry ``saved``, copying into its tensors in place."""
    values: Mapping[Any, Any] = saved["values"]
    devices: Mapping[str, str] = saved["devices"]

    def fresh_leaf(value: Any, path: str) -> Any:
        # A new copy, back on its device: the snapshot never hands out its own tensors, which
        # training would change, spoiling a second restore from the same snapshot.
        if isinstance(value, Tensor):
            return value.to(devices.get(path, reference), copy=True)
        return copy.deepcopy(value)

    # Keys added since the capture (a scheduler's `initial_lr`, a lazily created buffer) go away.
    for key in [k for k in current if k not in values and k != skip]:
        del current[key]
    for key, value in values.items():
        old = current.get(key)
        if (
            isinstance(value, Tensor)
            and isinstance(old, Tensor)
            and old.shape == value.shape
            and old.dtype == value.dtype
        ):
            # Same tensor object: fused or captured (CUDA graph) optimizers hold on to it.
            old.copy_(value)
        else:
            current[key] = _map_tree(value, fresh_leaf, str(key))


def _group_device(group: Mapping[str, Any]) -> torch.device:
    params = group[_GROUP_PARAMS]
    return params[0].device if len(params) > 0 else torch.device("cpu")


def _tensors(value: Any) -> list[Tensor]:
    """Every tensor in ``value``, named tuples and other list or tuple subclasses included."""
    found: list[Tensor] = []

    def visit(leaf: Any, path: str) -> Any:
        if isinstance(leaf, Tensor):
            found.append(leaf)
        elif isinstance(leaf, (list, tuple)):
            _map_tree(list(leaf), visit, path)
        return leaf

    _map_tree(value, visit, "")
    return found


def _plain_key(key: Any, path: str) -> None:
    if not isinstance(key, (str, int)):
        raise ValueError(f"`{path}` has the key {key!r}; only str and int keys can be saved.")


def _plain_leaf(value: Any, path: str) -> Any:
    """``value``, if it loads with ``torch.load(..., weights_only=True)``."""
    # Exact types: subclasses such as numpy.float64 or an IntEnum pickle as their own class.
    if type(value) not in (*_SCALARS, Tensor):
        raise ValueError(
            f"`{path}` holds {_describe(value)}, which `torch.load(..., weights_only=True)` cannot "
            "read; keep optimizer and scheduler state to tensors, numbers, strings, lists, dicts."
        )
    return value


def _check_arguments(
    module: Any, optimizers: Any, schedulers: Any, scaler: Any
) -> tuple[nn.Module, list[Optimizer], list[Any], torch.amp.GradScaler | None]:
    """Validate and unwrap what :meth:`TrainingSnapshot.capture` and ``restore`` take."""
    module = _check_module(module)
    opts = []
    for i, opt in enumerate(_as_sequence("optimizers", optimizers)):
        try:
            opts.append(unwrap_optimizer(opt))
        except TypeError:
            raise ValueError(
                f"`optimizers[{i}]` must be a torch.optim.Optimizer, got {_describe(opt)}."
            ) from None
    scheds = [
        _unwrap_scheduler(f"schedulers[{i}]", s)
        for i, s in enumerate(_as_sequence("schedulers", schedulers))
    ]
    return module, opts, scheds, _check_scaler(scaler)


class TrainingSnapshot:
    """The state of a training run that an escape step may change, restorable bit for bit.

    Holds copies of:

    - every parameter and buffer of the module (``named_parameters``/``named_buffers``, shared
      tensors once);
    - per optimizer, the per-parameter state (keyed by the parameter's position in the param
      groups, as in ``Optimizer.state_dict``) and each param group's hyper-parameters;
    - each scheduler's ``state_dict`` (``StepLR``, ``OneCycleLR``, ``ReduceLROnPlateau``, ...);
    - the ``GradScaler``'s ``state_dict``.

    It does not hold gradients, RNG states, the data loader's position or the trainer's counters:
    see :meth:`restore`. Build one with :meth:`capture` or :meth:`from_state_dict`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_escape.snapshot import TrainingSnapshot
        >>> model = nn.Linear(3, 1)
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        >>> snapshot = TrainingSnapshot.capture(model, [optimizer])
        >>> before = model.weight.detach().clone()
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> optimizer.step()
        >>> snapshot.restore(model, [optimizer])
        >>> torch.equal(model.weight, before), len(optimizer.state)
        (True, 0)
    """

    _device: SnapshotDevice
    _parameters: dict[str, Tensor]
    _buffers: dict[str, Tensor]
    _optimizers: list[dict[str, Any]]
    _schedulers: list[dict[str, Any]]
    _scaler: dict[str, Any] | None

    def __init__(self) -> None:
        raise TypeError(
            "Create a TrainingSnapshot with TrainingSnapshot.capture(...) or "
            "TrainingSnapshot.from_state_dict(...)."
        )

    @classmethod
    def _from_parts(
        cls,
        device: SnapshotDevice,
        parameters: dict[str, Tensor],
        buffers: dict[str, Tensor],
        optimizers: list[dict[str, Any]],
        schedulers: list[dict[str, Any]],
        scaler: dict[str, Any] | None,
    ) -> TrainingSnapshot:
        self = object.__new__(cls)
        self._device = device
        self._parameters = parameters
        self._buffers = buffers
        self._optimizers = optimizers
        self._schedulers = schedulers
        self._scaler = scaler
        return self

    @classmethod
    def capture(
        cls,
        module: nn.Module,
        optimizers: Sequence[Optimizer] = (),
        schedulers: Sequence[Any] = (),
        scaler: torch.amp.GradScaler | None = None,
        *,
        device: SnapshotDevice = "same",
    ) -> TrainingSnapshot:
        """Copy the current training state.

        Args:
            module: The model; every parameter and buffer is copied.
            optimizers: Optimizers whose state and hyper-parameters are copied (Lightning's
                ``trainer.optimizers`` works as is).
            schedulers: Learning-rate schedulers, or objects with a ``.scheduler`` attribute such as
                Lightning's ``trainer.lr_scheduler_configs``.
            scaler: The AMP ``GradScaler``, e.g. ``trainer.precision_plugin.scaler``.
            device: ``"same"`` keeps the copies next to the originals (fast, costs accelerator
                memory); ``"cpu"`` moves them to host memory. Scheduler and scaler states, a few
                numbers, are deep-copied as they are.

        Returns:
            The snapshot.

        Raises:
            ValueError: If an argument has the wrong type or value, or an optimizer keeps state
                under a key that is not one of its parameters (it could not be put back).
        """
        check_choice("device", device, _DEVICES)
        module, opts, scheds, scaler = _check_arguments(module, optimizers, schedulers, scaler)
        to_cpu = device == "cpu"
        # Outside inference mode even when called inside it (a validation hook of `trainer.validate`):
        # copies made there are inference tensors, which the optimizer could not update later.
        with torch.inference_mode(False), torch.no_grad():
            parameters = {n: _copy_tensor(p, to_cpu) for n, p in module.named_parameters()}
            buffers = {n: _copy_tensor(b, to_cpu) for n, b in module.named_buffers()}
            captured = [
                _capture_optimizer(f"optimizers[{i}]", o, to_cpu) for i, o in enumerate(opts)
            ]
        # Scheduler and scaler states are a few numbers; `load_state_dict` aliases the lists it is
        # given, so the copy keeps the snapshot safe from later scheduler steps.
        sched_states = [copy.deepcopy(s.state_dict()) for s in scheds]
        scaler_state = None if scaler is None else copy.deepcopy(scaler.state_dict())
        return cls._from_parts(device, parameters, buffers, captured, sched_states, scaler_state)

    @property
    def device(self) -> SnapshotDevice:
        """Where the copies live: ``"same"`` (next to the originals) or ``"cpu"``."""
        return self._device

    @property
    def nbytes(self) -> int:
        """Bytes of tensor memory the snapshot holds (parameters, buffers, optimizer state)."""
        return sum(t.numel() * t.element_size() for t in _tensors(self._tree()))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(device={self._device!r}, parameters={len(self._parameters)}, "
            f"buffers={len(self._buffers)}, optimizers={len(self._optimizers)}, "
            f"schedulers={len(self._schedulers)}, scaler={self._scaler is not None}, "
            f"nbytes={self.nbytes})"
        )

    def restore(
        self,
        module: nn.Module,
        optimizers: Sequence[Optimizer] = (),
        schedulers: Sequence[Any] = (),
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        """Write the captured state back in place.

        Parameters and buffers are copied into the existing tensors, optimizer state into its
        existing tensors where shape and dtype match (state created after the capture is removed,
        state dropped since is recreated), param-group hyper-parameters likewise; schedulers and
        the scaler go through ``load_state_dict``. Everything is checked before anything is written,
        so a mismatch leaves the run untouched.

        Gradients (``.grad``) are left alone: the next ``zero_grad`` at the start of an
        accumulation window discards them, and copying them would double the snapshot's size.
        Restore between optimizer steps, or call ``zero_grad`` yourself when restoring in the
        middle of an accumulation window. RNG states, the data loader position and the trainer's
        step counters are not part of the snapshot either.

        Args:
            module: The model the snapshot was captured from (or one with the same parameter and
                buffer names, shapes and dtypes; devices may differ).
            optimizers: The optimizers, as many and in the order given to :meth:`capture`.
            schedulers: The schedulers, as many and in the order given to :meth:`capture`.
            scaler: The ``GradScaler``; required exactly when one was captured.

        Raises:
            ValueError: If an argument has the wrong type, or the model, optimizers, schedulers or
                scaler do not have the structure of the captured ones.
        """
        module, opts, scheds, scaler = _check_arguments(module, optimizers, schedulers, scaler)

        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        _check_tensors("parameters", self._parameters, params)
        _check_tensors("buffers", self._buffers, buffers)
        if len(opts) != len(self._optimizers):
            raise ValueError(
                f"`optimizers` has {len(opts)} optimizer(s), the snapshot was captured with "
                f"{len(self._optimizers)}."
            )
        for i, (opt, saved) in enumerate(zip(opts, self._optimizers, strict=True)):
            _check_optimizer(f"optimizers[{i}]", opt, saved)
        if len(scheds) != len(self._schedulers):
            raise ValueError(
                f"`schedulers` has {len(scheds)} scheduler(s), the snapshot was captured with "
                f"{len(self._schedulers)}."
            )
        if (scaler is None) != (self._scaler is None):
            raise ValueError(
                f"`scaler` is {_describe(scaler)}, but the snapshot was captured "
                f"{'without' if self._scaler is None else 'with'} a GradScaler."
            )
        if (
            scaler is not None
            and self._scaler is not None
            and bool(self._scaler) != scaler.is_enabled()
        ):
            # A disabled GradScaler has an empty state_dict, which an enabled one refuses to load.
            raise ValueError(
                f"`scaler` is {'enabled' if scaler.is_enabled() else 'disabled'}, but the captured "
                f"GradScaler was {'enabled' if self._scaler else 'disabled'}."
            )

        # Outside inference mode, as in `capture`: state recreated here must stay trainable.
        with torch.inference_mode(False), torch.no_grad():
            # `copy_` under no_grad rather than through `.data`: it bumps the version counter, so a
            # graph still holding the old values fails loudly in backward instead of using new ones.
            for name, value in self._parameters.items():
                params[name].copy_(value)
            for name, value in self._buffers.items():
                buffers[name].copy_(value)
            for opt, saved in zip(opts, self._optimizers, strict=True):
                _restore_optimizer(opt, saved)
        for sched, state in zip(scheds, self._schedulers, strict=True):
            # `LambdaLR.load_state_dict` pops from the dict it is given; keep ours whole.
            sched.load_state_dict(copy.deepcopy(state))
        if scaler is not None and self._scaler:
            scaler.load_state_dict(copy.deepcopy(self._scaler))

    def _tree(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "device": self._device,
            "parameters": self._parameters,
            "buffers": self._buffers,
            "optimizers": self._optimizers,
            "schedulers": self._schedulers,
            "scaler": self._scaler,
        }

    def state_dict(self) -> dict[str, Any]:
        """The snapshot as tensors and plain Python values, for a checkpoint.

        The result loads with ``torch.load(..., weights_only=True)``, so it can live in a
        Lightning callback's state. Tensors are shared with the snapshot, not copied (as in
        ``Module.state_dict``).

        Returns:
            A dict of dicts, lists, tuples, strings, numbers, None and tensors.

        Raises:
            ValueError: If a captured optimizer or scheduler state holds another kind of object.
        """
        tree: dict[str, Any] = _map_tree(self._tree(), _plain_leaf, "state_dict", _plain_key)
        return tree

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any]) -> TrainingSnapshot:
        """Rebuild a snapshot from :meth:`state_dict`.

        Args:
            state_dict: The dict :meth:`state_dict` returned, possibly after a save and load.

        Returns:
            The snapshot; its tensors are shared with ``state_dict``.

        Raises:
            ValueError: If ``state_dict`` is not a snapshot's state dict of this format.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"`state_dict` must be a dict, got {_describe(state_dict)}.")
        missing = sorted(set(_KEYS) - set(state_dict))
        if missing:
            raise ValueError(
                f"`state_dict` is not a TrainingSnapshot state dict: it lacks {missing}."
            )
        if state_dict["format"] != _FORMAT:
            raise ValueError(
                f"`state_dict['format']` is {state_dict['format']!r}; this version reads format "
                f"{_FORMAT}."
            )
        device = check_choice("state_dict['device']", state_dict["device"], _DEVICES)
        tree = _map_tree(dict(state_dict), lambda v, _: v, "state_dict")
        for section in ("parameters", "buffers"):
            entries = tree[section]
            if not isinstance(entries, dict) or not all(
                isinstance(k, str) and isinstance(v, Tensor) for k, v in entries.items()
            ):
                raise ValueError(
                    f"`state_dict['{section}']` must map names to tensors, got "
                    f"{_describe(entries)}."
                )
        optimizers = tree["optimizers"]
        if not isinstance(optimizers, list) or not all(_is_optimizer_entry(o) for o in optimizers):
            raise ValueError(
                "`state_dict['optimizers']` must be a list of captured optimizers, got "
                f"{_describe(optimizers)}."
            )
        schedulers = tree["schedulers"]
        if not isinstance(schedulers, list) or not all(isinstance(s, dict) for s in schedulers):
            raise ValueError(
                f"`state_dict['schedulers']` must be a list of dicts, got {_describe(schedulers)}."
            )
        scaler = tree["scaler"]
        if scaler is not None and not isinstance(scaler, dict):
            raise ValueError(
                f"`state_dict['scaler']` must be a dict or None, got {_describe(scaler)}."
            )
        return cls._from_parts(
            device, tree["parameters"], tree["buffers"], optimizers, schedulers, scaler
        )


def _is_optimizer_entry(value: Any) -> bool:
    def is_entry(e: Any) -> bool:
        return (
            isinstance(e, dict)
            and isinstance(e.get("values"), dict)
            and isinstance(e.get("devices"), dict)
        )

    return (
        isinstance(value, dict)
        and isinstance(value.get("shapes"), list)
        and isinstance(value.get("state"), dict)
        and isinstance(value.get("groups"), list)
        and all(is_entry(e) for e in value["state"].values())
        and all(is_entry(g) for g in value["groups"])
        and len(value["shapes"]) == len(value["groups"])
    )


def _capture_optimizer(name: str, optimizer: Optimizer, to_cpu: bool) -> dict[str, Any]:
    """Capture the state and param groups of ``optimizer``, keyed by parameter position."""
    params = [p for group in optimizer.param_groups for p in group[_GROUP_PARAMS]]
    position = {id(p): i for i, p in enumerate(params)}
    state: dict[int, dict[str, Any]] = {}
    for key, entry in optimizer.state.items():
        if not isinstance(key, Tensor) or id(key) not in position:
            raise ValueError(
                f"`{name}` keeps state under {_describe(key)}, which is not one of its parameters; "
                "such state cannot be restored exactly."
            )
        state[position[id(key)]] = _capture_entry(entry, to_cpu, key.device)
    return {
        "shapes": [[list(p.shape) for p in g[_GROUP_PARAMS]] for g in optimizer.param_groups],
        "state": state,
        "groups": [
            _capture_entry(g, to_cpu, _group_device(g), skip=_GROUP_PARAMS)
            for g in optimizer.param_groups
        ],
    }


def _names(names: list[str], limit: int = 5) -> str:
    """A list of names for an error message, cut short: a wrong model can differ in hundreds."""
    if len(names) <= limit:
        return str(names)
    return f"{names[:limit]} and {len(names) - limit} more"


def _check_tensors(kind: str, saved: Mapping[str, Tensor], current: Mapping[str, Tensor]) -> None:
    """Raise unless ``current`` has the names, shapes and dtypes of ``saved``."""
    missing = sorted(set(saved) - set(current))
    unexpected = sorted(set(current) - set(saved))
    if missing or unexpected:
        raise ValueError(
            f"`module` does not match the snapshot: {kind} missing {_names(missing)}, unexpected "
            f"{_names(unexpected)}."
        )
    for name, value in saved.items():
        now = current[name]
        if now.shape != value.shape or now.dtype != value.dtype:
            raise ValueError(
                f"`module` does not match the snapshot: {kind[:-1]} {name!r} is "
                f"{tuple(now.shape)} {now.dtype}, the snapshot has {tuple(value.shape)} "
                f"{value.dtype}."
            )


def _check_optimizer(name: str, optimizer: Optimizer, saved: Mapping[str, Any]) -> None:
    """Raise unless ``optimizer`` has the param groups and parameter shapes of ``saved``."""
    groups = optimizer.param_groups
    shapes: list[list[list[int]]] = saved["shapes"]
    if len(groups) != len(shapes):
        raise ValueError(
            f"`{name}` has {len(groups)} param group(s), the snapshot has {len(shapes)}."
        )
    for g, (group, group_shapes) in enumerate(zip(groups, shapes, strict=True)):
        now = [list(p.shape) for p in group[_GROUP_PARAMS]]
        if now != group_shapes:
            raise ValueError(
                f"`{name}` param group {g} has parameters of shapes {now}, the snapshot has "
                f"{group_shapes}."
            )


def _restore_optimizer(optimizer: Optimizer, saved: Mapping[str, Any]) -> None:
    params = [p for group in optimizer.param_groups for p in group[_GROUP_PARAMS]]
    state: Mapping[int, Mapping[str, Any]] = saved["state"]
    for i, p in enumerate(params):
        entry = state.get(i)
        if entry is None:
            # No state at capture time (before the first step): the optimizer must initialise it
            # afresh, exactly as it would have.
            optimizer.state.pop(p, None)
            continue
        if p not in optimizer.state:
            optimizer.state[p] = {}
        _restore_entry(optimizer.state[p], entry, p.device)
    for group, entry in zip(optimizer.param_groups, saved["groups"], strict=True):
        _restore_entry(group, entry, _group_device(group), skip=_GROUP_PARAMS)
