"""Fused BatchNorm + activation (+ residual) kernels for CPU, written with numba.

``y = act((x - mean) * invstd * weight + bias + residual)`` forward and its backward, built on
the statistics helpers, task partition and storage conversions of :mod:`.numba_kernels` (see
its docstring for the ``(n, c, s)`` views, run mode vs row mode, the phases and the numerics).
The pass structure is the plain BatchNorm kernels' own:

* forward: statistics (centred sums, Chan merge, running update), then one elementwise pass
  that normalizes, adds the residual and applies the activation; with one batch part per
  task a channel block is reduced and then written while it is still in cache;
* backward: one reduction of ``sum(dz)`` and ``sum(dz * xhat)`` with ``dz = dy * act'(z)``,
  then one elementwise pass writing ``dx`` and ``dresidual = dz`` together. ``z`` and
  ``xhat`` are recomputed: from ``x`` in normal mode (``xhat = (x - mean) * invstd``,
  ``z = xhat * w + b + r``), from the output ``y`` in in-place mode (``z = act^-1(y)``,
  ``xhat = (z - r - b) / w``, ``act'`` through ``y``).

Activations (codes): 0 identity, 1 relu, 2 leaky_relu(slope), 3 elu (alpha 1), 4 silu,
5 gelu (exact, erf). The activation code is loop-invariant, so LLVM unswitches the inner loops
per activation. Compute is float32 (float64 for float64 storage); per-run sums are in the
compute dtype, everything beyond in float64 (the statistics: see numba_kernels); results do
not depend on the thread count.
"""

from __future__ import annotations

import math

import numpy as np
from numba import types
from numba.extending import overload

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

__all__ = ["ACT_CODES", "PACKED", "backward_act", "forward_act"]

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


@njit(fastmath=_ELEM_MATH)
def _act(z, a, sl):
    if a == 1:
        return z if z > 0 else z - z
    if a == 2:
        return z if z > 0 else z * sl
    if a == 3:
        return z if z > 0 else np.expm1(z)
    if a == 4:
        return z / (_k(1.0, z) + np.exp(-z))
    if a == 5:
        return _k(0.5, z) * z * (_k(1.0, z) + math.erf(z * _k(_INV_SQRT2, z)))
    return z


@njit(fastmath=_ELEM_MATH)
def _dact(z, a, sl):
    """``act'(z)`` (0 at z = 0 for relu, as torch; at a NaN ``z`` 1 for relu and elu and the
    slope for leaky_relu, as torch's backward formulas give)."""
    one = _k(1.0, z)
    if a == 1:
        return _k(0.0, z) if z <= 0 else one
    if a == 2:
        return one if z > 0 else sl
    if a == 3:
        return np.exp(z) if z <= 0 else one
    if a == 4:
        s = one / (one + np.exp(-z))
        return s * (one + z * (one - s))
    if a == 5:
        cdf = _k(0.5, z) * (one + math.erf(z * _k(_INV_SQRT2, z)))
        return cdf + z * np.exp(_k(-0.5, z) * z * z) * _k(_INV_SQRT_2PI, z)
    return one


@njit(fastmath=_ELEM_MATH)
def _dact_y(y, a, sl):
    """``act'(z)`` through the output ``y`` (invertible activations)."""
    one = _k(1.0, y)
    if a == 2:
        return one if y > 0 else sl
    if a == 3:
        return one if y > 0 else y + one
    return one


@njit(fastmath=_ELEM_MATH)
def _inv_act(y, a, sl):
    """``z`` with ``act(z) = y`` (invertible activations; elu clamped as the composite)."""
    if a == 2:
        return y if y > 0 else y / sl
    if a == 3:
        return y if y > 0 else np.log1p(max(y, _k(-1.0 + 1e-7, y)))
    return y


def _by_flags(body, params: str, flags: tuple[str, ...], fastmath: set[str]):
    """A compiled ``f(*params, *flags)`` that calls the inline ``body(*params, *flags)`` with
    each boolean flag as a literal constant: one branch-free (vectorizable) copy of the loop
    per combination of flags, chosen once per call instead of tested per element."""
    names = params.split()
    lines = [f"def dispatch({', '.join(names + list(flags))}):"]

    def emit(depth: int, fixed: list[str], indent: int) -> None:
        pad = "    " * indent
        if depth == len(flags):
            lines.append(f"{pad}return body({', '.join(names + fixed)})")
            return
        lines.append(f"{pad}if {flags[depth]}:")
        emit(depth + 1, [*fixed, "True"], indent + 1)
        emit(depth + 1, [*fixed, "False"], indent)

    emit(0, [], 1)
    ns = {"body": body}
    exec("\n".join(lines), ns)
    return njit(fastmath=fastmath)(ns["dispatch"])


# ---- element and loop bodies ---------------------------------------------------------------
# The loop bodies take compile-time flags: ``lin`` (identity / relu / leaky_relu, all
# ``z > 0 ? z : neg * z``: selects only, so the loops vectorize), ``res`` (a residual is read)
# and ``inp`` (in-place: recompute from y). They are inlined (numba ``inline="always"``) into
# dispatchers that call them with literal flags, so LLVM sees one branch-free loop per case.
# ``neg``: 1 (identity), 0 (relu), slope (leaky_relu); ``rneg = 1 / neg``.


@njit(inline="always")
def _dz_xhat(g, v, rv, hi, inv, k0, w, b, rw, a, neg, rneg, sl, lin, inp):
    """``(dz, xhat)`` of one element: ``v`` is x (normal mode) or y (in-place mode)."""
    if inp:
        if lin:
            dz = g if v > 0 else g * neg
            z = v if v > 0 else v * rneg
        else:
            dz = g * _dact_y(v, a, sl)
            z = _inv_act(v, a, sl)
        return dz, (z - rv - b) * rw
    xh = (v - hi) * inv + k0
    z = xh * w + b + rv
    if lin:
        # as torch's threshold_backward, relu passes g at a NaN z and blocks it with a zero
        # where z <= 0 (not g * 0, which is NaN for an infinite g); leaky_relu scales it
        if z > 0 or (a == 1 and z != z):
            return g, xh
        return (_zero(g) if a == 1 else g * neg), xh
    return g * _dact(z, a, sl), xh


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
def _run_act_body(x, r, y, o, yo, s, hi, sc, sh, a, neg, sl, lin, res):
    for i in range(s):
        j = _u(o + i)
        z = (_ld(x[j]) - hi) * sc + sh
        if res:
            z = z + _ld(r[j])
        if lin:
            y[_u(yo + i)] = _st(_lin_act(z, neg), y)
        else:
            y[_u(yo + i)] = _st(_act(z, a, sl), y)


@njit(inline="always")
def _chunk_act_body(x, r, buf, o, a0, b0, s_, c0, coef, a, neg, sl, lin, res):
    p = a0
    while p < b0:  # the pieces of the runs in [a0, b0), as numba_kernels._chunk_norm
        j, q = _piece(p, b0, s_)
        c = c0 + j
        _run_act_body(x, r, buf, o + p, p - a0, q - p, coef[0, c], coef[1, c], coef[2, c], a,
                      neg, sl, lin, res)
        p = q


# buf[:b0 - a0] from x (and r) at [o + a0, o + b0): a stream or in-place chunk, one call (a
# call per piece, through the flags' dispatch, measured 1.1-2.1x slower in place: (32, 512,
# 7, 7) forward 0.438 -> 0.225 ms, (32, 256, 14, 14) 0.447 -> 0.351 ms; streamed (32, 256, 28,
# 28) 1.52 -> 0.89 ms)
_chunk_act = _by_flags(_chunk_act_body, "x r buf o a0 b0 s_ c0 coef a neg sl", ("lin", "res"),
                       _ELEM_MATH)


@njit(inline="always")
def _runs_act_body(x, r, y, stride, s_, c0, c1, n0, n1, coef, a, neg, sl, lin, res):
    for n in range(n0, n1):
        o = n * stride + c0 * s_
        for c in range(c0, c1):
            _run_act_body(x, r, y, o, o, s_, coef[0, c], coef[1, c], coef[2, c], a, neg, sl,
                          lin, res)
            o += s_


# a task's runs (channels-first, not streamed) with the flags chosen once per task
_runs_act = _by_flags(_runs_act_body, "x r y stride s_ c0 c1 n0 n1 coef a neg sl",
                      ("lin", "res"), _ELEM_MATH)


@njit(inline="always")
def _rows_act_body(x, r, y, c_, n0, n1, yo, hi, sc, sh, a, neg, sl, lin, res):
    for n in range(n0, n1):
        p = n * c_
        q = yo + (n - n0) * c_
        for j in range(c_):
            i = _u(p + j)
            u = _u(j)
            z = (_ld(x[i]) - hi[u]) * sc[u] + sh[u]
            if res:
                z = z + _ld(r[i])
            if lin:
                y[_u(q + j)] = _st(_lin_act(z, neg), y)
            else:
                y[_u(q + j)] = _st(_act(z, a, sl), y)


_rows_act_flags = _by_flags(_rows_act_body, "x r y c_ n0 n1 yo hi sc sh a neg sl",
                           ("lin", "res"), _ELEM_MATH)


@njit(inline="always")
def _rows_act(x, r, y, c_, n0, n1, yo, hi, sc, sh, a, neg, sl):
    """Rows [n0, n1) into y from item yo on (the output, or a stream buffer)."""
    _rows_act_flags(x, r, y, c_, n0, n1, yo, hi, sc, sh, a, neg, sl, a <= 2, r.size > 0)


@njit
def _negs(a, sl):
    """(neg, 1 / neg) of the piecewise-linear activations, in sl's dtype."""
    one = _k(1.0, sl)
    neg = one if a == 0 else (_k(0.0, sl) if a == 1 else sl)
    return neg, (one / neg if neg != 0 else one)


@njit
def _task_act(x, r, y, c_, s_, c0, c1, n0, n1, coef, a, slope, stream):
    sl = _k(slope, coef[0, 0])
    neg, _ = _negs(a, sl)
    if s_ == 1:
        if not stream:
            _rows_act(x, r, y, c_, n0, n1, n0 * c_, coef[0], coef[1], coef[2], a, neg, sl)
            return
        # whole rows per chunk (rows are contiguous; a chunk boundary is a partial line)
        k = max(1, STREAM_CHUNK // c_)
        buf = np.empty(k * c_, y.dtype)
        for m0 in range(n0, n1, k):
            m1 = min(m0 + k, n1)
            _rows_act(x, r, buf, c_, m0, m1, _I0, coef[0], coef[1], coef[2], a, neg, sl)
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
                _chunk_act(x, r, buf, o, a0, b0, s_, c0, coef, a, neg, sl, a <= 2, r.size > 0)
                _put(buf, y, o + a0, b0 - a0, stream)
                a0 = b0
        return
    _runs_act(x, r, y, stride, s_, c0, c1, n0, n1, coef, a, neg, sl, a <= 2, r.size > 0)


# ---- backward: reduction and elementwise pass ---------------------------------------------
# coef rows (compute dtype): 0 mean_hi, 1 invstd, 2 k0 = -(mean - mean_hi) * invstd,
# 3 weight, 4 bias, 5 1 / weight, 6 weight * invstd, 7 -sum_dz / count,
# 8 -sum_dz_xhat / count (7 and 8 zero in eval). The elementwise pass always writes dx, and
# dresidual = dz when there is a residual (the host passes scratch for one not asked for).


@njit(inline="always")
def _run_bred_body(dy, v, r, o, s, hi, inv, k0, w, b, rw, a, neg, rneg, sl, lin, res, inp):
    s1 = _zero(hi)
    s2 = _zero(hi)
    for i in range(o, o + s):
        rv = _ld(r[_u(i)]) if res else _zero(hi)
        dz, xh = _dz_xhat(_ld(dy[_u(i)]), _ld(v[_u(i)]), rv, hi, inv, k0, w, b, rw, a, neg,
                          rneg, sl, lin, inp)
        s1 += dz
        s2 += dz * xh
    return np.float64(s1), np.float64(s2)


_run_bred_flags = _by_flags(_run_bred_body, "dy v r o s hi inv k0 w b rw a neg rneg sl",
                           ("lin", "res", "inp"), _REDUCE_MATH)


@njit(inline="always")
def _run_bred(dy, v, r, o, s, co, c, a, neg, rneg, sl, inp):
    """(sum dz, sum dz * xhat) of one run, float64 (compute-dtype partial sums)."""
    return _run_bred_flags(dy, v, r, o, s, co[0, c], co[1, c], co[2, c], co[3, c], co[4, c],
                           co[5, c], a, neg, rneg, sl, a <= 2, r.size > 0, inp)


@njit(inline="always")
def _runs_bred_body(dy, v, r, stride, s_, c0, c1, n0, n1, co, a, neg, rneg, sl, sdz, sdx,
                    lin, res, inp):
    for n in range(n0, n1):
        o = n * stride + c0 * s_
        for c in range(c0, c1):
            u, w = _run_bred_body(dy, v, r, o, s_, co[0, c], co[1, c], co[2, c], co[3, c],
                                  co[4, c], co[5, c], a, neg, rneg, sl, lin, res, inp)
            sdz[c] += u
            sdx[c] += w
            o += s_


# a task's runs (of at most ROW_SEGMENT values) with the flags chosen once per task: per
# run, the choice and a call cost as much as the 49 values of a 7x7 run
_runs_bred = _by_flags(_runs_bred_body,
                       "dy v r stride s_ c0 c1 n0 n1 co a neg rneg sl sdz sdx",
                       ("lin", "res", "inp"), _REDUCE_MATH)


@njit(inline="always")
def _run_bapply_body(dy, v, r, dx, dr, o, yo, s, hi, inv, k0, w, b, rw, sc, k1, k2, a, neg,
                     rneg, sl, lin, res, inp):
    for i in range(s):
        j = _u(o + i)
        rv = _ld(r[j]) if res else _zero(hi)
        dz, xh = _dz_xhat(_ld(dy[j]), _ld(v[j]), rv, hi, inv, k0, w, b, rw, a, neg, rneg, sl,
                          lin, inp)
        dx[_u(yo + i)] = _st(sc * (dz + k1 + _xterm(xh, _zero(xh), k2)), dx)
        if res:
            dr[_u(yo + i)] = _st(dz, dr)


@njit(inline="always")
def _chunk_bapply_body(dy, v, r, dx, dr, o, a0, b0, s_, c0, co, a, neg, rneg, sl, lin, res,
                       inp):
    p = a0
    while p < b0:  # the pieces of the runs in [a0, b0), as numba_kernels._chunk_norm
        j, q = _piece(p, b0, s_)
        c = c0 + j
        _run_bapply_body(dy, v, r, dx, dr, o + p, p - a0, q - p, co[0, c], co[1, c], co[2, c],
                         co[3, c], co[4, c], co[5, c], co[6, c], co[7, c], co[8, c], a, neg,
                         rneg, sl, lin, res, inp)
        p = q


# dx[:b0 - a0] (and dr) from the inputs at [o + a0, o + b0): a stream chunk, one call (as
# _chunk_act: streamed backward of (32, 1024, 14, 14) 4.13 -> 3.04 ms)
_chunk_bapply = _by_flags(
    _chunk_bapply_body, "dy v r dx dr o a0 b0 s_ c0 co a neg rneg sl", ("lin", "res", "inp"),
    _EXACT_MATH)


@njit(inline="always")
def _runs_bapply_body(dy, v, r, dx, dr, stride, s_, c0, c1, n0, n1, co, a, neg, rneg, sl,
                      lin, res, inp):
    for n in range(n0, n1):
        o = n * stride + c0 * s_
        for c in range(c0, c1):
            _run_bapply_body(dy, v, r, dx, dr, o, o, s_, co[0, c], co[1, c], co[2, c],
                             co[3, c], co[4, c], co[5, c], co[6, c], co[7, c], co[8, c], a,
                             neg, rneg, sl, lin, res, inp)
            o += s_


_runs_bapply = _by_flags(_runs_bapply_body,
                         "dy v r dx dr stride s_ c0 c1 n0 n1 co a neg rneg sl",
                         ("lin", "res", "inp"), _EXACT_MATH)


@njit(inline="always")
def _rows_bred_body(dy, v, r, o, nrows, c_, co, a, neg, rneg, sl, q1, q2, lin, res, inp):
    hi, inv, k0, w, b, rw = co[0], co[1], co[2], co[3], co[4], co[5]
    zero = _zero(q1[0])
    for n in range(nrows):
        p = o + n * c_
        for j in range(c_):
            i = _u(p + j)
            u = _u(j)
            rv = _ld(r[i]) if res else zero
            dz, xh = _dz_xhat(_ld(dy[i]), _ld(v[i]), rv, hi[u], inv[u], k0[u], w[u], b[u],
                              rw[u], a, neg, rneg, sl, lin, inp)
            q1[u] += dz
            q2[u] += dz * xh


_rows_bred_flags = _by_flags(_rows_bred_body, "dy v r o nrows c_ co a neg rneg sl q1 q2",
                             ("lin", "res", "inp"), _ELEM_MATH)


@njit(inline="always")
def _rows_bred(dy, v, r, o, nrows, c_, co, a, sl, inplace, q1, q2):
    """Row mode: per-channel sums (compute dtype) over ``nrows`` rows from offset ``o``.
    The coefficients are read as rows of ``co`` with unsigned indices, and the flags are
    constants in each copy of the loop: indexed as ``co[k, j]`` with the flags tested per
    element, the elementwise pass ran 10x slower (40 ms for (32, 2048, 7, 7))."""
    q1[:] = 0.0
    q2[:] = 0.0
    neg, rneg = _negs(a, sl)
    _rows_bred_flags(dy, v, r, o, nrows, c_, co, a, neg, rneg, sl, q1, q2, a <= 2,
                     r.size > 0, inplace)


@njit(inline="always")
def _rows_bapply_body(dy, v, r, dx, dr, c_, n0, n1, yo, co, a, neg, rneg, sl, lin, res,
                      inp):
    hi, inv, k0, w, b, rw = co[0], co[1], co[2], co[3], co[4], co[5]
    sc, k1, k2 = co[6], co[7], co[8]
    zero = _zero(co[0, 0])  # (not co - co: channel 0's NaN would reach every channel)
    for n in range(n0, n1):
        p = n * c_
        q = yo + (n - n0) * c_
        for j in range(c_):
            i = _u(p + j)
            u = _u(j)
            rv = _ld(r[i]) if res else zero
            dz, xh = _dz_xhat(_ld(dy[i]), _ld(v[i]), rv, hi[u], inv[u], k0[u], w[u], b[u],
                              rw[u], a, neg, rneg, sl, lin, inp)
            dx[_u(q + j)] = _st(sc[u] * (dz + k1[u] + _xterm(xh, zero, k2[u])), dx)
            if res:
                dr[_u(q + j)] = _st(dz, dr)


_rows_bapply_flags = _by_flags(_rows_bapply_body,
                               "dy v r dx dr c_ n0 n1 yo co a neg rneg sl",
                               ("lin", "res", "inp"), _ELEM_MATH)


@njit(inline="always")
def _rows_bapply(dy, v, r, dx, dr, c_, n0, n1, yo, co, a, sl, inplace):
    """Rows [n0, n1) into dx (and dr) from item yo on (the outputs, or stream buffers)."""
    neg, rneg = _negs(a, sl)
    _rows_bapply_flags(dy, v, r, dx, dr, c_, n0, n1, yo, co, a, neg, rneg, sl, a <= 2,
                       r.size > 0, inplace)


@njit
def _task_bred(dy, v, r, c_, s_, c0, c1, n0, n1, co, a, slope, inplace, sdz, sdx):
    """float64 sum(dz)[c], sum(dz * xhat)[c] for c in [c0, c1) over rows [n0, n1)."""
    sl = _k(slope, co[0, 0])
    for c in range(c0, c1):
        sdz[c] = 0.0
        sdx[c] = 0.0
    if s_ == 1:
        q1 = np.empty(c_, co.dtype)
        q2 = np.empty(c_, co.dtype)
        seg = max(1, ROW_SEGMENT // c_)
        for m0 in range(n0, n1, seg):
            m1 = min(m0 + seg, n1)
            _rows_bred(dy, v, r, m0 * c_, m1 - m0, c_, co, a, sl, inplace, q1, q2)
            for c in range(c_):
                sdz[c] += np.float64(q1[c])
                sdx[c] += np.float64(q2[c])
        return
    neg, rneg = _negs(a, sl)
    stride = c_ * s_
    if s_ > ROW_SEGMENT:
        # long runs in pieces of ROW_SEGMENT values (as numba_kernels._task_bred_long)
        for n in range(n0, n1):
            for c in range(c0, c1):
                o = n * stride + c * s_
                for p in range(0, s_, ROW_SEGMENT):
                    u, w = _run_bred(dy, v, r, o + p, min(ROW_SEGMENT, s_ - p), co, c, a, neg,
                                     rneg, sl, inplace)
                    sdz[c] += u
                    sdx[c] += w
        return
    _runs_bred(dy, v, r, stride, s_, c0, c1, n0, n1, co, a, neg, rneg, sl, sdz, sdx, a <= 2,
               r.size > 0, inplace)


@njit
def _task_bapply(dy, v, r, dx, dr, c_, s_, c0, c1, n0, n1, co, a, slope, inplace, stream):
    """dx (and dr) of rows [n0, n1) x channels [c0, c1); streamed as in _task_act (dx and
    dr are the same shape, so one chunking serves both)."""
    sl = _k(slope, co[0, 0])
    k = max(1, STREAM_CHUNK // c_) if s_ == 1 else 1
    bx = np.empty(max(STREAM_CHUNK, k * c_) if stream else 0, dx.dtype)
    br = np.empty(bx.size if r.size > 0 else 0, dr.dtype)
    if s_ == 1:
        if not stream:
            _rows_bapply(dy, v, r, dx, dr, c_, n0, n1, n0 * c_, co, a, sl, inplace)
            return
        for m0 in range(n0, n1, k):
            m1 = min(m0 + k, n1)
            _rows_bapply(dy, v, r, bx, br, c_, m0, m1, _I0, co, a, sl, inplace)
            _stream(bx, dx, m0 * c_, (m1 - m0) * c_)
            if r.size > 0:
                _stream(br, dr, m0 * c_, (m1 - m0) * c_)
        return
    neg, rneg = _negs(a, sl)
    stride = c_ * s_
    if stream:
        base = _first_index(dx)
        end = (c1 - c0) * s_
        for n in range(n0, n1):
            o = n * stride + c0 * s_
            a0 = 0
            while a0 < end:
                b0 = _chunk_end(base + o, a0, end)
                _chunk_bapply(dy, v, r, bx, br, o, a0, b0, s_, c0, co, a, neg, rneg, sl,
                              a <= 2, r.size > 0, inplace)
                _stream(bx, dx, o + a0, b0 - a0)
                if r.size > 0:
                    _stream(br, dr, o + a0, b0 - a0)
                a0 = b0
        return
    _runs_bapply(dy, v, r, dx, dr, stride, s_, c0, c1, n0, n1, co, a, neg, rneg, sl, a <= 2,
                 r.size > 0, inplace)


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
    "forward_act": "s1 s1 s1 i i i i i a1 a1 a1 a1 a1 a1 a1 a1 a1 a1 f f b i f i d2 d2 a2",
    "backward_act": "s1 s1 s1 s1 s1 i i i i i a1 a1 a1 a1 a1 a1 f b b b b i f b d2 d2 a2",
}


@njit(inline="always")
def forward_act(x, r, y, n_, c_, s_, blocks, parts, mean, m2, invstd, var_in, weight, bias,
                rmean, rvar, new_rmean, new_rvar, eps, momentum, do_stats, act, slope, stream,
                pm, pq, coef, phase, units, ctl):
    """``y = act(BN(x) + r)`` (``r`` of size 0: no residual; ``y`` may be ``x``).

    ``do_stats``: batch statistics (and running update) as ``numba_kernels.forward``;
    otherwise ``mean`` and ``var_in`` with ``eps`` normalize. ``stream``: 0 direct stores,
    1 non-temporal stores for ``y`` (see ``numba_kernels._stream``), 2 ``y`` is ``x``: the
    elementwise pass computes chunks into a buffer and copies them (``numba_kernels._put``).
    """
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
                    _train_coefs(c0, c1, cnt, pm[0], pq[0], _I0, mean, m2, invstd, rmean, rvar,
                                 new_rmean, new_rvar, eps, momentum, weight, bias, coef)
                else:
                    _given_coefs(c0, c1, mean, invstd, var_in, eps, weight, bias, coef)
                _task_act(x, r, y, c_, s_, c0, c1, n0, n1, coef, act, slope, stream)
        elif phase == 1:
            _merge_unit(k, n_, c_, s_, do_stats, pm, pq, mean, m2, invstd, var_in, rmean,
                        rvar, new_rmean, new_rvar, eps, momentum, weight, bias, coef)
        else:
            t = units - 1 - k
            c0, c1 = _span(c_, blocks, t // parts)
            n0, n1 = _span(n_, parts, t % parts)
            _task_act(x, r, y, c_, s_, c0, c1, n0, n1, coef, act, slope, stream)
        _unit_done(ctl, stream)
        k = _claim(ctl, n)


@njit(inline="always")
def backward_act(dy, v, r, dx, dr, n_, c_, s_, blocks, parts, mean, invstd, weight, bias,
                 sum_dz, sum_dzx, count, do_reduce, do_apply, training, inplace, act, slope,
                 stream, pm, pq, coef, phase, units, ctl):
    """Backward of ``y = act(BN(x) + r)``; ``v`` is ``x`` or (``inplace``) ``y``.

    Phase 3 (run first, ``MERGE_CHUNK`` channels a unit) writes ``coef`` rows 0-6 from the
    saved ``mean``, ``invstd`` and the affine parameters; phases 0-2 as the forward's.
    ``do_reduce``: ``sum_dz`` and
    ``sum_dzx = sum(dz * xhat)`` (else they are inputs). ``do_apply``: ``dx = w * invstd *
    (dz - sum_dz / count - xhat * sum_dzx / count)`` (training; ``w * invstd * dz`` in eval)
    and, with a residual, ``dr = dz``. ``stream``: non-temporal stores for ``dx`` and ``dr``.
    """
    n = units
    k = _claim(ctl, n)
    while k < n:
        if phase == 0:
            t = k
            c0, c1 = _span(c_, blocks, t // parts)
            n0, n1 = _span(n_, parts, t % parts)
            if do_reduce:
                _task_bred(dy, v, r, c_, s_, c0, c1, n0, n1, coef, act, slope, inplace,
                           pm[t % parts], pq[t % parts])
            if parts == 1:
                _bwd_finish(coef, sum_dz, sum_dzx, count, do_reduce, training, pm, pq, c0, c1)
                if do_apply:
                    _task_bapply(dy, v, r, dx, dr, c_, s_, c0, c1, n0, n1, coef, act, slope,
                                 inplace, stream)
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
            _task_bapply(dy, v, r, dx, dr, c_, s_, c0, c1, n0, n1, coef, act, slope, inplace,
                         stream)
        _unit_done(ctl, stream)
        k = _claim(ctl, n)
