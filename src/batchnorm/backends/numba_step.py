"""The numba backend's eager training and eval steps in C++ (``numba_step.cpp``).

Why: the kernels of a small layer take less time than the Python around them. A
``(32, 512, 7, 7)`` channels-last training step (forward and backward) measured 0.83 ms
through the Python layers, 0.56 ms with this path and 0.64 ms in ATen, with another layer's
pass over memory between steps (which evicts the interpreter's code and data too; see
benchmarks/RESULTS.md). Here one C++ call runs the forward, with the running buffers
updated, and returns ``y`` from a C++ autograd function whose backward autograd's engine
calls without entering Python: plain BatchNorm (:func:`train_step`), BatchNorm + activation
(+ residual), out of place or in place (:func:`act_train_step`), and the eval forwards
(:func:`eval_step`; :func:`eval_act_step`, out of place or in place).

How: the first call for a key (shape, strides, dtype, which of weight/bias/running buffers
are given, momentum, eps) packs the numba backend's kernel calls as it always does
(:meth:`.NumbaBackend._forward_call`, ``_backward_call``) without running them, and hands
them to C++ as *recipes*: the packed buffer with the tensor addresses left open. Every call
then copies a recipe, fills in its tensors' addresses and runs its phases in torch's OpenMP
threads, exactly as :func:`.numba_backend._launch` would: same kernels, same task split,
the same bits. Outputs of 1 MiB and more are recycled as in :mod:`.cpu_outputs` (a pool of
the C++ side's own, under the same limit; :func:`.cpu_outputs.empty_cache` empties both).

The extension is compiled with ``torch.utils.cpp_extension.load`` (a C++ compiler and
ninja; about 20 s, once, cached in torch's extensions directory, ``$TORCH_EXTENSIONS_DIR``),
in a background thread started by the first call (:func:`_ext_nowait`): calls take the
Python path until it is ready. Where the build fails, or with ``BATCHNORM_NUMBA_CPP=0``, or
without torch's OpenMP runtime (the pool threads stay Python's), the Python path runs
instead, with a warning when the build failed. A call whose arguments the C++ side does
not take as they are (a weight of another dtype, a strided running buffer) also takes the
Python path.

Double backward (``create_graph=True``) calls back into Python for the composite
(:func:`set_double_backward`), as the Python path does.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import cpu_outputs
from . import numba_backend as nb
from .activations import check_activation, invertible_weight
from .base import acc_dtype, layout_of, out_strides

__all__ = ["act_train_step", "available", "eval_act_step", "eval_step", "forget_recipes",
           "set_double_backward", "set_double_backward_act", "train_step"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "numba_step.cpp")
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64",
                torch.float16: "float16", torch.bfloat16: "bfloat16"}
# Where the C++ side (numba_step.cpp, run()) takes each tensor's address from: forward
# kernels, the plain backward, the fused activation's backward; and the scratch allocation.
_FWD = {"x": 0, "y": 1, "mean": 2, "invstd": 3, "weight": 4, "bias": 5, "running_mean": 6,
        "running_var": 7, "new_mean": 8, "new_var": 9, "residual": 10, "var": 12, "mask": 13}
_BWD = {"dy": 0, "x": 1, "dx": 2, "mean": 3, "invstd": 4, "weight": 5, "sum_dy": 6,
        "sum_dy_xmu": 7, "dweight": 8}
_ACT_BWD = {"dy": 0, "x": 1, "dx": 2, "mean": 3, "invstd": 4, "weight": 5, "sum_dz": 6,
            "sum_dz_xhat": 7, "bias": 8, "residual": 9, "dresidual": 10, "mask": 12}
_SCRATCH = 11
_MAX_KEYS = 4096

_lock = threading.Lock()  # recipe tables, starting the build thread
_build_lock = threading.Lock()  # the build itself
_state: dict[str, Any] = {}  # "ext": the loaded module, or None once it failed / is off
double_backward: Callable[..., Any] | None = None  # see set_double_backward
double_backward_act: Callable[..., Any] | None = None
_act_recipes: dict[tuple, int | None] = {}
_eval_act_recipes: dict[tuple, int | None] = {}
_train_recipes: dict[tuple, int | None] = {}  # key -> forward recipe id, None: Python path
_eval_recipes: dict[tuple, int | None] = {}


def _enabled() -> bool:
    return os.environ.get("BATCHNORM_NUMBA_CPP", "1").strip() != "0"


def _build() -> Any:
    """Compile (or load the cached build of) the extension and set it up; None on failure."""
    try:
        from torch.utils.cpp_extension import load

        _find_ninja()
        ext = load(name=_extension_name(), sources=[_SOURCE], extra_cflags=["-O2"],
                   verbose=False)
    except Exception as exc:  # no compiler, no ninja, a read-only extensions directory, ...
        warnings.warn(f"batchnorm: building the numba backend's C++ step failed ({exc}); "
                      "the Python path runs instead (BATCHNORM_NUMBA_CPP=0 skips the build)",
                      RuntimeWarning, stacklevel=5)
        return None
    k = nb._kernels()
    entry = nb._MODULES["entry"]
    ext.set_layout(k.CTL_NEXT, k.CTL_DONE, entry.PHASE, entry.UNITS)
    ext.set_pool(cpu_outputs.limit_bytes(), nb._MADVISE is not None)
    omp = nb._openmp()
    ext.set_gomp(0 if omp is None else ctypes.cast(omp, ctypes.c_void_p).value)
    if double_backward is not None:
        ext.set_double_backward(double_backward)
    if double_backward_act is not None:
        ext.set_double_backward_act(double_backward_act)
    return ext


def _extension_name() -> str:
    """The build's name, one per torch and Python version: torch rebuilds an extension when
    its sources change, not when torch does, and a build against another torch's headers
    would not load (or worse)."""
    tag = hashlib.sha256(f"{torch.__version__}|{sys.version}".encode()).hexdigest()[:12]
    return f"batchnorm_numba_step_{tag}"


def _find_ninja() -> None:
    """torch's builder runs ``ninja`` from PATH: where it is not there, the one the ``ninja``
    package installed (a dependency of the ``numba`` extra) is put on PATH."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join((ninja.BIN_DIR, os.environ.get("PATH", "")))


def _ext() -> Any:
    """The extension, built or loaded on first use (waiting for a build in progress); None
    where this path is off."""
    if "ext" in _state:
        return _state["ext"]
    with _build_lock:
        if "ext" not in _state:
            ext = _state["ext"] = _build() if _enabled() else None
            from . import set_eager_front

            set_eager_front("numba", None if ext is None else ext.front)
    return _state["ext"]


def _ext_nowait() -> Any:
    """The extension if it is ready; else None, after starting its build in a background
    thread. A step's first call then takes the Python path, whose kernels compile meanwhile
    (numba's compile runs in a child process, the C++ build in a compiler process: on two
    cores the first call costs about the longer of the two instead of their sum). The
    thread is not a daemon: exiting Python waits for the build rather than killing it,
    which would leave torch's build lock behind for the next process to wait on."""
    if "ext" in _state:
        return _state["ext"]
    if not _enabled():
        _state["ext"] = None
        return None
    with _lock:
        if "thread" not in _state:
            thread = threading.Thread(target=_ext, name="batchnorm-numba-step-build")
            _state["thread"] = thread
            thread.start()
    return None


def _after_fork() -> None:
    # torch's OpenMP threads do not survive a fork (numba_backend drops them in the child),
    # nor does a build thread: the child starts over (a lock its thread held is replaced)
    global _lock, _build_lock
    _lock, _build_lock = threading.Lock(), threading.Lock()
    ext = _state.get("ext")
    if ext is not None:
        ext.set_gomp(0)
    elif "thread" in _state:
        del _state["thread"]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def available() -> bool:
    """Whether the C++ step is on and built (builds it on first call): it needs torch's
    OpenMP runtime, whose threads run its phases."""
    return _enabled() and nb._openmp() is not None and _ext() is not None


def set_double_backward(fn: Callable[..., Any]) -> None:
    """The Python function a ``create_graph=True`` backward calls:
    ``fn(dy, x, weight, mean, invstd, eps, need_dx, need_dweight, need_dbias) -> (dx, dweight,
    dbias)`` (None where not asked for). Set by the op layer, which owns the composite."""
    global double_backward
    double_backward = fn
    ext = _state.get("ext")
    if ext is not None:
        ext.set_double_backward(fn)


def set_double_backward_act(fn: Callable[..., Any]) -> None:
    """As :func:`set_double_backward`, for BatchNorm + activation: ``fn(dy, x, weight, bias,
    residual, mean, invstd, eps, activation, slope, need_dx, need_dweight, need_dbias,
    need_dresidual, inplace, *, mask) -> (dx, dweight, dbias, dresidual)``, raising in place
    (``mask``: the activation mask saved instead of the residual, or None)."""
    global double_backward_act
    double_backward_act = fn
    ext = _state.get("ext")
    if ext is not None:
        ext.set_double_backward_act(fn)


def empty_pool() -> None:
    """Release the C++ side's free recycled outputs (when it is loaded)."""
    ext = _state.get("ext")
    if ext is not None:
        ext.empty_pool()


def forget_recipes() -> None:
    """Drop every recipe key (the next call of each kind makes its recipe again), the C++
    front door's table with them: for tests that watch recipes being made."""
    with _lock:
        for table in (_train_recipes, _eval_recipes, _act_recipes, _eval_act_recipes):
            table.clear()
        ext = _state.get("ext")
        if ext is not None:
            ext.front_clear()


def pool_bytes() -> int:
    """Bytes the C++ side's output pool holds (0 when it is not loaded)."""
    ext = _state.get("ext")
    return 0 if ext is None else int(ext.pool_bytes())


# ---- recipes ------------------------------------------------------------------------------


def _recipe(ext: Any, call: nb.KernelCall, slots: dict[str, int], like: Tensor,
            backward: int = -1, **sources: Tensor | None) -> int | None:
    """Register ``call`` (packed, not run) as a recipe: its tensors found by identity among
    ``sources`` (by name, the C++ side's slot of each in ``slots``; a tensor given under two
    names takes the last one's), its scratch pieces as offsets into the scratch allocation.
    None when a tensor is not one of the sources (a converted copy: such calls keep the
    Python path) or the C++ side is full. A forward's ``mask`` source (the activation mask)
    is allocated by the C++ side per call, of that size."""
    entry, scratch = call.plan.entry, call.scratch
    base = scratch.tensor.data_ptr()
    end = base + scratch.tensor.numel()
    index = {id(t): slots[name] for name, t in sources.items() if t is not None}
    templ = [0] * nb._MODULES["entry"].ARGS + entry.pack(call.values)
    templ[nb._MODULES["entry"].CHECK] = entry.check
    patches: list[int] = []
    slot = nb._MODULES["entry"].ARGS
    for (kind, rank, _), v in zip(entry.spec, call.values):
        if kind == 0 and v is not None:  # an array
            if type(v) is tuple:
                if not base <= v[0] <= end:
                    return None
                patches += [slot, _SCRATCH, v[0] - base]
            elif id(v) in index:
                patches += [slot, index[id(v)], 0]
            else:
                return None
        slot += 1 + rank
    phases = [v for phase in call.plan.phases for v in (phase[0], phase[1], int(phase[2]))]
    mask = sources.get("mask") if slots is _FWD else None
    mask_bytes = 0 if mask is None else mask.numel()
    rid = ext.add_recipe(entry.address, templ, patches, phases, scratch.tensor.numel(),
                         call.plan.small, list(like.shape), list(like.stride()),
                         out_strides(like), _DTYPE_NAMES[like.dtype], backward, mask_bytes)
    return None if rid < 0 else rid


def _train_recipe(ext: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                  running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                  eps: float) -> int | None:
    be = nb.NumbaBackend()
    x, weight, bias = x.detach(), _detached(weight), _detached(bias)
    running = None if running_mean is None else (running_mean, running_var)
    fwd = be._forward_call(x, weight=weight, bias=bias, running=running,  # type: ignore[arg-type]
                           momentum=momentum, eps=eps)
    y, mean, _, invstd, new_mean, new_var = fwd.outputs
    assert mean is not None and invstd is not None
    dy = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
    first = None
    for need_dx in (False, True):
        for need_dw in (False, True):
            bwd = be._backward_call(dy, x, mean, invstd, weight, apply=need_dx, dweight=need_dw)
            dx, sum_dy, sum_dy_xmu, dw = bwd.outputs
            rid = _recipe(ext, bwd, _BWD, x, dy=dy, x=x, dx=dx, mean=mean, invstd=invstd,
                          weight=weight, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu, dweight=dw)
            if rid is None or (first is not None and rid != first + 2 * need_dx + need_dw):
                return None
            first = rid if first is None else first
    return _recipe(ext, fwd, _FWD, x, first, x=x, y=y, mean=mean, invstd=invstd,
                   weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var, new_mean=new_mean, new_var=new_var)


def _eval_recipe(ext: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                 running_mean: Tensor, running_var: Tensor, eps: float) -> int | None:
    be = nb.NumbaBackend()
    call = be._forward_call(x, mean=running_mean, var=running_var, weight=weight, bias=bias,
                            eps=eps)
    y = call.outputs[0]
    return _recipe(ext, call, _FWD, x, x=x, y=y, mean=running_mean, weight=weight, bias=bias,
                   var=running_var)


def _act_recipe(ext: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None,
                residual: Tensor | None, momentum: float, eps: float, activation: str,
                slope: float, inplace: bool) -> int | None:
    be = nb.NumbaBackend()
    x, weight, bias = x.detach(), _detached(weight), _detached(bias)
    residual = _detached(residual)
    if not be._act_fusable(x, residual, activation):
        return None
    if inplace:  # (recipes only: nothing runs, x is not written)
        check_activation(activation, slope, True)
        weight = invertible_weight(weight)
    out = x if inplace else nb._new_output(x)
    # the activation mask (relu, leaky_relu with a residual): the backward reads it instead
    # of the residual, which is then not saved
    mask = be.act_mask(x, residual, activation, slope, out)
    fwd = be._forward_act_call(x, weight, bias, running_mean, running_var, residual, True,
                               momentum, eps, activation, slope, out, mask)
    y, mean, invstd, new_mean, new_var = fwd.outputs
    dy = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
    first = None
    bwd_residual = residual if mask is None else None
    # in the order the C++ backward indexes them: elementwise only, reduction only, both
    for i, (reduce, apply) in enumerate(((False, True), (True, False), (True, True))):
        bwd = be._backward_act_call(dy, y, weight, bias, mean, invstd, bwd_residual, True,
                                    activation, slope, inplace, reduce, apply, mask)
        dx, sum_dz, sum_dzx, dres = bwd.outputs
        rid = _recipe(ext, bwd, _ACT_BWD, x, dy=dy, x=y, dx=dx, mean=mean, invstd=invstd,
                      weight=weight, sum_dz=sum_dz, sum_dz_xhat=sum_dzx, bias=bias,
                      residual=bwd_residual, dresidual=dres, mask=mask)
        if rid is None or (first is not None and rid != first + i):
            return None
        first = rid if first is None else first
    return _recipe(ext, fwd, _FWD, x, first, x=x, y=y, mean=mean, invstd=invstd,
                   weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var, new_mean=new_mean, new_var=new_var,
                   residual=residual, mask=mask)


def act_train_step(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                   running_mean: Tensor | None, running_var: Tensor | None,
                   residual: Tensor | None, momentum: float, eps: float, activation: str,
                   slope: float, inplace: bool = False) -> Tensor | None:
    """``act(BN(x) + residual)`` in training in C++ (as :func:`train_step`); in place, the
    output overwrites ``x`` (the caller has checked that it may, as for the Python path).
    None where the C++ step does not take this call."""
    key = (x.shape, x.stride(), x.dtype, _dtype(weight), _dtype(bias), _dtype(running_mean),
           _dtype(residual), momentum, eps, activation, slope, inplace)
    found = _find(_act_recipes, key, lambda ext: _front_add(ext, _act_recipe(
        ext, x, weight, bias, running_mean, running_var, residual, momentum, eps, activation,
        slope, inplace), x, True, weight, bias, running_mean, momentum, eps, activation, slope,
        residual, inplace), x, weight, bias, running_mean, running_var)
    if found is None:
        return None
    ext, rid = found
    kernel_weight = None
    if inplace and weight is not None:
        kernel_weight = invertible_weight(weight.detach())
    return ext.train_act(x, weight, bias, running_mean, running_var, residual, rid, eps,
                         activation, slope, weight is not None, bias is not None,
                         running_mean is not None, residual is not None, inplace,
                         kernel_weight)


def _front_add(ext: Any, rid: int | None, x: Tensor, training: bool, weight: Tensor | None,
               bias: Tensor | None, running_mean: Tensor | None, momentum: float,
               eps: float, activation: str = "", slope: float = 0.0,
               residual: Tensor | None = None, inplace: bool = False) -> int | None:
    """Register recipe ``rid`` (if any: plain BatchNorm's, or with ``activation`` the fused
    activation's, out of place or ``inplace``) for the front door (``front`` in
    numba_step.cpp), with whether ``"auto"`` picks this backend for such an input; returns
    ``rid``. (In place, the front door makes the checks of the input's memory per call.)"""
    if rid is not None:
        ext.front_add(rid, training, weight is not None, bias is not None,
                      running_mean is not None, float(momentum), float(eps), activation,
                      float(slope), residual is not None, inplace,
                      nb.NumbaBackend().preferred_for(x, training))
    return rid


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _eligible(x: Tensor, *channel: Tensor | None) -> bool:
    """What the C++ step takes: a non-empty input in a kernel layout (no copy), per-channel
    tensors contiguous in the accumulation dtype (the kernels read them in place)."""
    if x.numel() == 0 or x.dtype not in _DTYPE_NAMES or layout_of(x) == "other":
        return False
    acc = acc_dtype(x)
    return all(t is None or (t.dtype == acc and t.is_contiguous() and t.device == x.device)
               for t in channel)


def _dtype(t: Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype


def _find(table: dict[tuple, int | None], key: tuple, make: Callable[[Any], int | None],
          x: Tensor, *channel: Tensor | None) -> tuple[Any, int] | None:
    """``(extension, recipe id)`` for ``key``, the recipe made on first sight (``make(ext)``,
    when the arguments are :func:`_eligible`); None where the C++ step is off, not built
    yet, or does not take such calls."""
    ext = _state.get("ext", _state)
    if ext is _state:
        ext = _ext_nowait()
    if ext is None or nb._OPENMP is None:
        return None
    rid = table.get(key, -1)
    if rid == -1:
        if nb._openmp() is None:
            return None
        with _lock:
            rid = table.get(key, -1)
            if rid == -1:
                ok = len(table) < _MAX_KEYS and _eligible(x, *channel)
                rid = table[key] = make(ext) if ok else None
    return None if rid is None else (ext, rid)


def train_step(x: Tensor, weight: Tensor | None, bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
               eps: float) -> Tensor | None:
    """The eager training step in C++: ``y`` (differentiable through a C++ autograd node),
    the running buffers updated in place; None where the C++ step does not take this call
    (the caller then runs the Python path). Arguments are validated by the caller."""
    key = (x.shape, x.stride(), x.dtype, _dtype(weight), _dtype(bias), _dtype(running_mean),
           momentum, eps)
    found = _find(_train_recipes, key, lambda ext: _front_add(ext, _train_recipe(
        ext, x, weight, bias, running_mean, running_var, momentum, eps), x, True, weight, bias,
        running_mean, momentum, eps), x, weight, bias, running_mean, running_var)
    if found is None:
        return None
    ext, rid = found
    # None when these arguments are not what the recipe was made for (a layout, a stride)
    return ext.train(x, weight, bias, running_mean, running_var, rid, eps,
                     weight is not None, bias is not None, running_mean is not None)


def eval_step(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
              running_var: Tensor, eps: float) -> Tensor | None:
    """The eval forward in C++ (no autograd: for calls where nothing needs a gradient);
    None where the C++ step does not take this call."""
    key = (x.shape, x.stride(), x.dtype, _dtype(weight), _dtype(bias), _dtype(running_mean),
           eps)
    found = _find(_eval_recipes, key, lambda ext: _front_add(ext, _eval_recipe(
        ext, x, weight, bias, running_mean, running_var, eps), x, False, weight, bias,
        running_mean, 0.0, eps), x, weight, bias, running_mean, running_var)
    if found is None:
        return None
    ext, rid = found
    return ext.eval(x, weight, bias, running_mean, running_var, None, rid, weight is not None,
                    bias is not None, False, False)


def _eval_act_recipe(ext: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     running_mean: Tensor, running_var: Tensor, residual: Tensor | None,
                     eps: float, activation: str, slope: float, inplace: bool) -> int | None:
    be = nb.NumbaBackend()
    if not be._act_fusable(x, residual, activation):
        return None
    if inplace:  # (recipes only: nothing runs, x is not written)
        check_activation(activation, slope, True)
        weight = invertible_weight(_detached(weight))
    out = x if inplace else nb._new_output(x)
    call = be._forward_act_call(x, weight, bias, running_mean, running_var, residual, False,
                                0.0, eps, activation, slope, out)
    return _recipe(ext, call, _FWD, x, x=x, y=call.outputs[0], mean=running_mean,
                   weight=weight, bias=bias, residual=residual, var=running_var)


def eval_act_step(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                  running_mean: Tensor, running_var: Tensor, residual: Tensor | None,
                  eps: float, activation: str, slope: float,
                  inplace: bool = False) -> Tensor | None:
    """``act(BN(x) + residual)`` in eval in C++ (no autograd: for calls where nothing needs
    a gradient); in place, written over ``x`` (the caller has checked that it may, as for
    the Python path; its version is bumped) with the kernels on the invertible weight, and
    ``x`` returned. None where the C++ step does not take this call."""
    key = (x.shape, x.stride(), x.dtype, _dtype(weight), _dtype(bias), _dtype(running_mean),
           _dtype(residual), eps, activation, slope, inplace)
    found = _find(_eval_act_recipes, key, lambda ext: _front_add(ext, _eval_act_recipe(
        ext, x, weight, bias, running_mean, running_var, residual, eps, activation, slope,
        inplace), x, False, weight, bias, running_mean, 0.0, eps, activation, slope, residual,
        inplace), x, weight, bias, running_mean, running_var)
    if found is None:
        return None
    ext, rid = found
    if inplace and weight is not None:
        weight = invertible_weight(weight.detach())
    return ext.eval(x, weight, bias, running_mean, running_var, residual, rid,
                    weight is not None, bias is not None, residual is not None, inplace)
