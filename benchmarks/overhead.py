"""Step-time overhead of lightning_escape's callbacks against a bare Lightning Trainer.

Configurations, run in one process, interleaved (the order rotates every repeat), each on a fresh
model with the same seed:

- ``bare``: no callback;
- ``GradientMonitor()``: the monitor at its defaults;
- ``grad_norm recipe``: Lightning's documented recipe, ``self.log_dict(grad_norm(self, norm_type=2))``
  in ``on_before_optimizer_step``, logging every step;
- any more configurations registered in ``CONFIGS`` (the escape loop adds its own).

Step time is the wall time between consecutive ``on_train_batch_start`` calls, so it includes every
hook and logger write; the first ``--warmup`` steps of each run are discarded. A run's figure is its
median step time; the overhead of a configuration is the median over repeats of its run's median
divided by the bare run's median of the same repeat (paired, so drifts of the machine cancel).

Run: ``python3 dev.py bench`` (writes ``benchmarks/results/overhead.md``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_escape import GradientMonitor

RESULTS = Path(__file__).resolve().parent / "results"


class MLP(pl.LightningModule):
    """About 5.2M parameters: 512 -> 2048 -> 2048 -> 10, ReLU, Adam."""

    def __init__(self, recipe: bool = False, batch_size: int = 256, n: int = 4096) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
        )
        self.recipe = recipe
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 512, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.recipe:
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-4)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True)


class StepTimer(pl.Callback):
    """Wall time between consecutive batch starts."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(self, *args: Any) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


# name -> (model kwargs, callbacks factory)
CONFIGS: dict[str, tuple[dict[str, Any], Callable[[], list[pl.Callback]]]] = {
    "bare": ({}, list),
    "GradientMonitor()": ({}, lambda: [GradientMonitor()]),
    "grad_norm recipe": ({"recipe": True}, list),
}


def run_once(name: str, steps: int, warmup: int, batch_size: int, logdir: str) -> float:
    model_kwargs, callbacks = CONFIGS[name]
    pl.seed_everything(0, verbose=False)
    model = MLP(batch_size=batch_size, **model_kwargs)
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + warmup + 1,
        callbacks=[timer, *callbacks()],
        logger=TensorBoardLogger(logdir, name=name.replace(" ", "_")),
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    return statistics.median(timer.times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--only", nargs="*", default=None, help="configurations to run")
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.only or list(CONFIGS)
    if "bare" not in names:
        names.insert(0, "bare")
    medians: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as logdir:
        for r in range(args.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                medians[name].append(
                    run_once(name, args.steps, args.warmup, args.batch_size, logdir)
                )
                print(f"repeat {r} {name}: {medians[name][-1] * 1e3:.2f} ms/step", flush=True)
    bare = medians["bare"]
    n_params = sum(p.numel() for p in MLP().parameters())
    lines = [
        "# Step-time overhead",
        "",
        f"Measured {date.today().isoformat()} with `python3 dev.py bench` "
        f"(`benchmarks/overhead.py --repeats {args.repeats} --steps {args.steps} "
        f"--warmup {args.warmup} --batch-size {args.batch_size}`).",
        "",
        f"MLP of {n_params / 1e6:.2f}M parameters (512-2048-2048-10, ReLU), Adam, batch "
        f"{args.batch_size}, CPU, 1 thread, torch {torch.__version__}, lightning {pl.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}. Logging every 50 steps to "
        "TensorBoard in every configuration. Interleaved runs in one process; each figure is the "
        "median over repeats of per-run medians; overhead is paired per repeat against `bare`.",
        "",
        "| configuration | median step (ms) | overhead vs bare (median of paired ratios) | min..max |",
        "|---|---|---|---|",
    ]
    for name in names:
        ratios = [m / b - 1 for m, b in zip(medians[name], bare)]
        lines.append(
            f"| {name} | {statistics.median(medians[name]) * 1e3:.2f} | "
            f"{statistics.median(ratios) * 100:+.2f}% | "
            f"{min(ratios) * 100:+.2f}%..{max(ratios) * 100:+.2f}% |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
