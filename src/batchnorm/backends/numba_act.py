"""Fused BatchNorm + activation + residual for the ``"numba"`` backend (host side).

:class:`NumbaActMixin` overrides :meth:`~.base.Backend.forward_act` and
:meth:`~.base.Backend.backward_act` with the kernels of :mod:`.numba_act_kernels`, run through
the numba backend's views, task partition and thread pool (:mod:`.numba_backend`). Passes over
the activation-sized tensors are those of plain BatchNorm:

* forward: the statistics and one elementwise pass ``out = act((x - mean) * invstd * w + b +
  r)`` (channels-first blocks are reduced and written while in cache, as plain BN does); eval
  is the elementwise pass alone, with the running statistics;
* backward: one reduction ``sum(dz)``, ``sum(dz * xhat)`` with ``dz = dy * act'(z)``, then one
  elementwise pass that writes ``dx`` and ``dresidual = dz`` together.

In-place mode (``out is x``; identity, leaky_relu with slope > 0, elu) saves only the output:
the backward recomputes ``z = act^-1(y)`` and ``xhat = (z - r - b) / w`` from it.

The activation mask (:meth:`NumbaActMixin.act_mask`): with a residual, relu and leaky_relu
(slope >= 0) in normal mode in float32 or float64, a forward whose gradient can be asked for
(the op layer's autograd Function with grad mode on; every training call of the C++ step)
also writes the sign of ``z`` as one bit per value, and the backward reads those bits where
it would read ``r`` to recompute ``z``: autograd saves ``x`` and the bits (1/32 of a float32
``x``) instead of ``x`` and ``r``, and the backward's reduction reads two tensors instead of
three. :func:`unpack_mask` turns the bits back into a boolean tensor (for the double
backward).

Delegated to the composite of :class:`~.base.Backend` (same results, more passes: the numba
BatchNorm kernels, then torch's activation ops): dtypes the numba backend does not support, a
residual whose dtype or shape differs from ``x``'s, an ``out`` whose strides differ from
``x``'s, in-place mode on a tensor that is neither channels-first nor channels-last
contiguous, and elu, silu and gelu when :attr:`NumbaActMixin.fuse_all_activations` is off.

The kernels of identity, relu and leaky_relu (``numba_act_kernels``) and those of elu, silu
and gelu (``numba_smooth_kernels``) are compiled apart, each on first use.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from .base import (
    ForwardResult,
    acc_dtype,
    as_kernel_layout,
    empty_out_like,
    layout_of,
    match_layout,
    out_strides,
    safe_invstd,
)

__all__ = ["NumbaActMixin", "unpack_mask"]


def _nb() -> Any:
    """The numba backend module (imported late: it imports this module)."""
    from . import numba_backend

    return numba_backend


def _codes() -> dict[str, int]:
    return {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "silu": 4, "gelu": 5}


def _module(activation: str) -> str:
    """The kernel module of ``activation``: the piecewise-linear ones and the transcendental
    ones are compiled apart (see ``numba_smooth_kernels``)."""
    return "numba_act_kernels" if _codes()[activation] <= 2 else "numba_smooth_kernels"


def unpack_mask(mask: Tensor, x: Tensor) -> Tensor:
    """The activation mask written by the forward of ``x`` (:meth:`NumbaActMixin.act_mask`)
    as a boolean tensor shaped and laid out like the kernels' copy of ``x``: True where ``z
    = BN(x) + r`` was > 0 (relu: or NaN). The mask's bit ``j % 8`` of byte ``j // 8`` is the
    value at item ``j`` of that copy in memory."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    flat = ((mask.view(-1, 1) >> shifts) & 1).view(-1)[:x.numel()].bool()
    return flat.as_strided(x.shape, out_strides(x))


def _masked_activation(activation: str, slope: float) -> bool:
    """relu, or leaky_relu with a slope >= 0: whose backward decides by z's sign alone."""
    return activation == "relu" or (activation == "leaky_relu" and slope >= 0)


def _check_mask(mask: Tensor, x: Tensor, activation: str, slope: float, inplace: bool,
                residual_ok: bool, where: str) -> None:
    """A mask handed to :meth:`NumbaActMixin.forward_act` / ``backward_act`` must be what
    :meth:`NumbaActMixin.act_mask` makes for such a call: the kernels trust its size and
    skip the residual for it (the op layers never pass another; a direct call must not
    crash or read past it)."""
    nbytes = (x.numel() + 7) // 8
    if (mask.dtype != torch.uint8 or mask.dim() != 1 or not mask.is_contiguous()
            or mask.numel() != nbytes or mask.device.type != "cpu"):
        raise ValueError(f"batchnorm: {where}: the activation mask must be a contiguous "
                         f"uint8 CPU tensor of {nbytes} bytes (act_mask's), got "
                         f"{mask.dtype} of shape {tuple(mask.shape)} on {mask.device}")
    if (inplace or not _masked_activation(activation, slope) or not residual_ok
            or x.dtype not in (torch.float32, torch.float64)):
        raise ValueError(f"batchnorm: {where}: an activation mask is for relu or leaky_relu "
                         "(slope >= 0) with a residual, out of place, float32 or float64 "
                         f"(see act_mask); got {activation} (slope {slope}), in place "
                         f"{inplace}, {x.dtype}, "
                         + ("no residual" if where == "forward_act" else "a residual too"))


class NumbaActMixin:
    """``forward_act``/``backward_act`` on fused numba kernels; put before the composite's
    class in the bases (``class NumbaBackend(NumbaActMixin, TorchBackend)``).

    Attributes:
        fuse_all_activations: run elu, silu and gelu in the fused kernels (default True;
            ``BATCHNORM_NUMBA_FUSE_ALL_ACTS=0`` turns it off). Off, these three run as the
            composite: our BatchNorm kernels, then torch's activation. The fused kernels
            compute them with float32 exp, expm1 and erf that vectorize (float64: libm's),
            and a training step of ``BatchNormAct2d`` measured 1.2-2.1x faster than that
            composite on the ResNet-50 shapes of 14x14 and up (benchmarks/RESULTS.md).
        activation_mask: save relu's and leaky_relu's activation mask instead of the
            residual (:meth:`act_mask`; default True, ``BATCHNORM_NUMBA_ACT_MASK=0`` turns
            it off: the residual is saved and read back, as before the mask existed). The
            C++ step reads it when it makes a call's recipe: set it before the first call,
            or call ``numba_step.forget_recipes()`` after changing it.
        mask_min_row_channels: no mask for inputs the kernels read as rows (channels last,
            or ``(N, C)``) with fewer channels than this: with the mask their backward ran
            2.1-2.3x slower at C = 8, 13, 16 and 20 (not found why), and forward and
            backward together 4% slower at C = 32, even at C = 64 ((16, C, 64, 64) channels
            last, one thread; benchmarks/RESULTS.md).
    """

    fuse_all_activations = os.environ.get("BATCHNORM_NUMBA_FUSE_ALL_ACTS", "1").strip() != "0"
    activation_mask = os.environ.get("BATCHNORM_NUMBA_ACT_MASK", "1").strip() != "0"
    mask_min_row_channels = 64

    def _act_fusable(self, x: Tensor, residual: Tensor | None, activation: str) -> bool:
        """Can the fused kernels run on ``x`` (as laid out for them) with this residual?"""
        if x.dtype not in _nb()._DTYPES or x.device.type != "cpu" or x.numel() == 0:
            return False
        if activation not in _codes():
            return False
        if _codes()[activation] > 2 and not self.fuse_all_activations:
            return False
        return residual is None or (residual.dtype == x.dtype and residual.shape == x.shape)

    def _act_fused(self, x: Tensor, residual: Tensor | None, activation: str,
                   out: Tensor) -> bool:
        """Does :meth:`forward_act` run the fused kernels (``x`` in a kernel layout)?"""
        return (self._act_fusable(x, residual, activation) and layout_of(x) != "other"
                and out.dtype == x.dtype and out.stride() == x.stride())

    def act_mask(self, x: Tensor, residual: Tensor | None, activation: str, slope: float,
                 out: Tensor) -> Tensor | None:
        """A (zeroed) activation mask for :meth:`forward_act` to write and
        :meth:`backward_act` to read instead of ``residual`` (see the module docstring), or
        None where this call keeps the residual: no residual, in place (``out is x``), an
        activation other than relu and leaky_relu with a slope >= 0, half storage (where the
        stored output is rounded: its sign is not z's), rows of fewer than
        :attr:`mask_min_row_channels` channels, or not fused."""
        if (not self.activation_mask or residual is None or out is x or x.numel() == 0
                or x.dtype not in (torch.float32, torch.float64)
                or not _masked_activation(activation, slope)):
            return None
        layout = layout_of(x)
        rows = layout == "cl" or x.numel() == x.shape[0] * x.shape[1]
        if rows and x.shape[1] < self.mask_min_row_channels:
            return None
        # forward_act's test on the kernels' copy of x (contiguous for "other"), uncopied
        strides = x.stride() if layout != "other" else tuple(out_strides(x))
        if not (self._act_fusable(x, residual, activation) and out.dtype == x.dtype
                and out.stride() == strides):
            return None
        # zeroed: the kernels or the bits of a byte that two tasks share into it
        return torch.zeros((x.numel() + 7) // 8, dtype=torch.uint8)

    @staticmethod
    def _residual(residual: Tensor | None, x: Tensor) -> Tensor | None:
        """The residual in ``x``'s memory layout (a packed ``s1`` argument; None: none)."""
        return None if residual is None else match_layout(residual, x)

    def forward_act(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        residual: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        activation: str,
        slope: float,
        out: Tensor,
        mask: Tensor | None = None,
    ) -> ForwardResult:
        """``out = act(BN(x) + residual)`` in one kernel call (see the module docstring).

        Args:
            x: ``(N, C, *)`` input; ``out`` is ``x`` itself (in-place) or a fresh tensor in
                :func:`~.base.empty_out_like` layout.
            running_mean, running_var: updated copies returned in training; the
                normalizing statistics in eval.
            mask: from :meth:`act_mask` for these arguments, or None: the activation mask
                to write.
        """
        inplace = out is x
        if mask is not None:
            _check_mask(mask, x, activation, slope, inplace, residual is not None,
                        "forward_act")
        if not inplace:
            x = as_kernel_layout(x)
        if not self._act_fused(x, residual, activation, out):
            if mask is not None:
                raise RuntimeError("batchnorm: an activation mask for a call that does not "
                                   "run the fused kernels (act_mask returns None for it)")
            return super().forward_act(  # type: ignore[misc]
                x, weight, bias, running_mean, running_var, residual, training, momentum, eps,
                activation, slope, out,
            )
        _, mean, invstd, new_rm, new_rv = self._forward_act_call(
            x, weight, bias, running_mean, running_var, residual, training, momentum, eps,
            activation, slope, out, mask).run()
        if new_rm is not None and new_rv is not None:
            assert running_mean is not None and running_var is not None
            if new_rm.dtype != running_mean.dtype:
                new_rm = new_rm.to(running_mean.dtype)
            if new_rv.dtype != running_var.dtype:
                new_rv = new_rv.to(running_var.dtype)
        return out, mean, invstd, new_rm, new_rv

    def _forward_act_call(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        residual: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        activation: str,
        slope: float,
        out: Tensor,
        mask: Tensor | None = None,
    ) -> Any:
        """:meth:`forward_act`'s fused kernel call, packed but not run (a
        ``numba_backend.KernelCall``; ``outputs``: ``(out, mean, invstd, new_running_mean,
        new_running_var)``, the running pair in the accumulation dtype or None). ``x`` is in
        a kernel layout and fusable (:meth:`_act_fusable`); ``mask``: as in
        :meth:`forward_act`."""
        nb = _nb()
        plan = nb._plan(f"{_module(activation)}.forward_act", x, training, True)
        view, acc = plan.view, plan.acc
        c = x.shape[1]
        new_rm = new_rv = rm = rv = None
        if training:
            mean, invstd = torch.empty(c, dtype=acc), torch.empty(c, dtype=acc)
            if running_mean is not None and running_var is not None:
                rm, rv = nb._chan(running_mean, acc), nb._chan(running_var, acc)
                new_rm, new_rv = torch.empty(c, dtype=acc), torch.empty(c, dtype=acc)
            var = None
        else:
            # the kernels normalize with the running variance (invstd in float64 from it, as
            # plain BatchNorm's eval); invstd is an output for the backward
            assert running_mean is not None and running_var is not None
            mean, var = nb._chan(running_mean, acc), nb._chan(running_var, acc)
            invstd = safe_invstd(running_var.detach().to(acc), eps)
        parts = view.parts
        tmp = nb._Scratch(parts, c, 4, acc)
        stream = 1 if nb._streamed(out, reduced=training) else 2 if out is x else 0
        values = [
            x, self._residual(residual, x), out, mask, *view.dims, view.blocks, parts, mean,
            tmp.rows(3, 0), None if var is not None else invstd, var, nb._chan(weight, acc),
            nb._chan(bias, acc), rm, rv, new_rm, new_rv, eps, momentum, training,
            _codes()[activation] + 8 * stream, slope, *tmp.partials(), tmp.rows(0, 3),
        ]
        return nb.KernelCall(plan, values, tmp, (out, mean, invstd, new_rm, new_rv))

    def _backward_act_unfused(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        residual: Tensor | None,
        training: bool,
        activation: str,
        slope: float,
        output_mask: tuple[bool, bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """The backward of a delegated activation (elu, silu, gelu; float32 or float64, not
        in place) in four elementwise passes (five with a residual) instead of the
        composite's dozen: ``z`` from our apply kernel (then the residual added in place),
        ``dz`` from torch's activation backward, then our fused BatchNorm backward on ``dz``
        (its reduction and its dx pass; ``dresidual = dz``, no copy)."""
        from .activations import act_backward

        z = self.apply(x, mean, invstd, weight, bias)  # type: ignore[attr-defined]
        if residual is not None:
            z = z.add_(match_layout(residual, z))
        dz = act_backward(match_layout(dy, z).to(z.dtype), z, activation, slope)
        dx, dw, db = self.backward(  # type: ignore[attr-defined]
            dz, x, weight, mean, invstd, training, output_mask[:3])
        dres = None
        if output_mask[3] and residual is not None:
            dres = dz if dz.stride() == residual.stride() else match_layout(dz, residual)
        return dx, dw, db, dres

    def backward_act(
        self,
        dy: Tensor,
        saved: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        residual: Tensor | None,
        training: bool,
        activation: str,
        slope: float,
        inplace: bool,
        output_mask: tuple[bool, bool, bool, bool],
        mask: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``(dx, dweight, dbias, dresidual)`` in one kernel call (reduction + elementwise).

        ``saved`` is ``x`` (normal mode) or the output ``y`` (in-place mode); outputs not in
        ``output_mask`` are neither computed nor written. ``dweight``/``dbias`` are in the
        accumulation dtype. ``mask``: the forward's activation mask (:meth:`act_mask`), in
        place of the residual (then None; ``dresidual`` is still computed).
        """
        if mask is not None:
            _check_mask(mask, saved, activation, slope, inplace, residual is None,
                        "backward_act")
        if inplace:
            # the kernels build in-place loops for invertible activations only (the public
            # entry points check this first; a direct call must not get normal mode's math)
            from .activations import check_activation

            check_activation(activation, slope, True)
        else:
            saved = as_kernel_layout(saved)
        if not self._act_fusable(saved, residual, activation) or layout_of(saved) == "other":
            if mask is not None:
                raise RuntimeError("batchnorm: the activation mask of a call that does not "
                                   "run the fused kernels")
            if (not inplace and activation in ("elu", "silu", "gelu") and saved.numel() > 0
                    and saved.dtype in (torch.float32, torch.float64)
                    and layout_of(saved) != "other" and saved.device.type == "cpu"
                    and (residual is None or residual.dtype == saved.dtype)):
                return self._backward_act_unfused(dy, saved, weight, bias, mean, invstd,
                                                  residual, training, activation, slope,
                                                  output_mask)
            return super().backward_act(  # type: ignore[misc]
                dy, saved, weight, bias, mean, invstd, residual, training, activation, slope,
                inplace, output_mask,
            )
        if dy.stride() != saved.stride() or dy.dtype != saved.dtype:
            dy = empty_out_like(saved).copy_(dy)
        need_dx, need_dw, need_db, need_dr = output_mask
        need_dr = need_dr and (residual is not None or mask is not None)
        do_reduce = need_dw or need_db or (training and need_dx)
        do_apply = need_dx or need_dr
        if do_reduce or do_apply:
            dx, sum_dz, sum_dzx, dres = self._backward_act_call(
                dy, saved, weight, bias, mean, invstd, residual, training, activation, slope,
                inplace, do_reduce, do_apply, mask).run()
        else:
            dx = dres = None
            sum_dz = sum_dzx = torch.zeros(saved.shape[1], dtype=acc_dtype(saved))
        return (dx if need_dx else None, sum_dzx if need_dw else None,
                sum_dz if need_db else None, dres if need_dr else None)

    def _backward_act_call(
        self,
        dy: Tensor,
        saved: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        residual: Tensor | None,
        training: bool,
        activation: str,
        slope: float,
        inplace: bool,
        do_reduce: bool,
        do_apply: bool,
        mask: Tensor | None = None,
    ) -> Any:
        """:meth:`backward_act`'s fused kernel call, packed but not run (``outputs``: ``(dx,
        sum_dz, sum_dz_xhat, dresidual)``). ``dy`` has ``saved``'s strides and dtype. The
        sums start at zero, which is what the elementwise pass reads without a reduction.
        ``mask``: as in :meth:`backward_act`."""
        nb = _nb()
        acc = acc_dtype(saved)
        c = saved.shape[1]
        sum_dz, sum_dzx = torch.zeros(c, dtype=acc), torch.zeros(c, dtype=acc)
        # the elementwise pass writes dx, and dresidual whenever there is a residual (one
        # branch-free loop): an output not asked for goes to scratch (rare in practice)
        dx = nb._new_output(saved) if do_apply else None
        has_res = residual is not None or mask is not None
        dres = nb._new_output(saved) if do_apply and has_res else None
        plan = nb._plan(f"{_module(activation)}.backward_act", saved, do_reduce, do_apply,
                        first=3)
        view = plan.view
        parts = view.parts
        tmp = nb._Scratch(parts, c, 9, acc)
        values = [
            dy, saved, self._residual(residual, saved), mask, dx, dres, *view.dims,
            view.blocks, parts, nb._chan(mean, acc), nb._chan(invstd, acc),
            nb._chan(weight, acc), nb._chan(bias, acc), sum_dz, sum_dzx,
            float(saved.numel() // c), do_reduce, do_apply, training, inplace,
            _codes()[activation] + 8 * bool(nb._streamed(dx, view)), slope, *tmp.partials(),
            tmp.rows(0, 9),
        ]
        return nb.KernelCall(plan, values, tmp, (dx, sum_dz, sum_dzx, dres))
