from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from models import Net, ReferenceNorms, fit, read_scalars

from lightning_escape import GradientMonitor


class RankReport(ReferenceNorms):
    """Writes each rank's reference norms and the monitor's last norm to a file."""

    def __init__(self, out: str, monitor: GradientMonitor) -> None:
        super().__init__()
        self.out = out
        self.monitor = monitor

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        report = {
            "norms": {str(s): v for (s, _), v in self.norms.items()},
            "last": float(self.monitor.grad_norm),  # type: ignore[arg-type]
        }
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


@pytest.mark.ddp
def test_ddp_rank_zero_writes_the_all_reduced_norm(tmp_path: Path) -> None:
    monitor = GradientMonitor()
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    fit(
        Net(n=64, batch_size=8),
        [monitor, RankReport(str(tmp_path), monitor)],
        logger=logger,
        max_steps=10,
        strategy="ddp_spawn",
        devices=2,
    )
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # Gradients are all-reduced before the hook, so both ranks see the same norm.
    assert r0["norms"] == r1["norms"]
    assert r0["last"] == r1["last"]
    event_files = list(Path(logger.log_dir).glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    logged = read_scalars(logger.log_dir)["grad/norm"]
    assert sorted(logged) == [4, 9]
    for step, value in logged.items():
        assert abs(value - r0["norms"][str(step)]) <= 1e-5 * r0["norms"][str(step)]
