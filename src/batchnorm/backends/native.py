"""The ``"native"`` backend: ATen's own kernels (``aten::native_batch_norm`` and its backward).

This is what ``torch.nn.BatchNorm*`` runs (cuDNN or ATen's CUDA/CPU kernels), reached through
our op layer. Primitives SyncBatchNorm needs come from the composite backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import ForwardResult, acc_dtype, empty_out_like, layout_of
from .torch_backend import TorchBackend

__all__ = ["NativeBackend"]

_HALF = (torch.float16, torch.bfloat16)


def _restride(y: Tensor, x: Tensor) -> Tensor:
    """ATen picks its own output strides for some layouts; return ours (see empty_out_like)."""
    if y.stride() == x.stride() and layout_of(x) != "other":
        return y
    want = empty_out_like(x, y.dtype)
    if y.stride() == want.stride():
        return y
    want.copy_(y)
    return want


def _as_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _private_copy(t: Tensor, dtype: torch.dtype) -> Tensor:
    # (clone when the dtype matches: .to(dtype, copy=True) costs about a microsecond more)
    return t.clone() if t.dtype == dtype else t.to(dtype)


class NativeBackend(TorchBackend):
    """ATen's BatchNorm kernels (forward, eval, backward); the fastest baseline PyTorch has."""

    name = "native"

    def _params(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        # ATen keeps saved mean/invstd in the *parameter* dtype on CPU; with half inputs we
        # hand it float32 parameters ("mixed type") so that the statistics stay float32.
        if x.dtype in _HALF:
            c = x.shape[1]
            weight = torch.ones(c, device=x.device) if weight is None else weight.float()
            bias = torch.zeros(c, device=x.device) if bias is None else bias.float()
            return weight, bias
        # ATen refuses parameters of another float dtype (a float64 module on float32 input);
        # the other backends compute in the input's accumulation dtype, and so does this one.
        return _as_dtype(weight, x.dtype), _as_dtype(bias, x.dtype)

    def forward_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
    ) -> ForwardResult:
        w, b = self._params(x, weight, bias)
        # ATen updates the buffers it is given in place: hand it private copies in the
        # parameters' dtype (float32 for half inputs, whose statistics ATen keeps in the
        # buffers' dtype).
        buf_dtype = torch.float32 if x.dtype in _HALF else x.dtype
        rm = None if running_mean is None else _private_copy(running_mean, buf_dtype)
        rv = None if running_var is None else _private_copy(running_var, buf_dtype)
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, momentum, eps)
        acc = acc_dtype(x)
        if mean.dtype != acc:
            mean, invstd = mean.to(acc), invstd.to(acc)
        if rm is not None and running_mean is not None and rm.dtype != running_mean.dtype:
            rm = rm.to(running_mean.dtype)
        if rv is not None and running_var is not None and rv.dtype != running_var.dtype:
            rv = rv.to(running_var.dtype)
        return _restride(y, x), mean, invstd, rm, rv

    def forward_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
    ) -> Tensor:
        if eps == 0.0:
            # ATen gives NaN for var == eps == 0 in eval; our contract says invstd = 0.
            return super().forward_eval(x, weight, bias, running_mean, running_var, eps)
        w, b = self._params(x, weight, bias)
        buf_dtype = torch.float32 if x.dtype in _HALF else x.dtype
        running_mean = _as_dtype(running_mean, buf_dtype)
        running_var = _as_dtype(running_var, buf_dtype)
        y = torch.ops.aten.native_batch_norm(
            x, w, b, running_mean, running_var, False, 0.0, eps
        )[0]
        return _restride(y, x)

    def backward(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        training: bool,
        output_mask: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if not training or layout_of(x) == "other":
            # ATen's eval backward recomputes invstd from running_var; ours is exact as given.
            return super().backward(dy, x, weight, mean, invstd, training, output_mask)
        w = weight if x.dtype in _HALF else _as_dtype(weight, x.dtype)  # half: float32 below
        mask = list(output_mask)
        acc = acc_dtype(x)
        dw = db = None
        if x.dtype in _HALF:
            w = torch.ones(x.shape[1], device=x.device) if weight is None else weight.float()
            if x.device.type == "cpu" and (output_mask[1] or output_mask[2]):
                # ATen's CPU half backward rounds dweight/dbias to the input dtype in some
                # layouts (channels-last bf16: 2e-3 relative); reduce them in fp32 ourselves.
                sum_dy, sum_dy_xmu = self.backward_reduce(dy, x, mean, invstd)
                dw = sum_dy_xmu * invstd if output_mask[1] else None
                db = sum_dy if output_mask[2] else None
                mask = [output_mask[0], False, False]
        if not any(mask):
            return None, dw, db
        dx, dw_a, db_a = torch.ops.aten.native_batch_norm_backward(
            dy, x, w, None, None, mean, invstd, True, 0.0, mask
        )
        return (
            _restride(dx, x) if dx is not None and mask[0] else None,
            dw_a.to(acc) if mask[1] else dw,
            db_a.to(acc) if mask[2] else db,
        )
