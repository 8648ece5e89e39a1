"""Is a minibatch's direction of descent the loss's? The probe's ``λ_min`` against other batches.

The curvature probe finds the smallest Hessian eigenvalue of the loss on one batch; on a small
batch that is partly an extreme of the batch's noise. This script trains plainly, stops at a few
steps, probes one batch (``A``, 20 Lanczos steps, as at a stall) and measures the curvature along
the probe's eigenvector on the next three batches (``B``, ``C``, ``D``) and, for the tables of
``benchmarks/healthy_runs.py``, on the whole training set. ``StallClassifier`` judges the
direction by ``A`` and ``B`` together (the larger of the two: ``descent``). The last columns give
the kind the curvature implies with ``A`` alone (a saddle below ``-0.01 λ_max``, as before the
second batch) and now: ``converged`` on a noise floor (at most 0.25 of the starting loss, unless
the direction holds below ``-0.1 λ_max`` on both), else a saddle below ``-0.01 λ_max`` on both.
The healthy runs are noisy moons at their floor; the stuck one is the attention pointer at step
300, where its stall is first called (its loss there is one batch's, against the first batch's).

    .venv/bin/python benchmarks/second_batch_curvature.py
    .venv/bin/python benchmarks/second_batch_curvature.py --out benchmarks/results/second_batch_curvature.md
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._report import emit, heading  # noqa: E402
from benchmarks.healthy_runs import SETUPS, Classifier, split  # noqa: E402
from benchmarks.problems import make_problem  # noqa: E402
from lightning_escape.probe import probe_curvature, probe_direction  # noqa: E402

SADDLE_TOL = 0.01  # StallClassifier's default
FLOOR_SADDLE = 10  # on a floor, a saddle needs ten times that
NOISE_FLOOR = 0.25  # StallClassifier's noise_floor_rel (these losses differ from batch to batch)


def _before(lambda_min: float, lambda_max: float) -> str:
    """The kind the curvature gave with one batch (these runs sit above the 1e-2 floor)."""
    return "saddle" if lambda_min < -SADDLE_TOL * abs(lambda_max) else "minimum"


def _now(descent: float, lambda_max: float, noise_floor: bool) -> str:
    """The kind it gives now: a noise floor unless a strong direction holds on both batches."""
    if noise_floor and not descent < -FLOOR_SADDLE * SADDLE_TOL * abs(lambda_max):
        return "converged"
    return "saddle" if descent < -SADDLE_TOL * abs(lambda_max) else "minimum"


def _row(
    name: str,
    seed: int,
    step: int,
    module: Any,
    loss_fn: Callable[[Any, Any], Tensor],
    batches: list[Any],
    start: float,
    whole: Any | None,
) -> str:
    a, *others = batches
    spectrum = probe_curvature(module, a, loss_fn=loss_fn, steps=20)
    along = [probe_direction(module, b, spectrum.eigvec_min, loss_fn=loss_fn)[0] for b in others]
    on_whole = (
        "-"
        if whole is None
        else f"{probe_direction(module, whole, spectrum.eigvec_min, loss_fn=loss_fn)[0]:+.3g}"
    )
    lmax, lmin = spectrum.lambda_max, spectrum.lambda_min
    with torch.no_grad():
        level = float(loss_fn(module, whole if whole is not None else a)) / start
    before = _before(lmin, lmax)
    now = _now(max(lmin, along[0]), lmax, noise_floor=level <= NOISE_FLOOR)
    return (
        f"| {name} | {seed} | {step} | {level:.3f} | {lmax:.3g} | {lmin:+.3g} "
        f"| {' / '.join(f'{x:+.3g}' for x in along)} | {on_whole} | {before} | {now} |"
    )


def _moons(setup: str, seed: int, stops: list[int]) -> list[str]:
    config = SETUPS[setup]
    (x, y), _ = split(config.data, seed)
    torch.manual_seed(seed)
    model = Classifier(x.shape[1], int(y.max()) + 1, config.opt, config.lr, 0.0, False)
    optimizer = model.configure_optimizers()
    order = torch.Generator().manual_seed(seed)

    def loss_fn(module: Any, batch: Any) -> Tensor:
        return nn.functional.cross_entropy(module.net(batch[0]), batch[1])

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            perm = torch.randperm(len(x), generator=order)
            for i in range(0, len(x) - config.batch + 1, config.batch):
                yield x[perm[i : i + config.batch]], y[perm[i : i + config.batch]]

    stream = batches()
    with torch.no_grad():
        start = float(loss_fn(model, (x, y)))
    rows, step = [], 0
    for stop in stops:
        while step < stop:
            loss = loss_fn(model, next(stream))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        held = [next(stream) for _ in range(4)]
        rows.append(_row(f"`{setup}`", seed, step, model, loss_fn, held, start, (x, y)))
    return rows


def _attention(seed: int, stop: int) -> str:
    problem = make_problem("attention_pointer", seed)
    optimizer = problem.configure_optimizers()
    stream = iter(problem.train_dataloader())

    def loss_fn(module: Any, batch: Any) -> Tensor:
        loss: Tensor = module.loss(batch)
        return loss

    start = None
    for _ in range(stop):
        loss = problem.loss(next(stream))
        start = float(loss.detach()) if start is None else start
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held = [next(stream) for _ in range(4)]
    assert start is not None
    return _row("`attention_pointer`", seed, stop, problem, loss_fn, held, start, None)


def main() -> int:
    """Measure every case; print the table, or write it to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    began = time.perf_counter()
    rows = []
    for setup in ("moons_adam", "moons_sgd"):
        for seed in (0, 1):
            rows += _moons(setup, seed, [1000, 2000, 3000])
            print(*rows[-3:], sep="\n", flush=True)
    for seed in (0, 1, 2):
        rows.append(_attention(seed, 300))
        print(rows[-1], flush=True)
    minutes = (time.perf_counter() - began) / 60
    text = "\n".join(
        [
            *heading(
                "A minibatch's direction of descent on other batches",
                f"`benchmarks/second_batch_curvature.py`, {minutes:.1f} min, one thread.",
                __doc__,
            ),
            "| run | seed | step | loss / start | λ_max | λ_min on A | along it on B / C / D "
            "| on the training set | kind, A alone | kind, A and B |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
