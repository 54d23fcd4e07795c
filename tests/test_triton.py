"""The ``"triton"`` backend against the float64 reference and torch.nn.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1`` before anything imports triton). Knobs shrink the tiles so that small
shapes still exercise multi-part split reductions, partial tiles and the on-chip path; every
output is poisoned with NaN before the kernels run, so an element they fail to write fails
the comparison.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the triton backend needs the triton package")

import triton
import triton.language as tl

import batchnorm
from batchnorm import reference
from batchnorm.backends import get_backend, resolve_backend
from batchnorm.backends import triton_backend as tb
from batchnorm.backends import triton_kernels as tk
from batchnorm.catalog import EDGE, FAST, resnet50
from helpers import (
    STAT_TOLERANCES,
    TOLERANCES,
    assert_close,
    is_channels_last,
    make_input,
)

pytestmark = pytest.mark.triton

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

# Interpreter-sized knobs: 256-byte tiles (64 float32 values), 2 "SMs", on-chip slices of up to
# 256 values. Every FAST shape's slice fits on chip; split reductions get several parts of
# several tiles, with partial tiles. (The interpreter's cost is per program and per loop trip.)
SMALL = dict(tile_bytes=256, min_tile_bytes=256, row_bytes=32, min_run_bytes=16,
             onchip_fwd_elems=256, onchip_bwd_elems=256, onchip_min_row_bytes=4, sm_count=2,
             reduce_programs_per_sm=2, elementwise_programs_per_sm=1, poison_outputs=True)
# Many channels (EDGE's wide_c): wide channel blocks keep the grid to a few programs.
WIDE = dict(SMALL, tile_bytes=16384, row_bytes=16384, onchip_fwd_elems=16384,
            onchip_bwd_elems=16384)


def knobs_for(shape: tuple[int, ...]) -> dict:
    return WIDE if shape[1] > 64 else SMALL
PATHS = ("split", "onchip")
HALF_AND_DOUBLE = (torch.float16, torch.bfloat16, torch.float64)
SHAPES = dict(FAST)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the kernels launched during the test, in order."""
    names: list[str] = []
    real = tb._launch

    def spy(name: str, grid: int, num_warps: int, **kwargs):
        names.append(name)
        return real(name, grid, num_warps, **kwargs)

    monkeypatch.setattr(tb, "_launch", spy)
    return names


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().cpu().numpy()


def dx_atol(atol: float, weight: torch.Tensor | None, invstd: np.ndarray,
            dy: torch.Tensor) -> float:
    """``atol`` scaled to the size of the terms that cancel in ``dx`` (``weight * invstd * dy``):
    with few values per channel the variance can be tiny and invstd large, so dx is a small
    difference of large terms and its rounding error grows with them, in any implementation."""
    w = np.ones_like(invstd) if weight is None else np.abs(_np(weight))
    return atol * max(1.0, float((w * invstd).max()) * float(dy.abs().max()))


def _layout_cases(shapes: list[str]) -> list[tuple[str, bool]]:
    return [(s, cl) for s in shapes for cl in (False, True) if not cl or len(SHAPES[s]) >= 3]


def _expected_kernels(path: str) -> tuple[str, str]:
    return ("fwd_onchip_kernel", "bwd_onchip_kernel") if path == "onchip" else (
        "stats_partial_kernel", "bwd_partial_kernel")


def check_train(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    channels_last: bool,
    path: str,
    *,
    weight: bool = True,
    bias: bool = True,
    running: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    force_int64: bool = False,
    launches: list[str] | None = None,
) -> None:
    """One training step (forward, backward) through the op layer, checked against the
    reference: y, saved mean/invstd, running buffers, dx, dweight, dbias, dtypes, layouts."""
    c = shape[1]
    pdt = _param_dtype(dtype)
    x = make_input(shape, dtype, channels_last).to(DEVICE)
    dy = make_input(shape, dtype, channels_last, shift=0.0, scale=1.0).to(DEVICE)
    w = (torch.rand(c, dtype=pdt) + 0.5).to(DEVICE).requires_grad_() if weight else None
    b = torch.randn(c, dtype=pdt).to(DEVICE).requires_grad_() if bias else None
    rm0 = torch.randn(c, dtype=pdt).to(DEVICE) if running else None
    rv0 = (torch.rand(c, dtype=pdt) + 0.5).to(DEVICE) if running else None
    rm = None if rm0 is None else rm0.clone()
    rv = None if rv0 is None else rv0.clone()
    xg = x.clone().requires_grad_()

    with tb.tuning(path=path, force_int64=force_int64, **knobs_for(shape)):
        y = batchnorm.batch_norm(xg, rm, rv, w, b, training=True, momentum=momentum, eps=eps,
                                 backend="triton")
        y.backward(dy)
        _, mean, invstd, _, _ = batchnorm.ops.forward_train(
            x, w, b, None, None, momentum, eps, "triton")
    if launches is not None:
        for name in _expected_kernels(path):
            assert name in launches, f"{path} path did not launch {name}: {launches}"

    x64, dy64 = _np(x), _np(dy)
    ref_y, st, ref_inv = reference.forward_train(x64, _np(w), _np(b), eps)
    ref_dx, ref_dw, ref_db = reference.backward(dy64, x64, st.mean, ref_inv, _np(w))
    tol, stol = TOLERANCES[dtype], STAT_TOLERANCES[dtype]
    what = f"{shape} {dtype} {'cl' if channels_last else 'cf'} {path}"
    assert y.dtype == dtype and xg.grad.dtype == dtype, what
    assert y.stride() == x.stride(), f"{what}: y strides {y.stride()} != x {x.stride()}"
    assert is_channels_last(xg.grad) == is_channels_last(x) or xg.grad.is_contiguous()
    assert_close(y, ref_y, *tol, what=f"{what}: y")
    assert_close(mean, st.mean, *stol, what=f"{what}: save_mean")
    assert_close(invstd, ref_inv, *stol, what=f"{what}: save_invstd")
    assert mean.dtype == invstd.dtype == _param_dtype(dtype)
    assert_close(xg.grad, ref_dx, dx_atol(tol[0], w, ref_inv, dy), tol[1], what=f"{what}: dx")
    if weight:
        assert w.grad.dtype == pdt
        # a sum of m products accumulated in fp32 at least, plus the saved mean's rounding
        # (fp32, as in ATen) times sum(dy): as in test_numba
        m = x.numel() // x.shape[1]
        eps32 = float(torch.finfo(torch.float32).eps)
        mean_err = 2 * eps32 * float(np.abs(st.mean).max()) * float(np.max(ref_inv))
        dw_atol = stol[0] * m**0.5 + float(np.abs(ref_db).max()) * mean_err
        assert_close(w.grad, ref_dw, dw_atol, stol[1], what=f"{what}: dweight")
    if bias:
        assert_close(b.grad, ref_db, *stol, what=f"{what}: dbias")
    if running:
        ref_rm, ref_rv = reference.update_running(_np(rm0), _np(rv0), st, momentum, 1)
        assert rm.dtype == rv.dtype == pdt
        assert_close(rm, ref_rm, *stol, what=f"{what}: running_mean")
        assert_close(rv, ref_rv, *stol, what=f"{what}: running_var")


# ---- training: every FAST shape, both layouts, both paths (float32) -----------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("name", "channels_last"), _layout_cases(list(SHAPES)))
def test_train_float32(name: str, channels_last: bool, path: str, launches: list[str]) -> None:
    check_train(SHAPES[name], torch.float32, channels_last, path, launches=launches)


@pytest.mark.parametrize("dtype", HALF_AND_DOUBLE, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("name", "channels_last"), _layout_cases(["ncl", "nchw", "ncdhw"]))
def test_train_dtypes(name: str, channels_last: bool, path: str, dtype: torch.dtype,
                      launches: list[str]) -> None:
    check_train(SHAPES[name], dtype, channels_last, path, launches=launches)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "options",
    [
        dict(weight=False, bias=False),
        dict(weight=True, bias=False),
        dict(weight=False, bias=True),
        dict(running=False),
        dict(momentum=0.0),
        dict(momentum=1.0, eps=1e-3),
    ],
    ids=["no_affine", "weight_only", "bias_only", "no_running", "momentum0", "momentum1"],
)
def test_train_options(options: dict, path: str) -> None:
    check_train((3, 4, 5, 6), torch.float32, True, path, **options)
    check_train((4, 6, 9), torch.bfloat16, False, path, **options)


@pytest.mark.parametrize("path", PATHS)
def test_int64_indexing_path(path: str) -> None:
    """The 64-bit index arithmetic used for tensors of 2^31+ elements, on small tensors."""
    check_train((3, 4, 5, 6), torch.float32, False, path, force_int64=True)
    check_train((2, 3, 4, 3, 5), torch.bfloat16, True, path, force_int64=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF_AND_DOUBLE, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("name", "channels_last"), _layout_cases(list(SHAPES)))
def test_train_all_shapes_dtypes(name: str, channels_last: bool, path: str,
                                 dtype: torch.dtype) -> None:
    check_train(SHAPES[name], dtype, channels_last, path)


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_train_default_knobs_larger(dtype: torch.dtype, channels_last: bool) -> None:
    """Default tiles (no small knobs) on a shape with several tiles per channel."""
    shape = (16, 8, 24, 24)
    x = make_input(shape, dtype, channels_last).to(DEVICE)
    y = batchnorm.batch_norm(x, None, None, training=True, backend="triton")
    ref_y, _, _ = reference.forward_train(_np(x), None, None, 1e-5)
    assert_close(y, ref_y, *TOLERANCES[dtype], what="y")


# ---- numerics: far-from-zero means, constant channels -------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_large_mean_small_spread(path: str) -> None:
    """|mean| >> std: Welford/Chan statistics keep the variance (E[x^2]-E[x]^2 would not)."""
    shape = (4, 3, 7, 5)
    x = (1000.0 + 0.01 * torch.randn(shape, dtype=torch.float64)).float().to(DEVICE)
    with tb.tuning(path=path, **SMALL):
        mean, m2 = get_backend("triton").stats(x)
    st = reference.channel_stats(_np(x))
    assert_close(mean, st.mean, 0.0, 1e-7, what="mean")
    assert_close(m2, st.m2, 0.0, 1e-5, what="m2")


@pytest.mark.parametrize("path", PATHS)
def test_constant_channel(path: str) -> None:
    """Zero variance: invstd = 1/sqrt(eps), y = bias, dx = 0; no NaN anywhere."""
    x = torch.full((4, 3, 5), 2.5).to(DEVICE).requires_grad_()
    w = torch.tensor([1.0, 2.0, 3.0]).to(DEVICE).requires_grad_()
    b = torch.tensor([0.5, -0.5, 0.0]).to(DEVICE).requires_grad_()
    with tb.tuning(path=path, **SMALL):
        y = batchnorm.batch_norm(x, None, None, w, b, training=True, backend="triton")
        y.backward(torch.ones_like(y))
    assert_close(y, b.detach().view(1, 3, 1).expand(4, 3, 5), 1e-6, 0.0, what="y")
    assert_close(x.grad, torch.zeros_like(x), 1e-6, 0.0, what="dx")


# ---- eval ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_AND_DOUBLE], ids=str)
@pytest.mark.parametrize(("name", "channels_last"),
                         _layout_cases(["nc", "ncl", "nchw", "ncdhw", "odd_2d"]))
def test_eval(name: str, channels_last: bool, dtype: torch.dtype) -> None:
    """Eval forward and backward (dx = dy * weight * invstd_running) against the reference."""
    shape = SHAPES[name]
    c = shape[1]
    pdt = _param_dtype(dtype)
    x = make_input(shape, dtype, channels_last).to(DEVICE).requires_grad_()
    dy = make_input(shape, dtype, channels_last, shift=0.0, scale=1.0).to(DEVICE)
    w = (torch.rand(c, dtype=pdt) + 0.5).to(DEVICE).requires_grad_()
    b = torch.randn(c, dtype=pdt).to(DEVICE).requires_grad_()
    rm = torch.randn(c, dtype=pdt).to(DEVICE)
    rv = (torch.rand(c, dtype=pdt) + 0.5).to(DEVICE)
    rm0, rv0 = rm.clone(), rv.clone()
    with tb.tuning(**knobs_for(shape)):
        y = batchnorm.batch_norm(x, rm, rv, w, b, training=False, backend="triton")
        y.backward(dy)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "eval touched the running buffers"
    inv = reference.invstd(_np(rv), 1e-5)
    ref_y = reference.forward_eval(_np(x), _np(rm), _np(rv), _np(w), _np(b), 1e-5)
    ref_dx, ref_dw, ref_db = reference.backward(_np(dy), _np(x), _np(rm), inv, _np(w),
                                                training=False)
    tol, stol = TOLERANCES[dtype], STAT_TOLERANCES[dtype]
    assert y.stride() == x.stride()
    assert_close(y, ref_y, *tol, what="y")
    assert_close(x.grad, ref_dx, *tol, what="dx")
    assert_close(w.grad, ref_dw, *stol, what="dweight")
    assert_close(b.grad, ref_db, *stol, what="dbias")


def test_eval_zero_var_zero_eps() -> None:
    """var + eps == 0 gives invstd = 0 (y = bias), not inf/NaN."""
    x = make_input((3, 2, 4)).to(DEVICE)
    rm, rv = torch.zeros(2).to(DEVICE), torch.zeros(2).to(DEVICE)
    b = torch.tensor([1.0, -2.0]).to(DEVICE)
    with tb.tuning(**SMALL):
        y = batchnorm.batch_norm(x, rm, rv, None, b, training=False, eps=0.0, backend="triton")
    assert_close(y, b.view(1, 2, 1).expand(3, 2, 4), 0.0, 0.0, what="y")


def test_eval_dx_only_reads_dy(launches: list[str]) -> None:
    """Eval backward without weight/bias gradients is one elementwise launch."""
    x = make_input((3, 4, 5)).to(DEVICE).requires_grad_()
    rm, rv = torch.zeros(4).to(DEVICE), torch.ones(4).to(DEVICE)
    y = batchnorm.batch_norm(x, rm, rv, training=False, backend="triton")
    launches.clear()
    y.backward(torch.ones_like(y))
    assert launches == ["bwd_dx_kernel"]
    assert_close(x.grad, torch.full_like(x, 1.0 / math.sqrt(1.0 + 1e-5)), 1e-6, 1e-6, what="dx")


# ---- backward output masks, strided inputs -------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False),
                                  (False, False, True), (True, True, True)], ids=str)
def test_backward_output_mask(mask: tuple[bool, bool, bool], path: str) -> None:
    shape = (3, 4, 5, 6)
    x = make_input(shape).to(DEVICE)
    dy = make_input(shape, shift=0.0, scale=1.0).to(DEVICE)
    w = (torch.rand(4) + 0.5).to(DEVICE)
    st = reference.channel_stats(_np(x))
    mean = torch.from_numpy(st.mean).float().to(DEVICE)
    inv = torch.from_numpy(reference.invstd(st.var, 1e-5)).float().to(DEVICE)
    with tb.tuning(path=path, **SMALL):
        dx, dw, db = get_backend("triton").backward(dy, x, w, mean, inv, True, mask)
    ref_dx, ref_dw, ref_db = reference.backward(_np(dy), _np(x), _np(mean), _np(inv), _np(w))
    for got, want, ref, name in ((dx, mask[0], ref_dx, "dx"), (dw, mask[1], ref_dw, "dw"),
                                 (db, mask[2], ref_db, "db")):
        if want:
            assert_close(got, ref, dx_atol(1e-5, w, _np(inv), dy), 1e-4, what=name)
        else:
            assert got is None, f"{name} computed but not asked for"


def test_strided_input_is_copied_once() -> None:
    """A sliced (neither channels-first nor channels-last) input goes through one copy."""
    base = make_input((4, 6, 5, 8)).to(DEVICE)
    x = base[:, ::2, :, 1:7].requires_grad_()
    with tb.tuning(**SMALL):
        y = batchnorm.batch_norm(x, None, None, training=True, backend="triton")
        y.backward(torch.ones_like(y))
    ref_y, _, _ = reference.forward_train(_np(x), None, None, 1e-5)
    assert_close(y, ref_y, 1e-5, 1e-4, what="y")
    assert_close(x.grad, torch.zeros_like(x), 1e-5, 0.0, what="dx")


# ---- primitives (what SyncBatchNorm calls) -------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("name", "channels_last"), _layout_cases(["nc", "nchw", "odd_5d"]))
def test_primitives_match_torch_backend(name: str, channels_last: bool, path: str,
                                        dtype: torch.dtype) -> None:
    shape = SHAPES[name]
    c = shape[1]
    pdt = _param_dtype(dtype)
    x = make_input(shape, dtype, channels_last).to(DEVICE)
    dy = make_input(shape, dtype, channels_last, shift=0.0, scale=1.0).to(DEVICE)
    w, b = (torch.rand(c, dtype=pdt) + 0.5).to(DEVICE), torch.randn(c, dtype=pdt).to(DEVICE)
    ours, ref = get_backend("triton"), get_backend("torch")
    tol, stol = TOLERANCES[dtype], STAT_TOLERANCES[dtype]
    count = x.numel() // c
    with tb.tuning(path=path, **knobs_for(shape)):
        mean, m2 = ours.stats(x)
        st = reference.channel_stats(_np(x))
        assert_close(mean, st.mean, *stol, what="stats mean")
        assert_close(m2, st.m2, stol[0] * count, stol[1], what="stats m2")
        inv = ref.stats(x)[1].div(count).add(1e-5).rsqrt()
        y = ours.apply(x, mean, inv, w, b)
        assert y.stride() == x.stride()
        assert_close(y, ref.apply(x, mean, inv, w, b), *tol, what="apply")
        s_dy, s_dot = ours.backward_reduce(dy, x, mean, inv)
        r_dy, r_dot = ref.backward_reduce(dy, x, mean, inv)
        assert_close(s_dy, r_dy, *stol, what="sum_dy")
        assert_close(s_dot, r_dot, *stol, what="sum_dy_xmu")
        # A global count different from the local one, as SyncBatchNorm passes.
        dx = ours.backward_apply(dy, x, mean, inv, w, r_dy, r_dot, 3 * count)
        assert_close(dx, ref.backward_apply(dy, x, mean, inv, w, r_dy, r_dot, 3 * count), *tol,
                     what="backward_apply")


def test_primitives_empty_input() -> None:
    """A rank with no samples (SyncBatchNorm) gets zeros, not a launch on an empty grid."""
    x = torch.empty(0, 3, 4).to(DEVICE)
    ours = get_backend("triton")
    mean, m2 = ours.stats(x)
    assert mean.shape == m2.shape == (3,) and not mean.any() and not m2.any()
    s_dy, s_dot = ours.backward_reduce(x, x, mean, m2)
    assert not s_dy.any() and not s_dot.any()
    assert ours.apply(x, mean, m2, None, None).shape == x.shape


# ---- modules, torch.nn parity --------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_module_matches_torch_nn(channels_last: bool, momentum: float | None) -> None:
    """Three training steps then eval: outputs, gradients and every buffer vs torch.nn."""
    ours = batchnorm.BatchNorm2d(4, momentum=momentum, backend="triton").to(DEVICE)
    theirs = torch.nn.BatchNorm2d(4, momentum=momentum).to(DEVICE)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 2.0, 4))
            m.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    with tb.tuning(**SMALL):
        for step in range(3):
            x = make_input((3, 4, 5, 6), channels_last=channels_last).to(DEVICE)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = ours(xa), theirs(xb)
            g = torch.randn_like(ya)
            ya.backward(g)
            yb.backward(g)
            assert_close(ya, yb, 1e-5, 1e-4, what=f"step {step}: y")
            assert_close(xa.grad, xb.grad, 1e-5, 1e-4, what=f"step {step}: dx")
        assert_close(ours.weight.grad, theirs.weight.grad, 1e-5, 1e-4, what="dweight")
        assert_close(ours.bias.grad, theirs.bias.grad, 1e-5, 1e-4, what="dbias")
        for key in ("running_mean", "running_var"):
            assert_close(getattr(ours, key), getattr(theirs, key), 1e-6, 1e-5, what=key)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
        ours.eval()
        theirs.eval()
        x = make_input((2, 4, 3, 3), channels_last=channels_last).to(DEVICE)
        assert_close(ours(x), theirs(x), 1e-5, 1e-4, what="eval y")


# ---- running statistics are applied exactly once -------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_forward_is_pure(path: str) -> None:
    """Kernels write only fresh outputs: running the forward twice (as a benchmark or an
    autotuner does) gives the same results and never touches the input buffers."""
    x = make_input((3, 4, 5, 6)).to(DEVICE)
    rm, rv = torch.randn(4).to(DEVICE), (torch.rand(4) + 0.5).to(DEVICE)
    rm0, rv0 = rm.clone(), rv.clone()
    be = get_backend("triton")
    with tb.tuning(path=path, **SMALL):
        first = be.forward_train(x, None, None, rm, rv, 0.1, 1e-5)
        second = be.forward_train(x, None, None, rm, rv, 0.1, 1e-5)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_autotune_applies_running_update_once() -> None:
    """With the autotuner on, the first call times several plans (each running every kernel),
    yet the module's running stats move exactly one momentum step."""
    x = make_input((3, 4, 5, 6), channels_last=True).to(DEVICE)
    bn = batchnorm.BatchNorm2d(4, backend="triton").to(DEVICE)
    tb._autotuned.clear()
    with tb.tuning(autotune=True, **SMALL):
        y = bn(x)
    assert len(tb._autotuned) == 1
    st = reference.channel_stats(_np(x))
    ref_rm, ref_rv = reference.update_running(np.zeros(4), np.ones(4), st, 0.1, 1)
    assert_close(bn.running_mean, ref_rm, 1e-6, 1e-5, what="running_mean")
    assert_close(bn.running_var, ref_rv, 1e-6, 1e-5, what="running_var")
    assert_close(y, reference.forward_train(_np(x), None, None, 1e-5)[0], 1e-5, 1e-4, what="y")
    tb._autotuned.clear()


# ---- registry ------------------------------------------------------------------------------------
def test_registry_and_supports() -> None:
    be = get_backend("triton")
    x = make_input((2, 3, 4)).to(DEVICE)
    assert be.supports(x) is None
    assert resolve_backend("triton", x) == "triton"
    why = be.supports(torch.zeros(2, 3, dtype=torch.int32, device=DEVICE))
    assert why is not None and "float16" in why
    if ON_GPU:
        assert resolve_backend("auto", x) == "triton"
        assert be.preferred_for(x, True)
    else:
        # The interpreter is for tests: "auto" on CPU never picks triton.
        assert resolve_backend("auto", x) != "triton"
        assert not be.preferred_for(x, True)


# ---- plans and index math (no kernels run) -------------------------------------------------------
def test_plans_fill_a_large_gpu() -> None:
    """Split plans give every SM work even with C = 64; on-chip plans kick in for small
    slices (ResNet's 7x7 layers) and never exceed their register budget."""
    knobs = tb.TritonTuning()
    for name, shape in resnet50(256) + resnet50(32):
        for dtype, cl in ((torch.float32, False), (torch.bfloat16, True)):
            x = torch.empty(shape, dtype=dtype, device="meta")
            if cl:
                x = x.to(memory_format=torch.channels_last)
            view = tb.kernel_view(x)
            elt = x.element_size()
            split = tb.plan_split(view, elt, 132, knobs)
            assert split.reduce_parts * split.cblocks >= 132, (name, dtype, split)
            assert split.block_c * split.block_s * elt <= knobs.tile_bytes
            onchip = tb.plan_onchip(view, elt, x.numel(), 132, knobs.onchip_fwd_elems, knobs)
            if onchip is not None:
                assert onchip.block_c * onchip.block_n * onchip.block_s <= knobs.onchip_fwd_elems
    x = torch.empty(32, 2048, 7, 7, device="meta")
    assert tb.plan_onchip(tb.kernel_view(x), 4, x.numel(), 132, 16384, knobs) is not None


def test_kernel_view() -> None:
    x = torch.empty(4, 6, 5, 7, device="meta")
    assert tb.kernel_view(x) == tb.View(4, 6, 35, 210, 35, 1, False, False)
    xc = x.to(memory_format=torch.channels_last)
    assert tb.kernel_view(xc) == tb.View(1, 6, 140, 0, 1, 6, True, False)
    assert tb.kernel_view(torch.empty(9, 6, device="meta")).rows
    assert tb.kernel_view(torch.empty(9, 6, 1, 1, device="meta")).rows
    big = torch.empty(2**16, 2**15, device="meta")
    assert tb.kernel_view(big).int64 and tb.needs_int64(2**31) and not tb.needs_int64(2**31 - 1)


def test_recorded_launches_at_resnet_scale() -> None:
    """Meta tensors of real sizes: which kernels a call would launch, with no memory."""
    be = tb.TritonBackend()
    x = torch.empty(256, 64, 112, 112, device="meta", dtype=torch.bfloat16).to(
        memory_format=torch.channels_last)
    w = torch.empty(64, device="meta")
    with tb.tuning(sm_count=132), tb.recording() as rec:
        be.forward_train(x, w, w, w, w, 0.1, 1e-5)
    assert [r[0] for r in rec] == ["stats_partial_kernel", "stats_finalize_kernel", "apply_kernel"]
    assert rec[0][1] >= 132  # programs of the split reduction
    x = torch.empty(32, 2048, 7, 7, device="meta")
    w = torch.empty(2048, device="meta")
    with tb.tuning(sm_count=132), tb.recording() as rec:
        be.forward_train(x, w, w, w, w, 0.1, 1e-5)
        be.backward(x, x, w, w, w, True, (True, True, True))
    assert [r[0] for r in rec] == ["fwd_onchip_kernel", "bwd_onchip_kernel"]


@triton.jit
def _offsets_probe(out_ptr, it, SB, SV, stride_n, stride_c, stride_s, BLOCK_S: tl.constexpr,
                   INT64: tl.constexpr):
    c = tl.arange(0, 2)
    off, mask, _ = tk.item_tile(it, SB, c, c < 2, SV, stride_n, stride_c, stride_s, BLOCK_S,
                                INT64)
    tl.store(out_ptr + c[:, None] * BLOCK_S + tl.arange(0, BLOCK_S)[None, :], off, mask=mask)


@pytest.mark.parametrize("rows", [False, True])
def test_int64_offsets_past_2_31(rows: bool) -> None:
    """``item_tile`` forms offsets beyond 2^31 exactly in 64-bit mode (nothing allocated)."""
    if rows:  # channels-last (1, C, R): item = a block of rows, stride_s = C
        sb, sv, strides, it = 2**22, 2**24, (0, 1, 2048), 2**21 + 5
        n, s0 = 0, (2**21 + 5) * 4
    else:  # channels-first (N, C, S): n = it // SB
        sb, sv, strides, it = 3, 12544, (64 * 12544, 12544, 1), 3 * 70000 + 2
        n, s0 = 70000, 2 * 4
    out = torch.zeros(2, 4, dtype=torch.int64, device=DEVICE)
    _offsets_probe[(1,)](out, it, sb, sv, *strides, BLOCK_S=4, INT64=True)
    want = [[n * strides[0] + c * strides[1] + (s0 + j) * strides[2] for j in range(4)]
            for c in range(2)]
    assert max(max(r) for r in want) > 2**31
    assert out.cpu().tolist() == want


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_more_than_2_31_elements_on_gpu(channels_last: bool) -> None:
    """A real tensor past 2^31 elements (4.3 GB of bf16): batch statistics, y and running
    stats against torch's float32 on the same GPU. Needs a GPU with about 30 GB free."""
    if not ON_GPU:
        pytest.skip("needs a CUDA GPU (the interpreter cannot hold 2^31 elements)")
    free, _ = torch.cuda.mem_get_info()
    if free < 30 * 2**30:
        pytest.skip(f"needs about 30 GB of free GPU memory, {free / 2**30:.0f} GB free")
    shape = (4097, 64, 64, 128)  # 2^31 + 2^19 elements
    x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert x.numel() > 2**31 and tb.kernel_view(x).int64
    rm, rv = torch.zeros(64, device=DEVICE), torch.ones(64, device=DEVICE)
    y, mean, invstd, new_rm, new_rv = batchnorm.ops.forward_train(
        x, None, None, rm, rv, 0.1, 1e-5, "triton")
    xf = x.float()
    var, ref_mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
    assert_close(mean, ref_mean, 1e-5, 1e-4, what="mean")
    assert_close(invstd, (var + 1e-5).rsqrt(), 1e-5, 1e-4, what="invstd")
    count = x.numel() // 64
    assert_close(new_rm, 0.1 * ref_mean, 1e-6, 1e-4, what="running_mean")
    assert_close(new_rv, 0.9 + 0.1 * var * count / (count - 1), 1e-5, 1e-4, what="running_var")
    # The far end of the tensor, past 2^31 elements, is where 32-bit offsets would wrap.
    ref_tail = (xf[-2:] - ref_mean.view(1, -1, 1, 1)) * (var + 1e-5).rsqrt().view(1, -1, 1, 1)
    assert_close(y[-2:], ref_tail, *TOLERANCES[torch.bfloat16], what="y (last samples)")


# ---- ahead-of-time compile for a Hopper GPU (no GPU needed) --------------------------------------
@pytest.mark.slow
def test_kernels_compile_for_sm90() -> None:
    """Every kernel variant the ResNet-50 benchmark launches compiles for sm_90 with ptxas,
    without register spills (a check the interpreter cannot make)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "batchnorm.benchmarking.gpu", "--compile-report",
         "--batch", "32", "--quick"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "spills" in proc.stdout


def test_edge_catalogue_is_covered() -> None:
    """Guard: the fast matrix above runs every EDGE shape."""
    assert {name for name, _ in EDGE} <= set(SHAPES)


@pytest.mark.parametrize("channels_last", [False, True])
def test_small_knobs_exercise_multi_part_split(channels_last: bool) -> None:
    """Guard for the knobs above: the split reduction has several parts of several tiles,
    with a partial last tile, so the Welford loop and both merges really run."""
    x = torch.empty(3, 4, 5, 6, device="meta")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with tb.tuning(path="split", **SMALL), tb.recording() as rec:
        tb.TritonBackend().stats(x)
    name, _, _, args = rec[0]
    assert name == "stats_partial_kernel"
    assert args["num_parts"] >= 2 and args["items_per_prog"] >= 2, args
    assert args["SV"] % args["BLOCK_S"] != 0, args


# ---- the GPU benchmark's flow, dry-run on the interpreter -------------------------------------
def test_gpu_benchmark_refuses_without_cuda(capsys: pytest.CaptureFixture) -> None:
    from batchnorm.benchmarking import gpu

    if ON_GPU:
        pytest.skip("a GPU is present: the refusal path cannot be observed")
    assert gpu.main(["--device", "cuda"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_gpu_benchmark_dry_run(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The whole benchmark (check, four modes, ours vs eager, copy, tables, CSV, targets) on
    tiny shapes, with the device and the timer swapped out: every line of the GPU script runs
    before a GPU session spends time on it. (Timings here mean nothing.)"""
    import time as _time

    from batchnorm.benchmarking import gpu

    def fake_bench(fn, args):
        t0 = _time.perf_counter()
        fn()
        return (_time.perf_counter() - t0) * 1e3

    monkeypatch.setattr(gpu, "DEVICE", str(DEVICE))
    monkeypatch.setattr(gpu, "_preflight", lambda args: None)
    monkeypatch.setattr(gpu, "_bench", fake_bench)
    monkeypatch.setattr(gpu, "_machine", lambda: ["- GPU: none (dry run)"])
    monkeypatch.setattr(gpu, "_copy_bandwidth", lambda args: 100.0)
    monkeypatch.setattr(gpu, "_cases", lambda args: [(2, "tiny", (2, 3, 4, 5))])
    with tb.tuning(**SMALL):
        rc = gpu.main(["--device", "cuda", "--no-compile", "--out", str(tmp_path)])
    assert rc == 0
    csv_files = list(tmp_path.glob("gpu-*.csv"))
    assert len(csv_files) == 1
    lines = csv_files[0].read_text().splitlines()
    assert len(lines) == 1 + 3 * 4  # header + 3 configs x 4 modes
    assert all(line.endswith(",ok") for line in lines[1:]), lines
    md = next(tmp_path.glob("gpu-*.md")).read_text()
    assert "fwd+bwd geomean vs eager, bf16 channels-last" in md
