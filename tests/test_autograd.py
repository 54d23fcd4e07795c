"""float64 gradcheck for every backend, and torch.compile / torch.export through the custom ops."""

from __future__ import annotations

import pytest
import torch

import batchnorm
from helpers import TOLERANCES, assert_close, backend_params, make_input, to_channels_last

BACKENDS = backend_params()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(3, 2), (2, 3, 4), (2, 2, 3, 2)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_gradcheck_float64(backend, training, shape, channels_last):
    fn, leaves = _float64_case(backend, training, shape, channels_last and len(shape) >= 3)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def _float64_case(backend: str, training: bool, shape: tuple[int, ...], channels_last: bool):
    """``(fn, (x, weight, bias))``: batch_norm of float64 leaves, with fresh copies of the
    running buffers on every call (gradcheck calls fn many times; they must not drift)."""
    c = shape[1]
    x = make_input(shape, torch.float64, channels_last).requires_grad_()
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64).requires_grad_()
    rm = torch.randn(c, dtype=torch.float64)
    rv = torch.rand(c, dtype=torch.float64) + 0.5

    def fn(x_, w_, b_):
        return batchnorm.batch_norm(x_, rm.clone(), rv.clone(), w_, b_, training, 0.1, 1e-5,
                                    backend=backend)

    return fn, (x, w, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_without_affine(backend):
    x = make_input((4, 3, 2), torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x_: batchnorm.batch_norm(x_, None, None, training=True, backend=backend), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_gradgradcheck_float64(backend, training, channels_last):
    """create_graph=True differentiates a composite of the layer: second derivatives exact."""
    fn, leaves = _float64_case(backend, training, (3, 3, 2, 2), channels_last)
    assert torch.autograd.gradgradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_matches_torch(backend):
    """A gradient penalty through training BN (float32): the same as through torch.nn's."""
    x = make_input((4, 3, 5)).requires_grad_()
    w = (torch.rand(3) + 0.5).requires_grad_()
    results = []
    for fn in (lambda: batchnorm.batch_norm(x, None, None, w, None, True, backend=backend),
               lambda: torch.nn.functional.batch_norm(x, None, None, w, None, True)):
        (gx,) = torch.autograd.grad(fn().pow(3).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), (x, w)))
    for got, want, name in zip(results[0], results[1], ("x", "weight")):
        assert_close(got, want, 1e-4, 1e-4, f"second derivative wrt {name}")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ordinary_backward_runs_the_kernels(compiled):
    """The create_graph path must not leak into ordinary (eager or compiled) backward passes."""
    from batchnorm.backends import get_backend

    be = get_backend("native")
    calls = []
    original = type(be).backward

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    m = batchnorm.BatchNorm2d(3, backend="native")
    if compiled:
        m = torch.compile(m, backend="aot_eager")
    x = make_input((2, 3, 4, 4)).requires_grad_()
    try:
        type(be).backward = spy
        m(x).square().sum().backward()
    finally:
        type(be).backward = original
    assert calls, "the backward did not call the backend's backward"


def _model(backend: str, channels_last: bool = False, momentum2: float | None = None
           ) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        batchnorm.BatchNorm2d(4, backend=backend),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1),
        batchnorm.BatchNorm2d(4, momentum=momentum2, backend=backend),
    )
    return m.to(memory_format=torch.channels_last) if channels_last else m


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_matches_eager(backend):
    """aot_eager traces through the custom ops' fake kernels and autograd registration."""
    eager, compiled_src = _model(backend), _model(backend)
    compiled = torch.compile(compiled_src, backend="aot_eager")
    for step in range(2):
        x = make_input((2, 3, 6, 6), shift=step)
        y1, y2 = eager(x), compiled(x)
        assert_close(y2, y1, *TOLERANCES[torch.float32], f"compiled train step {step}")
        y1.square().sum().backward()
        y2.square().sum().backward()
    for (n, p1), (_, p2) in zip(eager.named_parameters(), compiled_src.named_parameters()):
        assert_close(p2.grad, p1.grad, 1e-4, 1e-4, f"grad {n}")
    for (n, b1), (_, b2) in zip(eager.named_buffers(), compiled_src.named_buffers()):
        assert_close(b2, b1, 1e-6, 1e-5, f"buffer {n}")
    eager.eval()
    compiled_src.eval()
    x = make_input((2, 3, 6, 6))
    assert_close(compiled(x), eager(x), *TOLERANCES[torch.float32], "compiled eval")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_inductor(backend):
    eager, src = _model(backend, channels_last=True), _model(backend, channels_last=True)
    compiled = torch.compile(src)
    x = to_channels_last(make_input((2, 3, 6, 6)))
    assert_close(compiled(x), eager(x), *TOLERANCES[torch.float32], "inductor train")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_export(backend, training):
    # momentum=None reads the counter on the host (1 / num_batches_tracked), which export
    # cannot trace in training; torch.nn.BatchNorm fails there the same way.
    model = _model(backend, momentum2=0.2).train(training)
    reference = _model(backend, momentum2=0.2).train(training)
    x = make_input((2, 3, 5, 5))
    exported = torch.export.export(model, (x,))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    want = "batchnorm.forward_train" if training else "batchnorm.forward_eval"
    assert any(want in o for o in ops), ops
    x2 = make_input((2, 3, 5, 5))
    assert_close(exported.module()(x2), reference(x2), *TOLERANCES[torch.float32], "exported")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_fast_path_equals_custom_op_path(backend):
    """Eagerly the op layer skips the dispatcher; both paths must agree bit for bit."""
    from batchnorm import ops

    x = make_input((3, 4, 5, 2)).requires_grad_()
    w = (torch.rand(4) + 0.5).requires_grad_()
    b = torch.randn(4).requires_grad_()
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    dy = torch.randn(3, 4, 5, 2)
    # the fast path updates the running buffers in place; the op returns the new ones
    rm_fast, rv_fast = rm.clone(), rv.clone()
    y_fast = ops.batch_norm_train(x, w, b, rm_fast, rv_fast, 0.1, 1e-5, backend)
    y_op, _, _, nrm, nrv = ops.forward_train(x, w, b, rm, rv, 0.1, 1e-5, backend)
    grads = [torch.autograd.grad(y, (x, w, b), dy) for y in (y_fast, y_op)]
    for a, e in zip((y_fast, rm_fast, rv_fast, *grads[0]), (y_op, nrm, nrv, *grads[1])):
        assert torch.equal(a, e)
    ys = [fn(x, w, b, rm, rv, 1e-5, backend) for fn in (ops.batch_norm_eval, ops.forward_eval)]
    ge = [torch.autograd.grad(y, (x, w, b), dy) for y in ys]
    assert torch.equal(ys[0], ys[1])
    for a, e in zip(*ge):
        assert torch.equal(a, e)
