"""Fused BatchNorm + activation (+ residual) kernels for CPU, written with numba.

``y = act((x - mean) * invstd * weight + bias + residual)`` forward and its backward, built on
the statistics helpers, task partition and storage conversions of :mod:`.numba_kernels` (see
its docstring for the ``(n, c, s)`` views, run mode vs row mode, the phases and the numerics).
The pass structure is the plain BatchNorm kernels' own:

* forward: statistics (centred sums, Chan merge, running update), then one elementwise pass
  that normalizes, adds the residual and applies the activation; with one batch part per
  task a channel block is reduced and then written while it is still in cache;
* backward: one reduction of ``sum(dz)`` and ``sum(dz * xhat)`` with ``dz = dy * act'(z)``,
  then one elementwise pass writing ``dx`` and ``dresidual = dz``. ``z`` and ``xhat`` are
  recomputed: from ``x`` in normal mode (``xhat = (x - mean) * invstd``,
  ``z = xhat * w + b + r``), from the output ``y`` in in-place mode (``z = act^-1(y)``,
  ``xhat = (z - r - b) / w``, ``act'`` through ``y``). With a residual in normal mode the
  reduction writes ``dresidual = dz`` itself and the elementwise pass reads it back (``x``
  and ``dz``: two inputs instead of ``x``, ``dy`` and ``r``), unless the outputs are
  streamed (see ``backward_act``). With the activation mask (relu, leaky_relu; see "the
  activation mask" below) the forward also writes z's sign as bits, and the backward reads
  them instead of ``r``.

Activations (codes): 0 identity, 1 relu, 2 leaky_relu(slope), 3 elu (alpha 1), 4 silu,
5 gelu (exact, erf). Every loop is compiled once per activation kind, with the kind a
constant (see ``_by_flags``); :func:`kernels` builds the kernels for a set of kinds: this
module's ``forward_act`` / ``backward_act`` hold the piecewise-linear ones (0-2, one kind),
``numba_smooth_kernels`` elu, silu and gelu, whose float32 exp, expm1 and erf are written
here so that LLVM vectorizes them (float64 calls libm). Compute is float32 (float64 for
float64 storage); per-run sums are in the compute dtype, everything beyond in float64 (the
statistics: see numba_kernels); results do not depend on the thread count.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .numba_kernels import (
    _I0,
    _REDUCE_MATH,
    ROW_SEGMENT,
    STREAM_CHUNK,
    _chunk_end,
    _claim,
    _finite_or_zero,
    _first_index,
    _given_coefs,
    _ld,
    _merge_range,
    _merge_unit,
    _piece,
    _put,
    _span,
    _st,
    _stream,
    _task_stats,
    _train_coefs,
    _u,
    _unit_done,
    _xterm,
    _zero,
    njit,
)

__all__ = ["ACT_CODES", "PACKED", "backward_act", "forward_act", "kernels"]

ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "silu": 4, "gelu": 5}
_ELEM_MATH = {"contract"}
# The backward's channels-first elementwise pass is compiled twice (a task's whole runs, and
# the pieces of a streamed chunk); without contraction both round alike, where LLVM fused
# different multiply-adds in each (dx differed by an ulp between streamed and plain stores)
_EXACT_MATH: set[str] = set()
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _k(v, z):
    """The constant ``v`` in the float type of ``z`` (keeps float32 math in float32)."""


@overload(_k)
def _k_impl(v, z):
    if z == types.float32:
        return lambda v, z: np.float32(v)
    return lambda v, z: np.float64(v)


# ---- activation math (scalar, compute dtype) ----------------------------------------------
# float32 exp, expm1 and erf written as straight-line arithmetic that LLVM vectorizes (libm's
# are calls, one element at a time: silu over 2^18 float32 values in cache took 474 us with
# np.exp, 50 us with _exp32, as torch's silu); float64 keeps libm. Selects, not min/max or
# np.rint, which numba compiles to calls.


@intrinsic
def _i32_as_f32(typingctx, v):
    """The float32 whose bits are the int32 ``v``."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always")
def _exp32(x):
    """exp(x) in float32 to about 1 ulp: 2^k * e^r, k = round(x / ln 2), r = x - k ln 2 in
    two parts, e^r by a degree-6 polynomial; inf
    above 88.72, 0 below -87.34 (where float32 has only subnormals), NaN at NaN."""
    hi_x, lo_x = np.float32(88.72283), np.float32(-87.33654)
    c = lo_x if x < lo_x else (hi_x if x > hi_x else x)
    t = c * np.float32(1.44269504088896341)
    # round to nearest through an integer conversion (the add-and-subtract 1.5 * 2^23 trick
    # would be folded away in loops compiled with reassociation, the reductions)
    # (a NaN t is rounded as 0: converting NaN to an integer is undefined in LLVM; r stays NaN)
    t = t if t == t else np.float32(0.0)
    ki = np.int32(t + (np.float32(0.5) if t >= 0 else np.float32(-0.5)))
    k = np.float32(ki)
    r = c - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    # 2^k as two normal halves (k in [-126, 128] would leave the exponent's range alone)
    k1 = ki >> np.int32(1)
    k2 = ki - k1
    e = (p * r * r + r + np.float32(1.0)) * _i32_as_f32((k1 + np.int32(127)) << np.int32(23))
    e = e * _i32_as_f32((k2 + np.int32(127)) << np.int32(23))
    if x > hi_x:
        return np.float32(np.inf)
    return np.float32(0.0) if x < lo_x else e


@njit(inline="always")
def _expm1_32(x):
    """expm1(x) in float32: a Taylor polynomial near 0 (where exp(x) - 1 cancels), else
    exp(x) - 1."""
    t = np.float32(1.0 / 5040.0)
    t = t * x + np.float32(1.0 / 720.0)
    t = t * x + np.float32(1.0 / 120.0)
    t = t * x + np.float32(1.0 / 24.0)
    t = t * x + np.float32(1.0 / 6.0)
    t = t * x + np.float32(0.5)
    small = (t * x) * x + x
    big = _exp32(x) - np.float32(1.0)
    return small if (x < np.float32(0.5) and x > np.float32(-0.5)) else big


@njit(inline="always")
def _erf32(x):
    """erf(x) in float32: an odd over even rational function of x on [-4, 4] (+-1 beyond,
    to float32 precision)."""
    c = np.float32(-4.0) if x < np.float32(-4.0) else (
        np.float32(4.0) if x > np.float32(4.0) else x)
    x2 = c * c
    p = np.float32(-2.72614225801306e-10)
    p = p * x2 + np.float32(2.77068142495902e-08)
    p = p * x2 + np.float32(-2.10102402082508e-06)
    p = p * x2 + np.float32(-5.69250639462346e-05)
    p = p * x2 + np.float32(-7.34990630326855e-04)
    p = p * x2 + np.float32(-2.95459980854025e-03)
    p = p * x2 + np.float32(-1.60960333262415e-02)
    q = np.float32(-1.45660718464996e-05)
    q = q * x2 + np.float32(-2.13374055278905e-04)
    q = q * x2 + np.float32(-1.68282697438203e-03)
    q = q * x2 + np.float32(-7.37332916720468e-03)
    q = q * x2 + np.float32(-1.42647390514189e-02)
    return c * p / q


@intrinsic
def _f32_as_i32(typingctx, v):
    """The int32 whose bits are the float32 ``v``."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _unfolded(typingctx, v):
    """``v`` itself, through LLVM's ``freeze``: a value that the x86 back end cannot fold as
    a memory operand into the instruction that uses it. Where ``dz = z > 0 ? dy : 0`` (relu)
    selects a loaded ``dy``, LLVM folded the load into a zero-masked load (``vmovups
    (mem), zmm {k} {z}``, or a masked multiply), which cannot start before the mask, so
    before ``x`` had arrived and ``z`` been computed: from memory the relu backward's
    reduction ran 2-3x slower than identity's or leaky_relu's (0.51 against 0.23 ns a value,
    one thread, runs of 196; benchmarks/RESULTS.md, session 25). Frozen, ``dy`` is a plain
    load issued with ``x``'s and the mask is applied to a register. The bits are unchanged."""

    def codegen(context, builder, sig, args):
        frozen = ir.instructions.Instruction(builder.block, args[0].type, "freeze", [args[0]])
        builder._insert(frozen)
        return frozen

    return v(v), codegen


@njit(inline="always")
def _log1p32(y):
    """log1p(y) in float32 for y in [-1 + 2^-23, inf) (in-place elu recovers z from y <= 0):
    ``u = 1 + y = m 2^e`` with m in [sqrt(1/2), sqrt(2)), ``log m = 2 atanh((m - 1) / (m +
    1))`` by its odd series to s^9, then ``log1p(y) = log(u) * y / (u - 1)`` (Goldberg: exact
    up to the log's error even where 1 + y rounds; y itself where u is 1). NaN at NaN."""
    u = np.float32(1.0) + y
    bits = _f32_as_i32(u if u == u else np.float32(1.0))
    e = ((bits >> np.int32(23)) & np.int32(255)) - np.int32(127)
    m = _i32_as_f32((bits & np.int32(0x7FFFFF)) | np.int32(127 << 23))
    big = m > np.float32(1.41421356)
    m = m * np.float32(0.5) if big else m
    e = e + np.int32(1) if big else e
    s = (m - np.float32(1.0)) / (m + np.float32(1.0))
    s2 = s * s
    p = np.float32(2.0 / 9.0)
    p = p * s2 + np.float32(2.0 / 7.0)
    p = p * s2 + np.float32(2.0 / 5.0)
    p = p * s2 + np.float32(2.0 / 3.0)
    p = p * s2 + np.float32(2.0)
    ef = np.float32(e)
    lg = (ef * np.float32(0.693359375) + s * p) + ef * np.float32(-2.12194440e-4)
    d = u - np.float32(1.0)
    return y if d == np.float32(0.0) else (lg * (y / d) if u == u else u)


def _by_dtype(f32: Any, other: Any, name: str) -> Any:
    """A function of one float that numba compiles to ``f32`` for float32 arguments (the
    vectorizable versions above) and to ``other`` (libm's) for float64."""

    def stub(z):
        raise NotImplementedError(f"{name} runs in numba-compiled code only")

    stub.__name__ = stub.__qualname__ = name

    @overload(stub)
    def _impl(z):
        if z == types.float32:
            return lambda z: f32(z)
        return lambda z: other(z)

    return stub


_vexp = _by_dtype(_exp32, np.exp, "_vexp")
_vexpm1 = _by_dtype(_expm1_32, np.expm1, "_vexpm1")
_verf = _by_dtype(_erf32, math.erf, "_verf")
_vlog1p = _by_dtype(_log1p32, np.log1p, "_vlog1p")


@njit(fastmath=_ELEM_MATH, forceinline=True)
def _act(z, a, sl):
    if a == 1:
        return z if z > 0 else z - z
    if a == 2:
        return z if z > 0 else z * sl
    if a == 3:
        return z if z > 0 else _vexpm1(z)
    if a == 4:
        return z / (_k(1.0, z) + _vexp(-z))
    if a == 5:
        return _k(0.5, z) * z * (_k(1.0, z) + _verf(z * _k(_INV_SQRT2, z)))
    return z


@njit(fastmath=_ELEM_MATH, forceinline=True)
def _dact(z, a, sl):
    """``act'(z)`` (0 at z = 0 for relu, as torch; at a NaN ``z`` 1 for relu and elu and the
    slope for leaky_relu, as torch's backward formulas give)."""
    one = _k(1.0, z)
    if a == 1:
        return _k(0.0, z) if z <= 0 else one
    if a == 2:
        return one if z > 0 else sl
    if a == 3:
        return _vexp(z) if z <= 0 else one
    if a == 4:
        s = one / (one + _vexp(-z))
        return s * (one + z * (one - s))
    if a == 5:
        cdf = _k(0.5, z) * (one + _verf(z * _k(_INV_SQRT2, z)))
        return cdf + z * _vexp(_k(-0.5, z) * z * z) * _k(_INV_SQRT_2PI, z)
    return one


@njit(fastmath=_ELEM_MATH, forceinline=True)
def _dact_y(y, a, sl):
    """``act'(z)`` through the output ``y`` (elu; the piecewise-linear ones are inlined in
    ``_dz_xhat``)."""
    one = _k(1.0, y)
    if a == 3:
        return one if y > 0 else y + one
    return one


@njit(fastmath=_ELEM_MATH, forceinline=True)
def _inv_act(y, a, sl):
    """``z`` with ``act(z) = y`` (elu, clamped as the composite)."""
    if a == 3:
        return y if y > 0 else _vlog1p(y if y > _k(-1.0 + 1e-7, y) else _k(-1.0 + 1e-7, y))
    return y


_Flag = tuple[str, tuple, Any]  # (name, values, None or when(earlier flags' values) -> bool)


def _by_flags(body, params: str, flags: tuple[_Flag, ...], fastmath: set[str]):
    """A compiled ``f(*params, *flag_names)`` that calls the inline ``body(*params,
    *flag_names)`` with each flag's value as a literal constant: one branch-free
    (vectorizable) copy of the loop per combination of the flags' ``values``, chosen once per
    call instead of tested per element. A flag outside its values runs its last value's
    copy; a flag whose ``when`` is false for the values before it is pinned to its last value
    (no copies for combinations the host never asks for).

    The function is named after the body and the flags' values: numba names compiled code by
    qualified name and a per-process counter, and two kernel modules are compiled in two
    processes (numba_entry), so two different functions of one name could meet under one
    symbol when both are loaded from the cache."""
    names = params.split()
    tag = "__".join("_".join(str(v) for v in values) for _, values, _ in flags)
    fname = f"{body.__name__}__{tag}"
    lines = [f"def {fname}({', '.join(names + [f for f, _, _ in flags])}):"]

    def emit(depth: int, fixed: list, indent: int) -> None:
        pad = "    " * indent
        if depth == len(flags):
            lines.append(f"{pad}return body({', '.join(names + [repr(v) for v in fixed])})")
            return
        flag, values, when = flags[depth]
        if when is None or when(*fixed):
            for v in values[:-1]:
                lines.append(f"{pad}if {flag}:" if v is True else f"{pad}if {flag} == {v!r}:")
                emit(depth + 1, [*fixed, v], indent + 1)
        emit(depth + 1, [*fixed, values[-1]], indent)

    emit(0, [], 1)
    ns = {"body": body}
    exec("\n".join(lines), ns)
    return njit(fastmath=fastmath)(ns[fname])


def _named_as(tag: str):
    """A decorator renaming a function ``<name>__<tag>`` (see :func:`_by_flags` on
    names)."""

    def rename(fn):
        fn.__name__ = fn.__qualname__ = f"{fn.__name__}__{tag}"
        return fn

    return rename


# ---- the activation mask ------------------------------------------------------------------
# With a residual, relu's and leaky_relu's backward needs z = BN(x) + r only for its sign. A
# forward that writes the sign as one bit per value (the "mask") lets the backward read the
# bits instead of r: one input stream fewer, and autograd saves x and the bits (1/32 of a
# float32 tensor) instead of x and r. Layout: bit ``j % 8`` of byte ``j // 8`` is the value
# at item ``j`` in memory (``np.packbits(flat, bitorder="little")`` of the kernels' copy of
# x in memory order). The host zeroes it first: a task writes its whole bytes with plain
# stores and the two partial ones at the ends of a contiguous range with an atomic or (the
# neighbouring task owns their other bits). The bit is taken from the stored output (float32
# or float64 storage only, where y is z exactly when z > 0): relu ``y != 0`` (y is z > 0 or
# NaN, where relu passes the gradient, as torch's), leaky_relu with a slope >= 0 ``y > 0``
# (NaN scales it, as torch's). (Bit and byte orders as on x86: little-endian.)

_SPREAD = np.uint64(0x0101010101010101)
_PICK = np.uint64(0x8040201008040201)
_ADD7F = np.uint64(0x7F7F7F7F7F7F7F7F)
_HIGH = np.uint64(0x8080808080808080)
_SEVEN = np.uint64(7)
# Rows (channels last, (N, C)) pack and expand their bits this many values at a time at
# least (whole rows; in L1), outside the loop over the group's rows: a call per row, or a
# call inside that loop, cost channels-last inputs with few channels up to 4x in the
# forward (C = 3). (Their backward stays 2x slower with the mask below 24 channels: the
# host gives them none, see numba_act.NumbaActMixin.mask_min_row_channels.)
_MASK_GROUP = 1024


@intrinsic
def _atomic_or_u8(typingctx, arr, k, v):
    """``arr[k] |= v`` (uint8) as one atomic operation."""
    sig = types.void(arr, types.intp, types.uint8)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        builder.atomic_rmw("or", builder.gep(a.data, [args[1]]), args[2], "monotonic")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _bits8_float(typingctx, arr, i, relu):
    """One mask byte from the eight floats ``arr[i:i + 8]``: bit k set where ``arr[i + k]``
    is > 0, or (``relu``) also NaN. One vector load, compare and bitcast: 43 GB/s of input
    on one thread, where a loop of shifts and ors ran at 14 (benchmarks/RESULTS.md)."""
    if not (isinstance(arr, types.Array) and isinstance(arr.dtype, types.Float)):
        return None
    sig = types.uint8(arr, types.intp, types.boolean)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ft = context.get_data_type(sig.args[0].dtype)
        vt = ir.VectorType(ft, 8)
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), vt.as_pointer())
        v = builder.load(ptr, align=context.get_abi_sizeof(ft))
        zero = ir.Constant(vt, [0.0] * 8)
        hot = builder.select(args[2], builder.fcmp_unordered(">", v, zero),
                             builder.fcmp_ordered(">", v, zero))
        return builder.bitcast(hot, ir.IntType(8))

    return sig, codegen


def _bits8(arr, i, relu):
    """:func:`_bits8_float`, or for half storage (which never writes a mask: the host
    allows it for float32 and float64 only) the same bits one value at a time."""


@overload(_bits8)
def _bits8_impl(arr, i, relu):
    if isinstance(arr.dtype, types.Float):
        return lambda arr, i, relu: _bits8_float(arr, i, relu)

    def impl(arr, i, relu):
        out = 0
        for k in range(8):
            out |= _bit1(_ld(arr[i + k]), relu) << k
        return np.uint8(out)

    return impl


@njit(inline="always")
def _bit1(y, relu):
    """The mask bit of one output value (see above)."""
    return 1 if y > 0 or (relu and y != y) else 0


@njit(inline="always")
def _pack_bits(src, so, cnt, mk, bit, relu):
    """The mask bits of ``src[so:so + cnt]`` into bits ``[bit, bit + cnt)`` of ``mk``
    (zeroed): whole bytes by :func:`_bits8`, a partial byte at either end by an atomic or."""
    i = 0
    if bit & 7 != 0 and cnt > 0:
        i = min(cnt, 8 - (bit & 7))
        v = 0
        for t in range(i):
            v |= _bit1(_ld(src[_u(so + t)]), relu) << ((bit + t) & 7)
        _atomic_or_u8(mk, bit >> 3, np.uint8(v))
    while i + 8 <= cnt:
        mk[_u((bit + i) >> 3)] = _bits8(src, so + i, relu)
        i += 8
    if i < cnt:
        v = 0
        for t in range(cnt - i):
            v |= _bit1(_ld(src[_u(so + i + t)]), relu) << t
        _atomic_or_u8(mk, (bit + i) >> 3, np.uint8(v))


@njit(inline="always")
def _expand_bits(mk, bit, cnt, fb):
    """Bits ``[bit, bit + cnt)`` of ``mk`` as bytes of 0 or 1, eight per uint64 of ``fb``
    (whole bytes, so from bit ``bit & ~7``; no loop over the bits: the byte is copied to all
    eight bytes, each keeps its own bit, and adding 0x7f carries any set bit to the top);
    returns the index of bit ``bit`` in ``fb``'s bytes (``bit & 7``). (As uint32 flags
    instead, one vector store a byte, the channels-first backward ran about 5% slower.)"""
    b0 = bit >> 3
    for k in range(((bit & 7) + cnt + 7) >> 3):
        e = (np.uint64(mk[_u(b0 + k)]) * _SPREAD) & _PICK
        fb[_u(k)] = ((e + _ADD7F) & _HIGH) >> _SEVEN
    return bit & 7


# ---- element and loop bodies ---------------------------------------------------------------
# The loop bodies take compile-time flags: ``kind`` (0: identity / relu / leaky_relu, all
# ``z > 0 ? z : neg * z``, selects only; else the activation's code, 3 elu, 4 silu, 5 gelu),
# ``res`` (a residual is read) and ``inp`` (in-place: recompute from y). They are inlined
# (numba ``inline="always"``) into dispatchers that call them with literal flags, so LLVM
# sees one branch-free loop per case, with one activation's math in it (with the activation
# a run-time value, LLVM if-converted all three transcendental ones into every iteration:
# 0.9 ns a value each, benchmarks/RESULTS.md). ``neg``: 1 (identity), 0 (relu), slope
# (leaky_relu); ``rneg = 1 / neg``.


@njit(inline="always")
def _kind(a):
    """The loop kind of activation code ``a`` (see above)."""
    return 0 if a <= 2 else a


@njit(fastmath=_EXACT_MATH, forceinline=True)
def _dz_xhat(g, v, rv, hi, inv, k0, w, b, rw, a, neg, rneg, sl, kind, inp):
    """``(dz, xhat)`` of one element: ``v`` is x (normal mode) or y (in-place mode)."""
    if inp:
        if kind == 0:
            dz = g if v > 0 else g * neg
            z = v if v > 0 else v * rneg
        else:
            dz = g * _dact_y(v, kind, sl)
            z = _inv_act(v, kind, sl)
        return dz, (z - rv - b) * rw
    xh = (v - hi) * inv + k0
    z = xh * w + b + rv
    if kind == 0:
        g = _unfolded(g)  # relu selects g or 0: see _unfolded
        # as torch's threshold_backward, relu passes g at a NaN z and blocks it with a zero
        # where z <= 0 (not g * 0, which is NaN for an infinite g); leaky_relu scales it
        if z > 0 or (a == 1 and z != z):
            return g, xh
        return (_zero(g) if a == 1 else g * neg), xh
    return g * _dact(z, kind, sl), xh


@njit(fastmath=_EXACT_MATH, forceinline=True)
def _dz_xhat_m(g, fl, v, hi, inv, k0, a, neg):
    """:func:`_dz_xhat` of relu and leaky_relu in normal mode with the activation mask:
    ``fl`` (the element's mask bit, 0 or 1) decides instead of ``z``, which needs r."""
    xh = (v - hi) * inv + k0
    g = _unfolded(g)  # see _dz_xhat
    if fl != 0:
        return g, xh
    return (_zero(g) if a == 1 else g * neg), xh


@njit(fastmath=_EXACT_MATH, forceinline=True)
def _xhat(v, hi, inv, k0):
    """xhat of one element of x, rounded as in :func:`_dz_xhat` (normal mode)."""
    return (v - hi) * inv + k0


def _same_dtype(a, b):
    """Whether arrays ``a`` and ``b`` hold the same dtype (a compile-time constant)."""


@overload(_same_dtype)
def _same_dtype_impl(a, b):
    same = a.dtype == b.dtype
    return lambda a, b: same


# The reductions' copy: with the reductions' flags (contracted into FMAs), as when numba
# inlined it into its callers (session 19), where the exact copy cost the 7x7 and 14x14
# reductions 5-10% (paired A/B, benchmarks/RESULTS.md, session 22). The elementwise pass
# keeps the exact copy (its rounding must not depend on how LLVM fused each loop).
_dz_xhat_sum = njit(fastmath=_REDUCE_MATH, forceinline=True)(_dz_xhat.py_func)
_dz_xhat_m_sum = njit(fastmath=_REDUCE_MATH, forceinline=True)(_dz_xhat_m.py_func)


@njit(inline="always")
def _lin_act(z, neg):
    """identity, relu or leaky_relu (slope ``neg``): relu gives 0 for z <= 0 also at -inf,
    where ``z * 0`` would be NaN, and NaN at NaN, as torch's."""
    if z > 0:
        return z
    if neg != 0 or z != z:
        return z * neg
    return _zero(z)


@njit(inline="always")
def _run_act_body(x, r, y, o, yo, s, hi, sc, sh, neg, sl, kind, res):
    for i in range(s):
        j = _u(o + i)
        z = (_ld(x[j]) - hi) * sc + sh
        if res:
            z = z + _ld(r[j])
        if kind == 0:
            y[_u(yo + i)] = _st(_lin_act(z, neg), y)
        else:
            y[_u(yo + i)] = _st(_act(z, kind, sl), y)


@njit(inline="always")
def _chunk_act_body(x, r, buf, o, a0, b0, s_, c0, coef, neg, sl, mk, relu, kind, res, msk):
    """``buf[:b0 - a0]`` from items ``[o + a0, o + b0)``; ``msk``: their mask bits too."""
    p = a0
    while p < b0:  # the pieces of the runs in [a0, b0), as numba_kernels._chunk_norm
        j, q = _piece(p, b0, s_)
        c = c0 + j
        _run_act_body(x, r, buf, o + p, p - a0, q - p, coef[0, c], coef[1, c], coef[2, c],
                      neg, sl, kind, res)
        p = q
    if msk:
        _pack_bits(buf, 0, b0 - a0, mk, o + a0, relu)


@njit(inline="always")
def _runs_act_body(x, r, y, stride, s_, c0, c1, n0, n1, coef, neg, sl, mk, relu, kind, res,
                   msk):
    """Runs of channels [c0, c1) x batch rows [n0, n1); ``msk``: the mask bits of each batch
    row's block of runs (contiguous: two partial bytes at most, instead of two per run)."""
    for n in range(n0, n1):
        o0 = o = n * stride + c0 * s_
        for c in range(c0, c1):
            _run_act_body(x, r, y, o, o, s_, coef[0, c], coef[1, c], coef[2, c], neg, sl,
                          kind, res)
            o += s_
        if msk:
            _pack_bits(y, o0, o - o0, mk, o0, relu)


@njit(inline="always")
def _rows_act_body(x, r, y, c_, n0, n1, yo, hi, sc, sh, neg, sl, mk, relu, kind, res, msk):
    # with the mask, groups of rows (in L1 still) are packed at once
    g = max(1, _MASK_GROUP // c_ if msk else n1 - n0)
    for m0 in range(n0, n1, g):
        m1 = min(m0 + g, n1)
        for n in range(m0, m1):
            p = n * c_
            q = yo + (n - n0) * c_
            for j in range(c_):
                i = _u(p + j)
                u = _u(j)
                z = (_ld(x[i]) - hi[u]) * sc[u] + sh[u]
                if res:
                    z = z + _ld(r[i])
                if kind == 0:
                    y[_u(q + j)] = _st(_lin_act(z, neg), y)
                else:
                    y[_u(q + j)] = _st(_act(z, kind, sl), y)
        if msk:
            _pack_bits(y, yo + (m0 - n0) * c_, (m1 - m0) * c_, mk, m0 * c_, relu)


@njit
def _negs(a, sl):
    """(neg, 1 / neg) of the piecewise-linear activations, in sl's dtype."""
    one = _k(1.0, sl)
    neg = one if a == 0 else (_k(0.0, sl) if a == 1 else sl)
    return neg, (one / neg if neg != 0 else one)


# ---- backward: reduction and elementwise pass ---------------------------------------------
# coef rows (compute dtype): 0 mean_hi, 1 invstd, 2 k0 = -(mean - mean_hi) * invstd,
# 3 weight, 4 bias, 5 1 / weight, 6 weight * invstd, 7 -sum_dz / count,
# 8 -sum_dz_xhat / count (7 and 8 zero in eval). The elementwise pass always writes dx, and
# dresidual = dz when there is a residual (the host passes scratch for one not asked for).


@njit(inline="always")
def _run_bred_body(dy, v, r, dr, o, s, hi, inv, k0, w, b, rw, a, neg, rneg, sl, bz, bx, fb8,
                   f0, kind, res, inp, pre, msk):
    """Sums of one run; ``msk``: relu's / leaky_relu's decisions from the mask bits, as
    bytes (:func:`_expand_bits`): item ``i``'s at ``fb8[f0 + i]``, instead of from ``r``."""
    s1 = _zero(hi)
    s2 = _zero(hi)
    if kind == 0 and msk:
        for i in range(o, o + s):
            fl = fb8[_u(f0 + i)]
            if pre:
                dz, xh = _dz_xhat_m(_ld(dy[_u(i)]), fl, _ld(v[_u(i)]), hi, inv, k0, a, neg)
                dr[_u(i)] = _st(dz, dr)
            else:
                dz, xh = _dz_xhat_m_sum(_ld(dy[_u(i)]), fl, _ld(v[_u(i)]), hi, inv, k0, a,
                                        neg)
            s1 += dz
            s2 += dz * xh
        return np.float64(s1), np.float64(s2)
    if kind == 0:
        for i in range(o, o + s):
            rv = _ld(r[_u(i)]) if res else _zero(hi)
            if pre:
                # dz for dr (and so for dx) rounded as the elementwise pass's own copy would
                dz, xh = _dz_xhat(_ld(dy[_u(i)]), _ld(v[_u(i)]), rv, hi, inv, k0, w, b, rw, a,
                                  neg, rneg, sl, kind, inp)
                dr[_u(i)] = _st(dz, dr)
            else:
                dz, xh = _dz_xhat_sum(_ld(dy[_u(i)]), _ld(v[_u(i)]), rv, hi, inv, k0, w, b,
                                      rw, a, neg, rneg, sl, kind, inp)
            s1 += dz
            s2 += dz * xh
        return np.float64(s1), np.float64(s2)
    # the transcendental activations: dz and xhat into bz, bx (s <= ROW_SEGMENT), then the
    # sums. LLVM vectorizes a reduction with interleaved accumulators, 64 float32 values a
    # step, and ran a 49-value run wholly in its scalar remainder: with exp in the loop that
    # cost 0.89 ns a value against 0.55 in two loops (silu, one thread)
    for i in range(s):
        j = _u(o + i)
        rv = _ld(r[j]) if res else _zero(hi)
        bz[_u(i)], bx[_u(i)] = _dz_xhat(_ld(dy[j]), _ld(v[j]), rv, hi, inv, k0, w, b, rw, a,
                                        neg, rneg, sl, kind, inp)
        if pre:
            dr[j] = _st(bz[_u(i)], dr)
    for i in range(s):
        s1 += bz[_u(i)]
        s2 += bz[_u(i)] * bx[_u(i)]
    return np.float64(s1), np.float64(s2)


@njit(inline="always")
def _runs_bred_body(dy, v, r, dr, stride, s_, c0, c1, n0, n1, co, a, neg, rneg, sl, sdz, sdx,
                    bz, bx, mk, fb, fb8, kind, res, inp, pre, msk):
    if s_ <= ROW_SEGMENT:
        # short runs (all but a volume at batch size 1): one call a run, no piece loop around
        # it, which made the 7x7 and 14x14 reductions 10-15% slower (paired, session 22; as
        # numba_kernels keeps _task_bred_long apart)
        for n in range(n0, n1):
            o = n * stride + c0 * s_
            # a batch row's block of runs is contiguous: its mask bits expanded at once
            f0 = _expand_bits(mk, o, (c1 - c0) * s_, fb) - o if msk else 0
            for c in range(c0, c1):
                u, w = _run_bred_body(dy, v, r, dr, o, s_, co[0, c], co[1, c], co[2, c],
                                      co[3, c], co[4, c], co[5, c], a, neg, rneg, sl, bz, bx,
                                      fb8, f0, kind, res, inp, pre, msk)
                sdz[c] += u
                sdx[c] += w
                o += s_
        return
    for n in range(n0, n1):
        o = n * stride + c0 * s_
        for c in range(c0, c1):
            # a long run in pieces of ROW_SEGMENT values (compute-dtype sums; as
            # numba_kernels._task_bred_long)
            for p in range(0, s_, ROW_SEGMENT):
                m = min(ROW_SEGMENT, s_ - p)
                f0 = _expand_bits(mk, o + p, m, fb) - (o + p) if msk else 0
                u, w = _run_bred_body(dy, v, r, dr, o + p, m, co[0, c], co[1, c], co[2, c],
                                      co[3, c], co[4, c], co[5, c], a, neg, rneg, sl, bz, bx,
                                      fb8, f0, kind, res, inp, pre, msk)
                sdz[c] += u
                sdx[c] += w
            o += s_


@njit(inline="always")
def _run_bapply_body(dy, v, r, dx, dr, o, yo, s, hi, inv, k0, w, b, rw, sc, k1, k2, a, neg,
                     rneg, sl, fb8, f0, kind, res, inp, pre, msk):
    """``msk``: as in :func:`_run_bred_body`."""
    for i in range(s):
        j = _u(o + i)
        if pre:  # dz is in dr already (the reduction wrote it, yo == o)
            dz = _ld(dr[j])
            xh = _xhat(_ld(v[j]), hi, inv, k0)
        elif msk:
            dz, xh = _dz_xhat_m(_ld(dy[j]), fb8[_u(f0 + o + i)], _ld(v[j]), hi, inv, k0, a,
                                neg)
        else:
            rv = _ld(r[j]) if res else _zero(hi)
            dz, xh = _dz_xhat(_ld(dy[j]), _ld(v[j]), rv, hi, inv, k0, w, b, rw, a, neg, rneg,
                              sl, kind, inp)
        dx[_u(yo + i)] = _st(sc * (dz + k1 + _xterm(xh, _zero(xh), k2)), dx)
        if res and not pre:
            dr[_u(yo + i)] = _st(dz, dr)


@njit(inline="always")
def _chunk_bapply_body(dy, v, r, dx, dr, o, a0, b0, s_, c0, co, a, neg, rneg, sl, mk, fb, fb8,
                       kind, res, inp, msk):
    f0 = _expand_bits(mk, o + a0, b0 - a0, fb) - (o + a0) if msk else 0
    p = a0
    while p < b0:  # the pieces of the runs in [a0, b0), as numba_kernels._chunk_norm
        j, q = _piece(p, b0, s_)
        c = c0 + j
        _run_bapply_body(dy, v, r, dx, dr, o + p, p - a0, q - p, co[0, c], co[1, c], co[2, c],
                         co[3, c], co[4, c], co[5, c], co[6, c], co[7, c], co[8, c], a, neg,
                         rneg, sl, fb8, f0, kind, res, inp, False, msk)
        p = q


@njit(inline="always")
def _runs_bapply_body(dy, v, r, dx, dr, stride, s_, c0, c1, n0, n1, co, a, neg, rneg, sl,
                      mk, fb, fb8, kind, res, inp, pre, msk):
    for n in range(n0, n1):
        o = n * stride + c0 * s_
        f0 = _expand_bits(mk, o, (c1 - c0) * s_, fb) - o if msk else 0
        for c in range(c0, c1):
            _run_bapply_body(dy, v, r, dx, dr, o, o, s_, co[0, c], co[1, c], co[2, c],
                             co[3, c], co[4, c], co[5, c], co[6, c], co[7, c], co[8, c], a,
                             neg, rneg, sl, fb8, f0, kind, res, inp, pre, msk)
            o += s_


@njit(inline="always")
def _rows_bred_body(dy, v, r, dr, o, nrows, c_, co, a, neg, rneg, sl, q1, q2, mk, fb, fb8,
                    kind, res, inp, pre, msk):
    """Row mode: per-channel sums (compute dtype) over ``nrows`` rows from offset ``o``.
    The coefficients are read as rows of ``co`` with unsigned indices, and the flags are
    constants in each copy of the loop: indexed as ``co[k, j]`` with the flags tested per
    element, the elementwise pass ran 10x slower (40 ms for (32, 2048, 7, 7))."""
    hi, inv, k0, w, b, rw = co[0], co[1], co[2], co[3], co[4], co[5]
    zero = _zero(q1[0])
    q1[:] = 0.0
    q2[:] = 0.0
    # with the mask, the bits of groups of rows are expanded at once (outside the rows'
    # loop: expanded per row inside it, LLVM's code for the rows ran 2x slower at C = 13)
    g = max(1, _MASK_GROUP // c_ if msk else nrows)
    for m0 in range(0, nrows, g):
        m1 = min(m0 + g, nrows)
        f0 = _expand_bits(mk, o + m0 * c_, (m1 - m0) * c_, fb) - (o + m0 * c_) if msk else 0
        for n in range(m0, m1):
            p = o + n * c_
            for j in range(c_):
                i = _u(p + j)
                u = _u(j)
                if msk:
                    dz, xh = _dz_xhat_m(_ld(dy[i]), fb8[_u(f0 + p + j)], _ld(v[i]), hi[u],
                                        inv[u], k0[u], a, neg)
                else:
                    rv = _ld(r[i]) if res else zero
                    dz, xh = _dz_xhat(_ld(dy[i]), _ld(v[i]), rv, hi[u], inv[u], k0[u], w[u],
                                      b[u], rw[u], a, neg, rneg, sl, kind, inp)
                if pre:
                    dr[i] = _st(dz, dr)
                q1[u] += dz
                q2[u] += dz * xh


@njit(inline="always")
def _rows_bapply_body(dy, v, r, dx, dr, c_, n0, n1, yo, co, a, neg, rneg, sl, mk, fb, fb8,
                      kind, res, inp, pre, msk):
    """Rows [n0, n1) into dx (and dr) from item yo on (the outputs, or stream buffers;
    ``pre``: dz from dr, yo == n0 * c_)."""
    hi, inv, k0, w, b, rw = co[0], co[1], co[2], co[3], co[4], co[5]
    sc, k1, k2 = co[6], co[7], co[8]
    zero = _zero(co[0, 0])  # (not co - co: channel 0's NaN would reach every channel)
    g = max(1, _MASK_GROUP // c_ if msk and not pre else n1 - n0)  # as in _rows_bred_body
    for m0 in range(n0, n1, g):
        m1 = min(m0 + g, n1)
        f0 = (_expand_bits(mk, m0 * c_, (m1 - m0) * c_, fb) - m0 * c_ if msk and not pre
              else 0)
        for n in range(m0, m1):
            p = n * c_
            q = yo + (n - n0) * c_
            for j in range(c_):
                i = _u(p + j)
                u = _u(j)
                if pre:
                    dz = _ld(dr[i])
                    xh = _xhat(_ld(v[i]), hi[u], inv[u], k0[u])
                elif msk:
                    dz, xh = _dz_xhat_m(_ld(dy[i]), fb8[_u(f0 + p + j)], _ld(v[i]), hi[u],
                                        inv[u], k0[u], a, neg)
                else:
                    rv = _ld(r[i]) if res else zero
                    dz, xh = _dz_xhat(_ld(dy[i]), _ld(v[i]), rv, hi[u], inv[u], k0[u], w[u],
                                      b[u], rw[u], a, neg, rneg, sl, kind, inp)
                dx[_u(q + j)] = _st(sc[u] * (dz + k1[u] + _xterm(xh, zero, k2[u])), dx)
                if res and not pre:
                    dr[_u(q + j)] = _st(dz, dr)


@njit
def _bwd_finish(co, sum_dz, sum_dzx, count, do_reduce, training, pm, pq, c0, c1):
    """Add the float64 partials in part order (when reducing), write the sums, then the
    input-gradient coefficients (rows 7, 8) of channels [c0, c1)."""
    for c in range(c0, c1):
        if do_reduce:
            u = 0.0
            w = 0.0
            for p in range(pm.shape[0]):
                u += pm[p, c]
                w += pq[p, c]
            sum_dz[c] = u
            sum_dzx[c] = w
        if training:
            co[7, c] = -np.float64(sum_dz[c]) / count
            co[8, c] = -np.float64(sum_dzx[c]) / count
        else:
            co[7, c] = 0.0
            co[8, c] = 0.0


@njit
def _backward_pre(mean, invstd, weight, bias, co, c0, c1):
    """Coefficient rows 0-6 of channels [c0, c1) from the saved statistics and the affine
    parameters (float64 math, rounded once to the compute dtype)."""
    for c in range(c0, c1):
        mu = np.float64(mean[c])
        inv = np.float64(invstd[c])
        w = np.float64(weight[c]) if weight.size > 0 else 1.0
        co[0, c] = mu
        co[1, c] = inv
        co[2, c] = _finite_or_zero(-(mu - np.float64(co[0, c])) * inv)
        co[3, c] = w
        co[4, c] = np.float64(bias[c]) if bias.size > 0 else 0.0
        co[5, c] = 1.0 / w if w != 0.0 else 0.0
        co[6, c] = w * inv


# ---- kernels (same phases and arguments as numba_kernels.forward / backward) ---------------
# Their packed arguments, in order (kinds as in numba_kernels.PACKED, see numba_entry).
PACKED = {
    "forward_act": "s1 s1 s1 u1 i i i i i a1 a1 a1 a1 a1 a1 a1 a1 a1 a1 f f b i f d2 d2 a2",
    "backward_act": "s1 s1 s1 u1 s1 s1 i i i i i a1 a1 a1 a1 a1 a1 f b b b b i f d2 d2 a2",
}


def kernels(kinds: tuple[int, ...]) -> tuple[Any, Any]:
    """``(forward_act, backward_act)`` for the activations of loop kinds ``kinds`` (see
    :func:`_kind`): their task functions and dispatchers hold one copy of each loop per kind,
    so the piecewise-linear kernels (this module's) compile none of the transcendental
    activations' loops, and those (``numba_smooth_kernels``) none of the others'. The
    functions are closures, compiled uncached inside their kernels' cached entries."""
    kf = ("kind", kinds, None)
    rf = ("res", (True, False), None)
    # in place only with an invertible activation (identity, leaky_relu: kind 0; elu)
    pf = ("inp", (True, False), lambda kind, res: kind in (0, 3))
    # dz written by the reduction into dr and read back by the elementwise pass (see
    # backward_act): with a residual, in normal mode
    qf = ("pre", (True, False), lambda kind, res, inp: res and not inp)
    # the activation mask instead of the residual (relu, leaky_relu; normal mode): written by
    # the forward, read by the backward's loops that would otherwise recompute z from r
    mf_fwd = ("msk", (True, False), lambda kind, res: kind == 0 and res)
    mf_bwd = ("msk", (True, False), lambda kind, res, inp, *_: kind == 0 and res and not inp)
    mf_apply = ("msk", (True, False),
                lambda kind, res, inp, pre: kind == 0 and res and not inp and not pre)
    tag = "k" + "_".join(str(k) for k in kinds)
    # buf[:b0 - a0] from x (and r) at [o + a0, o + b0): a stream or in-place chunk, one call
    # (a call per piece, through the flags' dispatch, measured 1.1-2.1x slower in place:
    # (32, 512, 7, 7) forward 0.438 -> 0.225 ms, (32, 256, 14, 14) 0.447 -> 0.351 ms;
    # streamed (32, 256, 28, 28) 1.52 -> 0.89 ms)
    chunk_act = _by_flags(_chunk_act_body, "x r buf o a0 b0 s_ c0 coef neg sl mk relu",
                          (kf, rf, mf_fwd), _ELEM_MATH)
    # a task's runs (channels-first, not streamed) with the flags chosen once per task
    runs_act = _by_flags(_runs_act_body, "x r y stride s_ c0 c1 n0 n1 coef neg sl mk relu",
                         (kf, rf, mf_fwd), _ELEM_MATH)
    rows_act = _by_flags(_rows_act_body, "x r y c_ n0 n1 yo hi sc sh neg sl mk relu",
                         (kf, rf, mf_fwd), _ELEM_MATH)
    # a task's runs with the flags chosen once per task: per run, the choice and a call cost
    # as much as the 49 values of a 7x7 run
    runs_bred = _by_flags(
        _runs_bred_body,
        "dy v r dr stride s_ c0 c1 n0 n1 co a neg rneg sl sdz sdx bz bx mk fb fb8",
        (kf, rf, pf, qf, mf_bwd), _REDUCE_MATH)
    rows_bred = _by_flags(_rows_bred_body,
                          "dy v r dr o nrows c_ co a neg rneg sl q1 q2 mk fb fb8",
                          (kf, rf, pf, qf, mf_bwd), _ELEM_MATH)
    # dx[:b0 - a0] (and dr) from the inputs at [o + a0, o + b0): a stream chunk, one call
    # (as chunk_act: streamed backward of (32, 1024, 14, 14) 4.13 -> 3.04 ms)
    chunk_bapply = _by_flags(_chunk_bapply_body,
                             "dy v r dx dr o a0 b0 s_ c0 co a neg rneg sl mk fb fb8",
                             (kf, rf, pf, mf_bwd), _EXACT_MATH)
    runs_bapply = _by_flags(_runs_bapply_body,
                            "dy v r dx dr stride s_ c0 c1 n0 n1 co a neg rneg sl mk fb fb8",
                            (kf, rf, pf, qf, mf_apply), _EXACT_MATH)
    rows_bapply = _by_flags(_rows_bapply_body,
                            "dy v r dx dr c_ n0 n1 yo co a neg rneg sl mk fb fb8",
                            (kf, rf, pf, qf, mf_apply), _ELEM_MATH)

    @njit
    @_named_as(tag)
    def task_act(x, r, y, mk, c_, s_, c0, c1, n0, n1, coef, a, slope, stream):
        sl = _k(slope, coef[0, 0])
        neg, _ = _negs(a, sl)
        kind = _kind(a)
        res = r.size > 0
        msk = mk.size > 0
        relu = a == 1
        if s_ == 1:
            if not stream:
                rows_act(x, r, y, c_, n0, n1, n0 * c_, coef[0], coef[1], coef[2], neg, sl, mk,
                         relu, kind, res, msk)
                return
            # whole rows per chunk (rows are contiguous; a chunk boundary is a partial line)
            k = max(1, STREAM_CHUNK // c_)
            buf = np.empty(k * c_, y.dtype)
            for m0 in range(n0, n1, k):
                m1 = min(m0 + k, n1)
                rows_act(x, r, buf, c_, m0, m1, _I0, coef[0], coef[1], coef[2], neg, sl, mk,
                         relu, kind, res, msk)
                _put(buf, y, m0 * c_, (m1 - m0) * c_, stream)
            return
        stride = c_ * s_
        if stream:
            buf = np.empty(STREAM_CHUNK, y.dtype)
            base = _first_index(y)
            end = (c1 - c0) * s_
            for n in range(n0, n1):
                o = n * stride + c0 * s_
                a0 = 0
                while a0 < end:
                    b0 = _chunk_end(base + o, a0, end)
                    chunk_act(x, r, buf, o, a0, b0, s_, c0, coef, neg, sl, mk, relu, kind, res,
                              msk)
                    _put(buf, y, o + a0, b0 - a0, stream)
                    a0 = b0
            return
        runs_act(x, r, y, stride, s_, c0, c1, n0, n1, coef, neg, sl, mk, relu, kind, res, msk)

    @njit
    @_named_as(tag)
    def task_bred(dy, v, r, mk, dr, c_, s_, c0, c1, n0, n1, co, a, slope, inplace, pre, sdz,
                  sdx):
        """float64 sum(dz)[c], sum(dz * xhat)[c] for c in [c0, c1) over rows [n0, n1);
        ``pre``: dz into dr as well; ``mk`` (size > 0): the activation mask, read instead of
        the residual ``r`` (then empty)."""
        sl = _k(slope, co[0, 0])
        neg, rneg = _negs(a, sl)
        kind = _kind(a)
        msk = mk.size > 0
        res = r.size > 0 or msk
        # the mask bits as bytes: a row, a batch row's block of runs, or a long run's piece
        cnt = (max(c_, _MASK_GROUP) if s_ == 1 else (c1 - c0) * s_ if s_ <= ROW_SEGMENT
               else ROW_SEGMENT)
        fb = np.empty((cnt + 23) >> 3 if msk else 0, np.uint64)
        fb8 = fb.view(np.uint8)
        for c in range(c0, c1):
            sdz[c] = 0.0
            sdx[c] = 0.0
        if s_ == 1:
            q1 = np.empty(c_, co.dtype)
            q2 = np.empty(c_, co.dtype)
            seg = max(1, ROW_SEGMENT // c_)
            for m0 in range(n0, n1, seg):
                m1 = min(m0 + seg, n1)
                rows_bred(dy, v, r, dr, m0 * c_, m1 - m0, c_, co, a, neg, rneg, sl, q1, q2, mk,
                          fb, fb8, kind, res, inplace, pre, msk)
                for c in range(c_):  # (unsigned indices: vectorized, see _fold_add)
                    sdz[_u(c)] += np.float64(q1[_u(c)])
                    sdx[_u(c)] += np.float64(q2[_u(c)])
            return
        seg = min(s_, ROW_SEGMENT) if kind != 0 else 0
        bz = np.empty(seg, co.dtype)
        bx = np.empty(seg, co.dtype)
        runs_bred(dy, v, r, dr, c_ * s_, s_, c0, c1, n0, n1, co, a, neg, rneg, sl, sdz, sdx,
                  bz, bx, mk, fb, fb8, kind, res, inplace, pre, msk)

    @njit
    @_named_as(tag)
    def task_bapply(dy, v, r, mk, dx, dr, c_, s_, c0, c1, n0, n1, co, a, slope, inplace, pre,
                    stream):
        """dx (and dr) of rows [n0, n1) x channels [c0, c1); streamed as in task_act (dx and
        dr are the same shape, so one chunking serves both). ``pre`` (never streamed): dz
        is read from dr, which the reduction wrote. ``mk``: as in task_bred."""
        sl = _k(slope, co[0, 0])
        neg, rneg = _negs(a, sl)
        kind = _kind(a)
        msk = mk.size > 0
        res = r.size > 0 or msk
        # whole lines (a channels-first run, a row) or a stream chunk's piece of one
        # the mask bits as bytes: a row, a stream chunk, or a batch row's block of runs
        cnt = max(c_, _MASK_GROUP) if s_ == 1 else STREAM_CHUNK if stream else (c1 - c0) * s_
        fb = np.empty((cnt + 23) >> 3 if msk and not pre else 0, np.uint64)
        fb8 = fb.view(np.uint8)
        k = max(1, STREAM_CHUNK // c_) if s_ == 1 else 1
        bx = np.empty(max(STREAM_CHUNK, k * c_) if stream else 0, dx.dtype)
        br = np.empty(bx.size if res else 0, dr.dtype)
        if s_ == 1:
            if not stream:
                rows_bapply(dy, v, r, dx, dr, c_, n0, n1, n0 * c_, co, a, neg, rneg, sl, mk, fb,
                            fb8, kind, res, inplace, pre, msk)
                return
            for m0 in range(n0, n1, k):
                m1 = min(m0 + k, n1)
                rows_bapply(dy, v, r, bx, br, c_, m0, m1, _I0, co, a, neg, rneg, sl, mk, fb,
                            fb8, kind, res, inplace, False, msk)
                _stream(bx, dx, m0 * c_, (m1 - m0) * c_)
                if res:
                    _stream(br, dr, m0 * c_, (m1 - m0) * c_)
            return
        stride = c_ * s_
        if stream:
            base = _first_index(dx)
            end = (c1 - c0) * s_
            for n in range(n0, n1):
                o = n * stride + c0 * s_
                a0 = 0
                while a0 < end:
                    b0 = _chunk_end(base + o, a0, end)
                    chunk_bapply(dy, v, r, bx, br, o, a0, b0, s_, c0, co, a, neg, rneg, sl,
                                 mk, fb, fb8, kind, res, inplace, msk)
                    _stream(bx, dx, o + a0, b0 - a0)
                    if res:
                        _stream(br, dr, o + a0, b0 - a0)
                    a0 = b0
            return
        runs_bapply(dy, v, r, dx, dr, stride, s_, c0, c1, n0, n1, co, a, neg, rneg, sl, mk, fb,
                    fb8, kind, res, inplace, pre, msk)

    @njit(inline="always")
    @_named_as(tag)
    def forward_act(x, r, y, mk, n_, c_, s_, blocks, parts, mean, m2, invstd, var_in, weight,
                    bias, rmean, rvar, new_rmean, new_rvar, eps, momentum, do_stats, mode,
                    slope, pm, pq, coef, phase, units, ctl):
        """``y = act(BN(x) + r)`` (``r`` of size 0: no residual; ``y`` may be ``x``).

        ``do_stats``: batch statistics (and running update) as ``numba_kernels.forward``;
        otherwise ``mean`` and ``var_in`` with ``eps`` normalize. ``mode``: the activation's
        code plus 8 times ``stream``: 0 direct stores, 1 non-temporal stores for ``y`` (see
        ``numba_kernels._stream``), 2 ``y`` is ``x``: the elementwise pass computes chunks
        into a buffer and copies them (``numba_kernels._put``). ``mk`` (size > 0; relu or
        leaky_relu with a residual, not in place): the activation mask is written too (see
        "the activation mask" above).
        """
        act = mode & 7
        stream = mode >> 3
        n = units
        k = _claim(ctl, n)
        while k < n:
            if phase == 0:
                t = k
                c0, c1 = _span(c_, blocks, t // parts)
                n0, n1 = _span(n_, parts, t % parts)
                cnt = 0.0
                if do_stats:
                    cnt = _task_stats(x, c_, s_, c0, c1, n0, n1, pm[t % parts], pq[t % parts],
                                      coef)
                if parts == 1:
                    if do_stats:
                        _train_coefs(c0, c1, cnt, pm[0], pq[0], _I0, mean, m2, invstd, rmean,
                                     rvar, new_rmean, new_rvar, eps, momentum, weight, bias,
                                     coef)
                    else:
                        _given_coefs(c0, c1, mean, invstd, var_in, eps, weight, bias, coef)
                    task_act(x, r, y, mk, c_, s_, c0, c1, n0, n1, coef, act, slope, stream)
            elif phase == 1:
                _merge_unit(k, n_, c_, s_, do_stats, pm, pq, mean, m2, invstd, var_in, rmean,
                            rvar, new_rmean, new_rvar, eps, momentum, weight, bias, coef)
            else:
                t = units - 1 - k
                c0, c1 = _span(c_, blocks, t // parts)
                n0, n1 = _span(n_, parts, t % parts)
                task_act(x, r, y, mk, c_, s_, c0, c1, n0, n1, coef, act, slope, stream)
            _unit_done(ctl, stream)
            k = _claim(ctl, n)

    @njit(inline="always")
    @_named_as(tag)
    def backward_act(dy, v, r, mk, dx, dr, n_, c_, s_, blocks, parts, mean, invstd, weight,
                     bias, sum_dz, sum_dzx, count, do_reduce, do_apply, training, inplace,
                     mode, slope, pm, pq, coef, phase, units, ctl):
        """Backward of ``y = act(BN(x) + r)``; ``v`` is ``x`` or (``inplace``) ``y``;
        ``mode``: the activation's code plus 8 for non-temporal stores (``stream``); ``mk``
        (size > 0): the forward's activation mask, read instead of ``r`` (then empty).

        Phase 3 (run first, ``MERGE_CHUNK`` channels a unit) writes ``coef`` rows 0-6 from
        the saved ``mean``, ``invstd`` and the affine parameters; phases 0-2 as the
        forward's. ``do_reduce``: ``sum_dz`` and ``sum_dzx = sum(dz * xhat)`` (else they are
        inputs). ``do_apply``: ``dx = w * invstd * (dz - sum_dz / count - xhat * sum_dzx /
        count)`` (training; ``w * invstd * dz`` in eval) and, with a residual, ``dr = dz``.
        ``stream``: non-temporal stores for ``dx`` and ``dr``.

        With a residual, in normal mode, not streamed, in the compute dtype and with both
        passes (``pre``), the reduction also writes ``dr = dz`` and the elementwise pass
        reads dz back from ``dr`` instead of recomputing it from ``dy``, ``x`` and ``r``: the
        second pass reads two inputs instead of three (``x`` for xhat, and ``dr``).
        """
        act = mode & 7
        stream = mode >= 8
        pre = ((r.size > 0 or mk.size > 0) and do_reduce and do_apply and not inplace
               and not stream and _same_dtype(dr, coef))
        n = units
        k = _claim(ctl, n)
        while k < n:
            if phase == 0:
                t = k
                c0, c1 = _span(c_, blocks, t // parts)
                n0, n1 = _span(n_, parts, t % parts)
                if do_reduce:
                    task_bred(dy, v, r, mk, dr, c_, s_, c0, c1, n0, n1, coef, act, slope,
                              inplace, pre, pm[t % parts], pq[t % parts])
                if parts == 1:
                    _bwd_finish(coef, sum_dz, sum_dzx, count, do_reduce, training, pm, pq, c0,
                                c1)
                    if do_apply:
                        task_bapply(dy, v, r, mk, dx, dr, c_, s_, c0, c1, n0, n1, coef, act,
                                    slope, inplace, pre, stream)
            elif phase == 1:
                a, b = _merge_range(k, c_)
                _bwd_finish(coef, sum_dz, sum_dzx, count, do_reduce, training, pm, pq, a, b)
            elif phase == 3:
                a, b = _merge_range(k, c_)
                _backward_pre(mean, invstd, weight, bias, coef, a, b)
            else:
                t = units - 1 - k
                c0, c1 = _span(c_, blocks, t // parts)
                n0, n1 = _span(n_, parts, t % parts)
                task_bapply(dy, v, r, mk, dx, dr, c_, s_, c0, c1, n0, n1, coef, act, slope,
                            inplace, pre, stream)
            _unit_done(ctl, stream)
            k = _claim(ctl, n)

    return forward_act, backward_act


# identity, relu and leaky_relu (elu, silu and gelu: numba_smooth_kernels)
forward_act, backward_act = kernels((0,))
