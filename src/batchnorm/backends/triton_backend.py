"""The ``"triton"`` backend: fused Triton kernels for CUDA GPUs (kernels: :mod:`.triton_kernels`).

Two paths, chosen per call by a cached plan:

* **on chip**: when a block of channels' whole slice (``N * prod(spatial)`` values each) fits
  in registers, one launch computes the statistics, the running update and ``y`` (or the
  backward's reductions and ``dx``), reading x (and dy) once: 2b forward, 3b backward.
* **split**: the reduction over ``N * spatial`` is split into parts so that every SM gets work
  even when C is small (ResNet's C = 64 on a 132-SM H100); each part writes
  ``(count, mean, M2)`` to a workspace, a tiny kernel merges them (Chan's formula) and writes
  ``mean``, ``invstd`` and the new running stats, and an elementwise kernel normalizes: 3b
  forward, 5b backward, 2b eval.

Layouts: channels-first input is viewed as ``(N, C, S)``, channels-last (any rank) and
``(N, C)`` input as rows ``(N * S, C)``; other strides are copied once to contiguous. Inputs
of 2^31 elements or more use 64-bit index arithmetic.

Dtypes: float16, bfloat16 and float32 accumulate in float32; float64 is supported too and
accumulates in float64 (fast on data-centre GPUs, slow on consumer ones). Saved mean/invstd are
float32 (float64 for float64 input); running buffers keep their own dtype.

BatchNorm + activation + residual (``forward_act``/``backward_act``, issue 5): the same
launches with the activation (identity, relu, leaky_relu, elu, silu, gelu), the residual add
and, in the backward, ``dz = dy * act'(z)`` fused into them; ``dresidual = dz`` is written by
the launch that writes ``dx``. Forward: on chip one launch, split 2 + 1 (x and r read by the
elementwise pass: 4b), eval one; backward: on chip one, split 2 + 1 (dy, x and r read by both
passes, dx and dr written: 8b). In-place mode writes y over x (through one copy only when x is
strided) and recomputes ``xhat = (act^-1(y) - r - b) / w`` from y in the backward. Activation
names the kernels do not know and residual dtypes they cannot load go to the composite default.

Running statistics: kernels never write into their inputs (the in-place mode's x aside, which
is therefore never autotuned). The update reads the old buffers and writes new tensors
(returned to the op layer, which copies them into the module's buffers), so re-running any
kernel, as a benchmark or the optional autotuner does, cannot apply the update twice.

Devices: CUDA tensors; CPU tensors too when ``TRITON_INTERPRET=1`` (the Triton interpreter runs
the same kernels with NumPy: slow, for tests without a GPU). ``"auto"`` picks this backend for
every supported CUDA input.

Tuning: :class:`TritonTuning` holds the heuristics' knobs; :func:`tuning` overrides them for a
block (tests use it to force either path on small shapes). ``BATCHNORM_TRITON_AUTOTUNE=1``
makes the first call of each shape time a few candidate plans and keep the fastest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton  # noqa: F401  (an ImportError here marks the backend unavailable)
import triton.language as tl
from torch import Tensor

from .base import (
    Backend,
    ForwardResult,
    acc_dtype,
    as_kernel_layout,
    empty_out_like,
    layout_of,
    match_layout,
    safe_invstd,
)

__all__ = [
    "OnChipPlan",
    "SplitPlan",
    "TritonBackend",
    "TritonTuning",
    "View",
    "get_tuning",
    "kernel_view",
    "needs_int64",
    "plan_onchip",
    "plan_split",
    "recording",
    "tuning",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Finalize kernels: [16 parts, up to 128 channels] per step (no spills even in float64).
_FINALIZE_BLOCK_P = 16
_INT32_LIMIT = 2**31


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---- tuning knobs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TritonTuning:
    """Knobs of the launch heuristics (see :func:`plan_split`, :func:`plan_onchip`).

    Attributes:
        path: ``"auto"`` (heuristic), ``"split"`` or ``"onchip"`` (forced where possible).
        tile_bytes: bytes of x per ``[BLOCK_C, BLOCK_S]`` tile of the split kernels.
        min_tile_bytes: smallest tile when a small tensor has too few tiles to fill the GPU.
        max_tile_elems: most elements per split tile (half that with 64-bit indices).
        row_bytes: contiguous bytes per channel-block row in channels-last tiles.
        min_run_bytes: shortest contiguous run along s (channels-first) or c (channels-last)
            a tile may use; shorter runs waste memory transactions.
        onchip_fwd_elems, onchip_bwd_elems: most elements of one tensor a program holds in
            registers on the on-chip path (the backward holds x and dy).
        onchip_min_row_bytes: contiguous bytes of channels per row a channels-last on-chip
            tile keeps at least.
        onchip_small_bytes: below this size the on-chip path is taken even when it leaves SMs
            idle (one launch beats three there).
        reduce_programs_per_sm, elementwise_programs_per_sm: split-grid sizes.
        force_int64: use 64-bit indices whatever the size (tests the large-tensor path).
        poison_outputs: fill every output with NaN before the kernels run (tests: an element
            a kernel fails to write shows up).
        autotune: time candidate plans on the first call of each shape, keep the fastest.
        sm_count: override the device's multiprocessor count (None: ask the device).
    """

    path: str = "auto"
    tile_bytes: int = 16384
    min_tile_bytes: int = 2048
    max_tile_elems: int = 4096
    row_bytes: int = 256
    min_run_bytes: int = 256
    onchip_fwd_elems: int = 16384
    onchip_bwd_elems: int = 8192
    onchip_min_row_bytes: int = 16
    onchip_small_bytes: int = 4 << 20
    reduce_programs_per_sm: int = 4
    elementwise_programs_per_sm: int = 8
    force_int64: bool = False
    poison_outputs: bool = False
    autotune: bool = False
    sm_count: int | None = None


_TUNING = TritonTuning(autotune=os.environ.get("BATCHNORM_TRITON_AUTOTUNE", "0") == "1")


def get_tuning() -> TritonTuning:
    """The knobs in effect."""
    return _TUNING


@contextlib.contextmanager
def tuning(**overrides: Any) -> Iterator[TritonTuning]:
    """Override some :class:`TritonTuning` knobs inside a ``with`` block (not thread-safe)."""
    global _TUNING
    old = _TUNING
    _TUNING = dataclasses.replace(old, **overrides)
    if _TUNING.path not in ("auto", "split", "onchip"):
        _TUNING = old
        raise ValueError(f"path must be 'auto', 'split' or 'onchip', got {overrides['path']!r}")
    try:
        yield _TUNING
    finally:
        _TUNING = old


# ---- views and plans --------------------------------------------------------------------------
@dataclass(frozen=True)
class View:
    """x as ``(nv, c, sv)`` with element strides; ``rows`` for the channels-last view."""

    nv: int
    c: int
    sv: int
    stride_n: int
    stride_c: int
    stride_s: int
    rows: bool
    int64: bool

    @property
    def count(self) -> int:
        """Values per channel."""
        return self.nv * self.sv


def needs_int64(numel: int) -> bool:
    """Do element offsets of a tensor with ``numel`` elements overflow int32?"""
    return numel >= _INT32_LIMIT


def kernel_view(x: Tensor, force_int64: bool = False) -> View:
    """The kernels' view of ``x`` (channels-first or channels-last contiguous, see
    :func:`~batchnorm.backends.base.as_kernel_layout`)."""
    n, c = x.shape[0], x.shape[1]
    s = 1
    for d in x.shape[2:]:
        s *= d
    int64 = force_int64 or needs_int64(x.numel())
    if s == 1 or layout_of(x) == "cl":
        return View(1, c, n * s, 0, 1, c, True, int64)
    return View(n, c, s, c * s, s, 1, False, int64)


def _pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (v - 1).bit_length()


def _pow2_floor(v: int) -> int:
    return 1 if v <= 1 else 1 << (v.bit_length() - 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class SplitPlan:
    """Tiles and grid of the split kernels (reductions and elementwise share the tile)."""

    block_c: int
    block_s: int
    sb: int  # s-blocks per n
    n_items: int  # nv * sb
    cblocks: int
    reduce_parts: int
    reduce_ipp: int  # items per program
    ew_parts: int
    ew_ipp: int
    num_warps: int


@dataclass(frozen=True)
class OnChipPlan:
    """Tile of the on-chip kernels: ``[block_c, block_n * block_s]`` per program."""

    block_c: int
    block_n: int
    block_s: int
    cblocks: int
    num_warps: int


def _parts(n_items: int, cblocks: int, target: int) -> tuple[int, int]:
    parts = min(n_items, max(1, _cdiv(target, cblocks)))
    ipp = _cdiv(n_items, parts)
    return _cdiv(n_items, ipp), ipp


def _block_s_cf(sv: int, lo: int, hi: int) -> int:
    """Power-of-two s-block in ``[lo, hi]`` that pads ``sv`` least (larger on ties)."""
    best, best_pad = hi, None
    b = hi
    while b >= lo:
        pad = _cdiv(sv, b) * b
        if best_pad is None or pad < best_pad:
            best, best_pad = b, pad
        b //= 2
    return best


@functools.lru_cache(maxsize=4096)
def plan_split(view: View, elt: int, sm_count: int, knobs: TritonTuning) -> SplitPlan:
    """Tiles of about ``tile_bytes`` (down to ``min_tile_bytes`` for small tensors); the
    reduction grid has about ``reduce_programs_per_sm * sm_count`` programs (parts of the
    N*S range times channel blocks), so a small C still fills the GPU."""
    # Registers scale with elements (and double with 64-bit offsets), not bytes.
    max_elems = knobs.max_tile_elems // (2 if view.int64 else 1)
    tile = max(16, _pow2_floor(min(knobs.tile_bytes // elt, max_elems)))
    if view.rows:
        block_c = min(_pow2(view.c), max(1, _pow2_floor(knobs.row_bytes // elt)), tile)
        block_s = max(1, min(_pow2(view.sv), tile // block_c))
    else:
        top = min(_pow2(view.sv), tile)
        lo = min(top, max(1, _pow2_floor(knobs.min_run_bytes // elt)))
        block_s = _block_s_cf(view.sv, lo, top)
        block_c = max(1, min(_pow2(view.c), tile // block_s))
    # Small tensors: smaller tiles until the reduction grid fills the GPU.
    target = knobs.reduce_programs_per_sm * sm_count
    min_tile = max(1, knobs.min_tile_bytes // elt)
    while block_c * block_s > min_tile and view.nv * _cdiv(view.sv, block_s) * _cdiv(
            view.c, block_c) < target:
        if not view.rows and block_c > 1:
            block_c //= 2
        elif block_s > 1:
            block_s //= 2
        else:
            break
    sb = _cdiv(view.sv, block_s)
    n_items = view.nv * sb
    cblocks = _cdiv(view.c, block_c)
    rp, ripp = _parts(n_items, cblocks, knobs.reduce_programs_per_sm * sm_count)
    ep, eipp = _parts(n_items, cblocks, knobs.elementwise_programs_per_sm * sm_count)
    num_warps = min(8, max(2, block_c * block_s * elt // 2048))
    return SplitPlan(block_c, block_s, sb, n_items, cblocks, rp, ripp, ep, eipp, num_warps)


@functools.lru_cache(maxsize=4096)
def plan_onchip(
    view: View, elt: int, numel: int, sm_count: int, budget: int, knobs: TritonTuning
) -> OnChipPlan | None:
    """A channel block whose whole slice fits ``budget`` elements, or None.

    Channels-last rows keep ``onchip_min_row_bytes`` contiguous bytes per row. The channel
    block shrinks (down to that) until there are two programs per SM. With ``path="auto"``
    the plan is used only when it gives at least half a program per SM, or the tensor is under
    ``onchip_small_bytes`` (one launch instead of three matters more there than idle SMs).
    """
    if knobs.path == "split":
        return None
    block_n = 1 if view.rows else _pow2(view.nv)
    block_s = _pow2(view.sv)
    slice_elems = block_n * block_s
    if slice_elems > budget:
        return None
    block_c = min(_pow2_floor(budget // slice_elems), _pow2(view.c))
    min_c = min(_pow2(view.c), max(1, knobs.onchip_min_row_bytes // elt)) if view.rows else 1
    if block_c < min_c:
        return None
    # Smaller channel blocks for more programs, as long as rows stay wide enough.
    while block_c > min_c and _cdiv(view.c, block_c) < 2 * sm_count:
        block_c //= 2
    cblocks = _cdiv(view.c, block_c)
    if (knobs.path == "auto" and cblocks < sm_count // 2
            and numel * elt > knobs.onchip_small_bytes):
        return None
    num_warps = min(16, max(4, block_c * slice_elems // 1024))
    return OnChipPlan(block_c, block_n, block_s, cblocks, num_warps)


# ---- host helpers -----------------------------------------------------------------------------
_kernels: Any = None


def _k() -> Any:
    """The kernel module, imported on first use (Triton reads ``TRITON_INTERPRET`` when the
    kernels are decorated, so this must happen after the test harness has set it)."""
    global _kernels
    if _kernels is None:
        from . import triton_kernels

        _kernels = triton_kernels
    return _kernels


def _hi_lo(v: float) -> tuple[float, float]:
    """``v`` as two float32 values whose sum restores it to ~48 bits."""
    hi = float(np.float32(v))
    return hi, float(np.float32(v - hi))


def _tl_acc(x: Tensor) -> Any:
    return tl.float64 if x.dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=16)
def _device_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _sm_count(x: Tensor) -> int:
    if _TUNING.sm_count is not None:
        return _TUNING.sm_count
    if x.device.type == "cuda":
        return _device_sm_count(x.device.index if x.device.index is not None else 0)
    return 4  # interpreter: a few programs keep the NumPy emulation quick


def _device_guard(x: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current device: switch to x's device when it differs."""
    if x.device.type == "cuda" and x.device.index not in (None, torch.cuda.current_device()):
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _vec(t: Tensor | None, dummy: Tensor) -> Tensor:
    """A per-channel vector as a kernel argument (contiguous), or a placeholder pointer."""
    return dummy if t is None else t.contiguous()


class _Call:
    """Everything one call needs about its input: kernel layout, view, dtypes, plans.

    Fused calls that hold more tiles than plain BatchNorm get smaller ones, so that their
    kernels stay clear of register spills (checked with ``--compile-report --act``):
    ``fused_bwd`` (dy, x, the residual, dz and u where plain BatchNorm holds dy and x) halves
    the split tiles' element cap and gives them a warp per 512 values (plain plans size warps
    by bytes, which leaves half-precision tiles 32 values per thread and tensor);
    ``fused_fwd_res`` (x and r) halves the on-chip forward budget.
    The on-chip backward budget stays: halving it would move shapes to the split path (8b
    instead of 5b) to save a few bytes of spills in float64 and 64-bit-index variants only."""

    def __init__(self, x: Tensor, fused_bwd: bool = False, fused_fwd_res: bool = False) -> None:
        knobs = _TUNING
        self.fused_bwd = fused_bwd
        if fused_bwd:
            knobs = dataclasses.replace(knobs, max_tile_elems=max(16, knobs.max_tile_elems // 2))
        if fused_fwd_res:
            knobs = dataclasses.replace(knobs, onchip_fwd_elems=knobs.onchip_fwd_elems // 2)
        self.knobs = knobs
        self.x = as_kernel_layout(x)
        self.view = kernel_view(self.x, knobs.force_int64)
        self.elt = x.element_size()
        self.acc = acc_dtype(x)
        self.tl_acc = _tl_acc(x)
        self.sm = _sm_count(x)
        self.numel = x.numel()

    def split(self) -> SplitPlan:
        plan = plan_split(self.view, self.elt, self.sm, self.knobs)
        if self.fused_bwd:
            warps = min(8, max(plan.num_warps, plan.block_c * plan.block_s // 512))
            plan = dataclasses.replace(plan, num_warps=warps)
        return plan

    def onchip(self, budget: int) -> OnChipPlan | None:
        if self.knobs.path == "split":
            return None
        # float64 accumulators and 64-bit offsets take two registers per element.
        budget //= (2 if self.acc == torch.float64 else 1) * (2 if self.view.int64 else 1)
        return plan_onchip(self.view, self.elt, self.numel, self.sm, budget, self.knobs)

    def _poisoned(self, t: Tensor) -> Tensor:
        return t.fill_(float("nan")) if self.knobs.poison_outputs else t

    def vec(self, dtype: torch.dtype | None = None) -> Tensor:
        """A fresh per-channel output (accumulation dtype unless given)."""
        c = self.view.c
        return self._poisoned(torch.empty(c, dtype=dtype or self.acc, device=self.x.device))

    def out(self, dtype: torch.dtype | None = None) -> Tensor:
        """A fresh output like x (layout of :func:`empty_out_like`; x's dtype unless given)."""
        return self._poisoned(empty_out_like(self.x, dtype))


# ---- BatchNorm + activation (+ residual): what the fused kernels add ---------------------------
@dataclass(frozen=True)
class _Act:
    """The activation part of a fused call: kernel code, slope, residual (already in the
    kernels' layout) and whether the backward's saved tensor is the output (in-place mode)."""

    code: int
    slope: float
    residual: Tensor | None
    inplace: bool = False


def _act_kwargs(act: _Act | None, dummy: Tensor) -> dict[str, Any]:
    """Kernel arguments of the activation flags; ``None`` gives plain BatchNorm."""
    if act is None:
        return dict(r_ptr=dummy, slope_hi=0.0, slope_lo=0.0, ACT=0, HAS_RES=False)
    slope_hi, slope_lo = _hi_lo(act.slope)
    return dict(r_ptr=dummy if act.residual is None else act.residual, slope_hi=slope_hi,
                slope_lo=slope_lo, ACT=act.code, HAS_RES=act.residual is not None)


# ---- launchers ----------------------------------------------------------------------------------
_RECORDER: list[tuple[str, int, int, dict[str, Any]]] | None = None


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, int, int, dict[str, Any]]]]:
    """Record launches as ``(kernel name, grid, num_warps, arguments by name)`` instead of
    running them; with ``meta`` tensors this lists what a call would launch, at any size and
    without a GPU (the benchmark's ahead-of-time compile report uses it)."""
    global _RECORDER
    old, _RECORDER = _RECORDER, []
    try:
        yield _RECORDER
    finally:
        _RECORDER = old


def _launch(name: str, grid: int, num_warps: int, **kwargs: Any) -> None:
    if _RECORDER is not None:
        _RECORDER.append((name, grid, num_warps, kwargs))
        return
    getattr(_k(), name)[(grid,)](**kwargs, num_warps=num_warps)


def _split_args(call: _Call, plan: SplitPlan, elementwise: bool) -> dict[str, Any]:
    v = call.view
    return dict(
        C=v.c, SV=v.sv, SB=plan.sb, n_items=plan.n_items,
        items_per_prog=plan.ew_ipp if elementwise else plan.reduce_ipp,
        num_parts=plan.ew_parts if elementwise else plan.reduce_parts,
        stride_n=v.stride_n, stride_c=v.stride_c, stride_s=v.stride_s,
        BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, ACC=call.tl_acc, INT64=v.int64,
    )


def _onchip_args(call: _Call, plan: OnChipPlan) -> dict[str, Any]:
    v = call.view
    return dict(
        C=v.c, NV=v.nv, SV=v.sv, count=v.count,
        stride_n=v.stride_n, stride_c=v.stride_c, stride_s=v.stride_s,
        BLOCK_C=plan.block_c, BLOCK_N=plan.block_n, BLOCK_S=plan.block_s, ACC=call.tl_acc,
        INT64=v.int64,
    )


def _launch_stats_split(
    call: _Call,
    plan: SplitPlan,
    mean: Tensor,
    invstd: Tensor | None,
    m2: Tensor | None,
    running: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    momentum: float,
    eps: float,
) -> None:
    c = call.view.c
    parts = plan.reduce_parts
    pc = parts * c
    ws = call._poisoned(torch.empty(3 * pc + parts, dtype=call.acc, device=call.x.device))
    pshift, pmean, pm2, pcnt = ws[:pc], ws[pc: 2 * pc], ws[2 * pc: 3 * pc], ws[3 * pc:]
    _launch(
        "stats_partial_kernel", parts * plan.cblocks, plan.num_warps,
        x_ptr=call.x, pshift_ptr=pshift, pmean_ptr=pmean, pm2_ptr=pm2, pcnt_ptr=pcnt,
        **_split_args(call, plan, elementwise=False),
    )
    rm, rv, rm_out, rv_out = running if running is not None else (mean,) * 4
    eps_hi, eps_lo = _hi_lo(eps)
    mom_hi, mom_lo = _hi_lo(momentum)
    block_c = min(128, _pow2(c))
    _launch(
        "stats_finalize_kernel", _cdiv(c, block_c), 4,
        pshift_ptr=pshift, pmean_ptr=pmean, pm2_ptr=pm2, pcnt_ptr=pcnt, num_parts=parts, C=c,
        count=call.view.count, mean_ptr=mean,
        invstd_ptr=mean if invstd is None else invstd, m2_ptr=mean if m2 is None else m2,
        rm_ptr=rm, rv_ptr=rv, rm_out_ptr=rm_out, rv_out_ptr=rv_out,
        eps_hi=eps_hi, eps_lo=eps_lo, mom_hi=mom_hi, mom_lo=mom_lo,
        WRITE_INVSTD=invstd is not None, WRITE_M2=m2 is not None,
        HAS_RUNNING=running is not None, BLOCK_P=_FINALIZE_BLOCK_P, BLOCK_C=block_c,
        ACC=call.tl_acc,
    )


def _launch_fwd_onchip(
    call: _Call,
    plan: OnChipPlan,
    y: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor | None,
    m2: Tensor | None,
    running: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    momentum: float,
    eps: float,
    act: _Act | None = None,
) -> None:
    rm, rv, rm_out, rv_out = running if running is not None else (mean,) * 4
    eps_hi, eps_lo = _hi_lo(eps)
    mom_hi, mom_lo = _hi_lo(momentum)
    _launch(
        "fwd_onchip_kernel", plan.cblocks, plan.num_warps, **_act_kwargs(act, call.x),
        x_ptr=call.x, y_ptr=call.x if y is None else y,
        w_ptr=_vec(weight, mean), b_ptr=_vec(bias, mean), rm_ptr=rm, rv_ptr=rv,
        mean_ptr=mean, invstd_ptr=mean if invstd is None else invstd,
        m2_ptr=mean if m2 is None else m2, rm_out_ptr=rm_out, rv_out_ptr=rv_out,
        eps_hi=eps_hi, eps_lo=eps_lo, mom_hi=mom_hi, mom_lo=mom_lo,
        WRITE_Y=y is not None, WRITE_INVSTD=invstd is not None, WRITE_M2=m2 is not None,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_RUNNING=running is not None,
        **_onchip_args(call, plan),
    )


def _launch_apply(
    call: _Call,
    plan: SplitPlan,
    y: Tensor,
    mean: Tensor,
    stat: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stat_is_var: bool,
    eps: float,
    act: _Act | None = None,
) -> None:
    eps_hi, eps_lo = _hi_lo(eps)
    _launch(
        "apply_kernel", plan.ew_parts * plan.cblocks, plan.num_warps, **_act_kwargs(act, call.x),
        x_ptr=call.x, y_ptr=y, mean_ptr=mean, stat_ptr=stat,
        w_ptr=_vec(weight, mean), b_ptr=_vec(bias, mean), eps_hi=eps_hi, eps_lo=eps_lo,
        STAT_IS_VAR=stat_is_var, HAS_W=weight is not None, HAS_B=bias is not None,
        **_split_args(call, plan, elementwise=True),
    )


def _bwd_kwargs(call: _Call, act: _Act | None, mean: Tensor, weight: Tensor | None,
                bias: Tensor | None) -> dict[str, Any]:
    """Arguments every backward kernel shares: activation flags, weight and bias (read only
    where the fused modes recompute z or x-hat, or dx needs the weight)."""
    return dict(**_act_kwargs(act, call.x), INPLACE=act is not None and act.inplace,
                w_ptr=_vec(weight, mean), b_ptr=_vec(bias, mean), HAS_W=weight is not None,
                HAS_B=bias is not None)


def _launch_bwd_reduce_split(
    call: _Call, plan: SplitPlan, dy: Tensor, mean: Tensor, invstd: Tensor,
    sum_dy: Tensor, sum_dot: Tensor, dw: Tensor | None, act: _Act | None = None,
    weight: Tensor | None = None, bias: Tensor | None = None,
) -> None:
    c = call.view.c
    parts = plan.reduce_parts
    ws = call._poisoned(torch.empty(2 * parts * c, dtype=call.acc, device=call.x.device))
    psum, pdot = ws[: parts * c], ws[parts * c:]
    _launch(
        "bwd_partial_kernel", parts * plan.cblocks, plan.num_warps,
        dy_ptr=dy, x_ptr=call.x, mean_ptr=mean, invstd_ptr=invstd, psum_ptr=psum, pdot_ptr=pdot,
        **_bwd_kwargs(call, act, mean, weight, bias),
        **_split_args(call, plan, elementwise=False),
    )
    block_c = min(128, _pow2(c))
    _launch(
        "bwd_finalize_kernel", _cdiv(c, block_c), 4,
        psum_ptr=psum, pdot_ptr=pdot, num_parts=parts, C=c, invstd_ptr=invstd,
        sum_dy_ptr=sum_dy, sum_dot_ptr=sum_dot, dw_ptr=sum_dy if dw is None else dw,
        WRITE_DW=dw is not None, INPLACE=act is not None and act.inplace,
        BLOCK_P=_FINALIZE_BLOCK_P, BLOCK_C=block_c, ACC=call.tl_acc,
    )


def _launch_dx(
    call: _Call, plan: SplitPlan, dy: Tensor, dx: Tensor | None, mean: Tensor, invstd: Tensor,
    weight: Tensor | None, sum_dy: Tensor | None, sum_dot: Tensor | None, count: int,
    training: bool, act: _Act | None = None, bias: Tensor | None = None,
    dres: Tensor | None = None,
) -> None:
    _launch(
        "bwd_dx_kernel", plan.ew_parts * plan.cblocks, plan.num_warps,
        dy_ptr=dy, x_ptr=call.x, dx_ptr=dy if dx is None else dx,
        dres_ptr=dy if dres is None else dres, mean_ptr=mean, invstd_ptr=invstd,
        sum_dy_ptr=invstd if sum_dy is None else sum_dy,
        sum_dot_ptr=invstd if sum_dot is None else sum_dot, count=count,
        TRAINING=training, WRITE_DX=dx is not None, WRITE_DRES=dres is not None,
        **_bwd_kwargs(call, act, mean, weight, bias),
        **_split_args(call, plan, elementwise=True),
    )


def _launch_bwd_onchip(
    call: _Call, plan: OnChipPlan, dy: Tensor, dx: Tensor | None, mean: Tensor, invstd: Tensor,
    weight: Tensor | None, sum_dy: Tensor, sum_dot: Tensor, dw: Tensor | None, training: bool,
    act: _Act | None = None, bias: Tensor | None = None, dres: Tensor | None = None,
) -> None:
    _launch(
        "bwd_onchip_kernel", plan.cblocks, plan.num_warps,
        dy_ptr=dy, x_ptr=call.x, dx_ptr=dy if dx is None else dx,
        dres_ptr=dy if dres is None else dres, mean_ptr=mean, invstd_ptr=invstd,
        sum_dy_ptr=sum_dy, sum_dot_ptr=sum_dot, dw_ptr=sum_dy if dw is None else dw,
        TRAINING=training, WRITE_DX=dx is not None, WRITE_DW=dw is not None,
        WRITE_DRES=dres is not None, **_bwd_kwargs(call, act, mean, weight, bias),
        **_onchip_args(call, plan),
    )


# ---- autotuning (optional) ----------------------------------------------------------------------
_AUTOTUNE_CANDIDATES: tuple[dict[str, Any], ...] = (
    {},
    {"path": "split"},
    {"path": "split", "tile_bytes": 8192},
    {"path": "split", "tile_bytes": 32768},
    {"path": "split", "reduce_programs_per_sm": 2, "elementwise_programs_per_sm": 4},
    {"path": "split", "reduce_programs_per_sm": 8, "elementwise_programs_per_sm": 16},
)
_autotuned: dict[tuple, TritonTuning] = {}


def _timed(fn: Callable[[], Any], x: Tensor, reps: int = 5) -> float:
    """Median seconds of ``fn()`` (device events on CUDA, the host clock otherwise)."""
    times = []
    for _ in range(reps):
        if x.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _autotuned_knobs(kind: str, x: Tensor, run: Callable[[], Any], reps: int = 5) -> TritonTuning:
    """Knobs for ``kind`` on ``x``'s shape: the fastest of the candidates, timed once with
    ``run`` (a pure function of the inputs: kernels write only fresh outputs, so the running
    buffers are not touched however often it runs) and cached."""
    global _TUNING
    base = _TUNING
    call_key = (kind, tuple(x.shape), layout_of(x), x.dtype, x.device,
                dataclasses.replace(base, autotune=False))
    hit = _autotuned.get(call_key)
    if hit is not None:
        return hit
    best, best_t = base, float("inf")
    seen: set[TritonTuning] = set()
    for cand in _AUTOTUNE_CANDIDATES:
        knobs = dataclasses.replace(base, autotune=False, **cand)
        if knobs in seen:
            continue
        seen.add(knobs)
        _TUNING = knobs
        try:
            run()  # compile and warm up
            t = _timed(run, x, reps)
        finally:
            _TUNING = base
        if t < best_t:
            best, best_t = knobs, t
    _autotuned[call_key] = best
    return best


@contextlib.contextmanager
def _maybe_autotuned(kind: str, x: Tensor, run: Callable[[], Any]) -> Iterator[None]:
    global _TUNING
    if not _TUNING.autotune:
        yield
        return
    knobs = _autotuned_knobs(kind, x, run)
    old = _TUNING
    _TUNING = knobs
    try:
        yield
    finally:
        _TUNING = old


# ---- the backend ---------------------------------------------------------------------------------
class TritonBackend(Backend):
    """Fused Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1``); see the module docstring.

    Supports float16, bfloat16, float32 and float64 inputs of any rank >= 2 in any layout
    (channels-first and channels-last run in place, other strides are copied once).
    """

    name = "triton"
    device_types = ("cuda", "cpu")

    def is_available(self) -> tuple[bool, str]:
        if torch.cuda.is_available() or _interpret():
            return True, ""
        return False, (
            "no CUDA device (set TRITON_INTERPRET=1 before importing batchnorm to run the "
            "kernels on CPU tensors under the Triton interpreter)"
        )

    def supports(self, x: Tensor) -> str | None:
        if x.device.type == "cpu":
            if not _interpret():
                return (
                    "backend 'triton' runs on CUDA tensors (CPU tensors only under the Triton "
                    "interpreter, TRITON_INTERPRET=1)"
                )
        elif x.device.type != "cuda":
            return f"backend 'triton' runs on CUDA tensors, got a {x.device.type} tensor"
        if x.dtype not in _SUPPORTED_DTYPES:
            return (
                f"backend 'triton' supports float16, bfloat16, float32 and float64 inputs, "
                f"got {x.dtype}"
            )
        if x.dim() < 2:
            return f"backend 'triton' expects input of shape (N, C, *), got {x.dim()}D"
        return None

    def preferred_for(self, x: Tensor, training: bool) -> bool:
        # On CUDA every supported case goes here; on CPU the interpreter is for tests only.
        return x.device.type == "cuda"

    # ---- fused entry points ---------------------------------------------------------------------
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
        run = lambda: self._forward_train(x, weight, bias, running_mean, running_var,
                                          momentum, eps)
        with _maybe_autotuned("fwd", x, run):
            return run()

    def _forward_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
    ) -> ForwardResult:
        call = _Call(x)
        y = call.out()
        mean, invstd = call.vec(), call.vec()
        running = None
        new_rm = new_rv = None
        if running_mean is not None and running_var is not None:
            new_rm, new_rv = call.vec(running_mean.dtype), call.vec(running_var.dtype)
            running = (running_mean.contiguous(), running_var.contiguous(), new_rm, new_rv)
        with _device_guard(x):
            plan = call.onchip(call.knobs.onchip_fwd_elems)
            if plan is not None:
                _launch_fwd_onchip(call, plan, y, weight, bias, mean, invstd, None, running,
                                   momentum, eps)
            else:
                split = call.split()
                _launch_stats_split(call, split, mean, invstd, None, running, momentum, eps)
                _launch_apply(call, split, y, mean, invstd, weight, bias, False, eps)
        return y, mean, invstd, new_rm, new_rv

    def forward_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
    ) -> Tensor:
        call = _Call(x)
        y = call.out()
        with _device_guard(x):
            _launch_apply(call, call.split(), y, running_mean.contiguous(),
                          running_var.contiguous(), weight, bias, True, eps)
        return y

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
        run = lambda: self._backward(dy, x, weight, mean, invstd, training, output_mask)
        with _maybe_autotuned("bwd", x, run):
            return run()

    def _backward(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        training: bool,
        output_mask: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        want_dx, want_dw, want_db = output_mask
        call = _Call(x)
        dy = match_layout(dy, call.x)
        mean, invstd = mean.contiguous(), invstd.contiguous()
        dx = call.out() if want_dx else None
        with _device_guard(x):
            if not (want_dw or want_db or (want_dx and training)):
                if dx is not None:  # eval, dx only: dy * weight * invstd, x not read
                    _launch_dx(call, call.split(), dy, dx, mean, invstd, weight, None, None,
                               call.view.count, False)
                return dx, None, None
            sum_dy, sum_dot = call.vec(), call.vec()
            dw = call.vec() if want_dw else None
            plan = call.onchip(call.knobs.onchip_bwd_elems)
            if plan is not None:
                _launch_bwd_onchip(call, plan, dy, dx, mean, invstd, weight, sum_dy, sum_dot,
                                   dw, training)
            else:
                split = call.split()
                _launch_bwd_reduce_split(call, split, dy, mean, invstd, sum_dy, sum_dot, dw)
                if dx is not None:
                    _launch_dx(call, split, dy, dx, mean, invstd, weight, sum_dy, sum_dot,
                               call.view.count, training)
        return dx, dw, sum_dy if want_db else None

    # ---- BatchNorm + activation (+ residual) --------------------------------------------------
    def _act_unsupported(self, activation: str, residual: Tensor | None) -> bool:
        """Cases the fused kernels leave to the composite default: an activation they do not
        know (the default raises the proper error) or a residual dtype they cannot load."""
        return activation not in _k().ACTIVATION_CODES or (
            residual is not None and residual.dtype not in _SUPPORTED_DTYPES)

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
        """``out = act(BN(x) + residual)`` in the passes of plain BatchNorm: on chip one launch;
        split the statistics pass(es), then one elementwise pass writing ``act(z)``; eval one
        elementwise pass. ``out`` may be ``x`` (in-place mode): written in place when its
        layout is the kernels' (else through one copy). In-place calls are not autotuned
        (timing candidates would overwrite x repeatedly)."""
        if self._act_unsupported(activation, residual):
            return super().forward_act(x, weight, bias, running_mean, running_var, residual,
                                       training, momentum, eps, activation, slope, out)
        run = lambda: self._forward_act(x, weight, bias, running_mean, running_var, residual,
                                        training, momentum, eps, activation, slope, out)
        if out is x:
            return run()
        with _maybe_autotuned("fwd_act" if training else "eval_act", x, run):
            return run()

    def _forward_act(
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
        call = _Call(x, fused_fwd_res=residual is not None)
        # The kernels write with x's kernel-layout offsets: straight into ``out`` when it has
        # that layout (always, except an in-place call on a strided x, which call.x copied).
        direct = layout_of(out) == layout_of(call.x)
        y = out if direct else call.out()
        r = None if residual is None else match_layout(residual, call.x)
        act = _Act(_k().ACTIVATION_CODES[activation], slope, r)
        new_rm = new_rv = None
        with _device_guard(x):
            if training:
                mean, invstd = call.vec(), call.vec()
                running = None
                if running_mean is not None and running_var is not None:
                    new_rm, new_rv = call.vec(running_mean.dtype), call.vec(running_var.dtype)
                    running = (running_mean.contiguous(), running_var.contiguous(), new_rm,
                               new_rv)
                plan = call.onchip(call.knobs.onchip_fwd_elems)
                if plan is not None:
                    _launch_fwd_onchip(call, plan, y, weight, bias, mean, invstd, None, running,
                                       momentum, eps, act)
                else:
                    split = call.split()
                    _launch_stats_split(call, split, mean, invstd, None, running, momentum, eps)
                    _launch_apply(call, split, y, mean, invstd, weight, bias, False, eps, act)
            else:
                assert running_mean is not None and running_var is not None
                # The saved statistics are the running ones (C-length, shared helper).
                mean = running_mean.to(call.acc)
                invstd = safe_invstd(running_var.to(call.acc), eps)
                _launch_apply(call, call.split(), y, mean.contiguous(), invstd.contiguous(),
                              weight, bias, False, eps, act)
        if not direct:
            out.copy_(y)
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
        """``(dx, dweight, dbias, dresidual)`` in the passes of plain BatchNorm's backward, with
        ``dz = dy * act'(z)`` formed in every pass that reads dy and ``dresidual = dz`` written
        by the launch that writes ``dx``. ``saved`` is x, or y in in-place mode (x-hat is then
        recomputed from y; see :meth:`Backend.backward_act`)."""
        if self._act_unsupported(activation, residual):
            return super().backward_act(dy, saved, weight, bias, mean, invstd, residual,
                                        training, activation, slope, inplace, output_mask)
        run = lambda: self._backward_act(dy, saved, weight, bias, mean, invstd, residual,
                                         training, activation, slope, inplace, output_mask)
        with _maybe_autotuned("bwd_act", saved, run):
            return run()

    def _backward_act(
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
        want_dx, want_dw, want_db, want_dres = output_mask
        want_dres = want_dres and residual is not None
        call = _Call(saved, fused_bwd=activation != "identity" or residual is not None
                     or inplace)
        dy = match_layout(dy, call.x)
        r = None if residual is None else match_layout(residual, call.x)
        act = _Act(_k().ACTIVATION_CODES[activation], slope, r, inplace)
        mean, invstd = mean.contiguous(), invstd.contiguous()
        dx = call.out() if want_dx else None
        dres = call.out(residual.dtype) if want_dres and residual is not None else None
        dw = sum_dz = None
        with _device_guard(saved):
            if want_dw or want_db or (want_dx and training):
                sum_dz, sum_dot = call.vec(), call.vec()
                dw = call.vec() if want_dw else None
                plan = call.onchip(call.knobs.onchip_bwd_elems)
                if plan is not None:
                    _launch_bwd_onchip(call, plan, dy, dx, mean, invstd, weight, sum_dz,
                                       sum_dot, dw, training, act, bias, dres)
                else:
                    split = call.split()
                    _launch_bwd_reduce_split(call, split, dy, mean, invstd, sum_dz, sum_dot, dw,
                                             act, weight, bias)
                    if dx is not None or dres is not None:
                        _launch_dx(call, split, dy, dx, mean, invstd, weight, sum_dz, sum_dot,
                                   call.view.count, training and dx is not None, act, bias,
                                   dres)
            elif dx is not None or dres is not None:  # no reduction needed: one pass
                _launch_dx(call, call.split(), dy, dx, mean, invstd, weight, None, None,
                           call.view.count, False, act, bias, dres)
        if dres is not None and residual is not None:
            dres = match_layout(dres, residual)
        return dx, dw, sum_dz if want_db else None, dres

    # ---- primitives (SyncBatchNorm) --------------------------------------------------------------
    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        acc = acc_dtype(x)
        if x.numel() == 0:
            zeros = torch.zeros(x.shape[1], dtype=acc, device=x.device)
            return zeros, zeros.clone()
        call = _Call(x)
        mean, m2 = call.vec(), call.vec()
        with _device_guard(x):
            plan = call.onchip(call.knobs.onchip_fwd_elems)
            if plan is not None:
                _launch_fwd_onchip(call, plan, None, None, None, mean, None, m2, None, 0.0, 0.0)
            else:
                _launch_stats_split(call, call.split(), mean, None, m2, None, 0.0, 0.0)
        return mean, m2

    def apply(
        self, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
    ) -> Tensor:
        if x.numel() == 0:
            return empty_out_like(x)
        call = _Call(x)
        y = call.out()
        with _device_guard(x):
            _launch_apply(call, call.split(), y, mean.contiguous(), invstd.contiguous(), weight,
                          bias, False, 0.0)
        return y

    def backward_reduce(
        self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor
    ) -> tuple[Tensor, Tensor]:
        if x.numel() == 0:
            zeros = torch.zeros(x.shape[1], dtype=acc_dtype(x), device=x.device)
            return zeros, zeros.clone()
        call = _Call(x)
        dy = match_layout(dy, call.x)
        mean, invstd = mean.contiguous(), invstd.contiguous()
        sum_dy, sum_dot = call.vec(), call.vec()
        with _device_guard(x):
            plan = call.onchip(call.knobs.onchip_bwd_elems)
            if plan is not None:
                _launch_bwd_onchip(call, plan, dy, None, mean, invstd, None, sum_dy, sum_dot,
                                   None, True)
            else:
                _launch_bwd_reduce_split(call, call.split(), dy, mean, invstd, sum_dy, sum_dot,
                                         None)
        return sum_dy, sum_dot

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
        if x.numel() == 0:
            return empty_out_like(x)
        call = _Call(x)
        dy = match_layout(dy, call.x)
        dx = call.out()
        with _device_guard(x):
            _launch_dx(call, call.split(), dy, dx, mean.contiguous(), invstd.contiguous(),
                       weight, sum_dy.contiguous(), sum_dy_xmu.contiguous(), int(count), True)
        return dx
