"""Packed kernel calls: every numba kernel of this package behind one C-callable entry.

A kernel call (``numba_kernels.forward``, ``backward`` and the fused-activation ones) takes
about thirty arguments and runs in up to three phases, on up to ``torch.get_num_threads()``
threads. Calling the numba dispatcher once per phase and thread with NumPy views of every
tensor cost tens of microseconds of Python per call (a tensor's ``.numpy()`` alone is about
2 us on this project's VM), and its threads had to be this package's own. Instead the host:

1. packs the arguments once into an int64 buffer (:class:`PackedCall`): a tensor as its data
   address and shape (``data_ptr()``, no NumPy view), an integer or boolean as itself, a float
   as its IEEE bits;
2. runs each phase through a ``void entry(int64 *buffer)`` compiled with ``numba.cfunc``
   (:func:`entry_for`), which rebuilds the arrays with ``numba.carray`` and calls the kernel.

That entry is a plain C function pointer, so the threads that share a phase can be torch's
own OpenMP threads: ``GOMP_parallel(entry, buffer, nthreads, 0)``, the call that ``#pragma
omp parallel`` compiles to, in the OpenMP runtime torch already runs (see ``numba_backend``).
After an ATen op those threads are still spinning, waiting for torch's next parallel region;
our phase becomes that region, so the hand-off takes microseconds and no thread competes with
another for a core. Without OpenMP the package's own worker threads call the same entry.

Buffer layout (int64 slots): ``[0, CTL_SIZE)`` the work-sharing counters that the kernels
claim units from (``numba_kernels._claim``), then ``PHASE`` and ``UNITS`` (this phase's units
are ``[0, units)``), ``CHECK`` (the layout's checksum, compared by the entry, so that a buffer
is never read with another layout) and the arguments from ``ARGS`` on.

A kernel declares its packed arguments as a string of kinds, one per argument, in order
(``PACKED`` in its module): ``s1`` a 1-D array of the storage dtype (float32, float64, or the
bits of float16 as uint16 and of bfloat16 as int16), ``a1``/``a2`` a 1-D/2-D array of the
accumulation dtype (float64 for float64 storage, else float32), ``d2`` a 2-D float64 array,
``u1`` a 1-D uint8 array, ``i`` an integer, ``f`` a float, ``b`` a boolean. Its signature is
those arguments followed by ``(phase, units, ctl)``, 30 parameters at most (CPython compiles
a call with more arguments as ``f(*args)``, which numba cannot inline). An array is passed as
a C-contiguous tensor of that dtype, None (an empty array), or ``(address, *shape)`` (a piece
of a scratch allocation).

Each entry is compiled once per kernel and storage dtype and cached on disk like the kernels
(the cache key includes the kernels' source files, whose changes numba's own cache would not
notice here); on a cache miss in a child process, then loaded (:func:`_compile`). The
kernels are ``inline="always"`` functions: compiled inside their entries only, not a second
time on their own (their callees are, in the process that compiles).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
import struct
import subprocess
import sys
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np
import torch
from llvmlite import ir
from numba import carray, cfunc, types
from numba.core import sigutils
from numba.core.ccallback import CFunc
from numba.extending import intrinsic, overload

from .numba_kernels import CTL_DONE, CTL_NEXT, CTL_SIZE

__all__ = ["ARGS", "CHECK", "KERNEL_MODULES", "PHASE", "UNITS", "PackedCall", "entry_for",
           "precompile"]

PHASE = CTL_SIZE
UNITS = CTL_SIZE + 1
CHECK = CTL_SIZE + 2
ARGS = CTL_SIZE + 8  # the arguments start on a cache line of their own

_ARRAY, _INT, _FLOAT, _BOOL = 0, 1, 2, 3
_MAX_PACKED = 27
_STORAGE = {torch.float32: types.float32, torch.float64: types.float64,
            torch.float16: types.uint16, torch.bfloat16: types.int16}


def _parse(kinds: str) -> tuple[tuple[int, int, str], ...]:
    """``"s1 a1 i"`` -> ``((_ARRAY, 1, "s"), (_ARRAY, 1, "a"), (_INT, 0, ""))``."""
    out = []
    for k in kinds.split():
        if k[0] in "sadu" and len(k) == 2 and k[1] in "12":
            out.append((_ARRAY, int(k[1]), k[0]))
        elif k in ("i", "f", "b"):
            out.append(({"i": _INT, "f": _FLOAT, "b": _BOOL}[k], 0, ""))
        else:
            raise ValueError(f"unknown packed argument kind {k!r} in {kinds!r}")
    return tuple(out)


def _slots(spec: tuple[tuple[int, int, str], ...]) -> int:
    return sum(1 + rank for _, rank, _ in spec)


def _checksum(spec: tuple[tuple[int, int, str], ...], storage: types.Type) -> int:
    h = _slots(spec) * 131 + list(_STORAGE.values()).index(storage)
    for kind, rank, letter in spec:
        h = (h * 1000003 + 16 * kind + 4 * rank + " sadu".index(letter or " ")) % (1 << 61)
    return h


# ---- intrinsics ---------------------------------------------------------------------------


@intrinsic
def _voidp(typingctx, addr):
    """An int64 address as a ``void *`` (for ``numba.carray``)."""

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(types.int64), codegen


@intrinsic
def _bits_float(typingctx, v):
    """The float64 whose IEEE bits are the int64 ``v``."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


# ---- entries ------------------------------------------------------------------------------
# An entry is a closure over one integer, the key of its (kernel, storage dtype) in _SPECS;
# numba's cache tells closures apart by the values they close over, so each key is cached on
# its own, and the key hashes the kernels' source files too (see _kernel_stamp).

_SPECS: dict[int, tuple[Any, tuple[tuple[int, int, str], ...], types.Type]] = {}


def _unpack_call(data, key):
    """Unpack the buffer at ``data`` and call the kernel of ``_SPECS[key]``."""


@overload(_unpack_call)
def _unpack_call_impl(data, key):
    if not isinstance(key, types.IntegerLiteral):
        return None  # numba retries with the literal value
    kernel, spec, storage = _SPECS[key.literal_value]
    if len(spec) > _MAX_PACKED:
        raise TypeError(f"a packed kernel takes at most {_MAX_PACKED} arguments before "
                        f"(phase, units, ctl), got {len(spec)}: CPython compiles a longer "
                        "call as f(*args), which numba cannot inline")
    acc = types.float64 if storage == types.float64 else types.float32
    dtypes = {"s": storage, "a": acc, "d": types.float64, "u": types.uint8}
    ns: dict[str, Any] = {"np": np, "carray": carray, "_voidp": _voidp,
                          "_bits_float": _bits_float, "kernel": kernel}
    args = []
    slot = ARGS
    for j, (kind, rank, letter) in enumerate(spec):
        if kind == _ARRAY:
            ns[f"dt{j}"] = np.dtype(str(dtypes[letter])).type
            shape = "".join(f"p[{slot + 1 + d}], " for d in range(rank))
            args.append(f"carray(_voidp(p[{slot}]), ({shape}), dt{j})")
        elif kind == _BOOL:
            args.append(f"p[{slot}] != 0")
        elif kind == _INT:
            args.append(f"p[{slot}]")
        else:
            args.append(f"_bits_float(p[{slot}])")
        slot += 1 + rank
    src = "\n".join([
        "def impl(data, key):",
        f"    p = carray(data, ({slot},), np.int64)",
        f"    if p[{CHECK}] != {_checksum(spec, storage)}:",
        "        return",  # another layout: do nothing (the host sees no unit done)
        f"    ctl = carray(data, ({CTL_SIZE},), np.int64)",
        f"    kernel({', '.join(args)}, p[{PHASE}], p[{UNITS}], ctl)",
    ])
    exec(src, ns)
    return ns["impl"]


def _compile(fn: Any, module: str | None, name: str, dtype: torch.dtype) -> Any:
    """The compiled entry ``fn``: loaded from numba's cache; on a miss compiled in a child
    process that writes the cache, then loaded (``module``: this package's module by its short
    name; None compiles here, as does a failed child or ``BATCHNORM_NUMBA_CHILD_COMPILE=0``);
    without a writable cache directory compiled here, uncached.

    Why a child: a process that compiles the kernels computes channels-first reductions with
    last-bit differences from every process that loads them from the cache (measured: the
    mean of 41 of 64 channels of an (8, 64, 30, 30) input, by about an ulp; each kind of
    process deterministic, see benchmarks/RESULTS.md). Loading in every process gives every
    process the same bits, the first one after an install included.
    """
    try:
        res = _caching_cfunc(fn)
    except RuntimeError:  # no writable cache directory: compile uncached (as kernels do)
        return cfunc(_SIG, cache=False, error_model="numpy")(fn)
    if (module is not None and os.environ.get("BATCHNORM_NUMBA_CHILD_COMPILE", "1") != "0"
            and not _in_cache(res)):
        _compile_in_child(module, name, dtype)
    res.compile()  # a cache hit after the child; compiled here (and saved) otherwise
    return res


def _caching_cfunc(fn: Any) -> Any:
    """An entry's numba ``CFunc`` with disk caching on, not compiled yet (what
    ``cfunc(_SIG, cache=True)`` builds before compiling); raises RuntimeError where no cache
    directory is writable."""
    res = CFunc(fn, sigutils.normalize_signature(_SIG), locals={},
                options={"error_model": "numpy"})
    res.enable_caching()
    return res


def _in_cache(res: Any) -> bool:
    """Whether numba's cache holds ``res`` (True when that cannot be told: numba's cache
    internals are private, and an unknown layout must not cost a child compile per call)."""
    try:
        cache = res._cache
        key = cache._index_key(res._sig, res._targetdescr.target_context.codegen())
        return key in cache._cache_file._load_index()
    except Exception:  # another numba version: compile here, as before
        return True


def _compile_in_child(module: str, name: str, dtype: torch.dtype) -> None:
    """Compile the entries of ``module``'s kernels for ``dtype`` (``name`` first) into the
    cache in a child Python process (see :func:`_compile`); on failure warn and return, and
    the caller compiles in this process."""
    if not sys.executable:  # an embedded interpreter: no Python to start
        return
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, BATCHNORM_NUMBA_CHILD_COMPILE="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # the module's other kernels too (forward and backward, each a few seconds to compile):
    # a training step needs both, and a child per kernel would start Python twice
    code = ("import importlib, sys, torch\n"
            "from batchnorm.backends.numba_entry import entry_for\n"
            "mod, name, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])\n"
            "entry_for(mod, name, dtype)\n"
            "for other in importlib.import_module('batchnorm.backends.' + mod).PACKED:\n"
            "    entry_for(mod, other, dtype)\n")
    why = ""
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, module, name, str(dtype).rsplit(".", 1)[-1]],
            env=env, capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S, check=False)
        if done.returncode != 0:
            why = f"exit status {done.returncode}: {done.stderr.strip()[-2000:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        why = str(exc)
    if why:
        warnings.warn(f"batchnorm: compiling numba kernel {module}.{name} ({dtype}) in a child "
                      f"process failed ({why}); compiling it in this process instead",
                      RuntimeWarning, stacklevel=3)


_CHILD_TIMEOUT_S = 900


def _make_entry(key: int) -> Any:
    def entry(data):
        _unpack_call(data, key)

    return entry


def _file_stamp(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}:?"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _kernel_stamp(kernel: Any) -> str:
    """Sizes and times of the kernels' source files and of ``kernel``'s own: a cached entry
    embeds the kernel's code, and numba checks only the entry's own file (this one) before
    reusing it."""
    here = os.path.dirname(os.path.abspath(__file__))
    paths = sorted(os.path.join(here, name) for name in os.listdir(here)
                   if name.startswith("numba_") and name.endswith("kernels.py"))
    paths.append(kernel.py_func.__code__.co_filename)
    return ";".join(_file_stamp(p) for p in paths)


_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_SIG = types.void(types.voidptr)


_F64 = struct.Struct("<d")
_I64 = struct.Struct("<q")


def _float_bits(v: float) -> int:
    """The IEEE bits of ``v`` as a signed int64 (a float slot of the buffer)."""
    return _I64.unpack(_F64.pack(v))[0]


def _packer(name: str, spec: tuple[tuple[int, int, str], ...]) -> Any:
    """A function ``values -> ints`` for one layout: the argument slots as a list of integers
    (floats as their bits). Straight-line code generated from the layout: a loop over the
    kinds cost about twice as much, on a path that runs once per kernel call."""
    lines = ["def pack(v):",
             f"    if len(v) != {len(spec)}:",
             f"        raise TypeError(f'{name} takes {len(spec)} packed arguments, "
             "got {len(v)}')"]
    items = []
    for j, (kind, rank, _) in enumerate(spec):
        if kind == _ARRAY:
            shape = "a.numel()," if rank == 1 else "*a.shape,"
            lines += [f"    a = v[{j}]",
                      f"    p{j} = ({'0, ' * (rank + 1)}) if a is None else a if type(a) is tuple "
                      f"else (a.data_ptr(), {shape})"]
            items.append(f"*p{j}")
        elif kind == _FLOAT:
            items.append(f"_float_bits(v[{j}])")
        else:
            items.append(f"int(v[{j}])")
    lines.append(f"    return [{', '.join(items)}]")
    ns: dict[str, Any] = {"_float_bits": _float_bits}
    exec("\n".join(lines), ns)
    return ns["pack"]


class Entry:
    """A compiled entry: its C address, a ctypes function to call it on this thread, the
    packed layout it reads, and that layout's packer (see :func:`_packer`)."""

    __slots__ = ("address", "buffer", "check", "fn", "name", "pack", "spec")

    def __init__(self, name: str, spec: tuple, check: int, address: int) -> None:
        self.name = name
        self.spec = spec
        self.check = check
        self.address = address
        self.fn = _CFUNC(address)
        self.pack = _packer(name, spec)
        self.buffer = ctypes.c_int64 * (ARGS + _slots(spec))  # the buffer's type


_ENTRIES: dict[tuple[str, str, torch.dtype], Entry] = {}


def entry_for(module: str | ModuleType, name: str, dtype: torch.dtype) -> Entry:
    """The entry of kernel ``name`` of ``module`` (a module of this package by its short
    name, or a module object; the kernel is declared in its ``PACKED``) for inputs of
    ``dtype``; compiled, or loaded from numba's cache, on first use."""
    mod_name = module if isinstance(module, str) else module.__name__
    found = _ENTRIES.get((mod_name, name, dtype))
    if found is not None:
        return found
    spec, storage, fn = _entry_function(module, name, dtype)
    compiled = _compile(fn, module if isinstance(module, str) else None, name, dtype)
    found = Entry(f"{mod_name}.{name}", spec, _checksum(spec, storage), compiled.address)
    _ENTRIES[(mod_name, name, dtype)] = found
    return found


def _entry_function(module: str | ModuleType, name: str,
                    dtype: torch.dtype) -> tuple[tuple[str, ...], str, Any]:
    """``(spec, storage, fn)``: the packed-argument spec, the storage kind and the entry's
    Python function (not compiled) of kernel ``name`` of ``module`` for ``dtype``."""
    mod_name = module if isinstance(module, str) else module.__name__
    mod = (importlib.import_module(f"{__package__}.{module}") if isinstance(module, str)
           else module)
    kernel = getattr(mod, name)
    spec = _parse(mod.PACKED[name])
    storage = _STORAGE[dtype]
    digest = hashlib.sha256(
        f"{mod_name}.{name}|{spec}|{storage}|{_kernel_stamp(kernel)}".encode()).hexdigest()
    key = int(digest[:15], 16)
    _SPECS[key] = (kernel, spec, storage)
    return spec, storage, _make_entry(key)


KERNEL_MODULES = ("numba_kernels", "numba_act_kernels", "numba_smooth_kernels")


def precompile(kernels: Iterable[tuple[str, torch.dtype]] = tuple(
                   (m, torch.float32) for m in reversed(KERNEL_MODULES)),
               jobs: int | None = None) -> list[str]:
    """Fill numba's disk cache with the kernel modules (short names) for the dtypes of
    ``kernels``, compiling the missing ones in up to ``jobs`` child processes at once
    (default: the CPU count), in the order given; returns ``"module dtype"`` of each one
    compiled. Nothing is loaded into this process.

    Compiling a module for one dtype takes one core 35 s (``numba_kernels``), 65 s
    (``numba_act_kernels``) or 190 s (``numba_smooth_kernels``, three activations' loops) on
    a 2-vCPU Zen 3 VM, and first use compiles one at a time while the other cores wait: a
    cold install about to use several (a test session, a benchmark) saves that time divided
    by the cores by compiling them together first (longest first: the default order).
    Without a writable cache directory nothing can be kept, and nothing is compiled.
    """
    missing: list[tuple[str, str, torch.dtype]] = []
    for module, dtype in kernels:
        name = next(iter(importlib.import_module(f"{__package__}.{module}").PACKED))
        try:
            res = _caching_cfunc(_entry_function(module, name, dtype)[2])
        except RuntimeError:  # no writable cache directory
            return []
        if not _in_cache(res):
            missing.append((module, name, dtype))
    if missing:
        workers = max(1, min(len(missing), jobs or os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:  # threads that wait on child processes
            list(pool.map(lambda job: _compile_in_child(*job), missing))
    return [f"{module} {str(dtype).rsplit('.', 1)[-1]}" for module, _, dtype in missing]


class PackedCall:
    """One kernel call: its packed arguments and entry. :meth:`start` sets up a phase and
    :meth:`run` runs it on the calling thread (units no other thread claims); the threads of
    a parallel phase are the caller's business (``numba_backend._run_phase``).

    Args:
        entry: from :func:`entry_for`.
        values: the kernel's packed arguments, in its ``PACKED`` order (see the module
            docstring for what each kind takes).
        keep: whatever the ``(address, *shape)`` values point into. The call holds it and
            ``values``, so that every array the buffer points into lives as long as the call
            (a worker of the pool may finish after the caller has returned).
    """

    __slots__ = ("address", "buf", "entry", "keep", "values")

    def __init__(self, entry: Entry, values: Sequence[Any], keep: Any = ()) -> None:
        # a ctypes array: allocating and filling it, and taking its address, cost a third of
        # what a NumPy buffer did (whose .ctypes.data alone is about 1.4 us here)
        buf = entry.buffer()
        buf[ARGS:] = entry.pack(values)
        buf[CHECK] = entry.check
        self.entry = entry
        self.values = values
        self.keep = keep
        self.buf = buf
        self.address = ctypes.addressof(buf)

    def start(self, phase: int, units: int) -> None:
        """Set up ``phase`` over ``units`` units (zeroed counters)."""
        buf = self.buf
        buf[CTL_NEXT] = 0
        buf[CTL_DONE] = 0
        buf[PHASE] = phase
        buf[UNITS] = units

    def run(self) -> None:
        """Run the current phase's units on this thread (those no other thread claims)."""
        self.entry.fn(self.address)

    def done(self) -> int:
        return self.buf[CTL_DONE]

    @property
    def array(self) -> np.ndarray:
        """The buffer as an int64 NumPy array (for numba code that polls its counters)."""
        return np.frombuffer(self.buf, dtype=np.int64)
