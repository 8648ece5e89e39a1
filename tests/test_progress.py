"""Is the run still moving? The drift meter, its reference, the rule, and the detector's hold-off."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

from benchmarks.problems import train_plain
from lightning_escape import EscapeCallback, StallClassifier, StallDetector
from lightning_escape.progress import DriftMeter, Motion, MotionRule, reference_motion
from tests.models import fit


def _walk(steps: int, move: Any, dims: tuple[int, ...] = (4, 3)) -> list[list[Tensor]]:
    """Parameters (two tensors) after each of ``steps`` moves made by ``move(i, params)``."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(*dims, generator=generator), torch.randn(dims[0], generator=generator)]
    out = []
    for i in range(steps):
        move(i, params, generator)
        out.append([p.clone() for p in params])
    return out


def _motions(snapshots: list[list[Tensor]], window: int) -> list[Motion]:
    meter, params, motions = DriftMeter(window=window), None, []
    for i, snapshot in enumerate(snapshots):
        if params is None:
            params = [p.clone() for p in snapshot]
        for p, s in zip(params, snapshot):
            p.copy_(s)  # the same tensors every time, as a module's parameters
        motion = meter.sample(i, params)
        if motion is not None:
            motions.append(motion)
    return motions


def _steady(i: int, params: list[Tensor], g: torch.Generator) -> None:
    params[0] += 0.01


def _random_walk(i: int, params: list[Tensor], g: torch.Generator) -> None:
    for p in params:
        p += 0.01 * torch.randn(p.shape, generator=g)


def _settling(i: int, params: list[Tensor], g: torch.Generator) -> None:
    params[0] *= 0.95  # geometric convergence to a point (the origin)


def _rattling(i: int, params: list[Tensor], g: torch.Generator) -> None:
    params[1] += 0.05 * (-1) ** (i // 10)  # back and forth across a basin, one window each way


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_fused_meter_agrees_with_the_reference(dtype: torch.dtype) -> None:
    snapshots = [[p.to(dtype) for p in s] for s in _walk(31, _random_walk)]
    motions = _motions(snapshots, window=10)
    assert [m.step for m in motions] == [20, 30]
    for m in motions:
        ref = reference_motion(
            m.step,
            10,
            snapshots[m.step - 20],
            snapshots[m.step - 10],
            snapshots[m.step],
            scale0=math.sqrt(sum(float(p.double().square().sum()) for p in snapshots[0])),
        )
        for name in ("displacement", "previous", "span", "scale", "speed", "trend", "drift"):
            assert getattr(m, name) == pytest.approx(getattr(ref, name), rel=1e-6), name
        # The law of cosines loses digits to cancellation; the explicit dot product does not.
        assert m.agreement == pytest.approx(ref.agreement, abs=1e-4)


@pytest.mark.parametrize(
    ("move", "moving", "check"),
    [
        (_steady, True, lambda m: m.agreement > 0.99 and m.trend == pytest.approx(1.0)),
        # Uncorrelated windows: whether a walk this fast counts as moving depends on its trend.
        (_random_walk, None, lambda m: abs(m.agreement) < 0.6),
        (_settling, False, lambda m: m.trend < 0.7 and m.agreement > 0.99),
        (_rattling, False, lambda m: m.agreement < -0.9),
    ],
    ids=["steady", "random_walk", "settling", "rattling"],
)
def test_the_rule_tells_a_run_on_its_way_from_a_stuck_one(
    move: Any, moving: bool, check: Any
) -> None:
    motions = _motions(_walk(61, move), window=10)
    assert len(motions) == 5
    assert all(check(m) for m in motions)
    if moving is not None:
        assert [MotionRule().moving(m) for m in motions] == [moving] * 5


def test_between_window_ends_the_meter_does_no_tensor_work() -> None:
    class Recorder(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            name = getattr(func, "__name__", str(func))
            if name != "__get__":  # attribute reads (`shape`), not tensor work
                self.calls.append(name)
            return func(*args, **(kwargs or {}))

    params = [torch.randn(5, 5), torch.randn(5)]
    meter = DriftMeter(window=4)
    meter.sample(0, params)
    recorder = Recorder()
    with recorder:
        for i in range(1, 4):
            assert meter.sample(i, params) is None
    assert recorder.calls == []  # only a counter moves between window ends


def test_a_new_parameter_set_starts_the_meter_over() -> None:
    meter = DriftMeter(window=2)
    a = [torch.zeros(3)]
    for i in range(5):
        a[0] += 1.0
        meter.sample(i, a)
    assert meter.last is not None and meter.holding
    b = [torch.zeros(4)]  # unfrozen layers, a new model: not a move of the old parameters
    assert meter.sample(5, b) is None
    # Nor is the old parameters' last motion evidence about the new set (a stall diagnosed before
    # the new set's first two windows close carries no motion).
    assert meter.last is None
    assert meter.sample(6, b) is None and meter.sample(7, b) is None
    meter.forget()
    assert meter.last is None and not meter.holding


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_speed": -1.0}, "`min_speed`"),
        ({"min_trend": math.nan}, "`min_trend`"),
        ({"min_agreement": 2.0}, "`min_agreement`"),
    ],
)
def test_bad_rules_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MotionRule(**kwargs)
    with pytest.raises(ValueError, match="`window` must be"):
        DriftMeter(window=0)
    with pytest.raises(ValueError, match="`motion` must be a MotionRule or None"):
        StallClassifier(motion=0.02)  # type: ignore[arg-type]


class HiddenProgress(LightningModule):
    """A flat reported loss over parameters that move steadily: progress the loss does not show.

    The loss returned to Lightning reads 1.0 at every step while its gradient is a fixed direction,
    so plain SGD moves the weights by the same step every step (as sparse parity's hidden features
    grow under a flat loss).
    """

    def __init__(self, rate: float = 1e-3) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(16) / 4)  # norm 1
        self.rate = rate

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        pull = self.w.sum() * self.rate
        return 1.0 + pull - pull.detach()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(list(range(8)), batch_size=1)


def _detector(**classifier: Any) -> StallDetector:
    return StallDetector(
        patience=40,
        warmup_steps=0,
        check_every_n_steps=5,
        gradients=False,
        classifier=StallClassifier(probe=False, **classifier),
    )


def test_a_flat_loss_over_a_moving_run_is_held_off_not_diagnosed() -> None:
    held = _detector()
    fit(HiddenProgress(), [held], max_steps=300)
    assert held.diagnoses == []
    [(step, motion)] = held.held_off  # one stall episode, held off once
    assert step >= 40 and motion.speed > 0.02 and motion.trend == pytest.approx(1.0, abs=0.01)
    assert "held off" in held.summary_text()

    # The same run without the motion rule is a plateau, with the motion numbers as evidence.
    blind = _detector(motion=None)
    fit(HiddenProgress(), [blind], max_steps=300)
    assert [d.kind for d in blind.diagnoses] == ["plateau"]
    assert blind.held_off == []


def test_a_slow_crawl_is_not_progress_enough() -> None:
    # The same steady direction at a hundredth of the speed: a small-init plateau's crawl.
    detector = _detector()
    fit(HiddenProgress(rate=1e-5), [detector], max_steps=300)
    assert [d.kind for d in detector.diagnoses] == ["plateau"]
    evidence = detector.diagnoses[0].evidence
    assert 0 < float(evidence["speed"]) < 0.02 and float(evidence["agreement"]) > 0.99
    reason, step = detector.diagnoses[0].reason, evidence["motion_step"]
    assert f"of their norm in the {evidence['motion_steps']} steps to step {step}" in reason


def test_an_escape_restarts_the_motion_window_and_a_trial_holds_no_anchors() -> None:
    class Watch(Callback):
        def __init__(self, escape: EscapeCallback) -> None:
            self.escape = escape
            self.seen: list[tuple[int, bool, bool, Motion | None]] = []

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            meter = self.escape.detector.motion
            trial = self.escape.engine.trial is not None
            self.seen.append((trainer.global_step - 1, trial, meter.holding, meter.last))

    escape = EscapeCallback(_detector(motion=MotionRule(min_speed=10.0)), probation_steps=20)
    watch = Watch(escape)
    fit(HiddenProgress(rate=1e-5), [escape, watch], max_steps=300)
    assert escape.events, "the crawl is a stall: something is escaped"
    # On probation the meter holds no copy of the parameters (the trial holds a snapshot).
    assert all(not holding for _, trial, holding, _ in watch.seen if trial)
    # A window never spans an escape's jump or a rollback: each starts after the last of them.
    jumps = [e.step for e in escape.events] + [e.end_step for e in escape.events if e.end_step]
    motions = {m.step: m for *_, m in watch.seen if m is not None}
    after = [m for m in motions.values() if m.step > jumps[0]]
    assert after, "motion is measured again after the trial"
    for m in after:
        start = m.step - 2 * m.steps
        assert not any(start < j < m.step for j in jumps), (m, jumps)


def test_a_diagnosis_never_reports_the_motion_of_a_run_before_its_last_escape() -> None:
    # Matrix factorisation: a saddle at step 339, escaped by a negative-curvature step and kept at
    # 539; the run then converges and is diagnosed so at 709, before the meter has closed two
    # windows after the escape. The motion measured up to step 309 describes another run.
    escape = EscapeCallback()
    train_plain("matrix_factorization", max_steps=800, seed=0, callbacks=[escape])
    jumps = sorted(
        {e.step for e in escape.events} | {e.end_step for e in escape.events if e.end_step}
    )
    later = [d for d in escape.diagnoses if d.step > jumps[0]]
    assert later, "a stall is diagnosed after the escape"
    for d in later:
        if "motion_step" not in d.evidence:
            assert "the parameters moved" not in d.reason, d.reason
            continue
        last_jump = max(j for j in jumps if j <= d.step)
        assert int(d.evidence["motion_step"]) > last_jump, (d.step, d.evidence, jumps)
        assert f"to step {d.evidence['motion_step']}" in d.reason, d.reason


@pytest.mark.parametrize(
    ("speed", "trend", "agreement", "words"),
    [
        (0.0, math.nan, math.nan, "the parameters did not move in the 3 steps to step 5"),
        (0.01, math.nan, math.nan, "of their norm in the 3 steps to step 5 (the window before did"),
        (0.01, 0.5, -0.25, "(0.5x the window before, at cosine -0.25 to it)"),
    ],
    ids=["still", "after-a-still-window", "moving"],
)
def test_the_motion_sentence_never_shows_nan(
    speed: float, trend: float, agreement: float, words: str
) -> None:
    # Weights whose updates round away (bf16-true) do not move at all: no ratio, no cosine.
    from lightning_escape.detectors import StallTracker

    tracker = StallTracker(patience=3, warmup_steps=0, smoothing=0.0)
    for step in range(6):
        tracker.update(step, 2.0, 1e-3)
    motion = Motion(step=5, steps=3, displacement=speed, previous=speed / trend if trend else 0.0,
                    span=speed, scale=1.0, speed=speed, trend=trend, agreement=agreement,
                    drift=1.0)  # fmt: skip
    reason = StallClassifier().classify(tracker.status(), motion=motion).reason
    assert words in reason and "nan" not in reason, reason
