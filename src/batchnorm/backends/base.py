"""The backend interface: BatchNorm built from a few primitives.

Every backend implements four primitives on tensors of shape ``(N, C, *)``:

* ``stats(x) -> (mean, m2)``: per-channel mean and ``M2 = sum((x - mean)^2)`` over the
  ``count = numel / C`` values of each channel (mergeable with :func:`chan_combine`);
* ``apply(x, mean, invstd, weight, bias) -> y``: ``y = (x - mean) * invstd * weight + bias``;
* ``backward_reduce(dy, x, mean, invstd) -> (sum_dy, sum_dy_xmu)``;
* ``backward_apply(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count) -> dx``:
  ``dx = weight * invstd * (dy - sum_dy / m - (x - mean) * invstd^2 * sum_dy_xmu / m)``.

From those, :class:`Backend` composes the three entry points the op layer calls
(``forward_train``, ``forward_eval``, ``backward``); a fused backend overrides the entry points
with single-launch kernels and keeps the primitives for SyncBatchNorm, which inserts one
collective between ``stats`` and ``apply`` (and between the two backward steps).

Statistics, saved ``mean``/``invstd`` and reductions are float32 for float16/bfloat16/float32
inputs and float64 for float64 inputs (:func:`acc_dtype`).

The C-length helpers in this module (:func:`safe_invstd`, :func:`running_update`,
:func:`chan_combine`) are shared by all backends so that the small per-channel math is written
once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "Backend",
    "ForwardResult",
    "acc_dtype",
    "as_kernel_layout",
    "bcast",
    "chan_combine",
    "empty_out_like",
    "layout_of",
    "match_layout",
    "out_strides",
    "reduce_dims",
    "running_update",
    "safe_invstd",
]

# (y, save_mean, save_invstd, new_running_mean or None, new_running_var or None)
ForwardResult = tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]


def acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype for an input: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def reduce_dims(x: Tensor) -> list[int]:
    """All dims but the channel dim 1."""
    return [0, *range(2, x.dim())]


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """View a per-channel vector ``(C,)`` so that it broadcasts against ``x`` of shape (N, C, *)."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def layout_of(x: Tensor) -> str:
    """The memory layout of ``x`` as kernels see it.

    Returns:
        ``"cf"`` (channels first: contiguous ``(N, C, S)``), ``"cl"`` (channels last:
        contiguous ``(N, S, C)``, e.g. NHWC) or ``"other"`` (anything else: strided, sliced).
        A tensor that is both (for example ``(N, C)`` or ``C == 1``) counts as ``"cf"``.
    """
    if x.is_contiguous():
        return "cf"
    # On every call's path: torch's own checks for ranks 4 and 5 (a permuted view costs
    # several times more), the same rule by hand for the others: channels innermost, then the
    # spatial dims last to first, then the batch, dims of size 1 not counting.
    d = x.dim()
    if d == 4:
        return "cl" if x.is_contiguous(memory_format=torch.channels_last) else "other"
    if d == 5:
        return "cl" if x.is_contiguous(memory_format=torch.channels_last_3d) else "other"
    if d < 3:
        return "other"
    shape, strides = x.shape, x.stride()
    expected = 1
    for dim in (1, *range(d - 1, 1, -1), 0):
        if shape[dim] != 1:
            if strides[dim] != expected:
                return "other"
            expected *= shape[dim]
    return "cl"


def out_strides(x: Tensor) -> list[int]:
    """Dense strides in ``x``'s memory layout: channels-last order for a channels-last input
    (any rank), contiguous otherwise. The layout every kernel writes its outputs in."""
    d = x.dim()
    order = [0, *range(2, d), 1] if layout_of(x) == "cl" else list(range(d))
    strides = [0] * d
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        # not ``*=``: under torch.jit.trace sizes are tensors, and an in-place product would
        # make every stride the same object
        step = step * x.shape[dim]
    return strides


def empty_out_like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized output in the layout the kernels write for input ``x``
    (:func:`out_strides`).

    Channels-last input gives channels-last output (any rank); everything else gives a
    contiguous output. Real kernels and fake (meta) implementations both allocate through this
    function so that their strides agree under ``torch.compile``.
    """
    dtype = x.dtype if dtype is None else dtype
    if x.is_contiguous():  # the common case, without computing strides in Python
        return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)
    return torch.empty_strided(x.shape, out_strides(x), dtype=dtype, device=x.device)


def as_kernel_layout(x: Tensor) -> Tensor:
    """``x`` itself when it is channels-first or channels-last contiguous, else one deliberate
    contiguous copy (sliced or transposed inputs)."""
    return x if layout_of(x) != "other" else x.contiguous()


def match_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (a gradient, say) in the same memory layout as ``like``; copies only if needed."""
    if t.stride() == like.stride():
        return t
    if layout_of(like) == "cl":
        out = empty_out_like(like, t.dtype)
        out.copy_(t)
        return out
    return t.contiguous()


def safe_invstd(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(var + eps)``, and 0 (not inf) where ``var + eps == 0``."""
    denom = var + eps
    # only an exact zero maps to 0: a negative or NaN variance (a corrupt buffer) gives NaN,
    # as torch does, instead of silently normalizing with 0
    return torch.where(denom == 0, torch.zeros_like(denom), torch.rsqrt(denom))


def running_update(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    m2: Tensor,
    count: int,
    momentum: float,
) -> tuple[Tensor | None, Tensor | None]:
    """New running buffers: ``(1 - momentum) * running + momentum * batch`` (PyTorch's
    convention: momentum weighs the NEW value); ``running_var`` gets the unbiased variance
    ``m2 / (count - 1)``. An empty batch leaves the buffers unchanged. Returns fresh tensors in
    the buffers' dtype (never aliases of the inputs)."""
    if running_mean is None or running_var is None:
        return None, None
    if count == 0:
        return running_mean.clone(), running_var.clone()
    acc = mean.dtype
    var_unbiased = m2 / max(count - 1, 1)
    # (1 - m) * r + m * b, as ATen: lerp's r + m * (b - r) is NaN for an infinite buffer and
    # rounds a tiny b next to a large r away at m = 1
    new_mean = (1.0 - momentum) * running_mean.to(acc) + momentum * mean
    new_var = (1.0 - momentum) * running_var.to(acc) + momentum * var_unbiased
    return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)


def chan_combine(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the statistics of ``P`` disjoint parts (Chan et al., many parts at once).

    Args:
        counts: ``(P,)`` values per part (the same for every channel); zero parts drop out.
        means, m2s: ``(P, C)`` per-part means and M2.

    Returns:
        ``(count, mean, m2)`` of the union: ``mean = sum(n_p mean_p) / n``,
        ``M2 = sum(M2_p) + sum(n_p (mean_p - mean)^2)``. Deltas are taken against the combined
        mean, so no large terms cancel.
    """
    counts = counts.to(means.dtype)
    total = counts.sum()
    w = (counts / total.clamp_min(1)).unsqueeze(1)
    mean = (w * means).sum(0)
    m2 = m2s.sum(0) + (counts.unsqueeze(1) * (means - mean) ** 2).sum(0)
    return total, mean, m2


class Backend:
    """Base class of all backends; subclasses implement the four primitives.

    Class attributes:
        name: registry name.
        device_types: device types the backend runs on (empty = any).
    """

    name: ClassVar[str] = "base"
    device_types: ClassVar[tuple[str, ...]] = ()

    # ---- capability -------------------------------------------------------------------------
    def is_available(self) -> tuple[bool, str]:
        """``(ok, reason)``: can this backend run in this process at all?"""
        return True, ""

    def supports(self, x: Tensor) -> str | None:
        """``None`` if this backend can run on ``x``, else the reason it cannot."""
        if self.device_types and x.device.type not in self.device_types:
            return (
                f"backend {self.name!r} runs on {', '.join(self.device_types)} tensors, "
                f"got a {x.device.type} tensor"
            )
        return None

    def preferred_for(self, x: Tensor, training: bool) -> bool:
        """Should ``"auto"`` pick this backend for ``x``? (a speed heuristic, not capability)"""
        return True

    def new_output(self, x: Tensor) -> Tensor:
        """An uninitialized output for input ``x``, in :func:`empty_out_like` layout (the op
        layer allocates the fused activation's output through this; a backend may recycle
        buffers)."""
        return empty_out_like(x)

    # ---- primitives (subclasses implement) --------------------------------------------------
    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def apply(
        self, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
    ) -> Tensor:
        raise NotImplementedError

    def backward_reduce(
        self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

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
        raise NotImplementedError

    # ---- entry points (fused backends override) ---------------------------------------------
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
        """Batch statistics -> running update -> normalize. ``x`` is non-empty."""
        count = x.numel() // x.shape[1]
        mean, m2 = self.stats(x)
        invstd = safe_invstd(m2 / count, eps)
        new_rm, new_rv = running_update(running_mean, running_var, mean, m2, count, momentum)
        return self.apply(x, mean, invstd, weight, bias), mean, invstd, new_rm, new_rv

    def forward_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
    ) -> Tensor:
        """Normalize with the running statistics."""
        acc = acc_dtype(x)
        invstd = safe_invstd(running_var.to(acc), eps)
        return self.apply(x, running_mean.to(acc), invstd, weight, bias)

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
        """``(dx, dweight, dbias)`` (each None unless asked for in ``output_mask``).

        ``dweight``/``dbias`` are returned in the accumulation dtype; the op layer casts them.
        In eval mode (``training=False``) the statistics are constants: ``dx = dy*weight*invstd``.
        """
        count = x.numel() // x.shape[1]
        sum_dy, sum_dy_xmu = self.backward_reduce(dy, x, mean, invstd)
        dx = None
        if output_mask[0]:
            if training:
                dx = self.backward_apply(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
            else:
                # the statistics are constants: no x term, so that an inf or NaN in x or in
                # the running mean does not reach dx ((x - mean) * 0 would be NaN), as torch
                acc = acc_dtype(x)
                scale = invstd if weight is None else invstd * weight.to(acc)
                dx = empty_out_like(x)
                dx.copy_(dy.to(acc) * bcast(scale, x))
        dw = sum_dy_xmu * invstd if output_mask[1] else None
        db = sum_dy if output_mask[2] else None
        return dx, dw, db

    # ---- eager steps without the Python op layer (optional) ---------------------------------
    def eager_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        double_backward: Callable[..., Any],
    ) -> Tensor | None:
        """The whole eager training step, autograd included: ``y`` (differentiable w.r.t. x,
        weight and bias), the running buffers updated in place; or None, and the op layer
        runs its own path. Called outside tracing and transforms only, with validated
        arguments. ``double_backward(dy, x, weight, mean, invstd, eps, need_dx, need_dweight,
        need_dbias) -> (dx, dweight, dbias)`` is the op layer's composite for a backward with
        ``create_graph=True``."""
        return None

    def eager_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
    ) -> Tensor | None:
        """The eval forward when nothing needs a gradient, or None (the op layer's path)."""
        return None

    def eager_act_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        residual: Tensor | None,
        momentum: float,
        eps: float,
        activation: str,
        slope: float,
        inplace: bool,
        double_backward: Callable[..., Any],
    ) -> Tensor | None:
        """As :meth:`eager_train` for ``act(BN(x) + residual)`` in training (differentiable
        w.r.t. x, weight, bias and the residual; ``inplace``: written over ``x``, whose
        checks the caller has run), or None.
        ``double_backward(dy, x, weight, bias, residual, mean, invstd, eps, activation, slope,
        need_dx, need_dweight, need_dbias, need_dresidual, inplace)`` returns the four
        gradients (and raises in place)."""
        return None

    def eager_act_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        residual: Tensor | None,
        eps: float,
        activation: str,
        slope: float,
        inplace: bool = False,
    ) -> Tensor | None:
        """``act(BN(x) + residual)`` in eval when nothing needs a gradient; ``inplace``:
        written over ``x`` (whose checks the caller has run; its version bumped) and ``x``
        returned. Or None (the op layer's path)."""
        return None

    # ---- BatchNorm + activation (+ residual); fused backends override ------------------------
    def act_mask(self, x: Tensor, residual: Tensor | None, activation: str, slope: float,
                 out: Tensor) -> Tensor | None:
        """A buffer for this call's forward to write the activation's mask into, saved for
        backward instead of ``residual`` (passed as ``mask=`` to :meth:`forward_act` and
        :meth:`backward_act`); None (this default): the residual is saved. A backend that
        returns one takes ``mask`` in both methods."""
        return None

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
    ) -> ForwardResult:
        """``out = act(BN(x) + residual)``; ``out`` may be ``x`` itself (in-place mode).

        In training the batch statistics normalize and the new running buffers are returned;
        in eval the running statistics normalize and ``(mean, invstd)`` are theirs. This
        default composes :meth:`forward_train`/:meth:`forward_eval` with the activation in
        torch ops (extra passes); fused backends do it in one.
        """
        from .activations import act_forward

        acc = acc_dtype(x)
        if training:
            y, mean, invstd, new_rm, new_rv = self.forward_train(
                x, weight, bias, running_mean, running_var, momentum, eps
            )
        else:
            assert running_mean is not None and running_var is not None
            y = self.forward_eval(x, weight, bias, running_mean, running_var, eps)
            mean, invstd = running_mean.to(acc), safe_invstd(running_var.to(acc), eps)
            new_rm = new_rv = None
        z = y.to(acc)
        if residual is not None:
            z = z + residual.to(acc)
        out.copy_(act_forward(z, activation, slope))
        return out, mean, invstd, new_rm, new_rv

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
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``(dx, dweight, dbias, dresidual)`` of ``y = act(BN(x) + residual)``.

        ``saved`` is the input ``x`` (normal mode) or the output ``y`` (in-place mode, where
        ``z = act^-1(y)`` and ``xhat = (z - residual - bias) / weight`` are recomputed; the
        weight must then be non-zero, see ``batch_norm_act``). With ``dz = dy * act'(z)``:
        ``dresidual = dz`` and the BatchNorm backward runs on ``dz``.
        """
        from .activations import act_backward, act_grad_from_output, act_inverse

        acc = acc_dtype(saved)
        dims = reduce_dims(saved)
        c = saved.shape[1]
        w = torch.ones(c, dtype=acc, device=saved.device) if weight is None else weight.to(acc)
        b = torch.zeros(c, dtype=acc, device=saved.device) if bias is None else bias.to(acc)
        dyf = dy.to(acc)
        if inplace:
            y = saved.to(acc)
            dz = dyf * act_grad_from_output(y, activation, slope)
            bn_out = act_inverse(y, activation, slope)
            if residual is not None:
                bn_out = bn_out - residual.to(acc)
            xhat = (bn_out - bcast(b, saved)) / bcast(w, saved)
        else:
            xhat = (saved.to(acc) - bcast(mean, saved)) * bcast(invstd, saved)
            z = xhat * bcast(w, saved) + bcast(b, saved)
            if residual is not None:
                z = z + residual.to(acc)
            dz = act_backward(dyf, z, activation, slope)
        sum_dz = dz.sum(dims)
        sum_dz_xhat = (dz * xhat).sum(dims)
        dx = None
        if output_mask[0]:
            count = saved.numel() // c
            scale = bcast(w * invstd, saved)
            if training:
                g = dz - bcast(sum_dz / count, saved) - xhat * bcast(sum_dz_xhat / count, saved)
            else:
                g = dz
            dx = empty_out_like(saved)
            dx.copy_(g * scale)
        dres = None
        if output_mask[3] and residual is not None:
            dres = empty_out_like(residual)
            dres.copy_(dz)
        return (
            dx,
            sum_dz_xhat if output_mask[1] else None,
            sum_dz if output_mask[2] else None,
            dres,
        )
