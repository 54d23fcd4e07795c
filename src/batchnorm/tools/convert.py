"""Swap torch.nn BatchNorm layers for ours and back.

:func:`convert` replaces every ``torch.nn.BatchNorm1d/2d/3d`` with
:class:`batchnorm.BatchNorm1d/2d/3d` and ``torch.nn.SyncBatchNorm`` with ours (see below);
:func:`revert` does the reverse. The new module shares the old one's parameters and buffers
(the same tensor objects), so the state_dict, device, dtype, ``requires_grad`` and any
optimizer holding the parameters are unchanged, and ``revert(convert(m))`` is exact. The
training flag, ``eps``, ``momentum``, ``affine`` and ``track_running_stats`` are carried over.

Not carried: hooks registered on the old modules. Subclasses of the BatchNorm classes (timm's
``BatchNormAct2d``, a user's subclass) are left alone with a warning, since swapping their
class would drop their behaviour. A LazyBatchNorm becomes a plain BatchNorm on its first
forward; an unmaterialized one is an error.

``torch.nn.SyncBatchNorm`` (any rank) becomes :class:`batchnorm.SyncBatchNorm` with the same
``process_group``, and back. Our any-rank :class:`batchnorm.BatchNorm` has no torch.nn
counterpart (torch.nn's classes are per rank): :func:`revert` refuses it.
"""

from __future__ import annotations

from torch import nn

from ..backends import AUTO, registered_backends
from ._modules import (
    OURS_BY_RANK,
    TORCH_BY_RANK,
    _our_sync_class,
    bn_rank,
    rebuild,
    replace_modules,
    warn_skipped,
)

__all__ = ["convert", "revert"]

_TORCH_CLASSES = tuple(TORCH_BY_RANK.values())


def convert(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Replace torch.nn BatchNorm layers in ``model`` with this package's, in place.

    Args:
        model: any module (a BatchNorm itself is replaced and returned).
        backend: kernel backend for every BatchNorm of ours in the result (converted or
            already ours); None leaves converted layers on the process default and existing
            ones as they are.

    Returns:
        ``model`` (or the new root when ``model`` itself was a BatchNorm).
    """
    if backend is not None and backend != AUTO and backend not in registered_backends():
        raise ValueError(
            f"unknown backend {backend!r}; expected one of {[AUTO, *registered_backends()]}"
        )
    ours = tuple(OURS_BY_RANK.values())
    sync_cls = _our_sync_class()
    if sync_cls is not None:
        ours = (*ours, sync_cls)
    skipped: list[str] = []

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        cls = type(module)
        if cls in ours:
            if backend is not None:
                module.backend = backend
            return None
        if cls is nn.SyncBatchNorm:
            if sync_cls is None:
                raise ImportError("batchnorm.nn.sync is not available to convert SyncBatchNorm")
            return rebuild(sync_cls, module, process_group=module.process_group,
                           backend=backend)
        if cls in _TORCH_CLASSES:
            return rebuild(OURS_BY_RANK[bn_rank(module)[1]], module, backend=backend)
        if getattr(module, "cls_to_become", None) in _TORCH_CLASSES:
            raise ValueError(
                f"{name or 'the model'} is an unmaterialized {cls.__name__}: run one forward "
                "pass (which makes it a plain BatchNorm) before converting"
            )
        if isinstance(module, _TORCH_CLASSES):
            skipped.append(name or "<root>")
        return None

    result = replace_modules(model, swap)
    warn_skipped(skipped, "convert")
    return result


def revert(model: nn.Module) -> nn.Module:
    """Replace this package's BatchNorm layers in ``model`` with torch.nn's, in place.

    The inverse of :func:`convert`: parameters and buffers are shared, not copied. Frozen
    layers are left as they are (see :func:`batchnorm.unfreeze`).

    Raises:
        TypeError: an any-rank :class:`batchnorm.BatchNorm` that :func:`convert` did not
            create (torch.nn has no any-rank BatchNorm to map it to).
    """
    sync_cls = _our_sync_class()
    skipped: list[str] = []

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        cls = type(module)
        if sync_cls is not None and cls is sync_cls:
            return rebuild(nn.SyncBatchNorm, module, process_group=module.process_group)
        if cls not in OURS_BY_RANK.values():
            if isinstance(module, tuple(OURS_BY_RANK.values())):
                skipped.append(name or "<root>")
            return None
        _, rank = bn_rank(module)
        if rank is None:
            raise TypeError(
                f"cannot revert {name or 'the model'} ({cls.__name__}, any input rank): "
                "torch.nn has no any-rank BatchNorm; use BatchNorm1d/2d/3d, or freeze or fold "
                "the layer instead"
            )
        return rebuild(TORCH_BY_RANK[rank], module)

    result = replace_modules(model, swap)
    warn_skipped(skipped, "revert")
    return result
