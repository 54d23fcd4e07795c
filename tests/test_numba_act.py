"""Fused BatchNorm + activation + residual in the numba backend (backends/numba_act*.py).

Every case is checked against two references: the base class's composite
(``Backend.forward_act``/``backward_act`` called unbound on the same backend, same storage
dtype) and an independent float64 ``torch.nn.functional`` composite with autograd.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("numba", reason="the numba backend needs numba")

import batchnorm
from batchnorm.backends import get_backend
from batchnorm.backends.base import Backend, empty_out_like
from helpers import STAT_TOLERANCES, TOLERANCES, assert_close, make_input

ACTS = ["identity", "relu", "leaky_relu", "elu", "silu", "gelu"]
INVERTIBLE = ["identity", "leaky_relu", "elu"]
SLOPE = 0.1
EPS = 1e-5
MOMENTUM = 0.1
TORCH_ACT = {
    "identity": lambda z: z,
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, SLOPE),
    "elu": F.elu,
    "silu": F.silu,
    "gelu": F.gelu,
}
MASK = (True, True, True, True)
# (shape, channels_last): ranks 2-5, both layouts; (4, 3, 7) is the S > 1 run mode, NHWC and
# (9, 5) the row mode
SHAPES = [((9, 5), False), ((4, 3, 7), False), ((4, 3, 7), True), ((2, 3, 4, 5), False),
          ((2, 3, 4, 5), True), ((2, 3, 2, 3, 4), True)]
SHAPE_IDS = ["nc", "ncl", "nlc", "nchw", "nhwc", "ndhwc"]


@pytest.fixture(scope="module")
def be():
    """The numba backend with every activation fused (the default; set here so that these
    tests check the kernels even where ``BATCHNORM_NUMBA_FUSE_ALL_ACTS=0`` is set)."""
    backend = get_backend("numba")
    ok, why = backend.is_available()
    if not ok:
        pytest.skip(why)
    before = backend.fuse_all_activations
    backend.fuse_all_activations = True
    yield backend
    backend.fuse_all_activations = before


@pytest.mark.parametrize("fuse_all", [True, False], ids=["default", "delegated"])
@pytest.mark.parametrize("activation", ACTS)
def test_each_activation_runs_in_its_kernel_module(activation, fuse_all, monkeypatch):
    """By default every activation is fused: identity, relu and leaky_relu in
    numba_act_kernels, elu, silu and gelu in numba_smooth_kernels (compiled apart). With
    ``fuse_all_activations`` off the last three run as our BatchNorm kernels + torch's
    activation."""
    import batchnorm.backends.numba_backend as nbb

    backend = nbb.NumbaBackend()
    assert backend.fuse_all_activations is True
    backend.fuse_all_activations = fuse_all
    launched: list[str] = []
    launch = nbb._launch
    monkeypatch.setattr(nbb, "_launch", lambda plan, *a, **k: (
        launched.append(plan.entry.name), launch(plan, *a, **k))[1])
    x = make_input((4, 3, 5, 5), torch.float32, False, seed=3)
    r = make_input((4, 3, 5, 5), torch.float32, False, seed=4, shift=0.0)
    w, b, rm, rv = _params(3)
    y, mean, invstd, _, _ = backend.forward_act(x, w, b, rm, rv, r, True, MOMENTUM, EPS,
                                                activation, SLOPE, empty_out_like(x))
    backend.backward_act(torch.ones_like(x), x, w, b, mean, invstd, r, True, activation,
                         SLOPE, False, MASK)
    linear = activation in ("identity", "relu", "leaky_relu")
    module = "numba_act_kernels" if linear else "numba_smooth_kernels"
    if linear or fuse_all:
        assert launched == [f"{module}.forward_act", f"{module}.backward_act"], launched
    else:
        assert launched and not any("act" in name for name in launched), launched
    ref = TORCH_ACT[activation](F.batch_norm(x.double(), None, None, w.double(), b.double(),
                                             True, 0.0, EPS) + r.double())
    assert_close(y, ref.float(), *TOLERANCES[torch.float32], f"{activation} output")


def _params(c, dtype=torch.float32):
    g = torch.Generator().manual_seed(c)
    w = (torch.rand(c, generator=g) + 0.5).to(dtype)
    b = torch.randn(c, generator=g).to(dtype)
    rm = torch.randn(c, generator=g)
    rv = torch.rand(c, generator=g) + 0.5
    return w, b, rm, rv


def _ref64(x, w, b, rm, rv, r, training, activation, dy):
    """float64 torch.nn.functional composite: (y, dx, dw, db, dr, new_rm, new_rv)."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    r64 = None if r is None else r.detach().double().requires_grad_()
    rm64, rv64 = rm.double().clone(), rv.double().clone()
    z = F.batch_norm(x64, rm64, rv64, w64, b64, training, MOMENTUM, EPS)
    if r64 is not None:
        z = z + r64
    y = TORCH_ACT[activation](z)
    y.backward(dy.double())
    return (y, x64.grad, w64.grad, b64.grad, None if r64 is None else r64.grad, rm64, rv64)


def _check(what, dtype, m, got, composite, ref):
    """Compare fused (y, dx, dw, db, dr, rm, rv) with the composite and the float64 ref."""
    atol, rtol = TOLERANCES[dtype]
    names = ["y", "dx", "dweight", "dbias", "dresidual", "running_mean", "running_var"]
    for i, name in enumerate(names):
        if got[i] is None:
            assert ref[i] is None, f"{what}: {name} missing"
            continue
        if name.startswith("running"):
            tol = STAT_TOLERANCES[got[i].dtype]  # the buffers' dtype (float32 here)
        elif name in ("dweight", "dbias"):
            tol = (atol * m**0.5, rtol)
        else:
            tol = (atol, rtol)
        assert_close(got[i], ref[i], *tol, f"{what} {name} vs float64")
        if composite is not None and composite[i] is not None:
            assert_close(got[i], composite[i], *tol, f"{what} {name} vs composite")


def _run(be, fn_fwd, fn_bwd, x, w, b, rm, rv, r, training, activation, dy):
    """One forward + backward through the given (bound or unbound) entry points."""
    out = empty_out_like(x)
    y, mean, invstd, nrm, nrv = fn_fwd(be, x, w, b, rm, rv, r, training, MOMENTUM, EPS,
                                       activation, SLOPE, out)
    dx, dw, db, dr = fn_bwd(be, dy, x, w, b, mean, invstd, r, training, activation, SLOPE,
                            False, MASK)
    if not training:
        nrm, nrv = rm, rv
    return y, dx, dw, db, dr, nrm, nrv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize(("shape", "channels_last"), SHAPES, ids=SHAPE_IDS)
def test_matches_composites(be, dtype, shape, channels_last):
    c = shape[1]
    m = math.prod(shape) // c
    w, b, rm, rv = _params(c, dtype)
    x = make_input(shape, dtype, channels_last, seed=1)
    res = make_input(shape, dtype, channels_last, seed=2, shift=0.0)
    dy = make_input(shape, dtype, channels_last, seed=3, shift=0.0, scale=1.0)
    for activation in ACTS:
        for r in (None, res):
            for training in (True, False):
                what = f"{dtype} {shape} cl={channels_last} {activation} res={r is not None} " \
                       f"train={training}"
                got = _run(be, type(be).forward_act, type(be).backward_act, x, w, b, rm, rv, r,
                           training, activation, dy)
                comp = _run(be, Backend.forward_act, Backend.backward_act, x, w, b, rm, rv, r,
                            training, activation, dy)
                ref = _ref64(x, w, b, rm, rv, r, training, activation, dy)
                assert got[0].stride() == x.stride(), what
                if r is None:
                    assert got[4] is None, what
                _check(what, dtype, m, got, comp, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_inplace_overwrites_and_backward_from_output(be, dtype, channels_last):
    shape = (3, 4, 5, 6)
    c, m = shape[1], 3 * 5 * 6
    w, b, rm, rv = _params(c, dtype)
    x0 = make_input(shape, dtype, channels_last, seed=4)
    res = make_input(shape, dtype, channels_last, seed=5, shift=0.0)
    dy = make_input(shape, dtype, channels_last, seed=6, shift=0.0, scale=1.0)
    for activation in INVERTIBLE:
        for r in (None, res):
            for training in (True, False):
                what = f"inplace {dtype} cl={channels_last} {activation} res={r is not None} " \
                       f"train={training}"
                x = x0.clone()
                ptr = x.data_ptr()
                y, mean, invstd, nrm, nrv = be.forward_act(x, w, b, rm, rv, r, training,
                                                           MOMENTUM, EPS, activation, SLOPE, x)
                assert y is x and x.data_ptr() == ptr, what
                ref = _ref64(x0, w, b, rm, rv, r, training, activation, dy)
                # the input now holds the output
                assert_close(x, ref[0], *TOLERANCES[dtype], f"{what} x overwritten")
                dx, dw, db, dr = be.backward_act(dy, y, w, b, mean, invstd, r, training,
                                                 activation, SLOPE, True, MASK)
                comp = Backend.backward_act(be, dy, y, w, b, mean, invstd, r, training,
                                            activation, SLOPE, True, MASK)
                got = (y, dx, dw, db, dr, nrm if training else rm, nrv if training else rv)
                _check(what, dtype, m, got, (None, *comp, None, None), ref)


def _act_outputs(be, x, w, b, rm, rv, r, training, activation, dy, inplace):
    x = x.clone()
    out = x if inplace else empty_out_like(x)
    y, mean, invstd, nrm, nrv = be.forward_act(x, w, b, rm, rv, r, training, MOMENTUM, EPS,
                                               activation, SLOPE, out)
    grads = be.backward_act(dy, y if inplace else x, w, b, mean, invstd, r, training,
                            activation, SLOPE, inplace, MASK)
    return [t for t in (y.clone(), mean, invstd, nrm, nrv, *grads) if t is not None]


@pytest.mark.parametrize(("shape", "channels_last"),
                         [((4, 6, 7, 9), False), ((3, 5, 1100), False), ((4, 6, 7, 9), True),
                          ((300, 37), False), ((40, 1100), False)],
                         ids=["runs", "long_runs", "nhwc", "rows", "wide_rows"])
def test_streamed_outputs_equal_plain_stores(be, monkeypatch, shape, channels_last):
    """Forcing the non-temporal store path (numba_backend._STREAM_MIN_BYTES = 0) on y, dx and
    dresidual gives the same bits as plain stores, with and without a residual, in place
    too. With a residual in normal mode the two backward paths differ: plain stores let the
    reduction write dz into dresidual and the elementwise pass read it back, streamed ones
    recompute dz there, so this also checks that both give the same dz and dx (training and
    eval, a piecewise-linear and a transcendental activation)."""
    from batchnorm.backends import numba_backend

    c = shape[1]
    w, b, rm, rv = _params(c)
    x = make_input(shape, torch.float32, channels_last, seed=13)
    r = make_input(shape, torch.float32, channels_last, seed=14, shift=0.0)
    dy = make_input(shape, torch.float32, channels_last, seed=15, shift=0.0, scale=1.0)
    cases = [("relu", r, False, True), ("silu", None, False, True),
             ("leaky_relu", r, True, True), ("elu", None, True, False),
             ("gelu", r, False, True), ("relu", r, False, False)]
    for activation, res, inplace, training in cases:
        outs = []
        for limit in (1 << 62, 0):
            monkeypatch.setattr(numba_backend, "_STREAM_MIN_BYTES", limit)
            outs.append(_act_outputs(be, x, w, b, rm, rv, res, training, activation, dy,
                                     inplace))
        assert len(outs[0]) == len(outs[1])
        for i, (p, q) in enumerate(zip(*outs)):
            assert torch.equal(p, q), f"{activation} res={res is not None} inplace={inplace}: " \
                                      f"output {i} differs when streamed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("shape", "channels_last"),
                         [((4, 6, 7, 9), False), ((3, 5, 1100), False), ((4, 6, 7, 9), True),
                          ((300, 37), False)],
                         ids=["runs", "long_runs", "nhwc", "rows"])
def test_inplace_forward_writes_the_out_of_place_bits(be, dtype, shape, channels_last):
    """In place, the elementwise pass computes chunks into a buffer and copies them over the
    input (a loop reading and writing one array through two arguments runs scalar): the
    output, statistics and running buffers are the out-of-place ones, bit for bit (the copy
    moves whole elements of the storage dtype, 2 bytes for bfloat16)."""
    c = shape[1]
    w, b, rm, rv = _params(c)
    x = make_input(shape, dtype, channels_last, seed=16)
    r = make_input(shape, dtype, channels_last, seed=17, shift=0.0)
    for activation, res, training in (("leaky_relu", r, True), ("identity", None, True),
                                      ("leaky_relu", None, False)):
        outs = []
        for inplace in (False, True):
            xi = x.clone()
            out = xi if inplace else empty_out_like(xi)
            got = be.forward_act(xi, w, b, rm, rv, res, training, MOMENTUM, EPS, activation,
                                 SLOPE, out)
            assert (got[0] is xi) == inplace
            outs.append([t for t in got if t is not None])
        for i, (p, q) in enumerate(zip(*outs)):
            assert torch.equal(p, q), f"{activation} res={res is not None}: output {i} differs"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_results_do_not_depend_on_thread_count(be, channels_last):
    # large enough for several tasks, several batch parts and the parallel path
    shape = (16, 8, 32, 32)
    w, b, rm, rv = _params(8)
    x = make_input(shape, torch.float32, channels_last, seed=7)
    r = make_input(shape, torch.float32, channels_last, seed=8, shift=0.0)
    dy = make_input(shape, torch.float32, channels_last, seed=9, shift=0.0, scale=1.0)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_run(be, type(be).forward_act, type(be).backward_act, x, w, b, rm,
                                rv, r, True, "silu", dy))
    finally:
        torch.set_num_threads(before)
    for name, a, b_ in zip(["y", "dx", "dw", "db", "dr", "rm", "rv"], *results):
        assert torch.equal(a, b_), f"{name} differs between 1 and 2 threads"


def test_output_mask_and_delegation(be):
    shape = (4, 3, 5, 6)
    w, b, rm, rv = _params(3)
    x = make_input(shape, torch.float32, seed=10)
    r = make_input(shape, torch.float32, seed=11, shift=0.0)
    dy = make_input(shape, torch.float32, seed=12, shift=0.0, scale=1.0)
    _, mean, invstd, _, _ = be.forward_act(x, w, b, rm, rv, r, True, MOMENTUM, EPS, "gelu",
                                           SLOPE, empty_out_like(x))
    full = be.backward_act(dy, x, w, b, mean, invstd, r, True, "gelu", SLOPE, False, MASK)
    # only the residual's gradient: dz alone, nothing else returned
    dx, dw, db, dr = be.backward_act(dy, x, w, b, mean, invstd, r, True, "gelu", SLOPE, False,
                                     (False, False, False, True))
    assert dx is None and dw is None and db is None
    assert torch.equal(dr, full[3])
    dx, dw, db, dr = be.backward_act(dy, x, w, b, mean, invstd, r, True, "gelu", SLOPE, False,
                                     (True, False, False, False))
    assert dw is None and db is None and dr is None
    assert torch.equal(dx, full[0])
    # a float64 residual for a float32 input is delegated to the composite: same results
    r64 = r.double()
    got = be.forward_act(x, w, b, rm, rv, r64, True, MOMENTUM, EPS, "gelu", SLOPE,
                         empty_out_like(x))
    comp = Backend.forward_act(be, x, w, b, rm, rv, r64, True, MOMENTUM, EPS, "gelu", SLOPE,
                               empty_out_like(x))
    assert torch.equal(got[0], comp[0])
    # a strided (sliced) input is copied once and fused
    xs = make_input((4, 6, 5, 6), torch.float32, seed=13)[:, ::2]
    ys, *_ = be.forward_act(xs, w, b, rm, rv, r, True, MOMENTUM, EPS, "relu", SLOPE,
                            empty_out_like(xs))
    ref = _ref64(xs, w, b, rm, rv, r, True, "relu", dy)
    assert_close(ys, ref[0], *TOLERANCES[torch.float32], "strided input y")


_TWO_MODULES_SCRIPT = """
import torch
import torch.nn.functional as F
from batchnorm.backends import get_backend
from batchnorm.backends.base import empty_out_like
be = get_backend("numba")
be.fuse_all_activations = True
g = torch.Generator().manual_seed(0)
x = torch.randn(4, 3, 5, 5, generator=g)
w, b = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
z = F.batch_norm(x.double(), None, None, w.double(), b.double(), True, 0.0, 1e-5)
for act in ("relu", "silu"):
    y = be.forward_act(x, w, b, None, None, None, True, 0.1, 1e-5, act, 0.1,
                       empty_out_like(x))[0]
    err = float((y.double() - getattr(F, act)(z)).abs().max())
    print(act, err)
    assert err < 1e-5, (act, err)
"""


@pytest.mark.slow
def test_both_kernel_modules_compiled_cold_in_one_process(tmp_path):
    """The piecewise-linear and the transcendental kernels are built by one function and
    compiled in two child processes; numba names compiled code by qualified name and a
    per-process counter, so before their functions were named per module, loading both
    from the cache in one process linked silu's kernel to relu's loops (silu returned relu's
    output). Cold cache, relu then silu in one process: each output is its own."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("BATCHNORM_NUMBA_CHILD_COMPILE", None)
    done = subprocess.run([sys.executable, "-c", _TWO_MODULES_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_in_place_backward_refuses_a_non_invertible_activation(be):
    """The transcendental kernels have in-place loops for elu only: a direct backend call in
    in-place mode with silu raises (the public entry points check it first) instead of
    running normal mode's math on the output."""
    x = make_input((2, 3, 4, 5), torch.float32, False, seed=20)
    w, b, _, _ = _params(3)
    mean, invstd = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="invertible"):
        be.backward_act(torch.ones_like(x), x, w, b, mean, invstd, None, True, "silu", SLOPE,
                        True, MASK)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("center", [0.5, 1e3], ids=["folded", "centred"])
def test_identity_gives_plain_batchnorms_bits(channels_last, center):
    """The identity activation without a residual computes what plain BatchNorm does, bit for
    bit, with folded coefficients (mean near 0: the loops skip ``hi``) and centred ones (far
    from 0), in training and in eval: both kernels take the same coefficients and form."""
    shape = (12, 40, 9, 11)
    x = make_input(shape, channels_last=channels_last, shift=center, scale=2.0, seed=7)
    c = shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    for training in (True, False):
        rm = torch.full((c,), center) + torch.randn(c)
        rv = torch.rand(c) * 4 + 2
        rm2, rv2 = rm.clone(), rv.clone()
        y = batchnorm.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, backend="numba")
        ya = batchnorm.batch_norm_act(x, rm2, rv2, w, b, training, 0.1, 1e-5,
                                      activation="identity", backend="numba")
        assert torch.equal(ya, y), f"training={training}: {(ya - y).abs().max().item():.3e}"
        assert torch.equal(rm2, rm) and torch.equal(rv2, rv)


def test_unfolded_returns_its_value():
    """``_unfolded`` (LLVM ``freeze``, which keeps the relu backward's ``dy`` load out of a
    masked instruction) changes no value: NaN, infinities, -0 and subnormals pass bit for
    bit, in float32 and float64, inside a vectorized loop."""
    import numpy as np
    from numba import njit

    from batchnorm.backends.numba_act_kernels import _unfolded

    @njit
    def through(src, dst):
        for i in range(src.size):
            dst[i] = _unfolded(src[i])

    for dtype, itype in ((np.float32, np.uint32), (np.float64, np.uint64)):
        src = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1.5, -2.25,
                        np.finfo(dtype).tiny / 4, np.finfo(dtype).max] * 7, dtype=dtype)
        dst = np.full_like(src, 7.0)
        through(src, dst)
        assert np.array_equal(dst.view(itype), src.view(itype)), dtype


_MASKED_LOADS_SCRIPT = """
import os, re, sys, tempfile
os.environ["BATCHNORM_NUMBA_CHILD_COMPILE"] = "0"
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp()
import torch
from batchnorm.backends import numba_entry as ne
compiled = {}
plain = ne._compile
def keep(fn, module, name, dtype):
    compiled[name] = plain(fn, None, name, dtype)
    return compiled[name]
ne._compile = keep
ne.entry_for("numba_act_kernels", "backward_act", torch.float32)
asm = compiled["backward_act"]._library.get_asm_str()
bad = [ln.strip() for ln in asm.splitlines() if "{z}" in ln and re.search(r"[(]", ln)]
print(len(bad))
print("\\n".join(bad[:20]))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux" or "avx512f" not in open("/proc/cpuinfo").read(),
                    reason="the masked loads in question are AVX-512's (x86 Linux with it)")
def test_relu_backward_has_no_zero_masked_loads():
    """relu's ``dz = z > 0 ? dy : 0`` let the x86 back end fold the ``dy`` load into a
    zero-masked load, which waits for x and z: the backward's reduction ran 2-3x slower
    from memory than identity's (benchmarks/RESULTS.md, session 25). The compiled backward
    kernel (float32, built uncached in a child) has no zero-masking instruction with a
    memory operand; without ``_unfolded`` it had 96 (checked)."""
    done = subprocess.run([sys.executable, "-c", _MASKED_LOADS_SCRIPT],
                          capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    count, _, lines = done.stdout.partition("\n")
    assert int(count) == 0, lines


# ---- the activation mask (relu / leaky_relu with a residual: saved instead of it) -----------


def _with_mask(be, x, w, b, rm, rv, r, training, activation, dy, use_mask, output_mask=MASK,
               slope=SLOPE):
    """Forward and backward through the backend's calls, with the activation mask (``r`` not
    given to the backward) or without it (``r`` given): ``(y, mask, grads)``."""
    out = empty_out_like(x)
    mask = be.act_mask(x, r, activation, slope, out) if use_mask else None
    assert (mask is not None) == use_mask
    extra = {} if mask is None else {"mask": mask}
    y, mean, invstd, _, _ = be.forward_act(x, w, b, rm, rv, r, training, MOMENTUM, EPS,
                                           activation, slope, out, **extra)
    grads = be.backward_act(dy, x, w, b, mean, invstd, None if use_mask else r, training,
                            activation, slope, False, output_mask, **extra)
    return y, mask, grads


def _special_residual(shape, channels_last, seed):
    """A residual with a -inf, a +inf and a NaN: pre-activations relu blocks, passes, and
    passes (NaN, as torch's threshold_backward), and leaky_relu scales at NaN."""
    r = make_input(shape, torch.float32, channels_last, seed=seed, shift=0.0)
    flat = r.view(-1) if r.is_contiguous() else r.permute(0, *range(2, r.dim()), 1).view(-1)
    flat[1], flat[5], flat[-2] = float("-inf"), float("inf"), float("nan")
    return r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("shape", "channels_last"),
                         [*SHAPES, ((5, 13, 7, 7), False), ((3, 13, 3, 3), True),
                          ((2, 6, 1100), False), ((37, 13), False), ((40, 3, 6, 6), True),
                          ((300, 5), False)],
                         ids=[*SHAPE_IDS, "odd_runs", "odd_rows", "long_runs", "odd_nc",
                              "row_groups", "nc_groups"])
@pytest.mark.parametrize("threads", [1, 2])
def test_activation_mask_bits_and_gradients(be, monkeypatch, dtype, shape, channels_last,
                                            threads):
    """The forward's mask holds, for every value in memory order (``unpack_mask``), relu's
    ``y != 0`` (so also at NaN) or leaky_relu's ``y > 0``, with zero bits past the end; the
    backward that reads it instead of the residual gives the residual path's gradients bit
    for bit (same data: the same decisions), for every output mask, training and eval,
    plain and non-temporal stores (whose chunks end inside a byte of the mask), on one
    thread and two (whose tasks share a byte where a range ends inside one). The odd sizes
    put run, row and task ends inside bytes; the last two have rows of few channels, whose
    bits are packed and expanded in groups of rows (several groups, ends inside bytes)."""
    from batchnorm.backends import numba_backend
    from batchnorm.backends.numba_act import unpack_mask

    # the kernels' rows of few channels too (the host gives them no mask by default)
    monkeypatch.setattr(type(be), "mask_min_row_channels", 0)
    c = shape[1]
    w, b, rm, rv = _params(c, dtype)
    x = make_input(shape, dtype, channels_last, seed=21)
    r = _special_residual(shape, channels_last, 22).to(dtype)
    dy = make_input(shape, dtype, channels_last, seed=23, shift=0.0, scale=1.0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for limit in (1 << 62, 0):
            monkeypatch.setattr(numba_backend, "_STREAM_MIN_BYTES", limit)
            for activation in ("relu", "leaky_relu"):
                for training in (True, False):
                    for output_mask in (MASK, (True, False, False, True), (False, True, True,
                                                                           False)):
                        what = (f"{activation} train={training} streamed={limit == 0} "
                                f"mask={output_mask}")
                        y, mask, got = _with_mask(be, x, w, b, rm, rv, r, training,
                                                  activation, dy, True, output_mask)
                        hot = (y != 0) if activation == "relu" else (y > 0)
                        assert torch.equal(unpack_mask(mask, x), hot), what
                        tail = torch.arange(8 * mask.numel() - x.numel()) + x.numel()
                        bits = (mask[tail // 8] >> (tail % 8).to(torch.uint8)) & 1
                        assert not bits.any(), f"{what}: bits past the end"
                        y2, _, want = _with_mask(be, x, w, b, rm, rv, r, training, activation,
                                                 dy, False, output_mask)
                        torch.testing.assert_close(y, y2, rtol=0, atol=0, equal_nan=True,
                                                   msg=what)
                        for i, (p, q) in enumerate(zip(got, want)):
                            assert (p is None) == (q is None), f"{what} output {i}"
                            if p is not None:
                                torch.testing.assert_close(p, q, rtol=0, atol=0,
                                                           equal_nan=True,
                                                           msg=f"{what} output {i}")
    finally:
        torch.set_num_threads(before)


def test_activation_mask_only_where_it_stands_for_the_residual(be, monkeypatch):
    """A mask for relu, and leaky_relu with a slope >= 0, with a residual, out of place,
    float32 or float64 (any layout: a strided input is copied for the kernels, and the mask
    follows the copy); None otherwise: no residual, in place, another activation, a
    negative slope (y > 0 on both sides of 0), half storage (a rounded output has not z's
    sign), a residual the kernels do not read as it is, rows of fewer than 64 channels, or
    the switch off."""
    x = make_input((4, 3, 5, 6))
    r = make_input((4, 3, 5, 6), shift=0.0)
    out = empty_out_like(x)
    mask = be.act_mask(x, r, "relu", 0.0, out)
    assert mask is not None and mask.dtype == torch.uint8 and mask.numel() == (x.numel() + 7) // 8
    assert not mask.any(), "the kernels or their partial bytes into a zeroed mask"
    assert be.act_mask(x, r, "leaky_relu", 0.0, out) is not None
    strided = x.transpose(2, 3)
    assert be.act_mask(strided, r.transpose(2, 3), "relu", 0.0,
                       empty_out_like(strided.contiguous())) is not None
    half = x.to(torch.bfloat16)
    for args in ((x, None, "relu", 0.0, out), (x, r, "relu", 0.0, x),
                 (x, r, "leaky_relu", -0.1, out), (x, r, "elu", 0.0, out),
                 (x, r, "identity", 0.0, out), (x, r, "silu", 0.0, out),
                 (half, r.to(torch.bfloat16), "relu", 0.0, empty_out_like(half)),
                 (x, r.double(), "relu", 0.0, out), (x, r[:2], "relu", 0.0, out)):
        assert be.act_mask(*args) is None, args[2:4]
    cl, cl_r = (t.contiguous(memory_format=torch.channels_last) for t in (x, r))
    assert be.act_mask(cl, cl_r, "relu", 0.0, empty_out_like(cl)) is None  # 3 < 64 channels
    rows = make_input((40, 64))
    assert be.act_mask(rows, rows, "relu", 0.0, empty_out_like(rows)) is not None
    monkeypatch.setattr(type(be), "activation_mask", False)
    assert be.act_mask(x, r, "relu", 0.0, out) is None
    monkeypatch.undo()
    # a mask for a call that does not run the fused kernels is a caller's bug: loud
    with pytest.raises(RuntimeError, match="activation mask"):
        be.forward_act(x, None, None, None, None, r, True, MOMENTUM, EPS, "relu", 0.0,
                       torch.empty_like(x).transpose(2, 3).contiguous().transpose(2, 3),
                       mask=mask)


def test_a_mask_handed_to_the_backend_is_checked(be):
    """``mask=`` is part of the backend calls: one that act_mask would not make for the
    call (wrong size or dtype; in place, elu, a negative slope, no residual in the forward,
    a residual too in the backward) raises before any kernel runs, instead of a kernel
    reading past it or the residual it skips."""
    x = make_input((4, 3, 5, 6))
    r = make_input((4, 3, 5, 6), shift=0.0)
    out = empty_out_like(x)
    mask = be.act_mask(x, r, "relu", 0.0, out)
    assert mask is not None
    fwd = [(mask[:3], r, "relu", 0.0, out, "bytes"), (mask.to(torch.int8), r, "relu", 0.0, out,
                                                     "bytes"),
           (mask, None, "relu", 0.0, out, "no residual"), (mask, r, "elu", 0.0, out, "elu"),
           (mask, r, "leaky_relu", -0.1, out, "slope"), (mask, r, "leaky_relu", 0.1, x,
                                                          "in place")]
    for m, res, act, slope, o, what in fwd:
        xi = x.clone()
        o = xi if o is x else o
        with pytest.raises(ValueError, match="activation mask"):
            be.forward_act(xi, None, None, None, None, res, True, MOMENTUM, EPS, act, slope, o,
                           mask=m)
        assert torch.equal(xi, x), what
    _, mean, invstd, _, _ = be.forward_act(x, None, None, None, None, r, True, MOMENTUM, EPS,
                                           "relu", 0.0, out, mask=mask)
    dy = torch.ones_like(x)
    for m, res, act, inplace in ((mask[:-1], None, "relu", False), (mask, r, "relu", False),
                                 (mask, None, "elu", False), (mask, None, "leaky_relu", True)):
        with pytest.raises(ValueError, match="activation mask"):
            be.backward_act(dy, x, None, None, mean, invstd, res, True, act, 0.1, inplace, MASK,
                            mask=m)


def test_no_activation_mask_without_a_gradient_to_come(be, monkeypatch):
    """The op layer's autograd Function asks for a mask only where a backward can follow:
    not under no_grad (where ctx.needs_input_grad still says True), nor for inputs that need
    no gradient."""
    calls = []
    real = type(be).act_mask

    def spy(self, *args):
        got = real(self, *args)
        calls.append(got is not None)
        return got

    monkeypatch.setattr(type(be), "act_mask", spy)
    monkeypatch.setattr(type(be), "eager_act_train", lambda self, *a: None)  # the Function
    x = make_input((4, 3, 5, 6)).requires_grad_()
    r = make_input((4, 3, 5, 6), shift=0.0)
    with torch.no_grad():
        batchnorm.batch_norm_act(x, None, None, training=True, activation="relu", residual=r,
                                 backend="numba")
    batchnorm.batch_norm_act(x.detach(), None, None, training=True, activation="relu",
                             residual=r, backend="numba")
    assert calls == []
    y = batchnorm.batch_norm_act(x, None, None, training=True, activation="relu", residual=r,
                                 backend="numba")
    assert calls == [True]
    y.sum().backward()
    assert x.grad is not None
