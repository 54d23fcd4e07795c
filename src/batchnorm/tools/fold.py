"""Fold inference-mode BatchNorm into the preceding Conv / ConvTranspose / Linear layer.

In eval mode BatchNorm is a per-channel affine map ``y = x * scale + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``.
When its input is the output of a linear layer ``x = W * u + b`` that nothing else reads,
the two collapse into one layer: ``W' = W * scale`` (along the output channels) and
``b' = b * scale + shift``.

The pure tensor math (:func:`fold_conv_bn_weights`, :func:`fold_linear_bn_weights`) is
separate from the module plumbing (:func:`foldable_pairs`, :func:`fold`), as in
``torch.nn.utils.fusion``. Unlike ``fuse_linear_bn_weights``, ``affine=False`` BatchNorm
folds everywhere (missing gamma/beta mean 1/0).
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter

import torch
from torch import Tensor, fx, nn

from ..backends.base import safe_invstd
from ..nn.act import BatchNormAct, ResidualActivation
from ..nn.frozen import FrozenBatchNorm
from ._modules import bn_rank, is_batchnorm
from .freeze import freeze

__all__ = [
    "bn_scale_shift",
    "fold",
    "fold_conv_bn_weights",
    "fold_linear_bn_weights",
    "foldable_pairs",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE = (*_CONV, *_CONV_T, nn.Linear)


# ---- pure tensor math ------------------------------------------------------------------------
def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` of an eval BatchNorm in ``dtype``:
    ``scale = weight / sqrt(running_var + eps)`` (0 where ``var + eps == 0``),
    ``shift = bias - running_mean * scale``; missing weight/bias count as 1/0."""
    scale = safe_invstd(running_var.detach().to(dtype), eps)
    if weight is not None:
        scale = scale * weight.detach().to(dtype)
    shift = -running_mean.detach().to(dtype) * scale
    if bias is not None:
        shift = shift + bias.detach().to(dtype)
    return scale, shift


def fold_conv_bn_weights(
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    *,
    transpose: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weights of the convolution equivalent to ``bn(conv(x))`` in eval mode.

    Args:
        conv_weight: ``(C_out, C_in / groups, *k)``, or for a transposed convolution
            (``transpose=True``) ``(C_in, C_out / groups, *k)``.
        conv_bias: ``(C_out,)`` or None (zero).
        running_mean, running_var, eps, bn_weight, bn_bias: the BatchNorm's, ``(C_out,)``.
        groups: the convolution's groups (matters only for the transposed layout).

    Returns:
        ``(weight, bias)`` in ``conv_weight``'s dtype (computed in float64).
    """
    scale, shift = bn_scale_shift(running_mean, running_var, eps, bn_weight, bn_bias)
    w = conv_weight.detach().to(torch.float64)
    k = [1] * (w.dim() - 2)
    if transpose:
        c_in, c_out_g = w.shape[0], w.shape[1]
        w = (w.reshape(groups, c_in // groups, c_out_g, *w.shape[2:])
             * scale.reshape(groups, 1, c_out_g, *k)).reshape(w.shape)
    else:
        w = w * scale.reshape(-1, 1, *k)
    b = shift if conv_bias is None else conv_bias.detach().to(torch.float64) * scale + shift
    dtype = conv_weight.dtype
    return w.to(dtype), b.to(conv_bias.dtype if conv_bias is not None else dtype)


def fold_linear_bn_weights(
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Weights of the Linear layer equivalent to ``bn(linear(x))`` in eval mode, for a
    ``(N, C_out)`` linear output. ``linear_weight`` is ``(C_out, C_in)``."""
    return fold_conv_bn_weights(
        linear_weight, linear_bias, running_mean, running_var, eps, bn_weight, bn_bias
    )


# ---- module plumbing -------------------------------------------------------------------------
def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _foldable_bn(bn: nn.Module) -> bool:
    """An eval BatchNorm we can express as a per-channel affine map (plus, for
    :class:`BatchNormAct`, an activation and residual add that stay behind): a known class (not
    a subclass with behaviour of its own) that has running statistics."""
    known = bn_rank(bn)[0] or isinstance(bn, BatchNormAct)
    return known and getattr(bn, "running_mean", None) is not None


def _single_input(node: fx.Node, bn: nn.Module) -> bool:
    """The BatchNorm call takes the layer output as its only input (a BatchNormAct may also
    take a residual, which stays with the activation left in its place)."""
    if len(node.args) == 1 and not node.kwargs:
        return True
    return (isinstance(bn, BatchNormAct) and 1 <= len(node.args) <= 2
            and set(node.kwargs) <= {"residual"} and len(node.args) + len(node.kwargs) == 2)


def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into ``layer``'s weight and bias, in place."""
    w, b = fold_conv_bn_weights(
        layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias,
        transpose=isinstance(layer, _CONV_T), groups=getattr(layer, "groups", 1),
    )
    with torch.no_grad():
        layer.weight.copy_(w)
        if layer.bias is None:
            layer.bias = nn.Parameter(b.to(layer.weight.device), layer.weight.requires_grad)
        else:
            layer.bias.copy_(b)


class _Tracer(fx.Tracer):
    """Keeps every BatchNorm (ours and frozen included) a leaf: their forwards check shapes
    with Python control flow."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batchnorm(m) or super().is_leaf_module(m, module_qualified_name)


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    attr_reads = [n.target for n in graph.nodes if n.op == "get_attr"]
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn = modules[node.target]
        if not _foldable_bn(bn) or not _single_input(node, bn):
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module":
            continue
        layer = modules[prev.target]
        if (
            isinstance(layer, _FOLDABLE)
            and _out_channels(layer) == bn.num_features
            and len(prev.users) == 1  # the layer's output feeds only this BatchNorm
            and calls[prev.target] == 1 and calls[node.target] == 1  # neither is shared
            and not any(a.startswith(prev.target + ".") for a in attr_reads)
        ):
            pairs.append((prev.target, node.target))
    return pairs


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pairs = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (n1, layer), (n2, bn) in itertools.pairwise(children):
            if (
                isinstance(layer, _FOLDABLE)
                and _foldable_bn(bn)
                and _out_channels(layer) == bn.num_features
                and uses[id(layer)] == 1 and uses[id(bn)] == 1
            ):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + n1, prefix + n2))
    return pairs


def foldable_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str]:
    """The ``(layer_name, bn_name)`` pairs :func:`fold` would fold, and how they were found.

    With ``torch.fx`` (``method == "fx"``) when the model traces: a BatchNorm is foldable when
    its only input is the output of a Conv/ConvTranspose/Linear module that feeds nothing else,
    and neither module is called twice. Otherwise (``method == "sequential"``) adjacent
    ``(layer, BatchNorm)`` children of every ``nn.Sequential``.

    A Linear followed by BatchNorm is assumed to produce ``(N, C)`` output (channels last,
    where Linear puts them); a ``(N, L, C)`` output with ``L == C`` would be misread.
    """
    try:
        return _pairs_fx(model), "fx"
    except Exception:  # untraceable model (data-dependent control flow, unsupported ops)
        return _pairs_sequential(model), "sequential"


def fold(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with BatchNorm folded into the preceding layers.

    Every BatchNorm found by :func:`foldable_pairs` is folded into its layer's weight and bias
    and replaced by ``nn.Identity`` (a :class:`BatchNormAct` by a
    :class:`~batchnorm.nn.act.ResidualActivation` with its activation; the model keeps its class
    and structure); every other
    BatchNorm with running statistics becomes a :class:`~batchnorm.nn.FrozenBatchNorm`
    (``x * scale + shift``). BatchNorm without running statistics (which normalizes with
    batch statistics even in eval) and subclasses with behaviour of their own stay as they
    are. ``model`` itself is not modified.

    The result computes the same function as ``model.eval()`` up to floating-point rounding.
    """
    folded = copy.deepcopy(model).eval()
    pairs, _ = foldable_pairs(folded)
    for layer_name, bn_name in pairs:
        _fold_into(folded.get_submodule(layer_name), folded.get_submodule(bn_name))
        bn = folded.get_submodule(bn_name)
        rest_of_bn: nn.Module = (
            ResidualActivation(bn.activation, bn.negative_slope)
            if isinstance(bn, BatchNormAct) else nn.Identity()
        )
        parent_name, _, child = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent_name), child, rest_of_bn)

    rest = [m for m in folded.modules()
            if _foldable_bn(m) and not isinstance(m, FrozenBatchNorm)]
    if rest:
        folded = freeze(folded, rest)
    return folded.eval()
