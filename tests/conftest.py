from __future__ import annotations

import os
import warnings

import pytest
import torch

# One thread per test process: small shared machines stall on parallel elementwise kernels.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _quiet_lightning() -> None:
    """Silence Lightning's advice about dataloader workers and the like in every test."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Each test starts from the same global RNG state, whatever ran before it.

    Modules built from `nn.Linear` draw their initial weights from the global generator: without
    this, a test's outcome would depend on which tests ran first in the same process.
    """
    torch.manual_seed(0)


@pytest.fixture
def unforeseen_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training whose last step the callback cannot foresee (as when another callback stops it).

    With a known last step (or last validation) no escape starts whose probation would outlast
    training (or the last validation, for a metric logged at validation); the tests that use
    this fixture are about the trial still on probation when training ends anyway.
    """
    import lightning_escape.callbacks.escape as escape

    monkeypatch.setattr(escape, "_horizon", lambda trainer: None)
    monkeypatch.setattr(escape, "last_validation_step", lambda trainer: None)
