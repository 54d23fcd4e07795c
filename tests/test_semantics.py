"""torch.nn's module contract, line by line (shared/design/semantics.md), on every backend."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm import reference as ref
from helpers import (
    STAT_TOLERANCES,
    TOLERANCES,
    assert_close,
    assert_same_non_finite,
    assert_same_state,
    backend_params,
    is_channels_last,
    make_input,
)

BACKENDS = backend_params()
F32 = TOLERANCES[torch.float32]
CLASSES = [
    (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3, 7)),
    (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 5)),
    (batchnorm.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 3, 4, 4)),
]


@pytest.mark.parametrize(("ours_cls", "torch_cls", "shape"), CLASSES)
def test_construction_matches_torch(ours_cls, torch_cls, shape):
    for kwargs in ({}, {"affine": False}, {"track_running_stats": False},
                   {"momentum": None, "eps": 1e-3}, {"dtype": torch.float64}, {"bias": False}):
        ours, theirs = ours_cls(3, **kwargs), torch_cls(3, **kwargs)
        assert isinstance(ours, _BatchNorm)
        assert ours._version == theirs._version == 2
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
        assert_same_state(ours, theirs, str(kwargs))
        assert ours.extra_repr() == theirs.extra_repr()
        assert repr(ours).replace(ours_cls.__name__, "X") == repr(theirs).replace(
            torch_cls.__name__, "X")
        if ours.num_batches_tracked is not None:
            assert ours.num_batches_tracked.dtype == torch.int64
    assert "backend='native'" in repr(ours_cls(3, backend="native"))


def test_any_rank_batchnorm_and_rank_checks():
    bn = batchnorm.BatchNorm(3)
    for shape in [(4, 3), (4, 3, 2), (2, 3, 2, 2), (2, 3, 2, 1, 2), (2, 3, 1, 2, 1, 2)]:
        assert bn(make_input(shape)).shape == shape
    for cls, bad, msg in [
        (batchnorm.BatchNorm1d, (2, 3, 4, 4), "expected 2D or 3D input (got 4D input)"),
        (batchnorm.BatchNorm2d, (2, 3, 4), "expected 4D input (got 3D input)"),
        (batchnorm.BatchNorm3d, (2, 3, 4, 4), "expected 5D input (got 4D input)"),
        (batchnorm.BatchNorm, (3,), "expected at least 2D input (got 1D input)"),
    ]:
        with pytest.raises(ValueError) as info:
            cls(3)(torch.randn(bad))
        assert str(info.value) == msg


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_none_is_cumulative_average_and_counter_ticks(backend):
    ours = batchnorm.BatchNorm1d(3, momentum=None, backend=backend)
    theirs = torch.nn.BatchNorm1d(3, momentum=None)
    batches = [make_input((n, 3, 4), shift=i) for i, n in enumerate((2, 5, 9))]
    for i, x in enumerate(batches, start=1):
        ours(x)
        theirs(x)
        assert int(ours.num_batches_tracked) == i
    assert_close(ours.running_mean, theirs.running_mean, *F32, "running_mean")
    assert_close(ours.running_var, theirs.running_var, *F32, "running_var")
    # every batch weighs the same (1/3), whatever its size
    stats = [ref.channel_stats(b.double().numpy()) for b in batches]
    mean = sum(s.mean for s in stats) / 3
    var = sum(s.var_unbiased for s in stats) / 3
    assert_close(ours.running_mean, mean, *F32, "equal-weight mean")
    assert_close(ours.running_var, var, *F32, "equal-weight unbiased var")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_momentum_ticks_counter_and_uses_unbiased_running_var(backend):
    bn = batchnorm.BatchNorm2d(3, momentum=0.3, backend=backend)
    x = make_input((2, 3, 2, 2))
    y = bn(x)
    assert int(bn.num_batches_tracked) == 1
    st = ref.channel_stats(x.double().numpy())
    assert_close(bn.running_mean, 0.3 * st.mean, *F32, "running_mean")
    assert_close(bn.running_var, 0.7 + 0.3 * st.var_unbiased, *F32, "unbiased running_var")
    y_ref, _, _ = ref.forward_train(x.double().numpy())  # biased variance normalizes
    assert_close(y, y_ref, *F32, "biased normalization")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_uses_running_buffers_unless_none(backend):
    bn = batchnorm.BatchNorm2d(3, backend=backend)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    bn.eval()
    x = make_input((2, 3, 4, 4))
    y = bn(x)
    y_ref = ref.forward_eval(x.double().numpy(), bn.running_mean.numpy(), bn.running_var.numpy())
    assert_close(y, y_ref, *F32, "eval with buffers")
    assert int(bn.num_batches_tracked) == 0
    untracked = batchnorm.BatchNorm2d(3, track_running_stats=False, backend=backend).eval()
    y_ref, _, _ = ref.forward_train(x.double().numpy())
    assert_close(untracked(x), y_ref, *F32, "eval without buffers uses batch stats")


@pytest.mark.parametrize("backend", BACKENDS)
def test_track_running_stats_flipped_after_construction(backend):
    ours = batchnorm.BatchNorm2d(3, backend=backend)
    theirs = torch.nn.BatchNorm2d(3)
    ours.load_state_dict(theirs.state_dict())
    ours.track_running_stats = theirs.track_running_stats = False
    x = make_input((4, 3, 3, 3))
    assert_close(ours(x), theirs(x), *F32, "train: batch stats")
    assert_same_state(ours, theirs, "no update while untracked")
    assert int(ours.num_batches_tracked) == 0
    ours.eval()
    theirs.eval()
    assert_close(ours(x), theirs(x), *F32, "eval: existing buffers")


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_in_channels_last_out(backend):
    bn = batchnorm.BatchNorm2d(3, backend=backend)
    x = make_input((2, 3, 4, 5)).to(memory_format=torch.channels_last).requires_grad_()
    y = bn(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.randn_like(y))
    assert x.grad.shape == x.shape
    x3 = make_input((2, 3, 2, 4, 5)).to(memory_format=torch.channels_last_3d)
    assert batchnorm.BatchNorm3d(3, backend=backend)(x3).is_contiguous(
        memory_format=torch.channels_last_3d)
    x1 = make_input((2, 3, 7)).transpose(1, 2).contiguous().transpose(1, 2)
    assert is_channels_last(batchnorm.BatchNorm1d(3, backend=backend)(x1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_keeps_fp32_statistics(backend, dtype):
    conv = torch.nn.Conv2d(3, 4, 3)
    ours = batchnorm.BatchNorm2d(4, backend=backend)
    theirs = torch.nn.BatchNorm2d(4)
    x = make_input((2, 3, 8, 8))
    with torch.autocast("cpu", dtype=dtype):
        h = conv(x)
        y1, y2 = ours(h), theirs(h)
    assert h.dtype == y1.dtype == y2.dtype == dtype
    assert ours.running_mean.dtype == ours.weight.dtype == torch.float32
    assert_close(y1, y2, *TOLERANCES[dtype], f"autocast {dtype} y")
    assert_close(ours.running_var, theirs.running_var, *STAT_TOLERANCES[dtype], "running_var")


def test_state_dict_round_trip_with_torch_and_strict_reporting():
    theirs = torch.nn.BatchNorm2d(5)
    theirs(make_input((4, 5, 3, 3)))
    ours = batchnorm.BatchNorm2d(5)
    assert ours.load_state_dict(theirs.state_dict()) == theirs.load_state_dict(
        theirs.state_dict())
    assert_same_state(ours, theirs, "torch -> ours")
    back = torch.nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    assert_same_state(back, theirs, "ours -> torch")
    sd = ours.state_dict()
    sd["extra"] = torch.zeros(1)
    del sd["bias"]
    r1 = batchnorm.BatchNorm2d(5).load_state_dict(sd, strict=False)
    r2 = torch.nn.BatchNorm2d(5).load_state_dict(sd, strict=False)
    assert (r1.missing_keys, r1.unexpected_keys) == (r2.missing_keys, r2.unexpected_keys)
    with pytest.raises(RuntimeError, match="Missing key"):
        batchnorm.BatchNorm2d(5).load_state_dict(sd)


def test_version_1_checkpoint_without_counter_loads():
    src = torch.nn.BatchNorm1d(4)
    sd = src.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    ours = batchnorm.BatchNorm1d(4)
    ours.num_batches_tracked.fill_(7)
    result = ours.load_state_dict(sd)
    assert result.missing_keys == []
    assert int(ours.num_batches_tracked) == 7  # the module's current counter is kept
    sd._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        batchnorm.BatchNorm1d(4).load_state_dict(sd)


def test_reset_methods_and_deepcopy():
    bn = batchnorm.BatchNorm2d(3)
    bn(make_input((2, 3, 2, 2)))
    with torch.no_grad():
        bn.weight.fill_(3)
    clone = copy.deepcopy(bn)
    bn.reset_running_stats()
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert torch.equal(bn.running_var, torch.ones(3))
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.weight, torch.full((3,), 3.0))
    bn.reset_parameters()
    assert torch.equal(bn.weight, torch.ones(3))
    assert int(clone.num_batches_tracked) == 1


def test_robust_statistics_far_from_zero_fp32():
    """x = 1e4 + N(0, 1) in fp32: the variance within 1e-3 (E[x^2] - E[x]^2 fails this)."""
    for backend in batchnorm.available_backends():
        if backend == "triton":
            continue  # covered in test_triton.py under the interpreter
        x = (1e4 + torch.randn(64, 4, 32, dtype=torch.float64)).float()
        rm, rv = torch.zeros(4), torch.ones(4)
        y = batchnorm.batch_norm(x, rm, rv, training=True, momentum=1.0, backend=backend)
        st = ref.channel_stats(x.double().numpy())
        assert_close(rv, st.var_unbiased, 0, 1e-3, f"{backend} variance far from zero")
        assert_close(rm, st.mean, 0, 1e-6, f"{backend} mean far from zero")
        y_ref, _, _ = ref.forward_train(x.double().numpy())
        assert_close(y, y_ref, 1e-3, 1e-3, f"{backend} output far from zero")


def test_fp16_large_values_give_finite_correct_statistics():
    for backend in batchnorm.available_backends():
        if backend == "triton":
            continue  # covered in test_triton.py under the interpreter
        x = (torch.rand(32, 3, 16, dtype=torch.float64) * 1.2e5 - 6e4).half()
        rm, rv = torch.zeros(3), torch.ones(3)
        y = batchnorm.batch_norm(x, rm, rv, training=True, momentum=1.0, backend=backend)
        st = ref.channel_stats(x.double().numpy())
        assert torch.isfinite(y).all() and torch.isfinite(rv).all(), backend
        assert_close(rv, st.var_unbiased, 0, 1e-4, f"{backend} fp16 variance")
        assert_close(rm, st.mean, 1e-2, 1e-4, f"{backend} fp16 mean")


def test_invstd_zero_when_variance_and_eps_are_zero_in_eval():
    bn = batchnorm.BatchNorm1d(2, eps=0.0).eval()
    bn.running_var.zero_()
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -0.5]))
    for backend in ("torch", "native"):
        bn.backend = backend
        y = bn(torch.ones(4, 2))
        assert torch.equal(y, torch.tensor([[0.5, -0.5]] * 4)), (backend, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_running_variance_gives_nan_not_bias_in_eval(backend):
    """Only ``var + eps == 0`` maps the inverse std to 0; a negative or NaN running variance
    (a corrupt buffer) must show as NaN, as in torch, not silently output the bias. Also the
    reference and the eval backward."""
    bn = batchnorm.BatchNorm1d(3, eps=0.0, backend=backend).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([-1.0, float("nan"), 2.0]))
        bn.bias.copy_(torch.tensor([0.5, -0.5, 0.25]))
    x = make_input((4, 3)).requires_grad_()
    y = bn(x)
    expected = F.batch_norm(x.detach(), bn.running_mean, bn.running_var, bn.weight.detach(),
                            bn.bias.detach(), False, 0.1, 0.0)
    assert torch.isnan(y[:, :2]).all() and torch.isnan(expected[:, :2]).all(), y
    assert_close(y[:, 2], expected[:, 2], *F32, "healthy channel")
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isnan(dx[:, :2]).all() and torch.isfinite(dx[:, 2]).all(), dx
    inv = ref.invstd(np.array([-1.0, np.nan, 2.0, 0.0]), 0.0)
    assert np.isnan(inv[:2]).all() and np.isclose(inv[2], 2.0 ** -0.5) and inv[3] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("module", [False, True], ids=["momentum1", "momentum_none"])
def test_first_batch_with_momentum_one_overwrites_exactly(backend, module):
    """momentum 1 (and momentum=None's first batch) replaces the buffers by the batch
    statistics exactly: ``r + m * (b - r)`` rounds, and lost every digit of a small variance
    next to the initial 1 (it gave 0 for std 1e-4)."""
    x = make_input((8, 4, 3, 3)) * 1e-4 + 3.0
    ours = batchnorm.BatchNorm2d(4, momentum=None if module else 1.0, backend=backend)
    theirs = torch.nn.BatchNorm2d(4, momentum=None if module else 1.0)
    with torch.no_grad():
        ours.running_mean.fill_(1e4)
        theirs.running_mean.fill_(1e4)
    ours(x)
    theirs(x)
    st = ref.channel_stats(x.double().numpy())
    assert_close(ours.running_var, st.var_unbiased, 0.0, 1e-4, "running_var")
    assert_close(ours.running_var, theirs.running_var, 0.0, 1e-4, "running_var vs torch")
    assert_close(ours.running_mean, theirs.running_mean, 0.0, 1e-6, "running_mean vs torch")


def test_set_backend_env_and_available():
    assert {"torch", "native"} <= set(batchnorm.available_backends())
    assert batchnorm.get_default_backend() == "auto"
    batchnorm.set_backend("torch")
    assert batchnorm.get_default_backend() == "torch"
    batchnorm.set_backend(None)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        batchnorm.set_backend("cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        batchnorm.BatchNorm2d(3, backend="nope")


def test_environment_variable_selects_default(monkeypatch):
    monkeypatch.setenv("BATCHNORM_BACKEND", "torch")
    assert batchnorm.get_default_backend() == "torch"
    x = make_input((2, 3, 4))
    assert batchnorm.backends.resolve_backend(None, x) == "torch"
    monkeypatch.setenv("BATCHNORM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        batchnorm.get_default_backend()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_an_infinite_running_mean_in_eval_follows_torch(backend, bad):
    """Eval with a non-finite running mean in channel 0: y is -inf/inf (NaN for NaN) there
    as in torch (numba's mean-rounding term made it inf - inf = NaN), and dx = dy * w *
    invstd stays finite, as in torch (the composite backends computed (x - mean) * 0 = NaN
    for the whole channel). Also BatchNormAct with relu: 0 where torch's relu gives 0."""
    torch.manual_seed(5)
    x = make_input((4, 3, 5, 5))
    rm, rv = torch.tensor([bad, 0.1, -0.2]), torch.tensor([1.0, 0.5, 2.0])
    w = torch.tensor([1.5, 0.5, 2.0])
    dy = torch.randn(4, 3, 5, 5)
    xs, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = batchnorm.batch_norm(xs, rm, rv, w, None, False, backend=backend)
    want = F.batch_norm(xt, rm, rv, w, None, False)
    assert_same_non_finite(y, want, *F32, "y")
    assert_same_non_finite(torch.autograd.grad(y, xs, dy)[0],
                           torch.autograd.grad(want, xt, dy)[0], *F32, "dx")
    xs, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = batchnorm.batch_norm_act(xs, rm, rv, w, None, False, activation="relu",
                                 backend=backend)
    want = F.relu(F.batch_norm(xt, rm, rv, w, None, False))
    assert_same_non_finite(y, want, *F32, "relu y")
    assert_same_non_finite(torch.autograd.grad(y, xs, dy)[0],
                           torch.autograd.grad(want, xt, dy)[0], *F32, "relu dx")


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_infinite_running_buffer_is_updated_as_torch(backend):
    """(1 - m) * r + m * batch, as ATen: an infinite buffer stays inf at momentum 0.1 (lerp's
    r + m * (batch - r) gave NaN on the composite backend)."""
    x = make_input((8, 2, 3))
    got = [torch.tensor([float("inf"), 0.0]), torch.tensor([1.0, float("-inf")])]
    want = [t.clone() for t in got]
    batchnorm.batch_norm(x, *got, training=True, momentum=0.1, backend=backend)
    F.batch_norm(x, *want, training=True, momentum=0.1)
    assert_same_non_finite(got[0], want[0], *F32, "running_mean")
    assert_same_non_finite(got[1], want[1], *F32, "running_var")
