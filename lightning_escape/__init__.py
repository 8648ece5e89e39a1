"""lightning_escape: watch gradients, diagnose stalled training, escape it, and roll back what fails.

Drop-in PyTorch Lightning callbacks:

- :class:`GradientMonitor` watches the gradients every optimizer step and logs them to TensorBoard.
- :class:`StallDetector` tells when training is stuck and what kind of stuck, and never acts.
- :class:`EscapeCallback` does the whole loop: diagnose, escape, judge, roll back what failed.
- :class:`GradientNoise` adds annealed gradient noise on every step (also an escape step).
"""

from __future__ import annotations

from lightning_escape.callbacks.detector import StallDetector
from lightning_escape.callbacks.escape import EscapeCallback
from lightning_escape.callbacks.monitor import GradientMonitor
from lightning_escape.escapes import (
    BatchSizeChange,
    EscapeStep,
    GradientNoise,
    LRKick,
    NegativeCurvatureStep,
    Perturb,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "BatchSizeChange",
    "EscapeCallback",
    "EscapeStep",
    "GradientMonitor",
    "GradientNoise",
    "LRKick",
    "NegativeCurvatureStep",
    "Perturb",
    "StallDetector",
    "__version__",
]
