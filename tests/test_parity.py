"""Every backend against torch.nn and the float64 reference: outputs, every gradient, buffers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import reference as ref
from batchnorm.catalog import FAST
from helpers import (
    STAT_TOLERANCES,
    TOLERANCES,
    assert_close,
    backend_params,
    is_channels_last,
    make_input,
    to_channels_last,
)

BACKENDS = backend_params()
OPTIONS = list(itertools.product([True, False], [True, False], [0.1, None]))  # affine, track, mom


def _module_pair(rank: int, c: int, affine: bool, track: bool, momentum, backend: str,
                 dtype=torch.float32):
    ours = batchnorm.BatchNorm(c, affine=affine, track_running_stats=track, momentum=momentum,
                               backend=backend, dtype=dtype)
    theirs = torch.nn.BatchNorm2d(c, affine=affine, track_running_stats=track,
                                  momentum=momentum, dtype=dtype)
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _run(module, x, dy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y, x.grad


def _layout_cases(shapes: list[tuple[str, tuple[int, ...]]]) -> list:
    """(name, shape, channels_last) for every shape, channels-last only where it differs (rank
    >= 3: a 2-D (N, C) input is its own channels-last layout)."""
    return [
        pytest.param(name, shape, cl, id=f"{name}-{'cl' if cl else 'cf'}")
        for name, shape in shapes
        for cl in ((False, True) if len(shape) >= 3 else (False,))
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "shape", "channels_last"), _layout_cases(FAST))
def test_module_matches_torch_nn_fp32_all_options(backend, name, shape, channels_last):
    """Two training steps then eval, for every (affine, track_running_stats, momentum)."""
    atol, rtol = TOLERANCES[torch.float32]
    if shape[0] * int(torch.tensor(shape[2:]).prod()) <= 2:
        # two values per channel: x-hat = +-1 from a near-degenerate variance; ATen's own fp32
        # error there reaches 6e-5 against float64, so compare at that level
        atol = rtol = 1e-4
    for affine, track, momentum in OPTIONS:
        what = f"{backend} {name} cl={channels_last} affine={affine} track={track} m={momentum}"
        ours, theirs = _module_pair(len(shape), shape[1], affine, track, momentum, backend)
        # torch.nn.BatchNorm2d only takes 4D; reuse it for any rank through _check_input_dim.
        theirs._check_input_dim = lambda _x: None
        for step in range(2):
            x = make_input(shape, channels_last=channels_last, shift=step)
            dy = make_input(shape, channels_last=channels_last, shift=0.0, scale=1.0)
            y1, dx1 = _run(ours, x, dy)
            y2, dx2 = _run(theirs, x, dy)
            assert_close(y1, y2, atol, rtol, f"{what} step {step} y")
            assert_close(dx1, dx2, atol, rtol, f"{what} step {step} dx")
            assert is_channels_last(y1) == is_channels_last(x) or len(shape) < 3, what
            if affine:
                m = x.numel() // shape[1]
                gat = atol * max(1.0, m**0.5)
                assert_close(ours.weight.grad, theirs.weight.grad, gat, rtol, f"{what} dweight")
                assert_close(ours.bias.grad, theirs.bias.grad, gat, rtol, f"{what} dbias")
                ours.zero_grad()
                theirs.zero_grad()
            for key, v in theirs.state_dict().items():
                assert_close(ours.state_dict()[key], v, atol, rtol, f"{what} {key}")
        ours.eval()
        theirs.eval()
        x = make_input(shape, channels_last=channels_last)
        dy = make_input(shape, channels_last=channels_last, shift=0.0, scale=1.0)
        y1, dx1 = _run(ours, x, dy)
        y2, dx2 = _run(theirs, x, dy)
        assert_close(y1, y2, atol, rtol, f"{what} eval y")
        assert_close(dx1, dx2, atol, rtol, f"{what} eval dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("name", "shape", "channels_last"),
    _layout_cases([("nc", (8, 5)), ("ncl", (4, 6, 9)), ("nchw", (3, 4, 5, 6)),
                   ("ncdhw", (2, 3, 4, 3, 5))]),
)
def test_functional_matches_reference_every_dtype(backend, dtype, training, name, shape,
                                                  channels_last):
    """Output, dx, dweight, dbias and running buffers against the float64 reference."""
    c = shape[1]
    x = make_input(shape, dtype, channels_last).requires_grad_()
    dy = make_input(shape, dtype, channels_last, shift=0.0, scale=1.0)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32  # "mixed type" params
    w = (torch.rand(c, dtype=pdtype) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=pdtype).requires_grad_()
    rm = torch.randn(c, dtype=pdtype)
    rv = torch.rand(c, dtype=pdtype) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = batchnorm.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, backend=backend)
    y.backward(dy)
    assert y.dtype == dtype
    assert is_channels_last(y) == is_channels_last(x) or len(shape) < 3

    xn, dyn = x.detach().double().numpy(), dy.double().numpy()
    wn, bn_ = w.detach().double().numpy(), b.detach().double().numpy()
    if training:
        y_ref, st, inv = ref.forward_train(xn, wn, bn_, 1e-5)
        mean = st.mean
        rm_ref, rv_ref = ref.update_running(rm0.double().numpy(), rv0.double().numpy(), st, 0.1, 1)
    else:
        mean, inv = rm0.double().numpy(), ref.invstd(rv0.double().numpy(), 1e-5)
        y_ref = ref.forward_eval(xn, rm0.double().numpy(), rv0.double().numpy(), wn, bn_, 1e-5)
        rm_ref, rv_ref = rm0.double().numpy(), rv0.double().numpy()
    dx_ref, dw_ref, db_ref = ref.backward(dyn, xn, mean, inv, wn, training)

    atol, rtol = TOLERANCES[dtype]
    satol, srtol = STAT_TOLERANCES[dtype]
    what = f"{backend} {name} {dtype} cl={channels_last} training={training}"
    assert_close(y, y_ref, atol, rtol, f"{what} y")
    assert_close(x.grad, dx_ref, atol, rtol, f"{what} dx")
    m = x.numel() // c
    # dweight/dbias are sums of m products of dtype-rounded values, accumulated in fp32.
    assert_close(w.grad, dw_ref, satol * m**0.5, srtol, f"{what} dweight")
    assert_close(b.grad, db_ref, satol * m**0.5, srtol, f"{what} dbias")
    assert_close(rm, rm_ref, satol, srtol, f"{what} running_mean")
    assert_close(rv, rv_ref, satol, srtol, f"{what} running_var")


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_module_keeps_fp32_state_and_matches_torch(backend):
    for dtype in (torch.float16, torch.bfloat16):
        ours, theirs = _module_pair(4, 3, True, True, 0.1, backend)
        x = make_input((4, 3, 6, 6), dtype)
        dy = make_input((4, 3, 6, 6), dtype, shift=0.0, scale=1.0)
        y1, dx1 = _run(ours, x, dy)
        y2, dx2 = _run(theirs, x, dy)
        atol, rtol = TOLERANCES[dtype]
        assert y1.dtype == dtype and dx1.dtype == dtype
        assert ours.running_mean.dtype == torch.float32
        assert_close(y1, y2, atol, rtol, f"{backend} {dtype} y")
        assert_close(dx1, dx2, 2 * atol, 2 * rtol, f"{backend} {dtype} dx (two roundings)")
        for key, v in theirs.state_dict().items():
            assert_close(ours.state_dict()[key], v, *STAT_TOLERANCES[dtype], f"{dtype} {key}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float32_input_into_float64_module(backend, training):
    """Every backend accepts float64 parameters and buffers with a float32 input (ATen alone
    refuses them; "native" converts), computes in float32 and keeps the buffers' dtype;
    compared with the float64 reference. (float64 input with float32 parameters is refused
    by validation, on purpose.)"""
    x_dtype, module_dtype = torch.float32, torch.float64
    m = batchnorm.BatchNorm2d(3, dtype=module_dtype, backend=backend).train(training)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 1.5)
    rm0, rv0 = m.running_mean.double().numpy().copy(), m.running_var.double().numpy().copy()
    x = make_input((4, 3, 5, 5), x_dtype).requires_grad_()
    dy = make_input((4, 3, 5, 5), x_dtype, shift=0.0, scale=1.0)
    y = m(x)
    dx, dw, db = torch.autograd.grad(y, (x, m.weight, m.bias), dy)
    assert y.dtype == dx.dtype == x_dtype and dw.dtype == db.dtype == module_dtype
    assert m.running_mean.dtype == module_dtype
    w, b = m.weight.detach().double().numpy(), m.bias.detach().double().numpy()
    xd, dyd = x.detach().double().numpy(), dy.double().numpy()
    if training:
        y_ref, stats, inv = ref.forward_train(xd, w, b, m.eps)
        mean = stats.mean
        rm_ref, rv_ref = ref.update_running(rm0, rv0, stats, 0.1, 1)
    else:
        y_ref = ref.forward_eval(xd, rm0, rv0, w, b, m.eps)
        mean, inv = rm0, 1.0 / np.sqrt(rv0 + m.eps)
        rm_ref, rv_ref = rm0, rv0
    dx_ref, dw_ref, db_ref = ref.backward(dyd, xd, mean, inv, w, training)
    atol, rtol = TOLERANCES[torch.float32]
    assert_close(y, y_ref, atol, rtol, f"{backend} y")
    assert_close(m.running_mean, rm_ref, *STAT_TOLERANCES[torch.float32], "running_mean")
    assert_close(m.running_var, rv_ref, *STAT_TOLERANCES[torch.float32], "running_var")
    for got, want, name in ((dx, dx_ref, "dx"), (dw, dw_ref, "dweight"), (db, db_ref, "dbias")):
        assert_close(got, want, 10 * atol, 10 * rtol, f"{backend} {name} (sums of 100)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Sliced and transposed inputs (layout "other") give the same numbers as contiguous ones."""
    base = make_input((4, 6, 10, 8))
    cases = {
        "sliced": base[:, ::2, 1::2],
        "transposed_hw": base.transpose(2, 3),
        "expanded_batch": make_input((1, 3, 5, 5)).expand(4, 3, 5, 5),
    }
    for label, x in cases.items():
        rm1, rv1 = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
        rm2, rv2 = rm1.clone(), rv1.clone()
        xa = x.detach().clone().requires_grad_()  # same strides (clone keeps them when dense)
        xa = x.detach().requires_grad_() if not x.is_contiguous() else xa
        y = batchnorm.batch_norm(xa, rm1, rv1, training=True, backend=backend)
        dy = torch.randn_like(y)
        y.backward(dy)
        xb = x.detach().contiguous().requires_grad_()
        y2 = torch.nn.functional.batch_norm(xb, rm2, rv2, training=True)
        y2.backward(dy)
        atol, rtol = TOLERANCES[torch.float32]
        assert_close(y, y2, atol, rtol, f"{backend} {label} y")
        assert_close(xa.grad, xb.grad, atol, rtol, f"{backend} {label} dx")
        assert_close(rm1, rm2, atol, rtol, f"{backend} {label} running_mean")
        assert_close(rv1, rv2, atol, rtol, f"{backend} {label} running_var")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_behaves_like_torch(backend):
    for training in (True, False):
        ours = batchnorm.BatchNorm2d(3, backend=backend).train(training)
        theirs = torch.nn.BatchNorm2d(3).train(training)
        x = torch.randn(0, 3, 4, 4, requires_grad=True)
        y = ours(x)
        y2 = theirs(x)
        assert y.shape == y2.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(ours.weight.grad, torch.zeros(3))
        for key, v in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], v), (training, key)


def test_auto_resolves_to_an_available_backend_and_matches():
    x = make_input((4, 3, 5, 5))
    name = batchnorm.backends.resolve_backend("auto", x)
    assert name in batchnorm.available_backends()
    y = batchnorm.batch_norm(x, None, None, training=True, backend="auto")
    y_ref, _, _ = ref.forward_train(x.double().numpy())
    assert_close(y, y_ref, *TOLERANCES[torch.float32], "auto y")
    assert np.isfinite(y.numpy()).all()


def test_channels_last_helpers():
    x = to_channels_last(make_input((2, 3, 4)))
    assert is_channels_last(x) and not x.is_contiguous()


@pytest.mark.parametrize("rank", [2, 3, 4, 5, 6])
def test_layout_of_matches_its_definition(rank):
    """layout_of's fast checks against the definition: "cf" when contiguous, "cl" when the
    channels-innermost permutation is contiguous, else "other", over every dim order, with
    and without size-1 dims, and for sliced (gapped) tensors."""
    from batchnorm.backends.base import layout_of

    def definition(t):
        if t.is_contiguous():
            return "cf"
        if t.dim() >= 3 and t.permute(0, *range(2, t.dim()), 1).is_contiguous():
            return "cl"
        return "other"

    seen = set()
    for sizes in ([2, 3, 4, 5, 2, 3][:rank], [2, 1, 3, 1, 2, 2][:rank], [1, 3, 1, 4, 1, 2][:rank]):
        for order in itertools.permutations(range(rank)):
            base = torch.empty([sizes[d] for d in order])
            x = base.permute(*[order.index(d) for d in range(rank)])
            for t in (x, x[:, :, ::2] if rank >= 3 else x[:, ::2]):
                want = definition(t)
                seen.add(want)
                assert layout_of(t) == want, (sizes, order, t.stride())
    assert seen >= ({"cf", "cl", "other"} if rank >= 3 else {"cf", "other"})
