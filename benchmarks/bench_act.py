"""BatchNorm + activation + residual: fused vs eager PyTorch's composite, speed and memory.

For each shape, one training step (forward + backward) of

* eager: ``relu(torch.nn.BatchNorm2d(x) + r)`` (three ops, three passes each way);
* ours: ``batchnorm.BatchNormAct2d(activation="relu")(x, r)`` for each requested backend;
* ours in place: ``BatchNormAct2d(activation="leaky_relu", inplace=True)``, on the output of a
  stand-in producer ``x0 * 1.0`` (in-place mode refuses a leaf), compared with eager on the
  same producer (both times include the producer's pass each way);

timed side by side in one run: the variants take turns, one call each per round, and each
one's median over the rounds is reported (a shared machine's drift then hits every column
alike, where timing one variant after the other let it pick a winner), plus the
activation-sized bytes autograd saves for backward (``saved_tensors_hooks``).

Usage::

    python benchmarks/bench_act.py [--device cpu|cuda] [--backends numba native]
        [--shapes r50_c64_h56 r50_c256_h14 ...] [--min-run-time 1.0] [--threads N]
        [--channels-last]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from collections.abc import Callable

import torch

import batchnorm
from batchnorm.benchmarking.common import measure_turns, numba_step_line
from batchnorm.catalog import RESNET50_N32


def saved_bytes(fn, channels: int) -> int:
    """Bytes of the distinct storages saved for backward while ``fn`` runs, per-channel
    vectors (``channels`` values or fewer) left out; the numba backend's one-bit activation
    mask counts."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() > channels:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def interleaved_medians(stmts: dict[str, Callable[[], None]], min_run_time: float,
                        dev: torch.device) -> dict[str, float]:
    """Median seconds per call of each statement, timed in turns (one call of each per round,
    :func:`batchnorm.benchmarking.common.measure_turns`) for about ``min_run_time`` seconds
    per statement."""
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
    times, _ = measure_turns({k: (lambda i, f=f: f()) for k, f in stmts.items()}, reps=500,
                             warmup=2, max_seconds=min_run_time, sync=sync)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_shape(name: str, shape: tuple[int, ...], dev: torch.device, dtype: torch.dtype,
                  backends: list[str], min_run_time: float,
                  channels_last: bool = False) -> tuple[list[str], list[float]]:
    """One table row: eager vs ours (each backend) vs ours in place, times and saved bytes."""
    c = shape[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x0 = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    r = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    eager_bn = torch.nn.BatchNorm2d(c, device=dev)

    def step(fn, copy_first: bool = False):
        def run():
            x = x0.detach().requires_grad_()
            fn(x * 1.0 if copy_first else x).backward(dy)
        return run

    # In-place mode refuses a leaf, so its input is x0 * 1.0 (as a conv output would be an
    # intermediate); it is compared with eager on the same producer, timed in the same turns
    # (subtracting the producer timed alone went negative where its page faults varied).
    m_in = batchnorm.BatchNormAct2d(c, activation="leaky_relu", inplace=True,
                                    backend=backends[0], device=dev)
    eager = lambda h: torch.relu(eager_bn(h) + r)
    stmts = {"eager": step(eager)}
    for be in backends:
        m = batchnorm.BatchNormAct2d(c, activation="relu", backend=be, device=dev)
        stmts[be] = step(lambda h, m=m: m(h, r))
    stmts["eager_produced"] = step(eager, copy_first=True)
    stmts["inplace"] = step(lambda h: m_in(h, r), copy_first=True)
    t = interleaved_medians(stmts, min_run_time, dev)
    t_eager = t["eager"]
    row, ratios = [name, f"{t_eager * 1e3:.2f}"], []
    for be in backends:
        ratios.append(t_eager / t[be])
        row += [f"{t[be] * 1e3:.2f}", f"{t_eager / t[be]:.2f}"]
    row += [f"{t['inplace'] * 1e3:.2f}", f"{t['eager_produced'] / t['inplace']:.2f}"]
    m_relu = batchnorm.BatchNormAct2d(c, activation="relu", backend=backends[0], device=dev)
    xg = x0.detach().requires_grad_()
    for res in (None, r):
        sizes = [
            saved_bytes(lambda res=res: torch.relu(eager_bn(xg * 1.0) + (0 if res is None
                                                                        else res)), c),
            saved_bytes(lambda res=res: m_relu(xg * 1.0, res), c),
            saved_bytes(lambda res=res: m_in(xg * 1.0, res), c),
        ]
        row.append(" / ".join(f"{b / 2**20:.1f}" for b in sizes))
    return row, ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", nargs="+", default=None,
                   help="our backends to time (default: auto)")
    p.add_argument("--shapes", nargs="+", default=None, help="names from the ResNet-50 set")
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    p.add_argument("--channels-last", action="store_true",
                   help="inputs, residual and gradient in channels-last (NHWC) memory")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    shapes = [(n, s) for n, s in RESNET50_N32 if args.shapes is None or n in args.shapes]
    if args.shapes is None:
        shapes = [s for s in shapes if s[0] in ("r50_c64_h56", "r50_c256_h56", "r50_c256_h14",
                                                  "r50_c512_h28", "r50_c2048_h7")]
    backends = args.backends or ["auto"]
    layout = "channels-last" if args.channels_last else "NCHW"
    print(f"# BN + ReLU + residual, fwd+bwd, {args.dtype} {layout} on {args.device}; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    if args.device == "cpu" and any(b in ("numba", "auto") for b in backends):
        print(numba_step_line())
    print("| shape | eager ms | " + " | ".join(f"{b} ms | {b} x" for b in backends)
          + " | inplace ms | inplace x | saved MB eager / relu / inplace | same with residual |")
    print("|---|---|" + "---|---|" * len(backends) + "---|---|---|---|")
    speedups: dict[str, list[float]] = {b: [] for b in backends}
    for name, shape in shapes:
        row, ratios = measure_shape(name, shape, dev, dtype, backends, args.min_run_time,
                                    args.channels_last)
        for be, ratio in zip(backends, ratios):
            speedups[be].append(ratio)
        print("| " + " | ".join(row) + " |")
        sys.stdout.flush()
    for be, s in speedups.items():
        if s:
            print(f"\ngeomean speed-up of {be} over eager: {statistics.geometric_mean(s):.2f}x")
    print("\nSaved bytes count the block's own tensors beyond per-channel vectors; the "
          "residual is counted when the block saves it (in place ours does; in a ResNet it "
          "is the block input, which the first conv saves anyway). Out of place, numba's "
          "relu saves x and a one-bit mask instead of the residual.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
