"""The C++ front door (``front`` in ``backends/numba_step.cpp``) on and off, side by side.

A ``BatchNormAct*d(activation="leaky_relu")`` layer with a residual (in place by default;
``--out-of-place`` for the plain fused call) on the numba backend, each call made once with
the front door and once through the Python layers, in shuffled turns, inputs rotated over
64 MiB. Training: ``m(leaf * 1.0, r)`` then ``backward`` (in-place mode refuses a leaf: the
multiply is a stand-in producer, on both sides); eval: the forward under ``no_grad``.
Reports each side's median and the median of the per-round ratios (Python path / front).

Usage::

    python benchmarks/bench_front.py [--rounds 500] [--shapes 8,64,28,28 32,512,7,7 ...]
        [--out-of-place]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

import batchnorm
from batchnorm.backends import eager_front, numba_step
from batchnorm.benchmarking.common import measure_turns, median_ms

SHAPES = ["8,64,28,28", "32,512,7,7", "32,256,14,14", "64,512,200"]


def _paired(step: Callable[[int], None], fn: Callable[..., object], rounds: int
            ) -> tuple[float, float, float]:
    """(front ms, Python path ms, median per-round ratio) of ``step`` over ``rounds`` rounds
    of :func:`~batchnorm.benchmarking.common.measure_turns` (shuffled turns)."""

    def through(front: bool) -> Callable[[int], None]:
        def call(i: int) -> None:
            eager_front["fn"] = fn if front else None
            step(i)
        return call

    try:
        times, _ = measure_turns({"front": through(True), "python": through(False)},
                                 reps=rounds, warmup=20, max_seconds=1e9)
    finally:
        eager_front["fn"] = fn
    ratio = statistics.median(b / a for a, b in zip(times["front"], times["python"]))
    return median_ms(times["front"]), median_ms(times["python"]), ratio


def _row(shape: tuple[int, ...], inplace: bool, fn: Callable[..., object], rounds: int) -> str:
    """One shape's training and eval cells."""
    cls = {3: batchnorm.BatchNormAct1d, 4: batchnorm.BatchNormAct2d,
           5: batchnorm.BatchNormAct3d}[len(shape)]
    m = cls(shape[1], activation="leaky_relu", negative_slope=0.1, inplace=inplace,
            backend="numba")
    k = max(2, (64 << 20) // (torch.Size(shape).numel() * 4))
    leaves = [torch.randn(shape).requires_grad_() for _ in range(k)]
    res, dys, plain = ([torch.randn(shape) for _ in range(k)] for _ in range(3))

    def train_step(i: int) -> None:
        i %= k
        m(leaves[i] * 1.0, res[i]).backward(dys[i])

    def eval_step(i: int) -> None:
        i %= k
        with torch.no_grad():
            m(plain[i], res[i])

    cells = []
    for mode, step in (("train", train_step), ("eval", eval_step)):
        m.train(mode == "train")
        front, python, ratio = _paired(step, fn, rounds)  # (its warm-up: recipes, caches)
        cells.append(f"{mode} {front:.3f} / {python:.3f} ({ratio:.2f}x)")
    return "  ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--out-of-place", action="store_true")
    args = parser.parse_args()
    if numba_step._ext() is None:
        raise SystemExit("the C++ step is off or did not build here: no front door to time")
    fn = eager_front["fn"]
    assert fn is not None
    inplace = not args.out_of_place
    torch.manual_seed(0)
    print(f"BatchNormAct(leaky_relu) + residual, inplace={inplace}, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads (ms: front / Python path, ratio)")
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split(","))
        print(f"{text:>14}  {_row(shape, inplace, fn, args.rounds)}", flush=True)


if __name__ == "__main__":
    main()
