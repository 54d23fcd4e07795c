r"""Frozen BatchNorm: a BatchNorm whose statistics and affine are constants.

``FrozenBatchNorm`` holds ``weight``, ``bias``, ``running_mean`` and ``running_var`` as buffers
(not parameters), so no optimizer updates them and no ``train()``/``eval()`` call changes what
the layer computes:

.. math::
    \text{scale} = \gamma / \sqrt{\text{running\_var} + \epsilon}, \quad
    \text{shift} = \beta - \text{running\_mean} \cdot \text{scale}, \quad
    y = x \cdot \text{scale} + \text{shift}

(the same as ``torchvision.ops.FrozenBatchNorm2d``). ``num_batches_tracked`` is dropped when
loading a BatchNorm checkpoint, so a trained BatchNorm's state_dict loads as is. The layer is
what :func:`batchnorm.freeze` swaps in and what :func:`batchnorm.fold` leaves where a
BatchNorm cannot be folded into a preceding layer.

One implementation serves every rank; ``FrozenBatchNorm1d/2d/3d`` differ only in the input
rank they accept (the same checks as :class:`batchnorm.BatchNorm1d/2d/3d`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..backends.base import safe_invstd
from ..functional import check_residual
from ._fx import fx_leaf
from .act import BatchNormAct, apply_activation
from .batchnorm import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    check_channels,
    check_input_rank,
)

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormAct",
]


class FrozenBatchNorm(nn.Module):
    r"""BatchNorm with fixed statistics and affine, over any input of rank >= 2.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance.
        device, dtype: of the four buffers.

    Buffers:
        ``weight`` (ones), ``bias`` (zeros), ``running_mean`` (zeros), ``running_var`` (ones),
        all of shape ``(C,)``.

    Shape:
        Input ``(N, C, *)``; output the same shape, dtype and memory layout. Half-precision
        input is computed in float32 and rounded once.

    ``y = x * scale + shift`` is exact algebra but not the same rounding as
    ``(x - mean) * invstd * weight + bias``: when ``|running_mean| >> sqrt(running_var)`` the
    two differ by the rounding of ``running_mean * scale``, a few ulps of ``|mean| * scale``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        # What freeze() replaced, so that unfreeze() can rebuild it (not part of the state).
        self._unfrozen_config: dict[str, Any] | None = None

    def _check_input_dim(self, input: Tensor) -> None:
        check_input_rank(input, None)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:
        # A BatchNorm checkpoint has a counter the frozen layer does not keep, and an
        # affine=False one no weight and bias (both absent: one alone is a partial checkpoint,
        # which strict loading must report): those are 1 and 0.
        state_dict.pop(prefix + "num_batches_tracked", None)
        if (prefix + "running_mean" in state_dict and prefix + "weight" not in state_dict
                and prefix + "bias" not in state_dict):
            state_dict[prefix + "weight"] = torch.ones_like(self.weight)
            state_dict[prefix + "bias"] = torch.zeros_like(self.bias)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def scale_shift(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` per channel in ``dtype``: ``y = x * scale + shift``."""
        scale = self.weight.to(dtype) * safe_invstd(self.running_var.to(dtype), self.eps)
        return scale, self.bias.to(dtype) - self.running_mean.to(dtype) * scale

    def forward(self, input: Tensor) -> Tensor:
        # TorchScript compiles this forward as it is (no kernels of ours; the fx branch is
        # resolved away while compiling)
        if not torch.jit.is_scripting():
            node = fx_leaf(self, input)
            if node is not None:
                return node
        return self._normalize(input)

    def _normalize(self, input: Tensor) -> Tensor:
        """The checks and ``input * scale + shift`` (TorchScript-compatible)."""
        self._check_input_dim(input)
        check_channels(input, self.num_features)
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        scale, shift = self.scale_shift(acc)
        # Elementwise ops keep the input's memory layout (channels-last stays channels-last).
        shape = [1, -1] + [1] * (input.dim() - 2)
        y = input.to(acc) * scale.view(shape) + shift.view(shape)
        return y.to(input.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> FrozenBatchNorm:
        """A frozen copy of a BatchNorm module (ours or torch.nn's) with its current values.

        ``affine=False`` gives ``weight = 1``, ``bias = 0``. The result has the rank check of
        ``cls`` and remembers ``bn``'s configuration for :func:`batchnorm.unfreeze`.

        Raises:
            ValueError: ``bn`` has no running statistics (``track_running_stats=False``): there
                is nothing to freeze.
        """
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"cannot freeze {type(bn).__name__}({bn.num_features}): it has no running "
                "statistics (track_running_stats=False), so it normalizes with batch statistics"
            )
        rm = bn.running_mean.detach()
        frozen = cls(bn.num_features, bn.eps, device=rm.device, dtype=rm.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(rm)
            frozen.running_var.copy_(bn.running_var.detach())
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight.detach())
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias.detach())
        frozen._unfrozen_config = {
            "cls": type(bn),
            "momentum": bn.momentum,
            "affine": bn.affine,
            "bias": bn.bias is not None,
            "num_batches_tracked": None if bn.num_batches_tracked is None
            else bn.num_batches_tracked.detach().clone(),
            "backend": getattr(bn, "backend", None),
            "training": bn.training,
        }
        frozen.train(bn.training)
        return frozen


class FrozenBatchNorm1d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C)`` or ``(N, C, L)`` input."""

    def _check_input_dim(self, input: Tensor) -> None:
        check_input_rank(input, 1)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C, H, W)`` input (torchvision's FrozenBatchNorm2d)."""

    def _check_input_dim(self, input: Tensor) -> None:
        check_input_rank(input, 2)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C, D, H, W)`` input."""

    def _check_input_dim(self, input: Tensor) -> None:
        check_input_rank(input, 3)


_RANKS: dict[type, int | None] = {BatchNorm1d: 1, BatchNorm2d: 2, BatchNorm3d: 3, BatchNorm: None}


class FrozenBatchNormAct(FrozenBatchNorm):
    """A frozen :class:`batchnorm.BatchNormAct`: ``act(x * scale + shift + residual)``.

    Keeps the activation and the input-rank check of the module it was made from; what
    :func:`batchnorm.freeze` and :func:`batchnorm.fold` put in place of a ``BatchNormAct*``.

    Shape:
        Input and optional residual ``(N, C, *)``; output the same shape.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        activation: str = "relu",
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__(num_features, eps, device, dtype)
        self.activation = activation
        self.negative_slope = negative_slope
        # the input rank the layer it was frozen from checks (see check_input_rank; None: any)
        self._input_rank: int | None = None

    def _check_input_dim(self, input: Tensor) -> None:
        check_input_rank(input, self._input_rank)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if not torch.jit.is_scripting():
            node = fx_leaf(self, input, residual)
            if node is not None:
                return node
        check_residual(input, residual)
        return apply_activation(self._normalize(input), residual, self.activation,
                                float(self.negative_slope))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a whole-module pickle from before ``_input_rank`` holds the class whose rank check
        # the layer ran (``_rank_check``)
        cls = state.pop("_rank_check", None)
        super().__setstate__(state)
        if "_input_rank" not in self.__dict__:
            self._input_rank = _RANKS.get(cls) if isinstance(cls, type) else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> FrozenBatchNorm:
        """A frozen copy of a :class:`BatchNormAct` (activation and rank check kept)."""
        if not isinstance(bn, BatchNormAct):
            raise TypeError(f"expected a BatchNormAct module, got {type(bn).__name__}")
        frozen = super().from_batchnorm(bn)
        assert isinstance(frozen, FrozenBatchNormAct)
        frozen.activation = bn.activation
        frozen.negative_slope = bn.negative_slope
        frozen._input_rank = next(_RANKS[c] for c in type(bn).__mro__ if c in _RANKS)
        assert frozen._unfrozen_config is not None
        frozen._unfrozen_config.update(activation=bn.activation,
                                       negative_slope=bn.negative_slope, inplace=bn.inplace)
        return frozen
