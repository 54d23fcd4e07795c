"""Argument checks shared by the functional API and the modules.

Every check runs before any state changes (running buffers, ``num_batches_tracked``), looks
only at shapes, dtypes, devices and Python numbers (never at tensor values, so there is no
host-device sync), and raises an exception that says what was wrong and what was expected.
Where PyTorch has a message, we use PyTorch's words.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BatchNormShapeError", "check_batch_norm_args", "check_one_value_per_channel"]


class BatchNormShapeError(ValueError, RuntimeError):
    """A shape mismatch between the input and a parameter or buffer.

    Subclasses both ``ValueError`` (what it is) and ``RuntimeError`` (what PyTorch raises for
    the same mistake), so code written against either keeps working.
    """


def _finite(v: float) -> bool:
    """``math.isfinite`` by comparisons, which torch.compile can also evaluate when it has
    made a float attribute symbolic (``dynamic=True``); NaN fails both."""
    return -math.inf < v < math.inf


def check_one_value_per_channel(input: Tensor) -> None:
    """Training needs more than one value per channel (PyTorch's ``_verify_batch_size``)."""
    size = input.shape
    prod = size[0]
    for s in size[2:]:
        prod *= s
    if prod == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def check_batch_norm_args(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    *,
    check_batch_size: bool = True,
) -> None:
    """Validate the arguments of ``batch_norm`` (see :func:`batchnorm.functional.batch_norm`).

    ``check_batch_size=False`` skips "more than one value per channel": SyncBatchNorm checks
    that on the total over its process group, once the counts are gathered.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm expected input to be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(
            f"batch_norm expected a floating-point input (float16, bfloat16, float32 or "
            f"float64), got dtype {input.dtype}"
        )
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm expected input of shape (N, C, *) with at least 2 dims, "
            f"got {input.dim()}D input of size {tuple(input.shape)}"
        )
    channels = input.shape[1]
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
        if t.dim() != 1 or t.numel() != channels:
            raise BatchNormShapeError(
                f"{name} should contain {channels} elements not {t.numel()} "
                f"(expected a 1-D tensor of size C = input.shape[1] = {channels}, "
                f"got size {tuple(t.shape)})"
            )
        if t.device != input.device:
            raise ValueError(
                f"{name} is on {t.device} but input is on {input.device}; "
                "expected every tensor on the input's device"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must be given together (both tensors or both None)"
        )
    if not training and running_mean is None:
        raise ValueError(
            "running_mean must be defined in evaluation mode (training=False normalizes with "
            "the running statistics; pass training=True to use batch statistics)"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not _finite(eps):
        raise ValueError(f"batch_norm eps must be a finite number, got {eps!r}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not _finite(momentum)
        or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(
            f"batch_norm momentum must be a number in [0, 1] (the weight of the new batch "
            f"statistics), got {momentum!r}"
        )
    if training and check_batch_size:
        check_one_value_per_channel(input)
    # dtype sanity for mixed precision: parameters may be float32 with half inputs.
    if input.dtype == torch.float64:
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != torch.float64:
                raise TypeError(
                    f"{name} has dtype {t.dtype} but input is float64; expected float64 "
                    "parameters for float64 input"
                )
