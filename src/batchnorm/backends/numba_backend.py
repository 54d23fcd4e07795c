"""The ``"numba"`` backend: fused, parallel CPU kernels (see :mod:`.numba_kernels`).

Training forward (statistics, running update, normalization), eval forward and the backward
(reduction and input gradient, each output only when asked for) each run one compiled kernel.
Channels-first inputs take a single parallel phase: every task reduces a block of channels and
normalizes it while it is still in cache. Channels-last inputs need every row reduced before
any is normalized, so their kernel runs in three phases (chunk partials, merge, elementwise).
The four primitives that SyncBatchNorm composes are the same kernels with parts switched off.

Inputs are read in place through ``.numpy()`` views: channels-first contiguous tensors as
``(N, C, S)``, channels-last ones (NHWC, NDHWC) and 2-D ``(N, C)`` as ``(rows, C)``. Any other
strides are copied once, on purpose, to channels-first (:func:`~.base.as_kernel_layout`).
float16 and bfloat16 are passed as their bit patterns (uint16 / int16 arrays) and computed in
float32; statistics are float32 (float64 for float64 input), as everywhere in this package.

Outputs of ``_STREAM_MIN_BYTES`` (16 MiB, ``$BATCHNORM_NUMBA_STREAM_MIN_BYTES``) and more are
written with non-temporal stores, which skip the read-for-ownership a plain store makes of
every line it writes: one memory transfer per output element instead of two (the backward's
dx only when its pass re-reads x and dy from cache, see ``_streamed``). Smaller outputs keep
plain stores, so that the next layer finds them in the caches.

Outputs of 1 MiB and more are recycled (:mod:`.cpu_outputs`): a buffer nothing references any
more is handed out again instead of fresh memory from the allocator, whose pages would be
faulted in on every call.

Threads: a call runs on ``torch.get_num_threads()`` threads (the caller plus workers of a
small pool, at most 63; one thread below 64K elements). The kernels release the GIL; a worker
polls for its next job (without the GIL) for well under a millisecond after each one, which
halves the hand-off between a call's phases, then blocks on a queue, so idle workers do not
compete with torch's OpenMP pool; numba's own threading layer (a second OpenMP runtime here)
is not used. The threads of a call claim its tasks one at a time from shared counters, so a
thread that starts late (its core still busy with torch's spinning OpenMP threads after an ATen
op) takes fewer tasks instead of holding the call up.
Work is cut by the shape only, never by the thread count or by which thread runs a task, so
results do not depend on either.

Compiled code is cached on disk (numba's ``cache=True``: next to the module, or in the user's
cache directory when the package is read-only, or not at all when neither is writable); a
cold first call compiles for several seconds per storage dtype, which ``batchnorm bench``
reports.
"""

from __future__ import annotations

import atexit
import ctypes
import math
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import cpu_outputs
from .base import (
    ForwardResult,
    acc_dtype,
    as_kernel_layout,
    empty_out_like,
    layout_of,
    out_strides,
)
from .numba_act import NumbaActMixin
from .torch_backend import TorchBackend

__all__ = ["NumbaBackend"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Channels-first: a task's channel block spans _BLOCK_ELEMS contiguous elements of each batch
# row, at least _BLOCK_ELEMS_MIN where _TASK_ELEMS allows, and at most _TASK_ELEMS in all
# (so that the second pass finds them in cache). Short pieces at a large stride stream poorly
# from memory: one thread summing (32, 256, 28, 28) float32 in blocks of 1, 4, 8, 16 and 32
# channels (3, 12.5, 25, 50, 100 KB pieces) read 15, 20, 32, 37 and 41 GB/s on this project's
# VM. With fewer than _MIN_TASKS blocks the batch is split too (a second read of x, from L3
# when the input fits there: inputs above _SPLIT_MAX_BYTES keep _MIN_TASKS blocks, with
# shorter pieces).
_BLOCK_ELEMS = 16384
_BLOCK_ELEMS_MIN = 4096
_TASK_ELEMS = 1 << 20
_MIN_TASKS = 16
_SPLIT_MAX_BYTES = 1 << 24
# Channels-last (and elementwise-only channels-first): chunks of at least _CHUNK_ELEMS values
# (a chunk costs a few allocations and 2 C partials) and at most _MAX_CHUNKS of them.
_CHUNK_ELEMS = 1 << 16
_MAX_CHUNKS = 64
# Below this many elements one thread does the whole job (waking a worker costs more).
_PARALLEL_MIN_NUMEL = 1 << 16
# Merging per-part partials runs on several threads from this many (channels x parts) on.
_PARALLEL_MERGE = 1 << 14
# Newly allocated outputs from this size on are advised to use huge pages (_advise_huge).
_HUGE_MIN_BYTES = 1 << 23
# Outputs from this size on are written with non-temporal (streaming) stores, which skip the
# read a plain store makes of every line it writes into. Below it, the output is likely to
# be read again from the caches by the next layer (or by our own backward), which streaming
# would evict. The 25 MB (32, 256, 28, 28) float32 forward on this project's 2-core VM, one
# thread: 3.4 ms plain, see benchmarks/RESULTS.md for the streamed figures.
def _env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer (bytes), got {raw!r}")
    return value


_STREAM_MIN_BYTES = _env_bytes("BATCHNORM_NUMBA_STREAM_MIN_BYTES", 1 << 24)
# "auto" picks numba for training from this many elements on (measured crossover, see
# preferred_for); channels-first and channels-last differ.
_AUTO_MIN_NUMEL_CF = 1 << 17
_AUTO_MIN_NUMEL_CL = 1 << 20


def _kernels() -> Any:
    from . import numba_kernels

    return numba_kernels


def _np(t: Tensor) -> np.ndarray:
    """A zero-copy NumPy view of a CPU tensor; half types as their bit patterns."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    if t.dtype == torch.float16:
        return t.numpy().view(np.uint16)
    return t.numpy()


_NONE = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}


def _vec(t: Tensor | None, acc: torch.dtype) -> np.ndarray:
    """A per-channel vector in the accumulation dtype (size 0 for None)."""
    if t is None:
        return _NONE[acc]
    t = t.detach()
    return (t if t.dtype == acc else t.to(acc)).numpy()


def _madvise_setup() -> Callable[[int, int, int], int] | None:
    """libc's madvise where transparent huge pages can be asked for (Linux), else None;
    ``BATCHNORM_NUMBA_HUGEPAGES=0`` turns it off."""
    if os.environ.get("BATCHNORM_NUMBA_HUGEPAGES", "1") == "0" or not sys.platform.startswith(
            "linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise_setup()
_MADV_HUGEPAGE = 14
_HUGE = 1 << 21


def _streamed(t: Tensor | None, view: _View | None = None) -> bool:
    """Whether the kernels write ``t`` with non-temporal stores. For a backward ``view``:
    only when its elementwise pass re-reads x and dy from the caches (one phase). With two
    input streams from memory, non-temporal stores measured slower than plain ones here
    (channels-last (32, 256, 28, 28): 3.1 vs 2.6 ms), while one input stream gains (the
    forward's: 1.35 vs 2.0 ms)."""
    if t is None or t.numel() * t.element_size() < _STREAM_MIN_BYTES:
        return False
    return view is None or view.parts == 1


def _advise_huge(ptr: int, nbytes: int) -> None:
    """Advise ``nbytes`` of fresh memory at ``ptr`` to use 2 MiB pages (from
    ``_HUGE_MIN_BYTES`` on). Faulting in tens of MB in 4 KiB pages costs about as much as the
    kernel that writes them on the machines this was measured on; with transparent huge pages
    in ``madvise`` mode (a common default) the advice makes that 512 times fewer faults.
    Advice only: nothing changes if the kernel ignores it."""
    if _MADVISE is None or nbytes < _HUGE_MIN_BYTES:
        return
    start = (ptr + _HUGE - 1) & ~(_HUGE - 1)
    end = (ptr + nbytes) & ~(_HUGE - 1)
    if end > start:
        _MADVISE(start, end - start, _MADV_HUGEPAGE)


def _new_output(x: Tensor) -> Tensor:
    """An uninitialized output like ``x`` (:func:`~.base.empty_out_like` layout), from the
    recycled buffers of :mod:`.cpu_outputs` from 1 MiB on; a newly allocated large one is
    advised to use huge pages (``_advise_huge``)."""
    nbytes = x.numel() * x.element_size()
    if nbytes < cpu_outputs.MIN_BYTES:
        return empty_out_like(x)
    st = cpu_outputs.new_storage(nbytes, lambda s: _advise_huge(s.data_ptr(), nbytes))
    return torch.empty(0, dtype=x.dtype).set_(st, 0, x.shape, out_strides(x))


class _View:
    """How the kernels see one input, from its shape, layout and element size only (never
    the thread count, so that results do not depend on it).

    The memory is a C-contiguous ``(n, c, s)``: channels first as ``(N, C, S)``, channels last
    (and any input with ``S == 1``) as rows ``(R, C, 1)``. Tasks are ``blocks`` channel blocks
    x ``parts`` batch ranges.

    * Channels last: one block, the rows cut into chunks of at least ``_CHUNK_ELEMS`` values
      (each chunk's partials cost 2 C values).
    * Channels first with a reduction: a block spans about ``_BLOCK_ELEMS`` contiguous
      values of each batch row, so that memory streams in long pieces, and when possible at
      most ``_TASK_ELEMS`` values in all, so that the second pass finds the block in cache;
      the batch is split when there are fewer than ``_MIN_TASKS`` blocks, which inputs above
      ``_SPLIT_MAX_BYTES`` avoid with shorter pieces (down to ``_BLOCK_ELEMS_MIN``).
    * Channels first, elementwise only (eval, the apply primitives): batch ranges first, so
      that each task is one contiguous piece of memory.
    """

    __slots__ = ("blocks", "channels_last", "dims", "parts")

    def __init__(self, x: Tensor, reduce: bool = True) -> None:
        n, c = x.shape[0], x.shape[1]
        s = x.numel() // (n * c)
        self.channels_last = layout_of(x) == "cl"
        if self.channels_last or s == 1:
            rows = n * s
            self.dims, self.blocks = (rows, c, 1), 1
            self.parts = max(1, min(_MAX_CHUNKS, rows, rows * c // _CHUNK_ELEMS))
        elif not reduce:
            self.dims = (n, c, s)
            self.parts = max(1, min(n, _MAX_CHUNKS, n * c * s // _CHUNK_ELEMS))
            self.blocks = min(c, math.ceil(_MIN_TASKS / self.parts))
        else:
            self.dims = (n, c, s)
            per_block = math.ceil(_BLOCK_ELEMS / s)
            if x.numel() * x.element_size() > _SPLIT_MAX_BYTES:
                per_block = max(math.ceil(_BLOCK_ELEMS_MIN / s),
                                min(per_block, c // _MIN_TASKS))
            per_block = min(per_block, max(1, _TASK_ELEMS // (n * s)))
            self.blocks = math.ceil(c / min(c, per_block))
            self.parts = 1
            if self.blocks < _MIN_TASKS:
                self.parts = max(1, min(n, math.ceil(_MIN_TASKS / self.blocks)))

    @property
    def tasks(self) -> int:
        return self.blocks * self.parts

    def of(self, t: Tensor) -> np.ndarray:
        """``t`` (same shape and layout as the input) as the kernel's flat array; ``view``
        (not ``reshape``) so that an output can never silently become a copy."""
        if self.channels_last:
            t = t.permute(0, *range(2, t.dim()), 1)
        return _np(t.view(-1))

    def args(self) -> tuple[int, int, int, int, int]:
        return (*self.dims, self.blocks, self.parts)

    def partials(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 scratch for per-part statistics or sums, (parts, C)."""
        shape = (self.parts, self.dims[1])
        return np.empty(shape), np.empty(shape)


# Hand-off between the caller and the pool's workers. A blocked thread takes tens of us to
# wake on the VMs this was measured on (a Python queue ping-pong between two threads: 55 us
# median), so a worker that finishes a job polls, without the GIL, for the next one for
# _WORKER_SPIN polls (well under a millisecond) before it blocks on its queue, and the caller
# polls for the call's completion for up to _CALLER_SPIN polls between checks for a worker's
# error. BATCHNORM_NUMBA_SPIN=0 turns polling off (workers then never spin).
_SPIN = os.environ.get("BATCHNORM_NUMBA_SPIN", "1").strip() != "0"
_WORKER_SPIN = 1 << 18 if _SPIN else 0
_CALLER_SPIN = 1 << 22 if _SPIN else 0
_SLOT = 8  # int64 values per cache line: each flag has a line of its own
_MAX_THREADS = 64


class _Pool:
    """Persistent worker threads that share the units of one GIL-free kernel call.

    Every thread of a call (the caller and up to ``nthreads - 1`` workers) runs the same
    ``fn(*args, 0, units, ctl)``; the kernel claims units one at a time from counters in
    ``ctl`` (see ``numba_kernels._claim``) and counts those it finishes, and the caller
    returns once all are counted. So the call never waits for a worker that has not started:
    a worker that is late (torch's OpenMP threads still spinning on the other cores after an
    ATen op, which made 2-thread calls up to twice as slow as 1-thread ones when each worker
    had a fixed share) finds fewer units left, or none. A late worker's job holds references
    to every array it touches, so finishing after the call has returned is safe.

    Idle workers poll briefly after a job (``_WORKER_SPIN``), then block on a queue, so they
    do not compete with torch's OpenMP threads between calls. If another thread is using the
    pool, the call runs serially in its own thread. ``_flags[0]`` (int64) is the sequence
    number of the last job posted, which polling workers watch.

    A worker's exception reaches the caller when it arrives while the call waits (a unit the
    worker claimed and did not finish keeps the call waiting for it); one that arrives after
    the call is complete, from a worker that failed before claiming anything, is dropped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: list[queue.SimpleQueue] = []
        self._reports: queue.SimpleQueue = queue.SimpleQueue()  # (seq, exception or None)
        self._flags = np.zeros(_SLOT, dtype=np.int64)
        self._seq = 0
        self._threads: list[threading.Thread] = []
        self._closed = False

    def _work(self, jobs: queue.SimpleQueue) -> None:
        last = 0
        while True:
            if _WORKER_SPIN:
                try:  # polling is an optimization: a failure must not kill the worker
                    _kernels().spin_until(self._flags, 0, 0, 1, last + 1, _WORKER_SPIN)
                except Exception:
                    pass
            item = jobs.get()
            if item is None:  # close()
                return
            fn, args, seq = item
            result: BaseException | None = None
            try:
                fn(*args)
            except BaseException as exc:  # handed to the caller, if it still waits
                result = exc
            # drop the job's references now: they keep the call's arrays (and so its recycled
            # outputs) alive, which an idle worker must not do until its next job
            del fn, args
            self._reports.put((seq, result))  # also wakes a caller that does not poll
            last = seq

    def run(self, fn: Callable[..., None], args: tuple, units: int, nthreads: int) -> None:
        """``fn(*args, 0, units, ctl)`` on up to ``nthreads`` threads sharing ``ctl``."""
        k = _kernels()
        ctl = np.zeros(k.CTL_SIZE, dtype=np.int64)
        p = min(nthreads, units, _MAX_THREADS)
        if p <= 1 or self._closed or not self._lock.acquire(blocking=False):
            fn(*args, 0, units, ctl)
            return
        try:
            while not self._reports.empty():  # from calls that finished without them
                self._reports.get_nowait()
            while len(self._jobs) < p - 1:
                if not self._jobs and (_CALLER_SPIN or _WORKER_SPIN):
                    try:  # compile (or load) the poll once, before any worker needs it
                        _kernels().spin_until(self._flags, 0, 0, 1, 0, 1)
                    except Exception:  # polling is an optimization; workers cope without
                        pass
                jobs: queue.SimpleQueue = queue.SimpleQueue()
                thread = threading.Thread(target=self._work, args=(jobs,), daemon=True,
                                          name=f"batchnorm-numba-{len(self._jobs) + 1}")
                thread.start()
                self._threads.append(thread)
                self._jobs.append(jobs)
            self._seq += 1
            seq = self._seq
            job = (*args, 0, units, ctl)
            for i in range(p - 1):
                self._jobs[i].put((fn, job, seq))
            self._flags[0] = seq  # after the puts: a polling worker then finds its job
            fn(*job)
            done = k.CTL_DONE
            if (ctl[done] < units and _CALLER_SPIN
                    and k.spin_until(ctl, done, 0, 1, units, _CALLER_SPIN)):
                return
            while ctl[done] < units:  # a worker is still in a unit: block on reports
                try:  # a worker's report: it finished (re-check the count) or failed
                    got, exc = self._reports.get(timeout=0.001)
                except queue.Empty:
                    continue
                if got == seq and exc is not None:
                    raise exc
        finally:
            self._lock.release()


    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers and wait for them (calls after this run on the calling thread).

        Run at interpreter exit: a daemon thread that comes back from a GIL-free numba call
        while Python finalizes is stopped inside numba's C++ dispatcher, and that aborts the
        process ("terminate called without an active exception"); a worker may still be in
        a late share of a finished call, or polling, at that moment.
        """
        got = self._lock.acquire(timeout=timeout)
        try:
            self._closed = True
            for jobs in self._jobs:
                jobs.put(None)
            self._flags[0] = 1 << 62  # ends every worker's poll
            for thread in self._threads:
                thread.join(timeout)
        finally:
            if got:
                self._lock.release()


_POOL = _Pool()


def _close_pool() -> None:
    _POOL.close()


atexit.register(_close_pool)


def _reset_pool_after_fork() -> None:
    global _POOL
    _POOL = _Pool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool_after_fork)


def _threads(x: Tensor) -> int:
    """Threads for one call: torch's setting (one for small inputs)."""
    return 1 if x.numel() < _PARALLEL_MIN_NUMEL else max(1, torch.get_num_threads())


def _launch(kernel: Callable[..., None], args: tuple, view: _View, x: Tensor,
            reduce: bool, apply: bool) -> None:
    """Run a kernel's phases: one (each task holds whole channels), or reduce -> merge ->
    apply."""
    nthreads = _threads(x)
    if view.parts == 1:
        _POOL.run(kernel, (*args, 0), view.tasks, nthreads)
        return
    if reduce:
        _POOL.run(kernel, (*args, 0), view.tasks, nthreads)
    # merging partials is per channel: in parallel too when there is enough of it
    c = x.shape[1]
    _POOL.run(kernel, (*args, 1), -(-c // _kernels().MERGE_CHUNK),
              nthreads if c * view.parts >= _PARALLEL_MERGE else 1)
    if apply:
        _POOL.run(kernel, (*args, 2), view.tasks, nthreads)


class NumbaBackend(NumbaActMixin, TorchBackend):
    """Fused numba kernels for CPU tensors of float16/bfloat16/float32/float64."""

    name = "numba"
    device_types = ("cpu",)

    def is_available(self) -> tuple[bool, str]:
        try:
            _kernels()
        except ImportError as exc:
            return False, f"numba is not installed ({exc}); pip install 'batchnorm[numba]'"
        return True, ""

    def supports(self, x: Tensor) -> str | None:
        why = super().supports(x)
        if why is None and x.dtype not in _DTYPES:
            why = f"backend 'numba' supports float16/bfloat16/float32/float64, got {x.dtype}"
        return why

    def new_output(self, x: Tensor) -> Tensor:
        return _new_output(x)

    def preferred_for(self, x: Tensor, training: bool) -> bool:
        """Training on inputs large enough for the fused kernels to beat ATen
        (``batchnorm bench --crossover``): from about 128K elements channels-first, 1M
        channels-last. Below, the fixed cost of a call (about 50 us of Python) dominates. Eval
        is a single elementwise pass that ATen already runs at copy speed: it stays native."""
        if not training or x.dtype not in _DTYPES:
            return False
        limit = _AUTO_MIN_NUMEL_CL if layout_of(x) == "cl" else _AUTO_MIN_NUMEL_CF
        return x.numel() >= limit

    # ---- the two kernels behind everything ------------------------------------------------
    def _forward(
        self,
        x: Tensor,
        *,
        mean: Tensor | None = None,
        invstd: Tensor | None = None,
        var: Tensor | None = None,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        running: tuple[Tensor, Tensor] | None = None,
        momentum: float = 0.0,
        eps: float = 0.0,
        apply: bool = True,
    ) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """One forward kernel call. Statistics are computed when ``mean`` is None, else
        ``mean`` with ``invstd`` (or ``var`` and ``eps``) normalize.

        Returns ``(y or None, mean, m2, invstd, new_running_mean, new_running_var)`` (the
        running pair in the accumulation dtype, None when not tracked).
        """
        x = as_kernel_layout(x)
        do_stats = mean is None
        view = _View(x, reduce=do_stats)
        acc = acc_dtype(x)
        c = x.shape[1]
        none = _NONE[acc]
        y = _new_output(x) if apply else None
        m2 = torch.empty(c, dtype=acc)
        if do_stats:
            mean, invstd = torch.empty(c, dtype=acc), torch.empty(c, dtype=acc)
        elif invstd is None:
            invstd = torch.empty(0, dtype=acc)
        assert mean is not None and invstd is not None
        mean, invstd = mean.to(acc), invstd.to(acc)
        new_rm = new_rv = None
        rm = rv = nrm = nrv = none
        if running is not None:
            rm, rv = _vec(running[0], acc), _vec(running[1], acc)
            new_rm, new_rv = torch.empty(c, dtype=acc), torch.empty(c, dtype=acc)
            nrm, nrv = new_rm.numpy(), new_rv.numpy()
        kernel = _kernels().forward
        args = (
            view.of(x), view.of(y if y is not None else x), *view.args(), mean.numpy(),
            m2.numpy(), invstd.numpy(), _vec(var, acc), _vec(weight, acc), _vec(bias, acc), rm,
            rv, nrm, nrv, float(eps), float(momentum), do_stats, apply, _streamed(y),
            *view.partials(),
            np.empty((3, c), dtype=none.dtype),
        )
        _launch(kernel, args, view, x, do_stats, apply)
        return y, mean, m2, invstd, new_rm, new_rv

    def _backward(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        *,
        sums: tuple[Tensor, Tensor] | None = None,
        count: int = 0,
        training: bool = True,
        apply: bool = True,
        dweight: bool = False,
    ) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
        """One backward kernel call: the sums are computed when ``sums`` is None.

        Returns ``(dx or None, sum_dy, sum_dy_xmu, dweight or None)``.
        """
        x = as_kernel_layout(x)
        if dy.stride() != x.stride():
            dy = empty_out_like(x).copy_(dy)
        do_reduce = sums is None
        view = _View(x, reduce=do_reduce)
        acc = acc_dtype(x)
        c = x.shape[1]
        if sums is None:
            sums = (torch.empty(c, dtype=acc), torch.empty(c, dtype=acc))
        sum_dy, sum_dy_xmu = sums[0].to(acc), sums[1].to(acc)
        dx = _new_output(x) if apply else None
        dw = torch.empty(c, dtype=acc) if dweight else None
        kernel = _kernels().backward
        none = _NONE[acc]
        args = (
            view.of(dy), view.of(x), view.of(dx if dx is not None else x), *view.args(),
            _vec(mean, acc), _vec(invstd, acc), _vec(weight, acc), sum_dy.numpy(),
            sum_dy_xmu.numpy(), none if dw is None else dw.numpy(),
            float(count or x.numel() // c), do_reduce, apply, training, _streamed(dx, view),
            *view.partials(),
            np.empty((4, c), dtype=none.dtype),
        )
        _launch(kernel, args, view, x, do_reduce, apply)
        return dx, sum_dy, sum_dy_xmu, dw

    # ---- primitives -----------------------------------------------------------------------
    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.numel() == 0:
            zeros = torch.zeros(x.shape[1], dtype=acc_dtype(x))
            return zeros, zeros.clone()
        _, mean, m2, _, _, _ = self._forward(x, apply=False)
        return mean, m2

    def apply(
        self, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
    ) -> Tensor:
        if x.numel() == 0:
            return empty_out_like(x)
        y, *_ = self._forward(x, mean=mean, invstd=invstd, weight=weight, bias=bias)
        assert y is not None
        return y

    def backward_reduce(
        self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor
    ) -> tuple[Tensor, Tensor]:
        if x.numel() == 0:
            zeros = torch.zeros(x.shape[1], dtype=acc_dtype(x))
            return zeros, zeros.clone()
        _, sum_dy, sum_dy_xmu, _ = self._backward(dy, x, mean, invstd, None, apply=False)
        return sum_dy, sum_dy_xmu

    def backward_apply(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        sum_dy: Tensor,
        sum_dy_xmu: Tensor,
        count: int,
    ) -> Tensor:
        if x.numel() == 0:
            return empty_out_like(x)
        dx, *_ = self._backward(dy, x, mean, invstd, weight, sums=(sum_dy, sum_dy_xmu),
                                count=count)
        assert dx is not None
        return dx

    # ---- fused entry points ---------------------------------------------------------------
    def forward_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
    ) -> ForwardResult:
        running = None
        if running_mean is not None and running_var is not None:
            running = (running_mean, running_var)
        y, mean, _, invstd, new_rm, new_rv = self._forward(
            x, weight=weight, bias=bias, running=running, momentum=momentum, eps=eps
        )
        assert y is not None
        if running is not None:
            assert new_rm is not None and new_rv is not None
            new_rm, new_rv = new_rm.to(running[0].dtype), new_rv.to(running[1].dtype)
        return y, mean, invstd, new_rm, new_rv

    def forward_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
    ) -> Tensor:
        y, *_ = self._forward(x, mean=running_mean, var=running_var, weight=weight, bias=bias,
                              eps=eps)
        assert y is not None
        return y

    def backward(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        training: bool,
        output_mask: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        need_dx, need_dw, need_db = output_mask
        if not (need_dw or need_db or (training and need_dx)):
            # eval input gradient only: dx = dy * weight * invstd, no reduction
            zeros = torch.zeros(x.shape[1], dtype=acc_dtype(x))
            dx, *_ = self._backward(dy, x, mean, invstd, weight, sums=(zeros, zeros),
                                    training=False, apply=need_dx)
            return dx, None, None
        dx, sum_dy, _, dw = self._backward(dy, x, mean, invstd, weight, training=training,
                                           apply=need_dx, dweight=need_dw)
        return dx, dw, sum_dy if need_db else None
