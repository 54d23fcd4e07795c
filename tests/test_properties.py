"""Property tests (hypothesis) over shapes, layouts and options, on every CPU backend."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

import batchnorm
from batchnorm import reference as ref
from batchnorm.backends import get_backend
from batchnorm.backends.base import chan_combine
from helpers import TOLERANCES, assert_close, to_channels_last

CPU_BACKENDS = [b for b in batchnorm.available_backends() if b != "triton"]


@st.composite
def bn_case(draw):
    rank = draw(st.integers(2, 5))
    c = draw(st.integers(1, 6))
    n = draw(st.integers(1, 4))
    spatial = [draw(st.integers(1, 4)) for _ in range(rank - 2)]
    shape = (n, c, *spatial)
    if n * int(np.prod(spatial)) < 2:
        shape = (n + 1, c, *spatial)
    return {
        "shape": shape,
        "channels_last": draw(st.booleans()) and rank >= 3,
        "affine": draw(st.booleans()),
        "training": draw(st.booleans()),
        "momentum": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        "backend": draw(st.sampled_from(CPU_BACKENDS)),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "loc": draw(st.sampled_from([0.0, 3.0, -100.0])),
        "scale": draw(st.sampled_from([1e-2, 1.0, 50.0])),
    }


@given(bn_case())
def test_functional_matches_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    shape, c = case["shape"], case["shape"][1]
    x = torch.randn(shape, generator=g) * case["scale"] + case["loc"]
    if case["channels_last"]:
        x = to_channels_last(x)
    x.requires_grad_()
    w = torch.rand(c, generator=g) + 0.5 if case["affine"] else None
    b = torch.randn(c, generator=g) if case["affine"] else None
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.1
    rm0, rv0 = rm.clone(), rv.clone()
    y = batchnorm.batch_norm(x, rm, rv, w, b, case["training"], case["momentum"], case["eps"],
                             backend=case["backend"])
    dy = torch.randn(shape, generator=g)
    y.backward(dy)
    xn = x.detach().double().numpy()
    wn = None if w is None else w.double().numpy()
    bn_ = None if b is None else b.double().numpy()
    if case["training"]:
        y_ref, stats, inv = ref.forward_train(xn, wn, bn_, case["eps"])
        mean = stats.mean
        rm_ref, rv_ref = ref.update_running(rm0.double().numpy(), rv0.double().numpy(), stats,
                                            case["momentum"], 1)
    else:
        mean, inv = rm0.double().numpy(), ref.invstd(rv0.double().numpy(), case["eps"])
        y_ref = ref.forward_eval(xn, mean, rv0.double().numpy(), wn, bn_, case["eps"])
        rm_ref, rv_ref = rm0.numpy(), rv0.numpy()
    dx_ref, _, _ = ref.backward(dy.double().numpy(), xn, mean, inv, wn, case["training"])
    atol, rtol = TOLERANCES[torch.float32]
    # the gradient of a normalized output scales with invstd: with tiny variance it is large
    gscale = float(np.max(np.abs(dx_ref))) if dx_ref.size else 1.0
    # fp32 conditioning: the mean is rounded to eps32 * |x|, so x-hat (and y) carry an error of
    # about eps32 * |x| * invstd, which dx = w * invstd * (dy - ... - xhat * mean(dy * xhat))
    # amplifies by w * invstd * |dy| (large |loc| / scale makes this dominate).
    eps32 = float(np.finfo(np.float32).eps)
    w_max = 1.0 if wn is None else float(np.max(np.abs(wn)))
    x_err = 2 * eps32 * float(np.max(np.abs(xn))) * float(np.max(inv))  # error of x-hat
    cond = 2 * w_max * float(np.max(inv)) * x_err * float(np.max(np.abs(dy.numpy())))
    assert_close(y, y_ref, atol + w_max * x_err, rtol, f"y {case}")
    assert_close(x.grad, dx_ref, atol * max(1.0, gscale) + cond, rtol, f"dx {case}")
    assert_close(rm, rm_ref, atol * max(1.0, abs(case["loc"])), rtol, f"running_mean {case}")
    assert_close(rv, rv_ref, atol * max(1.0, case["scale"] ** 2), rtol, f"running_var {case}")


@given(st.lists(st.integers(0, 5), min_size=1, max_size=5), st.integers(0, 2**31 - 1),
       st.sampled_from(CPU_BACKENDS))
def test_rebatching_invariance(sizes, seed, backend):
    """Statistics of the parts merged with Chan's formula equal the statistics of the whole."""
    if sum(sizes) == 0:
        sizes = [*sizes, 1]
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, 3, 4, generator=g) * 3 + 1e3 for n in sizes]
    be = get_backend(backend)
    means, m2s, counts = [], [], []
    for p in parts:
        if p.numel() == 0:
            means.append(torch.zeros(3))
            m2s.append(torch.zeros(3))
        else:
            mean, m2 = be.stats(p)
            means.append(mean)
            m2s.append(m2)
        counts.append(p.shape[0] * 4)
    total, mean, m2 = chan_combine(torch.tensor(counts), torch.stack(means), torch.stack(m2s))
    whole = ref.channel_stats(torch.cat(parts).double().numpy())
    assert int(total) == whole.count
    assert_close(mean, whole.mean, 1e-3, 1e-6, "merged mean")
    assert_close(m2, whole.m2, 1e-2, 1e-4, "merged m2")


@given(st.integers(0, 2**31 - 1), st.sampled_from(CPU_BACKENDS))
def test_batch_permutation_invariance_and_shift_invariance(seed, backend):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)
    perm = torch.randperm(6, generator=g)
    y = batchnorm.batch_norm(x, None, None, training=True, backend=backend)
    y_perm = batchnorm.batch_norm(x[perm], None, None, training=True, backend=backend)
    y_shift = batchnorm.batch_norm(x + 7.0, None, None, training=True, backend=backend)
    assert_close(y_perm, y[perm], 1e-12, 1e-10, "permuted batch")
    assert_close(y_shift, y, 1e-10, 1e-9, "shifted input")
