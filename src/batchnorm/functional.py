"""Functional API: :func:`batch_norm`, a drop-in for ``torch.nn.functional.batch_norm``."""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from ._validation import check_batch_norm_args
from .backends import front_mode, resolve_backend, usable_front

__all__ = ["batch_norm", "batch_norm_act"]


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""Batch Normalization with ``torch.nn.functional.batch_norm``'s signature and semantics.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    per channel (dim 1), over the batch and spatial dims. In training the batch statistics are
    used (biased variance) and, when given, ``running_mean``/``running_var`` are updated in
    place: ``running = (1 - momentum) * running + momentum * batch`` (unbiased variance). With
    ``training=False`` the running statistics normalize.

    Args:
        input: ``(N, C, *)`` floating tensor, any layout (channels-last is kept).
        running_mean, running_var: ``(C,)`` buffers, or both None (training only).
        weight, bias: optional ``(C,)`` affine parameters (gamma, beta).
        training: use batch statistics (and update the running buffers).
        momentum: weight of the new batch statistics in ``[0, 1]``.
        eps: added to the variance; must be > 0 in training.
        backend: ``"torch"``, ``"native"``, ``"numba"``, ``"triton"`` or ``"auto"``; None uses
            the process default (:func:`batchnorm.set_backend`, ``$BATCHNORM_BACKEND``).

    Shape:
        Input ``(N, C, *)``; output the same shape, dtype and memory layout.

    All checks run before any buffer is touched; see ``_validation.check_batch_norm_args``.
    """
    if (front := usable_front()) is not None:
        # the whole call in C++ where it takes it (numba_step.cpp: front), else None
        y = front(input, running_mean, running_var, weight, bias, training, momentum, eps,
                  front_mode(backend), None, -1, -1, None, None, None, None)
        if y is not None:
            return y
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    name = resolve_backend(backend, input, training)
    return _batch_norm_unchecked(
        input, running_mean, running_var, weight, bias, training, momentum, eps, name
    )


def _batch_norm_unchecked(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    backend: str,
) -> Tensor:
    """Dispatch to the ops after validation; ``backend`` is a concrete name."""
    if not training:
        assert running_mean is not None and running_var is not None
        return ops.batch_norm_eval(input, weight, bias, running_mean, running_var, eps, backend)
    return ops.batch_norm_train(
        input, weight, bias, running_mean, running_var, float(momentum), float(eps), backend
    )


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str = "relu",
    negative_slope: float = 0.01,
    residual: Tensor | None = None,
    inplace: bool = False,
    backend: str | None = None,
) -> Tensor:
    r"""BatchNorm, then an optional residual add, then an activation, in one pass:

    .. math::
        y = \mathrm{act}\big(\mathrm{BN}(x) + r\big)

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps: as
            :func:`batch_norm`.
        activation: ``"identity"``, ``"relu"``, ``"leaky_relu"``, ``"elu"`` (alpha 1),
            ``"silu"`` or ``"gelu"`` (exact erf form).
        negative_slope: slope of ``leaky_relu`` for negative inputs.
        residual: optional tensor of the input's shape added before the activation; its
            gradient comes from the same backward pass.
        inplace: overwrite ``input`` with the output and save only the output and per-channel
            statistics for backward (x-hat is recomputed from y), as inplace-ABN does. Needs an
            invertible activation (identity, leaky_relu with a positive slope, elu). To keep the
            affine invertible, weights with ``|gamma| < 1e-6`` are used as ``±1e-6`` (0 as
            ``+1e-6``) in this mode; all other weights are used exactly. ``input`` must not be
            a leaf that requires grad, an expanded tensor, or overlap ``residual`` in memory
            (each raises before anything runs); if another op saved ``input`` for its
            backward, autograd's version check raises at backward time. Precision: x-hat is
            recomputed as ``(act^-1(y) - residual - beta) / gamma`` from the output stored in
            the input's dtype, so its error is of order ``u * |z| / |gamma|`` (``u`` the
            dtype's unit roundoff: 6e-8 float32, 5e-4 float16, 4e-3 bfloat16; ``z`` the
            pre-activation, residual included): channels whose ``|gamma|`` is not much larger
            than ``u * |z|`` get inaccurate gradients (in bfloat16, ``|gamma| ~ 1e-2`` next to
            ``|z| ~ 1`` can flip the sign of ``dweight``); use ``inplace=False`` there.
            ``elu`` also recomputes through ``log1p(y)``, ill-conditioned where the output
            saturates near -1: there x-hat (and dx) carry an error of about ``u / (1 + y) =
            u * exp(-z)`` in every dtype (float32: 1e-4 at ``z = -7``), so inputs whose
            pre-activations reach far below 0 get inaccurate gradients in that mode.
        backend: as :func:`batch_norm`. ``"torch"`` without ``inplace`` is the composite
            reference: ``act(batch_norm(...) + residual)`` in plain differentiable torch ops.

    Shape:
        Input and residual ``(N, C, *)``; output the same shape, dtype and memory layout.
    """
    if (front := usable_front()) is not None:
        # as in batch_norm (in place too: the front door checks the input's memory per call
        # and leaves anything check_act_args would refuse, or look at closer, to this path)
        y = front(input, running_mean, running_var, weight, bias, training, momentum, eps,
                  front_mode(backend), None, -1, -1, residual, activation, negative_slope,
                  inplace)
        if y is not None:
            return y
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    check_act_args(input, residual, activation, negative_slope, inplace)
    return _batch_norm_act_unchecked(
        input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
        negative_slope, residual, inplace, resolve_backend(backend, input, training),
    )


def _byte_span(t: Tensor) -> tuple[int, int]:
    """The bytes ``[first, end)`` that a non-empty tensor's elements lie in."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def check_residual(input: Tensor, residual: Tensor | None) -> None:
    """Raise unless ``residual`` is None or a floating-point tensor of ``input``'s shape and
    device (a residual that broadcasts would be a silent wrong answer). TorchScript-compatible
    (the scripted BatchNormAct layers run it too)."""
    if residual is None:
        return
    if not residual.is_floating_point():
        raise TypeError("residual must be a floating-point Tensor or None")
    if residual.shape != input.shape or residual.device != input.device:
        raise ValueError(
            f"residual must match the input's shape and device: got {list(residual.shape)} "
            f"on {residual.device}, expected {list(input.shape)} on {input.device}")


def check_act_args(
    input: Tensor,
    residual: Tensor | None,
    activation: str,
    negative_slope: float,
    inplace: bool,
) -> None:
    """The checks :func:`batch_norm_act` adds to :func:`batch_norm`'s (the modules run them
    before their counter ticks): the activation, the residual, and what in-place mode needs
    of the input's memory."""
    from .backends.activations import check_activation

    check_activation(activation, negative_slope, inplace)
    if residual is not None and not isinstance(residual, Tensor):
        raise TypeError("residual must be a floating-point Tensor or None")
    check_residual(input, residual)
    if not inplace:
        return
    if input.is_leaf and input.requires_grad:
        raise RuntimeError(
            "inplace=True overwrites the input, but the input is a leaf tensor that requires "
            "grad; pass inplace=False or an intermediate tensor"
        )
    base = input._base
    if (input.requires_grad and torch.is_grad_enabled() and base is not None and base.is_leaf
            and base.requires_grad):
        # autograd would refuse the write only after the kernels ran (and the running
        # statistics and the counter had changed)
        raise RuntimeError(
            "inplace=True overwrites the input, but the input is a view of a leaf tensor that "
            "requires grad; pass inplace=False or an intermediate tensor"
        )
    if ops._traced(input):
        # (traced, in-place mode computes out of place: nothing is overwritten; and fake
        # tensors have no addresses to compare, nor can torch.compile ask is_inference())
        return
    if input.is_inference() and not torch.is_inference_mode_enabled():
        # torch refuses the version bump after the kernels have written the input (and the
        # running statistics): refuse before, in torch's words
        raise RuntimeError(
            "Inplace update to inference tensor outside InferenceMode is not allowed: "
            "inplace=True overwrites the input, an inference tensor (made under "
            "torch.inference_mode); pass inplace=False, run the call inside "
            "torch.inference_mode(), or pass a clone of the input"
        )
    if input.numel() == 0:
        return
    if any(st == 0 and n > 1 for n, st in zip(input.shape, input.stride())):
        raise RuntimeError(
            "inplace=True writes the output into the input, but several of the input's "
            f"elements share one memory location (strides {tuple(input.stride())}, an "
            "expanded tensor); pass inplace=False or a tensor with its own memory"
        )
    if residual is not None and residual.numel() > 0:
        a0, a1 = _byte_span(input)
        b0, b1 = _byte_span(residual)
        if a0 < b1 and b0 < a1:
            # (a conservative test: interleaved views of one storage count as overlapping)
            raise RuntimeError(
                "inplace=True overwrites the input, but the residual shares its memory (their "
                "byte ranges overlap; the residual is needed to recompute x-hat in backward); "
                "pass inplace=False or a residual that does not alias the input"
            )


def _batch_norm_act_unchecked(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    negative_slope: float,
    residual: Tensor | None,
    inplace: bool,
    name: str,
) -> Tensor:
    """:func:`batch_norm_act` after validation; ``name`` is a concrete backend.

    The fused path is an autograd.Function over kernels that write through raw pointers, which
    tracing (torch.compile, torch.export, torch.jit.trace), forward-mode AD and torch.func
    transforms cannot see into: there the composite runs instead, BatchNorm through the op
    layer, and in-place mode computes out of place (same values, no memory saving).
    """
    from .backends.activations import act_forward

    if ((name == "torch" and not inplace) or ops._traced(input)
            or ops._transformed(input, weight, bias, residual)):
        y = _batch_norm_unchecked(input, running_mean, running_var, weight, bias, training,
                                  momentum, eps, name)
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        z = y.to(acc) if residual is None else y.to(acc) + residual.to(acc)
        return act_forward(z, activation, float(negative_slope)).to(input.dtype)
    return ops.batch_norm_act(
        input, weight, bias, running_mean, running_var, residual, training, float(momentum),
        float(eps), activation, float(negative_slope), inplace, name,
    )
