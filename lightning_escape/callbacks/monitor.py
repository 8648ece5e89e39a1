"""GradientMonitor: gradient statistics every optimizer step, logged at Lightning's logging steps."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_escape._lightning import (
    global_batch_size,
    optimizer_index,
    step_index,
    warn_once,
)
from lightning_escape._validation import check_bool, check_optional_positive_int
from lightning_escape.callbacks._grads import GradReader
from lightning_escape.callbacks._watcher import Batch, Watcher
from lightning_escape.logging import GRAD, GRAD_LAYER, EscapeLogger, to_host
from lightning_escape.signals import (
    NoiseScaleEstimator,
    count_nonfinite,
    foreach_norms,
    stored_values,
    total_norm,
)

__all__ = ["GradientMonitor"]


class _Pending:
    """What one logged step has gathered on the device before its single read-back."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.values: dict[str, Tensor | float] = {}
        # optimizer index -> (names, parameters, parameter copies taken before the step)
        self.before: dict[int, tuple[list[str], list[Tensor], list[Tensor]]] = {}
        self.clip_params: dict[int, list[Tensor]] = {}
        self.histograms: list[tuple[str, Tensor]] = []


class GradientMonitor(Watcher):
    r"""Watch the gradients every optimizer step; log their statistics to TensorBoard.

    Gradients are read in ``on_before_optimizer_step``, where they are final: accumulated over
    micro-batches, all-reduced across data-parallel processes, unscaled by the AMP plugin (scaled
    ones from fused optimizers are divided by the loss scale here), and not yet clipped.

    Every optimizer step costs one fused ``torch._foreach_norm`` launch per (device, dtype) group of
    gradients, kept on the device (:attr:`grad_norm` combines them when read); nothing is read back
    to the host. On the steps Lightning logs (every ``log_every_n_steps``), it also computes, and
    reads back with a single synchronisation:

    - ``grad/norm``: the global gradient norm before clipping, and ``grad/norm_clipped`` after it
      when the Trainer clips;
    - ``grad/lr``: the learning rate of each parameter group as the optimizer used it;
    - ``grad/noise_scale``: the simple gradient noise scale in examples (see
      :class:`~lightning_escape.signals.NoiseScaleEstimator` for the estimator and its bias);
    - ``grad/nonfinite``: the number of NaN or infinite gradient values;
    - ``grad_layer/norm/<param>`` and ``grad_layer/grad_to_weight/<param>`` per parameter;
    - ``grad_layer/update_to_weight/<param>``: the norm of the step actually taken (measured after
      the optimizer step) over the parameter's norm;
    - optionally, histograms ``grad_layer/grad_hist/<param>`` and ``grad_layer/weight_hist/<param>``
      every ``histogram_every_n_steps``.

    With several optimizers, the global tags get a suffix ``/opt<i>``; with several parameter groups,
    ``grad/lr/opt<i>_group<j>``.

    Args:
        log_every_n_steps: Log every this many optimizer steps; ``None`` follows the Trainer's
            ``log_every_n_steps``.
        per_layer: Log per-parameter gradient norms and grad-to-weight ratios.
        update_ratios: Log per-parameter update-to-weight ratios. Costs one copy of the parameters on
            the logged steps only.
        noise_scale: Log the gradient noise scale. Costs one copy of the gradients on the step before
            each logged step.
        histogram_every_n_steps: Log histograms of gradients and weights every this many optimizer
            steps; ``None`` (the default) never does. Each histogram is computed on the host.
        foreach: ``None`` uses fused norms where torch has them, ``False`` a plain per-tensor loop.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> monitor = GradientMonitor()
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=2, logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False,
        ...                      enable_checkpointing=False)
        >>> trainer.fit(BoringModel())
        >>> bool(monitor.grad_norm > 0)
        True
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        per_layer: bool = True,
        update_ratios: bool = True,
        noise_scale: bool = True,
        histogram_every_n_steps: int | None = None,
        foreach: bool | None = None,
    ) -> None:
        super().__init__()
        self.log_every_n_steps = check_optional_positive_int("log_every_n_steps", log_every_n_steps)
        self.per_layer = check_bool("per_layer", per_layer)
        self.update_ratios = check_bool("update_ratios", update_ratios)
        self.noise_scale = check_bool("noise_scale", noise_scale)
        self.histogram_every_n_steps = check_optional_positive_int(
            "histogram_every_n_steps", histogram_every_n_steps
        )
        if foreach is not None:
            check_bool("foreach", foreach)
        self.foreach = foreach
        self._grads = GradReader(foreach)
        self._last: tuple[list[Tensor], Tensor | None] | None = None
        self._reset_runtime()

    def __repr__(self) -> str:
        every = self.log_every_n_steps or "Trainer's log_every_n_steps"
        return f"{type(self).__name__}(every {every} steps, per_layer={self.per_layer})"

    @property
    def grad_norm(self) -> Tensor | None:
        """Global gradient norm of the latest optimizer step (a device tensor), None before one."""
        if self._last is None:
            return None
        norms, scale = self._last
        total = total_norm(norms)
        return total if scale is None else total / scale

    def _reset_runtime(self) -> None:
        # Runtime state lives only inside a fit; it is rebuilt in `setup`, so a pickled callback
        # (``ddp_spawn``) carries none of it.
        self._log: EscapeLogger | None = None
        self._n_optimizers = 1
        self._every = 50
        self._pending: _Pending | None = None
        # Per optimizer: the names and (unscaled) gradients of the step before a logging step.
        self._prev_grads: dict[int, tuple[list[str], list[Tensor]]] = {}
        self._batch_size: int | None = None
        self._estimators: dict[int, NoiseScaleEstimator] = {}
        self._warned: set[str] = set()

    def _suffix(self, opt_idx: int) -> str:
        return f"/opt{opt_idx}" if self._n_optimizers > 1 else ""

    def is_logging_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is one this monitor logs."""
        return (step + 1) % self._every == 0

    # ---------------------------------------------------------------- the monitor's steps
    # Its hooks (see Watcher) only call these; a callback holding a monitor calls them too.

    @override
    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Begin a fit: fresh runtime state, the parameter names and the logging interval."""
        self._reset_runtime()
        self._last = None
        self._log = EscapeLogger(trainer)
        self._grads.attach(trainer, pl_module)
        self._every = self.log_every_n_steps or max(
            1, int(getattr(trainer, "log_every_n_steps", 50))
        )

    @override
    def start(self, trainer: pl.Trainer) -> None:
        """Training starts: count the optimizers, write the TensorBoard layout."""
        self._n_optimizers = max(1, len(trainer.optimizers))
        if self._log is not None:
            self._log.layout(_LAYOUT)

    @override
    def start_batch(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        """A batch starts: read its size when the noise scale will need it."""
        if self.noise_scale and self._wants_noise_scale(trainer, step_index(trainer)):
            self._batch_size = global_batch_size(trainer, batch)

    def _wants_noise_scale(self, trainer: pl.Trainer, step: int) -> bool:
        # The estimator pairs the gradient of the step before a logged step with the logged one.
        return (self.is_logging_step(step) or self.is_logging_step(step + 1)) and (
            trainer.is_global_zero
        )

    @override
    def observe(
        self, trainer: pl.Trainer, optimizer: Optimizer, step: int | None = None
    ) -> tuple[list[Tensor], Tensor | None]:
        """Every optimizer step: the per-tensor gradient norms and the loss scale they carry.

        On most steps this is one fused norm launch; on logging steps (and the step before, for
        the noise scale) it also gathers what :meth:`end_batch` logs.

        Args:
            trainer: The trainer.
            optimizer: The optimizer about to step.
            step: The optimizer step's index, if the caller has it already.

        Returns:
            The norms (device tensors) and the loss scale still in the gradients, or None.
        """
        step = step_index(trainer) if step is None else step
        scale = self._grads.scale(trainer, optimizer)
        logging = self.is_logging_step(step)
        pairing = self.noise_scale and not logging and self.is_logging_step(step + 1)
        every = self.histogram_every_n_steps
        histogram = every is not None and (step + 1) % every == 0
        if not logging and not pairing and not histogram:
            norms = self._grads.norms(optimizer)
            if norms:
                self._last = (norms, scale)
            return norms, scale
        opt_idx = optimizer_index(trainer, optimizer)
        names, params, grads = self._grads.named(optimizer, opt_idx)
        norms = foreach_norms(grads, foreach=self.foreach)
        if not norms:
            return norms, scale
        self._last = (norms, scale)
        total = None
        if logging:
            # A collective under FSDP: every process takes part, on the same (logging) steps.
            total = total_norm(norms)
            total = self._grads.reduce_total(trainer, total if scale is None else total / scale)
        if not trainer.is_global_zero:
            return norms, scale  # only rank zero writes
        if total is not None:
            self._gather(
                trainer, optimizer, opt_idx, step, names, params, grads, norms, total, scale
            )
        if self.noise_scale and self.is_logging_step(step + 1):
            # The first of the next logging step's pair (a logging step's too, when every step logs).
            self._prev_grads[opt_idx] = (names, _unscaled_copy(grads, scale))
        if histogram:
            # On their own cadence, not only where it meets the scalars' (every 12 steps for
            # histograms every 6 and scalars every 4).
            histograms = self._pending_at(step).histograms
            for name, p, g in zip(names, params, grads, strict=True):
                histograms.append(
                    (f"{GRAD_LAYER}/grad_hist/{name}", _histogram_data(_unscaled([g], scale)[0]))
                )
                histograms.append(
                    (f"{GRAD_LAYER}/weight_hist/{name}", _histogram_data(p.detach().clone()))
                )
        return norms, scale

    def _pending_at(self, step: int) -> _Pending:
        """What ``step`` logs at the end of its batch, gathered so far."""
        if self._pending is None or self._pending.step != step:
            self._pending = _Pending(step)
        return self._pending

    def _gather(
        self,
        trainer: pl.Trainer,
        optimizer: Optimizer,
        opt_idx: int,
        step: int,
        names: list[str],
        params: list[Tensor],
        grads: list[Tensor],
        norms: list[Tensor],
        total: Tensor,
        scale: Tensor | None,
    ) -> None:
        pending = self._pending_at(step)
        sfx = self._suffix(opt_idx)
        values = pending.values
        values[f"{GRAD}/norm{sfx}"] = total
        values[f"{GRAD}/nonfinite{sfx}"] = count_nonfinite(grads, norms)
        self._record_lr(values, optimizer, opt_idx)
        if self.per_layer:
            weights = foreach_norms(params, foreach=self.foreach)
            for name, g, w in zip(names, norms, weights):
                g = g if scale is None else g / scale
                values[f"{GRAD_LAYER}/norm/{name}"] = g
                values[f"{GRAD_LAYER}/grad_to_weight/{name}"] = g / w
        if self.update_ratios:
            copies = [p.detach().clone() for p in params]
            pending.before[opt_idx] = (names, params, copies)
        if trainer.gradient_clip_val:
            pending.clip_params[opt_idx] = params
        if self.noise_scale:
            prev = self._prev_grads.pop(opt_idx, None)
            if prev is not None and self._batch_size == 0:
                pass  # a batch without examples (a function, not a data set): no noise scale
            elif prev is not None and self._batch_size is not None:
                first, second = _paired(prev, names, grads)
                if first:
                    estimator = self._estimators.setdefault(opt_idx, NoiseScaleEstimator())
                    estimator.update(first, _unscaled(second, scale), batch_size=self._batch_size)
                    values[f"{GRAD}/noise_scale{sfx}"] = estimator.value()
            elif prev is not None:
                warn_once(
                    self._warned,
                    "GradientMonitor could not read the batch size from the batch, so it does not "
                    "log `grad/noise_scale`. Set `noise_scale=False` to silence this.",
                )

    def _record_lr(
        self, values: dict[str, Tensor | float], optimizer: Optimizer, opt_idx: int
    ) -> None:
        single = self._n_optimizers == 1 and len(optimizer.param_groups) == 1
        for g_idx, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            if lr is None:
                continue
            tag = "" if single else f"/opt{opt_idx}_group{g_idx}"
            values[f"{GRAD}/lr{tag}"] = lr.detach().clone() if isinstance(lr, Tensor) else lr

    def refresh_learning_rates(self, trainer: pl.Trainer, optimizer: Optimizer) -> None:
        """Read ``optimizer``'s learning rates again, if this step is logged.

        For a callback that changes the rate inside the optimizer-step window after this monitor
        observed the step (a learning-rate kick): the logged rate is then the one the step used.
        """
        pending = self._pending
        if pending is not None and pending.step == step_index(trainer) and pending.values:
            self._record_lr(pending.values, optimizer, optimizer_index(trainer, optimizer))

    @override
    def end_batch(self, batch: Batch) -> None:
        """A batch ends: measure what needs the step taken, and log the gathered values."""
        pending, self._pending = self._pending, None
        if pending is None or self._log is None:
            return
        values = pending.values
        # Measured here, after the optimizer step: the update actually applied and, when the
        # Trainer clips, the gradient it applied (Lightning clips after the last callback hook).
        for names, params, before in pending.before.values():
            torch._foreach_sub_(before, [p.detach() for p in params])
            updates = foreach_norms(before, foreach=self.foreach)
            weights = foreach_norms(params, foreach=self.foreach)
            for name, u, w in zip(names, updates, weights):
                values[f"{GRAD_LAYER}/update_to_weight/{name}"] = u / w
        for opt_idx, params in pending.clip_params.items():
            grads = [p.grad for p in params if p.grad is not None]
            clipped = total_norm(foreach_norms(grads, foreach=self.foreach))
            values[f"{GRAD}/norm_clipped{self._suffix(opt_idx)}"] = clipped
        if values:
            self._log.scalars(to_host(values), step=pending.step)
        for tag, data in pending.histograms:
            self._log.histogram(tag, data, pending.step)

    @override
    def detach(self) -> None:
        """End a fit: flush the logs; hold on to nothing of the run."""
        if self._log is not None:
            self._log.flush()
        self._reset_runtime()
        self._grads.clear()  # the cached parameter lists would keep the parameters alive

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "noise_scale": {str(i): e.state_dict() for i, e in self._estimators.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._estimators = {}
        for key, state in state_dict.get("noise_scale", {}).items():
            estimator = NoiseScaleEstimator()
            estimator.load_state_dict(state)
            self._estimators[int(key)] = estimator


def _histogram_data(t: Tensor) -> Tensor:
    """The numbers a histogram of ``t`` shows: real ones, from a strided tensor.

    A sparse gradient shows its stored entries (the rows the batch touched; the rest are zeros, a
    spike that would hide them), a complex tensor its real and imaginary parts together.
    """
    values = stored_values(t)
    return torch.view_as_real(values) if values.is_complex() else values


def _unscaled(grads: list[Tensor], scale: Tensor | None) -> list[Tensor]:
    return grads if scale is None else [g / scale for g in grads]


def _paired(
    prev: tuple[list[str], list[Tensor]], names: list[str], grads: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """The two steps' gradients of the parameters that have one at both, in the same order.

    A parameter used on some batches only (a branch, an expert, an auxiliary head) has a gradient
    at one of the steps and not the other; the noise scale is then that of the others.
    """
    prev_names, prev_grads = prev
    if prev_names == names:
        return prev_grads, grads
    at = dict(zip(prev_names, prev_grads, strict=True))
    both = [(at[n], g) for n, g in zip(names, grads, strict=True) if n in at]
    return [a for a, _ in both], [g for _, g in both]


def _unscaled_copy(grads: list[Tensor], scale: Tensor | None) -> list[Tensor]:
    return [g.detach().clone() for g in grads] if scale is None else _unscaled(grads, scale)


_LAYOUT = {
    # Per-parameter charts stay out of the layout: TensorBoard's scalar dashboard shows each
    # parameter's chart under `grad_layer/`, where runs are not mixed into one crowded chart.
    GRAD: {
        "gradient norm, before and after clipping": [
            "Multiline",
            [rf"^{GRAD}/norm(_clipped)?(/opt\d+)?$"],
        ],
        "gradient noise scale (examples)": ["Multiline", [rf"^{GRAD}/noise_scale"]],
        "non-finite gradient values": ["Multiline", [rf"^{GRAD}/nonfinite"]],
        "learning rate the step used": ["Multiline", [rf"^{GRAD}/lr"]],
    },
}
