"""BatchNorm fused with an activation and an optional residual add (``BatchNormAct*``).

``BatchNormAct2d`` is a ``BatchNorm2d`` (same parameters, buffers and ``state_dict`` keys, so
torch and timm checkpoints load) whose forward computes ``act(BN(x) + residual)`` in one pass.
One generic implementation; the 1d/2d/3d classes only add the rank check of their BatchNorm
parent.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..backends.activations import act_forward, check_activation
from ..functional import _batch_norm_act_unchecked, check_act_args, check_residual
from ._fx import fx_leaf
from .batchnorm import _FRONT_RANKS, BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "BatchNormAct",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "ResidualActivation",
    "apply_activation",
]


class BatchNormAct(BatchNorm):
    r"""``y = act(BN(x) + residual)`` over input of any rank >= 2 (channels at dim 1).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias,
        backend: as :class:`batchnorm.BatchNorm`.
        activation: ``"identity"``, ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"silu"`` or
            ``"gelu"``.
        negative_slope: the slope of ``leaky_relu``.
        inplace: overwrite the input and save only the output for backward (invertible
            activations only; see :func:`batchnorm.functional.batch_norm_act`).

    Shape:
        Input and optional residual ``(N, C, *)``; output the same shape.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        activation: str = "relu",
        negative_slope: float = 0.01,
        inplace: bool = False,
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        check_activation(activation, negative_slope, inplace)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, backend=backend)
        self.activation = activation
        self.negative_slope = negative_slope
        self.inplace = inplace

    def extra_repr(self) -> str:
        act = f"activation={self.activation!r}"
        if self.activation == "leaky_relu":
            act += f", negative_slope={self.negative_slope}"
        if self.inplace:
            act += ", inplace=True"
        return f"{super().extra_repr()}, {act}"

    def _front_activation(self) -> tuple[Any, Any, Any]:
        return self.activation, self.negative_slope, self.inplace

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """``act(BN(input) + residual)``; in training also updates the running statistics."""
        if torch.jit.is_scripting():
            # TorchScript: torch.nn's BatchNorm step, then the activation out of place
            check_residual(input, residual)
            return apply_activation(self._scripted(input), residual, self.activation,
                                    float(self.negative_slope))
        y = self._front(input, residual)
        if y is not None:
            return y
        node = fx_leaf(self, input, residual)
        if node is not None:
            return node
        # The activation's, residual's and in-place checks run before _prepare ticks the
        # counter; _prepare runs BatchNorm's.
        check_act_args(input, residual, self.activation, self.negative_slope, self.inplace)
        running_mean, running_var, bn_training, momentum, backend = self._prepare(input)
        return _batch_norm_act_unchecked(
            input, running_mean, running_var, self.weight, self.bias, bn_training, momentum,
            self.eps, self.activation, self.negative_slope, residual, self.inplace, backend,
        )


class BatchNormAct1d(BatchNormAct, BatchNorm1d):
    """:class:`BatchNormAct` for ``(N, C)`` or ``(N, C, L)`` input; a ``BatchNorm1d``."""


class BatchNormAct2d(BatchNormAct, BatchNorm2d):
    """:class:`BatchNormAct` for ``(N, C, H, W)`` input; a ``BatchNorm2d``."""


class BatchNormAct3d(BatchNormAct, BatchNorm3d):
    """:class:`BatchNormAct` for ``(N, C, D, H, W)`` input; a ``BatchNorm3d``."""


_FRONT_RANKS.update({BatchNormAct: -1, BatchNormAct1d: 1, BatchNormAct2d: 2,
                     BatchNormAct3d: 3})


class ResidualActivation(torch.nn.Module):
    """``act(x + residual)``: what is left of a :class:`BatchNormAct` once its BatchNorm has
    been folded into the preceding layer (:func:`batchnorm.fold`). Plain torch ops, so it
    exports to ONNX.

    Shape:
        Input and optional residual ``(N, C, *)``; output the same shape and dtype.
    """

    def __init__(self, activation: str = "relu", negative_slope: float = 0.01) -> None:
        check_activation(activation, negative_slope, False)
        super().__init__()
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return apply_activation(input, residual, self.activation, float(self.negative_slope))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, negative_slope={self.negative_slope}"


def apply_activation(y: Tensor, residual: Tensor | None, activation: str, slope: float) -> Tensor:
    """``act(y + residual)`` computed in the accumulation dtype, returned in ``y``'s dtype."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    z = y.to(acc) if residual is None else y.to(acc) + residual.to(acc)
    return act_forward(z, activation, float(slope)).to(y.dtype)
