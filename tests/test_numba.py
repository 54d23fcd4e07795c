"""The "numba" backend: fused CPU kernels against the float64 reference and torch.nn.

The core suites (test_parity, test_semantics, test_autograd) already run with every available
backend on small shapes, which the numba backend handles on one thread in one task. The cases
here are the kernels' own: every layout and rank with shapes that reach the parallel, split and
chunked paths, every storage dtype, the four primitives SyncBatchNorm uses, thread-count
invariance, precision far from zero, rounding of half types, zero-copy views, and
torch.compile / torch.export with this backend selected.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("numba", reason="the numba backend needs numba (pip install numba)")

import batchnorm
from batchnorm import reference as ref
from batchnorm.backends import get_backend, resolve_backend
from batchnorm.backends.base import empty_out_like
from batchnorm.catalog import EDGE, FAST
from helpers import (
    STAT_TOLERANCES,
    TOLERANCES,
    assert_close,
    assert_same_non_finite,
    is_channels_last,
    make_input,
    to_channels_last,
)

BACKEND = "numba"
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# Shapes that take the kernels' other paths (the FAST/EDGE ones are all one small task):
# many channel blocks (parallel, fused), few channels (batch split into parts, merged),
# channels-last chunks with rows left over, 7x7 runs, wide rows, rank 2 and 5.
PATHS: list[tuple[str, tuple[int, ...]]] = [
    ("blocks", (8, 40, 17, 19)),
    ("few_channels", (24, 3, 40, 41)),
    ("one_channel_split", (33, 1, 2500)),
    ("runs_7x7", (16, 96, 7, 7)),
    ("wide_rows", (37, 2051)),
    ("chunks_5d", (3, 20, 9, 23, 13)),
]


def _cases(shapes):
    return [
        pytest.param(name, shape, cl, id=f"{name}-{'cl' if cl else 'cf'}")
        for name, shape in shapes
        for cl in ((False, True) if len(shape) >= 3 else (False,))
    ]


def _params(c, dtype, affine=True):
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    if not affine:
        return None, None
    w = (torch.rand(c, dtype=pdtype) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=pdtype).requires_grad_()
    return w, b


def _check_against_reference(shape, dtype, channels_last, training, affine=True, track=True,
                             shift=0.5):
    c = shape[1]
    x = make_input(shape, dtype, channels_last, shift=shift).requires_grad_()
    dy = make_input(shape, dtype, channels_last, shift=0.0, scale=1.0)
    w, b = _params(c, dtype, affine)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    rm = torch.randn(c, dtype=pdtype) if track else None
    rv = torch.rand(c, dtype=pdtype) + 0.5 if track else None
    rm0 = None if rm is None else rm.clone()
    rv0 = None if rv is None else rv.clone()
    y = batchnorm.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, backend=BACKEND)
    y.backward(dy)
    assert y.dtype == dtype
    assert y.is_contiguous() == x.is_contiguous()
    assert is_channels_last(y) == is_channels_last(x)

    xn, dyn = x.detach().double().numpy(), dy.double().numpy()
    wn = None if w is None else w.detach().double().numpy()
    bn_ = None if b is None else b.detach().double().numpy()
    if training:
        y_ref, st, inv = ref.forward_train(xn, wn, bn_, 1e-5)
        mean = st.mean
    else:
        mean, inv = rm0.double().numpy(), ref.invstd(rv0.double().numpy(), 1e-5)
        y_ref = ref.forward_eval(xn, rm0.double().numpy(), rv0.double().numpy(), wn, bn_, 1e-5)
    dx_ref, dw_ref, db_ref = ref.backward(dyn, xn, mean, inv, wn, training)

    atol, rtol = TOLERANCES[dtype]
    satol, srtol = STAT_TOLERANCES[dtype]
    what = f"{shape} {dtype} cl={channels_last} training={training} affine={affine}"
    assert_close(y, y_ref, atol, rtol, f"{what} y")
    # dx also carries the conditioning of x-hat in the statistics dtype (as in test_properties:
    # the saved mean is rounded to eps * |x|, an error of eps * |x| * invstd in x-hat, which
    # dx amplifies by w * invstd * |dy|; with two close values per channel invstd is large).
    eps = float(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps)
    w_max = 1.0 if wn is None else float(np.abs(wn).max())
    inv_max = float(np.max(inv))
    cond = 4 * eps * float(np.abs(xn).max()) * inv_max**2 * w_max * float(np.abs(dyn).max())
    gscale = max(1.0, float(np.abs(dx_ref).max()))
    assert_close(x.grad, dx_ref, atol * gscale + cond, rtol, f"{what} dx")
    if affine:
        m = x.numel() // c
        # sums of m products of dtype-rounded values, accumulated in fp32 at least; plus the
        # saved mean's rounding (to the statistics dtype, as in ATen): sum(dy * (x - mean))
        # moves by sum(dy) * (mean error), which is large when dy has a mean of its own
        sum_dy = float(np.abs(db_ref).max())  # db = sum(dy)
        mean_err = 2 * eps * float(np.abs(mean).max()) * inv_max
        assert_close(w.grad, dw_ref, satol * m**0.5 + sum_dy * mean_err, srtol,
                     f"{what} dweight")
        assert_close(b.grad, db_ref, satol * m**0.5, srtol, f"{what} dbias")
    if training and track:
        rm_ref, rv_ref = ref.update_running(rm0.double().numpy(), rv0.double().numpy(), st,
                                            0.1, 1)
        assert_close(rm, rm_ref, satol, srtol, f"{what} running_mean")
        assert_close(rv, rv_ref, satol, srtol, f"{what} running_var")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "shape", "channels_last"), _cases(FAST + PATHS))
def test_train_and_eval_match_reference(dtype, name, shape, channels_last):
    for training in (True, False):
        _check_against_reference(shape, dtype, channels_last, training)


@pytest.mark.parametrize(("name", "shape", "channels_last"), _cases(EDGE + PATHS))
def test_options_match_reference(name, shape, channels_last):
    """Affine on/off and running stats on/off, train and eval, fp32."""
    for affine, track, training in itertools.product([True, False], [True, False],
                                                      [True, False]):
        if training or track:
            _check_against_reference(shape, torch.float32, channels_last, training, affine,
                                     track)


@pytest.mark.parametrize(("name", "shape", "channels_last"),
                         _cases([("nchw", (16, 24, 20, 20)), ("nc", (4096, 6)),
                                 ("ncl", (64, 8, 300))]))
def test_statistics_far_from_zero_fp32(name, shape, channels_last):
    """x = 1e4 + N(0, 1) in fp32: variance to 1e-5 relative, output within the fp32 row
    (the folded x * scale + shift form would be off by ~1e-3 here)."""
    x = (1e4 + torch.randn(shape, dtype=torch.float64)).float()
    if channels_last:
        x = to_channels_last(x)
    y, mean, invstd, _, _ = get_backend(BACKEND).forward_train(x, None, None, None, None, 0.1,
                                                               1e-5)
    y_ref, st, _ = ref.forward_train(x.double().numpy(), eps=1e-5)
    var = 1.0 / invstd.double().numpy() ** 2 - 1e-5
    assert_close(var, st.var, 0.0, 1e-5, f"{name} variance")
    assert_close(mean, st.mean, 0.0, 6e-8, f"{name} mean (saved in fp32: rounding only)")
    assert_close(y, y_ref, *TOLERANCES[torch.float32], f"{name} y")


@pytest.mark.parametrize(("name", "shape", "channels_last"),
                         _cases([("nchw", (16, 24, 20, 20)), ("rows", (3000, 37))]))
@pytest.mark.parametrize("z", [0.0, 7.9, 8.1, 40.0])
def test_folded_coefficients_near_their_threshold(name, shape, channels_last, z):
    """|mean| / std = z on both sides of FOLD_Z = 8, where the kernels switch between the
    centred ``(x - mean) * scale + shift`` and the folded ``x * scale + shift'`` (and the
    backward's alike), in float32 against the float64 reference, per channel: y (train and
    eval) within 8 ulps of ``|w| + |b|``, dx within 6 ulps of ``w * invstd * max|dy|`` (with
    dy correlated with x-hat, so that the backward's ``b * mean`` term is large). Measured:
    2-4 ulps either way up to z = 40; folding everywhere gives 13-14 (y) and 9 (dx) at z = 40,
    so these bounds fail if the fold reaches that far."""
    from batchnorm.backends.numba_kernels import FOLD_Z

    assert FOLD_Z == 8.0
    c = shape[1]
    std = 2.0
    ulp = float(torch.finfo(torch.float32).eps)
    bshape = (1, -1, *([1] * (len(shape) - 2)))
    center = z * std * torch.where(torch.arange(c) % 2 == 0, 1.0, -1.0).double()
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    x64 = noise * std + center.view(bshape)
    dy64 = 0.7 * noise + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    x, dy = x64.float(), dy64.float()
    if channels_last:
        x, dy = to_channels_last(x), to_channels_last(dy)
    x.requires_grad_()
    w = (torch.rand(c, generator=g) + 0.5).requires_grad_()
    b = torch.randn(c, generator=g).requires_grad_()
    y = batchnorm.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, backend=BACKEND)
    y.backward(dy)
    xn, dyn = x.detach().double().numpy(), dy.double().numpy()
    wn, bn_ = w.detach().double().numpy(), b.detach().double().numpy()
    y_ref, st, inv = ref.forward_train(xn, wn, bn_, 1e-5)
    dx_ref, dw_ref, db_ref = ref.backward(dyn, xn, st.mean, inv, wn, True)
    y_scale = (np.abs(wn) + np.abs(bn_)).reshape(bshape)
    dx_scale = (np.abs(wn) * inv).reshape(bshape) * float(np.abs(dyn).max())
    what = f"{name} cl={channels_last} z={z}"
    assert_close(y.detach().double().numpy() / y_scale, y_ref / y_scale, 8 * ulp, 0.0,
                 f"{what} y (in units of |w| + |b|)")
    assert_close(x.grad.double().numpy() / dx_scale, dx_ref / dx_scale, 6 * ulp, 0.0,
                 f"{what} dx (in units of w * invstd * max|dy|)")
    m = x.numel() // c
    # (as in _check_against_reference: the saved mean's rounding moves sum(dy * (x - mean))
    # by sum(dy) times it; the reductions are the same for both forms)
    mean_err = 2 * ulp * float(np.abs(st.mean).max()) * float(np.max(inv))
    assert_close(w.grad, dw_ref, STAT_TOLERANCES[torch.float32][0] * m**0.5
                 + float(np.abs(db_ref).max()) * mean_err, 1e-4, f"{what} dweight")
    assert_close(b.grad, db_ref, STAT_TOLERANCES[torch.float32][0] * m**0.5, 1e-4,
                 f"{what} dbias")
    # eval with running statistics at the same distance from 0
    rm, rv = center.float(), torch.full((c,), std**2)
    with torch.no_grad():
        ye = batchnorm.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, backend=BACKEND)
    ye_ref = ref.forward_eval(xn, rm.double().numpy(), rv.double().numpy(), wn, bn_, 1e-5)
    assert_close(ye.double().numpy() / y_scale, ye_ref / y_scale, 8 * ulp, 0.0,
                 f"{what} eval y (in units of |w| + |b|)")


def test_folded_loops_give_the_centred_loops_bits():
    """The loops' folded copies (``fold``: every ``hi`` 0, not read) give exactly what their
    general copies give with ``hi = 0`` (so which one runs is a matter of speed only), NaN,
    inf, -0 and a zero backward coefficient ``b`` (eval: x must not reach dx) included."""
    from batchnorm.backends import numba_kernels as nk

    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        w, rows = 40, 7
        x = rng.standard_normal(w * rows).astype(dtype) * 3
        x[[1, 5, 44, 90]] = [np.nan, np.inf, -np.inf, -0.0]
        dy = rng.standard_normal(w * rows).astype(dtype)
        sc, sh, k = (rng.standard_normal(w).astype(dtype) for _ in range(3))
        bb = rng.standard_normal(w).astype(dtype)
        bb[[2, 5, 9]] = 0.0
        sh[3] = -0.0
        zero = np.zeros(w, dtype)
        out = [np.empty(w * rows, dtype) for _ in range(4)]
        nk._rows_norm(x, 0, out[0], 0, w, rows, zero, sc, sh, nk._I0, False)
        nk._rows_norm(x, 0, out[1], 0, w, rows, sc, sc, sh, nk._I0, True)  # (hi not read)
        nk._rows_bapply(dy, x, 0, out[2], 0, w, rows, zero, sc, bb, k, nk._I0, False)
        nk._rows_bapply(dy, x, 0, out[3], 0, w, rows, sc, sc, bb, k, nk._I0, True)
        for a, e in ((out[1], out[0]), (out[3], out[2])):
            assert np.array_equal(a.view(np.uint8), e.view(np.uint8)), (
                f"{dtype.__name__}: folded loop differs at {np.flatnonzero(a.view(a.dtype) != e)}")
        assert np.isfinite(out[2].reshape(rows, w)[:, [2, 5, 9]]).all()


def test_coefficients_fold_only_near_zero():
    """_coef3 folds (hi = 0) only where |mean| * invstd <= FOLD_Z and all is finite."""
    from batchnorm.backends import numba_kernels as nk

    like = np.zeros((3, 1), np.float32)
    for mu, inv, folded in ((0.5, 2.0, True), (-4.0, 2.0, True), (4.5, 2.0, False),
                            (1e4, 1.0, False), (np.inf, 1.0, False), (np.nan, 1.0, False),
                            (0.5, np.inf, False), (1e-39, 1e39, False)):
        hi, _, sh = nk._coef3(mu, inv, 1.5, 0.25, like)
        assert (hi == 0.0) == folded, (mu, inv, hi)
        if folded:
            assert abs(sh - (0.25 - mu * float(np.float32(inv * 1.5)))) <= 1e-12


@pytest.mark.parametrize(("name", "shape", "channels_last"),
                         _cases([("blocks", (8, 40, 17, 19)), ("few_channels", (24, 3, 40, 41)),
                                 ("rows", (3000, 37))]))
def test_primitives_match_torch_backend(name, shape, channels_last):
    """stats / apply / backward_reduce / backward_apply (what SyncBatchNorm composes),
    including a backward_apply whose count is not this tensor's (other ranks' values)."""
    ours, theirs = get_backend(BACKEND), get_backend("torch")
    x = make_input(shape, channels_last=channels_last)
    dy = make_input(shape, channels_last=channels_last, shift=0.0, scale=1.0)
    c = shape[1]
    w = torch.rand(c) + 0.5
    b = torch.randn(c)
    atol, rtol = TOLERANCES[torch.float32]
    satol, srtol = STAT_TOLERANCES[torch.float32]
    m = x.numel() // c

    (mean, m2), (mean_t, m2_t) = ours.stats(x), theirs.stats(x)
    assert_close(mean, mean_t, satol, srtol, f"{name} stats mean")
    assert_close(m2, m2_t, satol * m, srtol, f"{name} stats m2")
    invstd = torch.rsqrt(m2_t / m + 1e-5)
    y = ours.apply(x, mean_t, invstd, w, b)
    assert y.stride() == empty_out_like(x).stride()
    assert_close(y, theirs.apply(x, mean_t, invstd, w, b), atol, rtol, f"{name} apply")
    sums, sums_t = ours.backward_reduce(dy, x, mean_t, invstd), theirs.backward_reduce(
        dy, x, mean_t, invstd)
    for a, e, label in zip(sums, sums_t, ("sum_dy", "sum_dy_xmu")):
        assert_close(a, e, satol * m**0.5, srtol, f"{name} {label}")
    for count in (m, 3 * m):
        dx = ours.backward_apply(dy, x, mean_t, invstd, w, *sums_t, count)
        dx_t = theirs.backward_apply(dy, x, mean_t, invstd, w, *sums_t, count)
        assert_close(dx, dx_t, atol, rtol, f"{name} backward_apply count={count}")


def test_primitives_on_an_empty_input():
    """A rank with no samples still takes part in SyncBatchNorm."""
    be = get_backend(BACKEND)
    x = torch.empty(0, 4, 3, 3)
    mean, m2 = be.stats(x)
    assert torch.equal(mean, torch.zeros(4)) and torch.equal(m2, torch.zeros(4))
    sums = be.backward_reduce(x, x, mean, m2)
    assert all(torch.equal(s, torch.zeros(4)) for s in sums)
    assert be.apply(x, mean, m2, None, None).shape == x.shape
    assert be.backward_apply(x, x, mean, m2, None, *sums, 10).shape == x.shape


@pytest.mark.parametrize(("name", "shape", "channels_last"),
                         _cases([("blocks", (16, 64, 16, 16)), ("few_channels", (32, 4, 24, 24)),
                                 ("rows", (8192, 24)),
                                 # 16 row chunks x 1024 channels: the merge phase runs on
                                 # both threads, in 4 chunks of channels
                                 ("merge_chunks", (1024, 1024))]))
def test_results_do_not_depend_on_the_thread_count(name, shape, channels_last):
    """The work partition depends on the shape only: 1 and 2 threads (torch's OpenMP ones or
    the pool's) agree bit for bit."""
    from batchnorm.backends import numba_backend as nb

    be = get_backend(BACKEND)
    x = make_input(shape, channels_last=channels_last)
    dy = make_input(shape, channels_last=channels_last, shift=0.0, scale=1.0)
    c = shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    before = torch.get_num_threads()
    outs = []
    try:
        for n, threads in ((1, None), (2, "openmp"), (2, "pool")):
            torch.set_num_threads(n)
            with pytest.MonkeyPatch.context() as mp:
                if threads == "pool":  # our own worker threads instead of torch's OpenMP ones
                    mp.setattr(nb, "_OPENMP", None)
                fwd = be.forward_train(x, w, b, rm, rv, 0.1, 1e-5)
                bwd = be.backward(dy, x, w, fwd[1], fwd[2], True, (True, True, True))
                ev = be.forward_eval(x, w, b, rm, rv, 1e-5)
            outs.append((*fwd, *bwd, ev))
    finally:
        torch.set_num_threads(before)
    for out in outs[1:]:
        for a, e in zip(outs[0], out):
            assert torch.equal(a, e), f"{name}: 1 and 2 threads differ"


def test_row_chunks_with_a_reduction_are_capped_and_match_the_reference():
    """Channels-last rows (here an (N, C) input) are cut into at most
    ``max(_ROW_PARTS, numel // _ROW_CHUNK_ELEMS)`` chunks when the call reduces (each chunk's
    partials are read again by the merge), while elementwise-only calls keep their 64K-value
    chunks; the capped partition matches the reference."""
    from batchnorm.backends import numba_backend as nb

    shape = (1200, 1000)
    x = torch.empty(shape)
    assert nb._View(x, True).parts == nb._ROW_PARTS < nb._View(x, False).parts == 18
    _check_against_reference(shape, torch.float32, False, True)


def _all_outputs(be, x, dy, w, b):
    """Every tensor the kernels produce for one input: training forward, backward, eval and
    the four primitives."""
    c = x.shape[1]
    rm, rv = torch.zeros(c), torch.ones(c)
    fwd = be.forward_train(x, w, b, rm, rv, 0.1, 1e-5)
    bwd = be.backward(dy, x, w, fwd[1], fwd[2], True, (True, True, True))
    ev = be.forward_eval(x, w, b, rm, rv, 1e-5)
    ev_dx = be.backward(dy, x, w, rm, torch.ones(c), False, (True, False, False))[0]
    y = be.apply(x, fwd[1], fwd[2], w, b)
    sums = be.backward_reduce(dy, x, fwd[1], fwd[2])
    dx = be.backward_apply(dy, x, fwd[1], fwd[2], w, *sums, 3 * x.numel() // c)
    return (*fwd, *bwd, ev, ev_dx, y, dx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "shape", "channels_last"),
                         _cases([*PATHS, ("runs_odd", (5, 7, 3, 331)),
                                 ("long_runs", (3, 5, 4100))]))
def test_streamed_outputs_equal_plain_stores(monkeypatch, dtype, name, shape, channels_last):
    """Outputs above _STREAM_MIN_BYTES are written through L1 buffers with non-temporal
    stores: forcing that path on every output gives the same bits as plain stores (the
    values are computed by the same loops; only where they are stored differs)."""
    from batchnorm.backends import numba_backend

    be = get_backend(BACKEND)
    x = make_input(shape, dtype, channels_last)
    dy = make_input(shape, dtype, channels_last, shift=0.0, scale=1.0)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = torch.rand(shape[1], dtype=pdtype) + 0.5, torch.randn(shape[1], dtype=pdtype)
    monkeypatch.setattr(numba_backend, "_STREAM_MIN_BYTES", 1 << 62)
    plain = _all_outputs(be, x, dy, w, b)
    monkeypatch.setattr(numba_backend, "_STREAM_MIN_BYTES", 0)
    streamed = _all_outputs(be, x, dy, w, b)
    for i, (p, q) in enumerate(zip(plain, streamed)):
        assert q.stride() == p.stride()
        assert torch.equal(p.view(-1).view(torch.uint8), q.view(-1).view(torch.uint8)) if (
            p.is_contiguous()) else torch.equal(p, q), f"{name}: output {i} differs when streamed"


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.uint16], ids=str)
def test_stream_copy_writes_exactly_its_range(dtype):
    """The non-temporal copy writes dst[o:o + n] (aligned lines streamed, ragged ends plain)
    and nothing around it, for every alignment and length up to a few lines."""
    from numba import njit

    from batchnorm.backends.numba_kernels import _fence, _stream

    @njit
    def copy(src, dst, o, n):
        _stream(src, dst, o, n)
        _fence()

    size = 64 // np.dtype(dtype).itemsize
    src = np.arange(1, 8 * size + 1).astype(dtype)
    for o in range(0, 2 * size + 1):
        for n in range(0, 5 * size + 3):
            dst = np.zeros(10 * size, dtype)
            copy(src, dst, o, n)
            expected = np.zeros_like(dst)
            expected[o:o + n] = src[:n]
            assert np.array_equal(dst, expected), (o, n)


class _FakeCall:
    """A packed call in the pool's protocol, in Python: ``run`` claims units from the
    buffer's counters under a lock and marks each (``hook(k, worker)`` runs first)."""

    def __init__(self, units, hook=None):
        from batchnorm.backends.numba_kernels import CTL_SIZE

        self.array = np.zeros(CTL_SIZE, dtype=np.int64)
        self.units = units
        self.marks = np.zeros(units, dtype=np.int64)
        self.hook = hook
        self._lock = threading.Lock()

    def run(self):
        from batchnorm.backends.numba_kernels import CTL_DONE, CTL_NEXT

        worker = threading.current_thread().name.startswith("batchnorm-numba")
        while True:
            with self._lock:
                k = int(self.array[CTL_NEXT])
                self.array[CTL_NEXT] += 1
            if k >= self.units:
                return
            if self.hook is not None:
                self.hook(k, worker)
            self.marks[k] += 1
            with self._lock:
                self.array[CTL_DONE] += 1

    def done(self):
        from batchnorm.backends.numba_kernels import CTL_DONE

        return int(self.array[CTL_DONE])


@pytest.mark.parametrize("spin", [True, False], ids=["polling", "blocking"])
def test_pool_covers_every_unit_once_and_hands_back_errors(monkeypatch, spin):
    """The pool's hand-off (workers polling between jobs, or blocking): every unit of every
    call runs exactly once, back-to-back calls included; a worker's exception in a unit
    reaches the caller, and the pool works afterwards."""
    from batchnorm.backends import numba_backend

    if not spin:
        monkeypatch.setattr(numba_backend, "_WORKER_SPIN", 0)
        monkeypatch.setattr(numba_backend, "_CALLER_SPIN", 0)
    pool = numba_backend._Pool()
    for calls in range(200):
        call = _FakeCall(64)
        pool.run(call, 64, 2)
        assert (call.marks == 1).all(), f"call {calls}: {call.marks}"

    # a worker fails in a unit it claimed: the caller holds back until the worker has
    # claimed one, so the failure is certain to happen while the call waits
    claimed = threading.Event()

    def fail_in_worker(k, worker):
        if worker:
            claimed.set()
            raise ValueError("worker unit failed")
        assert claimed.wait(10), "the worker never started"

    call = _FakeCall(64, fail_in_worker)
    with pytest.raises(ValueError, match="worker unit failed"):
        pool.run(call, 64, 2)
    assert call.done() < 64
    call = _FakeCall(64)
    pool.run(call, 64, 2)  # the pool still works afterwards
    assert (call.marks == 1).all()


def test_pool_call_stops_waiting_when_every_worker_is_back():
    """A unit that fails without a Python exception (inside compiled code, which prints it):
    once every worker has reported, the pool returns with the count short instead of
    waiting for it forever."""
    from batchnorm.backends import numba_backend
    from batchnorm.backends.numba_kernels import CTL_DONE

    claimed = threading.Event()
    pool = numba_backend._Pool()

    def lose_a_unit(k, worker):
        if worker:
            claimed.set()
            call.array[CTL_DONE] -= 1  # counted below as done: the net effect is a lost unit
        elif not claimed.wait(10):
            raise AssertionError("the worker never started")

    call = _FakeCall(8, lose_a_unit)
    caller = threading.Thread(target=pool.run, args=(call, 8, 2))
    caller.start()
    caller.join(10)
    assert not caller.is_alive(), "the pool waited for a unit that no worker was running"
    assert call.done() < 8


def test_pool_call_does_not_wait_for_a_late_worker(monkeypatch):
    """A worker that cannot start (here: held up before its job) leaves the units to the
    caller, which returns without it; the late worker later finds nothing to do."""
    from batchnorm.backends import numba_backend

    monkeypatch.setattr(numba_backend, "_WORKER_SPIN", 0)
    pool = numba_backend._Pool()
    pool.run(_FakeCall(16), 16, 2)  # starts the worker
    gate = threading.Event()

    class Busy:
        def run(self):
            gate.wait()

    pool._jobs[0].put((Busy(), 0))  # the worker is now busy until the gate
    call = _FakeCall(16)
    # in a thread of its own, so that waiting for the worker fails the test instead of hanging
    caller = threading.Thread(target=pool.run, args=(call, 16, 2))
    caller.start()
    caller.join(10)
    waited = caller.is_alive()
    gate.set()
    caller.join()
    assert not waited, "the call waited for a worker that had not started"
    assert (call.marks == 1).all()  # the caller did every unit
    for _ in range(3):
        call = _FakeCall(16)
        pool.run(call, 16, 2)
        assert (call.marks == 1).all()


def test_pool_close_stops_the_workers():
    """close() (registered at exit: a worker coming back from a GIL-free call while Python
    finalizes can abort the process) ends every worker; later calls run on the caller."""
    from batchnorm.backends import numba_backend

    pool = numba_backend._Pool()
    pool.run(_FakeCall(16), 16, 2)
    assert pool._threads and all(t.is_alive() for t in pool._threads)
    pool.close()
    assert not any(t.is_alive() for t in pool._threads)
    call = _FakeCall(16)
    pool.run(call, 16, 2)
    assert (call.marks == 1).all()


def test_pool_worker_survives_a_failing_poll(monkeypatch):
    """Polling is an optimization: if it raises in a worker, the job still runs (no hang)."""
    from batchnorm.backends import numba_backend, numba_kernels

    class Broken:  # the kernels module with a poll that fails
        CTL_SIZE, CTL_DONE = numba_kernels.CTL_SIZE, numba_kernels.CTL_DONE

        @staticmethod
        def spin_until(*args):
            raise RuntimeError("no polling here")

    pool = numba_backend._Pool()
    monkeypatch.setattr(numba_backend, "_CALLER_SPIN", 0)
    monkeypatch.setattr(numba_backend, "_kernels", lambda: Broken)
    for _ in range(3):
        call = _FakeCall(8)
        pool.run(call, 8, 2)
        assert (call.marks == 1).all()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the failure
@pytest.mark.parametrize("threads", ["one", "openmp", "pool"])
def test_packed_calls_run_every_unit_once_and_raise_on_a_failed_unit(monkeypatch, threads):
    """A packed call's phase on one thread, on torch's OpenMP threads and on the pool: every
    unit runs once; a unit that fails inside compiled code (numba prints the error and the
    entry returns) makes the call raise instead of returning a partial result."""
    import _packed_kernels
    from batchnorm.backends import numba_backend as nb
    from batchnorm.backends.numba_entry import PackedCall, entry_for

    if threads == "openmp" and nb._openmp() is None:
        pytest.skip("torch runs without an OpenMP runtime here")
    if threads == "pool":
        monkeypatch.setattr(nb, "_OPENMP", None)
    nthreads = 1 if threads == "one" else 2
    entry = entry_for(_packed_kernels, "mark", torch.float32)
    for phase in (0, 2):
        out = torch.zeros(200)
        nb._run_phase(PackedCall(entry, [out, -1]), phase, 200, nthreads)
        assert torch.equal(out, torch.full((200,), 1.0 + phase))
    out = torch.zeros(200)
    with pytest.raises(RuntimeError, match="units of phase 0 completed"):
        nb._run_phase(PackedCall(entry, [out, 150]), 0, 200, nthreads)


def test_packed_call_checks_its_arguments():
    import _packed_kernels
    from batchnorm.backends.numba_entry import PackedCall, entry_for

    entry = entry_for(_packed_kernels, "mark", torch.float32)
    with pytest.raises(TypeError, match="takes 2 packed arguments, got 1"):
        PackedCall(entry, [torch.zeros(3)])


def test_openmp_runtime_is_torchs():
    """Where torch runs on OpenMP, the phases run in the runtime libtorch_cpu calls (found
    through its own ``omp_get_max_threads``), never in another one in the process."""
    import ctypes
    import os

    from batchnorm.backends import numba_backend as nb

    fn = nb._torch_openmp()
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        assert fn is None, "torch runs without OpenMP, yet a GOMP_parallel was found"
    else:
        assert fn is not None, "torch runs on OpenMP, but its GOMP_parallel was not found"
        maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
        lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
        torch_omp = [line.split()[-1] for line in maps.splitlines()
                     if "omp" in line.split()[-1] and line.split()[-1].startswith(lib_dir)]
        if torch_omp:  # torch ships its runtime (its Linux wheels do): the one we must call
            lib = ctypes.CDLL(torch_omp[0], mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LAZY)
            assert ctypes.cast(fn, ctypes.c_void_p).value == ctypes.cast(
                lib.GOMP_parallel, ctypes.c_void_p).value


def test_openmp_can_be_turned_off(monkeypatch):
    from batchnorm.backends import numba_backend as nb

    monkeypatch.setenv("BATCHNORM_NUMBA_OPENMP", "0")
    assert nb._torch_openmp() is None


def test_spin_until_sees_the_flags_or_gives_up():
    from batchnorm.backends.numba_kernels import spin_until

    flags = np.zeros(32, dtype=np.int64)
    flags[8] = 5
    flags[16] = 4
    assert spin_until(flags, 8, 8, 1, 5, 10)
    assert not spin_until(flags, 8, 8, 2, 5, 1000)  # flags[16] is still below 5
    flags[16] = 7
    assert spin_until(flags, 8, 8, 2, 5, 1)
    assert not spin_until(flags, 0, 8, 1, 1, 0)  # no polls at all


def test_concurrent_calls_from_python_threads():
    """Two Python threads calling at once: one gets the pool, the other runs serially."""
    be = get_backend(BACKEND)
    xs = [make_input((16, 32, 24, 24), shift=i) for i in range(4)]
    expected = [be.forward_train(x, None, None, None, None, 0.1, 1e-5)[0] for x in xs]
    results: dict[int, torch.Tensor] = {}

    def work(i):
        for _ in range(5):
            results[i] = be.forward_train(xs[i], None, None, None, None, 0.1, 1e-5)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert torch.equal(results[i], expected[i]), i


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_outputs_round_like_torch(dtype):
    """fp32 -> fp16/bf16 rounds to nearest even like torch, with inf/nan/overflow kept:
    eval with mean 0, var 1, eps 0 and no bias makes y = round(x * w) exactly."""
    finfo = torch.finfo(dtype)
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), finfo.max, -finfo.max,
                             finfo.tiny, 0.0, -0.0, 1.0, -1.0], dtype=dtype)
    x = torch.cat([specials, (torch.randn(1014) * 100).to(dtype)]).view(1, 1, -1)
    w = torch.tensor([1.0 + 2.0**-9 + 2.0**-12])  # products land between representable values
    y = batchnorm.batch_norm(x, torch.zeros(1), torch.ones(1), w, None, False, eps=0.0,
                             backend=BACKEND)
    expected = (x.float() * w).to(dtype)
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16)) or torch.equal(
        torch.nan_to_num(y.float(), nan=7.0), torch.nan_to_num(expected.float(), nan=7.0))


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_kernels_read_the_input_in_place(monkeypatch, channels_last):
    """No hidden copies: the kernel reads the input's own memory and writes the tensor that
    is returned, for both layouts; other strides are converted once and still give the right
    numbers."""
    from batchnorm.backends import numba_backend as nb
    from batchnorm.backends.numba_entry import ARGS

    seen = []
    run_phase = nb._run_phase

    def spy(call, *args):
        seen.append((int(call.buf[ARGS]), int(call.buf[ARGS + 2]), call.values))
        return run_phase(call, *args)

    monkeypatch.setattr(nb, "_run_phase", spy)
    x = make_input((4, 6, 5, 7), channels_last=channels_last)
    y = get_backend(BACKEND).forward_train(x, None, None, None, None, 0.1, 1e-5)[0]
    assert seen and seen[0][0] == x.data_ptr() and seen[0][1] == y.data_ptr()
    assert seen[0][2][0] is x and seen[0][2][1] is y
    assert y.stride() == empty_out_like(x).stride()
    monkeypatch.undo()
    sliced = make_input((4, 12, 5, 7))[:, ::2]
    _check_against_reference(tuple(sliced.shape), torch.float32, False, True)
    y2 = batchnorm.batch_norm(sliced, None, None, training=True, backend=BACKEND)
    assert y2.is_contiguous()


def test_auto_picks_numba_where_it_measured_faster_or_aten_is_inaccurate():
    """Training on large inputs (channels-last 3-D from a larger size), and every training
    input ATen reduces in one float32 pass (channels-last 4-D/5-D, no spatial extent); tiny
    channels-first inputs and eval stay on ATen (see NumbaBackend.preferred_for)."""
    big = torch.randn(32, 64, 28, 28)
    assert resolve_backend("auto", big, training=True) == "numba"
    assert resolve_backend("auto", big, training=False) != "numba"
    long_3d = torch.empty(64, 64, 1200)
    assert resolve_backend("auto", to_channels_last(long_3d), training=True) == "numba"
    assert resolve_backend("auto", to_channels_last(torch.randn(8, 16, 50)), training=True) \
        != "numba"
    assert resolve_backend("auto", torch.randn(2, 3, 4, 4), training=True) != "numba"
    for accuracy_first in (to_channels_last(torch.randn(2, 3, 4, 4)),
                           torch.randn(2, 3, 4, 4, 4).contiguous(
                               memory_format=torch.channels_last_3d),
                           torch.randn(8, 3), torch.randn(8, 3, 1, 1)):
        assert resolve_backend("auto", accuracy_first, training=True) == "numba"
        assert resolve_backend("auto", accuracy_first, training=False) != "numba"
    assert get_backend(BACKEND).supports(torch.zeros(2, 3, dtype=torch.int32)) is not None


@pytest.mark.parametrize("layout", ["nhwc", "nc"])
def test_auto_is_accurate_where_aten_cancels(layout):
    """|mean| / std = 1e4 in float32: "auto" (the fused kernels) stays within float32's
    precision of the float64 result, where ATen's one-pass statistics lose it (the
    comparison with ATen only shows the case is a real one)."""
    g = torch.Generator().manual_seed(0)
    shape = (512, 4, 16, 16) if layout == "nhwc" else (131072, 4)  # 131K values a channel
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) + 1e4
    x = x64.float()
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    want = torch.nn.functional.batch_norm(x.double(), None, None, None, None, True)
    got = batchnorm.batch_norm(x, None, None, training=True, backend="auto")
    aten = torch.nn.functional.batch_norm(x, None, None, None, None, True)
    scale = want.abs().max().item()
    assert (aten.double() - want).abs().max().item() > 0.1 * scale
    assert_close(got, want, 1e-5 * scale, 0.0, f"auto on {layout}")


def test_stream_threshold_from_the_environment(monkeypatch):
    """BATCHNORM_NUMBA_STREAM_MIN_BYTES: bytes, or a clear error naming the variable."""
    from batchnorm.backends.numba_backend import _env_bytes

    monkeypatch.setenv("BATCHNORM_NUMBA_STREAM_MIN_BYTES", "4096")
    assert _env_bytes("BATCHNORM_NUMBA_STREAM_MIN_BYTES", 7) == 4096
    monkeypatch.setenv("BATCHNORM_NUMBA_STREAM_MIN_BYTES", " ")
    assert _env_bytes("BATCHNORM_NUMBA_STREAM_MIN_BYTES", 7) == 7
    for bad in ("16M", "-1"):
        monkeypatch.setenv("BATCHNORM_NUMBA_STREAM_MIN_BYTES", bad)
        with pytest.raises(ValueError, match="BATCHNORM_NUMBA_STREAM_MIN_BYTES"):
            _env_bytes("BATCHNORM_NUMBA_STREAM_MIN_BYTES", 7)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_large_outputs_with_huge_page_advice(channels_last):
    """Outputs of 8 MiB and more are advised to use huge pages: same numbers."""
    x = make_input((8, 16, 128, 129), channels_last=channels_last)
    ours = get_backend(BACKEND).forward_train(x, None, None, None, None, 0.1, 1e-5)[0]
    theirs = get_backend("torch").forward_train(x, None, None, None, None, 0.1, 1e-5)[0]
    assert ours.stride() == theirs.stride()
    assert_close(ours, theirs, *TOLERANCES[torch.float32], "y")


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(("cls", "tcls", "shape"), [
    (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d, (256, 48)),
    (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d, (16, 48, 100)),
    (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d, (16, 32, 20, 20)),
    (batchnorm.BatchNorm3d, torch.nn.BatchNorm3d, (4, 16, 6, 10, 10)),
], ids=["1d-nc", "1d-ncl", "2d", "3d"])
def test_module_semantics_with_numba(cls, tcls, shape, momentum):
    """Module-level semantics on parallel-sized inputs, both layouts: three training steps
    (counter, momentum or cumulative average, unbiased running_var), then eval, then training
    with track_running_stats switched off after construction; state_dict as torch.nn's."""
    for channels_last in ((False, True) if len(shape) >= 3 else (False,)):
        ours = cls(shape[1], momentum=momentum, backend=BACKEND)
        theirs = tcls(shape[1], momentum=momentum)
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-0.5, 0.5)
        ours.load_state_dict(theirs.state_dict())
        atol, rtol = TOLERANCES[torch.float32]
        what = f"{cls.__name__} {shape} cl={channels_last} momentum={momentum}"

        def step(module, x, dy):
            x = x.detach().clone().requires_grad_()
            y = module(x)
            y.backward(dy)
            return y, x.grad

        phases = [("train", 3), ("eval", 1), ("untracked", 1)]
        for phase, steps in phases:
            for mod in (ours, theirs):
                mod.train(phase != "eval")
                if phase == "untracked":
                    mod.track_running_stats = False
            for i in range(steps):
                x = make_input(shape, channels_last=channels_last, shift=i)
                dy = make_input(shape, channels_last=channels_last, shift=0.0, scale=1.0)
                (y1, dx1), (y2, dx2) = step(ours, x, dy), step(theirs, x, dy)
                assert_close(y1, y2, atol, rtol, f"{what} {phase} {i} y")
                assert_close(dx1, dx2, atol, rtol, f"{what} {phase} {i} dx")
            sd1, sd2 = ours.state_dict(), theirs.state_dict()
            assert list(sd1) == list(sd2)
            for key in sd2:
                assert sd1[key].dtype == sd2[key].dtype, key
                assert_close(sd1[key], sd2[key], atol, rtol, f"{what} {phase} {key}")


def _small_net(backend):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        batchnorm.BatchNorm2d(8, backend=backend),
        torch.nn.ReLU(),
    )


def test_torch_compile_model_with_numba_backend():
    """torch.compile(model) (inductor) runs our custom op as an opaque call and matches eager,
    outputs, input and parameter gradients and running buffers (about 15 s cold on the 2-core
    machine, most of it inductor compiling the convolution around the op)."""
    eager, compiled_src = _small_net(BACKEND), _small_net(BACKEND)
    compiled = torch.compile(compiled_src)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(xa), compiled(xb)
        ya.sum().backward()
        yb.sum().backward()
        assert_close(yb, ya, *TOLERANCES[torch.float32], "compiled y")
        assert_close(xb.grad, xa.grad, *TOLERANCES[torch.float32], "compiled dx")
    for (name, p), q in zip(eager.named_parameters(), compiled_src.parameters()):
        assert_close(q.grad, p.grad, 1e-4, 1e-4, f"compiled grad {name}")
    assert_close(compiled_src[1].running_var, eager[1].running_var, 1e-6, 1e-5, "running_var")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_export_with_numba_backend(training):
    net = _small_net(BACKEND).train(training)
    x = torch.randn(4, 3, 8, 8)
    exported = torch.export.export(net, (x,))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("batchnorm" in op for op in ops), ops
    if not training:
        assert_close(exported.module()(x), net(x), *TOLERANCES[torch.float32], "exported y")


def test_kernels_compile_uncached_where_no_cache_directory_works():
    """numba caches next to the package, else in the user's cache directory (a read-only
    install); with neither writable it raises at decoration, and the kernels fall back to
    compiling uncached instead of making the backend unavailable."""
    from batchnorm.backends.numba_kernels import _jit

    ns: dict = {}
    exec(compile("def f(a):\n    return a + 1\n", "<generated>", "exec"), ns)
    f = _jit()(ns["f"])
    assert f(1) == 2


_DIGEST_SCRIPT = """
import hashlib, torch
from batchnorm.backends import get_backend
g = torch.Generator().manual_seed(0)
x, dy = torch.randn(8, 64, 30, 30, generator=g), torch.randn(8, 64, 30, 30, generator=g)
w = torch.rand(64, generator=g) + 0.5
be = get_backend("numba")
y, mean, invstd, rm, rv = be.forward_train(x, w, None, torch.zeros(64), torch.ones(64), 0.1, 1e-5)
dx, dw, db = be.backward(dy, x, w, mean, invstd, True, (True, True, True))
h = hashlib.sha256()
for t in (y, mean, invstd, rm, rv, dx, dw, db):
    h.update(t.contiguous().numpy().tobytes())
print(h.hexdigest())
"""


@pytest.mark.slow
def test_the_first_process_after_a_cold_cache_computes_the_cached_bits(tmp_path):
    """A process that compiled the kernels computed channels-first reductions with last-bit
    differences from the processes that load them from the cache; entries are therefore
    compiled in a child process that fills the cache, and loaded. Two processes on an empty
    cache directory, the first compiling, give the same bits (with
    BATCHNORM_NUMBA_CHILD_COMPILE=0 they did not)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("BATCHNORM_NUMBA_CHILD_COMPILE", None)
    digests = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], env=env,
                              capture_output=True, text=True, timeout=900, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        digests.append(done.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]


def test_a_cached_entry_is_seen_as_cached():
    """The cache probe behind the child compile (numba internals) must see an entry this
    process has loaded: if it answered "missing" for everything, every process would start a
    child per kernel module on every run."""
    from batchnorm.backends import numba_entry as ne
    from batchnorm.backends import numba_kernels

    ne.entry_for("numba_kernels", "forward", torch.float32)
    key = next(k for k, (kern, _, storage) in ne._SPECS.items()
               if kern is numba_kernels.forward and storage == ne._STORAGE[torch.float32])
    assert ne._in_cache(ne._caching_cfunc(ne._make_entry(key)))
    assert not ne._in_cache(ne._caching_cfunc(ne._make_entry(key + 1)))  # (not a stub)


def test_a_failed_child_compile_warns_and_leaves_the_compile_to_this_process(monkeypatch):
    """Compiling in a child needs a Python to start: where that fails the caller is told
    why, and compiles in its own process (no error, no hang)."""
    from batchnorm.backends import numba_entry

    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.warns(RuntimeWarning, match=r"numba_kernels\.forward .*child process failed"):
        numba_entry._compile_in_child("numba_kernels", "forward", torch.float32)


def test_precompile_compiles_the_missing_modules_concurrently(monkeypatch):
    """precompile starts one child compile per (module, dtype) missing from the cache (and
    none for one cached), up to ``jobs`` of them at once, and names what it compiled."""
    import threading
    import time

    from batchnorm.backends import numba_entry

    cached = {("numba_kernels", torch.float32)}
    # each probe stands for its (module, kernel, dtype): nothing is built or compiled
    monkeypatch.setattr(numba_entry, "_entry_function",
                        lambda module, name, dtype: ((), "", (module, name, dtype)))
    monkeypatch.setattr(numba_entry, "_caching_cfunc", lambda job: job)
    monkeypatch.setattr(numba_entry, "_in_cache", lambda job: (job[0], job[2]) in cached)
    lock, running, peak, calls = threading.Lock(), [0], [0], []

    def child(module, name, dtype):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            calls.append((module, name, dtype))
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    monkeypatch.setattr(numba_entry, "_compile_in_child", child)
    done = numba_entry.precompile([(m, d) for m in ("numba_kernels", "numba_act_kernels")
                                   for d in (torch.float32, torch.float64)], jobs=2)
    assert sorted(done) == ["numba_act_kernels float32", "numba_act_kernels float64",
                            "numba_kernels float64"]
    assert sorted((calls_m, str(d)) for calls_m, _, d in calls) == [
        ("numba_act_kernels", "torch.float32"), ("numba_act_kernels", "torch.float64"),
        ("numba_kernels", "torch.float64")]
    assert {n for _, n, _ in calls} == {"forward", "forward_act"}  # each module's first kernel
    assert peak[0] == 2  # concurrently, and no more than jobs


def _forked_child(x, q):
    y = get_backend(BACKEND).forward_train(x, None, None, None, None, 0.1, 1e-5)[0]
    q.put(y.numpy().copy())  # compared in the parent: torch's own parallel ops hang here


def test_forked_child_runs_without_openmp():
    """After a fork, GNU libgomp's threads are gone and a parallel region in the child hangs
    (torch's own ops too): a forked child runs its 2-thread calls on a fresh pool of ours."""
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = make_input((16, 32, 24, 24))
        expected = get_backend(BACKEND).forward_train(x, None, None, None, None, 0.1, 1e-5)[0]
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        child = ctx.Process(target=_forked_child, args=(x, q))
        child.start()
        try:  # read before joining: the child exits only once its result is out of the pipe
            got = q.get(timeout=120)
        except Exception:
            got = None
        child.join(10)
        if child.is_alive():
            child.kill()
        assert got is not None, "the forked child hung (or failed)"
        assert torch.equal(torch.from_numpy(got), expected)
    finally:
        torch.set_num_threads(before)


def test_long_channel_runs_keep_float32_precision():
    """A channel's contiguous run of millions of values (a volume at batch size 1) is summed
    in float32 pieces merged in float64: summed in float32 alone it gave output errors 20-100x
    torch's (1.8e-5 at 2M values a run; torch 3.5e-7), in the forward and the backward."""
    torch.manual_seed(0)
    x = (torch.randn(1, 2, 1 << 21) * 2 + 3).requires_grad_()
    dy = torch.randn(1, 2, 1 << 21)
    rm, rv = torch.zeros(2), torch.ones(2)
    y = batchnorm.batch_norm(x, rm, rv, training=True, backend=BACKEND)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    rm64, rv64 = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    y64 = torch.nn.functional.batch_norm(x64, rm64, rv64, training=True)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert_close(y, y64, 2e-6, 0.0, "y")
    assert_close(dx, dx64, 2e-6, 0.0, "dx")
    assert_close(rv, rv64, 0.0, 3e-7, "running_var")
    # the fused BN + activation backward's run sums: against float64 sums of the same terms
    # (dz from our own float32 mean and invstd), relative to the sum of |terms| (summed in
    # float32 per run: 4.3e-8 for dbias; in pieces: 4e-9)
    be = get_backend(BACKEND)
    w = torch.ones(2)
    xd = x.detach()
    _, mean, invstd, _, _ = be.forward_act(xd, w, None, None, None, None, True, 0.1, 1e-5,
                                           "silu", 0.01, be.new_output(xd))
    _, dw, db, _ = be.backward_act(dy, xd, w, None, mean, invstd, None, True, "silu", 0.01,
                                   False, (True, True, True, False))
    xh = (xd.double() - mean.double().view(1, 2, 1)) * invstd.double().view(1, 2, 1)
    sig = torch.sigmoid(xh)
    dz = dy.double() * (sig * (1 + xh * (1 - sig)))
    for got, terms, what in ((db, dz, "dbias"), (dw, dz * xh, "dweight")):
        err = (got.double() - terms.sum((0, 2))).abs() / terms.abs().sum((0, 2))
        assert err.max() < 1.5e-8, (what, err)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_input_value_stays_where_torch_keeps_it(channels_last, bad):
    """One NaN or inf in x: in training, dbias = sum(dy) stays finite (the run sums started
    from ``mean - mean``, NaN); in eval, dx = dy * w * invstd does not depend on x and stays
    finite everywhere (``(x - mean) * 0`` made it NaN). Also the fused BN + identity."""
    torch.manual_seed(1)
    x = make_input((4, 3, 5, 5))
    x[1, 0, 2, 2] = bad
    dy = torch.randn(4, 3, 5, 5)
    if channels_last:
        x, dy = to_channels_last(x), to_channels_last(dy)
    for training in (True, False):
        for act in (None, "identity"):
            xs = x.clone().requires_grad_()
            w = torch.rand(3, requires_grad=True)
            b = torch.zeros(3, requires_grad=True)
            rm, rv = torch.zeros(3), torch.rand(3) + 0.5
            kw = dict(training=training, backend=BACKEND)
            y = (batchnorm.batch_norm(xs, rm, rv, w, b, **kw) if act is None else
                 batchnorm.batch_norm_act(xs, rm, rv, w, b, activation=act, **kw))
            dx, db = torch.autograd.grad(y, (xs, b), dy)
            what = f"training={training} act={act}"
            assert_close(db, dy.sum((0, 2, 3)), 1e-4, 1e-5, f"dbias {what}")
            if not training:
                want = dy * (w.detach() / torch.sqrt(rv + 1e-5)).view(1, 3, 1, 1)
                assert_close(dx, want, 1e-5, 1e-5, f"eval dx {what}")
    # the other channels' gradients stay torch's (channels-last act rows once took their
    # "zero" residual from channel 0's coefficients: NaN there made relu pass every gradient)
    xs = x.clone().requires_grad_()
    y = batchnorm.batch_norm_act(xs, None, None, training=True, activation="relu",
                                 backend=BACKEND)
    (dx,) = torch.autograd.grad(y, xs, dy)
    ref = x.clone().double().requires_grad_()
    (want,) = torch.autograd.grad(
        torch.relu(torch.nn.functional.batch_norm(ref, None, None, training=True)), ref,
        dy.double())
    assert_close(dx[:, 1:], want[:, 1:], 1e-4, 1e-4, "relu dx of the finite channels")


@pytest.mark.parametrize("backend", ["native", BACKEND])
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_an_infinite_value_gives_torchs_infinite_running_mean(channels_last, where, backend):
    """+inf in x: torch's CPU kernels give an infinite mean (and running mean) and a NaN
    variance. The centred sums took an infinite shift when the inf was among the values the
    shift is the mean of (the first rows), and gave inf - inf = NaN for the mean."""
    torch.manual_seed(2)
    for shape in ((4, 3, 5, 5), (64, 3, 20, 20)):
        x = torch.randn(shape)
        x[(0, 1, 0, 0) if where == "first" else (shape[0] - 1, 1, -1, -1)] = float("inf")
        if channels_last:
            x = to_channels_last(x)
        outs = []
        for name in (backend, None):
            rm, rv = torch.zeros(3), torch.ones(3)
            if name is None:
                torch.nn.functional.batch_norm(x, rm, rv, training=True)
            else:
                batchnorm.batch_norm(x, rm, rv, training=True, backend=name)
            outs.append((rm, rv))
        for got, want, name in zip(outs[0], outs[1], ("running_mean", "running_var")):
            assert_same_non_finite(got, want, 1e-6, 1e-5, f"{shape} {name}")


@pytest.mark.parametrize("backend", ["native", "torch", BACKEND])
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_an_infinite_gradient_value_gives_torchs_pattern_of_inf_and_nan(channels_last, backend):
    """+inf in dy: dx of that channel is -inf or NaN by the sign of x - mean, as torch's
    formula gives; the rounding term of the mean (infinite times a tiny or zero rounding)
    made every dx of the channel NaN. Other channels stay finite."""
    torch.manual_seed(3)
    x = torch.randn(8, 3, 6, 6)
    dy = torch.randn(8, 3, 6, 6)
    dy[2, 1, 3, 3] = float("inf")
    if channels_last:
        x, dy = to_channels_last(x), to_channels_last(dy)
    grads = []
    for name in (backend, None):
        xs = x.clone().requires_grad_()
        w = torch.full((3,), 1.5, requires_grad=True)
        if name is None:
            y = torch.nn.functional.batch_norm(xs, None, None, w, training=True)
        else:
            y = batchnorm.batch_norm(xs, None, None, w, training=True, backend=name)
        grads.append(torch.autograd.grad(y, (xs, w), dy))
    for got, want, name in zip(grads[0], grads[1], ("dx", "dweight")):
        assert_same_non_finite(got, want, 1e-5, 1e-5, name)


def test_the_torch_backends_running_mean_after_an_infinite_value_is_nan():
    """The documented difference (README): the composite backend's statistics come from
    torch.var_mean, whose Welford updates give a NaN mean after an inf; the running variance
    is NaN as in torch.nn."""
    x = torch.randn(4, 3, 5, 5)
    x[0, 1, 0, 0] = float("inf")
    rm, rv = torch.zeros(3), torch.ones(3)
    batchnorm.batch_norm(x, rm, rv, training=True, backend="torch")
    assert torch.isnan(rm[1]) and torch.isnan(rv[1])
    assert torch.isfinite(rm[[0, 2]]).all() and torch.isfinite(rv[[0, 2]]).all()


@pytest.mark.parametrize("shape", [(4, 16, 16384), (4, 16, 4096), (32, 8, 3136), (64, 8, 49)],
                         ids=str)
def test_long_float32_partial_sums_stay_as_accurate_as_aten(shape):
    """The reductions sum up to FOUR_RUNS_MAX values (four runs of a channel) in float32
    before float64 takes over: short and long runs, at and beyond that bound, keep relative
    errors against float64 (y, dx, dweight, dbias) within 4x ATen's on the same input, plus
    5e-7 (float32 noise on sums that cancel). A guard against gross losses (float32 sums
    over whole channels, say); the bound itself was set from a measurement (RESULTS.md),
    where four runs of 16384 in float32 were about 2x ATen's error on this input."""
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 20).float().requires_grad_()
    dy = torch.randn(shape)
    c = shape[1]
    w = (torch.rand(c) + 0.5).requires_grad_()
    b = torch.randn(c).requires_grad_()
    exact = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = torch.nn.functional.batch_norm(exact[0], None, None, exact[1], exact[2], True, 0.1,
                                         1e-5)
    want = [y64.detach(), *torch.autograd.grad(y64, exact, dy.double())]

    def errors(backend: str | None) -> list[float]:
        if backend is None:
            y = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
        else:
            y = batchnorm.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, backend=backend)
        got = [y.detach(), *torch.autograd.grad(y, (x, w, b), dy)]
        return [float((g.double() - e).abs().max() / e.abs().max()) for g, e in zip(got, want)]

    ours, aten = errors("numba"), errors(None)
    for name, o, a in zip(("y", "dx", "dweight", "dbias"), ours, aten):
        assert o <= 4 * a + 5e-7, f"{shape} {name}: relative error {o:.2e}, ATen's {a:.2e}"


def test_compiled_callees_get_no_literal_integer_arguments():
    """numba compiles a callee once per literal argument value: a ``0`` at one call site and a
    variable at another compiled a task function (and every loop under it) twice, which had
    doubled the kernels' first-call compile time. Static check over the kernel modules: no
    call to a compiled, not inlined function (``@njit`` without ``inline="always"``, or a
    ``_by_flags`` dispatcher, also those built inside ``numba_act_kernels.kernels``) passes
    an integer constant or a module-level integer. (The activation kind is a literal on
    purpose, always: one compiled copy of the math per activation.)"""
    import ast
    import inspect

    from batchnorm.backends import numba_act_kernels, numba_kernels, numba_smooth_kernels

    found = []
    for mod in (numba_kernels, numba_act_kernels, numba_smooth_kernels):
        tree = ast.parse(inspect.getsource(mod))
        int_globals = {t.id for node in tree.body if isinstance(node, ast.Assign)
                       and isinstance(node.value, (ast.Constant, ast.BinOp))
                       and not isinstance(getattr(node.value, "value", 0), (str, float))
                       for t in node.targets if isinstance(t, ast.Name)}
        compiled = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for d in node.decorator_list:
                    name = d.func.id if isinstance(d, ast.Call) and isinstance(
                        d.func, ast.Name) else getattr(d, "id", None)
                    inline = isinstance(d, ast.Call) and any(
                        k.arg == "inline" for k in d.keywords)
                    if name == "njit" and not inline:
                        compiled.add(node.name)
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and getattr(
                    node.value.func, "id", None) == "_by_flags":
                compiled |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        assert compiled or mod is numba_smooth_kernels, \
            f"no compiled function found in {mod.__name__} (parser out of date?)"
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                    and call.func.id in compiled):
                continue
            for arg in call.args:
                literal = (isinstance(arg, ast.Constant) and type(arg.value) is int) or (
                    isinstance(arg, ast.Name) and arg.id in int_globals)
                if literal:
                    found.append(f"{mod.__name__}:{call.lineno} {call.func.id}(... "
                                 f"{ast.unparse(arg)} ...)")
    assert not found, "literal integer arguments to compiled callees:\n" + "\n".join(found)


@pytest.mark.parametrize("shape", [(2, 64, 40, 40), (40, 8, 30, 30), (1, 24, 100, 100)],
                         ids=["few_rows", "many_rows", "one_row"])
def test_elementwise_tasks_are_contiguous_and_match_the_reference(shape):
    """Channels-first passes without a reduction (eval, its input gradient, the apply
    primitives) cut the memory into tasks of one contiguous piece each (whole rows, or a
    channel block of one row): every break in a stream costs about a microsecond of memory
    latency (measured: (32, 512, 7, 7) eval in 24 tasks of 3 pieces 0.108 ms, in 12 tasks of
    one piece 0.089 ms). Several tasks where there is enough work, and the reference's
    numbers."""
    from batchnorm.backends import numba_backend as nb

    view = nb._View(torch.empty(shape), False)
    assert view.tasks > 1
    assert view.blocks == 1 or view.parts == shape[0]
    _check_against_reference(shape, torch.float32, False, False)


def test_only_passes_after_a_reduction_stream_their_output(monkeypatch):
    """Non-temporal stores only where the elementwise pass follows a reduction (the training
    forward); eval and the apply primitive read x from memory into an output that is often
    still in cache, where plain stores measured as fast or faster (see ``_streamed``)."""
    import inspect

    from batchnorm.backends import numba_backend, numba_kernels

    be = get_backend(BACKEND)
    flags = []
    launch = numba_backend._launch
    at = list(inspect.signature(numba_kernels.forward.py_func).parameters).index("stream")

    def spy(plan, values, keep=()):
        flags.append(values[at])
        return launch(plan, values, keep)

    monkeypatch.setattr(numba_backend, "_STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(numba_backend, "_launch", spy)
    x = make_input((4, 6, 7, 9), torch.float32, False)
    w, b, rm, rv = torch.rand(6) + 0.5, torch.randn(6), torch.zeros(6), torch.ones(6)
    _, mean, invstd, _, _ = be.forward_train(x, w, b, rm, rv, 0.1, 1e-5)
    be.forward_eval(x, w, b, rm, rv, 1e-5)
    be.apply(x, mean, invstd, w, b)
    assert flags == [True, False, False]
