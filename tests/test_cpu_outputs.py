"""Recycled CPU output buffers (backends/cpu_outputs.py, used by the numba backend).

The pool must never hand out memory that anything can still see: a live tensor, a view of
it, a NumPy array over it, a tensor saved for backward. It must stay within its limit, drop
least recently used free buffers first, and lay outputs out as empty_out_like does.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from batchnorm.backends import cpu_outputs
from batchnorm.backends.base import empty_out_like
from batchnorm.backends.numba_backend import _new_output

MB = 1 << 20

pytestmark = pytest.mark.skipif(
    cpu_outputs._USE_COUNT is None,
    reason="this torch has no storage use count (torch._C._storage_Use_Count): the pool is off",
)


@pytest.fixture
def pool(monkeypatch):
    """A fresh pool with a 64 MiB limit for the test (the process-wide one is restored)."""
    fresh = cpu_outputs._Pool(64 * MB)
    monkeypatch.setattr(cpu_outputs, "_POOL", fresh)
    return fresh


def _x(nbytes: int, channels_last: bool = False) -> torch.Tensor:
    c = 8
    n = nbytes // (4 * c * 16 * 16)
    x = torch.empty(n, c, 16, 16)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def test_a_dead_output_is_recycled_most_recent_first(pool):
    x = _x(2 * MB)
    a, b = _new_output(x), _new_output(x)
    pa, pb = a.data_ptr(), b.data_ptr()
    assert pa != pb
    del a, b
    gc.collect()
    c = _new_output(x)
    assert c.data_ptr() == pb  # b was handed out last
    d = _new_output(x)
    assert d.data_ptr() == pa
    assert cpu_outputs.cached_bytes() == 2 * x.numel() * 4


@pytest.mark.parametrize("holder", ["tensor", "view", "numpy", "storage", "data", "dlpack",
                                    "saved", "shared"])
def test_memory_still_reachable_is_never_handed_out(pool, holder):
    x = _x(2 * MB)
    y = _new_output(x)
    y.fill_(3.0)
    ptr = y.data_ptr()
    keep: object
    if holder == "tensor":
        keep = y
    elif holder == "view":
        keep = y[1:2, 3]
    elif holder == "numpy":
        keep = y.numpy()[0]
    elif holder == "storage":
        keep = y.untyped_storage()
    elif holder == "data":
        keep = y.data
    elif holder == "dlpack":
        keep = torch.utils.dlpack.to_dlpack(y)
    elif holder == "shared":  # sent to another process: torch moves it to shared memory
        y.share_memory_()
        ptr = y.data_ptr()
        keep = None
    else:  # saved for backward by autograd: only the graph holds it
        w = torch.ones((), requires_grad=True)
        keep = (y * w).sum()  # mul saves y for w's gradient
    del y
    gc.collect()
    z = _new_output(x)
    assert z.data_ptr() != ptr
    z.fill_(-1.0)
    if holder == "saved":
        keep.backward()  # type: ignore[union-attr]
        assert w.grad is not None and w.grad.item() == 3.0 * x.numel()
    elif holder == "numpy":
        assert np.all(keep == 3.0)
    elif holder == "storage":
        assert torch.tensor([], dtype=torch.float32).set_(keep).eq(3.0).all()  # type: ignore
    elif holder == "dlpack":
        assert torch.utils.dlpack.from_dlpack(keep).eq(3.0).all()
    elif holder == "shared":
        assert cpu_outputs.cached_bytes() == x.numel() * 4  # only z: the shared one left
    else:
        assert keep.eq(3.0).all()  # type: ignore[union-attr]


@pytest.mark.parametrize("shape", [(4096, 96), (64, 24, 200), (8, 16, 40, 52), (2, 8, 16, 20, 64)],
                         ids=["2d", "3d", "4d", "5d"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_outputs_have_the_kernels_layout(pool, shape, channels_last):
    x = torch.empty(shape)
    if channels_last and x.dim() >= 4:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    elif channels_last and x.dim() == 3:
        x = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    assert x.numel() * 4 >= cpu_outputs.MIN_BYTES
    y = _new_output(x)
    want = empty_out_like(x)
    assert (y.shape, y.stride(), y.dtype) == (want.shape, want.stride(), want.dtype)
    assert y.untyped_storage().nbytes() == x.numel() * 4


def test_small_outputs_are_not_pooled(pool):
    _new_output(torch.empty(16, 8, 8, 8))
    assert cpu_outputs.cached_bytes() == 0


def test_limit_drops_least_recently_used_free_buffers(pool):
    pool.limit = 10 * MB
    a = _new_output(_x(3 * MB))  # 3
    b = _new_output(_x(2 * MB))  # 3 + 2
    c = _new_output(_x(4 * MB))  # 3 + 2 + 4
    del a, b
    gc.collect()
    b = _new_output(_x(2 * MB))  # b's buffer again: now used more recently than a's
    del b
    gc.collect()
    d = _new_output(_x(2 * MB))  # b's buffer once more (free, the right size)
    assert cpu_outputs.cached_bytes() == 9 * MB
    e = _new_output(_x(1 * MB))  # 9 + 1 = 10 fits
    assert cpu_outputs.cached_bytes() == 10 * MB
    del d
    gc.collect()
    # 1 MB more needs room: a's 3 MB (least recently used) goes, b's 2 MB stays
    f = _new_output(_x(1 * MB))
    assert cpu_outputs.cached_bytes() == 8 * MB
    assert sorted(pool.by_size) == [1 * MB, 2 * MB, 4 * MB]
    # 6 MB cannot fit even with every free buffer dropped (c, e and f are in use): nothing
    # is dropped, and the output is a plain allocation
    g = _new_output(_x(6 * MB))
    assert cpu_outputs.cached_bytes() == 8 * MB and 2 * MB in pool.by_size
    assert g.numel() * 4 == 6 * MB
    del c, e, f, g


def test_a_resized_buffer_leaves_the_pool(pool):
    x = _x(2 * MB)
    y = _new_output(x)
    ptr = y.data_ptr()
    y.resize_(x.numel() * 2)  # grows the shared storage
    del y
    gc.collect()
    z = _new_output(x)
    assert z.untyped_storage().nbytes() == x.numel() * 4
    assert cpu_outputs.cached_bytes() == x.numel() * 4
    del z, ptr


def test_empty_cache_keeps_buffers_in_use(pool):
    x = _x(2 * MB)
    a, b = _new_output(x), _new_output(x)
    del a
    gc.collect()
    cpu_outputs.empty_cache()
    assert cpu_outputs.cached_bytes() == x.numel() * 4
    pb = b.data_ptr()
    del b
    gc.collect()
    assert _new_output(x).data_ptr() == pb


def test_limit_zero_turns_pooling_off(pool):
    pool.limit = 0
    _new_output(_x(2 * MB))
    assert cpu_outputs.cached_bytes() == 0


def test_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv("BATCHNORM_NUMBA_OUTPUT_CACHE_MB", "256")
    assert cpu_outputs._limit_from_env() == 256 * MB
    monkeypatch.setenv("BATCHNORM_NUMBA_OUTPUT_CACHE_MB", "0")
    assert cpu_outputs._limit_from_env() == 0
    monkeypatch.delenv("BATCHNORM_NUMBA_OUTPUT_CACHE_MB")
    assert cpu_outputs._limit_from_env() == 1024 * MB
    for bad in ("1G", "-5", "nan"):
        monkeypatch.setenv("BATCHNORM_NUMBA_OUTPUT_CACHE_MB", bad)
        with pytest.raises(ValueError, match="BATCHNORM_NUMBA_OUTPUT_CACHE_MB"):
            cpu_outputs._limit_from_env()


def test_training_steps_reuse_their_buffers(pool, monkeypatch):
    """Steps of a BatchNorm2d on the numba backend: after the first, no new buffers, and the
    results are those of fresh memory (torch.nn on the same input)."""
    pytest.importorskip("numba")
    import batchnorm

    torch.manual_seed(0)
    # one thread: a pool worker that has not yet picked up its (empty) share of a call
    # still holds that call's arrays, which would keep a buffer busy one call longer
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    x = torch.randn(16, 32, 32, 32, requires_grad=True)
    dy = torch.randn_like(x)
    ours = batchnorm.BatchNorm2d(32, backend="numba")
    theirs = torch.nn.BatchNorm2d(32)
    sizes = []
    for _ in range(3):
        y = ours(x)
        (gx,) = torch.autograd.grad(y, x, dy)
        y2 = theirs(x)
        (gx2,) = torch.autograd.grad(y2, x, dy)
        torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, gx2, atol=1e-5, rtol=1e-5)
        sizes.append(cpu_outputs.cached_bytes())
        del y, gx
    assert sizes[0] > 0 and sizes[1] == sizes[2]
