"""Drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d`` plus an any-rank ``BatchNorm``.

All four share one implementation (:class:`_BatchNormBase`); they differ only in the input rank
they accept. They subclass ``torch.nn.modules.batchnorm._BatchNorm``, so parameters, buffers,
``state_dict`` keys, ``_version = 2`` checkpoint migration, ``reset_parameters`` and
``extra_repr`` are torch's own, and tools that look for ``_BatchNorm`` (DDP's buffer handling,
timm, fusion helpers, weight-decay filters) treat them as BatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .._validation import (
    BatchNormShapeError,
    check_batch_norm_args,
    check_one_value_per_channel,
)
from ..backends import AUTO, front_mode, registered_backends, resolve_backend, usable_front
from ..functional import _batch_norm_unchecked
from ._fx import fx_leaf

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "check_channels",
           "check_input_rank", "rebuild_as"]


class _BatchNormBase(_BatchNorm):
    """Shared implementation; subclasses only override :meth:`_check_input_dim`."""

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
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        # torch < 2.13 has no ``bias`` keyword: build with it, then drop the parameter.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if affine and not bias:
            self.register_parameter("bias", None)
        if backend is not None and backend != AUTO and backend not in registered_backends():
            raise ValueError(
                f"unknown backend {backend!r}; expected one of {[AUTO, *registered_backends()]}"
            )
        self.backend = backend

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return base if self.backend is None else f"{base}, backend={self.backend!r}"

    def _prepare(
        self, input: Tensor, *, check_batch_size: bool = True, tick: bool = True
    ) -> tuple[Tensor | None, Tensor | None, bool, float, str]:
        """Validate, then apply the module's side effects (the counter) and decide the mode.

        Returns ``(running_mean, running_var, use_batch_stats, momentum, backend)`` for the
        functional call. Same decisions as ``torch.nn.BatchNorm*``: batch statistics in
        training, or in eval when the buffers are None; the buffers are updated only in
        training with ``track_running_stats``; ``momentum=None`` weighs batch ``t`` by
        ``1 / t``. Unlike torch, every check runs before ``num_batches_tracked`` ticks.
        ``check_batch_size=False`` leaves "more than one value per channel" to the caller
        (SyncBatchNorm checks the group's total); ``tick=False`` leaves the counter to the
        caller's :meth:`_tick` (after a step that can still fail), the momentum being the one
        for the ticked counter.
        """
        self._check_input_dim(input)
        if input.dim() >= 2:
            check_channels(input, self.num_features)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None
        momentum = 0.0 if self.momentum is None else self.momentum
        check_batch_norm_args(
            input, running_mean, running_var, self.weight, self.bias, bn_training, momentum,
            self.eps, check_batch_size=check_batch_size,
        )
        backend = resolve_backend(self.backend, input, bn_training)

        if self._counts():
            if tick:
                self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / (float(self.num_batches_tracked) + (0 if tick else 1))
        return running_mean, running_var, bn_training, momentum, backend

    def _scripted(self, input: Tensor) -> Tensor:
        """The forward that ``torch.jit.script`` compiles (``forward`` branches to it while
        scripting, and TorchScript does not compile the Python path after that branch):
        torch.nn's BatchNorm step on ATen's kernels, with this module's checks first, so that
        a bad input still leaves the counter and buffers as they were. The backend setting
        does not carry over; the numbers are torch.nn's."""
        self._check_input_dim(input)
        check_channels(input, self.num_features)
        if not input.is_floating_point():
            # (no dtype in the message: TorchScript formats a dtype as its enum number)
            raise TypeError("batch_norm expected a floating-point input (float16, bfloat16, "
                            "float32 or float64)")
        _check_scripted_tensor(input, self.weight, "weight")
        _check_scripted_tensor(input, self.bias, "bias")
        _check_scripted_tensor(input, self.running_mean, "running_mean")
        _check_scripted_tensor(input, self.running_var, "running_var")
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        if bn_training:
            check_one_value_per_channel(input)
            if self.eps <= 0.0:
                raise ValueError(
                    f"batch_norm eps must be positive during training, but got {self.eps}")
        if self.eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}")
        m = self.momentum
        if m is not None:  # (nested: TorchScript types m as None when the constant is None)
            if not (m >= 0.0 and m <= 1.0):
                raise ValueError("batch_norm momentum must be a number in [0, 1] (the weight "
                                 f"of the new batch statistics), got {m}")
        use_buffers = not self.training or self.track_running_stats
        factor = 0.0 if m is None else m
        count = self.num_batches_tracked
        if self.training and self.track_running_stats and count is not None:
            count.add_(1)
            if m is None:  # cumulative moving average
                factor = 1.0 / float(count)
        return torch.nn.functional.batch_norm(
            input, self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None, self.weight, self.bias, bn_training,
            factor, self.eps)

    def _counts(self) -> bool:
        """Whether a forward now counts a batch in ``num_batches_tracked``."""
        return bool(self.training and self.track_running_stats
                    and self.num_batches_tracked is not None)

    def _tick(self) -> None:
        """Count the batch :meth:`_prepare` was called for with ``tick=False``."""
        if self._counts():
            self.num_batches_tracked.add_(1)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input``; in training also update the running statistics."""
        if torch.jit.is_scripting():
            return self._scripted(input)
        y = self._front(input)
        if y is not None:
            return y
        node = fx_leaf(self, input)
        if node is not None:
            return node
        running_mean, running_var, bn_training, momentum, backend = self._prepare(input)
        return _batch_norm_unchecked(
            input, running_mean, running_var, self.weight, self.bias, bn_training, momentum,
            self.eps, backend,
        )

    @torch.jit.unused
    def _front(self, input: Tensor, residual: Tensor | None = None) -> Tensor | None:
        """:meth:`forward` through the backend's C++ front door (``front`` in numba_step.cpp),
        with the decisions of :meth:`_prepare`, the counter ticked there; None where it does
        not take the call. Only for this package's own classes (a subclass may check the
        input otherwise, in its ``_check_input_dim``), not for ``momentum=None`` (whose
        factor changes every batch), and never while compiling or in forward-mode AD."""
        front = usable_front()
        rank = _FRONT_RANKS.get(type(self))
        momentum = self.momentum
        if front is None or rank is None or momentum is None:
            return None
        # (attributes, as _prepare reads them: weight_norm and other hooks keep a computed
        # weight in the instance's __dict__, not in _parameters)
        running_mean, running_var = self.running_mean, self.running_var
        training = self.training
        counter = None
        if training:
            if self.track_running_stats:
                counter = self.num_batches_tracked
            else:
                running_mean = running_var = None
        return front(input, running_mean, running_var, self.weight, self.bias,
                     training or running_mean is None, momentum, self.eps,
                     front_mode(self.backend), counter, rank, self.num_features, residual,
                     *self._front_activation())

    def _front_activation(self) -> tuple[Any, Any, Any]:
        """The fused activation's arguments of :meth:`_front` (activation, slope, inplace):
        None for plain BatchNorm."""
        return None, None, None


def _check_scripted_tensor(input: Tensor, t: Tensor | None, name: str) -> None:
    """A parameter or buffer that the scripted step hands to ATen: on the input's device and
    of a dtype ATen takes with it (the input's, or float32 for a float16/bfloat16 input).
    The eager layers convert instead; TorchScript runs ATen's kernels as they are."""
    if t is None:
        return
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device} but input is on {input.device}; expected "
                         "every tensor on the input's device")
    half = input.dtype == torch.float16 or input.dtype == torch.bfloat16
    if t.dtype != input.dtype and not (half and t.dtype == torch.float32):
        raise TypeError(
            f"{name} and input differ in dtype, which a scripted layer cannot take: TorchScript "
            "runs ATen's kernels, which need parameters and buffers of the input's dtype (or "
            "float32 for float16/bfloat16 input); convert the layer or the input")


def check_input_rank(input: Tensor, rank: int | None) -> None:
    """torch.nn's input-rank check and message for a BatchNorm of spatial ``rank`` (1: ``(N, C)``
    or ``(N, C, L)``, 2: 4-D, 3: 5-D, None: any rank >= 2). TorchScript-compatible."""
    d = input.dim()
    if rank is None:
        if d < 2:
            raise ValueError(f"expected at least 2D input (got {d}D input)")
    elif rank == 1:
        if d != 2 and d != 3:
            raise ValueError(f"expected 2D or 3D input (got {d}D input)")
    elif d != rank + 2:
        raise ValueError(f"expected {rank + 2}D input (got {d}D input)")


def check_channels(input: Tensor, num_features: int) -> None:
    """Raise :class:`BatchNormShapeError` unless ``input`` (rank >= 2) has ``num_features``
    channels at dim 1. TorchScript-compatible."""
    if input.size(1) != num_features:
        raise BatchNormShapeError(
            f"expected input with {num_features} channels at dim 1 (num_features="
            f"{num_features}), got {input.size(1)} channels (input size {list(input.shape)})"
        )


class BatchNorm(_BatchNormBase):
    r"""Batch Normalization over any input of rank >= 2 with channels at dim 1.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for numerical stability.
        momentum: weight of the new batch statistics in the running update, or None for a
            cumulative average.
        affine: learn ``weight`` (gamma, ones) and ``bias`` (beta, zeros).
        track_running_stats: keep ``running_mean``, ``running_var``, ``num_batches_tracked``.
        device, dtype: of parameters and buffers (``num_batches_tracked`` stays int64).
        bias: with ``affine``, also learn a bias (torch >= 2.13's keyword).
        backend: kernel backend for this module (None: the process default).

    Shape:
        Input ``(N, C, *)``; output the same shape, dtype and memory layout.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        check_input_rank(input, None)


class BatchNorm1d(BatchNorm):
    """:class:`BatchNorm` for ``(N, C)`` or ``(N, C, L)`` input (``torch.nn.BatchNorm1d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        check_input_rank(input, 1)


class BatchNorm2d(BatchNorm):
    """:class:`BatchNorm` for ``(N, C, H, W)`` input (``torch.nn.BatchNorm2d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        check_input_rank(input, 2)


class BatchNorm3d(BatchNorm):
    """:class:`BatchNorm` for ``(N, C, D, H, W)`` input (``torch.nn.BatchNorm3d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        check_input_rank(input, 3)


_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def rebuild_as(cls: type, module: torch.nn.Module, **kwargs: Any) -> Any:
    """A ``cls`` BatchNorm sharing ``module``'s parameters and buffers (the same tensors, not
    copies, so an optimizer holding them keeps working), with its hyper-parameters, training
    flag and ``qconfig``. Built on the meta device, so nothing is allocated; ``kwargs`` go to
    ``cls``'s constructor (``backend=``, ``process_group=``, an activation).

    Raises:
        RuntimeError: ``cls`` has state (parameters, buffers) that ``module`` cannot fill.
    """
    out = cls(
        module.num_features, module.eps, module.momentum, module.affine,
        module.track_running_stats, device="meta", **kwargs,
    )
    for name in _STATE:
        setattr(out, name, getattr(module, name, None))
    leftover = [n for n, t in (*out.named_parameters(recurse=False),
                               *out.named_buffers(recurse=False)) if t.is_meta]
    if leftover:
        raise RuntimeError(f"{cls.__name__} has state {leftover} that {type(module).__name__} "
                           "lacks; give the class a conversion method that fills it")
    out.train(module.training)
    if hasattr(module, "qconfig"):
        out.qconfig = module.qconfig
    return out


# The spatial rank each class takes, for the C++ front door (-1: any; 1: 2-D or 3-D input).
_FRONT_RANKS: dict[type, int] = {BatchNorm: -1, BatchNorm1d: 1, BatchNorm2d: 2, BatchNorm3d: 3}
