"""Reference implementations the tests compare the package against (not part of the package)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_escape.curvature import HessianOperator, flatten


def explicit_hessian(loss_fn: Callable[[], Tensor], params: Sequence[Tensor]) -> Tensor:
    """The full Hessian of a loss, row by row: a reference implementation for tests.

    Differentiates each entry of the gradient separately (``dim`` backward passes), a route
    independent of the ``grad_outputs`` products of :class:`HessianOperator`. Only for small
    models: it costs ``dim`` backward passes and ``dim**2`` floats.

    Args:
        loss_fn: Closure computing the scalar loss from ``params``; called once.
        params: Tensors to differentiate with respect to; each must require grad.

    Returns:
        The ``dim x dim`` Hessian in float64, rows and columns ordered as :func:`flatten` orders
        the parameters. Computed in the parameters' precision and converted.

    Example:
        >>> xy = torch.zeros(2, requires_grad=True)
        >>> explicit_hessian(lambda: xy[0] ** 2 - xy[1] ** 2, [xy])
        tensor([[ 2.,  0.],
                [ 0., -2.]], dtype=torch.float64)
    """
    op = HessianOperator(loss_fn, params)
    like = op.params
    dim = sum(p.numel() for p in like)
    hess = torch.zeros(dim, dim, dtype=torch.float64)
    if not op._grads:
        return hess
    flat = torch.cat([g.reshape(-1) for g in op._grads])
    cols = torch.cat(
        [torch.arange(like[i].numel()) + sum(p.numel() for p in like[:i]) for i in op._live]
    )
    for row, col in zip(flat, cols.tolist(), strict=True):
        if not row.requires_grad:
            continue
        pieces = torch.autograd.grad(row, like, retain_graph=True, allow_unused=True)
        filled = [
            torch.zeros_like(p) if h is None else h for p, h in zip(like, pieces, strict=True)
        ]
        hess[col] = flatten(filled, dtype=torch.float64, device="cpu")
    return hess
