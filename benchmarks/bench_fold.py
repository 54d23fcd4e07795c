"""Fold: CPU inference latency of a ResNet-like model, BatchNorm unfolded vs folded.

Variants of the same trained-looking model (random weights, randomized BN statistics), timed
side by side in one run, round-robin (medians over rounds of ``torch.utils.benchmark``
blocks), eval mode, ``torch.no_grad()``:

* ``torch.nn BN``: the model reverted to ``torch.nn.BatchNorm2d`` (ATen's eval kernel);
* ``ours BN``: ``batchnorm.BatchNorm2d`` in eval mode (default backend);
* ``folded``: ``batchnorm.fold(model)``: every BN folded into its convolution;
* ``torch.fx fuse``: ``torch.fx.experimental.optimization.fuse`` on the torch.nn model, as a
  baseline for the folded result.

Each variant's output is checked against the unfolded model first (max abs error printed).

Usage::

    python benchmarks/bench_fold.py [--batch 8] [--size 64] [--width 32] [--blocks 2 2 2 2]
        [--threads N] [--rounds 20] [--backend native] [--clock wall|cpu] [--markdown]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils import benchmark

import batchnorm
from batchnorm.demo import make_resnet_like


def interleaved_medians(
    fns: dict[str, Callable[[torch.Tensor], object]], x: torch.Tensor, rounds: int, clock: str
) -> dict[str, float]:
    """Median seconds per call of each ``fn(x)``, timed round-robin (a block of calls per
    variant per round) so that load changes on a shared machine hit all variants alike.

    ``clock="wall"``: ``torch.utils.benchmark`` blocks. ``clock="cpu"``: this thread's CPU time
    (``time.thread_time``; with one torch thread all the work runs here), which time spent
    waiting for a core shared with other processes does not inflate.
    """
    def block(fn: Callable[[torch.Tensor], object], number: int) -> float:
        if clock == "wall":
            timer = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x})
            return timer.timeit(number).median
        t0 = time.thread_time()
        for _ in range(number):
            fn(x)
        return (time.thread_time() - t0) / number

    first = next(iter(fns.values()))
    number = max(1, int(0.05 / block(first, 3)))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(block(fn, number))
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="input height = width")
    p.add_argument("--width", type=int, default=32, help="channels of the first stage")
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 2, 2, 2])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=20, help="round-robin timing rounds")
    p.add_argument("--backend", default=None,
                   help="backend of our BatchNorm (default: the process default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this thread's CPU time (needs --threads 1)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu measures one thread: pass --threads 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend:
        batchnorm.set_backend(args.backend)

    torch.manual_seed(0)
    ours = make_resnet_like(args.width, tuple(args.blocks), num_classes=1000).eval()
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, batchnorm.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    reverted = batchnorm.revert(copy.deepcopy(ours)).eval()
    folded = batchnorm.fold(ours)
    from torch.fx.experimental.optimization import fuse

    fx_fused = fuse(reverted)
    variants = {"torch.nn BN": reverted, "ours BN": ours, "folded": folded,
                "torch.fx fuse": fx_fused}
    n_bn = sum(isinstance(m, batchnorm.BatchNorm2d) for m in ours.modules())

    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        ref = ours(x)
        errors = {k: float((m(x) - ref).abs().max()) for k, m in variants.items()}
        times = interleaved_medians(variants, x, args.rounds, args.clock)
    rows = [(k, times[k], errors[k]) for k in variants]
    base = times["ours BN"]

    print(f"# ResNet-like ({n_bn} BatchNorm2d, blocks {args.blocks}, width {args.width}), "
          f"input ({args.batch}, 3, {args.size}, {args.size}) fp32, eval, no_grad")
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}, python {platform.python_version()}, "
          f"our backend {batchnorm.backends.resolve_backend(None, x, training=False)}, "
          f"{args.clock} clock")
    if args.markdown:
        print("| variant | median ms | speed-up vs ours BN | max abs diff vs ours BN |")
        print("|---|---|---|---|")
        for name, t, err in rows:
            print(f"| {name} | {t * 1e3:.2f} | {base / t:.2f}x | {err:.1e} |")
    else:
        for name, t, err in rows:
            print(f"{name:>14s}: {t * 1e3:8.2f} ms  {base / t:5.2f}x  max|diff| {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
