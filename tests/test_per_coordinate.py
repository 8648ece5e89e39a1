from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from models import (
    RESUMES_AFTER_THE_BATCH,
    Digests,
    Net,
    fit,
    fit_two_ranks,
    forcing_detector,
)
from torch import nn

from lightning_escape import EscapeCallback, PerCoordinateSteps
from lightning_escape.coordinates import (
    rescale_gradients,
    rescaling,
    scale_spread,
    sgd_gain,
    start_rescaling,
)
from lightning_escape.escapes import EscapeContext
from lightning_escape.policy import ESCAPABLE, EscapePolicy, default_ladders


def _reference(
    grads: list[list[torch.Tensor]], scales: list[float], decay: float, eps: float
) -> list[list[torch.Tensor]]:
    """Plain per-tensor loop in float64: RMSprop's bias-corrected mean square, finite steps only."""
    squares = [torch.zeros_like(g, dtype=torch.float64) for g in grads[0]]
    count = 0
    out = []
    for step in grads:
        finite = all(bool(torch.isfinite(g).all()) for g in step)
        if finite:
            count += 1
            for s, g in zip(squares, step):
                s.mul_(decay).add_(g.double() ** 2 * (1 - decay))
        rescaled = []
        for s, g, scale in zip(squares, step, scales):
            root = (s / (1 - decay**count)).sqrt() if count else s * math.nan
            rescaled.append(g.double() / (root + eps) * scale)
        out.append(rescaled)
    return out


@pytest.mark.parametrize("skippable", [True, False])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_the_fused_rescaling_agrees_with_a_per_tensor_loop(
    dtype: torch.dtype, rtol: float, skippable: bool
) -> None:
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in [(5, 3), (3,), (2, 2, 2)]]
    optimizer = torch.optim.SGD(
        [{"params": params[:2], "lr": 0.1, "momentum": 0.9}, {"params": params[2:], "lr": 0.02}]
    )
    start_rescaling(optimizer, step_size=3e-3, decay=0.9, eps=1e-8)
    # Gradients whose coordinates span decades; under a scaler, step 3 is non-finite (skipped).
    steps = []
    for i in range(8):
        step = [
            torch.randn(p.shape, generator=g, dtype=dtype) * 10.0 ** (-3 * j)
            for j, p in enumerate(params)
        ]
        if i == 3 and skippable:
            step[1][0] = math.inf
        steps.append(step)
    expected = _reference(steps, [3e-3 / 0.1 / 10, 3e-3 / 0.1 / 10, 3e-3 / 0.02], 0.9, 1e-8)
    for i, (step, want) in enumerate(zip(steps, expected)):
        for p, grad in zip(params, step):
            p.grad = grad.clone()
        rescale_gradients(optimizer, skippable=skippable)
        if i == 3 and skippable:
            continue  # non-finite: the scaler skips this step; only the average must not change
        for p, w in zip(params, want):
            assert p.grad is not None
            torch.testing.assert_close(p.grad.double(), w, rtol=rtol, atol=0.0)
    # A skipped step leaves the count at 7 of 8.
    counted = 7.0 if skippable else 8.0
    assert [float(optimizer.state[p]["escape_steps"]) for p in params] == [counted] * 3


def test_sgd_with_momentum_moves_each_coordinate_about_step_size() -> None:
    weight = nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    start_rescaling(optimizer, step_size=2e-3, decay=0.999, eps=1e-8)
    steady = torch.tensor([3.0, 1e-2, -1e-4, 1e-6])  # six decades apart, all above eps
    for _ in range(200):
        weight.grad = steady.clone()
        rescale_gradients(optimizer)
        optimizer.step()
    before = weight.detach().clone()
    weight.grad = steady.clone()
    rescale_gradients(optimizer)
    optimizer.step()
    moved = (weight.detach() - before).abs()
    torch.testing.assert_close(moved, torch.full((4,), 2e-3), rtol=0.02, atol=0.0)


def test_the_gain_of_each_sgd_setting() -> None:
    assert sgd_gain({"momentum": 0.0}) == 1.0
    assert sgd_gain({"momentum": 0.9, "dampening": 0.5}) == pytest.approx(5.0)
    assert sgd_gain({"momentum": 0.9, "nesterov": True}) == pytest.approx(10.0)


def test_the_spread_is_of_the_gradients_rms_over_nonzero_tensors() -> None:
    grads = [
        ("a", torch.full((3, 3), 2e-3)),
        ("b", torch.zeros(2, 2)),
        ("c", torch.full((5,), -4.0)),
    ]
    found = scale_spread(grads)
    assert found is not None and (found.smallest_name, found.largest_name) == ("a", "c")
    assert (found.spread, found.smallest, found.largest) == pytest.approx((2000.0, 2e-3, 4.0))
    assert scale_spread([("a", torch.ones(3)), ("b", torch.zeros(3))]) is None


def _stalled(optimizer: str = "sgd", small: float = 1e-4) -> EscapeContext:
    """Two linear layers; the first one's gradient ``small`` times the second one's."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    for p, scale in zip(model.parameters(), [small, small, 1.0, 1.0]):
        p.grad = torch.full_like(p, scale)
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters())
    )
    return EscapeContext(model, [opt], step=100)


def test_available_only_under_sgd_on_decades_apart_scales_with_time_to_judge_it() -> None:
    step = PerCoordinateSteps()
    assert step.unavailable(_stalled()) is None
    assert step.unavailable(_stalled("adam")) == (
        "per-coordinate step sizes are for SGD; Adam sets its own"
    )
    assert step.unavailable(_stalled(small=0.02)) == (
        "the weights' gradient scales span only 50x, from 0.weight's 0.02 to 1.weight's 1, "
        "below min_spread=100.0"
    )
    one = EscapeContext(nn.Linear(4, 1), [torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)])
    one.module.weight.grad = torch.ones(1, 4)  # type: ignore[union-attr]
    assert "fewer than two weight tensors" in str(step.unavailable(one))
    late = _stalled()
    late.last_step = 899
    assert step.unavailable(late) == (
        "its probation of 800 steps would end after step 899, the last a verdict can be given at"
    )
    half = _stalled()
    half.module.half()
    assert "torch.float16" in str(step.unavailable(half))
    scaled = _stalled()
    scaled.grad_scale = lambda opt: torch.tensor(65536.0)
    assert "AMP loss scale" in str(step.unavailable(scaled))
    on = _stalled()
    step.apply(on)
    assert step.unavailable(on) == "per-coordinate step sizes are on already"


def test_a_frozen_group_is_left_alone() -> None:
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.0}])
    assert start_rescaling(optimizer, 1e-3, 0.999, 1e-8) == 1
    a.grad, b.grad = torch.ones(3), torch.full((3,), 5.0)
    rescale_gradients(optimizer)
    assert torch.equal(b.grad, torch.full((3,), 5.0)) and b not in optimizer.state


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step_size": 0.0}, "`step_size` must be a positive"),
        ({"decay": 1.0}, "`decay` must be"),
        ({"eps": -1.0}, "`eps` must be a positive"),
        ({"min_spread": 0.5}, "`min_spread` must be"),
        ({"probation": 0}, "`probation` must be a positive"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PerCoordinateSteps(**kwargs)


def test_it_comes_first_in_the_saddle_plateau_and_local_minimum_ladders() -> None:
    ladders = default_ladders(probation_steps=50)
    first = {kind for kind in ESCAPABLE if isinstance(ladders[kind][0], PerCoordinateSteps)}
    assert first == {"saddle", "plateau", "local_minimum"}
    assert ladders["saddle"][0].min_probation == 200
    # Passed over on balanced scales, to the rung that was first before.
    chosen, why = EscapePolicy().choose("plateau", _stalled(small=0.5))
    assert type(chosen).__name__ == "Perturb" and "span only 2x" in why


def test_stronger_keeps_the_settings_and_the_step_pickles() -> None:
    step = PerCoordinateSteps(step_size=3e-3).stronger()
    assert isinstance(step, PerCoordinateSteps) and step.step_size == 3e-3
    assert pickle.loads(pickle.dumps(step)).describe() == step.describe()


class ScriptedNet(Net):
    """``Net`` (SGD), logging ``scripted``: flat until ``drop_at``, then a hundredth of it."""

    def __init__(self, drop_at: int = 10**9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.drop_at = drop_at

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.log("scripted", 1.0 if self.global_step < self.drop_at else 0.01)
        return super().training_step(batch, batch_idx)


def _callback(probation: int = 12) -> EscapeCallback:
    # Every diagnosis gets the step, whatever the scales of the two layers.
    step = PerCoordinateSteps(min_spread=1.0, probation=probation)
    return EscapeCallback(
        forcing_detector(monitor="scripted", smoothing=0.5),
        ladders={kind: [step] for kind in ESCAPABLE},
        probation_steps=4,
        max_escapes=1,
        max_failures=1,
    )


def _escape_keys(trainer: Any) -> set[str]:
    return {k for st in trainer.optimizers[0].state.values() for k in st if k.startswith("escape")}


def test_its_verdict_waits_its_own_probation_and_a_rollback_takes_it_away() -> None:
    escape = _callback(probation=12)
    trainer = fit(ScriptedNet(), [escape], max_steps=40)
    [event] = escape.events
    assert event.action.startswith("PerCoordinateSteps(") and event.verdict == "rolled_back"
    assert event.end_step is not None and event.end_step - event.step >= 12
    assert not rescaling(trainer.optimizers[0]) and _escape_keys(trainer) == set()
    assert escape.summary()["per_coordinate_steps"] is False


def _fit_kept(tmp_path: Path) -> tuple[EscapeCallback, Digests, Any]:
    """A run whose trial is kept (at step 7, judged at 19), checkpointed every 8 steps."""
    full, seen = _callback(probation=12), Digests()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=8)
    trainer = fit(
        ScriptedNet(drop_at=12), [full, ckpt, seen], max_steps=48, enable_checkpointing=True
    )
    return full, seen, trainer


def test_kept_it_stays_on_and_the_summary_says_so(tmp_path: Path) -> None:
    full, _, trainer = _fit_kept(tmp_path)
    [event] = full.events
    assert event.verdict == "accepted" and rescaling(trainer.optimizers[0])
    assert full.summary()["per_coordinate_steps"] is True
    assert "The optimizers keep the per-coordinate step sizes" in full.summary_text()
    assert {"escape_square_avg", "escape_steps", "escape_scale"} <= _escape_keys(trainer)
    # ... and checkpoints carry them
    state = torch.load(tmp_path / "epoch=7-step=32.ckpt", weights_only=True)["optimizer_states"]
    assert all("escape_square_avg" in entry for entry in state[0]["state"].values())


@pytest.mark.skipif(
    not RESUMES_AFTER_THE_BATCH,
    reason="this Lightning resumes a batch-end checkpoint a batch behind",
)
def test_a_resume_continues_it_bit_for_bit(tmp_path: Path) -> None:
    full, seen, _ = _fit_kept(tmp_path)
    [event] = full.events
    # Resumed on probation (step 16) or after the verdict (step 32): the same run, bit for bit.
    late = tmp_path / "epoch=7-step=32.ckpt"
    during = tmp_path / "epoch=3-step=16.ckpt"
    assert event.end_step is not None and event.step < 16 < event.end_step < 32
    for path in (during, late):
        resumed, seen_resumed = _callback(probation=12), Digests()
        trainer = fit(
            ScriptedNet(drop_at=12), [resumed, seen_resumed], max_steps=48, ckpt_path=str(path)
        )
        assert rescaling(trainer.optimizers[0]) and resumed.events == full.events
        assert 47 in seen_resumed.by_step
        assert seen_resumed.by_step == {s: seen.by_step[s] for s in seen_resumed.by_step}
    # Without the rescaling the resumed run would part from the full one.
    plain = Digests()
    fit(ScriptedNet(drop_at=12), [plain], max_steps=48, ckpt_path=str(late))
    assert plain.by_step[47] != seen.by_step[47]


@pytest.mark.ddp
def test_ddp_replicas_stay_identical_under_it(tmp_path: Path) -> None:
    r0, r1 = fit_two_ranks(ScriptedNet(drop_at=12), _callback(probation=12), tmp_path)
    [(action, verdict)] = r0["actions"]
    assert action.startswith("PerCoordinateSteps(") and verdict == "accepted"
    assert r0["actions"] == r1["actions"] and r0["digests"] == r1["digests"]


def test_once_failed_it_is_passed_over_in_every_ladder() -> None:
    policy = EscapePolicy()
    ctx = _stalled()
    step, _ = policy.choose("saddle", ctx)
    assert isinstance(step, PerCoordinateSteps)
    policy.rejected("saddle", step=100)
    ctx.step = 10_000  # past the back-off
    resumed = EscapePolicy()
    resumed.load_state_dict(policy.state_dict())
    assert "failed once in this run" in resumed.choose("plateau", ctx)[1]
    assert not isinstance(policy.choose("saddle", ctx)[0], PerCoordinateSteps)  # the next rung
    for kind in ("plateau", "local_minimum"):  # their first rung, passed over
        chosen, why = policy.choose(kind, ctx)
        assert type(chosen).__name__ == "Perturb"
        assert "PerCoordinateSteps(" in why and "(failed once in this run (at step 100))" in why


def test_the_steps_follow_the_schedule_up_to_step_size_at_its_peak() -> None:
    weight = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=100)
    for _ in range(10):
        optimizer.step()
        warmup.step()  # the rate is 0.109 of its peak 0.1 when the escape starts
    start_rescaling(optimizer, step_size=2e-3, decay=0.999, eps=1e-8)
    moved = []
    for _ in range(150):
        before = weight.detach().clone()
        weight.grad = torch.tensor([1.0, 1e-3, -1e-5])
        rescale_gradients(optimizer)
        optimizer.step()
        warmup.step()
        moved.append((weight.detach() - before).abs())
    torch.testing.assert_close(moved[0], torch.full((3,), 2e-3 * 0.109), rtol=0.01, atol=0.0)
    torch.testing.assert_close(moved[-1], torch.full((3,), 2e-3), rtol=0.01, atol=0.0)


def test_sparse_gradients_keep_their_steps_and_get_no_buffer() -> None:
    table = nn.Embedding(1000, 8, sparse=True)
    dense = nn.Linear(8, 1)
    optimizer = torch.optim.SGD([*table.parameters(), *dense.parameters()], lr=0.1)
    dense(table(torch.tensor([1, 2]))).sum().backward()
    start_rescaling(optimizer, 1e-3, 0.999, 1e-8)
    assert "escape_square_avg" not in optimizer.state[table.weight] and rescaling(optimizer)
    sparse = table.weight.grad.clone()  # type: ignore[union-attr]
    rescale_gradients(optimizer)
    assert torch.equal(table.weight.grad.to_dense(), sparse.to_dense())  # type: ignore[union-attr]


class AddGroup(pl.Callback):
    """Adds a parameter group at step 12 (as ``BaseFinetuning`` unfreezing a layer would)."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == 12:
            extra = nn.Parameter(torch.zeros(2))
            pl_module.register_parameter("extra", extra)
            trainer.optimizers[0].add_param_group({"params": [extra], "lr": 0.05})


def test_a_failed_trial_that_cannot_be_rolled_back_takes_its_step_sizes_back() -> None:
    escape = _callback(probation=12)
    trainer = fit(ScriptedNet(), [escape, AddGroup()], max_steps=40)
    [event] = escape.events
    assert event.verdict == "neutral" and "cannot be rolled back exactly" in event.reason
    assert event.reason.endswith("its per-coordinate step sizes are taken back")
    assert not rescaling(trainer.optimizers[0]) and _escape_keys(trainer) == set()
    assert escape.summary()["per_coordinate_steps"] is False
