"""The ``"torch"`` backend: the textbook formulas in composite PyTorch ops.

Runs on any device and any floating dtype. It is the naive path: several passes over memory,
but every step is a plain, readable tensor expression, computed in the accumulation dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Backend, acc_dtype, bcast, empty_out_like, reduce_dims

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
    """Composite PyTorch ops; no device or dtype restriction."""

    name = "torch"

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xf = x.to(acc_dtype(x))
        count = x.numel() // x.shape[1]
        # torch.var_mean reduces with Welford / two-pass kernels: no E[x^2] - E[x]^2.
        var, mean = torch.var_mean(xf, dim=reduce_dims(x), correction=0)
        return mean, var * count

    def apply(
        self, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
    ) -> Tensor:
        acc = acc_dtype(x)
        scale = invstd if weight is None else invstd * weight.to(acc)
        # (x - mean) * scale keeps full precision when |mean| >> std; folding the mean into
        # the shift (x * scale + shift) would cancel catastrophically there.
        y = (x.to(acc) - bcast(mean, x)) * bcast(scale, x)
        if bias is not None:
            y = y + bcast(bias.to(acc), x)
        out = empty_out_like(x)
        out.copy_(y)
        return out

    def backward_reduce(
        self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor
    ) -> tuple[Tensor, Tensor]:
        acc = acc_dtype(x)
        dims = reduce_dims(x)
        dyf = dy.to(acc)
        sum_dy = dyf.sum(dims)
        sum_dy_xmu = (dyf * (x.to(acc) - bcast(mean, x))).sum(dims)
        return sum_dy, sum_dy_xmu

    def backward_apply(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        sum_dy: Tensor,
        sum_dy_xmu: Tensor,
        count: int,
    ) -> Tensor:
        acc = acc_dtype(x)
        scale = invstd if weight is None else invstd * weight.to(acc)
        mean_dy = sum_dy / count
        proj = sum_dy_xmu * invstd * invstd / count
        xmu = x.to(acc) - bcast(mean, x)
        dx = (dy.to(acc) - bcast(mean_dy, x) - xmu * bcast(proj, x)) * bcast(scale, x)
        out = empty_out_like(x)
        out.copy_(dx)
        return out
