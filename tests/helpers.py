"""Shared test helpers: the tolerance table, an explaining assert, input factories."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# (atol, rtol) per input dtype, for outputs and gradients compared with the float64 reference.
# Scale: outputs are O(1) (normalized); gradients are O(1) for O(1) dy.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    # float64 kernels agree with the float64 reference to rounding.
    torch.float64: (1e-10, 1e-9),
    # float32 storage: ~1e-7 relative per element, a few ulps after the reductions.
    torch.float32: (1e-5, 1e-4),
    # float16 storage: the output itself is rounded to 11 bits (~5e-4 relative), loose because
    # the input was rounded before the statistics were taken as well.
    torch.float16: (5e-3, 5e-3),
    # bfloat16 storage: 8 bits of mantissa (~4e-3 relative); output rounding dominates.
    torch.bfloat16: (3e-2, 2e-2),
}

# Per-channel statistics and running buffers are float32 (or float64), whatever the input:
# only the input rounding matters for them, so they get the float32 row except for float64.
STAT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-5, 1e-4),
    torch.bfloat16: (1e-5, 1e-4),
}


def assert_close(
    actual: Tensor | np.ndarray,
    expected: Tensor | np.ndarray,
    atol: float,
    rtol: float,
    what: str = "",
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise.

    On failure the message says what was compared, how many elements fail, the worst element's
    index, both values, and the max absolute and relative errors.
    """
    a = actual.detach().double().cpu().numpy() if isinstance(actual, Tensor) else np.asarray(
        actual, dtype=np.float64)
    e = expected.detach().double().cpu().numpy() if isinstance(expected, Tensor) else np.asarray(
        expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    both_nan = np.isnan(a) & np.isnan(e)
    err = np.where(both_nan, 0.0, np.abs(a - e))
    err = np.where(np.isnan(err), np.inf, err)
    bound = atol + rtol * np.abs(e)
    bad = err > bound
    if bad.any():
        idx = np.unravel_index(int(np.argmax(np.where(bad, err - bound, -np.inf))), a.shape)
        rel = err / np.maximum(np.abs(e), 1e-300)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.size} elements out of tolerance "
            f"(atol={atol:g}, rtol={rtol:g}); worst at index {tuple(int(i) for i in idx)}: "
            f"actual={a[idx]!r} expected={e[idx]!r}; max abs err={float(err.max()):.3e}, "
            f"max rel err={float(rel.max()):.3e}"
        )


def assert_same_state(module_a: torch.nn.Module, module_b: torch.nn.Module, what: str) -> None:
    """Both modules hold bitwise-identical buffers and parameters under the same keys."""
    sa, sb = module_a.state_dict(), module_b.state_dict()
    assert list(sa) == list(sb), f"{what}: keys {list(sa)} != {list(sb)}"
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, f"{what}: {k} dtype {sa[k].dtype} != {sb[k].dtype}"
        assert torch.equal(sa[k], sb[k]), f"{what}: {k} differs: {sa[k]} vs {sb[k]}"


def make_input(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    seed: int | None = None,
    shift: float = 0.5,
    scale: float = 2.0,
) -> Tensor:
    """Fresh random input ``shift + scale * N(0, 1)`` with per-channel offsets, optionally in
    channels-last layout (any rank >= 3)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift
    if len(shape) >= 2 and shape[1] > 0:
        offs = torch.linspace(-1.0, 1.0, shape[1], dtype=torch.float64)
        x = x + offs.view(1, -1, *([1] * (len(shape) - 2)))
    x = x.to(dtype)
    if channels_last:
        x = to_channels_last(x)
    return x


def to_channels_last(x: Tensor) -> Tensor:
    """Same values, channels-last memory layout (works for any rank >= 3)."""
    if x.dim() < 3:
        return x
    perm = (0, *range(2, x.dim()), 1)
    inverse = (0, x.dim() - 1, *range(1, x.dim() - 1))
    return x.permute(perm).contiguous().permute(inverse)


def is_channels_last(x: Tensor) -> bool:
    return x.dim() >= 3 and x.permute(0, *range(2, x.dim()), 1).is_contiguous()


def assert_same_non_finite(actual: Tensor, expected: Tensor, atol: float, rtol: float,
                           what: str = "") -> None:
    """NaN, +inf and -inf exactly where ``expected`` has them (the first differing index in
    the message), and the finite elements within ``atol + rtol * |expected|``."""
    a, e = actual.detach(), expected.detach()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    for kind, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        diff = (f(a) != f(e)).nonzero()
        assert diff.numel() == 0, (
            f"{what}: {kind} differs from the expected at {diff.shape[0]} places, first "
            f"{tuple(diff[0].tolist())}: actual {a[tuple(diff[0])]}, "
            f"expected {e[tuple(diff[0])]}")
    finite = torch.isfinite(e)
    assert_close(a[finite], e[finite].to(a.dtype), atol, rtol, what)


def backend_params() -> list:
    """Every available backend as a pytest param for the core suite.

    Triton runs on CPU only under its interpreter, which is slow: its core-suite cases are
    marked ``triton`` and ``slow`` (its own fast cases live in test_triton.py).
    """
    import pytest

    import batchnorm

    params = []
    for name in batchnorm.available_backends():
        marks = [pytest.mark.triton, pytest.mark.slow] if name == "triton" else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params
