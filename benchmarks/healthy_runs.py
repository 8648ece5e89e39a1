"""Healthy runs as users train them: plain against ``EscapeCallback()``, final held-out metrics.

Small classifiers on scikit-learn's tables and on noisy moons, with the setups users reach for
(SGD with momentum and Adam, label smoothing, mixup, batches of 8, a metric monitored at
validation, a cosine schedule with a first layer unfrozen late by ``BaseFinetuning``), each
trained once plainly and once with ``EscapeCallback()`` at its defaults
(``StallDetector(monitor=...)`` for the setups named after a metric), the same seed, data order and
budget, validated every 100 steps. None of them is stuck: an escape kept there is a change the
run did not need, and a rolled-back one throws steps away. The table gives the final held-out
accuracy and loss of both runs and the escapes kept as help, kept without effect (neutral: ahead, but
within the noise) and rolled back. A
``ModelCheckpoint(monitor="val_loss", save_top_k=-1)`` saves at every validation of both runs; the
last column counts the checkpoints of the run with escapes whose recorded score is not the
validation loss of the model they hold (loaded and measured again), out of all of them.

    .venv/bin/python benchmarks/healthy_runs.py                 # every setup, seeds 0 and 1
    .venv/bin/python benchmarks/healthy_runs.py --setups moons_adam --seeds 0 --out /tmp/h.md
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BaseFinetuning, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._report import emit, heading  # noqa: E402
from lightning_escape import EscapeCallback, StallDetector  # noqa: E402


@dataclass(frozen=True)
class Setup:
    """One healthy training setup: data, optimizer, learning rate, batch, budget and options.

    ``monitor`` is the metric the detector watches in place of the loss ``training_step``
    returns: ``val_loss`` (logged at validation) or ``train_loss`` (logged at every step).
    ``cosine``: the learning rate decays to 0 along a cosine over the budget (stepped per
    optimizer step). ``frozen_epochs``: the first layer is frozen for that many epochs by a
    ``BaseFinetuning`` callback, then trained at a tenth of the rate in a group of its own.
    """

    data: str
    opt: str
    lr: float
    batch: int
    steps: int
    smoothing: float = 0.0
    mixup: bool = False
    monitor: str | None = None
    cosine: bool = False
    frozen_epochs: int = 0


SETUPS: dict[str, Setup] = {
    "moons_adam": Setup("moons", "adam", 1e-3, 32, 4000),
    "moons_sgd": Setup("moons", "sgd", 0.05, 16, 4000),
    "digits_adam_smoothing": Setup("digits", "adam", 1e-3, 32, 3000, smoothing=0.1),
    "digits_sgd_mixup": Setup("digits", "sgd", 0.05, 32, 3000, mixup=True),
    "wine_adam": Setup("wine", "adam", 1e-3, 16, 3000),
    "cancer_sgd_batch8": Setup("cancer", "sgd", 0.02, 8, 3000),
    "digits_adam_val_loss": Setup("digits", "adam", 1e-3, 32, 3000, monitor="val_loss"),
    "moons_sgd_val_loss": Setup("moons", "sgd", 0.05, 16, 4000, monitor="val_loss"),
    "moons_adam_train_loss": Setup("moons", "adam", 1e-3, 32, 4000, monitor="train_loss"),
    "digits_sgd_train_loss": Setup("digits", "sgd", 0.05, 32, 3000, monitor="train_loss"),
    "cancer_sgd_cosine_finetuning": Setup(
        "cancer", "sgd", 0.05, 32, 1500, monitor="val_loss", cosine=True, frozen_epochs=20
    ),
}
"""The setups by name."""


def split(name: str, seed: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A seeded 75/25 split of a scikit-learn table (features scaled), or 1200 noisy moons."""
    from sklearn import datasets

    if name == "moons":
        x, y = datasets.make_moons(1200, noise=0.25, random_state=seed)
    elif name == "digits":
        bunch = datasets.load_digits()
        x, y = bunch.data / 16, bunch.target
    else:
        bunch = datasets.load_wine() if name == "wine" else datasets.load_breast_cancer()
        x, y = bunch.data, bunch.target
        x = (x - x.mean(0)) / x.std(0)
    features, labels = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
    n = int(0.75 * len(features))
    train, test = order[:n], order[n:]
    return (features[train], labels[train]), (features[test], labels[test])


class Classifier(pl.LightningModule):
    """An MLP ``d → 64 → 64 → classes`` (ReLU), with label smoothing or mixup if asked."""

    def __init__(
        self,
        d: int,
        classes: int,
        opt: str,
        lr: float,
        smoothing: float,
        mixup: bool,
        cosine_steps: int = 0,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, classes)
        )
        self.opt, self.lr, self.smoothing, self.mixup = opt, lr, smoothing, mixup
        self.cosine_steps = cosine_steps

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        if self.mixup:
            lam = float(torch.distributions.Beta(0.4, 0.4).sample())
            other = torch.randperm(len(x))
            out = self.net(lam * x + (1 - lam) * x[other])
            loss = lam * nn.functional.cross_entropy(out, y) + (
                1 - lam
            ) * nn.functional.cross_entropy(out, y[other])
        else:
            loss = nn.functional.cross_entropy(self.net(x), y, label_smoothing=self.smoothing)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(out, y))
        self.log("val_acc", (out.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        # Only the parameters that train now: BaseFinetuning adds the frozen ones later.
        params = [p for p in self.parameters() if p.requires_grad]
        if self.opt == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.lr)
        else:
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        if not self.cosine_steps:
            return optimizer
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.cosine_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


class FirstLayerLater(BaseFinetuning):
    """Freeze the first layer for ``epochs`` epochs, then train it at a tenth of the rate."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.net[0])

    def finetune_function(
        self, pl_module: pl.LightningModule, epoch: int, optimizer: torch.optim.Optimizer
    ) -> None:
        if epoch == self.epochs:
            lr = optimizer.param_groups[0]["lr"] / 10
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=lr)


def run(setup: str, seed: int, escape: bool) -> dict[str, Any]:
    """Train ``setup`` once; its final held-out accuracy and loss, and the escapes' verdicts."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    config = SETUPS[setup]
    (x, y), (xv, yv) = split(config.data, seed)
    pl.seed_everything(seed, verbose=False)
    model = Classifier(
        x.shape[1],
        int(y.max()) + 1,
        config.opt,
        config.lr,
        config.smoothing,
        config.mixup,
        config.steps if config.cosine else 0,
    )
    saved = Path(tempfile.mkdtemp(prefix="healthy_runs_"))
    saver = ModelCheckpoint(dirpath=saved, monitor="val_loss", save_top_k=-1)
    callbacks: list[pl.Callback] = [saver]
    if config.frozen_epochs:
        callbacks.append(FirstLayerLater(config.frozen_epochs))
    if escape:
        detector = None if config.monitor is None else StallDetector(monitor=config.monitor)
        callback = EscapeCallback(detector)
        callbacks.append(callback)
    trainer = pl.Trainer(
        max_steps=config.steps,
        val_check_interval=100,
        check_val_every_n_epoch=None,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    held_out = DataLoader(TensorDataset(xv, yv), batch_size=len(xv))
    shuffled = torch.Generator().manual_seed(seed)
    train = DataLoader(
        TensorDataset(x, y), batch_size=config.batch, shuffle=True, generator=shuffled
    )
    trainer.fit(model, train, held_out)
    [final] = trainer.validate(model, held_out, verbose=False)
    verdicts = [event.verdict for event in callback.events] if escape else []
    off = 0
    for path, score in saver.best_k_models.items():
        state = torch.load(path, weights_only=True)["state_dict"]
        model.load_state_dict(state)
        with torch.no_grad():
            measured = float(nn.functional.cross_entropy(model.net(xv), yv))
        off += abs(measured - float(score)) > 1e-5 * abs(measured)
    shutil.rmtree(saved)
    return {
        "acc": float(final["val_acc"]),
        "loss": float(final["val_loss"]),
        "kept": verdicts.count("accepted"),
        "neutral": verdicts.count("neutral"),
        "rolled_back": verdicts.count("rolled_back"),
        "checkpoints": len(saver.best_k_models),
        "off": off,
    }


def main() -> int:
    """Run the setups and seeds asked for; print the table, or write it to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    setups = args.setups.split(",")
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setups {unknown}; known: {', '.join(SETUPS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    rows = []
    kept = neutral = rolled = off = checkpoints = 0
    for setup in setups:
        for seed in seeds:
            plain, escaped = run(setup, seed, False), run(setup, seed, True)
            kept += escaped["kept"]
            neutral += escaped["neutral"]
            rolled += escaped["rolled_back"]
            off += escaped["off"]
            checkpoints += escaped["checkpoints"]
            points = 100 * (escaped["acc"] - plain["acc"])
            loss = 100 * (escaped["loss"] / plain["loss"] - 1)
            rows.append(
                f"| `{setup}` | {seed} | {plain['acc']:.4f} | {escaped['acc']:.4f} | {points:+.2f} "
                f"| {plain['loss']:.4f} | {escaped['loss']:.4f} | {loss:+.1f}% "
                f"| {escaped['kept']} / {escaped['neutral']} / {escaped['rolled_back']} "
                f"| {escaped['off']} of {escaped['checkpoints']} |"
            )
            print(rows[-1], flush=True)
    minutes = (time.perf_counter() - start) / 60
    text = "\n".join(
        [
            *heading(
                "Healthy runs: plain training against `EscapeCallback()`",
                f"`benchmarks/healthy_runs.py --seeds {args.seeds}`, {2 * len(rows)} runs in "
                f"{minutes:.1f} min, one thread.",
                __doc__,
            ),
            "| setup | seed | accuracy, plain | with escapes | points | loss, plain | with escapes "
            "| change | escapes kept / neutral / rolled back | checkpoints scored off their model |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Escapes kept: {kept}; kept without effect: {neutral}; rolled back: {rolled} (each "
            "restored bit for bit; the steps "
            f"it threw away are its cost). Checkpoints scored off their model: {off} of "
            f"{checkpoints}.",
            "",
        ]
    )
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
