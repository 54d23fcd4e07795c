"""The executable specification of Batch Normalization, in NumPy.

Every backend, benchmark and tool is checked against these functions. They are written for
clarity, not speed, compute in float64 by default, and need nothing but NumPy.

Conventions (PyTorch's, see ``shared/design/semantics.md``):

* input ``x`` has shape ``(N, C, *)`` with channels at ``channel_axis`` (1 by default; pass
  ``channel_axis=-1`` for channels-last arrays such as NHWC);
* per channel, ``m = N * prod(spatial)`` values are reduced;
* normalization uses the biased variance ``M2 / m``; ``running_var`` is updated with the
  unbiased one ``M2 / (m - 1)``;
* ``running = (1 - w) * running + w * batch`` where ``w = momentum``, or ``1 / t`` with
  ``momentum=None`` (cumulative average over the ``t`` batches seen so far);
* ``invstd = 1 / sqrt(var + eps)``, defined as 0 where ``var + eps == 0``.

Statistics are kept as mergeable ``(count, mean, M2)`` triples and merged with Chan et al.'s
pairwise formula, never with ``E[x^2] - E[x]^2`` (which cancels catastrophically when
``|mean| >> std``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ACTIVATIONS",
    "BatchNorm",
    "BatchNormAct",
    "Stats",
    "activation",
    "backward",
    "channel_stats",
    "combine_stats",
    "forward_eval",
    "forward_train",
    "invstd",
    "update_running",
]


def _move_channels(x: np.ndarray, channel_axis: int) -> np.ndarray:
    """View ``x`` as ``(M, C)``: every axis but the channel axis flattened into rows."""
    if x.ndim < 2:
        raise ValueError(f"expected an array of at least 2 dims (N, C, *), got {x.ndim}D")
    moved = np.moveaxis(x, channel_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def _bcast(v: np.ndarray, ndim: int, channel_axis: int) -> np.ndarray:
    """Reshape a per-channel vector so it broadcasts along ``channel_axis`` of an ndim array."""
    shape = [1] * ndim
    shape[channel_axis % ndim] = v.shape[0]
    return v.reshape(shape)


@dataclass(frozen=True)
class Stats:
    """Mergeable per-channel statistics: ``count`` values, their ``mean`` and ``m2``.

    ``m2 = sum((x - mean)^2)``, so the biased variance is ``m2 / count`` and the unbiased one
    ``m2 / (count - 1)``. ``count`` is a scalar shared by all channels.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @property
    def var(self) -> np.ndarray:
        """Biased variance ``m2 / count`` (what normalization uses)."""
        return self.m2 / max(self.count, 1)

    @property
    def var_unbiased(self) -> np.ndarray:
        """Unbiased variance ``m2 / (count - 1)`` (what ``running_var`` receives)."""
        return self.m2 / max(self.count - 1, 1)


def channel_stats(
    x: np.ndarray, channel_axis: int = 1, dtype: np.dtype | type = np.float64
) -> Stats:
    """Per-channel ``(count, mean, M2)`` of ``x``, computed in ``dtype`` with two passes.

    Args:
        x: array of shape ``(N, C, *)`` (or channels at ``channel_axis``).
        channel_axis: the axis holding the channels.
        dtype: accumulation dtype (float64 by default).
    """
    rows = _move_channels(np.asarray(x), channel_axis).astype(dtype, copy=False)
    count = rows.shape[0]
    if count == 0:
        zeros = np.zeros(rows.shape[1], dtype=dtype)
        return Stats(0, zeros, zeros.copy())
    mean = rows.mean(axis=0)
    m2 = ((rows - mean) ** 2).sum(axis=0)
    return Stats(count, mean, m2)


def combine_stats(parts: Iterable[Stats]) -> Stats:
    """Merge statistics of disjoint parts with Chan's formula.

    For parts a and b: ``n = na + nb``, ``delta = mean_b - mean_a``,
    ``mean = mean_a + delta * nb / n``, ``M2 = M2_a + M2_b + delta^2 * na * nb / n``.
    Parts with ``count == 0`` contribute nothing.
    """
    acc: Stats | None = None
    for part in parts:
        if acc is None or acc.count == 0:
            acc = part
            continue
        if part.count == 0:
            continue
        n = acc.count + part.count
        delta = part.mean - acc.mean
        mean = acc.mean + delta * (part.count / n)
        m2 = acc.m2 + part.m2 + delta**2 * (acc.count * part.count / n)
        acc = Stats(n, mean, m2)
    if acc is None:
        raise ValueError("combine_stats needs at least one part")
    return acc


def invstd(var: np.ndarray, eps: float) -> np.ndarray:
    """``1 / sqrt(var + eps)``, and 0 where ``var + eps == 0`` (never inf); NaN where
    ``var + eps`` is negative or NaN (a corrupt running variance shows, as in torch)."""
    denom = np.asarray(var, dtype=np.float64) + eps
    out = np.zeros_like(denom)
    with np.errstate(invalid="ignore"):
        np.divide(1.0, np.sqrt(denom), out=out, where=denom != 0)
    return out


def _affine(
    x: np.ndarray,
    mean: np.ndarray,
    inv: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    channel_axis: int,
) -> np.ndarray:
    nd = x.ndim
    y = (x - _bcast(mean, nd, channel_axis)) * _bcast(inv, nd, channel_axis)
    if weight is not None:
        y = y * _bcast(np.asarray(weight, dtype=np.float64), nd, channel_axis)
    if bias is not None:
        y = y + _bcast(np.asarray(bias, dtype=np.float64), nd, channel_axis)
    return y


ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu", "silu", "gelu")


def activation(z: np.ndarray, name: str, negative_slope: float = 0.01) -> np.ndarray:
    """``act(z)`` in float64 for the activations of ``batchnorm.BatchNormAct``.

    ``relu``: ``max(z, 0)``; ``leaky_relu``: ``z`` if ``z > 0`` else ``negative_slope * z``;
    ``elu`` (alpha 1): ``z`` if ``z > 0`` else ``exp(z) - 1``; ``silu``: ``z * sigmoid(z)``;
    ``gelu``: the exact form ``z * Phi(z)`` with the normal CDF ``Phi`` (torch's default).

    Raises:
        ValueError: an activation not in :data:`ACTIVATIONS`.
    """
    z = np.asarray(z, dtype=np.float64)
    if name == "identity":
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, float(negative_slope) * z)
    if name == "elu":
        # expm1 of the clipped value: the discarded branch of where() must not overflow.
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0.0)))
    if name == "silu":
        # sigmoid from exp(-|z|) <= 1: nothing overflows, and for very negative z no
        # 1 + tanh(z / 2) cancels (that form lost all digits below z = -37)
        e = np.exp(-np.abs(z))
        return z * np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    if name == "gelu":
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return z * 0.5 * (1.0 + erf(z / math.sqrt(2.0)))
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def forward_train(
    x: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
    channel_axis: int = 1,
) -> tuple[np.ndarray, Stats, np.ndarray]:
    """Training forward with batch statistics.

    ``y = (x - mean) * invstd * weight + bias`` with the biased batch variance.

    Returns:
        ``(y, stats, invstd)``: the float64 output, the batch ``Stats`` and the per-channel
        inverse standard deviation (what a backward pass needs).
    """
    x64 = np.asarray(x, dtype=np.float64)
    st = channel_stats(x64, channel_axis)
    inv = invstd(st.var, eps)
    return _affine(x64, st.mean, inv, weight, bias, channel_axis), st, inv


def forward_eval(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
    channel_axis: int = 1,
) -> np.ndarray:
    """Inference forward: normalize with the running statistics (constants)."""
    x64 = np.asarray(x, dtype=np.float64)
    inv = invstd(np.asarray(running_var, dtype=np.float64), eps)
    mean = np.asarray(running_mean, dtype=np.float64)
    return _affine(x64, mean, inv, weight, bias, channel_axis)


def backward(
    dy: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    inv: np.ndarray,
    weight: np.ndarray | None = None,
    training: bool = True,
    channel_axis: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dx, dweight, dbias)`` of BatchNorm, per channel over ``m`` values.

    With ``xhat = (x - mean) * invstd``:
    ``dbias = sum(dy)``, ``dweight = sum(dy * xhat)``, and

    * training (batch statistics depend on x):
      ``dx = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))``;
    * eval (running statistics are constants): ``dx = dy * weight * invstd``.

    ``mean`` and ``inv`` are the statistics the forward used (batch or running).
    """
    dy64 = np.asarray(dy, dtype=np.float64)
    x64 = np.asarray(x, dtype=np.float64)
    nd = x64.ndim
    mean = np.asarray(mean, dtype=np.float64)
    inv = np.asarray(inv, dtype=np.float64)
    xhat = (x64 - _bcast(mean, nd, channel_axis)) * _bcast(inv, nd, channel_axis)
    axes = tuple(a for a in range(nd) if a != channel_axis % nd)
    dbias = dy64.sum(axis=axes)
    dweight = (dy64 * xhat).sum(axis=axes)
    w = np.ones_like(mean) if weight is None else np.asarray(weight, dtype=np.float64)
    scale = _bcast(w * inv, nd, channel_axis)
    if training:
        m = max(x64.size // max(mean.shape[0], 1), 1)
        dx = scale * (
            dy64
            - _bcast(dbias / m, nd, channel_axis)
            - xhat * _bcast(dweight / m, nd, channel_axis)
        )
    else:
        dx = dy64 * scale
    return dx, dweight, dbias


def update_running(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    stats: Stats,
    momentum: float | None,
    num_batches_tracked: int,
) -> tuple[np.ndarray, np.ndarray]:
    """New running statistics after one training batch.

    Args:
        running_mean, running_var: current buffers.
        stats: the batch statistics.
        momentum: weight of the NEW value (PyTorch's convention), or None for a cumulative
            average, in which case the weight is ``1 / num_batches_tracked``.
        num_batches_tracked: the counter AFTER counting this batch.

    An empty batch (count 0) leaves the buffers unchanged, as PyTorch does.
    """
    if stats.count == 0:
        return np.array(running_mean, copy=True), np.array(running_var, copy=True)
    w = (1.0 / num_batches_tracked) if momentum is None else float(momentum)
    new_mean = (1.0 - w) * np.asarray(running_mean, np.float64) + w * stats.mean
    new_var = (1.0 - w) * np.asarray(running_var, np.float64) + w * stats.var_unbiased
    return new_mean, new_var


class BatchNorm:
    """A framework-free BatchNorm layer with torch.nn's semantics and state_dict key names.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance.
        momentum: weight of the new value in the running update, or None (cumulative average).
        affine: learn ``weight`` (ones) and ``bias`` (zeros).
        track_running_stats: keep ``running_mean``, ``running_var`` and ``num_batches_tracked``.
        channel_axis: where the channels are (1 for NCHW, -1 for channels-last arrays).
        dtype: dtype of parameters, buffers and outputs (float64 by default).

    Shape:
        Input ``(N, C, *)`` (channels at ``channel_axis``); output the same shape.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        channel_axis: int = 1,
        dtype: Any = np.float64,
    ) -> None:
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.channel_axis = channel_axis
        self.dtype = np.dtype(dtype)
        self.training = True
        c = self.num_features
        self.weight = np.ones(c, self.dtype) if affine else None
        self.bias = np.zeros(c, self.dtype) if affine else None
        self.running_mean: np.ndarray | None = None
        self.running_var: np.ndarray | None = None
        self.num_batches_tracked: int | None = None
        if track_running_stats:
            self.running_mean = np.zeros(c, self.dtype)
            self.running_var = np.ones(c, self.dtype)
            self.num_batches_tracked = 0
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray, bool] | None = None

    def train(self, mode: bool = True) -> BatchNorm:
        self.training = mode
        return self

    def eval(self) -> BatchNorm:
        return self.train(False)

    def _check(self, x: np.ndarray) -> None:
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")
        if not -x.ndim <= self.channel_axis < x.ndim:
            raise ValueError(f"channel_axis={self.channel_axis} is out of range for "
                             f"{x.ndim}D input (expected -{x.ndim} to {x.ndim - 1})")
        c = x.shape[self.channel_axis]
        if c != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels at axis {self.channel_axis}, got {c}"
            )
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"expected a floating-point input, got {x.dtype}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalize ``x``; in training also update the running statistics."""
        x = np.asarray(x)
        self._check(x)
        use_batch = self.training or self.running_mean is None
        if use_batch and x.size // self.num_features == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, "
                f"got input size {tuple(x.shape)}"
            )
        ax = self.channel_axis
        if use_batch:
            y, st, inv = forward_train(x, self.weight, self.bias, self.eps, ax)
            mean = st.mean
            if self.training and self.track_running_stats and self.running_mean is not None:
                assert self.running_var is not None and self.num_batches_tracked is not None
                self.num_batches_tracked += 1
                rm, rv = update_running(
                    self.running_mean, self.running_var, st, self.momentum,
                    self.num_batches_tracked,
                )
                self.running_mean = rm.astype(self.dtype)
                self.running_var = rv.astype(self.dtype)
        else:
            assert self.running_mean is not None and self.running_var is not None
            mean = self.running_mean.astype(np.float64)
            inv = invstd(self.running_var, self.eps)
            y = forward_eval(x, self.running_mean, self.running_var, self.weight, self.bias,
                             self.eps, ax)
        self._cache = (x, mean, inv, use_batch)
        return y.astype(self.dtype if x.dtype.itemsize < self.dtype.itemsize else x.dtype)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Gradient w.r.t. the last forward's input; stores ``grad_weight``/``grad_bias``."""
        if self._cache is None:
            raise RuntimeError("backward() called before forward()")
        x, mean, inv, use_batch = self._cache
        dx, dw, db = backward(dy, x, mean, inv, self.weight, use_batch, self.channel_axis)
        self.grad_weight = dw if self.affine else None
        self.grad_bias = db if self.affine else None
        return dx

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays under torch.nn.BatchNorm's key names."""
        sd: dict[str, np.ndarray] = {}
        if self.affine:
            sd["weight"] = np.array(self.weight)
            sd["bias"] = np.array(self.bias)
        if self.track_running_stats:
            sd["running_mean"] = np.array(self.running_mean)
            sd["running_var"] = np.array(self.running_var)
            sd["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return sd

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> tuple[list[str], list[str]]:
        """Load arrays (or anything ``np.asarray`` takes, torch CPU tensors included).

        Returns ``(missing_keys, unexpected_keys)``; with ``strict=True`` either being
        non-empty raises ``KeyError`` and nothing is loaded. A missing
        ``num_batches_tracked`` (old checkpoints) keeps the current value, as torch does for a
        plain dict.
        """
        expected = list(self.state_dict().keys())
        missing = [k for k in expected if k not in state_dict and k != "num_batches_tracked"]
        unexpected = [k for k in state_dict if k not in expected]
        if strict and (missing or unexpected):
            raise KeyError(f"missing keys {missing}, unexpected keys {unexpected}")
        for key in expected:
            if key not in state_dict:
                continue
            value = np.asarray(state_dict[key])
            if key == "num_batches_tracked":
                self.num_batches_tracked = int(value)
                continue
            if value.shape != (self.num_features,):
                raise ValueError(
                    f"{key}: expected shape ({self.num_features},), got {value.shape}"
                )
            setattr(self, key, value.astype(self.dtype))
        if self.track_running_stats and "num_batches_tracked" not in state_dict:
            self.num_batches_tracked = self.num_batches_tracked or 0
        return missing, unexpected


class BatchNormAct(BatchNorm):
    """``act(BatchNorm(x) + residual)``: the reference of ``batchnorm.BatchNormAct*``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, channel_axis, dtype: as
            :class:`BatchNorm`.
        activation: one of :data:`ACTIVATIONS` (see :func:`activation`).
        negative_slope: the slope of ``leaky_relu`` for negative inputs.

    Forward only: :meth:`backward` raises, rather than return BatchNorm's gradient without
    the activation's.

    Raises:
        ValueError: an unknown activation or a non-finite ``negative_slope``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        channel_axis: int = 1,
        dtype: Any = np.float64,
        *,
        activation: str = "relu",
        negative_slope: float = 0.01,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        if isinstance(negative_slope, bool) or not math.isfinite(float(negative_slope)):
            raise ValueError(f"negative_slope must be a finite number, got {negative_slope!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         channel_axis, dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        return self.forward(x, residual)

    def forward(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """``act(BN(x) + residual)``; in training BN also updates the running statistics.

        Raises:
            ValueError: a residual whose shape differs from ``x``'s.
        """
        x = np.asarray(x)
        if residual is not None and np.shape(residual) != x.shape:
            raise ValueError(f"residual shape {np.shape(residual)} differs from the input "
                             f"shape {x.shape}")
        y = super().forward(x)
        z = y.astype(np.float64)
        if residual is not None:
            z = z + np.asarray(residual, dtype=np.float64)
        return activation(z, self.activation, self.negative_slope).astype(y.dtype)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Not implemented: the reference of BatchNormAct is forward only."""
        raise NotImplementedError(
            "reference.BatchNormAct is forward only (BatchNorm.backward would omit the "
            "activation's derivative)")
