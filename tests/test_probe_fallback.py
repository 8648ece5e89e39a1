"""The curvature probe on modules without double backward: fused attention and torch.compile.

Fused attention kernels (``F.scaled_dot_product_attention`` on its flash backend, which
``nn.TransformerEncoder`` uses in training) have no double backward, and ``torch.compile`` refuses
it. The probe must fall back to finite differences of gradients there, never end the run.
``torch.compile`` uses ``backend="aot_eager"``: it refuses double backward exactly like the default
``inductor`` (same aot_autograd error) but compiles in about 3 s instead of 20 s on this CPU.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from lightning_escape import StallClassifier, StallDetector
from lightning_escape.curvature import (
    DoubleBackwardUnsupported,
    FiniteDifferenceHessianOperator,
    Spectrum,
    is_double_backward_error,
)
from lightning_escape.probe import ProbeUnavailable, hvp_method, probe_curvature

FLASH_ERROR = r"derivative for aten::_scaled_dot_product_flash_attention.*not implemented"
COMPILE_ERROR = "torch.compile with aot_autograd does not currently support double backward"
# Once a plain backward has run (a training step), the compiled backward donates its buffers and
# the probe's first backward, with create_graph=True, already fails.
DONATED_ERROR = r"donated buffers which requires create_graph=False"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Regression(pl.LightningModule):
    """A tiny regression around ``body``; SGD with a tiny step, so the loss plateaus at once."""

    def __init__(self, body: nn.Module, run: nn.Module | None = None, lr: float = 1e-7) -> None:
        super().__init__()
        self.body = body
        self.run = body if run is None else run  # e.g. a compiled wrapper of `body`
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.run(x)
        return out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class SdpaBlock(nn.Module):
    """Self-attention written with ``F.scaled_dot_product_attention`` directly."""

    def __init__(self, width: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return x + self.out(att.transpose(1, 2).reshape(b, t, w))


def _transformer() -> Regression:
    torch.manual_seed(0)
    # GELU, not the default ReLU: a finite difference across a ReLU kink picks up the jump in
    # the gradient, which the exact product ignores (see benchmarks/results/fd_hvp_accuracy.md),
    # and the comparison with the exact values is the point here.
    layer = nn.TransformerEncoderLayer(
        d_model=8,
        nhead=2,
        dim_feedforward=16,
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    return Regression(nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False))


def _sdpa() -> Regression:
    torch.manual_seed(0)
    return Regression(SdpaBlock())


def _compiled() -> Regression:
    torch._dynamo.reset()  # a fresh compilation: no backward of another test's module cached
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    return Regression(mlp, run=torch.compile(mlp, backend="aot_eager"))  # type: ignore[arg-type]


def _data(n: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, generator=g)
    return x, torch.tanh(x.flip(1)) + 0.1 * torch.randn(n, 4, 8, generator=g)


def _mlp_data(n: int = 16) -> tuple[Tensor, Tensor]:
    x, y = _data(n)
    return x[:, 0], y[:, 0]


MODELS: dict[
    str, tuple[Callable[[], Regression], Callable[[], tuple[Tensor, Tensor]], str, bool]
] = {
    # name: (model, batch, the exact probe's error, run a training backward first)
    "transformer": (_transformer, _data, FLASH_ERROR, True),
    "sdpa": (_sdpa, _data, FLASH_ERROR, True),
    "compiled": (_compiled, _mlp_data, COMPILE_ERROR, False),
    "compiled_after_backward": (_compiled, _mlp_data, DONATED_ERROR, True),
}


def _snapshot(module: nn.Module) -> dict[str, Any]:
    return {
        "params": [(p, p.detach().clone()) for p in module.parameters()],
        "grads": [
            (p.grad, None if p.grad is None else p.grad.clone()) for p in module.parameters()
        ],
        "buffers": [(b, b.clone()) for b in module.buffers()],
        "training": [m.training for m in module.modules()],
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),  # noqa: NPY002
        "log": "log" in module.__dict__,
    }


def _assert_untouched(before: dict[str, Any], module: nn.Module) -> None:
    after = _snapshot(module)
    for (p, value), (q, now) in zip(before["params"], after["params"], strict=True):
        assert p is q and now.dtype == value.dtype and torch.equal(now, value)
        assert torch.equal(now.view(torch.int32), value.view(torch.int32))  # bits, -0.0 too
    for (g, value), (h, now) in zip(before["grads"], after["grads"], strict=True):
        assert g is h and (value is None or torch.equal(now, value))
    for (b, value), (c, now) in zip(before["buffers"], after["buffers"], strict=True):
        assert b is c and torch.equal(now, value)
    assert before["training"] == after["training"] and before["log"] == after["log"]
    rng, rng_after = before["rng"], after["rng"]
    assert torch.equal(rng[0], rng_after[0]) and rng[1] == rng_after[1]
    assert np.array_equal(rng[2], rng_after[2])


def _with_grads(model: Regression, batch: tuple[Tensor, Tensor]) -> Regression:
    F.mse_loss(model(batch[0]), batch[1]).backward()
    return model


def _close(a: Spectrum, b: Spectrum, rel: float) -> None:
    scale = max(abs(b.lambda_max), abs(b.lambda_min))
    assert abs(a.lambda_max - b.lambda_max) <= rel * scale
    assert abs(a.lambda_min - b.lambda_min) <= rel * scale
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_fallback_to_finite_differences(name: str) -> None:
    make, data, error, warm = MODELS[name]
    model, batch = make(), data()
    if warm:
        _with_grads(model, batch)
    # (a) The exact product really fails here: the test has teeth.
    with pytest.raises(DoubleBackwardUnsupported, match=error) as raised:
        probe_curvature(model, batch, steps=3, method="exact")
    assert isinstance(raised.value, RuntimeError) and is_double_backward_error(raised.value)
    assert hvp_method(model) == "exact"  # an explicit "exact" remembers nothing

    # (b) The default probe falls back, warns once, and leaves no trace.
    before = _snapshot(model)
    with pytest.warns(UserWarning, match="finite differences of gradients"):
        spec = probe_curvature(model, batch, steps=12)
    _assert_untouched(before, model)
    assert spec.method == "finite_difference" and hvp_method(model) == "finite_difference"
    assert all(np.isfinite([spec.lambda_max, spec.lambda_min, spec.loss, spec.grad_norm]))
    assert spec.lambda_min < 0 < spec.lambda_max
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: straight to finite differences, no warning
        again = probe_curvature(model, batch, steps=12)
    assert again == spec  # deterministic, bit for bit
    _assert_untouched(before, model)

    # Close to the exact values where an exact path exists: the math attention kernel, or the
    # module run uncompiled.
    plain = Regression(model.body)
    with sdpa_kernel(SDPBackend.MATH):
        exact = probe_curvature(plain, batch, steps=12, method="exact")
        forced = probe_curvature(plain, batch, steps=12, method="finite_difference")
    assert exact.method == "exact" and forced.method == "finite_difference"
    _close(spec, exact, rel=1e-3)
    _close(forced, exact, rel=1e-3)


def test_finite_difference_probe_leaves_everything_untouched() -> None:
    """The guarantee of tests/test_probe.py on the finite-difference path: BN, dropout, metrics."""
    from test_probe import _assert_untouched as assert_all_untouched
    from test_probe import _batch, _mse, _trained_net
    from test_probe import _snapshot as snapshot_all

    for use_loss_fn in (False, True):
        net = _trained_net()
        before = snapshot_all(net)
        spec = probe_curvature(
            net,
            _batch(),
            loss_fn=_mse if use_loss_fn else None,
            steps=8,
            method="finite_difference",
        )
        assert spec.method == "finite_difference" and spec.iterations == 8
        assert_all_untouched(before, net)
        exact = probe_curvature(net, _batch(), loss_fn=_mse if use_loss_fn else None, steps=8)
        assert exact.method == "exact"
        _close(spec, exact, rel=1e-2)


def test_parameters_restored_when_the_loss_raises_mid_product() -> None:
    w = torch.randn(5, requires_grad=True)
    saved = w.detach().clone()
    calls = []

    def loss() -> Tensor:
        calls.append(1)
        if len(calls) == 3:  # the gradient at theta - h v
            raise RuntimeError("boom")
        return (w.sin() ** 2).sum()

    op = FiniteDifferenceHessianOperator(loss, [w])
    with pytest.raises(RuntimeError, match="boom"):
        op([torch.ones(5)])
    assert torch.equal(w.detach(), saved)


def test_probe_unavailable_when_finite_differences_fail_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: FiniteDifferenceHessianOperator, vec: Any) -> list[Tensor]:
        raise RuntimeError("first-order backward failed as well")

    monkeypatch.setattr(FiniteDifferenceHessianOperator, "__call__", broken)
    model, batch = _sdpa(), _data()
    before = _snapshot(model)
    with (
        pytest.warns(UserWarning, match="finite differences"),
        pytest.raises(
            ProbeUnavailable, match=r"double backward failed \(derivative.*failed as well"
        ),
    ):
        probe_curvature(model, batch, steps=4)
    _assert_untouched(before, model)


def _fit(model: Regression, detector: StallDetector | None, steps: int = 24) -> pl.Trainer:
    x, y = _data(64, seed=1)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[] if detector is None else [detector],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    return trainer


def _detector(classifier: StallClassifier | None = None) -> StallDetector:
    return StallDetector(
        patience=4,
        warmup_steps=0,
        check_every_n_steps=4,
        classifier=classifier or StallClassifier(lanczos_steps=8, symmetry_every_n_steps=None),
    )


def test_fit_with_stall_detector_on_a_transformer() -> None:
    """(c) The run goes to the end, the stall is diagnosed with curvature, training unchanged."""
    baseline = _transformer()
    _fit(baseline, None)
    model = _transformer()
    detector = _detector()
    with pytest.warns(UserWarning, match="finite differences of gradients"):
        trainer = _fit(model, detector)
    assert trainer.global_step == 24
    assert detector.diagnoses, "no stall diagnosed"
    assert detector.last_spectrum is not None
    assert detector.last_spectrum.method == "finite_difference"
    assert all(np.isfinite([detector.last_spectrum.lambda_min, detector.last_spectrum.lambda_max]))
    assert any("lambda_min" in str(d.evidence) for d in detector.diagnoses)
    # The probes moved the parameters and put them back bit for bit: the same training.
    for p, q in zip(baseline.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_fit_when_no_hessian_vector_product_works(monkeypatch: pytest.MonkeyPatch) -> None:
    """ProbeUnavailable from the fallback: one warning, diagnoses without curvature."""

    def broken(self: FiniteDifferenceHessianOperator, vec: Any) -> list[Tensor]:
        raise RuntimeError("first-order backward failed as well")

    monkeypatch.setattr(FiniteDifferenceHessianOperator, "__call__", broken)
    model = _transformer()
    detector = _detector()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(model, detector)
    assert trainer.global_step == 24
    cannot = [w for w in caught if "curvature probe cannot run" in str(w.message)]
    assert len(cannot) == 1 and "No Hessian-vector product works" in str(cannot[0].message)
    assert detector.diagnoses and detector.last_spectrum is None
    assert not any("lambda_min" in str(d.evidence) for d in detector.diagnoses)


def test_classifier_with_exact_method_does_not_end_the_run() -> None:
    model = _sdpa()
    detector = _detector(
        StallClassifier(lanczos_steps=8, symmetry_every_n_steps=None, probe_method="exact")
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, detector, steps=8)
    assert any("probe_method='exact'" in str(w.message) for w in caught)
    assert detector.diagnoses and detector.last_spectrum is None
    with pytest.raises(ValueError, match="`probe_method` must be one of"):
        StallClassifier(probe_method="second_order")
