"""Activation math for fused BatchNorm + activation, shared by every backend's default path.

All functions take and return tensors in the accumulation dtype. ``elu`` uses alpha = 1;
``gelu`` is the exact (erf) form, torch's default.

Invertible activations (usable with ``inplace=True``, where only the output is saved and the
pre-activation is recovered from it): ``identity``, ``leaky_relu`` with a positive slope, ``elu``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "INPLACE_MIN_ABS_WEIGHT",
    "INVERTIBLE",
    "act_backward",
    "act_forward",
    "act_grad",
    "act_grad_from_output",
    "act_inverse",
    "check_activation",
    "invertible_weight",
]

ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu", "silu", "gelu")
INVERTIBLE = ("identity", "leaky_relu", "elu")
_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


INPLACE_MIN_ABS_WEIGHT = 1e-6


def invertible_weight(weight: Tensor | None) -> Tensor | None:
    """In-place mode divides by gamma to recompute x-hat: keep ``|gamma| >= 1e-6`` (sign kept,
    0 -> +1e-6). Every weight of magnitude 1e-6 or more is used exactly."""
    if weight is None:
        return None
    sign = torch.where(weight < 0, -torch.ones_like(weight), torch.ones_like(weight))
    return torch.where(weight.abs() < INPLACE_MIN_ABS_WEIGHT, sign * INPLACE_MIN_ABS_WEIGHT,
                       weight)


def check_activation(activation: str, negative_slope: float, inplace: bool) -> None:
    """Raise a clear error for an unknown activation or a non-invertible in-place request."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if isinstance(negative_slope, bool) or not math.isfinite(float(negative_slope)):
        raise ValueError(f"negative_slope must be a finite number, got {negative_slope!r}")
    if inplace:
        if activation not in INVERTIBLE:
            raise ValueError(
                f"inplace=True needs an invertible activation (one of {INVERTIBLE}; leaky_relu "
                f"with a positive slope) because the input is recomputed from the output; "
                f"got {activation!r}"
            )
        if activation == "leaky_relu" and negative_slope <= 0:
            raise ValueError(
                "inplace=True with leaky_relu needs negative_slope > 0 to be invertible, "
                f"got {negative_slope}"
            )


def act_forward(z: Tensor, activation: str, slope: float) -> Tensor:
    """``act(z)`` with torch.nn.functional's kernels (exportable to ONNX)."""
    if activation == "identity":
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, slope)
    if activation == "elu":
        return F.elu(z)
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu":
        return F.gelu(z)
    raise ValueError(f"unknown activation '{activation}'")  # (no !r: TorchScript compiles this)


def act_grad(z: Tensor, activation: str, slope: float) -> Tensor:
    """``d act / dz`` at the pre-activation ``z`` (subgradient 0 at z = 0 for relu, as torch).

    At a NaN ``z`` the factor is torch's: relu and elu pass the gradient (their backward tests
    ``z <= 0``), leaky_relu scales it by the slope (its backward tests ``z > 0``)."""
    if activation == "identity":
        return torch.ones_like(z)
    if activation == "relu":
        return torch.where(z <= 0, torch.zeros_like(z), torch.ones_like(z))
    if activation == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))
    if activation == "elu":
        return torch.where(z <= 0, torch.exp(z), torch.ones_like(z))
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z / _SQRT_2))
        return cdf + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    raise ValueError(f"unknown activation {activation!r}")


def act_backward(dy: Tensor, z: Tensor, activation: str, slope: float) -> Tensor:
    """``dy * act'(z)``, except that relu blocks ``dy`` where ``z <= 0`` with a zero, as
    torch's threshold_backward does: an infinite ``dy`` there gives 0, not ``inf * 0 = NaN``."""
    if activation == "relu":
        return torch.where(z <= 0, torch.zeros_like(dy), dy)
    if not (dy.requires_grad or z.requires_grad) and dy.dtype == z.dtype:
        # ATen's own backward kernels: one vectorized pass each, where act_grad's formulas
        # take four to eight (same values, NaN and inf included; the composite backward of
        # BatchNormAct runs here). Not elu: aten's elu_backward gives NaN at a NaN z, where
        # the gradient through torch's elu (and act_grad) passes dy.
        if activation == "silu":
            return torch.ops.aten.silu_backward(dy, z)
        if activation == "gelu":
            return torch.ops.aten.gelu_backward(dy, z)
    return dy * act_grad(z, activation, slope)


def act_inverse(y: Tensor, activation: str, slope: float) -> Tensor:
    """The pre-activation ``z`` with ``act(z) = y`` (invertible activations only)."""
    if activation == "identity":
        return y
    if activation == "leaky_relu":
        return torch.where(y > 0, y, y / slope)
    if activation == "elu":
        # y in (-1, 0] for z <= 0; clamp guards log1p(-1) = -inf from rounding at y ~ -1
        return torch.where(y > 0, y, torch.log1p(y.clamp_min(-1.0 + 1e-7)))
    raise ValueError(f"activation {activation!r} is not invertible")


def act_grad_from_output(y: Tensor, activation: str, slope: float) -> Tensor:
    """``d act / dz`` expressed through the output ``y`` (invertible activations only)."""
    if activation == "identity":
        return torch.ones_like(y)
    if activation == "leaky_relu":
        return torch.where(y > 0, torch.ones_like(y), torch.full_like(y, slope))
    if activation == "elu":
        return torch.where(y > 0, torch.ones_like(y), y + 1.0)
    raise ValueError(f"activation {activation!r} is not invertible")
