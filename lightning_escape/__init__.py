"""lightning_escape: watch gradients, diagnose stalled training, escape it, and roll back what fails.

Drop-in PyTorch Lightning callbacks:

- :class:`GradientMonitor` watches the gradients every optimizer step and logs them to TensorBoard.
- :class:`StallDetector` tells when training is stuck and what kind of stuck, and never acts.
"""

from __future__ import annotations

from lightning_escape.callbacks.detector import StallDetector
from lightning_escape.callbacks.monitor import GradientMonitor

__version__ = "0.1.0.dev0"

__all__ = ["GradientMonitor", "StallDetector", "__version__"]
