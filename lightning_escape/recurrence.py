"""Recurrent matrices: find them, measure how they contract, and make them isometric.

A vanilla recurrent layer ``h_t = tanh(W_ih x_t + W_hh h_{t-1} + b)`` backpropagates through time
by multiplying with ``W_hh^T`` (and the tanh's slope, at most 1) once per step: when the spectral
radius of ``W_hh`` is below 1 the gradient of an input ``k`` steps back shrinks at least like
``radius ** k``, and long-range dependencies get no signal (Bengio, Simard and Frasconi, 1994;
Pascanu, Mikolov and Bengio, 2013, arXiv:1211.5063). PyTorch's default initialisation, uniform in
``±1/sqrt(hidden)``, gives a radius of about ``1/sqrt(3) ≈ 0.58``. An orthogonal recurrent matrix
(Saxe, McClelland and Ganguli, 2014, arXiv:1312.6120) preserves the gradient's norm through the
linear part of every step.

Pure tensor logic, no Lightning.

Example:
    >>> rnn = torch.nn.RNN(3, 8)
    >>> [name for name, _ in recurrent_matrices(rnn)]
    ['weight_hh_l0']
    >>> q = nearest_orthogonal(rnn.weight_hh_l0.detach())
    >>> torch.allclose(q @ q.T, torch.eye(8), atol=1e-5)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["nearest_orthogonal", "recurrent_matrices", "spectral_radius"]


def recurrent_matrices(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable square recurrent matrices of the vanilla ``nn.RNN`` layers in ``module``.

    Every layer and direction of a multi-layer or bidirectional ``nn.RNN`` counts. Gated
    recurrences (``nn.LSTM``, ``nn.GRU``) stack one matrix per gate and keep their memory in the
    gates; they are not returned. Neither are frozen or non-square matrices (a projection, or a
    sharded parameter whose local shape is not the layer's).

    Args:
        module: Any module.

    Returns:
        ``(name, parameter)`` pairs, names as in ``module.named_parameters()``.
    """
    found = []
    for prefix, sub in module.named_modules():
        if type(sub) is not nn.RNN:  # not LSTM or GRU, which subclass RNNBase, not RNN
            continue
        for name, param in sub.named_parameters(recurse=False):
            if not name.startswith("weight_hh_l") or not param.requires_grad:
                continue
            if param.dim() == 2 and param.shape[0] == param.shape[1] and param.numel() > 0:
                found.append((f"{prefix}.{name}" if prefix else name, param))
    return found


def spectral_radius(weight: Tensor) -> float:
    """The largest modulus of the eigenvalues of a square matrix (in double precision, on the host).

    Example:
        >>> spectral_radius(torch.tensor([[0.0, 2.0], [0.5, 0.0]]))
        1.0
    """
    return float(torch.linalg.eigvals(weight.detach().double().cpu()).abs().max())


def nearest_orthogonal(weight: Tensor, gain: float = 1.0) -> Tensor:
    """``gain`` times the orthogonal matrix nearest to ``weight`` (its polar factor ``U V^T``).

    With ``weight = U S V^T``, ``U V^T`` is the orthogonal matrix closest to ``weight`` in the
    Frobenius norm: it keeps the singular directions and sets every singular value to 1, so the
    matrix neither shrinks nor amplifies any direction. Computed in double precision (single on
    devices without it) and returned in ``weight``'s dtype and device.

    Args:
        weight: A square matrix.
        gain: The common singular value of the result.

    Returns:
        A new tensor; ``weight`` is not changed.

    Example:
        >>> w = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
        >>> nearest_orthogonal(w)
        tensor([[1., 0.],
                [0., 1.]])
    """
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        raise ValueError(f"`weight` must be a square matrix, got shape {tuple(weight.shape)}.")
    precise = torch.float32 if weight.device.type == "mps" else torch.float64
    u, _, vh = torch.linalg.svd(weight.detach().to(precise))
    polar: Tensor = (u @ vh) * gain
    return polar.to(weight.dtype)
