from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from models import Net, ReferenceNorms, fit, read_scalars
from torch.utils.data import DataLoader, TensorDataset

from lightning_escape import GradientMonitor
from lightning_escape.signals import NoiseScaleEstimator


def _scaler_plugin() -> MixedPrecision:
    # The GradScaler path of 16-bit AMP, on the CPU (plain "16-mixed" becomes bf16 there).
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


SETUPS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (Net kwargs, Trainer kwargs)
    "fp32": ({}, {}),
    "bf16-mixed": ({}, {"precision": "bf16-mixed"}),
    "16-mixed-scaler": ({}, {"plugins": [_scaler_plugin()]}),
    "16-mixed-fused-adam": ({"optimizer": "adam_fused"}, {"plugins": [_scaler_plugin()]}),
    "accumulation": ({}, {"accumulate_grad_batches": 3}),
    "clipping": ({}, {"gradient_clip_val": 0.01}),
    "clipping-by-value": ({}, {"gradient_clip_val": 1e-3, "gradient_clip_algorithm": "value"}),
    "manual": ({"manual": True}, {}),
    "manual-two-optimizers": ({"manual": True, "two_optimizers": True}, {}),
    "frozen-and-unused": ({"freeze_first": True, "unused": True}, {}),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_logged_values_match_independent_reference(setup: str, tmp_path: Path) -> None:
    net_kwargs, trainer_kwargs = SETUPS[setup]
    torch.manual_seed(0)
    model = Net(**net_kwargs)
    ref = ReferenceNorms()
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(model, [GradientMonitor(), ref], logger=logger, max_steps=20, **trainer_kwargs)
    scalars = read_scalars(logger.log_dir)

    two = net_kwargs.get("two_optimizers", False)
    # The steps Lightning logs: every 5th batch that stepped (accumulation and two manual
    # optimizers change how many batches 20 optimizer steps take).
    logged_steps = sorted({s for s, _ in ref.norms if (s + 1) % 5 == 0})
    assert len(logged_steps) >= 2
    for opt_idx in (0, 1) if two else (0,):
        tag = "grad/norm" + (f"/opt{opt_idx}" if two else "")
        got = scalars[tag]
        assert sorted(got) == logged_steps, tag
        for step in logged_steps:
            want = ref.norms[(step, opt_idx)]
            assert _close(got[step], want), (setup, step, got[step], want)

    # Per-layer norms and the update actually applied, against the reference.
    for (step, name), want in ref.layers.items():
        if step in logged_steps and not math.isinf(want):
            assert _close(scalars[f"grad_layer/norm/{name}"][step], want, 1e-4)
    for (step, name), want in ref.updates.items():
        if step in logged_steps:
            assert _close(scalars[f"grad_layer/update_to_weight/{name}"][step], want, 1e-4)

    lr_tags = [t for t in scalars if t.startswith("grad/lr")]
    assert lr_tags
    if not two:
        for step in logged_steps:
            assert _close(scalars["grad/lr"][step], ref.lrs[step])
    assert all(v == 0 for v in scalars["grad/nonfinite" + ("/opt0" if two else "")].values())

    if trainer_kwargs.get("gradient_clip_val"):
        clipped = scalars["grad/norm_clipped"]
        for step in logged_steps:
            assert _close(clipped[step], ref.clipped[step], 1e-4)
            assert clipped[step] <= scalars["grad/norm"][step] + 1e-6
    if net_kwargs.get("freeze_first") or net_kwargs.get("unused"):
        assert "grad_layer/norm/l1.weight" not in scalars
        assert "grad_layer/norm/unused" not in scalars
        assert "grad_layer/norm/l1.bias" in scalars


def test_noise_scale_is_logged_and_finite(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(Net(n=256, batch_size=8), [GradientMonitor()], logger=logger, max_steps=40)
    values = read_scalars(logger.log_dir)["grad/noise_scale"]
    # The first logged step has no preceding gradient copy only if it is step 0; here all have one.
    assert sorted(values) == [4, 9, 14, 19, 24, 29, 34, 39]
    assert all(math.isfinite(v) for v in values.values())


class Heads(pl.LightningModule):
    """A trunk and two heads of the same shapes, one used on even batches and one on odd ones."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(4, 4)
        self.even = torch.nn.Linear(4, 1)
        self.odd = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        head = self.even if batch_idx % 2 == 0 else self.odd
        return torch.nn.functional.mse_loss(head(torch.tanh(self.trunk(x))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader[Any]:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(256, 4, generator=g), torch.randn(256, 1, generator=g))
        return DataLoader(data, batch_size=8)


class Grads(Callback):
    """Each step's gradients by parameter name (those that have one)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        named = pl_module.named_parameters()
        self.steps.append({n: p.grad.clone() for n, p in named if p.grad is not None})


@pytest.mark.parametrize("every", [1, 2, 3])
def test_the_noise_scale_pairs_the_gradients_of_the_parameters_both_steps_have(
    tmp_path: Path, every: int
) -> None:
    # A head used on every other batch has a gradient at one step of a pair and not the other:
    # the monitor crashed (lists of 4 and 6 tensors), or, with heads of the same shapes, paired
    # one head's gradient with the other's. Logging every step, it never logged a noise scale.
    logger = TensorBoardLogger(tmp_path, name="tb")
    grads = Grads()
    fit(Heads(), [GradientMonitor(log_every_n_steps=every), grads], logger=logger, max_steps=12)
    got = read_scalars(logger.log_dir)["grad/noise_scale"]
    estimator, want = NoiseScaleEstimator(), {}
    for step in range(1, 12):
        if (step + 1) % every == 0:
            first, second = grads.steps[step - 1], grads.steps[step]
            both = [n for n in second if n in first]
            assert both == ["trunk.weight", "trunk.bias"]
            earlier = [first[n].clone() for n in both]  # consumed by the estimator
            estimator.update(earlier, [second[n] for n in both], batch_size=8)
            want[step] = estimator.value()
    assert sorted(got) == sorted(want)
    for step, value in want.items():
        assert _close(got[step], value, 1e-4), (step, got[step], value)


def test_nonfinite_gradients_are_counted(tmp_path: Path) -> None:
    class Poison(Net):
        def on_after_backward(self) -> None:
            if self.trainer.global_step == 4:
                self.l2.weight.grad[0, :3] = float("nan")

    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(Poison(), [GradientMonitor(update_ratios=False)], logger=logger, max_steps=5)
    scalars = read_scalars(logger.log_dir)
    assert scalars["grad/nonfinite"] == {4: 3.0}
    assert math.isnan(scalars["grad/norm"][4])


def test_histograms_and_layout(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(Net(), [GradientMonitor(histogram_every_n_steps=10)], logger=logger, max_steps=20)
    ea = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "tensors": 0})
    ea.Reload()
    hist = ea.Tags()["histograms"]
    assert "grad_layer/grad_hist/l1.weight" in hist
    assert "grad_layer/weight_hist/l2.bias" in hist
    assert [e.step for e in ea.Histograms("grad_layer/grad_hist/l1.weight")] == [9, 19]
    raw = ea.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(raw)
    titles = {c.title for c in layout.category}
    assert titles == {"grad"}  # a monitor alone writes no `stall/` or `escape/` charts


def test_histograms_keep_their_own_cadence(tmp_path: Path) -> None:
    # Gathered only on the scalars' logging steps, they came every 12 steps for every 6 asked.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = GradientMonitor(log_every_n_steps=4, histogram_every_n_steps=6)
    fit(Net(), [monitor], logger=logger, max_steps=24)
    ea = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    ea.Reload()
    for tag in ("grad_layer/grad_hist/l1.weight", "grad_layer/weight_hist/l2.bias"):
        assert [e.step for e in ea.Histograms(tag)] == [5, 11, 17, 23]
    scalars = read_scalars(logger.log_dir)
    for tag in ("grad/norm", "grad/lr"):
        assert sorted(scalars[tag]) == [3, 7, 11, 15, 19, 23]  # the scalars' own


def test_csv_logger_gets_the_scalars(tmp_path: Path) -> None:
    ref = ReferenceNorms()
    logger = CSVLogger(tmp_path, name="csv")
    fit(Net(), [GradientMonitor(), ref], logger=logger, max_steps=10)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("grad/norm")]
    assert [int(r["step"]) for r in rows] == [4, 9]
    for r in rows:
        assert _close(float(r["grad/norm"]), ref.norms[(int(r["step"]), 0)])


def test_no_logger_no_crash_and_norm_every_step() -> None:
    seen: list[float] = []

    class Spy(ReferenceNorms):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            seen.append(float(monitor.grad_norm))  # type: ignore[arg-type]
            super().on_train_batch_end(trainer, pl_module, *args)

    monitor = GradientMonitor()
    spy = Spy()
    fit(Net(), [monitor, spy], logger=False, max_steps=7)
    assert len(seen) == 7
    for step, value in enumerate(seen):
        assert _close(value, spy.norms[(step, 0)])


def test_log_every_n_steps_override(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(Net(), [GradientMonitor(log_every_n_steps=3)], logger=logger, max_steps=10)
    assert sorted(read_scalars(logger.log_dir)["grad/norm"]) == [2, 5, 8]


def test_pickles() -> None:
    monitor = GradientMonitor(histogram_every_n_steps=5)
    clone = pickle.loads(pickle.dumps(monitor))
    assert clone.histogram_every_n_steps == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_every_n_steps": 0}, "`log_every_n_steps` must be a positive integer, got 0"),
        ({"log_every_n_steps": 2.5}, "`log_every_n_steps` must be a positive integer, got 2.5"),
        ({"log_every_n_steps": True}, "`log_every_n_steps` must be a positive integer, got True"),
        ({"histogram_every_n_steps": -1}, "`histogram_every_n_steps` .* got -1"),
        ({"per_layer": "yes"}, "`per_layer` must be a bool, got 'yes'"),
        ({"update_ratios": 1}, "`update_ratios` must be a bool, got 1"),
        ({"noise_scale": None}, "`noise_scale` must be a bool, got None"),
        ({"foreach": "auto"}, "`foreach` must be a bool, got 'auto'"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradientMonitor(**kwargs)
