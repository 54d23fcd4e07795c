"""Recycled output buffers for the CPU kernels (the ``"numba"`` backend).

Why: a BatchNorm output of a few MB comes from glibc's heap, which gives memory back to the
kernel whenever the free space at its top exceeds the trim threshold (and maps larger blocks
fresh on every call). The next output of the same size is then made of fresh pages, and
faulting them in 4 KiB pages costs more than the kernel that writes them: a training step of
``(32, 256, 14, 14)`` float32 on this project's 2-core VM took 8.5 ms with 2100 page faults per
step and 2.8 ms with none, for a 1.9 ms kernel (``benchmarks/RESULTS.md``). ATen's outputs pay the
same; a caching allocator (jemalloc, tcmalloc) is the usual cure, and this is a small one for
our own outputs.

How: a pool of storages keyed by size in bytes. A storage is free when the pool holds the
only reference to it: every tensor, view, NumPy array or saved-for-backward tensor made from
an output keeps a reference to its storage (torch's storage use count), and a Python storage
object from ``untyped_storage()`` is the pool's own object (its Python reference count), so
a buffer is never handed out while anything can still read or write it. :func:`new_storage`
returns the free storage of the asked size that was handed out most recently (the likeliest
to be in cache, as a recently freed heap block would be), else a new one, which the pool
keeps while its total stays within the limit; beyond it, least recently used free storages
are dropped to make room, and failing that the output is a plain, uncached allocation.

Memory: the pool holds at most ``BATCHNORM_NUMBA_OUTPUT_CACHE_MB`` (default 1024; 0 turns the
pool off) and only outputs of at least 1 MiB; it grows only while that many bytes of outputs
are alive at once, so in a training loop it stays within the step's own peak. Its free
buffers stay mapped until :func:`empty_cache` (or process exit), as with PyTorch's CUDA caching
allocator.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["MIN_BYTES", "cached_bytes", "empty_cache", "limit_bytes", "new_storage"]

MIN_BYTES = 1 << 20


def _limit_from_env() -> int:
    raw = os.environ.get("BATCHNORM_NUMBA_OUTPUT_CACHE_MB", "").strip()
    if not raw:
        return 1024 << 20
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise ValueError(
            f"BATCHNORM_NUMBA_OUTPUT_CACHE_MB must be a non-negative number of MiB, got {raw!r}")
    return int(mb * (1 << 20))


# torch's count of references to a storage from C++ (tensors, views, saved tensors). Private
# API: without it the pool stays off rather than guessing.
_USE_COUNT: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)


def _py_refs(entry: list) -> int:
    return sys.getrefcount(entry[0])


# What _py_refs reports when only a pool entry holds the storage object (the entry and the
# call's own argument on the interpreters this was written on; measured, not assumed, since
# newer interpreters borrow some references without counting them).
_ALONE = _py_refs([torch.UntypedStorage(0), 0])


def _is_free(entry: list) -> bool:
    """Whether only the pool can reach ``entry[0]``: no tensor uses the storage (C++ count 1,
    the pool's Python object) and no one else holds that Python object, which torch hands
    back from ``tensor.untyped_storage()`` (one Python object per storage) without counting
    it in C++."""
    assert _USE_COUNT is not None
    return _USE_COUNT(entry[0]._cdata) == 1 and _py_refs(entry) == _ALONE


class _Pool:
    """Storages by size; an entry is ``[storage, tick of its last hand-out, data pointer]``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self.by_size: dict[int, list[list]] = {}  # least recently handed out first
        self.total = 0
        self.tick = 0

    def take(self, nbytes: int) -> torch.UntypedStorage | None:
        """The most recently handed out free storage of ``nbytes``, or None."""
        entries = self.by_size.get(nbytes)
        if not entries:
            return None
        for i in range(len(entries) - 1, -1, -1):
            entry = entries[i]
            if not _is_free(entry):
                continue
            del entries[i]
            st = entry[0]
            if st.nbytes() != nbytes or st.data_ptr() != entry[2] or st.is_shared():
                # resized through a tensor, or moved to shared memory to be sent to another
                # process (torch.multiprocessing), which may still read it: not ours any more
                self.total -= nbytes
                continue
            entries.append(entry)
            self.tick += 1
            entry[1] = self.tick
            return st
        if not entries:
            del self.by_size[nbytes]
        return None

    def make_room(self, nbytes: int) -> bool:
        """Drop least recently used free storages until ``nbytes`` more fit the limit; drop
        nothing when even dropping every free one would not make it fit."""
        if self.total + nbytes <= self.limit:
            return True
        free = sorted((entry[1], size, entry) for size, entries in self.by_size.items()
                      for entry in entries if _is_free(entry))
        if self.total - sum(size for _, size, _ in free) + nbytes > self.limit:
            return False
        for _, size, entry in free:
            if self.total + nbytes <= self.limit:
                break
            entries = self.by_size[size]
            entries.remove(entry)
            if not entries:
                del self.by_size[size]
            self.total -= size
        return True

    def add(self, st: torch.UntypedStorage, nbytes: int) -> None:
        self.tick += 1
        self.by_size.setdefault(nbytes, []).append([st, self.tick, st.data_ptr()])
        self.total += nbytes

    def clear(self) -> None:
        """Forget every free storage (those in use stay alive with their tensors)."""
        for size in list(self.by_size):
            keep = [entry for entry in self.by_size[size] if not _is_free(entry)]
            self.total -= size * (len(self.by_size[size]) - len(keep))
            if keep:
                self.by_size[size] = keep
            else:
                del self.by_size[size]


_POOL = _Pool(_limit_from_env())


def limit_bytes() -> int:
    """The pool's limit in bytes (0 when recycling is off)."""
    return _POOL.limit if _USE_COUNT is not None else 0


def _step_pool() -> Any:
    """The C++ step's own pool (:mod:`.numba_step`), when that module is loaded."""
    return sys.modules.get(f"{__package__}.numba_step")


def cached_bytes() -> int:
    """Bytes the pool holds, free and in use (the C++ step's pool included)."""
    step = _step_pool()
    return _POOL.total + (0 if step is None else step.pool_bytes())


def empty_cache() -> None:
    """Release the pool's free buffers to the allocator (those in use are kept until their
    tensors die, then forgotten); the C++ step's pool too."""
    with _POOL.lock:
        _POOL.clear()
    step = _step_pool()
    if step is not None:
        step.empty_pool()


def new_storage(nbytes: int, on_new: Callable[[torch.UntypedStorage], None] | None = None
                ) -> torch.UntypedStorage:
    """A storage of ``nbytes`` for an output.

    A recycled storage comes from the pool (its memory already mapped and faulted in);
    otherwise a new one is allocated, ``on_new`` is called on it (to advise huge pages, say),
    and the pool keeps it when it fits the limit. Outputs below :data:`MIN_BYTES` are never
    pooled (glibc's free lists reuse those without page faults).
    """
    pooled = _USE_COUNT is not None and _POOL.limit > 0 and nbytes >= MIN_BYTES
    if pooled:
        with _POOL.lock:
            st = _POOL.take(nbytes)
            if st is not None:
                return st
    st = torch.UntypedStorage(nbytes)
    if on_new is not None:
        on_new(st)
    if pooled:
        with _POOL.lock:
            if _POOL.make_room(nbytes):
                _POOL.add(st, nbytes)
    return st


def _reset_after_fork() -> None:
    # another thread may have held the lock at the fork, and would never release it here
    global _POOL
    _POOL = _Pool(_POOL.limit)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
