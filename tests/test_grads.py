"""The every-step path: cached gradient lists, one fused norm launch and an append, no host read."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from models import Net, fit
from torch.overrides import TorchFunctionMode

from lightning_escape import EscapeCallback, GradientMonitor, StallDetector
from lightning_escape.callbacks._grads import GradReader, StepNorms
from lightning_escape.signals import foreach_norms, reference_norms


def test_step_norms_agree_with_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    steps = {0: [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)], 1: []}
    steps[1] = [torch.randn(4, generator=g, dtype=torch.float64), torch.randn(2, generator=g)]
    norms = StepNorms()
    norms.add(0, foreach_norms(steps[0]))
    norms.add(1, foreach_norms(steps[1][:1]))  # two optimizers in one batch add in squares
    norms.add(1, foreach_norms(steps[1][1:]), scale=torch.tensor(4.0))
    totals = dict(norms.totals())
    assert dict(norms.pop()).keys() == totals.keys() == {0, 1}
    assert norms.pop() == []
    ref0 = torch.linalg.vector_norm(torch.stack(reference_norms(steps[0])))
    assert torch.allclose(totals[0], ref0)
    a, b = (n.double() for n in reference_norms(steps[1]))
    assert torch.allclose(totals[1].double(), (a**2 + (b / 4) ** 2).sqrt())


def test_the_parameter_list_follows_a_new_param_group() -> None:
    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(first.parameters(), lr=0.1)
    reader = GradReader()
    for p in [*first.parameters(), *second.parameters()]:
        p.grad = torch.ones_like(p)
    assert len(reader.grads(optimizer)) == 2
    optimizer.add_param_group({"params": list(second.parameters())})  # a finetuning callback
    assert len(reader.grads(optimizer)) == 4


class Record(TorchFunctionMode):
    """Records every torch function called inside it."""

    def __init__(self, calls: Counter[str]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls[getattr(func, "__name__", repr(func))] += 1
        return func(*args, **(kwargs or {}))


def _recorded(callback: Any) -> Counter[str]:
    calls: Counter[str] = Counter()
    for hook in ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end"):
        original = getattr(callback, hook)

        def wrapped(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            with Record(calls):
                return _original(*args, **kwargs)

        setattr(callback, hook, wrapped)
    return calls


@pytest.mark.parametrize("log", [False, True])
def test_every_step_is_one_fused_norm_launch_and_no_host_read(tmp_path: Any, log: bool) -> None:
    # No check and no logging step in the window: what is left is the cost of every step.
    gradients = GradientMonitor(log_every_n_steps=1000) if log else False
    detector = StallDetector(check_every_n_steps=1000, gradients=gradients)
    escape = EscapeCallback(detector)
    calls = _recorded(escape)
    steps = 20
    fit(Net(), [escape], max_steps=steps, logger=TensorBoardLogger(tmp_path))
    assert calls["_foreach_norm"] == steps
    computing = {
        name: n
        for name, n in calls.items()
        if name != "_foreach_norm" and not name.startswith("__") and name not in _ATTRIBUTES
    }
    assert computing == {}, computing


# Reading a tensor's attributes launches nothing and reads no value back.
_ATTRIBUTES = {"requires_grad", "dtype", "dim", "numel", "grad", "is_sparse", "device"}


@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32,) * 3, (torch.float64,) * 3, (torch.bfloat16, torch.float32, torch.float32)],
)
def test_the_reader_norms_agree_with_the_reference(dtypes: tuple[torch.dtype, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    params = [
        torch.nn.Parameter(torch.randn(n, generator=g).to(dtype))
        for n, dtype in zip((5, 7, 3), dtypes)
    ]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    optimizer = torch.optim.SGD(params, lr=0.1)
    fused = GradReader().norms(optimizer)
    reference = reference_norms([p.grad for p in params if p.grad is not None])
    assert [n.dtype for n in fused] == [n.dtype for n in reference]
    for a, b in zip(fused, reference):
        assert torch.allclose(a, b, rtol=1e-6)
    assert GradReader(foreach=False).norms(optimizer) == reference
