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
import warnings
from collections import Counter
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from ..backends.base import safe_invstd
from ..nn.act import BatchNormAct, ResidualActivation
from ..nn.frozen import FrozenBatchNorm
from ._modules import bn_rank, is_batchnorm
from .freeze import freeze

__all__ = [
    "FoldCheckError",
    "LinearFoldCheck",
    "bn_scale_shift",
    "check_fold",
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


def _own_plain_weights(layer: nn.Module, shared: set[int]) -> bool:
    """Folding rewrites the layer's weight and bias in place, and removes the BatchNorm: only
    when they are the layer's own Parameters (not tied to another module's, not recomputed by
    a parametrization or a weight_norm/spectral_norm hook) and no hook of the layer could
    see or change what the BatchNorm would have received."""
    if parametrize.is_parametrized(layer) or layer._forward_pre_hooks or layer._forward_hooks:
        return False
    if not isinstance(layer.weight, nn.Parameter):
        return False
    return all(id(p) not in shared for p in (layer.weight, layer.bias) if p is not None)


def _pairable(layer: nn.Module, bn: nn.Module, shared: set[int]) -> bool:
    """The module-level conditions for folding ``bn`` into ``layer`` (the graph-level ones,
    who calls whom, are the callers')."""
    return (
        isinstance(layer, _FOLDABLE)
        and _foldable_bn(bn)
        and _out_channels(layer) == bn.num_features
        and not (bn._forward_pre_hooks or bn._forward_hooks)
        and _own_plain_weights(layer, shared)
    )


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of the Parameters registered more than once in ``model`` (tied weights)."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {k for k, n in uses.items() if n > 1}


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
    shared = _shared_parameters(model)
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
            _pairable(layer, bn, shared)
            and len(prev.users) == 1  # the layer's output feeds only this BatchNorm
            and calls[prev.target] == 1 and calls[node.target] == 1  # neither is shared
            and not any(a.startswith(prev.target + ".") for a in attr_reads)
        ):
            pairs.append((prev.target, node.target))
    return pairs


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    shared = _shared_parameters(model)
    pairs = []
    for name, seq in model.named_modules():
        # only containers that run their children in order (a subclass with a forward of
        # its own may feed a layer's output elsewhere too)
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        children = list(seq.named_children())
        for (n1, layer), (n2, bn) in itertools.pairwise(children):
            if _pairable(layer, bn, shared) and uses[id(layer)] == 1 and uses[id(bn)] == 1:
                prefix = f"{name}." if name else ""
                pairs.append((prefix + n1, prefix + n2))
    return pairs


def foldable_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str]:
    """The ``(layer_name, bn_name)`` pairs :func:`fold` would fold, and how they were found.

    With ``torch.fx`` (``method == "fx"``) when the model traces: a BatchNorm is foldable when
    its only input is the output of a Conv/ConvTranspose/Linear module that feeds nothing else,
    and neither module is called twice. Otherwise (``method == "sequential"``, with a
    warning) adjacent ``(layer, BatchNorm)`` children of every plain ``nn.Sequential`` (not a
    subclass with its own ``forward``): that assumes nothing outside the container calls
    the layer, which only tracing could show (pass ``example_input`` to :func:`fold` to
    have the result checked).

    Either way the layer's weight and bias must be its own Parameters (not tied to another
    module's, not parametrized or recomputed by a weight_norm/spectral_norm hook) and
    neither module may have forward hooks.

    A Linear followed by BatchNorm is assumed to produce ``(N, C)`` output (channels last,
    where Linear puts them); :func:`fold` leaves a check that raises on other ranks, since
    a ``(N, C, L)`` output with ``L == C`` would be misread.
    """
    try:
        return _pairs_fx(model), "fx"
    except Exception as exc:  # untraceable model (data-dependent control flow, unsupported ops)
        warnings.warn(
            f"fold: torch.fx could not trace the model ({type(exc).__name__}: {exc}); folding "
            "adjacent (layer, BatchNorm) children of nn.Sequential containers, which assumes "
            "nothing else calls those layers. Pass example_input to fold() to check the result.",
            stacklevel=3,
        )
        return _pairs_sequential(model), "sequential"


class FoldCheckError(AssertionError):
    """The folded model's output differs from the original's beyond rounding (see
    :func:`fold`'s ``example_input``)."""


class LinearFoldCheck(nn.Module):
    """Left where a BatchNorm after a ``Linear`` was folded: the fold read the Linear's output
    as ``(N, C)`` (features = channels); any other rank raises instead of computing a wrong
    answer (a ``(N, C, L)`` output with ``L == C`` would pass the channel-count check).
    ``torch._assert`` keeps it traceable (torch.fx, ONNX export)."""

    def __init__(self, rest: nn.Module) -> None:
        super().__init__()
        self.rest = rest

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        torch._assert(
            input.dim() == 2,
            "fold() folded a BatchNorm into the Linear layer before it assuming (N, C) "
            "output, but this input has another rank: fold the model without that pair",
        )
        return self.rest(input, *args, **kwargs)


def _outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _outputs(o)]
    return []


def check_fold(
    model: nn.Module, folded: nn.Module, example_input: Any, rtol: float | None = None
) -> float:
    """The largest difference between ``folded`` and ``model.eval()`` (a copy) on
    ``example_input`` (a tensor or a tuple of positional inputs), relative to the largest
    output magnitude; raises :class:`FoldCheckError` above ``rtol`` (default by dtype: 1e-4
    for float32, 1e-9 for float64, 1e-2 for half precision)."""
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    with torch.no_grad():
        want = _outputs(copy.deepcopy(model).eval()(*args))
        got = _outputs(folded(*args))
    if len(got) != len(want):
        raise FoldCheckError(f"fold changed the model's outputs: {len(got)} tensors, the "
                             f"original gives {len(want)}")
    worst = 0.0
    for a, e in zip(got, want):
        scale = float(e.detach().double().abs().max()) if e.numel() else 0.0
        err = float((a.detach().double() - e.detach().double()).abs().max()) if e.numel() else 0.0
        worst = max(worst, err / max(scale, 1e-30))
        tol = rtol if rtol is not None else {torch.float64: 1e-9, torch.float32: 1e-4}.get(
            e.dtype, 1e-2)
        if err > tol * max(scale, 1e-30):
            raise FoldCheckError(
                f"fold changed the model's output: max abs error {err:.3e} against max "
                f"|output| {scale:.3e} (allowed relative {tol:g}); a folded pair is not "
                "equivalent here (see foldable_pairs for what fold assumes)"
            )
    return worst


def fold(model: nn.Module, example_input: Any = None) -> nn.Module:
    """An eval-mode copy of ``model`` with BatchNorm folded into the preceding layers.

    Every BatchNorm found by :func:`foldable_pairs` is folded into its layer's weight and bias
    and replaced by ``nn.Identity`` (a :class:`BatchNormAct` by a
    :class:`~batchnorm.nn.act.ResidualActivation` with its activation; the model keeps its class
    and structure); every other
    BatchNorm with running statistics becomes a :class:`~batchnorm.nn.FrozenBatchNorm`
    (``x * scale + shift``). BatchNorm without running statistics (which normalizes with
    batch statistics even in eval) and subclasses with behaviour of their own stay as they
    are. ``model`` itself is not modified. A BatchNorm folded into a ``Linear`` leaves a
    :class:`LinearFoldCheck` that raises on inputs of rank other than 2.

    The result computes the same function as ``model.eval()`` up to floating-point rounding.

    Args:
        model: the model (any mode).
        example_input: optional tensor (or tuple of positional inputs): the folded copy's
            output on it is compared with ``model.eval()``'s, and :class:`FoldCheckError` is
            raised if they differ beyond rounding (:func:`check_fold`).
    """
    folded = copy.deepcopy(model).eval()
    pairs, _ = foldable_pairs(folded)
    for layer_name, bn_name in pairs:
        layer = folded.get_submodule(layer_name)
        _fold_into(layer, folded.get_submodule(bn_name))
        bn = folded.get_submodule(bn_name)
        rest_of_bn: nn.Module = (
            ResidualActivation(bn.activation, bn.negative_slope)
            if isinstance(bn, BatchNormAct) else nn.Identity()
        )
        if isinstance(layer, nn.Linear):
            rest_of_bn = LinearFoldCheck(rest_of_bn)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent_name), child, rest_of_bn)

    rest = [m for m in folded.modules()
            if _foldable_bn(m) and not isinstance(m, FrozenBatchNorm)]
    if rest:
        folded = freeze(folded, rest)
    folded = folded.eval()
    if example_input is not None:
        check_fold(model, folded, example_input)
    return folded
