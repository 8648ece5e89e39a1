"""lightning_escape: watch gradients, diagnose stalled training, escape it, and roll back what fails.

Drop-in PyTorch Lightning callbacks:

- :class:`GradientMonitor` watches the gradients every optimizer step and logs them to TensorBoard.
- :class:`StallDetector` tells when training is stuck and what kind of stuck, and never acts.
- :class:`EscapeCallback` does the whole loop: diagnose, escape, judge, roll back what failed.
- :class:`GradientNoise` adds annealed gradient noise on every step (also an escape step).

The loop, stage by stage, in the modules that hold it:

=========  ================================================================================
watch      :mod:`~lightning_escape.signals` (fused norms, noise scale), ``GradientMonitor``
detect     :mod:`~lightning_escape.detectors` (``StallTracker``, ``classify``),
           :mod:`~lightning_escape.diagnosis` (``StallClassifier``: curvature, units),
           :mod:`~lightning_escape.recurrence` (contracting recurrent matrices),
           :mod:`~lightning_escape.signal_flow` (the input's signal through the layers),
           :mod:`~lightning_escape.progress` (``DriftMeter``, ``MotionRule``: is the run moving?),
           ``StallDetector``
decide     :mod:`~lightning_escape.policy` (ladders, escalation, budget, stopping rule)
act        :mod:`~lightning_escape.escapes` (the escape steps),
           :mod:`~lightning_escape.coordinates` (per-coordinate step sizes for SGD)
judge      :mod:`~lightning_escape.probation` (``EscapeEngine``: trials, verdicts, rollback),
           :mod:`~lightning_escape.snapshot` (exact state capture and restore)
=========  ================================================================================
"""

from __future__ import annotations

from lightning_escape.callbacks.detector import StallDetector
from lightning_escape.callbacks.escape import EscapeCallback
from lightning_escape.callbacks.monitor import GradientMonitor
from lightning_escape.coordinates import PerCoordinateSteps
from lightning_escape.diagnosis import StallClassifier
from lightning_escape.escapes import (
    BatchSizeChange,
    EscapeStep,
    GradientNoise,
    LRKick,
    NegativeCurvatureStep,
    OrthogonalRecurrence,
    Perturb,
    Restandardize,
    TrustRatioStep,
)
from lightning_escape.probation import EscapeEngine, EscapeEvent, Verdict
from lightning_escape.progress import MotionRule

__version__ = "0.1.0.dev0"

__all__ = [
    "BatchSizeChange",
    "EscapeCallback",
    "EscapeEngine",
    "EscapeEvent",
    "EscapeStep",
    "GradientMonitor",
    "GradientNoise",
    "LRKick",
    "MotionRule",
    "NegativeCurvatureStep",
    "OrthogonalRecurrence",
    "PerCoordinateSteps",
    "Perturb",
    "Restandardize",
    "StallClassifier",
    "StallDetector",
    "TrustRatioStep",
    "Verdict",
    "__version__",
]
