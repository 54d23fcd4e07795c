"""Backend registry: name -> implementation, the process default, and the ``"auto"`` policy.

Backends register lazily by module path, so importing :mod:`batchnorm` never imports numba or
triton. A backend whose import fails is reported as unavailable with the reason.

Selection order for one call: the ``backend=`` argument (of the function or module), else the
process default set by :func:`set_backend`, else the ``BATCHNORM_BACKEND`` environment variable,
else ``"auto"``.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .base import Backend

__all__ = [
    "AUTO",
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "eager_front",
    "front_mode",
    "get_backend",
    "get_default_backend",
    "registered_backends",
    "resolve_backend",
    "set_backend",
    "usable_front",
]

AUTO = "auto"

# name -> "module:Class". Order matters only for listing.
_REGISTRY: dict[str, str] = {
    "torch": "batchnorm.backends.torch_backend:TorchBackend",
    "native": "batchnorm.backends.native:NativeBackend",
    "numba": "batchnorm.backends.numba_backend:NumbaBackend",
    "triton": "batchnorm.backends.triton_backend:TritonBackend",
}

# "auto": first backend in this list that is available, supports the input and prefers it.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("numba", "native", "torch"),
    "cuda": ("triton", "native", "torch"),
}
_AUTO_FALLBACK: tuple[str, ...] = ("native", "torch")

_instances: dict[str, Backend] = {}
_failures: dict[str, str] = {}
_lock = threading.Lock()
_default: str | None = None


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not installed, or not for this input)."""


def registered_backends() -> list[str]:
    """Every backend name the registry knows, available here or not."""
    return list(_REGISTRY)


def _load(name: str) -> Backend | None:
    """Instantiate a backend once; remember why it failed if it did."""
    if name in _instances:
        return _instances[name]
    if name in _failures:
        return None
    with _lock:
        if name in _instances or name in _failures:
            return _instances.get(name)
        module_name, cls_name = _REGISTRY[name].split(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
            inst: Backend = cls()
            ok, why = inst.is_available()
        except ImportError as exc:  # optional dependency missing
            ok, why, inst = False, f"{type(exc).__name__}: {exc}", None  # type: ignore[assignment]
        if not ok:
            _failures[name] = why
            return None
        _instances[name] = inst
        return inst


# torch.compile runs it once while tracing and keeps the answer as a constant: loading a
# backend (imports, a lock) cannot be traced, and once loaded (or failed) the answer never
# changes. Everything else about the choice (the default, the input's device, dtype, layout
# and size) stays traced, so the compiled graph's guards follow it. While tracing, every
# backend is loaded at once: the tracer snapshots ``_instances`` when traced code first reads
# it, and would not see a backend loaded later in the same trace.
@torch.compiler.assume_constant_result
def _loaded(name: str) -> bool:
    """Whether backend ``name`` can run in this process (loaded on first use)."""
    if torch.compiler.is_compiling():
        for other in _REGISTRY:
            _load(other)
    return _load(name) is not None


def _check_name(name: str) -> None:
    if name != AUTO and name not in _REGISTRY:
        raise ValueError(
            f"unknown backend {name!r}; expected one of {[AUTO, *_REGISTRY]}"
        )


def get_backend(name: str) -> Backend:
    """The backend instance for a concrete name (not ``"auto"``).

    Raises:
        ValueError: unknown name.
        BackendUnavailableError: known but not usable in this process (with the reason).
    """
    _check_name(name)
    if name == AUTO:
        raise ValueError("get_backend needs a concrete backend name; use resolve_backend()")
    if not _loaded(name):
        raise BackendUnavailableError(
            f"backend {name!r} is not available here: {_failures.get(name, 'unknown reason')}"
        )
    return _instances[name]


def available_backends() -> list[str]:
    """Names of the backends that can run in this process (any device)."""
    return [n for n in _REGISTRY if _load(n) is not None]


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` goes back to the environment/``auto``)."""
    global _default
    if name is not None:
        _check_name(name)
    _default = name


def get_default_backend() -> str:
    """The process default: :func:`set_backend`, else ``$BATCHNORM_BACKEND``, else ``"auto"``."""
    if _default is not None:  # (set_backend checked it)
        return _default
    name = _default_name()
    _check_name(name)
    return name


def _default_name() -> str:
    """:func:`get_default_backend` without checking the environment's name."""
    if _default is not None:
        return _default
    return os.environ.get("BATCHNORM_BACKEND", "").strip() or AUTO


# A backend's entry for a whole eager CPU call, checks included ("fn": the numba backend's C++
# step, numba_step.cpp's front(), which documents what it takes), set once it is built, and
# the name of the backend it runs ("name"). The functional API and the modules try it first.
eager_front: dict[str, Any] = {"fn": None, "name": ""}


def set_eager_front(name: str, fn: Callable[..., Any] | None) -> None:
    """Install (or with None remove) backend ``name``'s :data:`eager_front`."""
    eager_front["name"] = name
    eager_front["fn"] = fn


def usable_front() -> Callable[..., Any] | None:
    """:data:`eager_front`'s function where a call may try it now, else None: not while
    torch.compile traces the call, nor under forward-mode AD (both need the op layer's
    Python path), nor before the backend has installed it."""
    if torch.compiler.is_compiling() or forward_ad._current_level >= 0:
        return None
    return eager_front["fn"]


def front_mode(name: str | None) -> int:
    """How a call's ``backend`` argument resolves for :data:`eager_front`, cheaply: 1 where
    it names the front's backend (by the argument or the process default), 2 for ``"auto"``
    where ``"auto"`` would try that backend first on CPU (the front then checks that it also
    prefers the input), 0 otherwise (the front does not take the call)."""
    # (the default unchecked: an unknown name gives 0 here, and the Python path raises for it
    # in its own order)
    chosen = name if name is not None else _default_name()
    if chosen == eager_front["name"]:
        return 1
    if chosen == AUTO and _AUTO_ORDER["cpu"][0] == eager_front["name"]:
        return 2
    return 0


def resolve_backend(name: str | None, x: Tensor, training: bool = True) -> str:
    """The concrete backend that will run ``x``.

    ``None`` means the process default. ``"auto"`` takes, per device type, the first backend
    that is available, supports the input and prefers it (fused kernels where they are faster,
    ATen otherwise, the composite path as the last resort). An explicit name that cannot run
    ``x`` raises :class:`BackendUnavailableError` saying why, rather than silently falling back.
    """
    chosen = get_default_backend() if name is None else name
    _check_name(chosen)
    if chosen != AUTO:
        inst = get_backend(chosen)
        why = inst.supports(x)
        if why is not None:
            raise BackendUnavailableError(why)
        return chosen
    for cand in _AUTO_ORDER.get(x.device.type, _AUTO_FALLBACK):
        inst = _instances[cand] if _loaded(cand) else None
        if inst is not None and inst.supports(x) is None and inst.preferred_for(x, training):
            return cand
    return "torch"
