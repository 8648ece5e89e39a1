"""Curvature of a loss: Hessian-vector products and the extreme eigenvalues of the Hessian.

Everything here is plain PyTorch: the loss is any closure returning a scalar tensor, the
parameters any tensors that require grad. Products are taken by double backward through
:func:`torch.autograd.grad`, so ``p.grad`` is never read or written, and the extreme eigenpairs come
from Lanczos iteration with full reorthogonalisation, which needs only products, never the
Hessian itself.

Where double backward does not exist (fused attention kernels, ``torch.compile``d modules, custom
autograd functions marked ``once_differentiable``), :class:`FiniteDifferenceHessianOperator` takes
the same products by central differences of gradients, which need only a first-order backward; it
moves the parameters in place for each pair of gradients and copies their saved values back.

A negative ``lambda_min`` with a small gradient is the signature of a saddle point; its Ritz
vector ``eigvec_min`` is the direction of steepest descent in curvature, the way out.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_escape._validation import (
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
)

__all__ = [
    "METHODS",
    "DoubleBackwardUnsupported",
    "FiniteDifferenceHessianOperator",
    "HessianOperator",
    "ProbeUnavailable",
    "Spectrum",
    "curvature_along",
    "fd_hvp",
    "flatten",
    "hessian_spectrum",
    "hvp",
    "is_double_backward_error",
    "lanczos",
    "unflatten",
]


class ProbeUnavailable(RuntimeError):
    """The curvature probe cannot run on this module or batch; the message says why and the fix."""


class DoubleBackwardUnsupported(RuntimeError):
    """The exact Hessian-vector product failed because the loss's graph has no double backward.

    Raised by :class:`HessianOperator` in place of the :class:`RuntimeError` that autograd raised
    (kept as ``__cause__``, its message repeated), so that callers can fall back to
    :class:`FiniteDifferenceHessianOperator`. A subclass of :class:`RuntimeError`: code that caught
    the original error still catches this one.
    """


#: How Hessian-vector products are taken: by double backward, or by central differences of
#: gradients.
METHODS = ("exact", "finite_difference")

# Messages autograd raises when a graph cannot be differentiated twice, all lower-cased: an op
# without a derivative formula for its backward ("derivative for aten::_scaled_dot_product_flash_
# attention_for_cpu_backward is not implemented", "the derivative for 'x' is not implemented"),
# compiled graphs ("torch.compile with aot_autograd does not currently support double backward"),
# custom functions ("trying to differentiate twice a function that was marked with
# @once_differentiable"), compiled backwards that donate their buffers ("... requires
# create_graph=False and retain_graph=False", raised by the first backward when a plain backward
# compiled it before), and the like from other backends and versions.
_DOUBLE_BACKWARD_PATTERNS = re.compile(
    r"double[ _-]?backward"
    r"|requires create_graph=false"
    r"|differentiate twice"
    r"|once_differentiable"
    r"|derivative for .+ (is )?not implemented"
    r"|not implemented.* derivative"
    r"|does not (currently )?support (higher[- ]order|second[- ]order|create_graph)"
)


def is_double_backward_error(err: BaseException) -> bool:
    """Whether an exception says that a graph cannot be differentiated twice.

    Args:
        err: The exception raised by autograd (or by :class:`HessianOperator`).

    Returns:
        True for :class:`DoubleBackwardUnsupported` and for a :class:`RuntimeError` whose message
        is one of autograd's "no double backward" messages.

    Example:
        >>> is_double_backward_error(RuntimeError("derivative for aten::f_backward is not implemented"))
        True
        >>> is_double_backward_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        False
    """
    if isinstance(err, DoubleBackwardUnsupported):
        return True
    return isinstance(err, RuntimeError) and bool(
        _DOUBLE_BACKWARD_PATTERNS.search(str(err).lower())
    )


def _work_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    # float64 only when the parameters are float64 (or complex128): half-precision parameters get
    # float32 so that the Lanczos recurrences do not lose orthogonality to rounding.
    wide = (torch.float64, torch.complex128)
    return torch.float64 if any(t.dtype in wide for t in tensors) else torch.float32


def _size(t: Tensor) -> int:
    """Real coordinates of ``t``: a complex entry is two, its real and imaginary parts."""
    return t.numel() * (2 if t.is_complex() else 1)


def _dense(t: Tensor) -> Tensor:
    """``t`` as a strided tensor: autograd gives sparse gradients for ``nn.Embedding(sparse=True)``.

    Differentiable, so a sparse gradient built with ``create_graph`` can be differentiated again.
    The probe holds dense vectors of every parameter's size anyway (the Lanczos basis).
    """
    return t if t.layout == torch.strided else t.to_dense()


def flatten(
    tensors: Sequence[Tensor],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Concatenate tensors into one flat vector.

    A complex tensor contributes its real and imaginary parts, interleaved (the layout of
    ``torch.view_as_real``), so the vector is real and a Hessian of a real loss in those
    coordinates is symmetric; a sparse tensor contributes every entry of the dense tensor it stands
    for.

    Args:
        tensors: Tensors of any shapes; they may live on different devices and have different
            dtypes.
        dtype: dtype of the result; by default the promoted (real) dtype of ``tensors``.
        device: Device of the result; by default the device of the first tensor.

    Returns:
        A 1-D tensor holding the elements of every tensor in order, each flattened row-major.

    Raises:
        ValueError: If ``tensors`` is empty.

    Example:
        >>> flatten([torch.ones(2, 2), torch.zeros(3)])
        tensor([1., 1., 1., 1., 0., 0., 0.])
        >>> flatten([torch.tensor([1 + 2j])])
        tensor([1., 2.])
    """
    if len(tensors) == 0:
        raise ValueError(f"`tensors` must hold at least one tensor, got {tensors!r}.")
    parts = [_dense(t) for t in tensors]
    parts = [torch.view_as_real(t) if t.is_complex() else t for t in parts]
    if dtype is None:
        dtype = parts[0].dtype
        for t in parts[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    target = tensors[0].device if device is None else torch.device(device)
    return torch.cat([t.reshape(-1).to(device=target, dtype=dtype) for t in parts])


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors shaped, placed and typed like ``like``.

    The inverse of :func:`flatten`: a complex entry of ``like`` takes two consecutive elements,
    its real and imaginary parts. Real pieces that need no device or dtype conversion are views
    of ``vec``.

    Args:
        vec: A 1-D tensor with as many elements as ``like`` holds together (two per complex
            element).
        like: Tensors giving the shape, device and dtype of each piece.

    Returns:
        One tensor per entry of ``like``.

    Raises:
        ValueError: If ``vec`` is not 1-D or its length differs from the total size of ``like``.

    Example:
        >>> a, b = unflatten(torch.arange(5.0), [torch.empty(2), torch.empty(1, 3)])
        >>> b
        tensor([[2., 3., 4.]])
        >>> unflatten(torch.tensor([1.0, 2.0]), [torch.empty(1, dtype=torch.complex64)])
        [tensor([1.+2.j])]
    """
    total = sum(_size(t) for t in like)
    if vec.dim() != 1 or vec.numel() != total:
        raise ValueError(
            f"`vec` must be a 1-D tensor of {total} elements to match `like`, "
            f"got shape {tuple(vec.shape)}."
        )
    out: list[Tensor] = []
    offset = 0
    for t in like:
        n = _size(t)
        piece = vec[offset : offset + n]
        if t.is_complex():
            # A copy: `view_as_complex` needs an even storage offset, which a view need not have.
            pairs = piece.reshape(*t.shape, 2).to(dtype=t.real.dtype, copy=True)
            out.append(torch.view_as_complex(pairs).to(device=t.device))
        else:
            out.append(piece.view(t.shape).to(device=t.device, dtype=t.dtype))
        offset += n
    return out


def _check_params(params: Sequence[Tensor]) -> list[Tensor]:
    params = list(params)
    if not params:
        raise ValueError(f"`params` must hold at least one tensor, got {params!r}.")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise ValueError(f"`params[{i}]` must be a tensor, got {type(p).__name__}.")
        if not p.requires_grad:
            raise ValueError(
                f"`params[{i}]` must require grad, got a tensor of shape {tuple(p.shape)} "
                "with requires_grad=False."
            )
    return params


def _check_loss(loss: object) -> Tensor:
    if (
        not isinstance(loss, Tensor)
        or loss.numel() != 1
        or not loss.is_floating_point()
        or not loss.requires_grad
    ):
        got = (
            f"shape {tuple(loss.shape)}, dtype {loss.dtype}, requires_grad={loss.requires_grad}"
            if isinstance(loss, Tensor)
            else type(loss).__name__
        )
        raise ValueError(
            f"`loss_fn` must return a scalar floating-point tensor that requires grad, got {got}."
        )
    return loss.reshape(())


def _check_vec(vec: Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    vec = list(vec)
    if len(vec) != len(params):
        raise ValueError(
            f"`vec` must hold one tensor per parameter ({len(params)}), got {len(vec)}."
        )
    for i, (v, p) in enumerate(zip(vec, params, strict=True)):
        if v.shape != p.shape:
            raise ValueError(
                f"`vec[{i}]` must have the shape of its parameter {tuple(p.shape)}, "
                f"got {tuple(v.shape)}."
            )
    return vec


class HessianOperator:
    """The Hessian of a loss at the current parameters, as a linear operator.

    The loss and its gradient graph are built once, in the constructor; each call then costs one
    backward pass through that graph (``retain_graph=True``), so many products share one forward
    and one first backward. The graph is held until the operator is garbage collected.

    Parameters with no path to the loss get zero gradient and zero Hessian blocks.

    Args:
        loss_fn: Closure computing the scalar loss from ``params``; called once.
        params: Tensors to differentiate with respect to; each must require grad.

    Raises:
        ValueError: If ``params`` is empty or holds a tensor that does not require grad, or if
            ``loss_fn`` does not return a scalar floating-point tensor that requires grad.
        DoubleBackwardUnsupported: If the first backward refuses ``create_graph``.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> op = HessianOperator(lambda: (x**3).sum(), [x])
        >>> op.grad
        [tensor([ 3., 12.])]
        >>> op([torch.tensor([1.0, 1.0])])
        [tensor([ 6., 12.])]
    """

    method = "exact"

    def __init__(self, loss_fn: Callable[[], Tensor], params: Sequence[Tensor]) -> None:
        self.params = _check_params(params)
        loss = _check_loss(loss_fn())
        try:
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        except RuntimeError as err:
            # Some graphs refuse `create_graph` in the first backward already.
            if is_double_backward_error(err):
                raise DoubleBackwardUnsupported(str(err)) from err
            raise
        # Sparse gradients (nn.Embedding(sparse=True)) as dense ones: differentiable, so the
        # products below go through them, and the same layout as the vectors they meet.
        grads = tuple(None if g is None else _dense(g) for g in grads)
        self.loss: Tensor = loss.detach()
        self.grad: list[Tensor] = [
            torch.zeros_like(p) if g is None else g.detach()
            for p, g in zip(self.params, grads, strict=True)
        ]
        # Only gradients that still depend on the parameters can be differentiated again; the
        # others (unused parameters, or a loss linear in them) have zero Hessian rows.
        self._live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads = [grads[i] for i in self._live]

    def __call__(self, vec: Sequence[Tensor]) -> list[Tensor]:
        """Return the Hessian-vector product ``H @ vec``.

        Args:
            vec: One tensor per parameter, shaped like it; converted to its device and dtype.

        Returns:
            One tensor per parameter, shaped like it, on its device and in its dtype.

        Raises:
            ValueError: If ``vec`` does not match the parameters in length or shapes.
            DoubleBackwardUnsupported: If the backward through the gradient's graph fails.
        """
        vec = _check_vec(vec, self.params)
        if not self._live:
            return [torch.zeros_like(p) for p in self.params]
        outputs = [
            vec[i].to(device=self.params[i].device, dtype=self._grads[k].dtype)
            for k, i in enumerate(self._live)
        ]
        try:
            prods = torch.autograd.grad(
                self._grads, self.params, grad_outputs=outputs, retain_graph=True, allow_unused=True
            )
        except RuntimeError as err:
            # The graph and the inputs were checked above: whatever fails in this backward
            # through the first backward's graph is a missing or refused double backward.
            raise DoubleBackwardUnsupported(str(err)) from err
        return [
            torch.zeros_like(p) if h is None else _dense(h.detach())
            for p, h in zip(self.params, prods, strict=True)
        ]


def hvp(
    loss_fn: Callable[[], Tensor], params: Sequence[Tensor], vec: Sequence[Tensor]
) -> list[Tensor]:
    """Hessian-vector product of a loss by double backward.

    Uses :func:`torch.autograd.grad` only, so ``p.grad`` is left alone. For many products at the
    same point, build one :class:`HessianOperator` instead: it evaluates the loss once.

    Args:
        loss_fn: Closure computing the scalar loss from ``params``.
        params: Tensors to differentiate with respect to; each must require grad.
        vec: One tensor per parameter, shaped like it.

    Returns:
        ``H @ vec`` as one tensor per parameter; zero for parameters the loss does not use.

    Example:
        >>> x = torch.tensor([1.0, -1.0], requires_grad=True)
        >>> hvp(lambda: x[0] ** 2 - x[1] ** 2, [x], [torch.tensor([1.0, 1.0])])
        [tensor([ 2., -2.])]
    """
    return HessianOperator(loss_fn, params)(vec)


def _check_eps(eps: object) -> float | None:
    return None if eps is None else check_positive_float("eps", eps)


class FiniteDifferenceHessianOperator:
    """The Hessian of a loss as a linear operator, by central differences of gradients.

    ``H v ~ (g(theta + h v) - g(theta - h v)) / 2h``, where ``g`` is the gradient by an ordinary
    first-order backward. It needs no double backward, so it works through fused kernels
    (flash and memory-efficient attention), ``torch.compile``d modules and custom autograd
    functions that :class:`HessianOperator` cannot differentiate twice. Each product costs two
    forwards and two backwards and holds no graph between them. With the default step its error
    is about ``1e-4`` relative in float32 and ``1e-10`` in float64 on smooth models
    (``benchmarks/results/fd_hvp_accuracy.md``). With piecewise-linear activations (ReLU) a
    step that crosses a kink adds the jump in the gradient, which the exact product ignores: the
    default step is kept small for that reason.

    The parameters are moved in place (under :func:`torch.no_grad`) for each gradient and then
    given back their saved values by copy, so after every product, even one that raised, they are
    bitwise what they were (only their version counters advance). ``p.grad`` is never read or
    written. ``loss_fn`` must be a deterministic function of the parameters (reseed dropout inside
    it); anything else it changes (BatchNorm running statistics, say) is the caller's to restore.

    Args:
        loss_fn: Closure computing the scalar loss from ``params``; called once here and twice
            per product.
        params: Tensors to differentiate with respect to; each must require grad.
        eps: Relative step: the perturbation ``h v`` has norm ``eps * (1 + ||theta||)``. By
            default a tenth of the cube root of the machine epsilon of the least precise
            parameter dtype (``5e-4`` in float32, ``6e-7`` in float64).

    Raises:
        ValueError: If ``params`` is empty or holds a tensor that does not require grad, if
            ``loss_fn`` does not return a scalar floating-point tensor that requires grad, or if
            ``eps`` is not a finite positive number.

    Example:
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> op = FiniteDifferenceHessianOperator(lambda: (x**3).sum(), [x])
        >>> [round(h, 6) for h in op([torch.ones(2, dtype=torch.float64)])[0].tolist()]
        [6.0, 12.0]
        >>> x
        tensor([1., 2.], dtype=torch.float64, requires_grad=True)
    """

    method = "finite_difference"

    def __init__(
        self,
        loss_fn: Callable[[], Tensor],
        params: Sequence[Tensor],
        *,
        eps: float | None = None,
    ) -> None:
        self.params = _check_params(params)
        step = _check_eps(eps)
        self._loss_fn = loss_fn
        self._dtype = _work_dtype(self.params)
        self._device = self.params[0].device
        self._saved = [p.detach().clone() for p in self.params]
        self._flat = flatten(self._saved, dtype=self._dtype, device=self._device)
        if step is None:
            # Central differences have a truncation error ~ h^2 (third derivatives) and a
            # rounding error ~ eps_mach |g| / h (the gradients are accurate to about eps_mach
            # relative, and theta + h v is rounded to it); their sum is smallest at
            # h ~ eps_mach^(1/3), for a relative error ~ eps_mach^(2/3). The dtype that limits
            # both is the least precise one the parameters are stored in. We step a tenth of
            # that: below the optimum the error grows only as 1/h, above it as h^2, and for
            # piecewise-linear activations (ReLU) the chance that the step crosses a kink, whose
            # gradient jump the exact product ignores but a difference of gradients does not,
            # grows as h. Measured (benchmarks/results/fd_hvp_accuracy.md): about 1e-4 relative
            # in float32 and 1e-10 in float64, where the nominal optimum gains at most a factor
            # of 10 on smooth models and is off by 30% on a ReLU transformer layer.
            machine = max(torch.finfo(p.dtype).eps for p in self.params)
            step = 0.1 * machine ** (1.0 / 3.0)
        #: Relative step: each perturbation ``h v`` has norm ``eps * (1 + ||theta||)``.
        self.eps: float = step
        # The step is relative to the parameters' norm: the perturbation of theta is then eps
        # relative, far above the eps_mach at which `theta + h v` would round back to theta,
        # whatever the scale of the weights, and the same whatever that scale (derivatives of a
        # network's loss scale with the weights alike). The 1 keeps it from vanishing at
        # theta = 0. Dividing by ||v|| (in __call__) makes the product linear in v.
        self._radius = step * (1.0 + float(self._flat.norm()))
        loss, grad = self._loss_and_grad()
        self.loss: Tensor = loss.detach()
        self.grad: list[Tensor] = grad

    def _loss_and_grad(self) -> tuple[Tensor, list[Tensor]]:
        loss = _check_loss(self._loss_fn())
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return loss, [
            torch.zeros_like(p) if g is None else _dense(g.detach())
            for p, g in zip(self.params, grads, strict=True)
        ]

    def _grad_at(self, step: Tensor) -> Tensor:
        """The gradient at ``theta + step`` (flat, in the work dtype); theta is restored after."""
        # theta + step is rounded once, from the work dtype to each parameter's own.
        moved = unflatten(self._flat + step, self.params)
        try:
            with torch.no_grad():
                for p, value in zip(self.params, moved, strict=True):
                    p.copy_(value)
            _, grad = self._loss_and_grad()
        finally:
            # Copy the saved values back rather than subtract the step: `(theta + s) - s` need
            # not round to theta.
            with torch.no_grad():
                for p, saved in zip(self.params, self._saved, strict=True):
                    p.copy_(saved)
        return flatten(grad, dtype=self._dtype, device=self._device)

    def __call__(self, vec: Sequence[Tensor]) -> list[Tensor]:
        """Return the central-difference estimate of ``H @ vec``.

        Args:
            vec: One tensor per parameter, shaped like it; converted to its device and dtype.

        Returns:
            One tensor per parameter, shaped like it, on its device and in its dtype.

        Raises:
            ValueError: If ``vec`` does not match the parameters in length or shapes, or if
                ``loss_fn`` stops returning a usable loss at a perturbed point.
        """
        vec = _check_vec(vec, self.params)
        v = flatten(vec, dtype=self._dtype, device=self._device)
        norm = float(v.norm())
        if norm == 0.0:
            return [torch.zeros_like(p) for p in self.params]
        if not math.isfinite(norm):
            return [torch.full_like(p, math.nan) for p in self.params]
        h = self._radius / norm
        plus = self._grad_at(h * v)
        minus = self._grad_at(-h * v)
        return [piece.clone() for piece in unflatten((plus - minus) / (2.0 * h), self.params)]


def fd_hvp(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    vec: Sequence[Tensor],
    *,
    eps: float | None = None,
) -> list[Tensor]:
    """Hessian-vector product of a loss by central differences of gradients.

    The first-order counterpart of :func:`hvp`, for graphs without double backward; see
    :class:`FiniteDifferenceHessianOperator`, which also serves many products at one point.

    Args:
        loss_fn: Closure computing the scalar loss from ``params``; deterministic.
        params: Tensors to differentiate with respect to; each must require grad. Moved in place
            during the call and restored bitwise.
        vec: One tensor per parameter, shaped like it.
        eps: Relative step (see :class:`FiniteDifferenceHessianOperator`).

    Returns:
        An estimate of ``H @ vec`` as one tensor per parameter.

    Example:
        >>> x = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> h = fd_hvp(lambda: x[0] ** 2 - x[1] ** 2, [x], [torch.ones(2, dtype=torch.float64)])
        >>> [round(v, 6) for v in h[0].tolist()]
        [2.0, -2.0]
    """
    return FiniteDifferenceHessianOperator(loss_fn, params, eps=eps)(vec)


def _tensor_eq(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _float_eq(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@dataclass(frozen=True)
class Spectrum:
    """Extreme eigenpairs of a Hessian, as estimated by :func:`lanczos`.

    Two spectra compare equal when every number and every tensor of ``eigvec_min`` is bitwise
    equal (``nan`` equals ``nan``).

    Attributes:
        lambda_max: Largest Ritz value, an estimate of the largest eigenvalue.
        lambda_min: Smallest Ritz value, an estimate of the smallest eigenvalue.
        eigvec_min: Ritz vector of ``lambda_min``, of unit 2-norm over all parameters together,
            one tensor per parameter, shaped like it, on its device and in its dtype.
        residual_max: Residual estimate ``||H v - lambda_max v||`` of the top Ritz pair.
        residual_min: Residual estimate ``||H v - lambda_min v||`` of the bottom Ritz pair.
        iterations: Lanczos steps taken (products computed).
        dim: Number of parameters (the size of the Hessian; a complex parameter counts as two,
            its real and imaginary parts).
        loss: Loss at the point, when known (:func:`hessian_spectrum`); else ``nan``.
        grad_norm: 2-norm of the gradient, when known; else ``nan``.
        grad_dot_eigvec: ``g . eigvec_min``, when known; else ``nan``. :func:`hessian_spectrum`
            orients ``eigvec_min`` so that this is never positive (a descent direction).
        method: How the Hessian-vector products were taken: ``"exact"`` (double backward) or
            ``"finite_difference"`` (central differences of gradients).
    """

    lambda_max: float
    lambda_min: float
    eigvec_min: list[Tensor] = dataclasses.field(repr=False)
    residual_max: float
    residual_min: float
    iterations: int
    dim: int
    loss: float = math.nan
    grad_norm: float = math.nan
    grad_dot_eigvec: float = math.nan
    method: str = "exact"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Spectrum):
            return NotImplemented
        numbers = (
            "lambda_max",
            "lambda_min",
            "residual_max",
            "residual_min",
            "loss",
            "grad_norm",
            "grad_dot_eigvec",
        )
        return (
            self.iterations == other.iterations
            and self.dim == other.dim
            and self.method == other.method
            and all(_float_eq(getattr(self, n), getattr(other, n)) for n in numbers)
            and len(self.eigvec_min) == len(other.eigvec_min)
            and all(
                _tensor_eq(a, b) for a, b in zip(self.eigvec_min, other.eigvec_min, strict=True)
            )
        )

    def describe(self) -> str:
        """Say in one line what the spectrum means for optimisation.

        Returns:
            A sentence with the eigenvalues, e.g. ``"negative curvature: lambda_min -2 ..."``.

        Example:
            >>> s = Spectrum(2.0, -2.0, [torch.tensor([0.0, 1.0])], 0.0, 0.0, 2, 2)
            >>> s.describe()
            'negative curvature: lambda_min -2 (lambda_max 2, ratio -1) after 2 Lanczos steps'
        """
        scale = max(abs(self.lambda_max), abs(self.lambda_min))
        ratio = self.lambda_min / scale if scale > 0 else 0.0
        kind = "negative curvature" if self.lambda_min < 0 else "no negative curvature"
        how = "" if self.method == "exact" else f" ({self.method.replace('_', ' ')} products)"
        return (
            f"{kind}: lambda_min {self.lambda_min:.4g} (lambda_max {self.lambda_max:.4g}, "
            f"ratio {ratio:.3g}) after {self.iterations} Lanczos steps{how}"
        )


def _check_steps(steps: object) -> int:
    return check_positive_int("steps", steps)


def _check_tol(tol: object) -> float:
    return check_nonnegative_float("tol", tol)


def _check_generator(generator: object) -> torch.Generator | None:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"`generator` must be a CPU torch.Generator or None, got {generator!r}.")
    return generator


def lanczos(
    matvec: Callable[[list[Tensor]], list[Tensor]],
    like: Sequence[Tensor],
    *,
    steps: int = 30,
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
) -> Spectrum:
    """Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Each new Lanczos vector is orthogonalised against all previous ones twice (classical
    Gram-Schmidt, two passes), which keeps the basis orthogonal to working precision so that no
    spurious copies of converged eigenvalues appear. The tridiagonal eigenproblem is solved in
    float64 with :func:`torch.linalg.eigh`.

    The start vector is drawn from ``generator`` on the CPU in float32 and then moved to the
    working device, so every process seeding the same generator starts from the same vector
    (needed under DDP, where all ranks must run identical iterations). Without a generator it is
    drawn from the global CPU generator.

    Iteration stops after ``min(steps, dim)`` products, or earlier when the Krylov space becomes
    invariant (the next ``beta`` is zero to rounding, so the Ritz values are exact eigenvalues) or
    when the residuals of both extreme Ritz pairs are at most ``tol * max(|lambda|)``.

    Memory: the basis and work vectors take ``(steps + 3) * dim`` floats (float64 when ``like``
    holds float64 tensors, else float32), on the device of ``like[0]``, besides what ``matvec``
    itself needs.

    Args:
        matvec: The operator: maps one tensor per entry of ``like`` to the same. Must be
            symmetric (self-adjoint) for the result to mean anything.
        like: Tensors giving the shapes, devices and dtypes that ``matvec`` works with.
        steps: Maximum number of Lanczos steps (products).
        generator: CPU generator for the start vector.
        tol: Relative residual tolerance for stopping early; ``0`` never stops early on
            residuals.

    Returns:
        The extreme Ritz values, the Ritz vector of the smallest and the residual estimates.

    Raises:
        ValueError: If an argument is invalid or ``matvec`` returns tensors of the wrong shapes.
        FloatingPointError: If a product is not finite.

    Example:
        >>> a = torch.diag(torch.tensor([3.0, 1.0, -2.0]))
        >>> gen = torch.Generator().manual_seed(0)
        >>> s = lanczos(lambda v: [a @ v[0]], [torch.empty(3)], generator=gen)
        >>> round(s.lambda_max, 4), round(s.lambda_min, 4), s.iterations
        (3.0, -2.0, 3)
    """
    steps = _check_steps(steps)
    tol = _check_tol(tol)
    generator = _check_generator(generator)
    like = list(like)
    dim = sum(_size(t) for t in like)
    if not like or dim == 0:
        raise ValueError(f"`like` must hold tensors with at least one element, got {like!r}.")
    dtype = _work_dtype(like)
    device = like[0].device
    eps = torch.finfo(dtype).eps
    m_max = min(steps, dim)

    def apply(q: Tensor) -> Tensor:
        out = list(matvec(unflatten(q, like)))
        if len(out) != len(like) or any(o.shape != t.shape for o, t in zip(out, like, strict=True)):
            raise ValueError(
                "`matvec` must return one tensor per entry of `like`, shaped like it, got "
                f"shapes {[tuple(o.shape) for o in out]}."
            )
        w = flatten(out, dtype=dtype, device=device)
        if not bool(torch.isfinite(w).all()):
            raise FloatingPointError("The operator product is not finite.")
        return w

    basis = torch.empty(m_max + 1, dim, dtype=dtype, device=device)
    start = torch.randn(dim, generator=generator, dtype=torch.float32, device="cpu")
    start = start.to(device=device, dtype=dtype)
    basis[0] = start / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    m = 0
    while True:
        q = basis[m]
        w = apply(q)
        alpha = float(torch.dot(q, w))
        w = w - alpha * q
        if m > 0:
            w = w - betas[-1] * basis[m - 1]
        qs = basis[: m + 1]
        # One pass of classical Gram-Schmidt leaves errors of order eps * cond in float32; a
        # second pass brings them to eps ("twice is enough", Kahan and Parlett).
        for _ in range(2):
            w = w - qs.T @ (qs @ w)
        beta = float(w.norm())
        alphas.append(alpha)
        m += 1
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        theta, vecs = torch.linalg.eigh(t)
        # Ritz residual ||H y - theta y|| = |beta_m * last component of the eigenvector|,
        # exact while the basis stays orthogonal, which the reorthogonalisation ensures.
        res = (beta * vecs[-1, :]).abs()
        scale = float(theta.abs().max())
        invariant = beta <= 100 * eps * scale or beta == 0.0
        converged = float(torch.maximum(res[0], res[-1])) <= tol * scale
        if invariant or converged or m >= m_max:
            break
        betas.append(beta)
        basis[m] = w / beta

    y = (basis[:m].T @ vecs[:, 0].to(device=device, dtype=dtype)).contiguous()
    y = y / y.norm()
    return Spectrum(
        lambda_max=float(theta[-1]),
        lambda_min=float(theta[0]),
        eigvec_min=[piece.clone() for piece in unflatten(y, like)],
        residual_max=float(res[-1]),
        residual_min=float(res[0]),
        iterations=m,
        dim=dim,
    )


def _operator(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    reduce: Callable[[Tensor], Tensor] | None,
    method: str,
) -> HessianOperator | FiniteDifferenceHessianOperator:
    """The Hessian operator ``method`` names, after checking ``reduce`` and ``method``."""
    if reduce is not None and not callable(reduce):
        raise ValueError(f"`reduce` must be callable or None, got {reduce!r}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if method == "exact":
        return HessianOperator(loss_fn, params)
    return FiniteDifferenceHessianOperator(loss_fn, params)


def _reducer(
    reduce: Callable[[Tensor], Tensor] | None, dtype: torch.dtype, device: torch.device
) -> Callable[[Tensor], Tensor]:
    """``reduce``, checked to keep its input's shape and cast back; the identity for None."""

    def reduced(x: Tensor) -> Tensor:
        if reduce is None:
            return x
        out = reduce(x)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise ValueError(
                f"`reduce` must return a tensor of the shape of its input {tuple(x.shape)}, "
                f"got {getattr(out, 'shape', type(out).__name__)}."
            )
        return out.to(dtype=dtype, device=device)

    return reduced


def hessian_spectrum(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    steps: int = 30,
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
    reduce: Callable[[Tensor], Tensor] | None = None,
    method: str = "exact",
) -> Spectrum:
    """Extreme Hessian eigenpairs of a loss, with its value and gradient.

    Builds one :class:`HessianOperator` (one forward and one backward with ``create_graph``), or
    with ``method="finite_difference"`` one :class:`FiniteDifferenceHessianOperator` (one forward
    and one first-order backward, then two of each per product), and runs :func:`lanczos` on it.
    The returned ``eigvec_min`` is oriented so that ``grad_dot_eigvec <= 0``: a step along it
    descends to first order too.

    Under data parallelism pass a ``reduce`` that averages a tensor over the processes (an
    all-reduce mean): every product, and the gradient and loss (packed into one call), are passed
    through it, so all processes run identical iterations on the Hessian of the global loss and
    get identical results, provided they seed ``generator`` alike. Each product then costs one
    all-reduce of ``dim`` floats.

    Args:
        loss_fn: Closure computing the scalar loss from ``params``; called once.
        params: Tensors to differentiate with respect to; each must require grad.
        steps: Maximum number of Lanczos steps.
        generator: CPU generator for the start vector.
        tol: Relative residual tolerance for stopping early.
        reduce: Maps a flat vector to its average over processes; ``None`` for one process.
        method: ``"exact"`` (double backward) or ``"finite_difference"`` (first-order backward
            only); one of :data:`METHODS`.

    Returns:
        The spectrum, with ``loss``, ``grad_norm``, ``grad_dot_eigvec`` and ``method`` filled in.

    Raises:
        ValueError: If an argument is invalid or ``reduce`` changes the shape of its input.
        DoubleBackwardUnsupported: With ``method="exact"``, if the loss's graph cannot be
            differentiated twice.

    Example:
        >>> xy = torch.zeros(2, requires_grad=True)
        >>> f = lambda: xy[0] ** 2 - xy[1] ** 2 + xy[1] ** 4 / 4
        >>> s = hessian_spectrum(f, [xy], generator=torch.Generator().manual_seed(0))
        >>> round(s.lambda_min, 4), round(s.lambda_max, 4), s.grad_norm
        (-2.0, 2.0, 0.0)
    """
    _check_steps(steps)
    _check_tol(tol)
    _check_generator(generator)
    op = _operator(loss_fn, params, reduce, method)
    like = op.params
    dtype = _work_dtype(like)
    device = like[0].device
    reduced = _reducer(reduce, dtype, device)

    packed = torch.cat(
        [flatten(op.grad, dtype=dtype, device=device), op.loss.reshape(1).to(device, dtype)]
    )
    packed = reduced(packed)
    grad, loss = packed[:-1], packed[-1]

    def matvec(vec: list[Tensor]) -> list[Tensor]:
        if reduce is None:
            return op(vec)
        return unflatten(reduced(flatten(op(vec), dtype=dtype, device=device)), like)

    spec = lanczos(matvec, like, steps=steps, generator=generator, tol=tol)
    eig = flatten(spec.eigvec_min, dtype=dtype, device=device)
    g_dot_v = float(torch.dot(grad, eig))
    eigvec = spec.eigvec_min
    if g_dot_v > 0:
        eigvec = [-v for v in eigvec]
        g_dot_v = -g_dot_v
    return dataclasses.replace(
        spec,
        eigvec_min=eigvec,
        loss=float(loss),
        grad_norm=float(grad.norm()),
        grad_dot_eigvec=g_dot_v,
        method=op.method,
    )


def curvature_along(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    direction: Sequence[Tensor],
    *,
    reduce: Callable[[Tensor], Tensor] | None = None,
    method: str = "exact",
) -> tuple[float, float]:
    """The curvature of a loss along one direction, ``vᵀHv / vᵀv``, and the loss itself.

    One Hessian-vector product: evaluated on another batch than the one a :func:`lanczos` run
    found ``direction`` on, it tells whether that direction's curvature is the loss's or the
    batch's (the smallest eigenvalue of a small batch's Hessian is an extreme of its noise).

    Args:
        loss_fn: Closure computing the scalar loss from ``params``; called once (three times
            with ``method="finite_difference"``).
        params: Tensors to differentiate with respect to; each must require grad.
        direction: One tensor per parameter, shaped like it, not all zero.
        reduce: Maps a flat vector to its average over processes; ``None`` for one process.
        method: ``"exact"`` (double backward) or ``"finite_difference"``; one of :data:`METHODS`.

    Returns:
        ``(vᵀHv / vᵀv, loss)``, both averaged by ``reduce`` if given.

    Raises:
        ValueError: If an argument is invalid, ``direction`` is zero, or ``reduce`` changes the
            shape of its input.
        DoubleBackwardUnsupported: With ``method="exact"``, if the loss's graph cannot be
            differentiated twice.

    Example:
        >>> xy = torch.zeros(2, requires_grad=True)
        >>> f = lambda: xy[0] ** 2 - xy[1] ** 2
        >>> curvature_along(f, [xy], [torch.tensor([0.0, 3.0])])
        (-2.0, 0.0)
    """
    op = _operator(loss_fn, params, reduce, method)
    like = op.params
    vec = _check_vec(direction, like)
    dtype = _work_dtype(like)
    device = like[0].device
    v = flatten(vec, dtype=dtype, device=device)
    norm2 = float(torch.dot(v, v))
    if not norm2 > 0:
        raise ValueError("`direction` must not be zero.")
    packed = torch.cat(
        [flatten(op(vec), dtype=dtype, device=device), op.loss.reshape(1).to(device, dtype)]
    )
    packed = _reducer(reduce, dtype, device)(packed)
    return float(torch.dot(packed[:-1], v)) / norm2, float(packed[-1])
