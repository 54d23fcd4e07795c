"""Module plumbing shared by the tools: which modules are BatchNorm, of which rank, how to
rebuild one as another class, and how to swap modules inside a model.

Only the exact classes listed here are treated as BatchNorm by the converters: a subclass
(timm's ``BatchNormAct2d``, say) adds behaviour that swapping the class would silently drop,
which is the known complaint about ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, rebuild_as
from ..nn.frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

__all__ = [
    "bn_config",
    "bn_rank",
    "is_batchnorm",
    "rebuild",
    "replace_modules",
    "select_names",
]

# rank = the "Nd" of the class name; None = any rank (>= 2).
_TORCH_RANK: dict[type, int | None] = {
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
    nn.SyncBatchNorm: None,
}
_OURS_RANK: dict[type, int | None] = {
    BatchNorm1d: 1,
    BatchNorm2d: 2,
    BatchNorm3d: 3,
    BatchNorm: None,
}
FROZEN_BY_RANK: dict[int | None, type[FrozenBatchNorm]] = {
    1: FrozenBatchNorm1d,
    2: FrozenBatchNorm2d,
    3: FrozenBatchNorm3d,
    None: FrozenBatchNorm,
}
OURS_BY_RANK: dict[int | None, type[nn.Module]] = {r: c for c, r in _OURS_RANK.items()}
TORCH_BY_RANK: dict[int | None, type[nn.Module]] = {r: c for c, r in _TORCH_RANK.items()}


def _our_sync_class() -> type | None:
    """``batchnorm.nn.sync.SyncBatchNorm`` when that module is present, else None."""
    try:
        from ..nn.sync import SyncBatchNorm  # type: ignore[import-not-found]
    except ImportError:
        return None
    return SyncBatchNorm


def _rank_table() -> dict[type, int | None]:
    table = {**_TORCH_RANK, **_OURS_RANK}
    sync = _our_sync_class()
    if sync is not None:
        table[sync] = None
    table.update({cls: rank for rank, cls in FROZEN_BY_RANK.items()})
    return table


def is_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm layer of any kind: torch.nn's, ours, a subclass of either, or frozen."""
    return isinstance(module, (_BatchNorm, FrozenBatchNorm))


def bn_rank(module: nn.Module) -> tuple[bool, int | None]:
    """``(known, rank)``: whether ``module``'s exact class is one the converters know, and the
    spatial rank its class is for (1, 2, 3, or None for any rank)."""
    table = _rank_table()
    cls = type(module)
    if cls in table:
        return True, table[cls]
    return False, None


def rebuild(cls: type[nn.Module], bn: nn.Module, **kwargs: Any) -> nn.Module:
    """A new ``cls`` BatchNorm sharing ``bn``'s parameters and buffers; see
    :func:`batchnorm.nn.batchnorm.rebuild_as`."""
    return rebuild_as(cls, bn, **kwargs)


def replace_modules(
    model: nn.Module, fn: Callable[[str, nn.Module], nn.Module | None]
) -> nn.Module:
    """Swap modules in place: ``fn(qualified_name, module)`` returns a replacement or None.

    A module reached twice (shared) is replaced by the same new module both times. Returns the
    model, or the replacement of the root if the root itself was replaced.
    """
    memo: dict[int, nn.Module] = {}

    def visit(module: nn.Module, name: str) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        new = fn(name, module)
        if new is not None:
            memo[id(module)] = new
            return new
        memo[id(module)] = module
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            new_child = visit(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                module._modules[child_name] = new_child
        return module

    return visit(model, "")


def select_names(
    model: nn.Module, modules: Iterable[str | nn.Module] | str | nn.Module | None
) -> Callable[[str, nn.Module], bool]:
    """A predicate ``(name, module) -> bool`` for the modules a tool should touch.

    ``None`` selects everything. Otherwise each entry is a module of ``model`` or the
    qualified name of one; a container selects every module under it (``"layer1"``).

    Raises:
        KeyError: a name that is not a module of ``model``.
    """
    if modules is None:
        return lambda name, module: True
    known = dict(model.named_modules(remove_duplicate=False))
    ids: set[int] = set()
    for entry in [modules] if isinstance(modules, (str, nn.Module)) else modules:
        if isinstance(entry, str):
            if entry not in known:
                raise KeyError(f"{entry!r} is not a module of this model")
            entry = known[entry]
        ids.update(id(m) for m in entry.modules())
    return lambda name, module: id(module) in ids


def warn_skipped(skipped: list[str], what: str) -> None:
    """One warning naming the BatchNorm subclasses a tool left alone."""
    if skipped:
        warnings.warn(
            f"{what}: left {len(skipped)} BatchNorm subclass module(s) unchanged because "
            f"replacing their class would drop their own behaviour: {', '.join(skipped)}",
            stacklevel=3,
        )


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def bn_config(module: nn.Module) -> dict[str, Any]:
    """The configuration of a BatchNorm layer as plain values (what the manifest of
    :func:`batchnorm.save` and the report of :func:`batchnorm.inspect` show).

    A frozen layer reads as ``affine`` and ``track_running_stats`` with no momentum.
    ``rank`` is the spatial rank of the class (None: any rank, or a class the tools do not
    know); ``dtype`` that of the running statistics (else of the weight).
    """
    frozen = isinstance(module, FrozenBatchNorm)
    ref = next((t for t in (getattr(module, "running_mean", None), getattr(module, "weight", None))
                if t is not None), None)
    return {
        "kind": kind_name(module),
        "num_features": int(module.num_features),
        "eps": float(module.eps),
        "momentum": None if frozen or module.momentum is None else float(module.momentum),
        "affine": True if frozen else bool(module.affine),
        "bias": getattr(module, "bias", None) is not None,
        "track_running_stats": True if frozen else bool(module.track_running_stats),
        "frozen": frozen,
        "dtype": None if ref is None else str(ref.dtype).removeprefix("torch."),
        "rank": bn_rank(module)[1],
    }


def kind_name(module: nn.Module) -> str:
    """``"torch.nn.BatchNorm2d"``, ``"batchnorm.FrozenBatchNorm2d"``, or the full path of any
    other class: which implementation a layer is, at a glance."""
    cls = type(module)
    if cls.__module__.startswith("torch.nn."):
        return f"torch.nn.{cls.__name__}"
    if cls.__module__.startswith("batchnorm."):
        return f"batchnorm.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"
