"""Triton kernels of the ``"triton"`` backend (host side: :mod:`.triton_backend`).

Every kernel sees its input through one strided view, ``x[n, c, s]`` at element offset
``n * stride_n + c * stride_c + s * stride_s`` with ``n < NV``, ``c < C``, ``s < SV``:

* channels-first ``(N, C, *)`` contiguous: ``(NV, C, SV) = (N, C, S)``, strides ``(C*S, S, 1)``;
* channels-last (and ``(N, C)`` rows, or any input with one spatial position): rows
  ``(R, C)`` with ``R = N * S``, as ``(NV, C, SV) = (1, C, R)``, strides ``(0, 1, C)``.

Per channel the reduction runs over the ``NV * SV`` pairs ``(n, s)``. Tiles are
``[BLOCK_C, BLOCK_S]``: a block of channels times a block of positions along ``s`` for one
``n``. Whichever of ``stride_c``/``stride_s`` is 1 is the contiguous axis; Triton specializes
integer arguments equal to 1, so the same source gives coalesced loads for both layouts.

The work of a split pass is cut into *items* (one ``n`` and one block of ``BLOCK_S``
positions; item ``i`` is ``n = i // SB``, block ``i % SB``, ``SB = cdiv(SV, BLOCK_S)``). A
program handles one channel block and a contiguous range of ``items_per_prog`` items; the
1-D grid is ``num_parts * cdiv(C, BLOCK_C)`` programs (``pid % num_parts`` = part,
``pid // num_parts`` = channel block).

Kernels, two paths:

* split (any size): ``_stats_partial_kernel`` writes per-part ``(count, mean, M2)``
  (elementwise Welford per lane, lanes merged with Chan's formula), ``_stats_finalize_kernel``
  merges the parts and writes ``mean``, ``invstd``, ``M2`` and the new running stats,
  ``_apply_kernel`` normalizes (x read twice: 3b). Backward: ``_bwd_partial_kernel``
  (per-part ``sum(dy)``, ``sum(dy * (x - mean))``), ``_bwd_finalize_kernel``, ``_bwd_dx_kernel``
  (5b; eval backward reads only dy: 2b).
* on chip (a channel block's whole slice fits in registers): ``_fwd_onchip_kernel`` and
  ``_bwd_onchip_kernel`` do statistics/reductions and the elementwise pass from registers,
  so x (and dy) are read once (2b forward, 3b backward), one launch each.

No kernel writes into an input: the running-stat update reads the old buffers and writes new
tensors, so any kernel may be launched again (benchmark repeats, autotuning) without applying
the update twice. (The one exception is the fused in-place mode below, where the caller passes
``y_ptr == x_ptr`` on purpose.)

BatchNorm + activation + residual (``y = act(xhat * w + b + r)``) reuses the same kernels under
compile-time flags: ``ACT`` (an activation code, :data:`ACTIVATION_CODES`; 0 is identity and
gives the plain kernels), ``HAS_RES`` (a residual ``r`` in x's layout) and, in the backward,
``INPLACE`` (the saved tensor is the output y, not x). Forward: the statistics pass(es) are
unchanged and the elementwise pass (``apply_kernel``, or the tail of ``fwd_onchip_kernel``)
writes ``act(z)``, ``z = (x - mean) * invstd * w + b + r``; with ``y_ptr == x_ptr`` (in-place)
every element is loaded before it is stored by the same program, and no program loads it
again. Backward: with ``dz = dy * act'(z)`` the reductions are ``sum(dz)`` and
``sum(dz * u)``, where ``u = x - mean`` (``z`` recomputed from x) or, in-place,
``u = xhat = (act^-1(y) - r - b) / w`` (so ``dweight = sum(dz * u)`` without the ``invstd``
factor and ``dx``'s projection loses its ``invstd^2``); the elementwise pass writes ``dx`` and
``dresidual = dz`` in one launch.

Accumulation is in ``ACC`` (float32, or float64 for float64 input). Float scalars are passed as
``(hi, lo)`` float32 pairs (``hi + lo`` restores a float64 value to ~48 bits), since Triton
passes Python floats as float32. ``INT64`` makes all index arithmetic 64-bit (tensors of 2^31
elements or more); otherwise 32-bit indices are used because they are cheaper.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "ACTIVATION_CODES",
    "apply_kernel",
    "bwd_dx_kernel",
    "bwd_finalize_kernel",
    "bwd_onchip_kernel",
    "bwd_partial_kernel",
    "fwd_onchip_kernel",
    "item_tile",
    "stats_finalize_kernel",
    "stats_partial_kernel",
]


# ---- small device helpers -------------------------------------------------------------------
@triton.jit
def item_tile(it, SB, c, cmask, SV, stride_n, stride_c, stride_s,
              BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    """Offsets, mask and position mask of the ``[BLOCK_C, BLOCK_S]`` tile of item ``it``:
    channels ``c`` (``(BLOCK_C,)``), ``n = it // SB``, positions
    ``s = (it % SB) * BLOCK_S + lane``. With ``INT64`` every product is formed in 64 bits
    (needed once ``numel >= 2^31``). One helper per iteration: device-function calls are
    what the interpreter spends most on."""
    lane = tl.arange(0, BLOCK_S)
    if INT64:
        it = tl.cast(it, tl.int64)
        lane = lane.to(tl.int64)
        c = c.to(tl.int64)
    n = it // SB
    s = (it - n * SB) * BLOCK_S + lane
    off = n * stride_n + c[:, None] * stride_c + s[None, :] * stride_s
    smask = s < SV
    return off, cmask[:, None] & smask[None, :], smask


@triton.jit
def _item_start(it, SB, c, stride_n, stride_c, stride_s, BLOCK_S: tl.constexpr,
                INT64: tl.constexpr):
    """Offsets ``(BLOCK_C,)`` of the first position of item ``it`` for channels ``c``."""
    if INT64:
        it = tl.cast(it, tl.int64)
        c = c.to(tl.int64)
    n = it // SB
    return n * stride_n + c * stride_c + (it - n * SB) * BLOCK_S * stride_s


@triton.jit
def _split_pid(num_parts):
    """``(part, channel_block)`` of this program in a split grid."""
    pid = tl.program_id(0)
    pid_c = pid // num_parts
    return pid - pid_c * num_parts, pid_c


@triton.jit
def _f64(hi, lo, ACC: tl.constexpr):
    """A float scalar passed as a float32 (hi, lo) pair, in the accumulation dtype."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _safe_invstd(var, eps, ACC: tl.constexpr):
    """``1 / sqrt(var + eps)`` correctly rounded, and 0 where ``var + eps == 0`` (never inf);
    NaN where it is negative or NaN (a corrupt running variance), as in torch."""
    d = var + eps
    pos = d != 0
    d = tl.where(pos, d, 1.0)
    if ACC == tl.float64:
        r = 1.0 / tl.sqrt(d)  # float64 sqrt and division are IEEE-rounded in PTX
    else:
        r = tl.div_rn(tl.full(d.shape, 1.0, ACC), tl.sqrt_rn(d))
    return tl.where(pos, r, 0.0)


@triton.jit
def _scale_shift(w_ptr, b_ptr, c, cmask, invstd, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 ACC: tl.constexpr):
    """``scale = invstd * weight`` and ``shift = bias`` for channels ``c``."""
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=cmask, other=1.0).to(ACC)
    if HAS_B:
        shift = tl.load(b_ptr + c, mask=cmask, other=0.0).to(ACC)
    else:
        shift = tl.zeros_like(invstd)
    return scale, shift


@triton.jit
def _running_update(rm_ptr, rv_ptr, rm_out_ptr, rv_out_ptr, c, cmask, mean, m2, count, mom,
                    ACC: tl.constexpr):
    """New running stats ``(1 - mom) * r + mom * batch`` (momentum weighs the new value; the
    variance is the unbiased ``m2 / (count - 1)``), written to fresh outputs in the buffers'
    dtype. Not ``r + mom * (batch - r)``: with ``mom == 1`` (``momentum=None``'s first batch)
    that rounds, and loses every digit of a variance far below the old buffer's."""
    rm = tl.load(rm_ptr + c, mask=cmask, other=0.0).to(ACC)
    rv = tl.load(rv_ptr + c, mask=cmask, other=0.0).to(ACC)
    var_unbiased = m2 / tl.maximum(count - 1.0, 1.0)
    keep = 1.0 - mom
    tl.store(rm_out_ptr + c, (keep * rm + mom * mean).to(rm_out_ptr.dtype.element_ty),
             mask=cmask)
    tl.store(rv_out_ptr + c, (keep * rv + mom * var_unbiased).to(rv_out_ptr.dtype.element_ty),
             mask=cmask)


# ---- activations (BatchNorm + activation + residual) ----------------------------------------
# Codes of the ``ACT`` constexpr; the math mirrors batchnorm.backends.activations (elu alpha=1,
# gelu exact erf form). Invertible ones (in-place mode): identity, leaky_relu (slope > 0), elu.
ACTIVATION_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "silu": 4, "gelu": 5}
_INV_SQRT2: tl.constexpr = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)
# elu's inverse clamps y at -1 + 1e-7 (as the composite does): log1p(-1) would be -inf.
_ELU_Y_MIN: tl.constexpr = tl.constexpr(-1.0 + 1e-7)


@triton.jit
def _act(z, slope, ACT: tl.constexpr):
    """``act(z)`` elementwise (NaN stays NaN)."""
    if ACT == 1:
        z = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        z = tl.where(z > 0, z, tl.exp(tl.where(z > 0, 0.0, z)) - 1.0)
    elif ACT == 4:
        z = z * tl.sigmoid(z)
    elif ACT == 5:
        z = 0.5 * z * (1.0 + tl.erf(z * _INV_SQRT2))
    return z


@triton.jit
def _dz_from_z(dy, z, slope, ACT: tl.constexpr):
    """``dy * act'(z)`` (relu's subgradient at 0 is 0, as torch's; at a NaN ``z`` relu and
    elu pass ``dy`` and leaky_relu scales it, as torch's backward formulas do)."""
    if ACT == 1:
        dy = tl.where(z <= 0, 0.0, dy)
    elif ACT == 2:
        dy = tl.where(z > 0, dy, dy * slope)
    elif ACT == 3:
        dy = tl.where(z <= 0, dy * tl.exp(tl.where(z <= 0, z, 0.0)), dy)
    elif ACT == 4:
        sig = tl.sigmoid(z)
        dy = dy * (sig * (1.0 + z * (1.0 - sig)))
    elif ACT == 5:
        cdf = 0.5 * (1.0 + tl.erf(z * _INV_SQRT2))
        dy = dy * (cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI)
    return dy


@triton.jit
def _dz_from_y(dy, y, slope, ACT: tl.constexpr):
    """``dy * act'(z)`` through the output ``y = act(z)`` (invertible activations)."""
    if ACT == 2:
        dy = tl.where(y > 0, dy, dy * slope)
    elif ACT == 3:
        dy = tl.where(y > 0, dy, dy * (y + 1.0))
    return dy


@triton.jit
def _act_inverse(y, slope, ACT: tl.constexpr):
    """``z`` with ``act(z) = y`` (invertible activations). elu's ``log1p(y)`` is formed as
    ``log(u) * y / (u - 1)``, ``u = 1 + y`` (exact to a few ulps without a log1p primitive)."""
    if ACT == 2:
        y = tl.where(y > 0, y, y / slope)
    elif ACT == 3:
        t = tl.maximum(y, _ELU_Y_MIN)
        u = 1.0 + t
        d = u - 1.0
        zero = d == 0.0
        y = tl.where(y > 0, y, tl.where(zero, t, tl.log(u) * (t / tl.where(zero, 1.0, d))))
    return y


@triton.jit
def _bwd_coefs(mean_ptr, invstd_ptr, w_ptr, b_ptr, c, cmask, HAS_W: tl.constexpr,
               HAS_B: tl.constexpr, ACC: tl.constexpr):
    """Per-channel ``(mean, invstd, scale, shift, rw)`` of a backward:
    ``scale = invstd * w`` (the forward's, and dx's factor), ``shift = b``, ``rw = 1 / w``."""
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(ACC)
    scale = invstd
    rw = tl.zeros_like(invstd) + 1.0
    if HAS_W:
        w = tl.load(w_ptr + c, mask=cmask, other=1.0).to(ACC)
        scale = scale * w
        rw = 1.0 / w
    if HAS_B:
        shift = tl.load(b_ptr + c, mask=cmask, other=0.0).to(ACC)
    else:
        shift = tl.zeros_like(invstd)
    return mean, invstd, scale, shift, rw


@triton.jit
def _bwd_tile(dy, x_ptr, r_ptr, off, mask, mean, scale, shift, rw, slope,
              NEED_U: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
              INPLACE: tl.constexpr, ACC: tl.constexpr):
    """``(dz, u)`` of a tile: ``dz = dy * act'(z)`` and (with ``NEED_U``) ``u = x - mean``, or
    ``u = xhat = (act^-1(y) - r - b) / w`` when ``INPLACE`` (``x_ptr`` then holds y).
    x (or y) is read only when needed: plain BatchNorm's eval dx reads dy alone."""
    dz = dy
    u = dy  # only meaningful with NEED_U
    if INPLACE:
        if NEED_U or ACT != 0:
            y = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
            dz = _dz_from_y(dy, y, slope, ACT)
            if NEED_U:
                z = _act_inverse(y, slope, ACT)
                if HAS_RES:
                    z = z - tl.load(r_ptr + off, mask=mask, other=0.0).to(ACC)
                u = (z - shift[:, None]) * rw[:, None]
    elif NEED_U or ACT != 0:
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        u = x - mean[:, None]
        if ACT != 0:
            z = u * scale[:, None] + shift[:, None]
            if HAS_RES:
                z = z + tl.load(r_ptr + off, mask=mask, other=0.0).to(ACC)
            dz = _dz_from_z(dy, z, slope, ACT)
    return dz, u


# ---- split path: statistics -----------------------------------------------------------------
@triton.jit
def stats_partial_kernel(
    x_ptr, pshift_ptr, pmean_ptr, pm2_ptr, pcnt_ptr,
    C, SV, SB, n_items, items_per_prog, num_parts,
    stride_n, stride_c, stride_s,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
):
    """Per-part statistics: ``pshift/pmean/pm2[part, c]`` (``(num_parts, C)``), ``pcnt[part]``;
    the part's mean is ``pshift + pmean`` (kept apart so that no rounding at the scale of
    ``|mean|`` enters the merge).

    Each lane keeps its own Welford ``(mean, M2)`` (no cross-thread work inside the loop; the
    count is per position lane, so the division is shared by the ``BLOCK_C`` channels); at the
    end the lanes are merged with Chan's formula (``sum(n_l mean_l) / n``, then
    ``sum(M2_l + n_l (mean_l - mean)^2)``).
    """
    part, pid_c = _split_pid(num_parts)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    cnt = tl.zeros([BLOCK_S], ACC)
    start = part * items_per_prog
    end = tl.minimum(start + items_per_prog, n_items)
    # Welford on x - K, K = the part's first value of each channel: the running means stay
    # small, so their rounding does not swamp M2 when |mean| >> std.
    shift = tl.load(x_ptr + _item_start(start, SB, c, stride_n, stride_c, stride_s, BLOCK_S,
                                        INT64), mask=cmask, other=0.0).to(ACC)
    for it in range(start, end):
        off, mask, smask = item_tile(it, SB, c, cmask, SV, stride_n, stride_c, stride_s,
                                     BLOCK_S, INT64)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC) - shift[:, None]
        cnt += smask.to(ACC)
        rcp = 1.0 / tl.maximum(cnt, 1.0)
        delta = x - mean
        new_mean = mean + delta * rcp[None, :]
        new_m2 = m2 + delta * (x - new_mean)
        mean = tl.where(smask[None, :], new_mean, mean)
        m2 = tl.where(smask[None, :], new_m2, m2)
    # Merge the lanes (Chan): deltas against the merged mean; empty lanes have n = 0.
    total = tl.sum(cnt, 0)
    mean_c = tl.sum(mean * cnt[None, :], 1) / total
    d = mean - mean_c[:, None]
    m2_c = tl.sum(m2 + cnt[None, :] * d * d, 1)
    tl.store(pshift_ptr + part * C + c, shift, mask=cmask)
    tl.store(pmean_ptr + part * C + c, mean_c, mask=cmask)
    tl.store(pm2_ptr + part * C + c, m2_c, mask=cmask)
    tl.store(pcnt_ptr + part, total)  # the same for every channel block


@triton.jit(do_not_specialize=["count"])
def stats_finalize_kernel(
    pshift_ptr, pmean_ptr, pm2_ptr, pcnt_ptr, num_parts, C, count,
    mean_ptr, invstd_ptr, m2_ptr, rm_ptr, rv_ptr, rm_out_ptr, rv_out_ptr,
    eps_hi, eps_lo, mom_hi, mom_lo,
    WRITE_INVSTD: tl.constexpr, WRITE_M2: tl.constexpr, HAS_RUNNING: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Merge the parts: with ``K`` = part 0's shift and ``u_p = (shift_p - K) + pmean_p`` (the
    part means relative to K, small and exact-ish), ``mean = K + sum(n_p u_p) / n`` and
    ``M2 = sum(M2_p + n_p (u_p - (mean - K))^2)`` (deltas against the merged mean, nothing
    large cancels); then ``invstd`` and the running update, once per channel. ``count`` is
    the exact total per channel."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    total = tl.cast(count, ACC)
    ref = tl.load(pshift_ptr + c, mask=cmask, other=0.0)
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for p0 in range(0, num_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < num_parts
        mask = pmask[:, None] & cmask[None, :]
        n_p = tl.load(pcnt_ptr + p, mask=pmask, other=0.0)
        u = (tl.load(pshift_ptr + p[:, None] * C + c[None, :], mask=mask, other=0.0)
             - ref[None, :]) + tl.load(pmean_ptr + p[:, None] * C + c[None, :], mask=mask,
                                       other=0.0)
        acc += n_p[:, None] * u
    mean_rel = tl.sum(acc, 0) / total
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for p0 in range(0, num_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < num_parts
        mask = pmask[:, None] & cmask[None, :]
        n_p = tl.load(pcnt_ptr + p, mask=pmask, other=0.0)
        u = (tl.load(pshift_ptr + p[:, None] * C + c[None, :], mask=mask, other=0.0)
             - ref[None, :]) + tl.load(pmean_ptr + p[:, None] * C + c[None, :], mask=mask,
                                       other=0.0)
        q = tl.load(pm2_ptr + p[:, None] * C + c[None, :], mask=mask, other=0.0)
        d = u - mean_rel[None, :]
        acc += q + n_p[:, None] * d * d
    m2 = tl.sum(acc, 0)
    mean = ref + mean_rel
    tl.store(mean_ptr + c, mean, mask=cmask)
    if WRITE_M2:
        tl.store(m2_ptr + c, m2, mask=cmask)
    if WRITE_INVSTD:
        tl.store(invstd_ptr + c, _safe_invstd(m2 / total, _f64(eps_hi, eps_lo, ACC), ACC),
                 mask=cmask)
    if HAS_RUNNING:
        _running_update(rm_ptr, rv_ptr, rm_out_ptr, rv_out_ptr, c, cmask, mean, m2, total,
                        _f64(mom_hi, mom_lo, ACC), ACC)


# ---- split path: elementwise ----------------------------------------------------------------
@triton.jit
def apply_kernel(
    x_ptr, y_ptr, r_ptr, mean_ptr, stat_ptr, w_ptr, b_ptr,
    C, SV, SB, n_items, items_per_prog, num_parts,
    stride_n, stride_c, stride_s, eps_hi, eps_lo, slope_hi, slope_lo,
    STAT_IS_VAR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACT: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
):
    """``y = act((x - mean) * invstd * weight + bias + r)`` (plain BatchNorm: ``ACT=0``, no
    ``r``); ``stat`` is ``invstd``, or the running variance when ``STAT_IS_VAR`` (eval: invstd
    is formed here, no extra launch). ``y_ptr`` may equal ``x_ptr`` (in-place): each element is
    loaded, then stored, by the same program."""
    part, pid_c = _split_pid(num_parts)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)
    stat = tl.load(stat_ptr + c, mask=cmask, other=0.0).to(ACC)
    if STAT_IS_VAR:
        stat = _safe_invstd(stat, _f64(eps_hi, eps_lo, ACC), ACC)
    scale, shift = _scale_shift(w_ptr, b_ptr, c, cmask, stat, HAS_W, HAS_B, ACC)
    slope = _f64(slope_hi, slope_lo, ACC)
    start = part * items_per_prog
    end = tl.minimum(start + items_per_prog, n_items)
    for it in range(start, end):
        off, mask, _ = item_tile(it, SB, c, cmask, SV, stride_n, stride_c, stride_s,
                                 BLOCK_S, INT64)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        y = (x - mean[:, None]) * scale[:, None] + shift[:, None]
        if HAS_RES:
            y = y + tl.load(r_ptr + off, mask=mask, other=0.0).to(ACC)
        y = _act(y, slope, ACT)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---- split path: backward -------------------------------------------------------------------
@triton.jit
def bwd_partial_kernel(
    dy_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, psum_ptr, pdot_ptr,
    C, SV, SB, n_items, items_per_prog, num_parts,
    stride_n, stride_c, stride_s, slope_hi, slope_lo,
    ACT: tl.constexpr, HAS_RES: tl.constexpr, INPLACE: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
):
    """Per-part ``sum(dz)`` and ``sum(dz * u)``, ``(num_parts, C)`` each; ``dz = dy`` and
    ``u = x - mean`` for plain BatchNorm (see :func:`_bwd_tile` for the fused modes)."""
    part, pid_c = _split_pid(num_parts)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    # (invstd is unused here; ``_`` would clash with the loop's ``_`` in compiled code)
    mean, _invstd, scale, shift, rw = _bwd_coefs(mean_ptr, invstd_ptr, w_ptr, b_ptr, c, cmask,
                                                 HAS_W, HAS_B, ACC)
    slope = _f64(slope_hi, slope_lo, ACC)
    acc_dy = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    acc_dot = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    start = part * items_per_prog
    end = tl.minimum(start + items_per_prog, n_items)
    for it in range(start, end):
        off, mask, _ = item_tile(it, SB, c, cmask, SV, stride_n, stride_c, stride_s,
                                 BLOCK_S, INT64)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
        dz, u = _bwd_tile(dy, x_ptr, r_ptr, off, mask, mean, scale, shift, rw, slope,
                          True, ACT, HAS_RES, INPLACE, ACC)
        acc_dy += dz
        acc_dot += dz * u  # masked lanes have dz == 0
    tl.store(psum_ptr + part * C + c, tl.sum(acc_dy, 1), mask=cmask)
    tl.store(pdot_ptr + part * C + c, tl.sum(acc_dot, 1), mask=cmask)


@triton.jit
def bwd_finalize_kernel(
    psum_ptr, pdot_ptr, num_parts, C, invstd_ptr,
    sum_dy_ptr, sum_dot_ptr, dw_ptr,
    WRITE_DW: tl.constexpr, INPLACE: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Sum the parts: ``sum_dy`` (= dbias), ``sum_dy_xmu`` and ``dweight = sum_dy_xmu * invstd``
    (in-place mode the dot product is already over xhat: ``dweight = sum_dot``)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc_dy = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    acc_dot = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for p0 in range(0, num_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < num_parts)[:, None] & cmask[None, :]
        acc_dy += tl.load(psum_ptr + p[:, None] * C + c[None, :], mask=mask, other=0.0)
        acc_dot += tl.load(pdot_ptr + p[:, None] * C + c[None, :], mask=mask, other=0.0)
    sum_dy = tl.sum(acc_dy, 0)
    sum_dot = tl.sum(acc_dot, 0)
    tl.store(sum_dy_ptr + c, sum_dy, mask=cmask)
    tl.store(sum_dot_ptr + c, sum_dot, mask=cmask)
    if WRITE_DW:
        if INPLACE:
            tl.store(dw_ptr + c, sum_dot, mask=cmask)
        else:
            invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(ACC)
            tl.store(dw_ptr + c, sum_dot * invstd, mask=cmask)


@triton.jit
def _dx_proj(sum_dy_ptr, sum_dot_ptr, invstd, c, cmask, count, TRAINING: tl.constexpr,
             INPLACE: tl.constexpr, ACC: tl.constexpr):
    """Per-channel ``(mean_dy, proj)`` of ``dx = (dz - mean_dy - u * proj) * scale``:
    ``mean_dy = sum_dz / m``, ``proj = sum_dot * invstd^2 / m`` (``u = x - mean``) or
    ``sum_dot / m`` (in-place, ``u = xhat``); both zero in eval."""
    if TRAINING:
        inv_m = 1.0 / tl.cast(count, ACC)
        mean_dy = tl.load(sum_dy_ptr + c, mask=cmask, other=0.0).to(ACC) * inv_m
        sum_dot = tl.load(sum_dot_ptr + c, mask=cmask, other=0.0).to(ACC)
        if INPLACE:
            proj = sum_dot * inv_m
        else:
            proj = sum_dot * invstd * invstd * inv_m
    else:
        mean_dy = tl.zeros_like(invstd)
        proj = tl.zeros_like(invstd)
    return mean_dy, proj


@triton.jit(do_not_specialize=["count"])
def bwd_dx_kernel(
    dy_ptr, x_ptr, r_ptr, dx_ptr, dres_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr,
    sum_dy_ptr, sum_dot_ptr, count,
    C, SV, SB, n_items, items_per_prog, num_parts,
    stride_n, stride_c, stride_s, slope_hi, slope_lo,
    TRAINING: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DRES: tl.constexpr,
    ACT: tl.constexpr, HAS_RES: tl.constexpr, INPLACE: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
):
    """``dx = weight * invstd * (dz - sum_dz / m - (x - mean) * invstd^2 * sum_dz_xmu / m)``
    (plain BatchNorm: ``dz = dy``); in eval (``TRAINING=False``) ``dx = dz * weight * invstd``
    and, for plain BatchNorm, x is not read. ``WRITE_DRES`` also writes ``dresidual = dz``."""
    part, pid_c = _split_pid(num_parts)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, invstd, scale, shift, rw = _bwd_coefs(mean_ptr, invstd_ptr, w_ptr, b_ptr, c, cmask,
                                                HAS_W, HAS_B, ACC)
    mean_dy, proj = _dx_proj(sum_dy_ptr, sum_dot_ptr, invstd, c, cmask, count, TRAINING,
                             INPLACE, ACC)
    slope = _f64(slope_hi, slope_lo, ACC)
    start = part * items_per_prog
    end = tl.minimum(start + items_per_prog, n_items)
    for it in range(start, end):
        off, mask, _ = item_tile(it, SB, c, cmask, SV, stride_n, stride_c, stride_s,
                                 BLOCK_S, INT64)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
        dz, u = _bwd_tile(dy, x_ptr, r_ptr, off, mask, mean, scale, shift, rw, slope,
                          TRAINING, ACT, HAS_RES, INPLACE, ACC)
        if WRITE_DRES:
            tl.store(dres_ptr + off, dz.to(dres_ptr.dtype.element_ty), mask=mask)
        if WRITE_DX:
            if TRAINING:
                g = dz - mean_dy[:, None] - u * proj[:, None]
            else:
                g = dz
            tl.store(dx_ptr + off, (g * scale[:, None]).to(dx_ptr.dtype.element_ty), mask=mask)


# ---- on-chip path: one launch, x read once --------------------------------------------------
@triton.jit
def _onchip_tile(C, NV, SV, stride_n, stride_c, stride_s,
                 BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                 INT64: tl.constexpr):
    """Channels, mask, offsets and per-channel first offsets of a channel block's whole
    slice, ``[BLOCK_C, BLOCK_N * BLOCK_S]`` (position ``j`` is ``n = j // BLOCK_S``,
    ``s = j % BLOCK_S``: shifts, since the blocks are powers of two)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    j = tl.arange(0, BLOCK_N * BLOCK_S)
    n = j // BLOCK_S
    s = j % BLOCK_S
    if INT64:
        cc = c.to(tl.int64)
        n = n.to(tl.int64)
        s = s.to(tl.int64)
    else:
        cc = c
    first = cc * stride_c  # offsets of (n, s) = (0, 0), per channel
    off = first[:, None] + (n * stride_n + s * stride_s)[None, :]
    mask = cmask[:, None] & ((n < NV) & (s < SV))[None, :]
    return c, cmask, off, mask, first


@triton.jit(do_not_specialize=["count"])
def fwd_onchip_kernel(
    x_ptr, y_ptr, r_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr,
    mean_ptr, invstd_ptr, m2_ptr, rm_out_ptr, rv_out_ptr,
    C, NV, SV, count, stride_n, stride_c, stride_s, eps_hi, eps_lo, mom_hi, mom_lo,
    slope_hi, slope_lo,
    WRITE_Y: tl.constexpr, WRITE_INVSTD: tl.constexpr, WRITE_M2: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RUNNING: tl.constexpr,
    ACT: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    """Training forward of a channel block from registers: exact two-pass statistics of the
    slice (shifted by each channel's first value, so that a large |mean| costs no precision),
    invstd, running update, then ``y = act(xhat * w + b + r)``. With ``WRITE_Y=False`` it is
    the ``stats`` primitive (mean and M2 only). ``y_ptr`` may equal ``x_ptr`` (in-place): the
    program's whole slice is loaded before anything is stored, and no other program reads it."""
    c, cmask, off, mask, first = _onchip_tile(C, NV, SV, stride_n, stride_c, stride_s,
                                              BLOCK_C, BLOCK_N, BLOCK_S, INT64)
    k = tl.load(x_ptr + first, mask=cmask, other=0.0).to(ACC)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC) - k[:, None]
    count = tl.cast(count, ACC)  # NV * SV
    mean_rel = tl.sum(tl.where(mask, x, 0.0), 1) / count
    xmu = tl.where(mask, x - mean_rel[:, None], 0.0)
    m2 = tl.sum(xmu * xmu, 1)
    mean = k + mean_rel
    tl.store(mean_ptr + c, mean, mask=cmask)
    if WRITE_M2:
        tl.store(m2_ptr + c, m2, mask=cmask)
    if HAS_RUNNING:
        _running_update(rm_ptr, rv_ptr, rm_out_ptr, rv_out_ptr, c, cmask, mean, m2, count,
                        _f64(mom_hi, mom_lo, ACC), ACC)
    if WRITE_INVSTD:
        invstd = _safe_invstd(m2 / count, _f64(eps_hi, eps_lo, ACC), ACC)
        tl.store(invstd_ptr + c, invstd, mask=cmask)
        if WRITE_Y:
            scale, shift = _scale_shift(w_ptr, b_ptr, c, cmask, invstd, HAS_W, HAS_B, ACC)
            y = xmu * scale[:, None] + shift[:, None]
            if HAS_RES:
                y = y + tl.load(r_ptr + off, mask=mask, other=0.0).to(ACC)
            y = _act(y, _f64(slope_hi, slope_lo, ACC), ACT)
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["count"])
def bwd_onchip_kernel(
    dy_ptr, x_ptr, r_ptr, dx_ptr, dres_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr,
    sum_dy_ptr, sum_dot_ptr, dw_ptr,
    C, NV, SV, count, stride_n, stride_c, stride_s, slope_hi, slope_lo,
    TRAINING: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DW: tl.constexpr,
    WRITE_DRES: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, INPLACE: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    """Backward of a channel block from registers: ``sum_dz`` (= dbias), ``sum_dz_u``,
    ``dweight``, ``dx`` and ``dresidual = dz`` with x (or y) and dy read once (``dz = dy``,
    ``u = x - mean`` for plain BatchNorm; see :func:`_bwd_tile`). ``WRITE_DX=False`` (and no
    ``ACT``) is the ``backward_reduce`` primitive."""
    c, cmask, off, mask, _ = _onchip_tile(C, NV, SV, stride_n, stride_c, stride_s,
                                          BLOCK_C, BLOCK_N, BLOCK_S, INT64)
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
    mean, invstd, scale, shift, rw = _bwd_coefs(mean_ptr, invstd_ptr, w_ptr, b_ptr, c, cmask,
                                                HAS_W, HAS_B, ACC)
    dz, u = _bwd_tile(dy, x_ptr, r_ptr, off, mask, mean, scale, shift, rw,
                      _f64(slope_hi, slope_lo, ACC), True, ACT, HAS_RES, INPLACE, ACC)
    u = tl.where(mask, u, 0.0)
    sum_dy = tl.sum(dz, 1)
    sum_dot = tl.sum(dz * u, 1)
    tl.store(sum_dy_ptr + c, sum_dy, mask=cmask)
    tl.store(sum_dot_ptr + c, sum_dot, mask=cmask)
    if WRITE_DW:
        if INPLACE:
            tl.store(dw_ptr + c, sum_dot, mask=cmask)
        else:
            tl.store(dw_ptr + c, sum_dot * invstd, mask=cmask)
    if WRITE_DRES:
        tl.store(dres_ptr + off, dz.to(dres_ptr.dtype.element_ty), mask=mask)
    if WRITE_DX:
        if TRAINING:
            inv_m = 1.0 / tl.cast(count, ACC)  # NV * SV
            if INPLACE:
                proj = sum_dot * inv_m
            else:
                proj = sum_dot * invstd * invstd * inv_m
            g = dz - (sum_dy * inv_m)[:, None] - u * proj[:, None]
        else:
            g = dz
        tl.store(dx_ptr + off, (g * scale[:, None]).to(dx_ptr.dtype.element_ty), mask=mask)
