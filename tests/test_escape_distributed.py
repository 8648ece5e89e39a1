"""EscapeCallback under 2-process DDP, and resumed from checkpoints taken mid-probation or mid-kick."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from models import Net, digest, fit

from lightning_escape import (
    BatchSizeChange,
    EscapeCallback,
    GradientNoise,
    LRKick,
    NegativeCurvatureStep,
    Perturb,
    StallDetector,
)
from lightning_escape.demos.problems import DeepLinear, StrictSaddle2D
from lightning_escape.policy import ESCAPABLE


class RankReport(EscapeCallback):
    def __init__(self, out: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        report = {
            "digest": digest(pl_module),
            "checksum": float(sum(p.double().sum() for p in pl_module.parameters())),
            "events": [
                {k: v for k, v in e.to_dict().items() if k != "reason"} for e in self.events
            ],
            "evidence": [d.evidence for d in self.diagnoses],
        }
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


@pytest.mark.ddp
@pytest.mark.parametrize("keep_neutral", [True, False])
def test_ddp_replicas_stay_identical_through_escapes(tmp_path: Path, keep_neutral: bool) -> None:
    ladder = [GradientNoise(eta=0.1, steps=8), Perturb(radius=0.3), NegativeCurvatureStep()]
    escape = RankReport(
        str(tmp_path),
        # Every check is a stall: escapes fire all run long.
        detector=StallDetector(
            patience=5, warmup_steps=0, check_every_n_steps=5, min_delta_rel=0.9
        ),
        probation_steps=10,
        max_failures=10,
        ladders={kind: ladder for kind in ESCAPABLE},
        keep_neutral=keep_neutral,
    )
    # The DistributedSampler gives each rank different batches, so losses differ per rank.
    fit(Net(n=64, batch_size=8), [escape], max_steps=60, strategy="ddp_spawn", devices=2)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    actions = {e["action"].split("(")[0] for e in r0["events"]}
    assert {"GradientNoise", "Perturb"} <= actions
    # The run improves under every trial, short of the 90% asked: each is kept as neutral (it
    # earns more probation), or, without `keep_neutral`, rolled back; one due at the last step
    # has no step left to earn and is rolled back; on both processes alike.
    verdicts = {e["verdict"] for e in r0["events"] if e["end_step"] < 59}
    assert verdicts == ({"neutral"} if keep_neutral else {"rolled_back"})
    assert {e["verdict"] for e in r0["events"] if e["end_step"] == 59} <= {"rolled_back"}
    assert r0["events"] == r1["events"]
    # Each process probed its own batches; the curvature, on the probe's batch and on the one
    # before, is averaged over both: the same evidence everywhere.
    assert any("lambda_min_other" in e for e in r0["evidence"])
    assert r0["evidence"] == r1["evidence"]
    assert r0["digest"] == r1["digest"]  # bit for bit
    assert r0["checksum"] == r1["checksum"]


def _resume_pair(
    tmp_path: Path, make: Any, callback: Any, steps: int, pick: Any, **trainer_kwargs: Any
) -> tuple[EscapeCallback, EscapeCallback, Any, Any]:
    full = callback()
    model_a = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    fit(model_a, [full, ckpt], max_steps=steps, enable_checkpointing=True, **trainer_kwargs)
    path = pick(tmp_path, full)
    resumed = callback()
    model_b = make()
    fit(model_b, [resumed], max_steps=steps, ckpt_path=str(path), **trainer_kwargs)
    return full, resumed, model_a, model_b


def _checkpoint_inside(tmp_path: Path, start: int, end: int) -> Path:
    for path in sorted(tmp_path.glob("*.ckpt")):
        step = int(path.stem.split("step=")[1])
        if start < step < end:
            return path
    raise AssertionError(f"no checkpoint between steps {start} and {end}")


def test_resume_mid_probation_repeats_the_run(tmp_path: Path) -> None:
    def callback() -> EscapeCallback:
        detector = StallDetector(patience=40, warmup_steps=40, check_every_n_steps=10)
        return EscapeCallback(detector, probation_steps=60)

    def pick(tmp: Path, full: EscapeCallback) -> Path:
        first = full.events[0]
        path = _checkpoint_inside(tmp, first.step + 1, first.end_step)
        state = torch.load(path, weights_only=True)["callbacks"][full.state_key]
        assert state["engine"]["trial"] is not None  # the checkpoint holds a trial on probation
        return path

    full, resumed, a, b = _resume_pair(
        tmp_path, lambda: DeepLinear(steps_per_epoch=25), callback, 400, pick
    )
    assert full.events and resumed.events == full.events
    assert resumed.diagnoses == full.diagnoses
    assert digest(a) == digest(b)


def test_resume_mid_kick_repeats_the_run(tmp_path: Path) -> None:
    ladder = [LRKick(factor=3.0, steps=30), GradientNoise(eta=1e-4, steps=30)]

    def callback() -> EscapeCallback:
        return EscapeCallback(
            StallDetector(patience=20, warmup_steps=0, check_every_n_steps=5),
            probation_steps=40,
            max_escapes=3,
            ladders={k: ladder for k in ESCAPABLE},
        )

    def pick(tmp: Path, full: EscapeCallback) -> Path:
        kick = next(e for e in full.events if e.action.startswith("LRKick"))
        return _checkpoint_inside(tmp, kick.step + 1, kick.step + 30)

    full, resumed, a, b = _resume_pair(
        tmp_path, lambda: StrictSaddle2D(lr=0.02, steps_per_epoch=10), callback, 400, pick
    )
    assert any(e.action.startswith("LRKick") for e in full.events)
    assert resumed.events == full.events
    assert digest(a) == digest(b)


class Accumulation(Callback):
    """The accumulation count in force at each optimizer step."""

    def __init__(self) -> None:
        self.by_step: dict[int, int] = {}

    def on_before_optimizer_step(self, trainer: Any, *args: Any) -> None:
        self.by_step[trainer.global_step] = trainer.accumulate_grad_batches


def test_resume_mid_batch_size_change_keeps_the_changed_accumulation(tmp_path: Path) -> None:
    # accumulate_grad_batches is the Trainer's, not in the checkpoint: the escape sets it again,
    # so the resumed run steps with the accumulation the uninterrupted run used at every step.
    ladder = [BatchSizeChange(factor=2.0, steps=40, method="accumulation")]

    def run(ckpt_path: str | None = None) -> tuple[EscapeCallback, Accumulation]:
        escape = EscapeCallback(
            StallDetector(patience=12, warmup_steps=0, check_every_n_steps=4, min_delta_rel=0.9),
            probation_steps=40,
            max_escapes=1,
            ladders={k: ladder for k in ESCAPABLE},
        )
        seen = Accumulation()
        callbacks: list[Any] = [escape, seen]
        if ckpt_path is None:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1))
        fit(
            Net(n=64, batch_size=8),
            callbacks,
            max_steps=80,
            enable_checkpointing=ckpt_path is None,
            accumulate_grad_batches=2,
            ckpt_path=ckpt_path,
        )
        return escape, seen

    full, full_seen = run()
    event = full.events[0]
    path = _checkpoint_inside(tmp_path, event.step + 6, event.step + 40)
    state = torch.load(path, weights_only=True)["callbacks"][full.state_key]
    assert state["engine"]["trial"]["step"]["applied"] == 4  # the change is in force there
    resumed, resumed_seen = run(str(path))
    assert resumed_seen.by_step  # the resumed run stepped
    assert {s: full_seen.by_step[s] for s in resumed_seen.by_step} == resumed_seen.by_step
    assert 4 in resumed_seen.by_step.values() and 2 in resumed_seen.by_step.values()
    assert [(e.step, e.action) for e in resumed.events] == [(e.step, e.action) for e in full.events]
