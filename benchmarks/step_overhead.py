"""Fixed per-step cost of lightning_escape's callbacks, beside Lightning's own per-step cost.

The model is deliberately tiny (MLP 64-128-128-10, ReLU, SGD, cross-entropy, batch 64, 4096
random examples whose labels come from a fixed random linear teacher, CPU, one thread), so the
arithmetic is small and what is measured is the fixed cost a callback adds to every optimizer step.

Configurations, run in one process and interleaved (the order rotates every repeat, after one
unrecorded round of short runs, since a process's first runs are slower), each on a fresh model
with the same seed and therefore the same batches:

- ``plain loop``: a plain PyTorch loop over the same DataLoader doing exactly what Lightning does
  with the batch: ``training_step`` (forward and loss), ``backward``, ``optimizer.step``,
  ``optimizer.zero_grad``;
- ``bare Lightning``: ``Trainer.fit`` with no callback of lightning_escape;
- one run per callback, each built with no arguments: ``GradientMonitor()``, ``StallDetector()``,
  ``EscapeCallback()`` (the watching callbacks) and ``GradientNoise()`` (it changes the gradients
  on every step, so it is reported on its own row and not held to the target). A callback the
  package no longer exports is skipped and named in the results;
- ``NormFloor``, a reference callback of this file that does only what every per-step gradient
  watcher must: one fused ``torch._foreach_norm`` of the gradients and an append. Its cost is the
  floor: the norm's own arithmetic, which on a CPU is work rather than overhead.

Every Lightning run has a ``TensorBoardLogger`` in a temporary folder and ``log_every_n_steps=50``,
so the callbacks' logging path is real and the bare run pays for the same logger; checkpointing,
the progress bar and the model summary are off. The module logs nothing itself, so Lightning's
figure is the framework's cost, not the cost of user logging.

Clock. By default every time is the CPU time of the calling thread (``time.thread_time``), not
wall time: on a shared machine other processes take the CPU away mid-step, which adds to wall times
at random and would swamp differences of a few microseconds, and the CPU time of the whole process
would charge a hook with what TensorBoard's writer thread does meanwhile. On the CPU nothing runs
asynchronously, so the CPU time the training thread spends is the cost. ``--clock cpu`` uses the
process's CPU time (``time.process_time``), ``--clock wall`` uses ``time.perf_counter`` (fine on an
idle machine).

Lightning's own per-step overhead. A step is the time from one batch start to the next: in
Lightning, a small timing callback placed first in ``callbacks`` reads the clock in
``on_train_batch_start``; in the plain loop, the clock is read at the top of each iteration. Both
intervals therefore hold the fetch of one batch from the same DataLoader, the forward, the
backward, the step and the zero_grad; Lightning's hold in addition everything the Trainer does
around them (hook dispatch, the closure, the batch transfer, progress tracking, the logger
connector). The first ``--warmup`` steps of a run are skipped and the last step (which holds the
end of training) is not timed; a run's figure is its median step, so epoch boundaries and the odd
garbage collection drop out. Lightning's overhead in a repeat is the bare run's median minus the
plain loop's median of the same repeat (paired, so slow drifts of the machine cancel), and the
reported figure is the median of that difference over repeats. The timing callback's one clock read
per step is counted in Lightning's figure (about half a microsecond with the CPU clock).

A callback's cost. Every hook method the callback's class overrides (found by comparing the
class's attributes with ``lightning.pytorch.Callback``'s methods, so nothing is named by hand) is
wrapped, on the instance, by an accumulator keyed by the step being timed. Hooks the callback
registers on torch objects are wrapped as well, as they are found at each batch start: the
optimizers' step pre- and post-hooks (also the global ones), the modules' forward and backward
hooks and the parameters' gradient hooks. In a callback's run the callback is the only one that
registers such hooks, so all of them are counted as its cost. Nested timed calls are counted once,
and each timed call is charged the clock reads' own cost less (measured at start-up around a call
that does nothing). Per run the benchmark takes the median over steps (the every-step path: most
steps neither log nor check) and the mean over steps (amortised, with the logging and checking
steps), then the median of each over repeats. The median is compared with Lightning's own per-step
overhead; the target is below 5% for each watching callback (PASS/FAIL in the table). Time a
callback makes Lightning spend outside the callback's hooks (for instance in the logger connector,
for what it logs) is not counted.

Run: ``python benchmarks/step_overhead.py`` (about a minute with the defaults on 2 CPUs; writes
``benchmarks/results/step_overhead.md``). Against another checkout of the package:
``PYTHONPATH=/path/to/checkout python benchmarks/step_overhead.py --out /tmp/step_overhead.md``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, MutableMapping
from datetime import date
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_escape

RESULTS = Path(__file__).resolve().parent / "results"
WATCHING = ("GradientMonitor", "StallDetector", "EscapeCallback")
OTHER = ("GradientNoise",)
TARGET = 0.05  # of Lightning's own per-step overhead
PLAIN, BARE = "plain loop", "bare Lightning"
FLOOR = "NormFloor"  # a reference callback: the least any per-step gradient watcher does
CLOCKS: dict[str, Callable[[], float]] = {
    "thread": time.thread_time,
    "cpu": time.process_time,
    "wall": time.perf_counter,
}
CLOCK_NAMES = {
    "thread": "CPU time of the training thread (`time.thread_time`)",
    "cpu": "CPU time of the process (`time.process_time`)",
    "wall": "wall time (`time.perf_counter`)",
}


class MLP(pl.LightningModule):
    """64 -> 128 -> 128 -> 10, ReLU, SGD; labels from a fixed random linear teacher."""

    def __init__(self, n: int = 4096, batch_size: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 64, generator=g)
        # Learnable labels, so the loss keeps falling and no stall is declared in these runs.
        self.y = (self.x @ torch.randn(64, 10, generator=g)).argmax(dim=1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True)


class Accumulator:
    """Time spent in wrapped callables, per step; nested wrapped calls are counted once."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.step: int | None = None  # the step being timed; None before the first batch
        self.per_step: dict[int, float] = {}
        self.calls: dict[int, int] = {}
        self.depth = 0
        self.wrapped: dict[str, int] = {}  # what was wrapped, for the report
        self._parts: tuple[list[nn.Module], list[nn.Parameter]] | None = None
        self.bias = self._calibrate()

    def wrap(self, fn: Callable[..., Any], label: str | None) -> Callable[..., Any]:
        clock = self.clock

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = clock() - start
                self.depth -= 1
                step = self.step
                if step is not None:
                    self.per_step[step] = self.per_step.get(step, 0.0) + elapsed
                    self.calls[step] = self.calls.get(step, 0) + 1

        timed.__wrapped_by_benchmark__ = True  # type: ignore[attr-defined]
        if label is not None:
            self.wrapped[label] = self.wrapped.get(label, 0) + 1
        return timed

    def _calibrate(self, n: int = 2000) -> float:
        """Time the wrapper measures around a call that does nothing (the clock reads' own cost)."""
        noop = self.wrap(lambda: None, None)
        means = []
        for _ in range(5):
            self.per_step, self.step = {}, 0
            for _ in range(n):
                noop()
            means.append(self.per_step[0] / n)
        self.per_step, self.calls, self.step = {}, {}, None
        return min(means)

    def cost(self, step: int) -> float:
        """Time in the hooks at ``step``, less the clock reads' cost of each timed call."""
        return max(0.0, self.per_step.get(step, 0.0) - self.bias * self.calls.get(step, 0))

    def wrap_hooks(self, callback: pl.Callback) -> None:
        """Wrap, on the instance, every Lightning hook that the callback's class overrides."""
        for name in dir(pl.Callback):
            base = getattr(pl.Callback, name)
            if name.startswith("_") or not callable(base):
                continue
            own = getattr(type(callback), name, None)
            if own is None or own is base:
                continue
            setattr(callback, name, self.wrap(getattr(callback, name), name))

    def wrap_dict(self, hooks: MutableMapping[Any, Any] | None, label: str) -> None:
        """Wrap, in place, the hooks of a torch hook dict not wrapped yet."""
        if not hooks:
            return
        for key, fn in list(hooks.items()):
            if not getattr(fn, "__wrapped_by_benchmark__", False):
                hooks[key] = self.wrap(fn, label)

    def wrap_torch_hooks(self, trainer: pl.Trainer, module: nn.Module) -> None:
        """Wrap the optimizer, module and parameter hooks registered so far."""
        from torch.optim import optimizer as optim_module

        for opt in trainer.optimizers:
            self.wrap_dict(getattr(opt, "_optimizer_step_pre_hooks", None), "optimizer pre-hook")
            self.wrap_dict(getattr(opt, "_optimizer_step_post_hooks", None), "optimizer post-hook")
        for attr in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"):
            self.wrap_dict(getattr(optim_module, attr, None), f"global {attr}")
        if self._parts is None:
            self._parts = (list(module.modules()), list(module.parameters()))
        modules, params = self._parts
        for m in modules:
            for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks"):
                self.wrap_dict(getattr(m, attr, None), f"module {attr}")
            self.wrap_dict(getattr(m, "_backward_hooks", None), "module _backward_hooks")
        for p in params:
            self.wrap_dict(getattr(p, "_backward_hooks", None), "parameter grad hook")
            self.wrap_dict(getattr(p, "_post_accumulate_grad_hooks", None), "post-accumulate hook")


class NormFloor(pl.Callback):
    """The floor of a per-step gradient watcher: one fused norm of the gradients and an append.

    Not part of the package: it shows how much of a callback's cost is the norm's arithmetic itself,
    which no implementation that reads the gradient every step can avoid.
    """

    def __init__(self) -> None:
        self.norms: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(torch._foreach_norm(grads, 2, dtype=torch.float32))
        if len(self.norms) == 10:
            self.norms = []  # what a check would read back


class StepTimer(pl.Callback):
    """First in ``callbacks``: marks each batch start and tells the accumulator which step runs."""

    def __init__(self, acc: Accumulator | None, clock: Callable[[], float]) -> None:
        self.starts: list[float] = []
        self.acc = acc
        self.clock = clock

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.acc is not None:
            self.acc.step = len(self.starts)
            self.acc.wrap_torch_hooks(trainer, pl_module)
        self.starts.append(self.clock())


def timed_window(starts: list[float], warmup: int, steps: int) -> list[float]:
    """Durations of steps ``warmup .. warmup + steps - 1`` from their start times."""
    times = [b - a for a, b in itertools.pairwise(starts)]
    return times[warmup : warmup + steps]


def run_plain(steps: int, warmup: int, clock: Callable[[], float]) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model = MLP()
    model.train()
    opt = model.configure_optimizers()
    loader = model.train_dataloader()
    starts: list[float] = []
    total = steps + warmup + 1
    while len(starts) < total:
        for i, batch in enumerate(loader):
            starts.append(clock())
            if len(starts) == total:
                break
            loss = model.training_step(batch, i)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return {"median": statistics.median(timed_window(starts, warmup, steps))}


def run_lightning(
    name: str, steps: int, warmup: int, logdir: str, clock: Callable[[], float]
) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model = MLP()
    extra: list[pl.Callback] = []
    acc = None
    if name != BARE:
        acc = Accumulator(clock)
        callback = NormFloor() if name == FLOOR else getattr(lightning_escape, name)()
        acc.wrap_hooks(callback)
        extra.append(callback)
    timer = StepTimer(acc, clock)
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
    result: dict[str, Any] = {
        "median": statistics.median(timed_window(timer.starts, warmup, steps))
    }
    if acc is not None:
        hooks = [acc.cost(k) for k in range(warmup, warmup + steps)]
        result["hook_median"] = statistics.median(hooks)
        result["hook_mean"] = statistics.fmean(hooks)
        result["stalls"] = float(len(getattr(extra[0], "diagnoses", []) or []))
        result["bias"] = acc.bias
        result["wrapped"] = ", ".join(f"{k}×{v}" if v > 1 else k for k, v in acc.wrapped.items())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=500, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="thread",
        help="cpu: the process's CPU time (default; robust to other processes on a shared "
        "machine); wall: perf_counter",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "step_overhead.md")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    print(f"lightning_escape from {lightning_escape.__file__}", flush=True)

    callbacks = [n for n in (*WATCHING, *OTHER) if hasattr(lightning_escape, n)]
    missing = [n for n in (*WATCHING, *OTHER) if n not in callbacks]
    names = [PLAIN, BARE, FLOOR, *callbacks]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as logdir:
        # A round that is not recorded: the first runs of a process are slower (allocator, caches).
        for name in names:
            if name == PLAIN:
                run_plain(min(args.steps, 100), args.warmup, clock)
            else:
                run_lightning(name, min(args.steps, 100), args.warmup, logdir, clock)
        for r in range(args.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                if name == PLAIN:
                    result: dict[str, Any] = run_plain(args.steps, args.warmup, clock)
                else:
                    result = run_lightning(name, args.steps, args.warmup, logdir, clock)
                runs[name].append(result)
                extra = ""
                if "hook_median" in result:
                    extra = (
                        f", in hooks {result['hook_median'] * 1e6:.1f} µs median, "
                        f"{result['hook_mean'] * 1e6:.1f} µs mean"
                    )
                print(f"repeat {r} {name}: {result['median'] * 1e6:.0f} µs/step{extra}", flush=True)
    elapsed = time.perf_counter() - started

    plain = [r["median"] for r in runs[PLAIN]]
    bare = [r["median"] for r in runs[BARE]]
    diffs = [b - p for b, p in zip(bare, plain)]
    overhead = statistics.median(diffs)
    lines = [
        "# Per-step overhead of the callbacks",
        "",
        f"Measured {date.today().isoformat()} with `benchmarks/step_overhead.py --repeats "
        f"{args.repeats} --steps {args.steps} --warmup {args.warmup} --clock {args.clock}` in "
        f"{elapsed:.0f} s; package `{Path(lightning_escape.__file__).parent}`.",
        "",
        f"MLP 64-128-128-10 (ReLU), SGD, cross-entropy, batch 64, 4096 examples, CPU, 1 thread; "
        f"torch {torch.__version__}, lightning {pl.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.platform()}). TensorBoardLogger, "
        "log_every_n_steps=50, in every Lightning run. Medians over repeats of per-run figures; "
        "runs interleaved. "
        f"Clock: {CLOCK_NAMES[args.clock]}.",
        "",
        f"- plain PyTorch loop: {statistics.median(plain) * 1e6:.1f} µs per step",
        f"- bare Lightning `Trainer.fit`: {statistics.median(bare) * 1e6:.1f} µs per step",
        f"- **Lightning's own per-step overhead: {overhead * 1e6:.1f} µs** (bare minus plain, "
        f"paired per repeat; range {min(diffs) * 1e6:.1f}..{max(diffs) * 1e6:.1f} µs)",
        "",
        "Callback cost = time inside the callback's own hooks per step. Median: the every-step "
        "path; mean: amortised over the logging and checking steps. Target: median below "
        f"{TARGET:.0%} of Lightning's own per-step overhead, for the watching callbacks.",
        "",
        "| callback | median µs/step (min..max over repeats) | mean µs/step "
        "| median % of Lightning's overhead | target |",
        "|---|---|---|---|---|",
    ]
    for name in (FLOOR, *callbacks):
        rs = runs[name]
        meds = [r["hook_median"] for r in rs]
        med = statistics.median(meds)
        mean = statistics.median(r["hook_mean"] for r in rs)
        share = med / overhead if overhead > 0 else float("inf")
        verdict = ("PASS" if share < TARGET else "FAIL") if name in WATCHING else "n/a"
        stalls = sum(r["stalls"] for r in rs)
        label = f"{name}()" + (f" ({stalls:.0f} stalls declared)" if stalls else "")
        if name == FLOOR:
            label = "reference: one fused norm of the gradients + an append (the floor)"
        lines.append(
            f"| {label} | {med * 1e6:.1f} ({min(meds) * 1e6:.1f}..{max(meds) * 1e6:.1f}) "
            f"| {mean * 1e6:.1f} | {share * 100:.2f}% | {verdict} |"
        )
    if callbacks:
        bias = statistics.median(r["bias"] for name in callbacks for r in runs[name])
        lines += [
            "",
            f"Each timed hook call is charged {bias * 1e6:.2f} µs less, the clock reads' own cost "
            "(measured around a call that does nothing). Hooks wrapped:",
            "",
            *(f"- {name}(): {runs[name][-1]['wrapped']}" for name in callbacks),
        ]
    if missing:
        lines += ["", f"Not in the package (skipped): {', '.join(missing)}."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
