"""Fused BatchNorm + activation + residual in the ``"triton"`` backend (issue 5).

``y = act(BN(x) + r)`` through :func:`batchnorm.batch_norm_act` with ``backend="triton"``
against two references: the composite (the ``"torch"`` backend through the same call, and the
base class's ``Backend.forward_act``/``backward_act`` called unbound) and an independent float64
``torch.nn.functional`` composite. Every activation, with and without a residual, training and
eval, in-place for the invertible ones, channels-first and channels-last, ranks 2-4, float32
and float16 (bfloat16 and rank 5 in the slow run), on both the split and the on-chip path.

Without a GPU the kernels run under the Triton interpreter (conftest sets
``TRITON_INTERPRET=1``); the knobs shrink tiles so that tiny shapes still take several split
parts, and every fresh output is poisoned with NaN so an element a kernel fails to write shows.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the triton backend needs the triton package")

from batchnorm import batch_norm_act
from batchnorm.backends import get_backend
from batchnorm.backends import triton_backend as tb
from batchnorm.backends.activations import ACTIVATIONS, INVERTIBLE
from batchnorm.backends.base import Backend
from helpers import STAT_TOLERANCES, TOLERANCES, assert_close, is_channels_last, make_input

pytestmark = pytest.mark.triton

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

# Interpreter-sized knobs (as tests/test_triton.py): 64-value split tiles, 2 "SMs", on-chip
# slices of up to 256 values, NaN-poisoned outputs.
SMALL = dict(tile_bytes=256, min_tile_bytes=256, row_bytes=32, min_run_bytes=16,
             onchip_fwd_elems=256, onchip_bwd_elems=256, onchip_min_row_bytes=4, sm_count=2,
             reduce_programs_per_sm=2, elementwise_programs_per_sm=1, poison_outputs=True)
PATHS = ("split", "onchip")
SLOPE = 0.1
MOMENTUM, EPS = 0.1, 1e-5
# (shape, channels_last): ranks 2-4, both layouts (rank 2 is the rows view either way); the
# slow run adds rank-3 channels-last, rank 5 and edge shapes.
LAYOUTS = {
    "nchw": ((3, 4, 5, 6), False),
    "nhwc": ((3, 4, 5, 6), True),
    "ncl": ((4, 6, 9), False),
    "nc": ((9, 5), False),
}
SLOW_LAYOUTS = {"nlc": ((4, 6, 9), True), "ncdhw": ((2, 3, 4, 3, 5), False),
                "ndhwc": ((2, 3, 4, 3, 5), True), "one_channel": ((5, 1, 3, 3), False),
                "two_values": ((2, 3), False)}
TORCH_ACT = {
    "identity": lambda z: z,
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, SLOPE),
    "elu": F.elu,
    "silu": F.silu,
    "gelu": F.gelu,
}
_KERNELS = {  # (forward, backward) kernel whose ACT flag shows the fused path ran
    "split": ("apply_kernel", "bwd_dx_kernel"),
    "onchip": ("fwd_onchip_kernel", "bwd_onchip_kernel"),
}


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    """``(kernel name, constexpr flags)`` of every launch during the test."""
    seen: list[tuple[str, dict]] = []
    real = tb._launch

    def spy(name: str, grid: int, num_warps: int, **kwargs):
        seen.append((name, {k: v for k, v in kwargs.items() if k.isupper()}))
        return real(name, grid, num_warps, **kwargs)

    monkeypatch.setattr(tb, "_launch", spy)
    return seen


def _pdt(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_case(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool,
              with_residual: bool) -> dict:
    """Inputs of one call: x, residual, dy (in x's layout), weight (one negative entry: in-place
    must invert it too), bias, running stats."""
    c = shape[1]
    pdt = _pdt(dtype)
    w = torch.rand(c, dtype=pdt) + 0.5
    w[0] = -w[0]
    return dict(
        x=make_input(shape, dtype, channels_last).to(DEVICE),
        r=make_input(shape, dtype, channels_last, shift=0.0, scale=1.0).to(DEVICE)
        if with_residual else None,
        dy=make_input(shape, dtype, channels_last, shift=0.0, scale=1.0).to(DEVICE),
        w=w.to(DEVICE), b=torch.randn(c, dtype=pdt).to(DEVICE),
        rm=torch.randn(c, dtype=pdt).to(DEVICE), rv=(torch.rand(c, dtype=pdt) + 0.5).to(DEVICE),
    )


def run_op(case: dict, activation: str, training: bool, inplace: bool, backend: str) -> dict:
    """One forward + backward through ``batch_norm_act``; returns y, the gradients and the
    updated running stats. In-place calls get an intermediate input (``x0 * 1.0``), and the
    input must come back overwritten with y."""
    def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().clone().requires_grad_()

    x0, r, w, b = leaf(case["x"]), leaf(case["r"]), leaf(case["w"]), leaf(case["b"])
    rm, rv = case["rm"].clone(), case["rv"].clone()
    x = x0 * 1.0 if inplace else x0
    ptr = x.data_ptr()
    y = batch_norm_act(x, rm, rv, w, b, training, MOMENTUM, EPS, activation=activation,
                       negative_slope=SLOPE, residual=r, inplace=inplace, backend=backend)
    if inplace:
        assert y.data_ptr() == ptr and torch.equal(x, y), "in-place: y must overwrite x"
        assert not torch.equal(x, case["x"]), "in-place: x still holds its input"
    y.backward(case["dy"])
    return dict(y=y.detach(), dx=x0.grad, dw=w.grad, db=b.grad,
                dr=None if r is None else r.grad, rm=rm, rv=rv)


def f64_composite(case: dict, activation: str, training: bool) -> dict:
    """The independent reference: ``act(F.batch_norm(x) + r)`` in float64 autograd."""
    def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().double().requires_grad_()

    x, r, w, b = leaf(case["x"]), leaf(case["r"]), leaf(case["w"]), leaf(case["b"])
    rm, rv = case["rm"].double(), case["rv"].double()
    z = F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)
    y = TORCH_ACT[activation](z if r is None else z + r)
    y.backward(case["dy"].double())
    return dict(y=y.detach(), dx=x.grad, dw=w.grad, db=b.grad,
                dr=None if r is None else r.grad, rm=rm, rv=rv)


def _max_invstd(case: dict, training: bool) -> float:
    """The largest per-channel ``1 / sqrt(var + eps)`` the layer normalizes with (batch
    statistics in training, the running variance in eval), in float64."""
    x = case["x"].double()
    if training:
        dims = [d for d in range(x.dim()) if d != 1]
        var = x.var(dim=dims, unbiased=False)
    else:
        var = case["rv"].double()
    return float((var + EPS).rsqrt().max())


def check_case(case: dict, activation: str, training: bool, inplace: bool, path: str,
               dtype: torch.dtype, what: str, launches: list | None = None) -> None:
    """Ours (triton, forced path) vs the torch backend's composite (in-place too) and vs the
    float64 functional composite: y, dx, dweight, dbias, dresidual, running stats."""
    with tb.tuning(path=path, **SMALL):
        if launches is not None:
            launches.clear()
        ours = run_op(case, activation, training, inplace, "triton")
    if launches is not None:
        check_fused_launches(launches, activation, training, path, what)
    comp = run_op(case, activation, training, inplace, "torch")
    exact = f64_composite(case, activation, training)
    tol, stol = TOLERANCES[dtype], STAT_TOLERANCES[dtype]
    m = case["x"].numel() // case["x"].shape[1]
    # In-place recomputes x-hat from the rounded y (through act^-1 and a division by gamma):
    # a few more roundings, amplified by 1/slope on leaky_relu's negative side, and by invstd:
    # dx = w * invstd * (...) scales x-hat's error by it, which is large where a channel's
    # values barely differ (two values per channel drawn close together: bfloat16 dx errors
    # of 0.49 against 8 * atol = 0.24 at invstd 14). The absolute bound grows with the
    # largest invstd above 1.
    grad_tol = (8 * tol[0] * max(1.0, _max_invstd(case, training)), 8 * tol[1]) if inplace \
        else tol
    sum_tol = (grad_tol[0] * m**0.5, grad_tol[1])  # dweight, dbias: sums of m values
    x = case["x"]
    assert ours["y"].dtype == dtype and ours["y"].stride() == x.stride(), what
    if ours["dr"] is not None:
        assert ours["dr"].dtype == dtype, what
        assert is_channels_last(ours["dr"]) == is_channels_last(x) or x.dim() < 3, what
    # For half inputs the composite rounds BN(x) to the input dtype before adding r and
    # applying the activation; ours keeps z in float32. At a kink (relu, leaky_relu at z ~ 0)
    # that rounding can pick the other side for one element, which moves dz there and, through
    # sum(dz), the whole channel's dx: half gradients are compared with float64 only (in-place
    # too: the two store y from differently rounded z, and recompute from their own y).
    grads_vs_composite = dtype in (torch.float32, torch.float64)
    half = dtype in (torch.float16, torch.bfloat16)
    for name, ref in (("composite", comp), ("float64", exact)):
        for key, (atol, rtol) in (("y", tol), ("dx", grad_tol), ("dw", sum_tol),
                                  ("db", sum_tol), ("dr", grad_tol), ("rm", stol),
                                  ("rv", stol)):
            if ours[key] is None and ref[key] is None:
                continue
            if name == "composite" and key[0] == "d" and not grads_vs_composite:
                continue
            got, want = ours[key], ref[key]
            if key == "dx" and inplace and activation == "elu" and half:
                # x-hat comes back from the stored y through log1p(y): for a saturated ELU
                # (y near -1) a half-precision y leaves 1 + y with few correct bits, so x-hat
                # (and dx there) is off by about eps / (1 + y). Compared where 1 + y > 0.05
                # (at most ~0.5% error in x-hat); the saturated elements' dz, scaled by
                # 1 + y, barely enter the sums, which are checked everywhere else.
                keep = (exact["y"] + 1.0 > 0.05).cpu()
                got, want = got.cpu()[keep], want.cpu()[keep]
            assert_close(got, want, atol, rtol, f"{what} {key} vs {name}")


def check_fused_launches(launches: list, activation: str, training: bool, path: str,
                         what: str) -> None:
    """The forced path ran, with the activation fused into its elementwise kernels."""
    code = tb._k().ACTIVATION_CODES[activation]
    fwd = _KERNELS[path][0] if training else "apply_kernel"
    for kernel in (fwd, _KERNELS[path][1]):
        flags = [f for name, f in launches if name == kernel]
        assert flags and all(f["ACT"] == code for f in flags), \
            f"{what}: no fused {kernel} launch in {[n for n, _ in launches]}"


# ---- the matrix: float32, every activation, both paths, ranks 2-4, both layouts ----------------
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("path", PATHS)
def test_every_activation_float32(path: str, layout: str, training: bool, with_residual: bool,
                                  launches: list) -> None:
    shape, cl = LAYOUTS[layout]
    case = make_case(shape, torch.float32, cl, with_residual)
    for activation in ACTIVATIONS:
        what = f"{path} {layout} train={training} res={with_residual} {activation}"
        check_case(case, activation, training, False, path, torch.float32, what, launches)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
@pytest.mark.parametrize("path", PATHS)
def test_inplace_float32(path: str, layout: str, training: bool, with_residual: bool,
                         launches: list) -> None:
    shape, cl = LAYOUTS[layout]
    case = make_case(shape, torch.float32, cl, with_residual)
    for activation in INVERTIBLE:
        what = f"inplace {path} {layout} train={training} res={with_residual} {activation}"
        check_case(case, activation, training, True, path, torch.float32, what, launches)
        flags = [f for name, f in launches if name in ("bwd_dx_kernel", "bwd_onchip_kernel")]
        assert flags and all(f["INPLACE"] for f in flags), f"{what}: backward not from y"


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
@pytest.mark.parametrize("path", PATHS)
def test_float16(path: str, layout: str) -> None:
    shape, cl = LAYOUTS[layout]
    case = make_case(shape, torch.float16, cl, True)
    for activation in ACTIVATIONS:
        check_case(case, activation, True, False, path, torch.float16,
                   f"fp16 {path} {layout} {activation}")
    for activation in INVERTIBLE:
        check_case(case, activation, True, True, path, torch.float16,
                   f"fp16 inplace {path} {layout} {activation}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", [*LAYOUTS, *SLOW_LAYOUTS])
@pytest.mark.parametrize("path", PATHS)
def test_more_dtypes_and_shapes(path: str, layout: str, training: bool,
                                dtype: torch.dtype) -> None:
    shape, cl = {**LAYOUTS, **SLOW_LAYOUTS}[layout]
    for with_residual in (False, True):
        case = make_case(shape, dtype, cl, with_residual)
        for activation in ACTIVATIONS:
            check_case(case, activation, training, False, path, dtype,
                       f"{dtype} {path} {layout} train={training} {activation}")
        for activation in INVERTIBLE:
            check_case(case, activation, training, True, path, dtype,
                       f"{dtype} inplace {path} {layout} train={training} {activation}")


# ---- the backend API directly: output masks, odd layouts, delegation --------------------------
def _direct(be: Backend, case: dict, activation: str, training: bool, inplace: bool,
            mask: tuple[bool, bool, bool, bool], fused: bool) -> tuple:
    """forward_act + backward_act of ``be`` (``fused=False``: the base class's composite,
    called unbound on the same object)."""
    fwd = be.forward_act if fused else lambda *a: Backend.forward_act(be, *a)
    bwd = be.backward_act if fused else lambda *a: Backend.backward_act(be, *a)
    x = case["x"].clone()
    out = x if inplace else torch.empty_like(x)
    y, mean, invstd, new_rm, new_rv = fwd(x, case["w"], case["b"], case["rm"], case["rv"],
                                          case["r"], training, MOMENTUM, EPS, activation, SLOPE,
                                          out)
    if inplace:
        assert y is x or y.data_ptr() == x.data_ptr()
    grads = bwd(case["dy"], y if inplace else case["x"], case["w"], case["b"], mean, invstd,
                case["r"], training, activation, SLOPE, inplace, mask)
    return (y, mean, invstd, new_rm, new_rv, *grads)


def _compare_direct(got: tuple, want: tuple, what: str) -> None:
    names = ("y", "mean", "invstd", "running_mean", "running_var", "dx", "dweight", "dbias",
             "dresidual")
    for name, g, w in zip(names, got, want, strict=True):
        assert (g is None) == (w is None), f"{what} {name}: {g is None} vs {w is None}"
        if g is not None:
            assert g.dtype == w.dtype, f"{what} {name} dtype {g.dtype} != {w.dtype}"
            assert_close(g, w, 2e-5, 2e-4, f"{what} {name}")


@pytest.mark.parametrize("mask", [(True, False, False, False), (False, True, True, False),
                                  (False, False, False, True), (True, False, False, True),
                                  (False, True, False, True)], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_output_masks(path: str, mask: tuple[bool, bool, bool, bool], launches: list) -> None:
    """Only what is asked for comes back (None otherwise), equal to the composite's; a backward
    that needs no reduction (eval dx / dresidual only) is one elementwise launch."""
    be = get_backend("triton")
    case = make_case((3, 4, 5, 6), torch.float32, False, True)
    for training, activation, inplace in ((True, "gelu", False), (False, "relu", False),
                                          (True, "elu", True), (False, "leaky_relu", True)):
        what = f"{path} mask={mask} train={training} {activation} inplace={inplace}"
        with tb.tuning(path=path, **SMALL):
            launches.clear()
            got = _direct(be, case, activation, training, inplace, mask, True)
        names = [n for n, _ in launches]
        want = _direct(be, case, activation, training, inplace, mask, False)
        _compare_direct(got, want, what)
        if not (mask[1] or mask[2] or (mask[0] and training)):
            assert [n for n in names if n.startswith("bwd")] == ["bwd_dx_kernel"], what


def test_residual_in_another_layout_and_dtype() -> None:
    """A float64 channels-last residual on a float32 channels-first input: read through one
    copy, its gradient comes back in its own dtype and layout (as the composite's)."""
    be = get_backend("triton")
    case = make_case((3, 4, 5, 6), torch.float32, False, True)
    case["r"] = make_input((3, 4, 5, 6), torch.float64, True, shift=0.0, scale=1.0)
    with tb.tuning(**SMALL):
        got = _direct(be, case, "silu", True, False, (True, True, True, True), True)
    want = _direct(be, case, "silu", True, False, (True, True, True, True), False)
    _compare_direct(got, want, "float64 channels-last residual")
    assert got[-1].dtype == torch.float64 and is_channels_last(got[-1])


@pytest.mark.parametrize("path", PATHS)
def test_inplace_on_a_strided_view(path: str) -> None:
    """In-place on a sliced (neither channels-first nor channels-last) input: the kernels work
    on one contiguous copy and the result lands in the view; the rest of the base tensor is
    untouched."""
    be = get_backend("triton")
    base = make_input((3, 4, 5, 12))
    keep = base.clone()
    x = base[..., ::2]
    case = make_case((3, 4, 5, 6), torch.float32, False, True)
    case["x"] = x.clone()  # the composite's input (same values, compact)
    want = _direct(be, case, "leaky_relu", True, True, (True, True, True, True), False)
    with tb.tuning(path=path, **SMALL):
        y, *_ = be.forward_act(x, case["w"], case["b"], case["rm"], case["rv"], case["r"], True,
                               MOMENTUM, EPS, "leaky_relu", SLOPE, x)
    assert y is x
    assert_close(x, want[0], 2e-5, 2e-4, "strided in-place y")
    assert torch.equal(base[..., 1::2], keep[..., 1::2]), "elements outside the view changed"


def test_unsupported_residual_dtype_uses_the_composite(launches: list) -> None:
    """A residual dtype the kernels cannot load (float8) goes to the composite default: the
    plain BatchNorm kernels run, no fused launch, and the result is the composite's."""
    be = get_backend("triton")
    case = make_case((3, 4, 5, 6), torch.float32, False, True)
    case["r"] = case["r"].to(torch.float8_e4m3fn)
    with tb.tuning(**SMALL):
        y, *_ = be.forward_act(case["x"], case["w"], case["b"], None, None, case["r"], True,
                               MOMENTUM, EPS, "relu", SLOPE, torch.empty_like(case["x"]))
    assert launches and all(f.get("ACT", 0) == 0 for _, f in launches), launches
    want = Backend.forward_act(be, case["x"], case["w"], case["b"], None, None, case["r"], True,
                               MOMENTUM, EPS, "relu", SLOPE, torch.empty_like(case["x"]))[0]
    assert_close(y, want, 2e-5, 2e-4, "float8 residual")


@pytest.mark.parametrize("path", PATHS)
def test_inplace_zero_weight_is_clamped_like_the_composite(path: str) -> None:
    """gamma = 0 in in-place mode is used as 1e-6 (``invertible_weight``) by every backend:
    the fused result equals the in-place composite's (the torch backend's). float64, because
    x-hat = (z - r - b) / 1e-6 is a difference of O(1) values at the 1e-6 scale: in float32
    each side's rounding alone moves dweight of those channels by ~10%."""
    case = make_case((4, 3, 5), torch.float64, False, True)
    case["w"] = torch.tensor([0.0, -1e-8, 1.5], dtype=torch.float64, device=DEVICE)
    with tb.tuning(path=path, **SMALL):
        ours = run_op(case, "elu", True, True, "triton")
    comp = run_op(case, "elu", True, True, "torch")
    for key in ("y", "dx", "dw", "db", "dr"):
        assert torch.isfinite(ours[key]).all(), f"{path} {key}"
        assert_close(ours[key], comp[key], 1e-8, 1e-6, f"{path} {key}")


@pytest.mark.parametrize("inplace", [False, True], ids=["fused", "inplace"])
def test_autotune_runs_once_and_never_retimes_inplace(inplace: bool) -> None:
    """With the autotuner on, the fused forward and backward time several plans on first use
    (pure kernels: the running stats still move one step, the result is the composite's);
    in-place calls overwrite x, so they are never timed (no forward entry is cached)."""
    case = make_case((3, 4, 5, 6), torch.float32, True, True)
    tb._autotuned.clear()
    try:
        with tb.tuning(autotune=True, **SMALL):
            ours = run_op(case, "leaky_relu", True, inplace, "triton")
        kinds = sorted(key[0] for key in tb._autotuned)
        assert kinds == (["bwd_act"] if inplace else ["bwd_act", "fwd_act"]), kinds
    finally:
        tb._autotuned.clear()
    comp = run_op(case, "leaky_relu", True, inplace, "torch")
    for key in ("y", "dx", "dw", "db", "dr", "rm", "rv"):
        assert_close(ours[key], comp[key], 1e-4, 1e-4, f"autotuned inplace={inplace} {key}")


# ---- launches: the passes of plain BatchNorm, nothing more ------------------------------------
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("path", PATHS)
def test_same_launches_as_plain_batchnorm(path: str, channels_last: bool) -> None:
    """Recorded with meta tensors (nothing runs): the fused forward/backward launch exactly the
    kernels plain BatchNorm launches, with the activation, residual and in-place flags set,
    and the eval forward is one elementwise launch."""
    be = get_backend("triton")
    x = torch.empty(3, 4, 5, 6, device="meta")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    p = torch.empty(4, device="meta")
    mask = (True, True, True, True)
    with tb.tuning(path=path, **SMALL):
        with tb.recording() as plain:
            be.forward_train(x, p, p, p, p, MOMENTUM, EPS)
            be.backward(x, x, p, p, p, True, (True, True, True))
        with tb.recording() as fused:
            be.forward_act(x, p, p, p, p, x, True, MOMENTUM, EPS, "relu", SLOPE,
                           torch.empty_like(x))
            be.backward_act(x, x, p, p, p, p, x, True, "relu", SLOPE, False, mask)
        with tb.recording() as inplace:
            be.forward_act(x, p, p, p, p, x, True, MOMENTUM, EPS, "elu", SLOPE, x)
            be.backward_act(x, x, p, p, p, p, x, True, "elu", SLOPE, True, mask)
        with tb.recording() as evl:
            be.forward_act(x, p, p, p, p, x, False, MOMENTUM, EPS, "gelu", SLOPE, x)
    names = [r[0] for r in plain]
    assert [r[0] for r in fused] == names and [r[0] for r in inplace] == names
    for rec, code, inplace_flag in ((fused, 1, False), (inplace, 3, True)):
        for _, _, _, kw in rec:
            if "ACT" in kw:
                assert kw["ACT"] == code and kw["HAS_RES"], kw
            if "INPLACE" in kw:
                assert kw["INPLACE"] == inplace_flag, kw
        y_ptr = next(kw["y_ptr"] for _, _, _, kw in rec if "y_ptr" in kw)
        assert (y_ptr is x) == inplace_flag  # in-place writes straight into x
    assert [r[0] for r in evl] == ["apply_kernel"] and evl[0][3]["ACT"] == 5


# ---- the GPU benchmark's --act flow, dry-run on the interpreter ---------------------------------
def test_gpu_benchmark_act_dry_run(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """``--act`` end to end (float64 check, ours vs eager vs ours in place, held bytes, tables,
    CSV, the 1.5x target line) on a tiny shape, with the device and the timer swapped out, as
    tests/test_triton.py does for the plain modes. (Timings here mean nothing.)"""
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
        rc = gpu.main(["--device", "cuda", "--act", "--no-compile", "--out", str(tmp_path)])
    assert rc == 0
    csv_files = list(tmp_path.glob("gpu-act-*.csv"))
    assert len(csv_files) == 1
    lines = csv_files[0].read_text().splitlines()
    assert len(lines) == 1 + 3 * 2  # header + 3 configs x (act, act-inplace)
    assert all(line.endswith(",ok") for line in lines[1:]), lines
    header = lines[0].split(",")
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=True))
        # memory kept alive after the forward: one buffer in place; x and y for ours not in
        # place; eager keeps x, y and (leaky_relu saves its input) the sum z
        held = {k: int(row[f"held_bytes_{k}"] or 0) for k in ("ours", "eager", "fused")}
        x_bytes = 2 * 3 * 4 * 5 * (4 if row["config"] == "fp32-nchw" else 2)
        if row["mode"] == "act-inplace":
            assert held == {"ours": x_bytes, "eager": 3 * x_bytes, "fused": 2 * x_bytes}, row
        else:
            assert held["ours"] == held["eager"], row
    md = next(tmp_path.glob("gpu-act-*.md")).read_text()
    assert "BN + ReLU + residual fwd+bwd geomean vs eager" in md
