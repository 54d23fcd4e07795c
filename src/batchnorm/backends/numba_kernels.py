"""Fused BatchNorm kernels for CPU, written with numba.

One kernel family covers every rank from 2 to 5 and both memory layouts. Every input is seen
as a C-contiguous ``(n, c, s)`` block of memory: channels-first tensors as ``(N, C, S)`` with
``S`` the product of the spatial sizes, channels-last ones (NHWC, NDHWC) and 2-D ``(N, C)``
as rows ``(R, C, 1)`` with ``R = N * S``. Work is cut into tasks: ``blocks`` channel blocks x
``parts`` batch (row) ranges. A channel block covers a long contiguous piece of every batch
row (up to 16K values; see ``numba_backend._View``), so that memory is streamed well.

The inner loops come in two shapes:

* run mode (channels first, ``s > 1``): each channel's run of ``s`` contiguous values is
  reduced or written on its own, with scalar per-channel coefficients;
* row mode (channels last, ``s == 1``): a row's slice of channels is processed at once, with
  per-channel accumulators and coefficient vectors, vectorized along the channels.

There is one forward kernel (statistics, running-stat update and normalization, each
switchable) and one backward kernel (reduction and input gradient, each switchable), so the
four primitives of :mod:`batchnorm.backends.base` and the fused entry points all run the same
compiled code. A kernel is run through its packed entry (:mod:`.numba_entry`, which compiles
it: the kernels themselves are ``inline="always"``) by every thread of a phase, each claiming
units from shared counters; the backend runs it on ``torch.get_num_threads()`` threads, in
phases when the reduction must finish before the elementwise pass (with one batch part per
task there is a single phase: each channel block is reduced and then written while it is
still in cache, so x is read from memory once). Specializations: one entry per kernel and
storage dtype (float32, float64, float16 bits as uint16, bfloat16 bits as int16).

Numerics:

* statistics are centred sums ``sum(x - shift)`` and ``sum((x - shift)^2)`` around a shift
  that is already within a few standard deviations of the mean (the mean of the task's first
  cache-resident segment, at least one sample per channel, from a first pass over it), so
  the correction term is small; with the correction
  ``M2 = S2 - S1^2 / n``; a run (four runs of one channel when they hold at most
  ``FOUR_RUNS_MAX`` values, or a channel over one segment in row mode) is summed in the
  compute dtype, everything beyond in float64, and the parts of the batch are merged with
  Chan's formula.
  Never ``E[x^2] - E[x]^2``;
* normalization computes ``(x - mean_hi) * scale + (shift - mean_lo * scale)`` in the compute
  dtype (float32, or float64 for float64 input), where ``mean_hi + mean_lo`` is the float64
  mean split into two floats: ``x - mean_hi`` is exact near the mean, so the output keeps the
  mean's full precision when ``|mean| >> std``, which the folded ``x * scale + (bias - mean *
  scale)`` form does not (the backward's ``x - mean`` term is treated the same way);
* float16/bfloat16 are loaded to float32 and rounded back to nearest even.

Every partition of the work depends on the shape only, never on the thread count, so results
are bitwise identical for any number of threads.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["PACKED", "backward", "forward", "spin_until"]


def njit(*args, **kwargs):
    """``numba.njit`` with NumPy's error model: a float division by zero gives inf/nan
    instead of raising ZeroDivisionError. The Python model's check on every division keeps
    LLVM from vectorizing the per-channel loops (it made the epilogue of a (8, 4096) input
    35 ns per channel instead of about 5); every division here has a nonzero divisor or is
    guarded."""
    kwargs.setdefault("error_model", "numpy")
    return numba.njit(*args, **kwargs)

# Reductions may be reordered (vectorized with several accumulators); elementwise code may
# only contract a*b+c into an FMA. Reassociation must not reach the normalization, where it
# could turn (x - mean_hi) * scale + shift into the folded x * scale + (shift - mean_hi *
# scale), which loses the mean's precision (the coefficients fold it themselves only where
# that is harmless: FOLD_Z, _coef3).
_REDUCE_MATH = {"reassoc", "contract", "nsz"}
_ELEM_MATH = {"contract"}

# The shift of the centred sums is the mean of a task's first segment of SEGMENT values (at
# least one run or super-row), read twice, the second time from cache; row-mode accumulators
# (compute dtype) are flushed to float64 every ROW_SEGMENT values.
SEGMENT = 4096
ROW_SEGMENT = 1 << 16
# Short runs are reduced four batch rows a pass (_run_dev4_body, _run_bred4_body) when the
# four hold at most this many values (runs of up to 4096: the 7x7 to 56x56 layers). Beyond,
# the per-run overhead that this saves is negligible, and longer float32 partial sums would
# cost accuracy: at (4, 16, 16384) four runs together gave dbias errors 6x ATen's.
FOUR_RUNS_MAX = 1 << 14
# Row mode: consecutive rows are processed as super-rows of at least this many values.
ROW_TILE = 1024
# The normalization folds the mean into the shift where |mean| * invstd is at most this
# (see _coef3): its extra rounding error is then at most this many ulps of the weight.
FOLD_Z = 8.0
# Streamed outputs are computed in buffers of this many items (a multiple of 64 bytes for
# every dtype; small enough for L1) and written out chunk by chunk.
STREAM_CHUNK = 1024
# Phase 1 (per-channel merge) is shared out in chunks of this many channels.
MERGE_CHUNK = 256
# Integer constants for the arguments of compiled (not inlined) functions: numba types a
# literal argument as its value and compiles the callee once per value, so passing ``0`` at
# one call site and a variable at another compiled a function (and every loop it calls) twice.
# An int64 global is typed int64, not as a literal.
_I0 = np.int64(0)
_I1 = np.int64(1)
_ROW_SEGMENT = np.int64(ROW_SEGMENT)


def _jit(**kwargs):
    """``njit(cache=True)``, or uncached when no cache directory is writable (numba tries the
    package's ``__pycache__``, then the user cache dir, and raises if neither works)."""

    def deco(fn):
        try:
            return njit(cache=True, **kwargs)(fn)
        except RuntimeError:
            return njit(cache=False, **kwargs)(fn)

    return deco


# ---- storage <-> compute conversions ------------------------------------------------------


@intrinsic
def _f16_bits_to_f32(typingctx, v):
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_f16_bits(typingctx, v):
    def codegen(context, builder, sig, args):
        # fptrunc rounds to nearest even, like torch's float -> half conversion.
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _bf16_bits_to_f32(typingctx, v):
    def codegen(context, builder, sig, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _f32_to_bf16_bits(typingctx, v):
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        upper = builder.lshr(bits, ir.Constant(i32, 16))
        # round to nearest even: add 0x7FFF plus the lowest kept bit, then truncate
        bias = builder.add(ir.Constant(i32, 0x7FFF), builder.and_(upper, ir.Constant(i32, 1)))
        rounded = builder.lshr(builder.add(bits, bias), ir.Constant(i32, 16))
        quiet_nan = builder.or_(upper, ir.Constant(i32, 0x40))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))

    return types.int16(types.float32), codegen


def _ld(v):
    """Storage element -> compute value (float32, or float64 for float64 storage)."""


def _st(v, arr):
    """Compute value -> storage element of ``arr``'s dtype."""


def _as(v, like):
    """``v`` cast to the dtype of the array ``like``."""


def _zero(v):
    """A zero of the scalar ``v``'s type (not ``v - v``, which is NaN for a NaN or infinite
    ``v``)."""


@overload(_ld)
def _ld_impl(v):
    if isinstance(v, types.Float):
        return lambda v: v
    if v == types.uint16:
        return lambda v: _f16_bits_to_f32(v)
    if v == types.int16:
        return lambda v: _bf16_bits_to_f32(v)
    return None


@overload(_st)
def _st_impl(v, arr):
    dt = arr.dtype
    if dt == types.float64:
        return lambda v, arr: np.float64(v)
    if dt == types.float32:
        return lambda v, arr: np.float32(v)
    if dt == types.uint16:
        return lambda v, arr: _f32_to_f16_bits(np.float32(v))
    if dt == types.int16:
        return lambda v, arr: _f32_to_bf16_bits(np.float32(v))
    return None


@overload(_zero)
def _zero_impl(v):
    if v == types.float64:
        return lambda v: np.float64(0.0)
    return lambda v: np.float32(0.0)


@overload(_as)
def _as_impl(v, like):
    if like.dtype == types.float64:
        return lambda v, like: np.float64(v)
    return lambda v, like: np.float32(v)


@njit(inline="always")
def _u(i):
    """An index as unsigned: numba then skips its negative-index wraparound, which would keep
    LLVM from vectorizing the loop."""
    return np.uint64(i)


# ---- streaming (non-temporal) stores ------------------------------------------------------
# An output much larger than the caches is written with non-temporal stores: a plain store
# first reads the line it writes into ("write-allocate"), so writing y costs two memory
# transfers instead of one. The elementwise loops write into a small buffer that stays in L1,
# which _stream copies out in whole, aligned 64-byte lines (a partial line would cost the read
# again). Measured on a 25 MB float32 pass on this project's VM: 1.70 ms with plain stores,
# 1.03 ms streamed, 1.58 ms for memcpy.


@intrinsic
def _stream(typingctx, src, dst, o, n):
    """``dst[o:o + n] = src[:n]``: the 64-byte-aligned lines with non-temporal stores, the
    ragged ends with plain ones."""
    sig = types.none(src, dst, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        sa = context.make_array(sig.args[0])(context, builder, args[0])
        da = context.make_array(sig.args[1])(context, builder, args[1])
        size = context.get_abi_sizeof(context.get_data_type(sig.args[1].dtype))
        i64 = ir.IntType(64)
        i8p = ir.IntType(8).as_pointer()
        vec = ir.VectorType(ir.IntType(32), 16)

        def const(v):
            return ir.Constant(i64, v)

        out = builder.bitcast(builder.gep(da.data, [args[2]]), i8p)
        inp = builder.bitcast(sa.data, i8p)
        nbytes = builder.mul(args[3], const(size))
        lead = builder.and_(builder.sub(const(0), builder.ptrtoint(out, i64)), const(63))
        lead = builder.select(builder.icmp_unsigned("<", nbytes, lead), nbytes, lead)
        cgutils.raw_memcpy(builder, out, inp, lead, 1)
        lines = builder.lshr(builder.sub(nbytes, lead), const(6))
        hint = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        with cgutils.for_range(builder, lines, intp=i64) as loop:
            at = builder.add(lead, builder.shl(loop.index, const(6)))
            v = builder.load(builder.bitcast(builder.gep(inp, [at]), vec.as_pointer()), align=1)
            st = builder.store(v, builder.bitcast(builder.gep(out, [at]), vec.as_pointer()),
                               align=64)
            st.set_metadata("nontemporal", hint)
        done = builder.add(lead, builder.shl(lines, const(6)))
        cgutils.raw_memcpy(builder, builder.gep(out, [done]), builder.gep(inp, [done]),
                           builder.sub(nbytes, done), 1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _copy(typingctx, src, dst, o, n):
    """``dst[o:o + n] = src[:n]`` with plain stores (a memcpy)."""
    sig = types.none(src, dst, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        sa = context.make_array(sig.args[0])(context, builder, args[0])
        da = context.make_array(sig.args[1])(context, builder, args[1])
        size = context.get_abi_sizeof(context.get_data_type(sig.args[1].dtype))
        i8p = ir.IntType(8).as_pointer()
        out = builder.bitcast(builder.gep(da.data, [args[2]]), i8p)
        nbytes = builder.mul(args[3], ir.Constant(ir.IntType(64), size))
        cgutils.raw_memcpy(builder, out, builder.bitcast(sa.data, i8p), nbytes, 1)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _put(src, dst, o, n, mode):
    """``dst[o:o + n] = src[:n]`` from a chunk buffer: with non-temporal stores (``mode``
    1, :func:`_stream`) or plain ones (2: an output written over its own input, whose loops
    compute into a buffer because LLVM's runtime alias check sends a loop that reads and
    writes one array through two arguments to its scalar version: 3.7x slower, measured)."""
    if mode == 1:
        _stream(src, dst, o, n)
    else:
        _copy(src, dst, o, n)


@intrinsic
def _fence(typingctx):
    """A full memory fence: non-temporal stores are weakly ordered, so a thread's streamed
    output must be drained before it reports its task done (mfence on x86)."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _first_index(typingctx, arr):
    """The data pointer of ``arr`` in units of its items (for aligning chunks in memory)."""

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        size = context.get_abi_sizeof(context.get_data_type(sig.args[0].dtype))
        addr = builder.ptrtoint(a.data, ir.IntType(64))
        return builder.udiv(addr, ir.Constant(ir.IntType(64), size))

    return types.intp(arr), codegen


@njit(inline="always")
def _chunk_end(base, a, end):
    """End of the chunk starting at item ``a`` of a range: at most STREAM_CHUNK items, and on
    a multiple of STREAM_CHUNK items in memory (``base`` is the range's first item's index
    in memory) so that only the range's own ends can be partial lines."""
    return min(end, a + STREAM_CHUNK - (base + a) % STREAM_CHUNK)


@intrinsic
def _load_acquire(typingctx, arr, i):
    """``arr[i]`` (int64) as an atomic load with acquire ordering: a spin loop must see other
    threads' stores, and the compiler may not hoist it out of the loop."""
    sig = types.int64(arr, types.intp)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.load_atomic(builder.gep(a.data, [args[1]]), "acquire", 8)

    return sig, codegen


@intrinsic
def _fetch_add(typingctx, arr, i):
    """``arr[i] += 1`` (int64) as one atomic operation; returns the old value."""
    sig = types.int64(arr, types.intp)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", builder.gep(a.data, [args[1]]),
                                  ir.Constant(ir.IntType(64), 1), "seq_cst")

    return sig, codegen


# Work sharing between the threads of one call (see numba_backend._Pool.run): every thread
# runs the same kernel call over units [0, n) and claims units one at a time from a shared
# counter, ctl[CTL_NEXT], then counts each one it finishes in ctl[CTL_DONE]. A thread that
# starts late (a worker waiting for a core that torch's OpenMP threads are still spinning
# on, say) then finds less or nothing left, instead of the others waiting for its fixed share.
# Which thread runs a unit never changes what the unit computes.
CTL_NEXT = 0
CTL_DONE = 8  # its own cache line
CTL_SIZE = 16


@njit(inline="always")
def _claim(ctl, n):
    """The next unclaimed unit of [0, n), or n when all are taken."""
    return min(_fetch_add(ctl, CTL_NEXT), n)


@njit(inline="always")
def _unit_done(ctl, stream):
    """Count a finished unit; streamed (non-temporal) stores are drained first, so that a
    thread that sees the count also sees the unit's output."""
    if stream:
        _fence()
    _fetch_add(ctl, CTL_DONE)


@_jit(nogil=True)
def spin_until(flags, first, stride, count, target, iters):
    """Whether ``flags[first + k * stride] >= target`` for every k < count within ``iters``
    polls, without the GIL (the thread pool's hand-off between phases; see
    numba_backend._Pool)."""
    for _ in range(iters):
        ok = True
        for k in range(count):
            if _load_acquire(flags, first + k * stride) < target:
                ok = False
                break
        if ok:
            return True
    return False


@njit(inline="always")
def _piece(p, b, s):
    """The piece of run ``p // s`` that starts at item ``p`` of a chunk ending at ``b``:
    ``(run, end)``. The streamed loops compute a chunk's pieces into the buffer, then stream
    it out (a scalar helper, not a generator: numba's generators cost tens of ns per item,
    which doubled the time of inputs with 49-value runs)."""
    j = p // s
    return j, min(b, (j + 1) * s)


# ---- per-channel scalar helpers -----------------------------------------------------------
# Per-channel work loops over a block of channels inside one call: a call per channel with
# array arguments costs tens of ns (numba counts references of every array it passes, with
# atomic operations, even when inlined), which made the per-channel epilogue of a (8, 4096)
# input take 6x its data pass. Helpers called per channel take scalars only.


@njit(inline="always")
def _span(total, parts, p):
    """[lo, hi) of part p when ``total`` items are cut into ``parts`` near-equal ranges."""
    return total * p // parts, total * (p + 1) // parts


@njit(inline="always")
def _finite_or_zero(v):
    """``v``, or 0 where it is infinite or NaN: for the helper terms that only refine a
    result (a centred sum's shift, the mean's rounding correction), which are non-finite
    only when the data or statistics are. Used as is, they would add inf - inf = NaN where
    torch gives inf: an infinite shift made the mean NaN where torch's two-pass CPU kernels
    give an infinite mean, and an infinite correction made a channel's y or dx NaN."""
    return v if np.isfinite(v) else 0.0


@njit(inline="always")
def _safe_invstd(var, eps):
    denom = var + eps
    # 0 only for an exact zero; a negative or NaN variance gives NaN (as in torch)
    return 1.0 / np.sqrt(denom) if denom != 0.0 else 0.0


@njit(inline="always")
def _folds(mu, inv, v):
    """Whether a channel's coefficients fold its mean (see _coef3): ``|mean| * invstd <=
    FOLD_Z`` (False for a NaN or infinite mean or invstd) and the coefficient ``v`` that
    multiplies x, rounded, is finite."""
    return abs(mu) * inv <= FOLD_Z and np.isfinite(v)


@njit(inline="always")
def _coef3(mu, inv, w, b, like):
    """(hi, scale, shift') of ``y = (x - hi) * scale + shift'`` in the compute dtype
    (like's): ``hi`` is the mean rounded to it, and the rounding ``lo = mean - hi`` goes into
    ``shift' = shift - lo * scale``. ``x - hi`` is exact near the mean, so this keeps the
    mean's full precision where the folded ``x * scale + (shift - mean * scale)`` loses it
    when ``|mean| >> std``. Scalars only: see the note above.

    Where the mean is within ``FOLD_Z`` standard deviations of 0 (and everything is finite),
    the coefficients are the folded ones instead: ``hi = 0`` and ``shift' = shift - mean *
    scale`` with the rounded scale, in float64. Then ``y - exact = (x - mean) * (scale's
    rounding) + shift''s rounding``: the scale's error still multiplies ``x - mean``, and
    the shift's rounding is at most ``eps * (|shift| + FOLD_Z * |weight|)``, a few ulps of
    the output's scale. With ``hi = 0`` the elementwise loops need two coefficient streams,
    not three (``_rows_norm``'s ``fold``; channels-last, 17-35% faster from memory on one
    thread)."""
    sc = inv * w
    scr = np.float64(_as(sc, like))
    if _folds(mu, inv, scr):
        return _as(0.0, like), sc, b - mu * scr
    hi = _as(mu, like)
    # (an infinite mean is its own rounding: no correction, y is -inf or inf as in torch)
    return hi, sc, b - _finite_or_zero((mu - np.float64(hi)) * sc)


@njit
def _train_coefs(c0, c1, cnt, mu, q, off, mean, m2, invstd, rmean, rvar, new_rmean, new_rvar,
                 eps, momentum, weight, bias, coef):
    """Channels [c0, c1) from their float64 statistics ``mu[c - off]``, ``q[c - off]`` (mean
    and M2 over ``cnt`` values): write mean, m2, invstd, the running update (when ``rmean``
    is given) and the normalization coefficients ``coef[:3, c]`` (see _coef3)."""
    w = momentum
    for c in range(c0, c1):
        m = mu[c - off]
        qq = q[c - off]
        inv = _safe_invstd(qq / cnt, eps)
        mean[c] = m
        m2[c] = qq
        invstd[c] = inv
        if rmean.size > 0:
            new_rmean[c] = (1.0 - w) * np.float64(rmean[c]) + w * m
            new_rvar[c] = (1.0 - w) * np.float64(rvar[c]) + w * (qq / max(cnt - 1.0, 1.0))
        hi, sc, sh = _coef3(m, inv, np.float64(weight[c]) if weight.size > 0 else 1.0,
                            np.float64(bias[c]) if bias.size > 0 else 0.0, coef)
        coef[0, c] = hi
        coef[1, c] = sc
        coef[2, c] = sh


@njit
def _given_coefs(c0, c1, mean, invstd, var_in, eps, weight, bias, coef):
    """Coefficients of channels [c0, c1) from given statistics (eval, apply primitive):
    ``mean`` with ``var_in`` and ``eps`` (when given) or ``invstd``."""
    for c in range(c0, c1):
        inv = (_safe_invstd(np.float64(var_in[c]), eps) if var_in.size > 0
               else np.float64(invstd[c]))
        hi, sc, sh = _coef3(np.float64(mean[c]), inv,
                            np.float64(weight[c]) if weight.size > 0 else 1.0,
                            np.float64(bias[c]) if bias.size > 0 else 0.0, coef)
        coef[0, c] = hi
        coef[1, c] = sc
        coef[2, c] = sh


# ---- run mode: one channel's contiguous run [o, o + s) ------------------------------------


@njit(fastmath=_REDUCE_MATH)
def _run_sum(x, o, s, like):
    acc = _as(0.0, like)
    for i in range(o, o + s):
        acc += _ld(x[_u(i)])
    return np.float64(acc)


@njit(inline="always")
def _run_dev_body(x, o, s, m):
    s1 = _zero(m)
    s2 = _zero(m)
    for i in range(o, o + s):
        d = _ld(x[_u(i)]) - m
        s1 += d
        s2 += d * d
    return np.float64(s1), np.float64(s2)


@njit(fastmath=_REDUCE_MATH)
def _run_dev(x, o, s, m):
    """(sum d, sum d^2), d = x - m, m in the compute dtype (from a typed zero, not ``m - m``,
    which is NaN for a NaN or infinite m)."""
    return _run_dev_body(x, o, s, m)


@njit(inline="always")
def _run_dev4_body(x, o, st, s, m):
    """:func:`_run_dev` over the four runs at ``o``, ``o + st``, ``o + 2 st``, ``o + 3 st``
    (one channel, four consecutive batch rows; at most FOUR_RUNS_MAX values) in one loop: one
    horizontal reduction and one float64 conversion per four runs. For short runs (7x7: 49
    values) those, not the loads, bounded the loop (one thread, (32, 512, 49): 257 -> 98 us
    in cache, 317 -> 170 us from memory)."""
    s1 = _zero(m)
    s2 = _zero(m)
    for i in range(o, o + s):
        d0 = _ld(x[_u(i)]) - m
        d1 = _ld(x[_u(i + st)]) - m
        d2 = _ld(x[_u(i + 2 * st)]) - m
        d3 = _ld(x[_u(i + 3 * st)]) - m
        s1 += (d0 + d1) + (d2 + d3)
        s2 += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    return np.float64(s1), np.float64(s2)


# One batch row's runs of channels [c0, c1) from offset o (``_runs_dev4``: four rows' runs
# a pass) with the run loop inlined: a call per run cost 7-20% of a fwd+bwd step for 7x7 and
# 14x14 layers (paired A/B, benchmarks/RESULTS.md). ``shift`` is indexed from c0.
@njit(fastmath=_REDUCE_MATH)
def _runs_dev(x, o, s_, c0, c1, shift, mean, m2):
    for c in range(c0, c1):
        u, v = _run_dev_body(x, o, s_, shift[c - c0])
        mean[c] += u
        m2[c] += v
        o += s_


@njit(fastmath=_REDUCE_MATH)
def _runs_dev4(x, o, stride, s_, c0, c1, shift, mean, m2):
    for c in range(c0, c1):
        u, v = _run_dev4_body(x, o, stride, s_, shift[c - c0])
        mean[c] += u
        m2[c] += v
        o += s_


@njit(inline="always")
def _run_norm_body(x, xo, y, yo, s, hi, sc, sh):
    for i in range(s):
        y[_u(yo + i)] = _st((_ld(x[_u(xo + i)]) - hi) * sc + sh, y)


@njit(inline="always")
def _chunk_norm(x, o, buf, a, b, s_, c0, coef):
    """buf[:b - a] from x[o + a:o + b], a stream chunk of a row of channels from c0 on: the
    pieces of its runs. Inlined, with the loop body, into _task_norm (compiled with the
    bodies' ``contract``, so that the bits are those of the unstreamed loops): as a compiled
    function called per chunk it measured 14-24% slower than a call per piece, inlined as
    fast or faster (paired, (32, 1024, 14, 14) and (32, 256, 28, 28) forward 1.02-1.03x)."""
    p = a
    while p < b:
        j, q = _piece(p, b, s_)
        c = c0 + j
        _run_norm_body(x, o + p, buf, p - a, q - p, coef[0, c], coef[1, c], coef[2, c])
        p = q


@njit(fastmath=_ELEM_MATH)
def _runs_norm(x, y, stride, s_, c0, c1, n0, n1, coef):
    """A task's whole runs, the loop body inlined: a call per run cost a third of the pass
    for 7x7 runs of 49 values (one thread, in cache: 30 -> 20 us a MB)."""
    for n in range(n0, n1):
        o = n * stride + c0 * s_
        for c in range(c0, c1):
            _run_norm_body(x, o, y, o, s_, coef[0, c], coef[1, c], coef[2, c])
            o += s_


@njit(inline="always")
def _run_bred_body(dy, x, o, s, m):
    s1 = _zero(m)
    s2 = _zero(m)
    for i in range(o, o + s):
        g = _ld(dy[_u(i)])
        s1 += g
        s2 += g * (_ld(x[_u(i)]) - m)
    return np.float64(s1), np.float64(s2)


@njit(fastmath=_REDUCE_MATH)
def _run_bred(dy, x, o, s, m):
    """(sum dy, sum dy * (x - m)), m in the compute dtype (from a typed zero: sum dy stays
    finite when m is not)."""
    return _run_bred_body(dy, x, o, s, m)


@njit(inline="always")
def _run_bred4_body(dy, x, o, st, s, m):
    """:func:`_run_bred` over four runs ``st`` apart (see :func:`_run_dev4_body`)."""
    s1 = _zero(m)
    s2 = _zero(m)
    for i in range(o, o + s):
        g0 = _ld(dy[_u(i)])
        g1 = _ld(dy[_u(i + st)])
        g2 = _ld(dy[_u(i + 2 * st)])
        g3 = _ld(dy[_u(i + 3 * st)])
        s1 += (g0 + g1) + (g2 + g3)
        s2 += ((g0 * (_ld(x[_u(i)]) - m) + g1 * (_ld(x[_u(i + st)]) - m))
               + (g2 * (_ld(x[_u(i + 2 * st)]) - m) + g3 * (_ld(x[_u(i + 3 * st)]) - m)))
    return np.float64(s1), np.float64(s2)


# One batch row's runs of channels [c0, c1) into sdy, sdx (``_runs_bred4``: four rows' runs
# a pass), the run loop inlined as in _runs_dev
@njit(fastmath=_REDUCE_MATH)
def _runs_bred(dy, x, o, s_, c0, c1, mean, sdy, sdx, like):
    for c in range(c0, c1):
        u, v = _run_bred_body(dy, x, o, s_, _as(mean[c], like))
        sdy[c] += u
        sdx[c] += v
        o += s_


@njit(fastmath=_REDUCE_MATH)
def _runs_bred4(dy, x, o, stride, s_, c0, c1, mean, sdy, sdx, like):
    for c in range(c0, c1):
        u, v = _run_bred4_body(dy, x, o, stride, s_, _as(mean[c], like))
        sdy[c] += u
        sdx[c] += v
        o += s_


@njit(inline="always")
def _xterm(x, hi, b):
    """dx's ``(x - mean) * b`` term: exactly 0 where ``b`` is (eval), so that a NaN or
    infinite x does not reach dx = w * invstd * dy, which does not depend on x."""
    return (x - hi) * b if b != 0 else b


@njit(inline="always")
def _run_bapply_body(dy, x, xo, dx, yo, s, hi, a, b, k):
    for i in range(s):
        j = _u(xo + i)
        dx[_u(yo + i)] = _st(a * (_xterm(_ld(x[j]), hi, b) + (_ld(dy[j]) + k)), dx)


@njit(inline="always")
def _chunk_bapply(dy, x, o, buf, a, b, s_, c0, coef):
    """buf[:b - a] = dx at [o + a, o + b), as _chunk_norm (inlined into _task_bapply)."""
    p = a
    while p < b:
        j, q = _piece(p, b, s_)
        c = c0 + j
        _run_bapply_body(dy, x, o + p, buf, p - a, q - p, coef[0, c], coef[1, c], coef[2, c],
                         coef[3, c])
        p = q


@njit(fastmath=_ELEM_MATH)
def _runs_bapply(dy, x, dx, stride, s_, c0, c1, n0, n1, coef):
    """A task's whole runs, the loop body inlined (as _runs_norm)."""
    for n in range(n0, n1):
        o = n * stride + c0 * s_
        for c in range(c0, c1):
            _run_bapply_body(dy, x, o, dx, o, s_, coef[0, c], coef[1, c], coef[2, c],
                             coef[3, c])
            o += s_


# ---- row mode (channels last): a task's rows [n0, n1) are contiguous --------------------
# k consecutive rows form a super-row of w = k * C values (at least ROW_TILE), processed with
# per-position accumulators / coefficients tiled k times: long vectorized loops even for a
# few channels, no horizontal reductions inside. The loops below cover ``rows`` super-rows of
# width ``w`` from offset ``o`` (or ``xo``/``yo`` for input/output, ``co`` into the
# coefficient tiles); the last, partial super-row is a call with a smaller ``w``.


# The loops take four super-rows a pass (then the rest one at a time): the per-position
# accumulators and coefficients are then loaded and stored once per four rows instead of once
# per row, which bounded these loops (one thread, a 3.2 MB input in L3: the centred sums
# 141 -> 103 us; ATen's plain sum 52 us).


@njit(fastmath=_ELEM_MATH)
def _rows_sum(x, o, w, rows, acc):
    acc[:w] = 0.0
    r4 = 0
    while r4 + 4 <= rows:
        p = o + r4 * w
        for j in range(w):
            acc[_u(j)] += ((_ld(x[_u(p + j)]) + _ld(x[_u(p + w + j)]))
                           + (_ld(x[_u(p + 2 * w + j)]) + _ld(x[_u(p + 3 * w + j)])))
        r4 += 4
    for r in range(r4, rows):
        p = o + r * w
        for j in range(w):
            acc[_u(j)] += _ld(x[_u(p + j)])


@njit(fastmath=_ELEM_MATH)
def _rows_dev(x, o, w, rows, m, q1, q2):
    """The centred sums take eight super-rows a pass, not four: read from memory, that was
    5-15% faster on one thread over the ResNet-50 channels-last shapes (the accumulators
    loaded and stored half as often; the backward's _rows_bred, with two inputs, was
    slower with eight, 2-22%: benchmarks/RESULTS.md, session 22)."""
    q1[:w] = 0.0
    q2[:w] = 0.0
    r8 = 0
    while r8 + 8 <= rows:
        p = o + r8 * w
        for j in range(w):
            mj = m[_u(j)]
            d0 = _ld(x[_u(p + j)]) - mj
            d1 = _ld(x[_u(p + w + j)]) - mj
            d2 = _ld(x[_u(p + 2 * w + j)]) - mj
            d3 = _ld(x[_u(p + 3 * w + j)]) - mj
            d4 = _ld(x[_u(p + 4 * w + j)]) - mj
            d5 = _ld(x[_u(p + 5 * w + j)]) - mj
            d6 = _ld(x[_u(p + 6 * w + j)]) - mj
            d7 = _ld(x[_u(p + 7 * w + j)]) - mj
            q1[_u(j)] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            q2[_u(j)] += (((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3))
                          + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)))
        r8 += 8
    for r in range(r8, rows):
        p = o + r * w
        for j in range(w):
            d = _ld(x[_u(p + j)]) - m[_u(j)]
            q1[_u(j)] += d
            q2[_u(j)] += d * d


@njit(fastmath=_ELEM_MATH)
def _rows_norm(x, xo, y, yo, w, rows, hi, sc, sh, co, fold):
    """``rows`` super-rows of width ``w``: x from xo, y from yo, coefficients from co. The
    coefficients must be separate contiguous arrays (not rows of one 2-D array, which made
    this loop ~1.6x slower).

    ``fold``: every ``hi`` is 0 (the folded coefficients, see _coef3): the loop skips ``hi``,
    the same bits with one coefficient stream fewer (LLVM unswitches the loop on the flag,
    one copy each; from memory, one thread, the two-stream copy was 17-35% faster)."""
    for r in range(rows):
        p = xo + r * w
        q = yo + r * w
        for j in range(w):
            k = _u(co + j)
            v = _ld(x[_u(p + j)])
            if not fold:
                v = v - hi[k]
            y[_u(q + j)] = _st(v * sc[k] + sh[k], y)


@njit(inline="always")
def _all_zero(v):
    for i in range(v.size):
        if v[i] != 0:
            return False
    return True


@njit(fastmath=_ELEM_MATH)
def _rows_bred(dy, x, o, w, rows, m, q1, q2):
    q1[:w] = 0.0
    q2[:w] = 0.0
    r4 = 0
    while r4 + 4 <= rows:
        p = o + r4 * w
        for j in range(w):
            mj = m[_u(j)]
            g0 = _ld(dy[_u(p + j)])
            g1 = _ld(dy[_u(p + w + j)])
            g2 = _ld(dy[_u(p + 2 * w + j)])
            g3 = _ld(dy[_u(p + 3 * w + j)])
            q1[_u(j)] += (g0 + g1) + (g2 + g3)
            q2[_u(j)] += ((g0 * (_ld(x[_u(p + j)]) - mj) + g1 * (_ld(x[_u(p + w + j)]) - mj))
                          + (g2 * (_ld(x[_u(p + 2 * w + j)]) - mj)
                             + g3 * (_ld(x[_u(p + 3 * w + j)]) - mj)))
        r4 += 4
    for r in range(r4, rows):
        p = o + r * w
        for j in range(w):
            g = _ld(dy[_u(p + j)])
            q1[_u(j)] += g
            q2[_u(j)] += g * (_ld(x[_u(p + j)]) - m[_u(j)])


@njit(fastmath=_ELEM_MATH)
def _rows_bapply(dy, x, xo, dx, yo, w, rows, hi, a, b, k, co, fold):
    """As _rows_norm (``fold`` included: every ``hi`` 0, see _bwd_finish), for dx."""
    for r in range(rows):
        p = xo + r * w
        q = yo + r * w
        for j in range(w):
            i = _u(p + j)
            c = _u(co + j)
            v = _ld(x[i])
            h = _zero(v) if fold else hi[c]  # (v - 0 is v: the fold copy reads no hi)
            dx[_u(q + j)] = _st(a[c] * (_xterm(v, h, b[c]) + (_ld(dy[i]) + k[c])), dx)


@njit(fastmath=_ELEM_MATH)
def _fold_add(acc, v, w, c_):
    """acc[c] += sum over the tiles of v[:w] of channel c (float64 accumulators). Unsigned
    indices (see _u): with numba's negative-index checks the loop ran scalar, 0.65 us for
    1024 values, 10x the vectorized loop's, and a channels-last task folds three times: at
    12 tasks for a 3.2 MB input that was a sixth of the statistics pass
    (benchmarks/RESULTS.md, session 25). Same bits: each acc[c] adds its tiles in order."""
    for t in range(0, w, c_):
        for c in range(c_):
            acc[_u(c)] += np.float64(v[_u(t + c)])


@njit(inline="always")
def _tile(coef, i, k):
    """coef[i] repeated k times: a contiguous (k * C,) array (inline: called with each row's
    literal index, it was compiled once per index)."""
    c_ = coef.shape[1]
    out = np.empty(k * c_, coef.dtype)
    for t in range(k):  # (unsigned indices: 0.07 us for 1024 values, slice copies 0.24-0.41)
        for c in range(c_):
            out[_u(t * c_ + c)] = coef[i, _u(c)]
    return out


@njit(inline="always")
def _row_geometry(c_, n0, n1):
    """(rows per super-row, its width, full super-rows, rows left over, offset)."""
    k = max(1, ROW_TILE // c_)
    full, rem = divmod(n1 - n0, k)
    return k, k * c_, full, rem, n0 * c_


@njit
def _rows_stats(x, c_, n0, n1, mean, m2, like):
    """Channels-last _task_stats (all channels): shift from the first super-rows, then the
    centred sums, flushed to float64 every ROW_SEGMENT values."""
    k, w, full, rem, o = _row_geometry(c_, n0, n1)
    seg = max(1, ROW_SEGMENT // w)
    q1 = np.empty(w, like.dtype)
    q2 = np.empty(w, like.dtype)
    mean[:] = 0.0
    m2[:] = 0.0
    # the shift: mean of the first super-rows (SEGMENT values, at least one super-row):
    # within a few standard deviations of the mean is all the centred sums need
    first = min(max(1, SEGMENT // w), full)
    if first > 0:
        _rows_sum(x, o, w, first, q1)
        _fold_add(mean, q1, w, c_)
        n_first = first * k
    else:
        _rows_sum(x, o, rem * c_, _I1, q1)
        _fold_add(mean, q1, rem * c_, c_)
        n_first = rem
    shift = np.empty(w, like.dtype)
    for c in range(c_):
        shift[c] = _finite_or_zero(mean[c] / n_first)
        mean[c] = 0.0
    for t in range(c_, w, c_):
        shift[t:t + c_] = shift[:c_]
    for a in range(0, full, seg):
        b = min(a + seg, full)
        _rows_dev(x, o + a * w, w, b - a, shift, q1, q2)
        _fold_add(mean, q1, w, c_)
        _fold_add(m2, q2, w, c_)
    if rem > 0:
        _rows_dev(x, o + full * w, rem * c_, _I1, shift, q1, q2)
        _fold_add(mean, q1, rem * c_, c_)
        _fold_add(m2, q2, rem * c_, c_)
    cnt = np.float64(n1 - n0)
    for c in range(c_):
        s1 = mean[c]
        mean[c] = np.float64(shift[c]) + s1 / cnt
        m2[c] = m2[c] - s1 * s1 / cnt
    return cnt


@njit
def _rows_task_norm(x, y, c_, n0, n1, coef, stream):
    k, w, full, rem, o = _row_geometry(c_, n0, n1)
    folded = _all_zero(coef[0])
    sc, sh = _tile(coef, 1, k), _tile(coef, 2, k)
    hi = sc if folded else _tile(coef, 0, k)
    if stream:
        buf = np.empty(STREAM_CHUNK, y.dtype)
        base = _first_index(y)
        for r in range(full + (rem > 0)):
            p = o + r * w
            end = w if r < full else rem * c_
            a = 0
            while a < end:
                b = _chunk_end(base + p, a, end)
                _rows_norm(x, p + a, buf, _I0, b - a, _I1, hi, sc, sh, a, folded)
                _stream(buf, y, p + a, b - a)
                a = b
        return
    _rows_norm(x, o, y, o, w, full, hi, sc, sh, _I0, folded)
    if rem > 0:
        _rows_norm(x, o + full * w, y, o + full * w, rem * c_, _I1, hi, sc, sh, _I0, folded)


@njit
def _rows_task_bred(dy, x, c_, n0, n1, mean, sdy, sdx, like):
    _, w, full, rem, o = _row_geometry(c_, n0, n1)
    seg = max(1, ROW_SEGMENT // w)
    m = np.empty(w, like.dtype)
    for t in range(0, w, c_):
        for c in range(c_):
            m[_u(t + c)] = mean[_u(c)]
    q1 = np.empty(w, like.dtype)
    q2 = np.empty(w, like.dtype)
    sdy[:] = 0.0
    sdx[:] = 0.0
    for a in range(0, full, seg):
        b = min(a + seg, full)
        _rows_bred(dy, x, o + a * w, w, b - a, m, q1, q2)
        _fold_add(sdy, q1, w, c_)
        _fold_add(sdx, q2, w, c_)
    if rem > 0:
        _rows_bred(dy, x, o + full * w, rem * c_, _I1, m, q1, q2)
        _fold_add(sdy, q1, rem * c_, c_)
        _fold_add(sdx, q2, rem * c_, c_)


@njit
def _rows_task_bapply(dy, x, dx, c_, n0, n1, coef, stream):
    k, w, full, rem, o = _row_geometry(c_, n0, n1)
    folded = _all_zero(coef[0])
    a_, b_, k_ = _tile(coef, 1, k), _tile(coef, 2, k), _tile(coef, 3, k)
    hi = a_ if folded else _tile(coef, 0, k)
    if stream:
        buf = np.empty(STREAM_CHUNK, dx.dtype)
        base = _first_index(dx)
        for r in range(full + (rem > 0)):
            p = o + r * w
            end = w if r < full else rem * c_
            a = 0
            while a < end:
                b = _chunk_end(base + p, a, end)
                _rows_bapply(dy, x, p + a, buf, _I0, b - a, _I1, hi, a_, b_, k_, a, folded)
                _stream(buf, dx, p + a, b - a)
                a = b
        return
    _rows_bapply(dy, x, o, dx, o, w, full, hi, a_, b_, k_, _I0, folded)
    if rem > 0:
        q = o + full * w
        _rows_bapply(dy, x, q, dx, q, rem * c_, _I1, hi, a_, b_, k_, _I0, folded)


# ---- one task: channels [c0, c1) x batch rows [n0, n1) ------------------------------------
# s_ > 1: run mode; s_ == 1: row mode (always one block of all channels).


@njit
def _task_stats(x, c_, s_, c0, c1, n0, n1, mean, m2, like):
    """Count, and float64 mean[c], m2[c] for c in [c0, c1), over rows [n0, n1).

    Centred sums around a shift: the shift is the mean of the task's first segment (two
    passes over that segment, the second from cache); every value is then read once for
    ``S1 = sum(x - shift)`` and ``S2 = sum((x - shift)^2)``, and ``mean = shift + S1 / n``,
    ``M2 = S2 - S1^2 / n``. The shift is within a few standard deviations of the
    mean, so the correction term is tiny and nothing cancels (unlike ``E[x^2] - E[x]^2``).
    Sums run in the compute dtype over one run (four runs when they hold at most
    FOUR_RUNS_MAX values; one segment in row mode), in float64 beyond; runs longer than
    ROW_SEGMENT values in pieces of that size (:func:`_task_stats_long`).
    """
    if s_ == 1:
        return _rows_stats(x, c_, n0, n1, mean, m2, like)
    if s_ > ROW_SEGMENT:
        return _task_stats_long(x, c_, s_, c0, c1, n0, n1, mean, m2, like)
    g = c1 - c0
    stride = c_ * s_
    first = min(max(1, SEGMENT // (g * s_)), n1 - n0)
    k = np.float64(first * s_)
    o = n0 * stride + c0 * s_
    shift = np.empty(g, like.dtype)
    for j in range(g):
        tot = 0.0
        for n in range(first):
            tot += _run_sum(x, o + n * stride + j * s_, s_, like)
        shift[j] = _finite_or_zero(tot / k)
        mean[c0 + j] = 0.0
        m2[c0 + j] = 0.0
    n4 = n0
    if 4 * s_ <= FOUR_RUNS_MAX:  # four batch rows a pass
        while n4 + 4 <= n1:
            _runs_dev4(x, n4 * stride + c0 * s_, stride, s_, c0, c1, shift, mean, m2)
            n4 += 4
    for n in range(n4, n1):
        _runs_dev(x, n * stride + c0 * s_, s_, c0, c1, shift, mean, m2)
    cnt = np.float64((n1 - n0) * s_)
    for j in range(g):
        s1 = mean[c0 + j]
        mean[c0 + j] = np.float64(shift[j]) + s1 / cnt
        m2[c0 + j] = m2[c0 + j] - s1 * s1 / cnt
    return cnt


# Runs longer than ROW_SEGMENT values (a volume at batch size 1) are summed in pieces of
# ROW_SEGMENT values, merged in float64: summed in float32 alone, a run of 2M values gave
# output errors 20-100x torch's. Separate functions, chosen once per task: a piece loop in
# the common path made the 7x7 layers' reductions 15-25% slower.


@njit
def _task_stats_long(x, c_, s_, c0, c1, n0, n1, mean, m2, like):
    """:func:`_task_stats` for runs of more than ROW_SEGMENT values (the shift: the mean of
    the first piece of each channel's first run)."""
    stride = c_ * s_
    cnt = np.float64((n1 - n0) * s_)
    for c in range(c0, c1):
        o = n0 * stride + c * s_
        shift = _as(_finite_or_zero(_run_sum(x, o, _ROW_SEGMENT, like) / ROW_SEGMENT),
                    like)
        s1 = 0.0
        s2 = 0.0
        for n in range(n0, n1):
            p = n * stride + c * s_
            for a in range(0, s_, ROW_SEGMENT):
                u, v = _run_dev(x, p + a, min(ROW_SEGMENT, s_ - a), shift)
                s1 += u
                s2 += v
        mean[c] = np.float64(shift) + s1 / cnt
        m2[c] = s2 - s1 * s1 / cnt
    return cnt


@njit
def _task_bred_long(dy, x, c_, s_, c0, c1, n0, n1, mean, sdy, sdx, like):
    """:func:`_task_bred` for runs of more than ROW_SEGMENT values."""
    stride = c_ * s_
    for c in range(c0, c1):
        m = _as(mean[c], like)
        sdy[c] = 0.0
        sdx[c] = 0.0
        for n in range(n0, n1):
            p = n * stride + c * s_
            for a in range(0, s_, ROW_SEGMENT):
                u, v = _run_bred(dy, x, p + a, min(ROW_SEGMENT, s_ - a), m)
                sdy[c] += u
                sdx[c] += v


@njit(fastmath=_ELEM_MATH)
def _task_norm(x, y, c_, s_, c0, c1, n0, n1, coef, stream):
    if s_ == 1:
        _rows_task_norm(x, y, c_, n0, n1, coef, stream)
        return
    stride = c_ * s_
    if stream:
        # each batch row's block [c0, c1) is one contiguous range, cut into aligned chunks
        buf = np.empty(STREAM_CHUNK, y.dtype)
        base = _first_index(y)
        end = (c1 - c0) * s_
        for n in range(n0, n1):
            o = n * stride + c0 * s_
            a = 0
            while a < end:
                b = _chunk_end(base + o, a, end)
                _chunk_norm(x, o, buf, a, b, s_, c0, coef)
                _stream(buf, y, o + a, b - a)
                a = b
        return
    _runs_norm(x, y, stride, s_, c0, c1, n0, n1, coef)


@njit
def _task_bred(dy, x, c_, s_, c0, c1, n0, n1, mean, sdy, sdx, like):
    """float64 sum_dy[c], sum_dy_xmu[c] for c in [c0, c1) over rows [n0, n1)."""
    if s_ == 1:
        _rows_task_bred(dy, x, c_, n0, n1, mean, sdy, sdx, like)
        return
    if s_ > ROW_SEGMENT:
        _task_bred_long(dy, x, c_, s_, c0, c1, n0, n1, mean, sdy, sdx, like)
        return
    stride = c_ * s_
    for c in range(c0, c1):
        sdy[c] = 0.0
        sdx[c] = 0.0
    n4 = n0
    if 4 * s_ <= FOUR_RUNS_MAX:  # four batch rows a pass, as in _task_stats
        while n4 + 4 <= n1:
            _runs_bred4(dy, x, n4 * stride + c0 * s_, stride, s_, c0, c1, mean, sdy, sdx,
                        like)
            n4 += 4
    for n in range(n4, n1):
        _runs_bred(dy, x, n * stride + c0 * s_, s_, c0, c1, mean, sdy, sdx, like)


@njit(fastmath=_ELEM_MATH)
def _task_bapply(dy, x, dx, c_, s_, c0, c1, n0, n1, coef, stream):
    if s_ == 1:
        _rows_task_bapply(dy, x, dx, c_, n0, n1, coef, stream)
        return
    stride = c_ * s_
    if stream:  # as in _task_norm
        buf = np.empty(STREAM_CHUNK, dx.dtype)
        base = _first_index(dx)
        end = (c1 - c0) * s_
        for n in range(n0, n1):
            o = n * stride + c0 * s_
            a = 0
            while a < end:
                b = _chunk_end(base + o, a, end)
                _chunk_bapply(dy, x, o, buf, a, b, s_, c0, coef)
                _stream(buf, dx, o + a, b - a)
                a = b
        return
    _runs_bapply(dy, x, dx, stride, s_, c0, c1, n0, n1, coef)


@njit(fastmath=_ELEM_MATH)
def _combine(pm, pq, n_, s_, c0, c1):
    """Merge the parts' (mean, M2) of channels [c0, c1) (Chan et al., all parts at once):
    ``mean = sum(n_p mean_p) / n``, ``M2 = sum(M2_p) + sum(n_p (mean_p - mean)^2)``. Deltas
    are taken against the combined mean, so nothing large cancels; loops run along the
    channels (vectorized), parts in a fixed order."""
    g = c1 - c0
    mu = np.zeros(g)
    q = np.zeros(g)
    parts = pm.shape[0]
    inv_n = 1.0 / np.float64(n_ * s_)
    for p in range(parts):
        n0, n1 = _span(n_, parts, p)
        w = np.float64((n1 - n0) * s_) * inv_n
        for j in range(g):
            mu[j] += w * pm[p, c0 + j]
    for p in range(parts):
        n0, n1 = _span(n_, parts, p)
        k = np.float64((n1 - n0) * s_)
        for j in range(g):
            d = pm[p, c0 + j] - mu[j]
            q[j] += pq[p, c0 + j] + k * d * d
    return mu, q


@njit
def _bwd_finish(mean, invstd, weight, sum_dy, sum_dy_xmu, dweight, count, do_reduce, training,
                pm, pq, coef, c0, c1):
    """Add up the float64 partial sums in order (when reducing), write the sums (and
    dweight), then the coefficients of channels [c0, c1)."""
    g = c1 - c0
    sdy = np.zeros(g)
    sdx = np.zeros(g)
    if do_reduce:
        for p in range(pm.shape[0]):
            for j in range(g):
                sdy[j] += pm[p, c0 + j]
                sdx[j] += pq[p, c0 + j]
    else:
        for j in range(g):
            sdy[j] = sum_dy[c0 + j]
            sdx[j] = sum_dy_xmu[c0 + j]
    for c in range(c0, c1):
        u, v = sdy[c - c0], sdx[c - c0]
        if do_reduce:
            sum_dy[c] = u
            sum_dy_xmu[c] = v
            if dweight.size > 0:
                dweight[c] = v * np.float64(invstd[c])
        # coef[:, c] = (hi, a, b, k) of dx = a * (dy + b * (x - hi) + k): a = w * invstd, in
        # training b = -invstd^2 * sum_dy_xmu / count and k = -sum_dy / count - b * lo (both
        # 0 in eval), lo = mean - hi the mean's rounding to the compute dtype. The terms in
        # the parentheses are of the size of dy and cancel there, before the scaling by a
        # (which can be large), as in the textbook form.
        mu = np.float64(mean[c])
        inv = np.float64(invstd[c])
        b = -inv * inv * v / count if training else 0.0
        coef[1, c] = inv * np.float64(weight[c]) if weight.size > 0 else inv
        br = np.float64(_as(b, coef))
        coef[2, c] = br
        k = -u / count if training else 0.0
        # Folded as the forward's coefficients are (_coef3) where the mean is within FOLD_Z
        # standard deviations of 0: hi = 0 and k' = k - b * mean with the rounded b, so that
        # b's rounding still multiplies x - mean; |b * mean| <= FOLD_Z * rms(dy), a few ulps
        # of dx's scale. (In eval b is 0 and hi unused: always folded.)
        if br == 0.0 or _folds(mu, inv, br):
            coef[0, c] = 0.0
            coef[3, c] = k - br * mu if br != 0.0 else k
            continue
        hi = _as(mu, coef)
        coef[0, c] = hi
        # (with an inf in dy, b is infinite and b * lo would make every dx of the channel
        # NaN, where torch's form gives inf or NaN by the sign of x - mean)
        coef[3, c] = k - _finite_or_zero(b * (mu - np.float64(hi)))


@njit(inline="always")
def _merge_range(k, c_):
    """Channels [a, b) of phase 1's unit k."""
    return k * MERGE_CHUNK, min(c_, (k + 1) * MERGE_CHUNK)


@njit
def _merge_unit(k, n_, c_, s_, do_stats, pm, pq, mean, m2, invstd, var_in, rmean, rvar,
                new_rmean, new_rvar, eps, momentum, weight, bias, coef):
    """The forward's phase-1 unit k: merge the parts' statistics of its channels and write
    their coefficients (or, without statistics, the coefficients from the given ones)."""
    a, b = _merge_range(k, c_)
    if do_stats:
        mu, q = _combine(pm, pq, n_, s_, a, b)
        _train_coefs(a, b, np.float64(n_ * s_), mu, q, a, mean, m2, invstd, rmean, rvar,
                     new_rmean, new_rvar, eps, momentum, weight, bias, coef)
    else:
        _given_coefs(a, b, mean, invstd, var_in, eps, weight, bias, coef)


# ---- kernels ------------------------------------------------------------------------------
# Units [0, units) of one phase, claimed one at a time from ``ctl`` (see _claim): every
# thread of a phase runs the kernel, and they share its units:
#   phase 0: reductions into per-part partials; with parts == 1 the whole job instead (each
#            channel block reduced, then written while it is in cache);
#   phase 1: merge the partials and compute per-channel coefficients, MERGE_CHUNK channels
#            a unit;
#   phase 2: the elementwise pass (tasks walked backwards: the reduction touched the last
#            tasks last, so they may still be in cache; rows stay in ascending order within
#            a task, which the prefetchers need).
# Their packed arguments (see numba_entry), in order: s = storage-dtype array, a =
# accumulation-dtype array, d = float64 array (each with its rank), i int, f float, b bool.
PACKED = {
    "forward": "s1 s1 i i i i i a1 a1 a1 a1 a1 a1 a1 a1 a1 a1 f f b b b d2 d2 a2",
    "backward": "s1 s1 s1 i i i i i a1 a1 a1 a1 a1 a1 f b b b b d2 d2 a2",
}
# Arguments shared by both kernels: flat ``x``/``y``/``dy``/``dx`` of the storage dtype; the
# logical shape (n, c, s); tasks ``blocks`` x ``parts`` (task t: channel block t // parts,
# batch part t % parts). Per-channel arrays are 1-D of the accumulation dtype (float32, or
# float64 for float64 input); an optional one (weight, bias, running stats, var_in, dweight)
# has size 0 when absent; outputs not asked for are never written. ``pm``/``pq`` (float64,
# (parts, C)) hold the partials of each batch part, ``coef`` (compute dtype, (3 or 4, C)) the
# elementwise pass's coefficients, ``ctl`` (int64, CTL_SIZE, zeroed per phase) the unit
# counters that the call's threads share.


@njit(inline="always")
def forward(x, y, n_, c_, s_, blocks, parts, mean, m2, invstd, var_in, weight, bias, rmean,
            rvar, new_rmean, new_rvar, eps, momentum, do_stats, do_apply, stream, pm, pq, coef,
            phase, units, ctl):
    """BatchNorm forward.

    ``do_stats``: batch statistics -> ``mean``, ``m2``, ``invstd`` (and the running update
    into ``new_rmean``/``new_rvar`` when ``rmean`` is given). Otherwise ``mean`` and
    ``invstd`` (or ``var_in`` with ``eps``, when given) are inputs. ``do_apply``: write
    ``y = (x - mean) * invstd * weight + bias``. ``stream``: write ``y`` with non-temporal
    stores (for outputs much larger than the caches).
    """
    n = units
    k = _claim(ctl, n)
    while k < n:
        if phase == 0:
            t = k
            c0, c1 = _span(c_, blocks, t // parts)
            n0, n1 = _span(n_, parts, t % parts)
            if do_stats:
                cnt = _task_stats(x, c_, s_, c0, c1, n0, n1, pm[t % parts], pq[t % parts],
                                  coef)
            if parts == 1:
                if do_stats:
                    _train_coefs(c0, c1, cnt, pm[0], pq[0], _I0, mean, m2, invstd, rmean, rvar,
                                 new_rmean, new_rvar, eps, momentum, weight, bias, coef)
                else:
                    _given_coefs(c0, c1, mean, invstd, var_in, eps, weight, bias, coef)
                if do_apply:
                    _task_norm(x, y, c_, s_, c0, c1, n0, n1, coef, stream)
        elif phase == 1:
            _merge_unit(k, n_, c_, s_, do_stats, pm, pq, mean, m2, invstd, var_in, rmean,
                        rvar, new_rmean, new_rvar, eps, momentum, weight, bias, coef)
        else:
            t = units - 1 - k
            c0, c1 = _span(c_, blocks, t // parts)
            n0, n1 = _span(n_, parts, t % parts)
            _task_norm(x, y, c_, s_, c0, c1, n0, n1, coef, stream)
        _unit_done(ctl, stream)
        k = _claim(ctl, n)


@njit(inline="always")
def backward(dy, x, dx, n_, c_, s_, blocks, parts, mean, invstd, weight, sum_dy, sum_dy_xmu,
             dweight, count, do_reduce, do_apply, training, stream, pm, pq, coef, phase,
             units, ctl):
    """BatchNorm backward.

    ``do_reduce``: ``sum_dy`` and ``sum_dy_xmu = sum(dy * (x - mean))`` (and ``dweight =
    sum_dy_xmu * invstd`` when ``dweight`` is given); otherwise the sums are inputs.
    ``do_apply``: ``dx = w * invstd * (dy - sum_dy / count - (x - mean) * invstd^2 *
    sum_dy_xmu / count)`` in training, ``dx = w * invstd * dy`` otherwise. ``count`` is the
    number of values per channel the statistics came from (all ranks for SyncBatchNorm).
    ``stream``: write ``dx`` with non-temporal stores.
    """
    n = units
    k = _claim(ctl, n)
    while k < n:
        if phase == 0:
            t = k
            c0, c1 = _span(c_, blocks, t // parts)
            n0, n1 = _span(n_, parts, t % parts)
            if do_reduce:
                _task_bred(dy, x, c_, s_, c0, c1, n0, n1, mean, pm[t % parts], pq[t % parts],
                           coef)
            if parts == 1:
                _bwd_finish(mean, invstd, weight, sum_dy, sum_dy_xmu, dweight, count,
                            do_reduce, training, pm, pq, coef, c0, c1)
                if do_apply:
                    _task_bapply(dy, x, dx, c_, s_, c0, c1, n0, n1, coef, stream)
        elif phase == 1:
            a, b = _merge_range(k, c_)
            _bwd_finish(mean, invstd, weight, sum_dy, sum_dy_xmu, dweight, count, do_reduce,
                        training, pm, pq, coef, a, b)
        else:
            t = units - 1 - k
            c0, c1 = _span(c_, blocks, t // parts)
            n0, n1 = _span(n_, parts, t % parts)
            _task_bapply(dy, x, dx, c_, s_, c0, c1, n0, n1, coef, stream)
        _unit_done(ctl, stream)
        k = _claim(ctl, n)
