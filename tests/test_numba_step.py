"""The numba backend's eager steps in C++ (``backends/numba_step``): the same kernels as the
Python path, so every output, gradient and running buffer must be bit-identical to it; and
the float64 reference checks of ``test_numba.py``/``test_semantics.py`` run through this path
too (it is the default wherever it builds)."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading

import pytest
import torch

pytest.importorskip("numba", reason="the numba backend needs numba (pip install numba)")

import batchnorm
from batchnorm import reference as ref
from batchnorm.backends import cpu_outputs, eager_front, numba_step, resolve_backend
from batchnorm.backends.activations import act_forward
from helpers import TOLERANCES, assert_close, make_input


def _toolchain() -> bool:
    """A C++ compiler and ninja: where both are, the extension must build (a failed build
    would otherwise only skip this file)."""
    import shutil

    numba_step._find_ninja()
    return shutil.which(os.environ.get("CXX", "c++")) is not None and shutil.which(
        "ninja") is not None


pytestmark = pytest.mark.skipif(
    not numba_step.available() and not _toolchain(),
    reason="the C++ step cannot build here (no C++ compiler or ninja)")


def test_the_extension_builds_where_a_compiler_is():
    assert numba_step.available(), "the C++ step failed to build (see the warning)"


def _python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(numba_step._state, "ext", None)
    monkeypatch.setitem(eager_front, "fn", None)


def _layout(x: torch.Tensor, cl: bool) -> torch.Tensor:
    if not cl:
        return x.contiguous()
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.contiguous(memory_format=fmt)


def _step(x, w, b, running, dy, need, backend="numba", **kw):
    """A training step: y, the gradients asked for, the running buffers after it."""
    c = x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rm = rv = None
    if running:
        rm = torch.linspace(-1, 1, c, dtype=acc)
        rv = torch.linspace(0.5, 2, c, dtype=acc)
    x = x.detach().requires_grad_(need[0])
    w = None if w is None else w.detach().requires_grad_(need[1])
    b = None if b is None else b.detach().requires_grad_(need[2])
    y = batchnorm.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, backend=backend, **kw)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, leaves, dy) if leaves else ()
    return [y, *grads, *(() if rm is None else (rm, rv))]


CASES = [
    # shape, channels_last, dtype
    ((32, 64, 7, 7), True, torch.float32),
    ((8, 16, 5, 5), False, torch.float32),
    ((16, 32), False, torch.float32),
    ((4, 8, 10), False, torch.float32),
    ((2, 4, 3, 4, 5), True, torch.float32),
    ((32, 64, 16, 16), False, torch.float32),  # two threads, split batch
    ((32, 64, 16, 16), True, torch.float32),  # two threads, row chunks and a merge
    ((3, 5, 1, 1), True, torch.float32),
    ((2, 1), False, torch.float32),  # N * spatial = 2
    ((8, 16, 6, 6), True, torch.float64),
    ((8, 16, 6, 6), False, torch.float16),
    ((8, 16, 6, 6), True, torch.bfloat16),
]


@pytest.mark.parametrize(("shape", "cl", "dtype"), CASES,
                         ids=[f"{'x'.join(map(str, s))}-{'cl' if c else 'cf'}-{str(d)[6:]}"
                              for s, c, d in CASES])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("running", [True, False], ids=["tracked", "untracked"])
def test_the_cpp_step_gives_the_python_paths_bits(monkeypatch, shape, cl, dtype, affine, running):
    c = shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = _layout(make_input(shape, dtype, shift=2.0, scale=3.0), cl)
    w = torch.rand(c, dtype=acc) + 0.5 if affine else None
    b = torch.randn(c, dtype=acc) if affine else None
    dy = _layout(torch.randn(shape, dtype=dtype), cl)
    need = (True, affine, affine)
    numba_step.forget_recipes()
    got = _step(x, w, b, running, dy, need)
    assert [k for k, v in numba_step._train_recipes.items() if v is not None], \
        "the C++ step did not take the call"
    with monkeypatch.context() as m:
        _python_path(m)
        expected = _step(x, w, b, running, dy, need)
    names = [*["y", "dx", "dweight", "dbias"][:1 + sum(need)], "running_mean", "running_var"]
    assert len(got) == len(expected) == 1 + sum(need) + 2 * running
    for name, a, e in zip(names, got, expected):
        assert a.dtype == e.dtype and a.stride() == e.stride(), name
        assert torch.equal(a, e), f"{name}: max diff {(a.double() - e.double()).abs().max()}"
    # and both against the float64 reference
    r = ref.BatchNorm(c, momentum=0.1, eps=1e-5, affine=affine)
    if affine:
        r.weight, r.bias = w.double().numpy(), b.double().numpy()
    y_ref = r.forward(x.double().numpy())
    atol, rtol = TOLERANCES[dtype]
    assert_close(got[0], torch.from_numpy(y_ref), atol, rtol, "y vs reference")


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False),
                                  (False, False, True), (False, True, True),
                                  (True, True, False), (True, False, True)])
def test_each_subset_of_gradients(monkeypatch, need):
    """The backward node asks the kernels for what autograd needs, nothing more (four
    backward recipes: with or without dx, with or without dweight)."""
    x = make_input((8, 16, 6, 6))
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    dy = torch.randn(8, 16, 6, 6)
    got = _step(x, w, b, True, dy, need)
    with monkeypatch.context() as m:
        _python_path(m)
        expected = _step(x, w, b, True, dy, need)
    for a, e in zip(got, expected, strict=True):
        assert torch.equal(a, e)


def test_weight_given_bias_absent_and_the_other_way():
    x = make_input((8, 16, 6, 6), torch.float64).requires_grad_()
    w = torch.rand(16, dtype=torch.float64, requires_grad=True)
    def weight_only(x_, p):
        return batchnorm.batch_norm(x_, None, None, p, None, True, backend="numba")

    def bias_only(x_, p):
        return batchnorm.batch_norm(x_, None, None, None, p, True, backend="numba")

    for fn in (weight_only, bias_only):
        assert torch.autograd.gradcheck(fn, (x, w))


def test_double_backward_calls_back_for_the_composite(monkeypatch):
    """create_graph=True through the C++ node: the Python composite, exact second
    derivatives, as the Python path."""
    x = make_input((4, 3, 2, 2), torch.float64).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()

    def fn(x_, w_, b_):
        return batchnorm.batch_norm(x_, None, None, w_, b_, True, backend="numba")

    numba_step.forget_recipes()
    assert torch.autograd.gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert any(v is not None for v in numba_step._train_recipes.values())
    y = fn(x, w, b)
    g = torch.autograd.grad(y, (x, w), torch.ones_like(y) * 0.3 + y.detach(), create_graph=True)
    assert g[0].requires_grad and g[1].requires_grad
    with monkeypatch.context() as m:
        _python_path(m)
        y2 = fn(x, w, b)
        g2 = torch.autograd.grad(y2, (x, w), torch.ones_like(y2) * 0.3 + y2.detach(),
                                 create_graph=True)
    for a, e in zip(g, g2):
        assert_close(a, e, 1e-12, 1e-10, "first derivative with create_graph")


def test_input_modified_in_place_after_the_forward_raises():
    x = make_input((8, 16, 6, 6)).requires_grad_()
    h = x * 1.0
    y = batchnorm.batch_norm(h, None, None, training=True, backend="numba")
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_arguments_it_does_not_take_go_the_python_way(monkeypatch):
    """A running buffer that is a strided view, a weight of another dtype: the C++ step
    declines and the Python path converts, with the same numbers as contiguous float32."""
    x = make_input((8, 16, 6, 6))
    dy = torch.randn(8, 16, 6, 6)
    base = torch.zeros(32)
    rm_view, rv = base[::2], torch.ones(16)
    w64 = torch.rand(16, dtype=torch.float64) + 0.5
    numba_step.forget_recipes()
    y1 = batchnorm.batch_norm(x, rm_view, rv, w64, None, True, backend="numba")
    assert not any(v is not None for v in numba_step._train_recipes.values())
    rm2, rv2 = torch.zeros(16), torch.ones(16)
    y2 = batchnorm.batch_norm(x, rm2, rv2, w64.float(), None, True, backend="numba")
    assert torch.equal(y1, y2) and torch.equal(rm_view, rm2) and torch.equal(rv, rv2)
    # the same shape with arguments it takes: the C++ step (the dtypes are in the key)
    assert any(v is not None for v in numba_step._train_recipes.values())
    x.requires_grad_()
    g = torch.autograd.grad(batchnorm.batch_norm(x, None, None, w64, None, True,
                                                 backend="numba"), x, dy)[0]
    with monkeypatch.context() as m:
        _python_path(m)
        g2 = torch.autograd.grad(batchnorm.batch_norm(x, None, None, w64, None, True,
                                                      backend="numba"), x, dy)[0]
    assert torch.equal(g, g2)


def test_eval_gives_the_python_paths_bits(monkeypatch):
    for cl in (False, True):
        x = _layout(make_input((16, 32, 9, 9), shift=1.0), cl)
        rm, rv = torch.randn(32), torch.rand(32) + 0.2
        w, b = torch.rand(32), torch.randn(32)
        numba_step.forget_recipes()
        with torch.no_grad():
            y = batchnorm.batch_norm(x, rm, rv, w, b, False, backend="numba")
        assert any(v is not None for v in numba_step._eval_recipes.values())
        with monkeypatch.context() as m:
            _python_path(m)
            y2 = batchnorm.batch_norm(x, rm, rv, w, b, False, backend="numba")
        assert torch.equal(y, y2) and y.stride() == y2.stride()


def test_inference_mode_and_no_grad():
    x = make_input((8, 16, 6, 6))
    rm, rv = torch.zeros(16), torch.ones(16)
    expected_rm, expected_rv = rm.clone(), rv.clone()
    y0 = batchnorm.batch_norm(x, expected_rm, expected_rv, None, None, True, backend="numba")
    with torch.inference_mode():
        y = batchnorm.batch_norm(x, rm, rv, None, None, True, backend="numba")
    assert torch.equal(y, y0) and torch.equal(rm, expected_rm) and torch.equal(rv, expected_rv)


def test_outputs_are_recycled_only_once_free():
    shape = (16, 64, 32, 32)  # 4 MiB outputs: pooled
    x = make_input(shape)
    y1 = batchnorm.batch_norm(x, None, None, training=True, backend="numba")
    p1 = y1.data_ptr()
    y2 = batchnorm.batch_norm(x, None, None, training=True, backend="numba")
    assert y2.data_ptr() != p1, "a live output's memory was handed out again"
    assert numba_step.pool_bytes() >= 2 * x.nbytes
    del y1
    y3 = batchnorm.batch_norm(x, None, None, training=True, backend="numba")
    assert y3.data_ptr() == p1, "a free output was not recycled"
    view = y3[:1]
    del y3
    y4 = batchnorm.batch_norm(x, None, None, training=True, backend="numba")
    assert y4.data_ptr() != view.data_ptr(), "memory a view still reads was handed out again"
    assert torch.equal(y4, y2)
    del y2, y4, view
    before = cpu_outputs.cached_bytes()
    cpu_outputs.empty_cache()
    assert numba_step.pool_bytes() == 0 and cpu_outputs.cached_bytes() < before


def test_thread_counts_give_the_same_bits():
    before = torch.get_num_threads()
    x = make_input((32, 64, 16, 16), shift=3.0)
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(batchnorm.batch_norm(x, None, None, training=True, backend="numba"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def _forked_step(x, q):
    q.put(batchnorm.batch_norm(x, None, None, training=True, backend="numba").numpy().copy())


def test_a_forked_child_runs_the_step_without_torchs_threads():
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    x = make_input((16, 32, 24, 24))
    expected = batchnorm.batch_norm(x, None, None, training=True, backend="numba")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_forked_step, args=(x, q))
    child.start()
    try:
        got = q.get(timeout=120)
    except Exception:
        got = None
    child.join(10)
    if child.is_alive():
        child.kill()
    assert got is not None, "the forked child hung (or failed)"
    assert torch.equal(torch.from_numpy(got), expected)


def test_a_failed_build_warns_and_leaves_the_python_path(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def fail(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp, "load", fail)
    monkeypatch.delitem(numba_step._state, "ext")
    monkeypatch.setitem(eager_front, "fn", eager_front["fn"])  # (put back afterwards)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ step failed .*no compiler here"):
        assert numba_step._ext() is None
    assert eager_front["fn"] is None, "a failed build left the C++ front door in place"
    x = make_input((8, 16, 6, 6))
    y = batchnorm.batch_norm(x, None, None, training=True, backend="numba")
    assert_close(y, torch.from_numpy(ref.BatchNorm(16, affine=False).forward(
        x.double().numpy())), *TOLERANCES[torch.float32], "y on the Python path")


def test_switched_off_by_the_environment():
    code = ("import torch, batchnorm\n"
            "from batchnorm.backends import numba_step\n"
            "x = torch.randn(8, 16, 6, 6)\n"
            "batchnorm.batch_norm(x, None, None, training=True, backend='numba')\n"
            "assert not numba_step.available() and not numba_step._train_recipes\n")
    env = dict(os.environ, BATCHNORM_NUMBA_CPP="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_auto_trains_smaller_channels_first_inputs_with_the_cpp_step(monkeypatch):
    """The C++ step moves the channels-first crossover with ATen from 256K values down to
    64K (``NumbaBackend.preferred_for``); without it the old threshold holds."""
    x = torch.randn(8, 32, 16, 16)  # 64K values
    assert resolve_backend("auto", x, training=True) == "numba"
    assert resolve_backend("auto", torch.randn(8, 16, 12, 12), training=True) != "numba"
    _python_path(monkeypatch)
    assert resolve_backend("auto", x, training=True) != "numba"
    assert resolve_backend("auto", torch.randn(16, 64, 16, 16), training=True) == "numba"


# ---- BatchNorm + activation (+ residual) ----------------------------------------------------


def _act_step(x, w, b, r, dy, need, activation):
    c = x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rm, rv = torch.linspace(-1, 1, c, dtype=acc), torch.linspace(0.5, 2, c, dtype=acc)
    x = x.detach().requires_grad_(need[0])
    w = None if w is None else w.detach().requires_grad_(need[1])
    b = None if b is None else b.detach().requires_grad_(need[2])
    r = None if r is None else r.detach().requires_grad_(need[3])
    y = batchnorm.batch_norm_act(x, rm, rv, w, b, True, activation=activation, residual=r,
                                 backend="numba")
    leaves = [t for t in (x, w, b, r) if t is not None and t.requires_grad]
    return [y, *torch.autograd.grad(y, leaves, dy), rm, rv]


ACTS = ["identity", "relu", "leaky_relu", "elu", "silu", "gelu"]
ACT_CASES = [((8, 16, 6, 6), False, torch.float32), ((8, 16, 6, 6), True, torch.float32),
             ((32, 64, 16, 16), False, torch.float32), ((32, 64, 16, 16), True, torch.float32),
             ((16, 32), False, torch.float32), ((4, 8, 3, 4, 5), True, torch.float64),
             ((8, 16, 6, 6), True, torch.bfloat16)]


@pytest.mark.parametrize(("shape", "cl", "dtype"), ACT_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{'cl' if c else 'cf'}-{str(d)[6:]}"
                              for s, c, d in ACT_CASES])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
def test_the_cpp_act_step_gives_the_python_paths_bits(monkeypatch, shape, cl, dtype,
                                                      activation, with_residual):
    c = shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = _layout(make_input(shape, dtype, shift=1.0), cl)
    r = _layout(torch.randn(shape, dtype=dtype), cl) if with_residual else None
    w, b = torch.rand(c, dtype=acc) + 0.5, torch.randn(c, dtype=acc)
    dy = _layout(torch.randn(shape, dtype=dtype), cl)
    need = (True, True, True, with_residual)
    numba_step.forget_recipes()
    got = _act_step(x, w, b, r, dy, need, activation)
    assert [k for k, v in numba_step._act_recipes.items() if v is not None], \
        "the C++ step did not take the call"
    with monkeypatch.context() as m:
        _python_path(m)
        expected = _act_step(x, w, b, r, dy, need, activation)
    assert len(got) == len(expected)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert a.dtype == e.dtype and a.stride() == e.stride(), i
        assert torch.equal(a, e), f"output {i}: max diff {(a.double() - e.double()).abs().max()}"


@pytest.mark.parametrize("need", [(True, False, False, False), (False, True, False, False),
                                  (False, False, False, True), (True, False, False, True),
                                  (False, True, True, True), (False, False, True, False)])
def test_each_subset_of_act_gradients(monkeypatch, need):
    """Three backward recipes: elementwise only (dresidual alone), reduction only (dweight,
    dbias), both."""
    x, r = make_input((8, 16, 6, 6)), torch.randn(8, 16, 6, 6)
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    dy = torch.randn(8, 16, 6, 6)
    got = _act_step(x, w, b, r, dy, need, "relu")
    with monkeypatch.context() as m:
        _python_path(m)
        expected = _act_step(x, w, b, r, dy, need, "relu")
    for a, e in zip(got, expected, strict=True):
        assert torch.equal(a, e)


def test_act_double_backward_and_gradcheck():
    x = make_input((4, 3, 2, 2), torch.float64).requires_grad_()
    r = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()

    def fn(x_, w_, b_, r_):
        return batchnorm.batch_norm_act(x_, None, None, w_, b_, True, activation="silu",
                                        residual=r_, backend="numba")

    numba_step.forget_recipes()
    assert torch.autograd.gradcheck(fn, (x, w, b, r))
    assert torch.autograd.gradgradcheck(fn, (x, w, b, r), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert any(v is not None for v in numba_step._act_recipes.values())


def test_a_residual_in_another_layout_goes_the_python_way(monkeypatch):
    x = make_input((8, 16, 6, 6))
    r = _layout(torch.randn(8, 16, 6, 6), True)
    dy = torch.randn(8, 16, 6, 6)
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    got = _act_step(x, w, b, r, dy, (True, True, True, True), "relu")
    with monkeypatch.context() as m:
        _python_path(m)
        expected = _act_step(x, w, b, r, dy, (True, True, True, True), "relu")
    for a, e in zip(got, expected, strict=True):
        assert torch.equal(a, e) and a.stride() == e.stride()


def test_the_first_calls_do_not_wait_for_the_build(monkeypatch):
    """The build runs in a background thread: calls take the Python path (same bits) until
    it is ready, then the C++ step."""
    ext = numba_step._ext()
    gate = threading.Event()

    def slow_build():
        gate.wait(60)
        return ext

    monkeypatch.setattr(numba_step, "_build", slow_build)
    monkeypatch.setattr(numba_step, "_state", {"ext": ext})
    numba_step.forget_recipes()
    monkeypatch.setattr(numba_step, "_state", {})
    monkeypatch.setitem(eager_front, "fn", None)  # (as before the first build)
    x = make_input((8, 16, 6, 6))
    y1 = batchnorm.batch_norm(x, None, None, training=True, backend="numba")
    thread = numba_step._state["thread"]
    assert thread.is_alive() and not numba_step._train_recipes
    gate.set()
    thread.join(60)
    y2 = batchnorm.batch_norm(x, None, None, training=True, backend="numba")
    assert any(v is not None for v in numba_step._train_recipes.values())
    assert torch.equal(y1, y2)


def _inplace_step(x0, w, b, r, dy, activation, slope=0.01):
    c = x0.shape[1]
    rm, rv = torch.zeros(c), torch.ones(c)
    leaf = x0.clone().requires_grad_()
    x = leaf * 1.0  # in-place mode refuses a leaf: a stand-in producer
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    r = None if r is None else r.clone().requires_grad_()
    y = batchnorm.batch_norm_act(x, rm, rv, w, b, True, activation=activation,
                                 negative_slope=slope, residual=r, inplace=True,
                                 backend="numba")
    assert y.data_ptr() == x.data_ptr(), "in-place mode did not write over its input"
    leaves = [t for t in (leaf, w, b, r) if t is not None]
    return [y, *torch.autograd.grad(y, leaves, dy), rm, rv]


@pytest.mark.parametrize("activation", ["identity", "leaky_relu", "elu"])
@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
def test_the_cpp_inplace_step_gives_the_python_paths_bits(monkeypatch, activation, cl,
                                                          with_residual):
    """In place: y over x (marked dirty), x-hat recomputed from y, the weight kept
    invertible (weights 0 and -1e-8 included, used as +-1e-6) as on the Python path."""
    shape = (32, 64, 16, 16)
    x0 = _layout(make_input(shape, shift=1.0), cl)
    r = _layout(torch.randn(shape), cl) if with_residual else None
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    w[::5], w[1::5] = 0.0, -1e-8
    dy = _layout(torch.randn(shape), cl)
    numba_step.forget_recipes()
    got = _inplace_step(x0, w, b, r, dy, activation)
    assert [k for k, v in numba_step._act_recipes.items() if v is not None and k[-1]], \
        "the C++ step did not take the in-place call"
    with monkeypatch.context() as m:
        _python_path(m)
        expected = _inplace_step(x0, w, b, r, dy, activation)
    assert len(got) == len(expected)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert a.stride() == e.stride(), i
        assert torch.equal(a, e), f"output {i}: max diff {(a.double() - e.double()).abs().max()}"


def test_inplace_double_backward_raises_and_the_input_is_marked_dirty():
    leaf = make_input((8, 16, 6, 6)).requires_grad_()
    x = leaf * 1.0
    version = x._version
    y = batchnorm.batch_norm_act(x, None, None, None, None, True, activation="elu",
                                 inplace=True, backend="numba")
    assert x._version > version and y.grad_fn is x.grad_fn
    with pytest.raises(RuntimeError, match="not supported with inplace=True"):
        torch.autograd.grad(y.sum(), leaf, create_graph=True)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
def test_the_cpp_eval_act_step_gives_the_python_paths_bits(monkeypatch, activation, cl,
                                                           with_residual):
    """Eval with a fused activation, nothing needing a gradient: the kernels normalize with
    the running variance (invstd in float64 from it) on both paths."""
    shape = (32, 64, 16, 16)
    x = _layout(make_input(shape, shift=1.0), cl)
    r = _layout(torch.randn(shape), cl) if with_residual else None
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    rm, rv = torch.randn(64), torch.rand(64) + 0.1
    rv[0] = 0.0  # invstd 1 / sqrt(eps)

    def run():
        with torch.no_grad():
            return batchnorm.batch_norm_act(x, rm, rv, w, b, False, activation=activation,
                                            residual=r, backend="numba")

    numba_step.forget_recipes()
    got = run()
    assert any(v is not None for v in numba_step._eval_act_recipes.values())
    with monkeypatch.context() as m:
        _python_path(m)
        expected = run()
    assert torch.equal(got, expected) and got.stride() == expected.stride()
    z = (x.double() - rm.double()[:, None, None]) / (rv.double()[:, None, None] + 1e-5).sqrt()
    z = z * w.double()[:, None, None] + b.double()[:, None, None]
    if r is not None:
        z = z + r.double()
    want = act_forward(z, activation, 0.01)
    assert_close(got, want, *TOLERANCES[torch.float32], f"eval {activation}")


@pytest.mark.parametrize("activation", ["identity", "leaky_relu", "elu"])
@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
def test_the_cpp_inplace_eval_act_step_gives_the_python_paths_bits(monkeypatch, activation, cl,
                                                                   with_residual):
    """Eval in place, nothing needing a gradient: written over the input (returned, its
    version bumped), on the invertible weight (0 and a tiny negative weight among them), bit
    for bit the Python path's, near the float64 composite."""
    shape = (16, 32, 12, 12)
    x0 = _layout(make_input(shape, shift=1.0), cl)
    r = _layout(torch.randn(shape), cl) if with_residual else None
    w, b = torch.rand(32) + 0.5, torch.randn(32)
    w[0], w[1], w[2] = 0.0, -1e-8, -0.7
    rm, rv = torch.randn(32), torch.rand(32) + 0.1

    def run():
        x = x0.clone()
        version = x._version
        with torch.no_grad():
            y = batchnorm.batch_norm_act(x, rm, rv, w, b, False, activation=activation,
                                         residual=r, inplace=True, backend="numba")
        assert y is x and x._version > version
        return y

    numba_step.forget_recipes()
    got = run()
    assert any(key[-1] and rid is not None for key, rid in numba_step._eval_act_recipes.items())
    with monkeypatch.context() as m:
        _python_path(m)
        expected = run()
    assert torch.equal(got, expected) and got.stride() == expected.stride()
    kw = torch.where(w.abs() < 1e-6, torch.where(w < 0, -1e-6, 1e-6), w).double()
    z = (x0.double() - rm.double()[:, None, None]) / (rv.double()[:, None, None] + 1e-5).sqrt()
    z = z * kw[:, None, None] + b.double()[:, None, None]
    if r is not None:
        z = z + r.double()
    want = act_forward(z, activation, 0.01)
    assert_close(got, want, *TOLERANCES[torch.float32], f"in-place eval {activation}")


def test_inplace_eval_act_that_needs_a_gradient_keeps_the_autograd_path():
    """In place with grad mode on and an input that requires grad: the op layer's autograd
    function (the C++ eval step is for calls where nothing needs a gradient)."""
    leaf = make_input((8, 16, 6, 6)).requires_grad_()
    x = leaf * 1.0
    m = batchnorm.BatchNormAct2d(16, activation="leaky_relu", inplace=True, backend="numba")
    y = m.eval()(x)
    assert y.grad_fn is not None and y.data_ptr() == x.data_ptr()
    y.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_inplace_eval_act_bumps_the_version_autograd_checks():
    """In-place eval in C++ writes over an input another op saved for its backward: the
    version bump makes that backward raise, as for any in-place op (not a silent wrong
    gradient)."""
    leaf = make_input((8, 16, 6, 6)).requires_grad_()
    x = leaf * 1.0
    z = x.sin()  # saves x
    m = batchnorm.BatchNormAct2d(16, activation="leaky_relu", inplace=True, backend="numba")
    numba_step.forget_recipes()
    with torch.no_grad():
        y = m.eval()(x)
    assert y is x
    assert any(key[-1] and rid is not None for key, rid in numba_step._eval_act_recipes.items())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()
