"""Fixed cost of one training step: ATen vs ours, and the numba kernels' phases alone.

Two measurements, both medians of alternated rounds in one process:

* ``step`` (default): a fwd+bwd step (``torch.autograd.grad`` of ``y`` w.r.t. x, weight and
  bias) through ``F.batch_norm`` (ATen), ``batchnorm.batch_norm(backend="numba")`` (ours)
  and the numba backend's ``forward_train`` + ``backward`` called directly (``raw``: the
  kernels and the backend's own Python, without the autograd and functional layers). With
  ``--evict`` (default) a 128 MiB copy runs before every step, as another layer's pass over
  memory would, which also evicts the interpreter's code and data: the Python overhead then
  costs several times its warm figure.
* ``phases``: each phase of the numba kernel calls alone (``PackedCall.run`` timed), on the
  thread count set by ``--threads``.

Usage::

    python benchmarks/bench_overhead.py [--shape 32,512,7,7] [--channels-last]
        [--warm] [--threads N] [--rounds 60] [--phases]

Run it with ``PYTHONPATH=<other checkout>/src`` as well to compare two versions.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import batchnorm
from batchnorm.backends import get_backend


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,C,... integers, got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected at least N,C, all >= 1, got {text!r}")
    return shape


def _steps(shape: tuple[int, ...], channels_last: bool) -> dict[str, Callable[[int], None]]:
    c = shape[1]
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    def make() -> torch.Tensor:
        t = torch.randn(shape)
        return t.contiguous(memory_format=fmt) if channels_last else t
    xs = [make().requires_grad_() for _ in range(4)]
    dy = make()
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)
    be = get_backend("numba")

    def aten(i: int) -> None:
        x = xs[i % 4]
        torch.autograd.grad(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5), (x, w, b), dy)

    def ours(i: int) -> None:
        x = xs[i % 4]
        y = batchnorm.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, backend="numba")
        torch.autograd.grad(y, (x, w, b), dy)

    def raw(i: int) -> None:
        x, wd, bd = xs[i % 4].detach(), w.detach(), b.detach()
        _, mean, invstd, _, _ = be.forward_train(x, wd, bd, rm, rv, 0.1, 1e-5)
        be.backward(dy, x, wd, mean, invstd, True, (True, True, True))

    return {"aten": aten, "ours": ours, "raw": raw}


def _step_report(args: argparse.Namespace) -> None:
    steps = _steps(args.shape, args.channels_last)
    big, big2 = torch.empty(16 << 20), torch.empty(16 << 20)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds + 3):
        for name, step in steps.items():
            if not args.warm:
                big2.copy_(big)
            t = time.perf_counter()
            step(r)
            if r >= 3:  # (the first rounds compile and warm up)
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    layout = "cl" if args.channels_last else "cf"
    print(f"{args.shape} {layout} {'warm' if args.warm else 'evicted'}, "
          f"{torch.get_num_threads()} threads, fwd+bwd ms: "
          + " ".join(f"{k}={v:.3f}" for k, v in med.items())
          + f"  ATen/ours={med['aten'] / med['ours']:.2f}")


def _phase_report(args: argparse.Namespace) -> None:
    from batchnorm.backends import numba_backend as nb

    steps = _steps(args.shape, args.channels_last)
    steps["raw"](0)  # compile, and load the entry module
    packed = nb._MODULES["entry"].PackedCall
    run = packed.run
    seen: dict[tuple[str, int], list[float]] = {}

    def timed(call: object) -> None:
        t = time.perf_counter()
        run(call)
        key = (call.entry.name, int(call.buf[nb._MODULES["entry"].PHASE]))
        seen.setdefault(key, []).append(time.perf_counter() - t)

    packed.run = timed
    try:
        for r in range(args.rounds):
            steps["raw"](r)
    finally:
        packed.run = run
    for (name, phase), v in seen.items():
        print(f"{name} phase {phase}: {statistics.median(v) * 1e6:.1f} us "
              f"(one thread's share; {len(v)} runs)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=_shape, default=(32, 512, 7, 7))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--warm", action="store_true", help="no cache eviction between steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--phases", action="store_true", help="time the kernel phases alone")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    (_phase_report if args.phases else _step_report)(args)


if __name__ == "__main__":
    main()
