"""The op layer: ``torch.library`` custom ops over the backends, with autograd and fake kernels.

Three ops, all functional (no input is mutated, so autograd, ``torch.compile`` and
``torch.export`` can treat them as pure functions):

* ``batchnorm::forward_train(x, weight?, bias?, running_mean?, running_var?, momentum, eps,
  backend) -> (y, save_mean, save_invstd, new_running_mean, new_running_var)``: batch
  statistics, normalization, affine and the running-stat update in one call. The new running
  buffers are returned (empty when not tracked) and copied into the module's buffers by the
  caller: a C-element copy that keeps the op functional, and that also means an autotuned GPU
  kernel can be re-run without applying the update twice.
* ``batchnorm::forward_eval(x, weight?, bias?, running_mean, running_var, eps, backend) -> y``.
* ``batchnorm::backward(dy, x, weight?, mean, invstd, training, output_mask, backend)
  -> (dx, dweight, dbias)``; outputs not asked for are empty.

The backend name is a plain string argument, resolved before the call (never ``"auto"`` here).

Double backward: a backward run with ``create_graph=True`` (grad mode on inside the backward)
does not call the kernels, whose outputs carry no graph; it recomputes the layer as
differentiable torch ops (:func:`_composite_forward`) and differentiates that, so second
derivatives (gradient penalties, Hessian-vector products) are exact. The in-place activated
mode, whose input is gone by then, raises instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .backends import get_backend
from .backends.activations import act_forward, invertible_weight
from .backends.base import (
    acc_dtype,
    bcast,
    empty_out_like,
    match_layout,
    reduce_dims,
    running_update,
    safe_invstd,
)

__all__ = [
    "BatchNormActFunction",
    "backward",
    "batch_norm_act",
    "batch_norm_eval",
    "batch_norm_train",
    "forward_eval",
    "forward_train",
]

_EMPTY = (0,)


def _empty(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return x.new_empty(_EMPTY, dtype=dtype or acc_dtype(x))


def _forward_train_impl(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    c = x.shape[1]
    if x.numel() == 0:
        # PyTorch: an empty batch gives an empty output and leaves the running stats alone.
        acc = acc_dtype(x)
        rm = _empty(x) if running_mean is None else running_mean.clone()
        rv = _empty(x) if running_var is None else running_var.clone()
        zeros = x.new_zeros((c,), dtype=acc)
        return empty_out_like(x), zeros, zeros.clone(), rm, rv
    y, mean, invstd, rm, rv = get_backend(backend).forward_train(
        x, weight, bias, running_mean, running_var, momentum, eps
    )
    return y, mean, invstd, _empty(x) if rm is None else rm, _empty(x) if rv is None else rv


@torch.library.custom_op("batchnorm::forward_train", mutates_args=())
def forward_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training forward with batch statistics; see the module docstring."""
    return _forward_train_impl(x, weight, bias, running_mean, running_var, momentum, eps, backend)


@forward_train.register_fake
def _forward_train_fake(x, weight, bias, running_mean, running_var, momentum, eps, backend):
    c = x.shape[1]
    acc = acc_dtype(x)
    rm = _empty(x) if running_mean is None else torch.empty_like(running_mean)
    rv = _empty(x) if running_var is None else torch.empty_like(running_var)
    return empty_out_like(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc), rm, rv


def _forward_eval_impl(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    backend: str,
) -> Tensor:
    if x.numel() == 0:
        return empty_out_like(x)
    return get_backend(backend).forward_eval(x, weight, bias, running_mean, running_var, eps)


@torch.library.custom_op("batchnorm::forward_eval", mutates_args=())
def forward_eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    backend: str,
) -> Tensor:
    """Inference forward with the running statistics."""
    return _forward_eval_impl(x, weight, bias, running_mean, running_var, eps, backend)


@forward_eval.register_fake
def _forward_eval_fake(x, weight, bias, running_mean, running_var, eps, backend):
    return empty_out_like(x)


def _backward_impl(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    output_mask: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    c = x.shape[1]
    mask = (bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]))
    if x.numel() == 0:
        zeros = x.new_zeros((c,), dtype=acc_dtype(x))
        return (
            empty_out_like(x) if mask[0] else _empty(x, x.dtype),
            zeros if mask[1] else _empty(x),
            zeros.clone() if mask[2] else _empty(x),
        )
    dy = match_layout(dy, x)
    dx, dw, db = get_backend(backend).backward(dy, x, weight, mean, invstd, training, mask)
    return (
        dx if dx is not None else _empty(x, x.dtype),
        dw if dw is not None else _empty(x),
        db if db is not None else _empty(x),
    )


@torch.library.custom_op("batchnorm::backward", mutates_args=())
def backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    output_mask: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dweight, dbias)`` in ``(x.dtype, acc, acc)``; unrequested ones empty."""
    return _backward_impl(dy, x, weight, mean, invstd, training, output_mask, backend)


@backward.register_fake
def _backward_fake(dy, x, weight, mean, invstd, training, output_mask, backend):
    c = x.shape[1]
    acc = acc_dtype(x)
    return (
        empty_out_like(x) if output_mask[0] else x.new_empty(_EMPTY),
        x.new_empty((c,), dtype=acc) if output_mask[1] else x.new_empty(_EMPTY, dtype=acc),
        x.new_empty((c,), dtype=acc) if output_mask[2] else x.new_empty(_EMPTY, dtype=acc),
    )


def _composite_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    mean: Tensor | None,
    invstd: Tensor | None,
    training: bool,
    eps: float,
    activation: str = "identity",
    slope: float = 0.0,
) -> Tensor:
    r"""``act(BN(x) + residual)`` as differentiable torch ops in the accumulation dtype: the
    graph a ``create_graph=True`` backward differentiates, and the forward under forward-mode
    AD and torch.func transforms.

    In training the statistics are computed from ``x`` (biased variance, two-pass; ``mean``
    and ``invstd`` are not used), so that their dependence on ``x`` is part of the graph; in
    eval ``mean``/``invstd`` are the constants from the running buffers.
    """
    acc = acc_dtype(x)
    xf = x.to(acc)
    if training:
        var, m = torch.var_mean(xf, dim=reduce_dims(x), correction=0, keepdim=True)
        z = (xf - m) * torch.rsqrt(var + eps)
    else:
        assert mean is not None and invstd is not None
        z = (xf - bcast(mean, x)) * bcast(invstd, x)
    if weight is not None:
        z = z * bcast(weight.to(acc), x)
    if bias is not None:
        z = z + bcast(bias.to(acc), x)
    if residual is not None:
        z = z + residual.to(acc)
    return act_forward(z, activation, slope)


def _grads_with_graph(
    dy: Tensor, y: Tensor, inputs: tuple[Tensor | None, ...], mask: tuple[bool, ...]
) -> list[Tensor | None]:
    """``d<y, dy>/d input`` for the inputs in ``mask``, themselves differentiable
    (``create_graph=True``); None where not asked for."""
    wanted = [t for t, m in zip(inputs, mask) if m and t is not None]
    got = iter(torch.autograd.grad(y, wanted, dy.to(y.dtype), create_graph=True,
                                   allow_unused=True) if wanted else ())
    out: list[Tensor | None] = []
    for t, m in zip(inputs, mask):
        g = next(got) if m and t is not None else None
        out.append(torch.zeros_like(t) if g is None and m and t is not None else g)
    return out


def _double_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, eps: float,
    need_dx: bool, need_dw: bool, need_db: bool, training: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """A backward with ``create_graph=True``: the gradients of the layer recomputed as
    differentiable torch ops (:func:`_composite_forward`), themselves differentiable;
    ``dweight``/``dbias`` in the accumulation dtype. Also what the backends' eager steps
    call back for it (:meth:`~.backends.base.Backend.eager_train`)."""
    y = _composite_forward(x, weight, None, None, mean, invstd, training, eps)
    dx, dw = _grads_with_graph(dy, y, (x, weight), (need_dx, need_dw))
    db = dy.to(y.dtype).sum(reduce_dims(x)) if need_db else None
    return dx, dw, db


def _grads(
    ctx: Any, dy: Tensor, training: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    x, weight, mean, invstd = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
            bool(ctx.needs_input_grad[2])]
    if not any(mask):
        return None, None, None
    if torch.is_grad_enabled() and x.numel() > 0:
        # create_graph=True: differentiate the composite instead (see the module docstring).
        dx, dw, db = _double_backward(dy, x, weight, mean, invstd, ctx.eps, *mask,
                                      training=training)
        return (dx, dw if dw is None else dw.to(ctx.weight_dtype),
                db if db is None else db.to(ctx.bias_dtype))
    # Under torch.compile/export the custom op keeps the backward opaque; eagerly the
    # implementation is called directly (same code, no dispatcher round trip).
    bwd = _backward_impl if getattr(ctx, "eager", False) else backward
    dx, dw, db = bwd(dy, x, weight, mean, invstd, training, mask, ctx.backend)
    return (
        dx if mask[0] else None,
        (dw if dw.dtype == ctx.weight_dtype else dw.to(ctx.weight_dtype)) if mask[1] else None,
        (db if db.dtype == ctx.bias_dtype else db.to(ctx.bias_dtype)) if mask[2] else None,
    )


def _setup_train(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias = inputs[:3]
    _, mean, invstd, _, _ = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.backend, ctx.eps = inputs[7], inputs[6]
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_train(ctx: Any, dy: Tensor, *_unused: Tensor) -> tuple:
    return (*_grads(ctx, dy, True), None, None, None, None, None)


forward_train.register_autograd(_backward_train, setup_context=_setup_train)


def _running_constants(
    x: Tensor, running_mean: Tensor, running_var: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Eval's ``(mean, invstd)`` from the running buffers, detached, in the accumulation dtype."""
    acc = acc_dtype(x)
    return running_mean.detach().to(acc), safe_invstd(running_var.detach().to(acc), eps)


def _setup_eval(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, bias, running_mean, running_var, eps, backend = inputs
    # Running statistics are constants in eval: save them as the backward's mean/invstd.
    mean, invstd = _running_constants(x, running_mean, running_var, eps)
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.backend, ctx.eps = backend, eps
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_eval(ctx: Any, dy: Tensor) -> tuple:
    return (*_grads(ctx, dy, False), None, None, None, None)


forward_eval.register_autograd(_backward_eval, setup_context=_setup_eval)


# ---- eager fast path -------------------------------------------------------------------------
# A custom op's Python dispatch costs tens of microseconds per call, which adds up over the
# ~100 BN layers of a speaker encoder at small batch sizes. Outside tracing we call the same
# implementations through plain autograd.Functions that share the ops' setup and backward
# code; tracing (compile, export, fake tensors, jit.trace) always sees the custom ops, and
# forward-mode AD and torch.func transforms get the layer as torch ops.


def _traced(x: Tensor) -> bool:
    """Tracing that must see an op, not kernels writing through raw pointers: torch.compile,
    torch.export and fake tensors, and ``torch.jit.trace`` (which otherwise records only the
    output's allocation, so the traced graph would return uninitialized memory)."""
    return (torch.compiler.is_compiling() or type(x) not in (Tensor, torch.nn.Parameter)
            or torch._C._is_tracing())


_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor",
                                lambda t: False)


def _transformed(*tensors: Tensor | None) -> bool:
    """Forward-mode AD is active, or one of ``tensors`` (input, parameters, residual) is
    inside a torch.func transform (grad, vmap, jvp; over the parameters alone too): the
    kernels would drop the tangent or fail on the wrapper, so the layer runs as differentiable
    torch ops (:func:`_composite_forward`) instead."""
    return forward_ad._current_level >= 0 or any(
        t is not None and _is_functorch_wrapped(t) for t in tensors)


def _composite_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
) -> Tensor:
    """Training forward as torch ops (see :func:`_transformed`); updates the running buffers
    in place from the batch statistics (unbiased variance), as the kernels do."""
    y = _composite_forward(x, weight, bias, None, None, None, True, eps)
    if running_mean is not None and running_var is not None and x.numel() > 0:
        with torch.no_grad():
            # the composite backend's statistics, and the update every backend shares
            mean, m2 = get_backend("torch").stats(x.detach())
            new_mean, new_var = running_update(running_mean, running_var, mean, m2,
                                               x.numel() // x.shape[1], momentum)
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y.to(x.dtype)


def _composite_eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    """Eval forward as torch ops (see :func:`_transformed`)."""
    mean, invstd = _running_constants(x, running_mean, running_var, eps)
    return _composite_forward(x, weight, bias, None, mean, invstd, False, eps).to(x.dtype)


_C_APPLY = torch._C._FunctionBase.__dict__["apply"]


def fast_apply(cls: type[torch.autograd.Function], *args: Any) -> Any:
    """``cls.apply(*args)`` without ``Function.apply``'s Python wrapper: that binds the
    arguments through ``inspect.signature`` and maps ``unwrap_dead_wrappers`` over them as a
    pytree on every call (about 20 us of a step warm, 45 us after another layer has evicted
    the interpreter's data from the caches). Both exist for functorch transforms, which take
    the wrapper's path here; the callers send wrapped tensors to the composite fallback
    before they get here (:func:`_transformed`)."""
    if torch._C._are_functorch_transforms_active():
        return cls.apply(*args)
    return _C_APPLY.__get__(cls, cls)(*args)


class _EagerTrain(torch.autograd.Function):
    """The eager training forward: returns ``y`` only (each further output of an
    autograd.Function costs several microseconds) and updates the running buffers itself."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tensor:  # type: ignore[override]
        output = _forward_train_impl(*inputs)
        _setup_train(ctx, inputs, output)
        ctx.eager = True
        _copy_running(inputs[3], inputs[4], output[3], output[4])
        return output[0]

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple:  # type: ignore[override]
        return _backward_train(ctx, dy)


class _EagerEval(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tensor:  # type: ignore[override]
        output = _forward_eval_impl(*inputs)
        _setup_eval(ctx, inputs, output)
        ctx.eager = True
        return output

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple:  # type: ignore[override]
        return _backward_eval(ctx, dy)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _copy_running(running_mean: Tensor | None, running_var: Tensor | None,
                  new_mean: Tensor, new_var: Tensor) -> None:
    """Write the updated running statistics into the buffers (when tracked)."""
    if running_mean is not None and running_var is not None:
        if torch.is_grad_enabled():  # (an autograd.Function's forward runs without grad)
            with torch.no_grad():
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
        else:
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)


def batch_norm_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    backend: str,
) -> Tensor:
    """Training forward: returns ``y`` and updates the running buffers in place (when given),
    through the custom op when traced, else the eager fast path."""
    args = (x, weight, bias, running_mean, running_var, momentum, eps, backend)
    if _traced(x):
        y, _, _, new_mean, new_var = forward_train(*args)
    elif _transformed(x, weight, bias):
        return _composite_train(x, weight, bias, running_mean, running_var, momentum, eps)
    else:
        # a backend's own eager step (the numba backend's in C++), else ours below
        out = get_backend(backend).eager_train(
            x, weight, bias, running_mean, running_var, momentum, eps, _double_backward)
        if out is not None:
            return out
        if _needs_grad(x, weight, bias):
            return fast_apply(_EagerTrain, *args)
        y, _, _, new_mean, new_var = _forward_train_impl(*args)
    _copy_running(running_mean, running_var, new_mean, new_var)
    return y


def batch_norm_eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    backend: str,
) -> Tensor:
    """``forward_eval`` through the custom op when traced, else the eager fast path."""
    args = (x, weight, bias, running_mean, running_var, eps, backend)
    if _traced(x):
        return forward_eval(*args)
    if _transformed(x, weight, bias):
        return _composite_eval(x, weight, bias, running_mean, running_var, eps)
    if _needs_grad(x, weight, bias):
        return fast_apply(_EagerEval, *args)
    out = get_backend(backend).eager_eval(x, weight, bias, running_mean, running_var, eps)
    return _forward_eval_impl(*args) if out is None else out


# ---- BatchNorm + activation (+ residual) ---------------------------------------------------
# In-place mode overwrites the input, which a functional custom op cannot express with an
# autograd formula; both modes therefore go through one autograd.Function over the backends'
# ``forward_act``/``backward_act`` entry points.

def _double_backward_act(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
    residual: Tensor | None, mean: Tensor, invstd: Tensor, eps: float, activation: str,
    slope: float, need_dx: bool, need_dw: bool, need_db: bool, need_dr: bool,
    inplace: bool = False, training: bool = True, *, mask: Tensor | None = None,
) -> list[Tensor | None]:
    """:func:`_double_backward` for BatchNorm + activation (+ residual): ``(dx, dweight,
    dbias, dresidual)``, differentiable. In place it raises: ``x`` is the output by then.

    With the numba backend's activation ``mask`` (relu or leaky_relu; the residual was not
    saved) ``z = BN(x) + r`` is not recomputed: the activation is applied as the constant
    slope of each value, 1 where the mask is set and ``slope`` (relu: 0) elsewhere. That
    is its derivative, and its second derivative is zero, so the gradients and their graph
    are those of the composite, except that the graph does not reach the residual (its
    second-order gradient is zero: autograd reports the residual unused there, as None
    with ``allow_unused=True``); ``dresidual`` is the gradient of a zero stand-in for r."""
    if inplace:
        raise RuntimeError(
            "double backward (create_graph=True) is not supported with inplace=True: "
            "the input was overwritten by the output; use inplace=False"
        )
    if mask is None:
        y = _composite_forward(x, weight, bias, residual, mean, invstd, training, eps,
                               activation, slope)
        return _grads_with_graph(dy, y, (x, weight, bias, residual),
                                 (need_dx, need_dw, need_db, need_dr))
    from .backends.numba_act import unpack_mask

    stand_in = torch.zeros_like(x, dtype=acc_dtype(x)).requires_grad_(need_dr)
    z = _composite_forward(x, weight, bias, stand_in, mean, invstd, training, eps)
    hot = unpack_mask(mask, x)
    y = torch.where(hot, z, z * slope if activation == "leaky_relu" else torch.zeros_like(z))
    return _grads_with_graph(dy, y, (x, weight, bias, stand_in),
                             (need_dx, need_dw, need_db, need_dr))


def batch_norm_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    residual: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    slope: float,
    inplace: bool,
    backend: str,
) -> Tensor:
    """``act(BN(x) + residual)`` eagerly (not traced, not transformed; validated): the
    backend's own eager step where it has one (training; eval when nothing needs a
    gradient), else :class:`BatchNormActFunction`."""
    out = None
    if training:
        out = get_backend(backend).eager_act_train(
            x, weight, bias, running_mean, running_var, residual, momentum, eps, activation,
            slope, inplace, _double_backward_act)
    elif not _needs_grad(x, weight, bias, residual):
        assert running_mean is not None and running_var is not None
        out = get_backend(backend).eager_act_eval(
            x, weight, bias, running_mean, running_var, residual, eps, activation, slope,
            inplace)
    if out is not None:
        return out
    # the backend's activation mask only where a backward can follow (ctx.needs_input_grad
    # inside the Function ignores no_grad)
    want_mask = torch.is_grad_enabled() and _needs_grad(x, weight, bias, residual)
    return fast_apply(BatchNormActFunction, x, weight, bias, running_mean, running_var,
                      residual, training, momentum, eps, activation, slope, inplace, backend,
                      want_mask)


class BatchNormActFunction(torch.autograd.Function):
    """``y = act(BN(x) + residual)`` with a fused backward; optionally in place over ``x``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        residual: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        activation: str,
        slope: float,
        inplace: bool,
        backend: str,
        want_mask: bool = False,
    ) -> Tensor:
        be = get_backend(backend)
        w = invertible_weight(weight) if inplace else weight
        out = x if inplace else be.new_output(x)
        acc = acc_dtype(x)
        c = x.shape[1]
        # the backend's activation mask, saved instead of the residual (``want_mask``: a
        # gradient can be asked for)
        mask = (be.act_mask(x, residual, activation, slope, out)
                if residual is not None and want_mask else None)
        if x.numel() == 0:
            mean = invstd = x.new_zeros((c,), dtype=acc)
            new_rm = new_rv = None
        else:
            out, mean, invstd, new_rm, new_rv = be.forward_act(
                x, w, bias, running_mean, running_var, residual, training, momentum, eps,
                activation, slope, out, **({} if mask is None else {"mask": mask}),
            )
        if training and new_rm is not None and running_mean is not None:
            assert running_var is not None and new_rv is not None
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(out if inplace else x, w, bias, mean, invstd,
                              residual if mask is None else None, mask)
        ctx.cfg = (training, activation, slope, inplace, backend,
                   None if weight is None else weight.dtype,
                   None if bias is None else bias.dtype, eps)
        return out

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved, w, bias, mean, invstd, residual, act_mask = ctx.saved_tensors
        training, activation, slope, inplace, backend, wdt, bdt, eps = ctx.cfg
        needs = ctx.needs_input_grad
        mask = (bool(needs[0]), bool(needs[1]), bool(needs[2]), bool(needs[5]))
        if torch.is_grad_enabled() and saved.numel() > 0:
            # create_graph=True: differentiate the composite (see the module docstring).
            dx, dw, db, dres = _double_backward_act(dy, saved, w, bias, residual, mean, invstd,
                                                    eps, activation, slope, *mask, inplace,
                                                    training=training, mask=act_mask)
            return (dx, dw if dw is None else dw.to(wdt), db if db is None else db.to(bdt),
                    None, None, dres, *([None] * 8))
        if saved.numel() == 0:
            c = saved.shape[1]
            zeros = saved.new_zeros((c,), dtype=acc_dtype(saved))
            dx = torch.zeros_like(saved) if mask[0] else None
            dres = torch.zeros_like(residual) if mask[3] and residual is not None else None
            return (dx, zeros.to(wdt) if mask[1] else None, zeros.to(bdt) if mask[2] else None,
                    None, None, dres, *([None] * 8))
        dy = match_layout(dy, saved)
        dx, dw, db, dres = get_backend(backend).backward_act(
            dy, saved, w, bias, mean, invstd, residual, training, activation, slope, inplace,
            mask, **({} if act_mask is None else {"mask": act_mask}),
        )
        return (
            dx if mask[0] else None,
            dw.to(wdt) if mask[1] and dw is not None else None,
            db.to(bdt) if mask[2] and db is not None else None,
            None,
            None,
            dres if mask[3] else None,
            *([None] * 8),
        )
