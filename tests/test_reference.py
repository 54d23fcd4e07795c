"""The NumPy reference is the spec: check it against first principles and against torch.nn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import reference as ref
from helpers import assert_close


def _rng() -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))


@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)])
def test_channel_stats_match_numpy_definitions(shape):
    x = _rng().normal(2.0, 3.0, size=shape)
    st = ref.channel_stats(x)
    axes = tuple(a for a in range(x.ndim) if a != 1)
    assert st.count == x.size // shape[1]
    assert_close(st.mean, x.mean(axis=axes), 1e-12, 1e-12, "mean")
    assert_close(st.var, x.var(axis=axes), 1e-12, 1e-12, "biased var")
    assert_close(st.var_unbiased, x.var(axis=axes, ddof=1), 1e-12, 1e-12, "unbiased var")


def test_channels_last_axis_is_the_same_computation():
    x = _rng().normal(size=(3, 4, 5, 6))
    nhwc = np.moveaxis(x, 1, -1)
    a, b = ref.channel_stats(x), ref.channel_stats(nhwc, channel_axis=-1)
    assert_close(a.mean, b.mean, 1e-14, 1e-14, "mean")
    assert_close(a.m2, b.m2, 1e-12, 1e-12, "m2")
    y, _, _ = ref.forward_train(x)
    y_cl, _, _ = ref.forward_train(nhwc, channel_axis=-1)
    assert_close(np.moveaxis(y_cl, -1, 1), y, 1e-12, 1e-12, "y")


@pytest.mark.parametrize("sizes", [(5, 7, 1, 13), (0, 4, 4), (1, 1), (3, 0, 0, 9)])
def test_chan_combine_equals_whole(sizes):
    rng = _rng()
    chunks = [rng.normal(1e3, 2.0, size=(n, 4)) for n in sizes]
    whole = ref.channel_stats(np.concatenate(chunks))
    merged = ref.combine_stats(ref.channel_stats(c) for c in chunks)
    assert merged.count == whole.count
    assert_close(merged.mean, whole.mean, 1e-9, 1e-12, "mean")
    assert_close(merged.m2, whole.m2, 1e-7, 1e-9, "m2")


def test_forward_train_normalizes():
    x = _rng().normal(5.0, 4.0, size=(16, 3, 8))
    y, _, _ = ref.forward_train(x, eps=1e-12)
    axes = (0, 2)
    assert_close(y.mean(axis=axes), np.zeros(3), 1e-12, 0, "mean of y")
    assert_close(y.var(axis=axes), np.ones(3), 1e-9, 1e-9, "var of y")
    w, b = np.array([2.0, -1.0, 0.5]), np.array([0.1, 0.2, 0.3])
    y2, _, _ = ref.forward_train(x, w, b, eps=1e-12)
    assert_close(y2, y * w[None, :, None] + b[None, :, None], 1e-12, 1e-12, "affine")


def test_invstd_is_zero_not_inf_when_var_and_eps_are_zero():
    assert_close(ref.invstd(np.array([0.0, 4.0]), 0.0), np.array([0.0, 0.5]), 0, 0, "invstd")
    y = ref.forward_eval(np.ones((3, 2)), np.ones(2), np.zeros(2), None, np.array([1.0, 2.0]), 0.0)
    assert_close(y, np.tile([1.0, 2.0], (3, 1)), 0, 0, "eval with var=eps=0 gives the bias")


@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_finite_differences(training):
    rng = _rng()
    shape = (3, 2, 4)
    x = rng.normal(size=shape)
    w, b = rng.normal(size=2), rng.normal(size=2)
    rm, rv = rng.normal(size=2), rng.uniform(0.5, 2.0, size=2)
    dy = rng.normal(size=shape)
    eps = 1e-3

    def loss(x_, w_, b_):
        if training:
            y, _, _ = ref.forward_train(x_, w_, b_, eps)
        else:
            y = ref.forward_eval(x_, rm, rv, w_, b_, eps)
        return float((y * dy).sum())

    if training:
        _, st, inv = ref.forward_train(x, w, b, eps)
        mean = st.mean
    else:
        mean, inv = rm, ref.invstd(rv, eps)
    dx, dw, db = ref.backward(dy, x, mean, inv, w, training)

    def numgrad(f, arr):
        g = np.zeros_like(arr)
        h = 1e-6
        for i in np.ndindex(arr.shape):
            a1, a2 = arr.copy(), arr.copy()
            a1[i] += h
            a2[i] -= h
            g[i] = (f(a1) - f(a2)) / (2 * h)
        return g

    assert_close(dx, numgrad(lambda a: loss(a, w, b), x), 1e-6, 1e-5, "dx")
    assert_close(dw, numgrad(lambda a: loss(x, a, b), w), 1e-6, 1e-5, "dweight")
    assert_close(db, numgrad(lambda a: loss(x, w, a), b), 1e-6, 1e-5, "dbias")


def test_update_running_momentum_and_cumulative():
    st = ref.Stats(3, np.array([1.0, 2.0]), np.array([4.0, 8.0]))
    rm, rv = ref.update_running(np.zeros(2), np.ones(2), st, 0.1, 1)
    assert_close(rm, [0.1, 0.2], 1e-15, 0, "momentum mean")
    assert_close(rv, [0.9 + 0.1 * 2.0, 0.9 + 0.1 * 4.0], 1e-15, 0, "unbiased var")
    rm, rv = ref.update_running(np.zeros(2), np.ones(2), st, None, 1)
    assert_close(rm, [1.0, 2.0], 0, 0, "first cumulative batch overwrites")
    rm2, _ = ref.update_running(rm, rv, ref.Stats(3, np.array([3.0, 0.0]), np.zeros(2)), None, 2)
    assert_close(rm2, [2.0, 1.0], 1e-15, 0, "second batch weighs 1/2")
    same = ref.update_running(np.zeros(2), np.ones(2), ref.Stats(0, np.zeros(2), np.zeros(2)),
                              0.5, 1)
    assert_close(same[0], np.zeros(2), 0, 0, "empty batch leaves mean")
    assert_close(same[1], np.ones(2), 0, 0, "empty batch leaves var")


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_numpy_module_matches_torch_nn(momentum, affine):
    torch_bn = torch.nn.BatchNorm2d(3, momentum=momentum, affine=affine).double()
    np_bn = ref.BatchNorm(3, momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            torch_bn.weight.uniform_(0.5, 1.5)
            torch_bn.bias.uniform_(-1, 1)
        np_bn.load_state_dict({k: v.numpy() for k, v in torch_bn.state_dict().items()})
    for step in range(3):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * (step + 1) + step
        xt = x.clone().requires_grad_()
        yt = torch_bn(xt)
        y = np_bn(x.numpy())
        assert_close(y, yt, 1e-12, 1e-12, f"train step {step} y")
        dy = torch.randn_like(yt)
        yt.backward(dy)
        dx = np_bn.backward(dy.numpy())
        assert_close(dx, xt.grad, 1e-11, 1e-10, f"train step {step} dx")
        if affine:
            assert_close(np_bn.grad_weight, torch_bn.weight.grad, 1e-10, 1e-10, "dweight")
            assert_close(np_bn.grad_bias, torch_bn.bias.grad, 1e-10, 1e-10, "dbias")
            torch_bn.zero_grad()
    for k, v in torch_bn.state_dict().items():
        assert_close(np_bn.state_dict()[k], v, 1e-12, 1e-12, f"state {k}")
    torch_bn.eval()
    np_bn.eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert_close(np_bn(x.numpy()), torch_bn(x), 1e-12, 1e-12, "eval y")


def test_numpy_module_state_dict_round_trip_and_errors():
    bn = ref.BatchNorm(4)
    bn(np.random.default_rng(0).normal(size=(8, 4)))
    other = ref.BatchNorm(4)
    assert other.load_state_dict(bn.state_dict()) == ([], [])
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[k], v)
    with pytest.raises(KeyError, match="unexpected"):
        other.load_state_dict({**bn.state_dict(), "extra": np.zeros(4)})
    sd = bn.state_dict()
    del sd["num_batches_tracked"]
    assert other.load_state_dict(sd) == ([], [])  # old checkpoints lack the counter
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="expected 4 channels"):
        bn(np.zeros((2, 3)))


def test_silu_keeps_its_digits_in_the_negative_tail():
    """z * sigmoid(z) for very negative z: no 1 + tanh(z / 2) cancellation, no overflow."""
    z = np.array([-40.0, -37.0, -30.0, -1.0, 0.0, 1.0, 30.0, 800.0, -800.0])
    want = torch.nn.functional.silu(torch.from_numpy(z)).numpy()
    got = ref.activation(z, "silu")
    assert np.all(np.isfinite(got))
    nz = want != 0
    assert np.max(np.abs(got[nz] - want[nz]) / np.abs(want[nz])) < 1e-14, (got, want)


def test_out_of_range_channel_axis_is_a_clear_error():
    bn = ref.BatchNorm(3, channel_axis=3)
    with pytest.raises(ValueError, match="channel_axis=3 is out of range for 2D input"):
        bn(np.ones((4, 3)))
