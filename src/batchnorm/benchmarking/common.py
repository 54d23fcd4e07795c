"""Shared pieces of the benchmarks: timing with medians, copy bandwidth, machine description,
progress indicator, markdown tables and an optional PNG plot.

Nothing here imports numba, triton or matplotlib at module level.
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

__all__ = [
    "copy_bandwidth",
    "fmt_table",
    "geomean",
    "load_average",
    "machine_lines",
    "measure",
    "numba_step_line",
    "plot_bars",
    "progress",
]

T = TypeVar("T")


def measure(fn: Callable[[int], Any], *, reps: int = 20, warmup: int = 2,
            max_seconds: float = 3.0) -> list[float]:
    """Wall times (seconds) of ``fn(i)`` for ``i = 0, 1, ...``: ``warmup`` untimed calls, then
    ``reps`` timed ones (fewer if ``max_seconds`` runs out, but at least 3). ``i`` lets the
    caller rotate through several inputs so that each call starts from memory, not cache."""
    for i in range(warmup):
        fn(i)
    times: list[float] = []
    start = time.perf_counter()
    for i in range(reps):
        t = time.perf_counter()
        fn(warmup + i)
        times.append(time.perf_counter() - t)
        if len(times) >= 3 and time.perf_counter() - start > max_seconds:
            break
    return times


def measure_turns(fns: dict[str, Callable[[int], Any]], *, reps: int = 20, warmup: int = 2,
                  max_seconds: float = 3.0, sync: Callable[[], Any] | None = None
                  ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Wall times (seconds) of several statements timed in turns: each round calls every one
    once, in an order shuffled each round (a fixed seed), so that a shared machine's drift,
    and the state one leaves behind for the next (the caches, torch's OpenMP threads still
    spinning after an ATen op, the allocator's free lists), falls on all of them alike, as it
    does between the layers of a network. (An order that only turned by one each round kept
    the cycle: with three statements, each followed the same one in two rounds of three.)
    The ``j``-th call of round ``k`` gets ``i = k * len(fns) + j`` (consecutive calls rotate
    inputs). At least 3 rounds, at most ``reps``, until about ``max_seconds`` per statement.
    ``sync`` (``torch.cuda.synchronize``, say) runs before and after each timed call.

    Returns ``(times, faults)``: per statement, its times and its minor page faults per call
    (NaN where they cannot be counted)."""
    names = list(fns)
    for w in range(warmup):
        for j, name in enumerate(names):
            fns[name](w * len(names) + j)
    times: dict[str, list[float]] = {n: [] for n in names}
    faults = dict.fromkeys(names, 0)
    start = time.perf_counter()
    rng = random.Random(0)
    order = list(names)
    for k in range(reps):
        last = order[-1]
        rng.shuffle(order)
        if order[0] == last and len(order) > 1:  # not twice in a row across rounds
            order = order[1:] + order[:1]
        for j, name in enumerate(order):
            if sync is not None:
                sync()
            f0 = minor_faults()
            t = time.perf_counter()
            fns[name]((warmup + k) * len(names) + j)
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - t)
            f1 = minor_faults()
            if f0 is not None and f1 is not None:
                faults[name] += f1 - f0
        if k >= 2 and time.perf_counter() - start > max_seconds * len(names):
            break
    counted = minor_faults() is not None
    return times, {n: faults[n] / len(times[n]) if counted else math.nan for n in names}


def median_ms(times: Sequence[float]) -> float:
    return statistics.median(times) * 1e3


def geomean(values: Iterable[float]) -> float:
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else float("nan")


def copy_bandwidth(nbytes: int = 1 << 28, reps: int = 7) -> float:
    """Memory bandwidth in GB/s (bytes read + written) of ``out.copy_(x)`` between two
    preallocated buffers of ``nbytes`` (several times any last-level cache, and no page
    faults on the output, unlike a fresh ``clone`` of that size)."""
    x = torch.ones(nbytes // 4)
    out = torch.empty_like(x)
    times = measure(lambda i: out.copy_(x), reps=reps, warmup=1, max_seconds=10.0)
    return 2 * nbytes / statistics.median(times) / 1e9


def minor_faults() -> int | None:
    """This process's minor page faults so far (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def numba_step_line() -> str:
    """Wait until the numba backend's eager step in C++ is built or loaded (its first use
    starts the build in a background thread, and calls take the Python path until it is
    ready: timings taken meanwhile measure that path, with a compiler on the other core),
    and say which path the numba columns time."""
    from batchnorm.backends import numba_step

    t = time.perf_counter()
    on = numba_step.available()
    took = time.perf_counter() - t
    if on:
        return (f"- numba eager step: C++ (`backends/numba_step.cpp`; built or loaded in "
                f"{took:.1f} s)")
    return ("- numba eager step: Python path (the C++ step is off, or failed to build: "
            "BATCHNORM_NUMBA_CPP, a C++ compiler and ninja)")


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def machine_lines() -> list[str]:
    """Markdown bullet lines describing the machine and the software."""
    lines = [
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores; "
        f"torch threads {torch.get_num_threads()}",
        f"- Python {platform.python_version()}, torch {torch.__version__}",
    ]
    try:
        import numba

        lines[-1] += f", numba {numba.__version__}"
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        lines.append(f"- memory: {kb / 2**20:.0f} GiB; {platform.platform()}")
    except (OSError, ValueError, IndexError):
        lines.append(f"- {platform.platform()}")
    return lines


def progress(items: Sequence[T], desc: str, enabled: bool = True) -> Iterator[T]:
    """Iterate with a tqdm bar on stderr (plain ``[i/n]`` lines without tqdm)."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        for i, item in enumerate(items):
            print(f"[{i + 1}/{len(items)}] {desc}", file=sys.stderr, flush=True)
            yield item
        return
    yield from tqdm(items, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)


def fmt_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; floats get 3 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if not math.isfinite(v) else f"{v:.3g}"
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    out = [line, sep]
    out += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in body]
    return "\n".join(out)


def plot_bars(path: str, title: str, labels: Sequence[str],
              series: dict[str, Sequence[float]], ylabel: str) -> str | None:
    """Grouped bar chart (log scale, a line at 1) to ``path`` (PNG); returns None, or why no
    plot was made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    n = len(series)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(min(24.0, max(8.0, 0.35 * len(labels) + 2)), 6))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
