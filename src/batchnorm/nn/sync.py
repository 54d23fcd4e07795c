"""SyncBatchNorm: batch statistics over every process of a ``torch.distributed`` group.

The training step is the backend primitives with one collective in between:

* forward: local ``(count, mean, M2)`` (``stats``) -> one all-gather of the packed
  ``[count, mean, M2]`` of every rank -> :func:`~batchnorm.backends.base.chan_combine` -> running
  update -> ``apply``;
* backward: local ``(sum_dy, sum_dy_xmu)`` (``backward_reduce``) -> one all-reduce -> ``dx`` by
  ``backward_apply``. ``dweight``/``dbias`` stay local sums: DistributedDataParallel reduces
  parameter gradients itself (as ``torch.nn.SyncBatchNorm`` does).

Counts are gathered, not summed, because ranks may hold different numbers of values; they travel
as exact int64 bit patterns inside the floating packet, so the weights of the merge are exact for
any batch size, and a rank with an empty batch joins every collective and contributes nothing.
Any backend whose primitives run on the input's device works (tested on CPU with gloo: ``torch``,
``native``, ``numba``; on GPU the same code runs ``triton``'s primitives over NCCL), any input
rank and channels-last layouts.

Host synchronization: on a GPU the gathered counts (world size int64 values) are read on the host
once per layer and training step; they decide the "one value per channel" error, the unbiased
running variance and the backward's ``count``. Everything else stays on the device.

Conversion between local and synchronized modules (:func:`convert_sync_batchnorm`,
:func:`revert_sync_batchnorm`) keeps the very same parameter and buffer tensors (an optimizer
built before the conversion still holds them), the hyper-parameters, backend and training flag.
``BatchNormAct*`` become :class:`SyncBatchNormAct` (activation and residual kept). Any other
BatchNorm subclass with behaviour of its own takes part through a small protocol instead of
being silently flattened to plain SyncBatchNorm:

* ``module.to_sync_batchnorm(process_group) -> nn.Module``: the synchronized counterpart of a
  local module (typically a subclass of :class:`SyncBatchNorm` built with
  :meth:`SyncBatchNorm.from_batchnorm`, plus whatever the subclass adds);
* ``module.to_local_batchnorm() -> nn.Module``: the way back (:class:`SyncBatchNorm` implements
  it by rebuilding the class it was converted from).

A ``_BatchNorm`` subclass that overrides ``forward`` and has no ``to_sync_batchnorm`` is refused
with a ``TypeError`` rather than converted without its behaviour.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from ..backends import get_backend
from ..backends.activations import check_activation
from ..backends.base import (
    acc_dtype,
    as_kernel_layout,
    chan_combine,
    empty_out_like,
    match_layout,
    running_update,
    safe_invstd,
)
from ..functional import check_act_args, check_residual
from ._fx import fx_leaf
from .act import BatchNormAct, apply_activation
from .batchnorm import BatchNorm, _BatchNormBase, check_input_rank, rebuild_as

__all__ = [
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
]


# ---- collectives --------------------------------------------------------------------------------
def _all_gather(packed: Tensor, group: Any, world: int) -> Tensor:
    """``(world, L)``: every rank's ``packed`` (length L), in rank order."""
    if packed.device.type == "cpu" or dist.get_backend(group) == "gloo":
        # Gloo has no all_gather_into_tensor before torch 2.6; the list form works everywhere.
        parts = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(parts, packed, group=group)
        return torch.stack(parts)
    out = packed.new_empty((world, packed.numel()))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, packed, group=group)
    return out


# Packets travel in float64 whatever the input dtype: every rank then sends the same number
# of bytes (a rank with float32 input next to one with float64 input would otherwise make the
# collective fail on one rank and read garbage on the other), and the merge runs in float64.
_WIRE = torch.float64
# A count of -1 marks a rank whose input failed its checks: it still joins the collective,
# so every rank raises instead of the others waiting until the group's timeout.
_FAILED = -1


def _pack(count: int, mean: Tensor, m2: Tensor) -> Tensor:
    """``[count, mean(C), m2(C)]`` in one float64 tensor; the count's int64 bits ride in one
    slot (a collective copies bits, so the count arrives exact for any batch size)."""
    head = torch.full((1,), count, dtype=torch.int64, device=mean.device)
    return torch.cat([head.view(_WIRE), mean.to(_WIRE), m2.to(_WIRE)])


def _unpack(gathered: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(counts (W,) int64, means (W, C), m2s (W, C))`` (float64) from the gathered packets."""
    counts = gathered[:, :1].contiguous().view(torch.int64).view(-1)
    return counts, gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :]


def _scripted_eval_only(training: bool) -> None:
    """TorchScript cannot call torch.distributed: a scripted SyncBatchNorm normalizes with its
    running statistics (eval), and refuses training rather than using this process's batch
    alone. TorchScript-compatible."""
    if training:
        raise RuntimeError(
            "a scripted SyncBatchNorm runs in eval mode only (TorchScript cannot gather the "
            "statistics of a process group); call .eval(), or script the model after "
            "batchnorm.revert_sync_batchnorm for single-process training")


def _failed_ranks(counts: list[int]) -> list[int]:
    return [r for r, n in enumerate(counts) if n == _FAILED]


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training BatchNorm whose statistics span a process group (see the module docstring).

    Collectives cannot live inside the functional custom ops, so this is a plain autograd
    Function over the backend primitives. The running buffers are updated in place.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        group: Any,
        world: int,
        backend: str,
    ) -> Tensor:
        be = get_backend(backend)
        x = as_kernel_layout(x)
        channels = x.shape[1]
        count = x.numel() // channels
        acc = acc_dtype(x)
        if count > 0:
            mean, m2 = be.stats(x)
        else:  # joins the gather with a zero count: drops out of the merge below
            mean = m2 = x.new_zeros((channels,), dtype=acc)
        counts, means, m2s = _unpack(_all_gather(_pack(count, mean, m2), group, world), channels)
        host_counts = counts.tolist()  # the one host read (a sync on GPU)
        failed = _failed_ranks(host_counts)
        if failed:
            raise RuntimeError(
                f"SyncBatchNorm: the input of rank(s) {failed} of the group failed its checks "
                "(the error on that rank says why); this rank's input was fine, and no state "
                "changed on any rank"
            )
        total = sum(host_counts)
        if total == 1:
            # Every rank sees the same total, so every rank raises here and none is left waiting.
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{x.shape} on this rank and 1 value per channel in total over the {world} "
                "processes of the group"
            )
        _, mean, m2 = chan_combine(counts, means, m2s)
        mean, m2 = mean.to(acc), m2.to(acc)
        invstd = safe_invstd(m2 / max(total, 1), eps)
        new_rm, new_rv = running_update(running_mean, running_var, mean, m2, total, momentum)
        if running_mean is not None and running_var is not None:
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)

        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.total, ctx.group, ctx.backend = count, total, group, backend
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        if count == 0:
            return empty_out_like(x)
        return be.apply(x, mean, invstd, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        be = get_backend(ctx.backend)
        dy = match_layout(dy, x)
        if ctx.count > 0:
            sum_dy, sum_dy_xmu = be.backward_reduce(dy, x, mean, invstd)
        else:
            sum_dy = sum_dy_xmu = torch.zeros_like(mean)
        # Local sums: DDP all-reduces parameter gradients (what torch.nn.SyncBatchNorm does).
        dw = (sum_dy_xmu * invstd).to(ctx.weight_dtype) if need_dw else None
        db = sum_dy.to(ctx.bias_dtype) if need_db else None
        dx = None
        if need_dx:
            packed = torch.cat([sum_dy, sum_dy_xmu]).to(_WIRE)  # same size on every rank
            dist.all_reduce(packed, group=ctx.group)
            g_sum_dy, g_sum_dy_xmu = packed.to(sum_dy.dtype).chunk(2)
            if ctx.count > 0:
                dx = be.backward_apply(
                    dy, x, mean, invstd, weight, g_sum_dy, g_sum_dy_xmu, ctx.total
                )
            else:
                dx = empty_out_like(x)
        return dx, dw, db, None, None, None, None, None, None, None


# ---- the modules ------------------------------------------------------------------------------
class SyncBatchNorm(BatchNorm):
    r"""Batch Normalization whose training statistics span all processes of a group.

    A drop-in for ``torch.nn.SyncBatchNorm`` that also runs on CPU (gloo), with uneven and
    empty per-rank batches weighted exactly, and the kernels of any ``batchnorm`` backend.
    Synchronizes only in training with a process group of world size > 1; otherwise (no
    ``torch.distributed`` group, world size 1, eval) it is exactly :class:`BatchNorm`, and eval
    never communicates. The ``state_dict`` is BatchNorm's.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias, backend:
            as for :class:`BatchNorm`.
        process_group: the group to synchronize over (None: the default, whole-world group).

    Shape:
        Input ``(N, C, *)`` with ``C > 0`` (N may differ, and be 0, per rank); output the same
        shape, dtype and memory layout.

    Every rank of the group must call the layer the same number of times in training, and run
    backward through it, as with any collective.
    """

    # Revert target of a module built directly (not converted), and the constructor keywords
    # beyond BatchNorm's that conversions carry over in both directions.
    _default_local: ClassVar[type[_BatchNorm]] = BatchNorm
    _carried: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, backend=backend,
        )
        self.process_group = process_group
        # The local class this module was converted from (revert_sync_batchnorm rebuilds it).
        self._local_class: type[_BatchNorm] | None = None

    def _sync_group(self) -> tuple[Any, int] | None:
        """``(group, world_size)`` when this call synchronizes, else None (plain BN)."""
        if not self.training or not dist.is_available() or not dist.is_initialized():
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        world = dist.get_world_size(group)
        return (group, world) if world > 1 else None

    def _check_input_dim(self, input: Tensor) -> None:
        check_input_rank(input, None)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _forward_sync(
        self, input: Tensor, group: Any, world: int, check: Callable[[], None] | None = None
    ) -> Tensor:
        """Validation as in BatchNorm (and ``check``), the synchronized training step, then the
        counter.

        A rank whose input fails the checks still joins the statistics' all-gather, with a
        packet marked failed, and then raises its own error; the other ranks raise too (see
        ``_SyncBatchNormFunction``) instead of waiting in the collective until the group's
        timeout. The counter ticks only once the step has succeeded everywhere, so that a
        failed step (also the group-wide "one value per channel") changes no state.
        """
        try:
            if check is not None:
                check()
            # "More than one value per channel" holds for the group's total: checked after
            # the gather.
            running_mean, running_var, _, momentum, backend = self._prepare(
                input, check_batch_size=False, tick=False
            )
        except Exception:
            self._join_failed(input, group, world)
            raise
        y = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, float(momentum),
            float(self.eps), group, world, backend,
        )
        self._tick()
        return y

    def _join_failed(self, input: Any, group: Any, world: int) -> None:
        """This rank's part of the statistics' all-gather when its input failed the checks: a
        packet of the size every rank sends, marked failed."""
        # The module's own tensors first: they are on the device the healthy ranks gather on,
        # while a failed input may be on the wrong one (or on "meta", where the gather would
        # be a silent no-op and leave the other ranks waiting).
        ref = next((t for t in (self.running_mean, self.weight, self.bias, input)
                    if isinstance(t, Tensor) and t.device.type != "meta"), None)
        if ref is not None:
            device = ref.device
        elif dist.get_backend(group) == "nccl" and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        zeros = torch.zeros(self.num_features, dtype=_WIRE, device=device)
        with torch.no_grad():
            _all_gather(_pack(_FAILED, zeros, zeros), group, world)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input``; in training with world size > 1 the statistics are global."""
        if torch.jit.is_scripting():
            _scripted_eval_only(self.training)
            return self._scripted(input)
        node = fx_leaf(self, input)
        if node is not None:
            return node
        sync = self._sync_group()
        return super().forward(input) if sync is None else self._forward_sync(input, *sync)

    # ---- conversion -------------------------------------------------------------------------
    @classmethod
    def from_batchnorm(
        cls, module: _BatchNorm, process_group: Any | None = None
    ) -> SyncBatchNorm:
        """A ``cls`` holding ``module``'s parameters and buffers (the same tensors),
        hyper-parameters, backend, ``_carried`` attributes and training flag; it reverts to
        ``type(module)``."""
        out = rebuild_as(cls, module, process_group=process_group,
                       backend=getattr(module, "backend", None),
                       **{k: getattr(module, k) for k in cls._carried})
        out._local_class = type(module)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any | None = None):
        """``torch.nn.SyncBatchNorm.convert_sync_batchnorm``'s spelling of
        :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group)

    def to_local_batchnorm(self) -> nn.Module:
        """The local module this one was converted from (its class, this state), or
        ``_default_local`` if it was built directly."""
        cls = self._local_class or self._default_local
        kwargs: dict[str, Any] = {k: getattr(self, k) for k in self._carried}
        if issubclass(cls, _BatchNormBase):
            kwargs["backend"] = self.backend
        if issubclass(cls, nn.SyncBatchNorm):
            kwargs["process_group"] = self.process_group
        return rebuild_as(cls, self, **kwargs)


class SyncBatchNormAct(SyncBatchNorm, BatchNormAct):
    r"""``y = act(SyncBN(x) + residual)``: :class:`BatchNormAct` with statistics over a group.

    What :func:`convert_sync_batchnorm` makes of a ``BatchNormAct*`` (so the activation is kept).
    Without synchronization (eval, world size 1, no group) it is exactly :class:`BatchNormAct`
    (one fused pass). Synchronized, it is the synchronized BatchNorm, then the residual add and
    the activation as separate differentiable ops; ``inplace=True`` then computes out of place
    (same values, no memory saving).

    Args:
        as :class:`SyncBatchNorm`, plus ``activation``, ``negative_slope``, ``inplace`` as
        :class:`BatchNormAct`.
    """

    _default_local = BatchNormAct
    _carried = ("activation", "negative_slope", "inplace")

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
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
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group,
                         device, dtype, bias=bias, backend=backend)
        self.activation = activation
        self.negative_slope = negative_slope
        self.inplace = inplace

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """``act(BN(input) + residual)`` with the group's statistics in training."""
        if torch.jit.is_scripting():
            check_residual(input, residual)
            _scripted_eval_only(self.training)
            return apply_activation(self._scripted(input), residual, self.activation,
                                    float(self.negative_slope))
        node = fx_leaf(self, input, residual)
        if node is not None:
            return node
        sync = self._sync_group()
        if sync is None:
            return BatchNormAct.forward(self, input, residual)
        # BatchNormAct's checks too: before any state changes, and known to every rank
        # (without the in-place ones: synchronized, the layer computes out of place).
        # (a partial, not a lambda: TorchScript parses this forward, and rejects lambdas)
        y = self._forward_sync(input, *sync, check=functools.partial(
            check_act_args, input, residual, self.activation, self.negative_slope, False))
        return apply_activation(y, residual, self.activation, self.negative_slope)




def _sync_class(module: _BatchNorm) -> type[SyncBatchNorm] | None:
    """The synchronized class for a local BatchNorm whose forward we know, else None."""
    forward = type(module).forward
    if forward is BatchNormAct.forward:
        return SyncBatchNormAct
    if forward in (_BatchNorm.forward, _BatchNormBase.forward, nn.SyncBatchNorm.forward):
        return SyncBatchNorm
    return None


def _to_sync(module: nn.Module, process_group: Any | None) -> nn.Module:
    hook = getattr(module, "to_sync_batchnorm", None)
    if hook is not None:
        return hook(process_group)
    if not isinstance(module, _BatchNorm) or isinstance(module, SyncBatchNorm):
        return module
    cls = _sync_class(module)
    if cls is None:
        raise TypeError(
            f"{type(module).__qualname__} overrides forward, and converting it to SyncBatchNorm "
            "would drop that behaviour; give it a to_sync_batchnorm(process_group) method "
            "returning its synchronized variant (see batchnorm.nn.sync)"
        )
    if process_group is None and isinstance(module, nn.SyncBatchNorm):
        process_group = module.process_group
    return cls.from_batchnorm(module, process_group)


def _to_local(module: nn.Module) -> nn.Module:
    hook = getattr(module, "to_local_batchnorm", None)
    if hook is not None:
        return hook()
    if type(module) is nn.SyncBatchNorm:  # no rank-specific class to go back to
        return rebuild_as(BatchNorm, module)
    return module


def convert_sync_batchnorm(module: nn.Module, process_group: Any | None = None) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` (recursively) by a synchronized one.

    ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``, this package's ``BatchNorm*`` and
    any ``_BatchNorm`` subclass that keeps the plain forward become :class:`SyncBatchNorm`;
    ``BatchNormAct*`` become :class:`SyncBatchNormAct` (the activation is kept); modules with a
    ``to_sync_batchnorm(process_group)`` method convert themselves. The new layers share the old
    ones' parameters and buffers, keep eps, momentum, affine, track_running_stats, backend,
    training flag, device and dtype, and remember their class for :func:`revert_sync_batchnorm`.

    Args:
        module: a model or a single layer.
        process_group: the group to synchronize over (None: the whole world).

    Returns:
        ``module`` with its layers replaced, or the new layer if ``module`` itself is one.

    Raises:
        TypeError: a ``_BatchNorm`` subclass overrides ``forward`` without offering
            ``to_sync_batchnorm`` (converting it would silently drop its behaviour).
    """
    out = _to_sync(module, process_group)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm`: every :class:`SyncBatchNorm` (recursively) goes back
    to the class it was converted from (for one built directly: :class:`BatchNorm`, or
    :class:`BatchNormAct` for :class:`SyncBatchNormAct`; ``torch.nn.SyncBatchNorm`` becomes our
    any-rank :class:`BatchNorm`), sharing its parameters and buffers."""
    out = _to_local(module)
    for name, child in module.named_children():
        out.add_module(name, revert_sync_batchnorm(child))
    return out
