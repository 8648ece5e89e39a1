"""EscapeCallback and its escape steps configured from YAML through LightningCLI."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("jsonargparse")

from lightning.pytorch.cli import LightningCLI

from lightning_escape import EscapeCallback, GradientMonitor, LRKick, Perturb
from lightning_escape.demos.problems import StrictSaddle2D

CONFIG = """
trainer:
  accelerator: cpu
  max_steps: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_escape.EscapeCallback
      init_args:
        detector:
          class_path: lightning_escape.StallDetector
          init_args:
            patience: 50
            gradients: false          # the GradientMonitor below logs them
            classifier:
              class_path: lightning_escape.StallClassifier
              init_args: {lanczos_steps: 8, saddle_tol: 0.05}
        probation_steps: 80
        snapshot_device: cpu
        ladders:
          saddle:
            - class_path: lightning_escape.Perturb
              init_args: {radius: 0.3, scale: rms}
            - class_path: lightning_escape.LRKick
              init_args: {factor: 5.0, steps: 20}
    - class_path: lightning_escape.GradientMonitor
      init_args: {histogram_every_n_steps: 100}
"""


def test_yaml_config_builds_the_callbacks(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    cli = LightningCLI(
        StrictSaddle2D, run=False, save_config_callback=None, args=["--config", str(config)]
    )
    escape = next(c for c in cli.trainer.callbacks if isinstance(c, EscapeCallback))
    assert escape.detector.patience == 50 and escape.engine.probation_steps == 80
    assert escape.detector.gradients is None
    assert escape.detector.classifier.lanczos_steps == 8
    assert escape.detector.classifier.saddle_tol == 0.05
    assert escape.snapshot_device == "cpu"
    saddle = escape.policy.ladders["saddle"]
    assert isinstance(saddle[0], Perturb) and saddle[0].radius == 0.3 and saddle[0].scale == "rms"
    assert isinstance(saddle[1], LRKick) and saddle[1].factor == 5.0
    # kinds the config leaves out keep their defaults
    plateau = escape.policy.ladders["plateau"]
    # ... built for the configured probation: per-coordinate step sizes judged after 4 x 80 steps
    assert plateau[0].describe().endswith("min_spread=100.0, probation=320)")
    assert plateau[1].describe().startswith("Perturb(radius=0.5")
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, GradientMonitor))
    assert monitor.histogram_every_n_steps == 100
    cli.trainer.fit(cli.model)


def test_yaml_rejects_a_bad_value(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("patience: 50", "patience: 0"))
    with pytest.raises((ValueError, SystemExit)):
        LightningCLI(StrictSaddle2D, run=False, args=["--config", str(config)])
