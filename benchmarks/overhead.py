"""Step-time overhead of lightning_escape's callbacks against a bare Lightning Trainer.

Configurations, run in one process, interleaved (the order rotates every repeat), each on a fresh
model with the same seed:

- ``bare``: no callback;
- ``GradientMonitor()``: the monitor at its defaults;
- ``grad_norm recipe``: Lightning's documented recipe, ``self.log_dict(grad_norm(self, norm_type=2))``
  in ``on_before_optimizer_step``, logging every step;
- ``StallDetector()`` and ``EscapeCallback()`` at their defaults. The MLP trains normally, so
  no stall is declared in these runs: the figures are the cost of watching. What runs only at a
  stall (the curvature probe, the unit checks, a snapshot and its restore) is timed on its own,
  on the same model and batch, and reported in step-times.

Step time is the wall time between consecutive ``on_train_batch_start`` calls, so it includes every
hook and logger write; the first ``--warmup`` steps of each run are discarded. A run's figure is its
median step time; the overhead of a configuration is the median over repeats of its run's median
divided by the bare run's median of the same repeat (paired, so drifts of the machine cancel).

Run: ``python3 dev.py bench``. Its defaults are the settings ``benchmarks/results/overhead.md`` was
measured with. A line per finished run says about how long the rest will take; the table goes to a
new file, ``benchmarks/results/overhead-<time>.md``, or with ``--overwrite`` replaces
``benchmarks/results/overhead.md`` (``--out PATH`` writes PATH). Ctrl-C stops it and writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_escape import EscapeCallback, GradientMonitor, StallDetector
from lightning_escape.probe import probe_curvature
from lightning_escape.snapshot import TrainingSnapshot

RESULTS = Path(__file__).resolve().parent / "results"
# The exit status of a run stopped by Ctrl-C, as a shell reports it (128 + SIGINT).
INTERRUPTED = 130


def output_path(out: Path | None, overwrite: bool) -> Path:
    """Where the table goes: ``out``, the committed file with ``overwrite``, else a new file."""
    if out is not None:
        return out
    if overwrite:
        return RESULTS / "overhead.md"
    return RESULTS / f"overhead-{datetime.now():%Y%m%d-%H%M%S}.md"


def duration(seconds: float) -> str:
    """``"40 s"`` (at least 1 s) or ``"3 min"``."""
    return f"{max(seconds, 1):.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


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
    """Wall time between consecutive batch starts, and the time spent inside timed hooks."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.hook_times: list[float] = []
        self.in_hooks = 0.0
        self._last: tuple[float, float] | None = None

    def on_train_batch_start(self, *args: Any) -> None:
        now = (time.perf_counter(), time.process_time())
        if self._last is not None:
            self.times.append(now[0] - self._last[0])
            self.cpu_times.append(now[1] - self._last[1])
            self.hook_times.append(self.in_hooks)
        self.in_hooks = 0.0
        self._last = now

    def instrument(self, obj: object, names: tuple[str, ...]) -> None:
        """Add the time spent in ``obj``'s methods ``names`` to the current step's hook time."""
        for name in names:
            method = getattr(obj, name, None)
            if method is None:
                continue

            def timed(*args: Any, _method: Callable[..., Any] = method, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self.in_hooks += time.perf_counter() - start

            setattr(obj, name, timed)


# Every hook the callbacks implement, and EscapeCallback's optimizer post-step hook.
HOOKS = (
    "on_train_batch_start",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_epoch_end",
    "_after_step",
)


# name -> (model kwargs, callbacks factory)
CONFIGS: dict[str, tuple[dict[str, Any], Callable[[], list[pl.Callback]]]] = {
    "bare": ({}, list),
    "GradientMonitor()": ({}, lambda: [GradientMonitor()]),
    "grad_norm recipe": ({"recipe": True}, list),
    "StallDetector()": ({}, lambda: [StallDetector()]),
    "EscapeCallback()": ({}, lambda: [EscapeCallback()]),
}


def run_once(name: str, steps: int, warmup: int, batch_size: int, logdir: str) -> dict[str, float]:
    """Median and mean step time of one run, and the median and mean time inside its hooks."""
    model_kwargs, callbacks = CONFIGS[name]
    pl.seed_everything(0, verbose=False)
    model = MLP(batch_size=batch_size, **model_kwargs)
    timer = StepTimer()
    extra = callbacks()
    for callback in extra:
        timer.instrument(callback, HOOKS)
    if model.recipe:
        timer.instrument(model, ("on_before_optimizer_step",))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + warmup + 1,
        callbacks=[timer, *extra],
        logger=TensorBoardLogger(logdir, name=name.replace(" ", "_")),
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    times, hooks = timer.times[warmup:], timer.hook_times[warmup:]
    cpu = timer.cpu_times[warmup:]
    return {
        "median": statistics.median(times),
        "mean": statistics.fmean(times),
        "cpu_median": statistics.median(cpu),
        "hook_median": statistics.median(hooks),
        "hook_mean": statistics.fmean(hooks),
    }


def time_components(batch_size: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds of the work done only at a stall, on the benchmark's model and batch."""
    pl.seed_everything(0, verbose=False)
    model = MLP(batch_size=batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = (model.x[:batch_size], model.y[:batch_size])
    model.training_step(batch, 0).backward()
    opt.step()  # optimizer state exists, as mid-run
    model.log = lambda *a, **k: None  # type: ignore[method-assign]

    def timed(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    snap = TrainingSnapshot.capture(model, [opt])
    return {
        "curvature probe (20 Lanczos steps)": timed(
            lambda: probe_curvature(model, batch, steps=20, tol=0.0)
        ),
        "snapshot capture (same device)": timed(lambda: TrainingSnapshot.capture(model, [opt])),
        "snapshot capture (cpu)": timed(
            lambda: TrainingSnapshot.capture(model, [opt], device="cpu")
        ),
        "snapshot restore": timed(lambda: snap.restore(model, [opt])),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The defaults are the settings of the committed benchmarks/results/overhead.md.
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--only", nargs="*", default=None, help="configurations to run")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None, help="write the table to this file")
    where.add_argument(
        "--overwrite", action="store_true", help="replace benchmarks/results/overhead.md"
    )
    args = parser.parse_args()
    out = output_path(args.out, args.overwrite)
    torch.set_num_threads(1)
    # Lightning's notices for every Trainer (devices, tips, "stopped") would bury the progress lines.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    names = args.only or list(CONFIGS)
    if "bare" not in names:
        names.insert(0, "bare")
    total = args.repeats * len(names)
    print(f"{total} runs in one process; the table goes to {out}", flush=True)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as logdir:
            for r in range(args.repeats):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    result = run_once(name, args.steps, args.warmup, args.batch_size, logdir)
                    runs[name].append(result)
                    done = sum(len(rs) for rs in runs.values())
                    elapsed = time.perf_counter() - started
                    eta = f"about {duration(elapsed / done * (total - done))} left"
                    if done == total:
                        eta = f"all runs done in {duration(elapsed)}; now the stall-only timings"
                    print(
                        f"[{done}/{total}] repeat {r} {name}: {result['median'] * 1e3:.2f} ms/step, "
                        f"{result['hook_median'] * 1e3:.3f} ms in hooks; {eta}",
                        flush=True,
                    )
            return write_results(args, runs, names, out)
    except (KeyboardInterrupt, SystemExit):
        # Inside `Trainer.fit` Lightning turns Ctrl-C into its own graceful stop and `sys.exit(1)`.
        print(f"\ninterrupted: nothing written to {out}", file=sys.stderr)
        return INTERRUPTED


def write_results(
    args: argparse.Namespace, runs: dict[str, list[dict[str, float]]], names: list[str], out: Path
) -> int:
    """Write the table of ``runs`` and the stall-only timings to ``out``."""
    medians = {n: [r["median"] for r in rs] for n, rs in runs.items()}
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
        "Two measures. *In hooks*: the time spent inside the configuration's own hooks per "
        "step (the callbacks' hooks, or the LightningModule hook of the recipe), median and mean "
        "over steps (the mean includes the logging and checking steps), as a share of the bare "
        "median step; on the CPU nothing runs asynchronously, so this is the cost itself, without "
        "the noise of a shared machine. *Process CPU time* and *wall clock*: the median step of "
        "each run (everything included), paired per repeat with the bare run's; CPU time leaves "
        "out the time other processes take from this one; the spread across repeats (min..max) "
        "shows how noisy each is on this machine.",
        "",
        "| configuration | in hooks, median step | in hooks, mean step | CPU time: median step "
        "(ms), overhead (min..max) | wall clock: median step (ms), overhead (min..max) |",
        "|---|---|---|---|---|",
    ]
    bare_step = statistics.median(bare)
    for name in names:
        ratios = [m / b - 1 for m, b in zip(medians[name], bare)]
        hook_median = statistics.median(r["hook_median"] for r in runs[name])
        hook_mean = statistics.median(r["hook_mean"] for r in runs[name])
        cpu = [r["cpu_median"] for r in runs[name]]
        cpu_ratios = [c / b["cpu_median"] - 1 for c, b in zip(cpu, runs["bare"])]
        lines.append(
            f"| {name} | {hook_median * 1e3:.2f} ms ({hook_median / bare_step * 100:.2f}%) "
            f"| {hook_mean * 1e3:.2f} ms ({hook_mean / bare_step * 100:.2f}%) "
            f"| {statistics.median(cpu) * 1e3:.1f}, {statistics.median(cpu_ratios) * 100:+.2f}% "
            f"({min(cpu_ratios) * 100:+.1f}%..{max(cpu_ratios) * 100:+.1f}%) "
            f"| {statistics.median(medians[name]) * 1e3:.1f}, {statistics.median(ratios) * 100:+.2f}% "
            f"({min(ratios) * 100:+.1f}%..{max(ratios) * 100:+.1f}%) |"
        )
    step = statistics.median(bare)
    components = time_components(args.batch_size)
    lines += [
        "",
        "Work done only at a stall (median of 5, same model and batch), in milliseconds and in "
        "bare step-times:",
        "",
        "| work | ms | step-times |",
        "|---|---|---|",
    ]
    for name, seconds in components.items():
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {seconds / step:.2f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nWritten to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
