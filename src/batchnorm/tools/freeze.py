"""Freeze BatchNorm layers for fine-tuning: statistics AND affine fixed, whatever ``train()``
or ``eval()`` says.

Frozen by replacement (torchvision's approach): each selected BatchNorm becomes a
:class:`batchnorm.nn.FrozenBatchNorm` of the same rank whose ``weight``, ``bias`` and running
statistics are buffers. So no optimizer step, ``model.train()`` or forward pass can change
them, and ``model.parameters()`` no longer lists them. The state_dict keeps the same keys less
``num_batches_tracked`` (plus ``weight`` and ``bias``, 1 and 0, for an ``affine=False``
layer; its own checkpoints load into the frozen model as they are). :func:`unfreeze` swaps
in a trainable BatchNorm of the class that was frozen, with the current values (and the
counter it had when frozen).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..nn.act import BatchNormAct
from ..nn.frozen import FrozenBatchNorm, FrozenBatchNormAct
from ._modules import FROZEN_BY_RANK, OURS_BY_RANK, bn_rank, replace_modules, select_names
from ._modules import warn_skipped as _warn_skipped

__all__ = ["freeze", "unfreeze"]

_Selection = Iterable[str | nn.Module] | str | nn.Module | None


def freeze(model: nn.Module, modules: _Selection = None) -> nn.Module:
    """Replace BatchNorm layers with :class:`~batchnorm.nn.FrozenBatchNorm`, in place.

    Args:
        model: any module (a BatchNorm itself is replaced and returned).
        modules: None for every BatchNorm, or modules of ``model`` / their qualified names;
            a container selects every BatchNorm under it (``freeze(model, ["backbone"])``).

    Returns:
        ``model`` (or the new root when ``model`` itself was a BatchNorm).

    Raises:
        KeyError: a name in ``modules`` that is not in ``model``.
        ValueError: a selected BatchNorm without running statistics
            (``track_running_stats=False``), which has nothing to freeze.
    """
    selected = select_names(model, modules)
    skipped: list[str] = []

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, FrozenBatchNorm) or not isinstance(
            module, nn.modules.batchnorm._BatchNorm
        ):
            return None
        if not selected(name, module):
            return None
        known, rank = bn_rank(module)
        frozen_cls: type[FrozenBatchNorm] | None = FROZEN_BY_RANK[rank] if known else None
        if isinstance(module, BatchNormAct):  # keeps its activation and rank check
            frozen_cls = FrozenBatchNormAct
        if frozen_cls is None:
            skipped.append(name or "<root>")
            return None
        try:
            return frozen_cls.from_batchnorm(module)
        except ValueError as exc:
            raise ValueError(f"{name or 'the model'}: {exc}") from None

    result = replace_modules(model, swap)
    _warn_skipped(skipped, "freeze")
    return result


def unfreeze(model: nn.Module, modules: _Selection = None) -> nn.Module:
    """Turn :class:`~batchnorm.nn.FrozenBatchNorm` layers back into trainable BatchNorm, in place.

    A layer made by :func:`freeze` becomes its original class with its original momentum,
    ``affine``, backend and ``num_batches_tracked``, holding the frozen values; any other
    frozen layer becomes :class:`batchnorm.BatchNorm1d/2d/3d` (by its rank) with
    ``momentum=0.1`` and a counter of 0. The training flag follows the frozen module's.

    Args:
        model, modules: as for :func:`freeze`.
    """
    selected = select_names(model, modules)

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, FrozenBatchNorm) or not selected(name, module):
            return None
        return _thaw(module)

    return replace_modules(model, swap)


def _thaw(frozen: FrozenBatchNorm) -> nn.Module:
    cfg = frozen._unfrozen_config or {}
    cls = cfg.get("cls") or OURS_BY_RANK[bn_rank(frozen)[1]]
    affine = cfg.get("affine", True)
    kwargs = {}
    if cfg.get("backend") is not None:
        kwargs["backend"] = cfg["backend"]
    if affine and not cfg.get("bias", True):
        kwargs["bias"] = False
    if "activation" in cfg:  # a frozen BatchNormAct
        kwargs.update(activation=cfg["activation"], negative_slope=cfg["negative_slope"],
                      inplace=cfg["inplace"])
    rm = frozen.running_mean
    bn = cls(
        frozen.num_features,
        eps=frozen.eps,
        momentum=cfg.get("momentum", 0.1),
        affine=affine,
        track_running_stats=True,
        device=rm.device,
        dtype=rm.dtype,
        **kwargs,
    )
    with torch.no_grad():
        bn.running_mean.copy_(frozen.running_mean)
        bn.running_var.copy_(frozen.running_var)
        if bn.weight is not None:
            bn.weight.copy_(frozen.weight)
        if bn.bias is not None:
            bn.bias.copy_(frozen.bias)
        if cfg.get("num_batches_tracked") is not None:
            bn.num_batches_tracked.copy_(cfg["num_batches_tracked"])
    bn.train(frozen.training)
    return bn
