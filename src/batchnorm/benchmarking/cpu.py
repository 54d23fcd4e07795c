"""CPU benchmark of the ``"numba"`` backend (issue 3): ours vs ATen vs torch.compile vs a copy.

Run::

    batchnorm bench                                   # everything below (long: ~30 min)
    batchnorm bench --no-compile --plot bench.png     # without the inductor column
    batchnorm bench --quick                           # a smoke run: 3 shapes, few reps
    batchnorm bench --crossover                       # where "auto" should switch to numba
    python benchmarks/bench_cpu.py ...                # the same, from a checkout

Shapes (``batchnorm.catalog``): ResNet-50's BatchNorm inputs at N=32, speaker-encoder shapes
(CAMPPlus-like ``(N, C)`` and ``(N, C, T)``) and one 5-D volume, fp32, channels-first and
channels-last. Modes: training forward (``fwd``), backward (``bwd``, from a retained graph:
dx, dweight, dbias), both (``fwdbwd``) and eval forward (``eval``). Columns:

* ``ours``: :func:`batchnorm.batch_norm` with ``backend="numba"`` (op layer and autograd
  included, output allocation included);
* ``aten``: ``torch.nn.functional.batch_norm`` (ATen's CPU kernels);
* ``inductor``: the same function under ``torch.compile`` (compiled once per case, untimed);
* ``copy``: ``out.copy_(x)`` of the same tensor into a buffer of the copy's own (no page
  faults, as for our recycled outputs). A ``clone`` takes its output from the heap block
  that ATen's outputs reuse, and leaves it in cache for ATen's next call: with a clone in
  the turns, ATen/ours of the eval of (32, 128, 28, 28) and (32, 2048, 7, 7) measured
  0.61-0.67, without it 0.87-0.90 (``benchmarks/RESULTS.md``).

Times are medians of repeated calls that rotate through enough input copies (``--rotate-mb``,
default 64 MB, twice a 32 MB last-level cache) that every call reads from memory. The columns
of a mode are timed in turns (one call of each per round, :func:`~.common.measure_turns`), so
that each runs after the others as a layer runs between other layers: our calls then meet
torch's OpenMP threads still spinning after an ATen op, and every column meets the same
machine drift. ``floor %``
is the fewest bytes a mode must move (training forward 2b: read x, write y; backward 3b: read
x and dy, write dx; both 5b; eval 2b; b = bytes of x) at the copy bandwidth measured in the
same run (``out.copy_(x)`` of 256 MiB, bytes read + written), divided by our time: 100% is
the floor, 50% is twice it. ``faults ours/ATen``: minor page faults per call (fresh output
pages from the allocator; each costs microseconds, so they show how much of a time is the
allocator's rather than the kernel's). First-call cost (numba compiling into an empty
cache, then loading from it, each in a fresh process) and inductor's compile time are
reported separately.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..catalog import CAMPPLUS, VOLUMETRIC, resnet50
from .common import (
    copy_bandwidth,
    fmt_table,
    geomean,
    load_average,
    machine_lines,
    measure_turns,
    median_ms,
    numba_step_line,
    plot_bars,
    progress,
)

__all__ = ["FLOORS", "MODES", "main"]

MODES = ("fwd", "bwd", "fwdbwd", "eval")
COLUMNS = ("ours", "aten", "inductor", "copy")
# Fewest bytes moved per mode, in units of b = bytes of x (data kept on chip).
FLOORS = {"fwd": 2, "bwd": 3, "fwdbwd": 5, "eval": 2}
MOMENTUM, EPS = 0.1, 1e-5
_QUICK = [("r50_c64_h56", (32, 64, 56, 56)), ("r50_c512_h7", (32, 512, 7, 7)),
          ("campp_seq_512x200", (64, 512, 200))]


@dataclass
class Case:
    group: str
    name: str
    shape: tuple[int, ...]
    channels_last: bool
    times: dict[tuple[str, str], float] = field(default_factory=dict)  # (mode, column) -> ms
    faults: dict[tuple[str, str], float] = field(default_factory=dict)  # page faults per call
    compile_s: float = float("nan")
    check: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} {'cl' if self.channels_last else 'cf'}"

    def ratio(self, mode: str, column: str) -> float:
        return self.times.get((mode, column), math.nan) / self.times.get((mode, "ours"), math.nan)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="batchnorm bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu"], help=argparse.SUPPRESS)
    p.add_argument("--sets", nargs="+", default=["resnet50", "campplus", "volumetric"],
                   choices=["resnet50", "campplus", "volumetric"], help="shape sets")
    p.add_argument("--batch", type=int, default=32, help="batch size of the ResNet-50 set")
    p.add_argument("--shape", action="append", default=[], metavar="N,C,...", type=_shape,
                   help="a custom shape (repeatable); replaces the sets")
    p.add_argument("--layouts", nargs="+", default=["cf", "cl"], choices=["cf", "cl"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--dtype", default="float32",
                   choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch.set_num_threads first")
    p.add_argument("--reps", type=int, default=15, help="timed calls per measurement")
    p.add_argument("--max-seconds", type=float, default=2.0, help="time cap per measurement")
    p.add_argument("--rotate-mb", type=float, default=64.0,
                   help="rotate input copies until they span this many MB")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--no-first-call", action="store_true",
                   help="skip measuring numba's cold and cached first-call cost")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 shapes, 3 reps, no first-call measurement")
    p.add_argument("--crossover", action="store_true",
                   help="only measure where numba overtakes ATen as the size grows")
    p.add_argument("--plot", default=None, metavar="PNG", help="bar chart of ATen/ours")
    p.add_argument("--out", default=None, metavar="DIR", help="write CSV and markdown here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _shape(text: str) -> tuple[int, ...]:
    """``--shape N,C,...``: at least two positive sizes (argparse reports a bad one)."""
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers N,C,..., got {text!r}") from None
    if len(dims) < 2 or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"expected at least two positive sizes N,C,..., got {text!r}")
    return dims


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _cases(args: argparse.Namespace) -> list[Case]:
    if args.shape:
        named = [("custom", "x" + "x".join(map(str, s)), s) for s in args.shape]
    elif args.quick:
        named = [("quick", n, s) for n, s in _QUICK]
    else:
        sets = {"resnet50": resnet50(args.batch), "campplus": CAMPPLUS,
                "volumetric": VOLUMETRIC}
        named = [(g, n, s) for g in args.sets for n, s in sets[g]]
    cases = []
    for group, name, shape in named:
        for layout in args.layouts:
            if layout == "cl" and len(shape) < 3:
                continue  # (N, C) is its own channels-last layout
            cases.append(Case(group, name, shape, layout == "cl"))
    return cases


def _bn(backend: str | None) -> Callable[..., torch.Tensor]:
    import batchnorm

    if backend is None:
        def f(x, rm, rv, w, b, training):
            return F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)
        return f

    def g(x, rm, rv, w, b, training):
        return batchnorm.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS, backend=backend)
    return g


class _Inputs:
    """Rotated input copies (x with grad, dy), parameters and running buffers."""

    def __init__(self, case: Case, dtype: torch.dtype, rotate_mb: float) -> None:
        shape = case.shape
        c = shape[1]
        nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
        # enough copies to span rotate_mb (x and dy each), so that small shapes are read from
        # memory too, as after another layer's pass (a cap of 16 left those under 4 MiB in
        # the caches)
        self.k = max(1, min(4096, math.ceil(rotate_mb * 2**20 / nbytes)))
        fmt = (torch.channels_last if len(shape) == 4 else torch.channels_last_3d
               if len(shape) == 5 else None)

        def make(scale: float, shift: float) -> torch.Tensor:
            t = (torch.randn(shape) * scale + shift).to(dtype)
            if case.channels_last:
                t = t.contiguous(memory_format=fmt) if fmt else _cl_3d(t)
            return t

        self.xs = [make(2.0, 0.5).requires_grad_() for _ in range(self.k)]
        self.dys = [make(1.0, 0.0) for _ in range(self.k)]
        pdt = torch.float64 if dtype == torch.float64 else torch.float32
        self.w = (torch.rand(c, dtype=pdt) + 0.5).requires_grad_()
        self.b = torch.randn(c, dtype=pdt).requires_grad_()
        self.rm = torch.zeros(c, dtype=pdt)
        self.rv = torch.ones(c, dtype=pdt)
        self.nbytes = nbytes


def _cl_3d(t: torch.Tensor) -> torch.Tensor:
    """Channels-last for (N, C, L): memory (N, L, C)."""
    return t.permute(0, 2, 1).contiguous().permute(0, 2, 1)


def _timers(f: Callable[..., torch.Tensor], inp: _Inputs, mode: str) -> Callable[[int], None]:
    k, w, b, rm, rv = inp.k, inp.w, inp.b, inp.rm, inp.rv
    if mode == "fwd":
        return lambda i: f(inp.xs[i % k], rm, rv, w, b, True)
    if mode == "fwdbwd":
        def fb(i: int) -> None:
            y = f(inp.xs[i % k], rm, rv, w, b, True)
            torch.autograd.grad(y, (inp.xs[i % k], w, b), inp.dys[i % k])
        return fb
    if mode == "eval":
        def ev(i: int) -> None:
            with torch.no_grad():
                f(inp.xs[i % k], rm, rv, w, b, False)
        return ev
    # bwd: graphs built once, retained; with running buffers of their own, since ATen's graph
    # saves them and the other columns' forward calls (timed in turns) update the shared ones
    ys = [f(x, rm.clone(), rv.clone(), w, b, True) for x in inp.xs]

    def bw(i: int) -> None:
        torch.autograd.grad(ys[i % k], (inp.xs[i % k], w, b), inp.dys[i % k], retain_graph=True)
    return bw


def _check(case: Case, inp: _Inputs) -> str:
    """ours against ATen on one training step (y, dx, dweight, dbias, running stats)."""
    x = inp.xs[0]
    outs = []
    for f in (_bn("numba"), _bn(None)):
        rm, rv = inp.rm.clone(), inp.rv.clone()
        y = f(x, rm, rv, inp.w, inp.b, True)
        grads = torch.autograd.grad(y, (x, inp.w, inp.b), inp.dys[0])
        outs.append((y, *grads, rm, rv))
    tol = {torch.float64: 1e-9, torch.float32: 2e-4}.get(x.dtype, 3e-2)
    worst = 0.0
    for a, e in zip(*outs):
        scale = e.detach().double().abs().max().item() + 1.0
        err = (a.detach().double() - e.detach().double()).abs().max().item() / scale
        # (max() would drop a NaN: a kernel writing NaN must not pass as "ok")
        worst = max(worst, err) if math.isfinite(err) else math.inf
    return "ok" if worst <= tol else f"MISMATCH {worst:.1e}"


def _run_case(case: Case, args: argparse.Namespace, compiled: bool) -> None:
    dtype = _dtype(args.dtype)
    inp = _Inputs(case, dtype, args.rotate_mb)
    case.check = _check(case, inp)
    fns: dict[str, Callable[..., torch.Tensor]] = {"ours": _bn("numba"), "aten": _bn(None)}
    if compiled:
        torch._dynamo.reset()
        cf = torch.compile(_bn(None), dynamic=False)
        t = time.perf_counter()
        for mode in args.modes:  # compile every graph the modes need, untimed
            _timers(cf, inp, mode)(0)
        case.compile_s = time.perf_counter() - t
        fns["inductor"] = cf
    reps = 3 if args.quick else args.reps
    warmup = 1 if args.quick else 2
    dst = torch.empty_like(inp.xs[0].detach())  # the copy's own output (see the top)
    for mode in args.modes:
        stmts: dict[str, Callable[[int], None]] = {
            col: _timers(f, inp, mode) for col, f in fns.items()}
        stmts["copy"] = lambda i: dst.copy_(inp.xs[i % inp.k].detach())
        times, faults = measure_turns(stmts, reps=reps, warmup=warmup,
                                      max_seconds=args.max_seconds)
        for col, ts in times.items():
            case.times[(mode, col)] = median_ms(ts)
            if col != "copy" and math.isfinite(faults[col]):
                case.faults[(mode, col)] = faults[col]


def _first_call(dtype: str) -> list[str]:
    """numba's first-call cost in fresh processes: compiling into an empty cache (numba's,
    and torch's extensions directory for the C++ step), then loading from it (fwd + bwd,
    channels first and last); and when the C++ step became ready (its build runs in a
    background thread while the first calls take the Python path)."""
    code = textwrap.dedent(f"""
        import time, torch
        t0 = time.perf_counter()
        import batchnorm
        from batchnorm.backends import numba_step
        x = torch.randn(4, 8, 6, 6, dtype=torch.{dtype})
        for t in (x, x.contiguous(memory_format=torch.channels_last)):
            t.requires_grad_()
            batchnorm.batch_norm(t, None, None, training=True, backend="numba").sum().backward()
        first = time.perf_counter() - t0
        ready = time.perf_counter() - t0 if numba_step.available() else float("nan")
        print(first, ready)
    """)
    lines = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache,
               "TORCH_EXTENSIONS_DIR": os.path.join(cache, "torch_extensions")}
        for label in ("compile (empty cache)", "load (cached)"):
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env=env, timeout=900)
            text = "failed"
            if r.returncode == 0:
                first, ready = (float(v) for v in r.stdout.strip().splitlines()[-1].split())
                text = f"{first:.2f} s" + (
                    f" (the C++ step ready after {ready:.2f} s)" if math.isfinite(ready)
                    else " (the C++ step is off or did not build)")
            lines.append(f"- numba first call, {label}, {dtype} fwd+bwd cf+cl, import "
                         f"included: {text}")
    return lines


def _crossover(args: argparse.Namespace) -> int:
    """Time ours vs ATen (fwd+bwd and eval) over growing sizes, both layouts."""
    rows = []
    sizes = [(2, 8, 4, 4), (4, 16, 8, 8), (8, 16, 12, 12), (8, 32, 16, 16), (16, 32, 16, 16),
             (16, 64, 16, 16), (32, 64, 16, 16), (32, 64, 32, 32), (32, 64, 56, 56)]
    header = ["shape", "numel", "layout", "fwdbwd aten/ours", "eval aten/ours"]
    cases = [Case("crossover", "x".join(map(str, s)), s, cl) for s in sizes
             for cl in (False, True)]
    print(numba_step_line(), flush=True)
    for case in progress(cases, "crossover", not args.no_progress):
        inp = _Inputs(case, _dtype(args.dtype), args.rotate_mb)
        r = {}
        for mode in ("fwdbwd", "eval"):
            # in turns, as the main table (see measure_turns)
            times, _ = measure_turns(
                {col: _timers(_bn("numba" if col == "ours" else None), inp, mode)
                 for col in ("ours", "aten")},
                reps=args.reps, max_seconds=args.max_seconds)
            for col, t in times.items():
                r[(mode, col)] = median_ms(t)
        rows.append([case.name, math.prod(case.shape), "cl" if case.channels_last else "cf",
                     r[("fwdbwd", "aten")] / r[("fwdbwd", "ours")],
                     r[("eval", "aten")] / r[("eval", "ours")]])
    print(fmt_table(header, rows))
    return 0


def _floor_ms(case: Case, mode: str, bw: float, elem: int) -> float:
    """Time the mode's fewest bytes take at ``bw`` GB/s."""
    return FLOORS[mode] * math.prod(case.shape) * elem / (bw * 1e9) * 1e3


def _faults(c: Case, mode: str) -> str:
    """Page faults per call, ours / ATen: fresh output pages each cost a fault (several us on
    a VM), which shows how much of a time is the allocator's."""
    f = c.faults
    if (mode, "ours") not in f or (mode, "aten") not in f:
        return "n/a"
    return f"{f[(mode, 'ours')]:.0f} / {f[(mode, 'aten')]:.0f}"


def _tables(cases: list[Case], modes: list[str], bw: float, elem: int) -> str:
    out = []
    for mode in modes:
        rows = []
        for c in cases:
            t = c.times
            floor_ms = _floor_ms(c, mode, bw, elem)
            rows.append([c.label, t[(mode, "ours")], t[(mode, "aten")],
                         t.get((mode, "inductor"), math.nan), t[(mode, "copy")],
                         c.ratio(mode, "aten"), c.ratio(mode, "inductor"),
                         t[(mode, "ours")] / t[(mode, "copy")],
                         100 * floor_ms / t[(mode, "ours")], _faults(c, mode)])
        out.append(f"\n### {mode} ({FLOORS[mode]}b floor)\n")
        out.append(fmt_table(["case", "ours ms", "ATen ms", "inductor ms", "copy ms",
                              "ATen/ours", "inductor/ours", "ours/copy", "floor %",
                              "faults ours/ATen"], rows))
    return "\n".join(out)


def _summary(cases: list[Case], bw: float, elem: int) -> list[str]:
    """The issue's targets as MET / MISSED lines (ResNet-50 set for the geomeans)."""
    lines = []
    r50 = [c for c in cases if c.group == "resnet50"]
    for cl, goal in ((False, 3.0), (True, 2.0)):
        sel = [c.ratio("fwdbwd", "aten") for c in r50
               if c.channels_last == cl and ("fwdbwd", "ours") in c.times]
        if sel:
            g = geomean(sel)
            lines.append(f"- ResNet-50 {'channels-last' if cl else 'NCHW'} fwd+bwd geomean "
                         f"ATen/ours {g:.2f}x (target >= {goal:g}x): "
                         f"{'MET' if g >= goal else 'MISSED'}")
    train = [(c, m) for c in cases for m in ("fwd", "bwd", "fwdbwd") if (m, "ours") in c.times]
    if train:
        c, m = min(train, key=lambda cm: cm[0].ratio(cm[1], "aten"))
        r = c.ratio(m, "aten")
        lines.append(f"- slowest training case vs ATen: {c.label} {m} {r:.2f}x (target: no "
                     f"shape slower than ATen): {'MET' if r >= 1.0 else 'MISSED'}")
    ev = [c for c in cases if ("eval", "ours") in c.times]
    if ev:
        c = min(ev, key=lambda c: c.ratio("eval", "aten"))
        r = c.ratio("eval", "aten")
        lines.append(f"- slowest eval case vs ATen: {c.label} {r:.2f}x (target >= 0.9x): "
                     f"{'MET' if r >= 0.9 else 'MISSED'}")
    fb = [c for c in cases if ("fwdbwd", "ours") in c.times]
    if fb:
        def frac(c: Case) -> float:
            return _floor_ms(c, "fwdbwd", bw, elem) / c.times[("fwdbwd", "ours")]
        c = min(fb, key=frac)
        lines.append(f"- furthest training shape from the floor: {c.label} fwd+bwd at "
                     f"{100 * frac(c):.0f}% of the 5b floor (target >= 50%, within 2x): "
                     f"{'MET' if frac(c) >= 0.5 else 'MISSED'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``batchnorm bench`` (``--device cpu``); returns the exit status."""
    args = _parser().parse_args(argv)
    import batchnorm

    if "numba" not in batchnorm.available_backends():
        print("error: the numba backend is not available here (pip install numba)",
              file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _crossover(args) if args.crossover else _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    command = "batchnorm bench " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [f"# CPU BatchNorm benchmark, {_dt.datetime.now().isoformat(timespec='seconds')}",
              "", f"- command: `{command.strip()}`", *machine_lines(),
              f"- load average at start: {load_average()}"]
    print("\n".join(header), flush=True)
    bw = copy_bandwidth(1 << 24 if args.quick else 1 << 28)
    lines = [f"- copy bandwidth (out.copy_(x), {'16' if args.quick else '256'} MiB, read + "
             f"write): {bw:.1f} GB/s"]
    if not (args.quick or args.no_first_call):
        lines += _first_call(args.dtype)
    lines.append(numba_step_line())
    print("\n".join(lines), flush=True)
    header += lines

    cases = _cases(args)
    compiled = not args.no_compile
    for case in progress(cases, "benchmark", not args.no_progress):
        _run_case(case, args, compiled)
        fb = "fwdbwd" if "fwdbwd" in args.modes else args.modes[0]
        print(f"  {case.label}: {fb} ours {case.times[(fb, 'ours')]:.3f} ms, ATen/ours "
              f"{case.ratio(fb, 'aten'):.2f}, check {case.check}"
              + (f", inductor compile {case.compile_s:.1f} s" if compiled else ""),
              file=sys.stderr, flush=True)
    elem = torch.finfo(_dtype(args.dtype)).bits // 8
    tables = _tables(cases, args.modes, bw, elem)
    summary = _summary(cases, bw, elem)
    tail = [f"- load average at end: {load_average()}"]
    if compiled:
        tail.append(f"- inductor compile time per case (all modes, untimed above): median "
                    f"{sorted(c.compile_s for c in cases)[len(cases) // 2]:.1f} s")
    bad = [c.label for c in cases if c.check != "ok"]
    tail.append(f"- correctness check against ATen before timing: "
                f"{'all ok' if not bad else 'MISMATCH in ' + ', '.join(bad)}")
    text = "\n".join(["", tables, "", "## Summary", "", *summary, *tail])
    print(text, flush=True)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        with open(os.path.join(args.out, f"cpu-{stamp}.md"), "w") as f:
            f.write("\n".join(header) + "\n" + text + "\n")
        with open(os.path.join(args.out, f"cpu-{stamp}.csv"), "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["group", "case", "layout", "shape", "mode", *COLUMNS,
                         "faults_ours", "faults_aten"])
            for c in cases:
                for mode in args.modes:
                    wr.writerow([c.group, c.name, "cl" if c.channels_last else "cf",
                                 "x".join(map(str, c.shape)), mode,
                                 *(c.times.get((mode, col), "") for col in COLUMNS),
                                 *(c.faults.get((mode, col), "") for col in ("ours", "aten"))])
    if args.plot:
        why = plot_bars(args.plot, "ATen time / ours (higher is better)",
                        [c.label for c in cases],
                        {m: [c.ratio(m, "aten") for c in cases] for m in args.modes},
                        "speed-up over ATen")
        print(f"- plot: {args.plot}" if why is None else f"- no plot: {why}")
    return 0 if not bad else 1
