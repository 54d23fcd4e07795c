"""The ``"numba"`` backend: fused, parallel CPU kernels (see :mod:`.numba_kernels`).

Training forward (statistics, running update, normalization), eval forward and the backward
(reduction and input gradient, each output only when asked for) each run one compiled kernel.
Channels-first inputs take a single parallel phase: every task reduces a block of channels and
normalizes it while it is still in cache. Channels-last inputs need every row reduced before
any is normalized, so their kernel runs in three phases (chunk partials, merge, elementwise).
The four primitives that SyncBatchNorm composes are the same kernels with parts switched off.

The eager training and eval steps (plain and fused) normally run from C++
(:mod:`.numba_step`): the same packed calls, kept as recipes, without Python between them;
the methods below are the Python path, which builds those recipes, runs everything else
(SyncBatchNorm's primitives, traced calls, arguments the C++ side does not take) and stands
in where the extension cannot be built.

Every kernel call is packed once and run through a C-callable entry (:mod:`.numba_entry`):
inputs are read in place by address, channels-first contiguous tensors as ``(N, C, S)``,
channels-last ones (NHWC, NDHWC) and 2-D ``(N, C)`` as ``(rows, C)``. Any other strides are
copied once, on purpose, to channels-first (:func:`~.base.as_kernel_layout`). float16 and
bfloat16 are read as their bit patterns and computed in float32; statistics are float32
(float64 for float64 input), as everywhere in this package.

Outputs of ``_STREAM_MIN_BYTES`` (16 MiB, ``$BATCHNORM_NUMBA_STREAM_MIN_BYTES``) and more are
written with non-temporal stores, which skip the read-for-ownership a plain store makes of
every line it writes: one memory transfer per output element instead of two (the backward's
dx only when its pass re-reads x and dy from cache, and no pass without a reduction, such as
eval: see ``_streamed``). Smaller outputs keep plain stores, so that the next layer finds
them in the caches.

Outputs of 1 MiB and more are recycled (:mod:`.cpu_outputs`): a buffer nothing references any
more is handed out again instead of fresh memory from the allocator, whose pages would be
faulted in on every call.

Threads: a call runs on ``torch.get_num_threads()`` threads (one below 64K elements). Where
torch runs on OpenMP, a parallel phase is an OpenMP parallel region of torch's own runtime
(``GOMP_parallel`` on the packed entry): the threads ATen's ops use, which after an op are
still spinning and take the phase within microseconds, and no thread of ours competes with
them for a core. Elsewhere (or with ``BATCHNORM_NUMBA_OPENMP=0``) a small pool of our own
threads runs it (at most 63 workers, polling briefly for the next job, then blocking).
numba's own threading layer is not used. The threads of a call claim its tasks one at a time
from shared counters, so a thread that starts late takes fewer tasks instead of holding the
call up.
Work is cut by the shape only, never by the thread count or by which thread runs a task, so
results do not depend on either.

Compiled code is cached on disk (numba's ``cache=True``: next to the module, or in the user's
cache directory when the package is read-only, or not at all when neither is writable); a
cold first call compiles for several seconds per storage dtype, in a child process whose
cache every process then loads (:func:`.numba_entry._compile`), which ``batchnorm bench``
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
from typing import Any, NamedTuple

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
# when the input fits there). Pieces get shorter, down to _BLOCK_ELEMS_MIN, where that
# gives _MIN_TASKS blocks (one phase, x read once), and for inputs above _SPLIT_MAX_BYTES in
# any case. Measured in alternated pairs, a fwd+bwd step at 2 threads, (7, 3) tasks -> (16,
# 1): (32, 512, 14, 14) 5-11% and (32, 128, 28, 28) 8-13% faster, (32, 2048, 7, 7) -3% to
# +10%; splitting 7x7 and 14x14 inputs into blocks of fewer channels than that instead
# ((2, 8) -> (7, 3), (4, 4) -> (13, 2)) was 0-6% slower, so they keep their split.
_BLOCK_ELEMS = 16384
_BLOCK_ELEMS_MIN = 4096
_TASK_ELEMS = 1 << 20
_MIN_TASKS = 16
_SPLIT_MAX_BYTES = 1 << 24
# Channels-last (and elementwise-only channels-first): chunks of at least _CHUNK_ELEMS values
# (a chunk costs a few allocations and 2 C partials) and at most _MAX_CHUNKS of them. With a
# reduction, channels-last rows are cut into at most max(_ROW_PARTS, numel // _ROW_CHUNK_ELEMS)
# chunks: every chunk adds C (mean, M2) partials to the merge phase, which reads them from the
# other threads' caches (0.19 ms of the forward's 2.6 ms kernel time for (32, 2048, 7, 7)
# float32 in 49 chunks on this project's 2-core VM). Measured in alternated pairs (a fwd+bwd
# of the backend's kernels, inputs rotated over 64 MiB), the cap gained 4-10% (that shape 49 ->
# 16 chunks, (32, 1024, 14, 14) 64 -> 24, (32, 256, 14, 14) 24 -> 16); 12 chunks instead of 16
# measured within 2%, and 16 leave work for up to 16 threads.
_CHUNK_ELEMS = 1 << 16
_MAX_CHUNKS = 64
_ROW_PARTS = 16
_ROW_CHUNK_ELEMS = 1 << 18
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
# preferred_for); channels-first and channels-last differ, and channels-first depends on
# whether the eager step runs in C++ (numba_step) or in Python.
_AUTO_MIN_NUMEL_CF = 1 << 16
_AUTO_MIN_NUMEL_CF_PYTHON = 1 << 18
_AUTO_MIN_NUMEL_CL = 1 << 22


_MODULES: dict[str, Any] = {}


def _kernels() -> Any:
    """The kernels module, imported on first use together with :mod:`.numba_entry`
    (``_MODULES["entry"]``, used by :func:`_launch`): both need numba, and the backend module
    itself loads anywhere."""
    k = _MODULES.get("kernels")
    if k is None:
        from . import numba_entry, numba_kernels

        k = _MODULES["kernels"] = numba_kernels
        _MODULES["entry"] = numba_entry
    return k


def _step_module() -> Any:
    """:mod:`.numba_step` (the eager steps in C++), imported on first use: it imports this
    module."""
    from . import numba_step

    _MODULES["step"] = numba_step
    return numba_step


def _cpp_step_on() -> bool:
    """Whether eager steps run in C++, as far as known without building it: not switched off
    (``BATCHNORM_NUMBA_CPP=0``), and not failed to build."""
    step = sys.modules.get(f"{__package__}.numba_step")
    if step is not None:
        return step._state.get("ext", step) is not None and step._enabled()
    return os.environ.get("BATCHNORM_NUMBA_CPP", "1").strip() != "0"


def _chan(t: Tensor | None, acc: torch.dtype) -> Tensor | None:
    """A per-channel tensor as the kernels read it (a packed ``a1`` argument): contiguous, of
    the accumulation dtype; None stays None (an empty array)."""
    if t is None or (t.dtype == acc and t.is_contiguous()):
        return t
    return t.detach().to(acc).contiguous()


class _Scratch:
    """One allocation for a call's scratch arrays, handed to the kernels as packed
    ``(address, *shape)`` pieces: the float64 per-part partials ``pm`` and ``pq``, each
    ``(parts, C)``, then ``rows`` rows of ``C`` values of the accumulation dtype (the
    per-channel coefficients, and any other per-channel scratch)."""

    __slots__ = ("acc_addr", "acc_size", "c", "parts", "tensor")

    def __init__(self, parts: int, c: int, rows: int, acc: torch.dtype) -> None:
        self.parts, self.c = parts, c
        self.acc_size = 8 if acc == torch.float64 else 4
        self.tensor = torch.empty(16 * parts * c + self.acc_size * rows * c, dtype=torch.uint8)
        self.acc_addr = self.tensor.data_ptr() + 16 * parts * c

    def partials(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """``pm`` and ``pq``, packed ``d2`` arguments."""
        base, n = self.tensor.data_ptr(), self.parts * self.c
        return (base, self.parts, self.c), (base + 8 * n, self.parts, self.c)

    def rows(self, first: int, k: int) -> tuple[int, ...]:
        """Rows ``[first, first + k)`` as a packed ``a2`` argument (``a1`` when ``k`` is 0:
        one row, 1-D)."""
        addr = self.acc_addr + self.acc_size * first * self.c
        return (addr, self.c) if k == 0 else (addr, k, self.c)


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


def _streamed(t: Tensor | None, view: _View | None = None, reduced: bool = True) -> bool:
    """Whether the kernels write ``t`` with non-temporal stores. For a backward ``view``:
    only when its elementwise pass re-reads x and dy from the caches (one phase). With two
    input streams from memory, non-temporal stores measured slower than plain ones here
    (channels-last (32, 256, 28, 28): 3.1 vs 2.6 ms), while one input stream gains (the
    forward's: 1.35 vs 2.0 ms). Not for a pass without a reduction before it (``reduced``
    False: eval, the apply primitive): the output buffer, recycled, is often still in cache,
    and plain stores measured as fast or faster (25.7 MB float32 eval: channels-first 1.28 vs
    1.68-1.78 ms, channels-last 1.30-1.38 ms either way; 103 MB: 4.8 vs 4.7 ms and 3.0 vs
    3.8 ms)."""
    if not reduced or t is None or t.numel() * t.element_size() < _STREAM_MIN_BYTES:
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
    nbytes = x.nbytes
    if nbytes < cpu_outputs.MIN_BYTES:
        return empty_out_like(x)
    st = cpu_outputs.new_storage(nbytes, lambda s: _advise_huge(s.data_ptr(), nbytes))
    key = (x.shape, x.stride())
    strides = _OUT_STRIDES.get(key)
    if strides is None:
        if len(_OUT_STRIDES) > 4096:
            _OUT_STRIDES.clear()
        strides = _OUT_STRIDES[key] = out_strides(x)
    return torch.empty(0, dtype=x.dtype).set_(st, 0, x.shape, strides)


_OUT_STRIDES: dict[tuple, list[int]] = {}  # out_strides per (shape, strides) of the input


class _View:
    """How the kernels see one input, from its shape, layout and element size only (never
    the thread count, so that results do not depend on it).

    The memory is a C-contiguous ``(n, c, s)``: channels first as ``(N, C, S)``, channels last
    (and any input with ``S == 1``) as rows ``(R, C, 1)``. Tasks are ``blocks`` channel blocks
    x ``parts`` batch ranges.

    * Channels last: one block, the rows cut into chunks of at least ``_CHUNK_ELEMS`` values
      (each chunk's partials cost 2 C values); with a reduction, into at most
      ``max(_ROW_PARTS, numel // _ROW_CHUNK_ELEMS)`` chunks (the merge reads every chunk's
      partials).
    * Channels first with a reduction: a block spans about ``_BLOCK_ELEMS`` contiguous
      values of each batch row, so that memory streams in long pieces, and when possible at
      most ``_TASK_ELEMS`` values in all, so that the second pass finds the block in cache;
      the batch is split when there are fewer than ``_MIN_TASKS`` blocks (and more than one thread
      could run; not below ``_PARALLEL_MIN_NUMEL``), which shorter pieces (down to
      ``_BLOCK_ELEMS_MIN``) avoid where they give ``_MIN_TASKS`` blocks, and inputs above
      ``_SPLIT_MAX_BYTES`` avoid in any case.
    * Channels first, elementwise only (eval, the apply primitives): each task is one
      contiguous piece of memory, a range of whole rows, or, with fewer rows than tasks, a
      channel block of one row (each break in a stream costs about a microsecond of memory
      latency; see benchmarks/RESULTS.md).
    """

    __slots__ = ("blocks", "channels_last", "dims", "parts")

    def __init__(self, x: Tensor, reduce: bool = True) -> None:
        n, c = x.shape[0], x.shape[1]
        s = x.numel() // (n * c)
        self.channels_last = layout_of(x) == "cl"
        if self.channels_last or s == 1:
            rows = n * s
            self.dims, self.blocks = (rows, c, 1), 1
            numel = rows * c
            self.parts = max(1, min(_MAX_CHUNKS, rows, numel // _CHUNK_ELEMS))
            if reduce:
                self.parts = max(1, min(self.parts, max(_ROW_PARTS, numel // _ROW_CHUNK_ELEMS)))
        elif not reduce:
            # each task one contiguous piece of memory: whole rows, or (fewer rows than
            # tasks) a channel block of one row
            self.dims = (n, c, s)
            tasks = max(1, min(_MAX_CHUNKS, n * c * s // _CHUNK_ELEMS))
            self.parts = min(n, tasks)
            self.blocks = min(c, math.ceil(min(tasks, _MIN_TASKS) / self.parts))
        else:
            self.dims = (n, c, s)
            per_block = math.ceil(_BLOCK_ELEMS / s)
            short = max(math.ceil(_BLOCK_ELEMS_MIN / s), min(per_block, c // _MIN_TASKS))
            # shorter pieces where they give _MIN_TASKS blocks (one phase, no batch split)
            # or the input is too large for L3 to serve a split's second read
            if (x.numel() * x.element_size() > _SPLIT_MAX_BYTES
                    or math.ceil(c / short) >= _MIN_TASKS):
                per_block = short
            per_block = min(per_block, max(1, _TASK_ELEMS // (n * s)))
            self.blocks = math.ceil(c / min(c, per_block))
            self.parts = 1
            # (one thread below _PARALLEL_MIN_NUMEL: no split, one phase)
            if self.blocks < _MIN_TASKS and x.numel() >= _PARALLEL_MIN_NUMEL:
                self.parts = max(1, min(n, math.ceil(_MIN_TASKS / self.blocks)))

    @property
    def tasks(self) -> int:
        return self.blocks * self.parts


# Threads of a parallel phase. Where torch runs on OpenMP (its CPU builds on Linux do), a
# phase is an OpenMP parallel region of torch's own runtime: GOMP_parallel(entry, buffer,
# nthreads, 0), which is what ``#pragma omp parallel`` compiles to (see numba_entry). The
# threads are then the ones ATen's ops use, still spinning after the last op, so no thread
# of ours competes with them for a core, and the hand-off takes microseconds. Measured on
# this project's 2-core VM, a trivial phase: GOMP_parallel 4 us, the pool below 25-50 us; and
# next to ATen ops, 2-thread calls through the pool ran at 1-thread speed, because torch's
# OpenMP thread kept the second core spinning. BATCHNORM_NUMBA_OPENMP=0 uses the pool.


def _torch_openmp() -> Callable[..., None] | None:
    """``GOMP_parallel`` of the OpenMP runtime that torch's CPU library calls, or None (torch
    without OpenMP, a runtime without the GNU entry points, or BATCHNORM_NUMBA_OPENMP=0).

    The runtime is found through torch itself: the address that ``omp_get_max_threads``
    resolves to from libtorch_cpu, and the library file that holds it (``dladdr``), so that
    another OpenMP runtime in the process (numba's, say) is never taken for torch's."""
    if os.environ.get("BATCHNORM_NUMBA_OPENMP", "1").strip() == "0":
        return None
    try:
        if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
            return None
        lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
        names = [n for n in os.listdir(lib_dir) if n.startswith("libtorch_cpu.")]
        mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 1)
        torch_cpu = ctypes.CDLL(os.path.join(lib_dir, names[0]), mode=mode)
        addr = ctypes.cast(torch_cpu.omp_get_max_threads, ctypes.c_void_p).value

        class _DlInfo(ctypes.Structure):
            _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                        ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

        info = _DlInfo()
        dladdr = ctypes.CDLL(None).dladdr
        dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        if not addr or not dladdr(addr, ctypes.byref(info)) or not info.fname:
            return None
        runtime = ctypes.CDLL(info.fname.decode(), mode=mode)
        fn = runtime.GOMP_parallel
    except Exception:  # any platform where this lookup does not work: our own threads
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    fn.restype = None
    return fn


_UNSET: Any = object()
_OPENMP: Any = _UNSET


def _openmp() -> Callable[..., None] | None:
    global _OPENMP
    if _OPENMP is _UNSET:
        _OPENMP = _torch_openmp()
    return _OPENMP


# Without OpenMP: a small pool of our own threads. A blocked thread takes tens of us to
# wake on the VMs this was measured on (a Python queue ping-pong between two threads: 55 us
# median), so a worker that finishes a job polls, without the GIL, for the next one for
# _WORKER_SPIN polls (well under a millisecond) before it blocks on its queue, and the caller
# polls for the call's completion for up to _CALLER_SPIN polls between checks for a worker's
# report. BATCHNORM_NUMBA_SPIN=0 turns polling off (workers then never spin).
_SPIN = os.environ.get("BATCHNORM_NUMBA_SPIN", "1").strip() != "0"
_WORKER_SPIN = 1 << 18 if _SPIN else 0
_CALLER_SPIN = 1 << 22 if _SPIN else 0
_SLOT = 8  # int64 values per cache line: each flag has a line of its own
_MAX_THREADS = 64


class _Pool:
    """Persistent worker threads that share the units of one phase of a packed call.

    Every thread of a phase (the caller and up to ``nthreads - 1`` workers) calls the same
    entry on the same buffer (:meth:`~.numba_entry.PackedCall.run`, GIL released); the kernel
    claims units one at a time from the buffer's counters (see ``numba_kernels._claim``) and
    counts those it finishes, and the caller returns once all are counted. So the call never
    waits for a worker that has not started: a worker that is late finds fewer units left, or
    none. A job holds the call (its buffer and every array it points into), so a late worker
    finishing after the call has returned is safe.

    Idle workers poll briefly after a job (``_WORKER_SPIN``), then block on a queue, so they
    do not compete with torch's threads between calls. If another thread is using the pool,
    the phase runs serially in its own thread. ``_flags[0]`` (int64) is the sequence number
    of the last job posted, which polling workers watch.

    Every worker reports each job it ran. The caller stops waiting when every unit is done,
    or when every worker of the phase has reported with units still missing (a unit that
    failed inside the kernel: the caller then raises); a worker's Python exception is
    re-raised in the caller.
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
            call, seq = item
            result: BaseException | None = None
            try:
                call.run()
            except BaseException as exc:  # handed to the caller, if it still waits
                result = exc
            # drop the job's references now: they keep the call's arrays (and so its recycled
            # outputs) alive, which an idle worker must not do until its next job
            del call, item
            self._reports.put((seq, result))  # also wakes a caller that does not poll
            last = seq

    def run(self, call: Any, units: int, nthreads: int) -> None:
        """The current phase of ``call`` (``units`` units) on up to ``nthreads`` threads."""
        p = min(nthreads, units, _MAX_THREADS)
        if p <= 1 or self._closed or not self._lock.acquire(blocking=False):
            call.run()
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
            for i in range(p - 1):
                self._jobs[i].put((call, seq))
            self._flags[0] = seq  # after the puts: a polling worker then finds its job
            call.run()
            k = _kernels()
            if (call.done() < units and _CALLER_SPIN
                    and k.spin_until(call.array, k.CTL_DONE, 0, 1, units, _CALLER_SPIN)):
                return
            pending = p - 1
            while call.done() < units and pending:  # a worker is still in a unit
                try:  # a worker's report: it finished (re-check the count) or failed
                    got, exc = self._reports.get(timeout=0.001)
                except queue.Empty:
                    continue
                if got == seq:
                    pending -= 1
                    if exc is not None:
                        raise exc
        finally:
            self._lock.release()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers and wait for them (calls after this run on the calling thread).

        Run at interpreter exit: a daemon thread that comes back from a GIL-free call while
        Python finalizes can abort the process ("terminate called without an active
        exception" was seen from numba's dispatcher); a worker may still be in a late share
        of a finished call, or polling, at that moment.
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
    # A forked child gets a fresh pool, and no OpenMP: GNU libgomp's threads do not survive a
    # fork, and a parallel region in a child whose parent ran one hangs (torch's own ops too).
    global _POOL, _OPENMP
    _POOL = _Pool()
    _OPENMP = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool_after_fork)


def _run_phase(call: Any, phase: int, units: int, nthreads: int) -> None:
    """One phase of a packed call on up to ``nthreads`` threads: torch's OpenMP threads, or
    the pool's; raises if a unit did not complete (the kernel failed in it)."""
    call.start(phase, units)
    p = min(nthreads, units, _MAX_THREADS)
    omp = _openmp() if p > 1 else None
    if p <= 1:
        call.run()
    elif omp is not None:
        omp(call.entry.address, call.address, p, 0)
    else:
        _POOL.run(call, units, p)
    done = call.done()
    if done != units:
        raise RuntimeError(f"numba kernel {call.entry.name}: {done} of {units} units of phase "
                           f"{phase} completed (see the error printed above)")


class _Plan:
    """What one kernel call needs that depends only on the kernel, the input's shape, strides
    and dtype, and whether the call reduces and applies: looked up once per call
    (:func:`_plan`) instead of being worked out again by a dozen Python calls, which cost
    tens of microseconds a step after another layer has evicted the interpreter's data.

    Attributes:
        view: the kernels' :class:`_View` of the input.
        acc: accumulation dtype (float64 for float64 input, else float32).
        entry: the compiled entry (:func:`.numba_entry.entry_for`).
        phases: ``(phase, units, parallel)`` in order: ``parallel`` False runs the phase on
            one thread (a merge with too little work to share).
        small: below ``_PARALLEL_MIN_NUMEL`` elements: one thread (waking one costs more).
    """

    __slots__ = ("acc", "entry", "phases", "small", "view")

    def __init__(self, kernel: str, x: Tensor, reduce: bool, apply: bool,
                 first: int | None) -> None:
        k = _kernels()
        module, name = kernel.split(".")
        self.view = view = _View(x, reduce)  # (remembered with the plan)
        self.acc = acc_dtype(x)
        self.entry = _MODULES["entry"].entry_for(module, name, x.dtype)
        self.small = x.numel() < _PARALLEL_MIN_NUMEL
        c = x.shape[1]
        merge_units = -(-c // k.MERGE_CHUNK)
        phases: list[tuple[int, int, bool]] = []
        if first is not None:  # a per-channel setup
            phases.append((first, merge_units, c >= _PARALLEL_MERGE))
        if view.parts == 1:  # each task holds whole channels: one phase
            phases.append((0, view.tasks, True))
        else:
            if reduce:
                phases.append((0, view.tasks, True))
            # merging partials is per channel: in parallel too when there is enough of it
            phases.append((1, merge_units, c * view.parts >= _PARALLEL_MERGE))
            if apply:
                phases.append((2, view.tasks, True))
        self.phases = tuple(phases)


_PLANS: dict[tuple, _Plan] = {}


def _plan(kernel: str, x: Tensor, reduce: bool, apply: bool, first: int | None = None) -> _Plan:
    """The :class:`_Plan` of kernel ``kernel`` (``"module.name"``, see
    :func:`.numba_entry.entry_for`) for input ``x`` (of a kernel layout,
    :func:`~.base.as_kernel_layout`): phase ``first`` when given, then one phase, or reduce
    -> merge -> apply; remembered per kernel, shape, strides, dtype and switches."""
    key = (kernel, x.shape, x.stride(), x.dtype, reduce, apply, first)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(kernel, x, reduce, apply, first)
    return plan


def _launch(plan: _Plan, values: list[Any], keep: Any = ()) -> None:
    """Run ``plan``'s phases on packed ``values`` (the kernel's ``PACKED`` order) on torch's
    thread count (one for small inputs). ``keep``: what the ``(address, *shape)`` values
    point into (kept alive with the call)."""
    call = _MODULES["entry"].PackedCall(plan.entry, values, keep)
    nthreads = 1 if plan.small else max(1, torch.get_num_threads())
    for phase, units, parallel in plan.phases:
        _run_phase(call, phase, units, nthreads if parallel else 1)


class KernelCall(NamedTuple):
    """A packed kernel call, not run yet: :meth:`run` runs it and fills ``outputs`` (the C++
    step makes a recipe of it instead: :mod:`.numba_step`)."""

    plan: _Plan
    values: list[Any]
    scratch: _Scratch
    outputs: tuple[Tensor | None, ...]

    def run(self) -> tuple[Tensor | None, ...]:
        """Run the call's phases (:func:`_launch`); its ``outputs``, now written."""
        _launch(self.plan, self.values, self.scratch)
        return self.outputs


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
        """Training where ATen's statistics are inaccurate, and where the fused kernels beat
        ATen.

        Accuracy first: ATen's CPU kernels for channels-last inputs of rank 4 and 5 and for
        inputs without spatial extent (``(N, C)``, ``(N, C, 1, 1)``) sum each channel in one
        float32 pass, which loses the variance as ``|mean| / std`` grows (measured, 131K
        values a channel: relative output error 1e-4 at a ratio of 100, 0.8 at 1e4; ours
        7e-8); those always take the fused kernels. Elsewhere speed decides
        (``batchnorm bench --crossover``, inputs read from memory, 1 and 2 threads): from
        64K elements channels-first with the eager step in C++ (:mod:`.numba_step`; at 64K
        1.28-1.36x with 2 threads, 1.86x with 1; at 18K 0.92-0.94x with 2), 256K where the
        step runs in Python (at 131K: 0.77-0.9x with 2 threads, 1.23x with 1); 4M
        channels-last (ATen's channels-last kernels read x twice too, and at 2M we were still
        0.95x). Below, the fixed cost of a call dominates. Eval is a single elementwise pass
        that ATen already runs at copy speed and accurately: it stays native."""
        if not training or x.dtype not in _DTYPES:
            return False
        cl = layout_of(x) == "cl"
        if x.numel() == x.shape[0] * x.shape[1] or (cl and x.dim() >= 4):
            return True
        if cl:
            return x.numel() >= _AUTO_MIN_NUMEL_CL
        return x.numel() >= (_AUTO_MIN_NUMEL_CF if _cpp_step_on() else _AUTO_MIN_NUMEL_CF_PYTHON)

    # ---- the two kernels behind everything ------------------------------------------------
    def _forward(self, x: Tensor, **options: Any) -> tuple[Tensor | None, Tensor, Tensor | None,
                                                           Tensor | None, Tensor | None,
                                                           Tensor | None]:
        """One forward kernel call (options as :meth:`_forward_call`, which documents them).
        Statistics are computed when ``mean`` is None, else ``mean`` with ``invstd`` (or
        ``var`` and ``eps``) normalize.

        Returns ``(y or None, mean, m2, invstd, new_running_mean, new_running_var)`` (the
        running pair in the accumulation dtype, None when not tracked; ``invstd`` None when
        ``var`` was given; ``m2`` only without ``apply``, else None).
        """
        return self._forward_call(x, **options).run()  # type: ignore[return-value]

    def _forward_call(
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
    ) -> KernelCall:
        """:meth:`_forward`'s kernel call, packed but not run (its outputs allocated, not
        written): ``outputs`` is what :meth:`_forward` returns. ``running``: the running
        buffers to update (their new values are outputs); ``apply``: write y (else ``m2``
        is an output)."""
        x = as_kernel_layout(x)
        do_stats = mean is None
        plan = _plan("numba_kernels.forward", x, do_stats, apply)
        view, acc = plan.view, plan.acc
        c = x.shape[1]
        y = _new_output(x) if apply else None
        if do_stats:
            mean, invstd = torch.empty(c, dtype=acc), torch.empty(c, dtype=acc)
        else:
            assert mean is not None
            mean, invstd = _chan(mean, acc), _chan(invstd, acc)
        new_rm = new_rv = rm = rv = None
        if running is not None:
            rm, rv = _chan(running[0], acc), _chan(running[1], acc)
            new_rm, new_rv = torch.empty(c, dtype=acc), torch.empty(c, dtype=acc)
        parts = view.parts
        tmp = _Scratch(parts, c, 4, acc)
        # M2 is an output of the stats primitive only; otherwise scratch
        m2 = None if apply else torch.empty(c, dtype=acc)
        values = [
            x, y, *view.dims, view.blocks, parts, mean, tmp.rows(3, 0) if m2 is None else m2,
            invstd, _chan(var, acc), _chan(weight, acc), _chan(bias, acc), rm, rv, new_rm,
            new_rv, eps, momentum, do_stats, apply, _streamed(y, reduced=do_stats),
            *tmp.partials(), tmp.rows(0, 3),
        ]
        return KernelCall(plan, values, tmp, (y, mean, m2, invstd, new_rm, new_rv))

    def _backward(self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                  weight: Tensor | None, **options: Any
                  ) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
        """One backward kernel call (options as :meth:`_backward_call`): the sums are
        computed when ``sums`` is None.

        Returns ``(dx or None, sum_dy, sum_dy_xmu, dweight or None)``.
        """
        return self._backward_call(dy, x, mean, invstd, weight,  # type: ignore[return-value]
                                   **options).run()

    def _backward_call(
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
    ) -> KernelCall:
        """:meth:`_backward`'s kernel call, packed but not run. ``sums``: given
        ``(sum_dy, sum_dy_xmu)`` (else reduced here); ``count``: values per channel behind
        them (0: this input's); ``training``: dx through the batch statistics; ``apply``:
        write dx; ``dweight``: compute it."""
        x = as_kernel_layout(x)
        if dy.stride() != x.stride():
            dy = empty_out_like(x).copy_(dy)
        do_reduce = sums is None
        plan = _plan("numba_kernels.backward", x, do_reduce, apply)
        view, acc = plan.view, plan.acc
        c = x.shape[1]
        if sums is None:
            sum_dy, sum_dy_xmu = torch.empty(c, dtype=acc), torch.empty(c, dtype=acc)
        else:
            sum_dy, sum_dy_xmu = _chan(sums[0], acc), _chan(sums[1], acc)
        dx = _new_output(x) if apply else None
        dw = torch.empty(c, dtype=acc) if dweight else None
        parts = view.parts
        tmp = _Scratch(parts, c, 4, acc)
        values = [
            dy, x, dx, *view.dims, view.blocks, parts, _chan(mean, acc), _chan(invstd, acc),
            _chan(weight, acc), sum_dy, sum_dy_xmu, dw, float(count or x.numel() // c),
            do_reduce, apply, training, _streamed(dx, view), *tmp.partials(), tmp.rows(0, 4),
        ]
        assert sum_dy is not None and sum_dy_xmu is not None
        return KernelCall(plan, values, tmp, (dx, sum_dy, sum_dy_xmu, dw))

    # ---- the eager steps in C++ (numba_step) ----------------------------------------------
    def eager_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        double_backward: Callable[..., Any],
    ) -> Tensor | None:
        step = _MODULES.get("step") or _step_module()
        if step.double_backward is not double_backward:
            step.set_double_backward(double_backward)
        return step.train_step(x, weight, bias, running_mean, running_var, momentum, eps)

    def eager_act_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        residual: Tensor | None,
        momentum: float,
        eps: float,
        activation: str,
        slope: float,
        inplace: bool,
        double_backward: Callable[..., Any],
    ) -> Tensor | None:
        step = _MODULES.get("step") or _step_module()
        if step.double_backward_act is not double_backward:
            step.set_double_backward_act(double_backward)
        return step.act_train_step(x, weight, bias, running_mean, running_var, residual,
                                   momentum, eps, activation, slope, inplace)

    def eager_act_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        residual: Tensor | None,
        eps: float,
        activation: str,
        slope: float,
        inplace: bool = False,
    ) -> Tensor | None:
        step = _MODULES.get("step") or _step_module()
        return step.eval_act_step(x, weight, bias, running_mean, running_var, residual, eps,
                                  activation, slope, inplace)

    def eager_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
    ) -> Tensor | None:
        step = _MODULES.get("step") or _step_module()
        return step.eval_step(x, weight, bias, running_mean, running_var, eps)

    # ---- primitives -----------------------------------------------------------------------
    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.numel() == 0:
            zeros = torch.zeros(x.shape[1], dtype=acc_dtype(x))
            return zeros, zeros.clone()
        _, mean, m2, _, _, _ = self._forward(x, apply=False)
        assert m2 is not None
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
            if new_rm.dtype != running[0].dtype:
                new_rm = new_rm.to(running[0].dtype)
            if new_rv.dtype != running[1].dtype:
                new_rv = new_rv.to(running[1].dtype)
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
