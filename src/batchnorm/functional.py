"""Functional API: :func:`batch_norm`, a drop-in for ``torch.nn.functional.batch_norm``."""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from ._validation import check_batch_norm_args
from .backends import resolve_backend

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
            a leaf that requires grad; if another op saved ``input`` for its backward,
            autograd's version check raises at backward time. Half-precision ``elu`` in place
            recomputes x-hat through ``log1p(y)``, which is ill-conditioned where the output
            saturates near -1: there x-hat (and dx) carry an error of about eps / (1 + y).
        backend: as :func:`batch_norm`. ``"torch"`` without ``inplace`` is the composite
            reference: ``act(batch_norm(...) + residual)`` in plain differentiable torch ops.

    Shape:
        Input and residual ``(N, C, *)``; output the same shape, dtype and memory layout.
    """
    from .backends.activations import act_forward, check_activation

    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    check_activation(activation, negative_slope, inplace)
    if residual is not None:
        if not isinstance(residual, Tensor) or not residual.is_floating_point():
            raise TypeError("residual must be a floating-point Tensor or None")
        if residual.shape != input.shape or residual.device != input.device:
            raise ValueError(
                f"residual must match the input's shape and device: got {tuple(residual.shape)} "
                f"on {residual.device}, expected {tuple(input.shape)} on {input.device}"
            )
    if inplace and input.is_leaf and input.requires_grad:
        raise RuntimeError(
            "inplace=True overwrites the input, but the input is a leaf tensor that requires "
            "grad; pass inplace=False or an intermediate tensor"
        )
    name = resolve_backend(backend, input, training)
    if name == "torch" and not inplace:
        y = _batch_norm_unchecked(input, running_mean, running_var, weight, bias, training,
                                  momentum, eps, name)
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        z = y.to(acc) if residual is None else y.to(acc) + residual.to(acc)
        return act_forward(z, activation, float(negative_slope)).to(input.dtype)
    return ops.BatchNormActFunction.apply(
        input, weight, bias, running_mean, running_var, residual, training, float(momentum),
        float(eps), activation, float(negative_slope), inplace, name,
    )
