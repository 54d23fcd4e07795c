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
Double backward is not supported through these ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .backends import get_backend
from .backends.base import acc_dtype, empty_out_like, match_layout, safe_invstd

__all__ = ["backward", "forward_eval", "forward_train"]

_EMPTY = (0,)


def _empty(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return x.new_empty(_EMPTY, dtype=dtype or acc_dtype(x))


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


@forward_train.register_fake
def _forward_train_fake(x, weight, bias, running_mean, running_var, momentum, eps, backend):
    c = x.shape[1]
    acc = acc_dtype(x)
    rm = _empty(x) if running_mean is None else torch.empty_like(running_mean)
    rv = _empty(x) if running_var is None else torch.empty_like(running_var)
    return empty_out_like(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc), rm, rv


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
    if x.numel() == 0:
        return empty_out_like(x)
    return get_backend(backend).forward_eval(x, weight, bias, running_mean, running_var, eps)


@forward_eval.register_fake
def _forward_eval_fake(x, weight, bias, running_mean, running_var, eps, backend):
    return empty_out_like(x)


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


@backward.register_fake
def _backward_fake(dy, x, weight, mean, invstd, training, output_mask, backend):
    c = x.shape[1]
    acc = acc_dtype(x)
    return (
        empty_out_like(x) if output_mask[0] else x.new_empty(_EMPTY),
        x.new_empty((c,), dtype=acc) if output_mask[1] else x.new_empty(_EMPTY, dtype=acc),
        x.new_empty((c,), dtype=acc) if output_mask[2] else x.new_empty(_EMPTY, dtype=acc),
    )


def _grads(
    ctx: Any, dy: Tensor, training: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    x, weight, mean, invstd = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
            bool(ctx.needs_input_grad[2])]
    if not any(mask):
        return None, None, None
    dx, dw, db = backward(dy, x, weight, mean, invstd, training, mask, ctx.backend)
    return (
        dx if mask[0] else None,
        dw.to(ctx.weight_dtype) if mask[1] else None,
        db.to(ctx.bias_dtype) if mask[2] else None,
    )


def _setup_train(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias = inputs[:3]
    _, mean, invstd, _, _ = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.backend = inputs[7]
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_train(ctx: Any, dy: Tensor, *_unused: Tensor) -> tuple:
    return (*_grads(ctx, dy, True), None, None, None, None, None)


forward_train.register_autograd(_backward_train, setup_context=_setup_train)


def _setup_eval(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, bias, running_mean, running_var, eps, backend = inputs
    acc = acc_dtype(x)
    # Running statistics are constants in eval: save them as the backward's mean/invstd.
    mean = running_mean.detach().to(acc)
    invstd = safe_invstd(running_var.detach().to(acc), eps)
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.backend = backend
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_eval(ctx: Any, dy: Tensor) -> tuple:
    return (*_grads(ctx, dy, False), None, None, None, None)


forward_eval.register_autograd(_backward_eval, setup_context=_setup_eval)
