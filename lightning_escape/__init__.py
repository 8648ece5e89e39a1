"""lightning_escape: watch gradients, diagnose stalled training, escape it, and roll back what fails.

Drop-in PyTorch Lightning callbacks:

- :class:`GradientMonitor` watches the gradients every optimizer step and logs them to TensorBoard.
"""

from __future__ import annotations

from lightning_escape.callbacks.monitor import GradientMonitor

__version__ = "0.1.0.dev0"

__all__ = ["GradientMonitor", "__version__"]
