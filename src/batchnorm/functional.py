"""Functional API: :func:`batch_norm`, a drop-in for ``torch.nn.functional.batch_norm``."""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from ._validation import check_batch_norm_args
from .backends import resolve_backend

__all__ = ["batch_norm"]


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
        return ops.forward_eval(input, weight, bias, running_mean, running_var, eps, backend)
    y, _, _, new_mean, new_var = ops.forward_train(
        input, weight, bias, running_mean, running_var, float(momentum), float(eps), backend
    )
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y
