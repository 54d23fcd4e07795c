"""SyncBatchNorm overhead: training step time against local BN with W gloo processes (CPU).

Every rank trains the same ResNet-like stack on its own batch; per step (forward + backward, no
optimizer, no DDP) the variants run round-robin after a barrier, so every variant sees the same
machine state:

* ``torch.nn.BatchNorm2d`` (local, ATen),
* ``batchnorm.BatchNorm2d`` (local, ``--backend``),
* ``batchnorm.SyncBatchNorm`` (the same model converted with ``convert_sync_batchnorm``),
* the synchronized code path over a one-rank group (its computation without communication).

``--bn-only`` times the network's BN layers alone, each on a random input of the shape it sees
in the network, so that BN and its collectives are the whole step.

The collectives of the SyncBatchNorm step are counted by wrapping ``torch.distributed``'s
``all_gather``/``all_gather_single``/``all_reduce``: calls and payload bytes per layer, against
the packet sizes the design predicts (forward: each rank sends ``k + 2C`` values and receives
``W (k + 2C)``, ``k`` = 2 for a float32 packet (the int64 count in two slots), 1 for float64;
backward: an all-reduce of ``2C`` values). A micro-benchmark of one small all-gather and one
all-reduce gives the latency floor of the overhead.

Run::

    python benchmarks/bench_sync.py --world 2 --steps 40
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm import convert_sync_batchnorm


def block(cin: int, cout: int, stride: int, bn: Callable[[int], nn.Module]) -> nn.Module:
    """A ResNet basic block: conv-BN-ReLU-conv-BN + shortcut (1x1 conv + BN when reshaped)."""

    class Basic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = bn(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = bn(cout)
            self.short = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))
                if stride != 1 or cin != cout else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

    return Basic()


def resnet_like(widths: list[int], bn: Callable[[int], nn.Module]) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), bn(widths[0]),
                               nn.ReLU()]
    cin = widths[0]
    for i, w in enumerate(widths):
        layers += [block(cin, w, 1 if i == 0 else 2, bn), block(w, w, 1, bn)]
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


class CollectiveCounter:
    """Wraps torch.distributed's collectives; records (op, payload bytes sent) per call."""

    OPS = ("all_gather", "all_gather_single", "all_gather_into_tensor", "all_reduce")

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.active = False
        for op in self.OPS:
            if hasattr(dist, op):
                setattr(dist, op, self._wrap(op, getattr(dist, op)))

    def _wrap(self, op: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            if self.active:
                t = args[1] if op != "all_reduce" else args[0]
                self.calls.append((op, t.numel() * t.element_size()))
            return fn(*args, **kwargs)

        return wrapped


class BNOnly(nn.Module):
    """The BatchNorm layers of ``model`` alone, each fed a fixed random input of the shape it
    sees in ``model`` (inputs require grad, so backward computes dx as in the network)."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.bns = nn.ModuleList(m for m in model.modules() if isinstance(m, _BatchNorm))
        shapes: list[torch.Size] = []
        hooks = [bn.register_forward_pre_hook(lambda _, inp: shapes.append(inp[0].shape))
                 for bn in self.bns]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        gen = torch.Generator().manual_seed(1)
        self.inputs = [torch.randn(s, generator=gen).to(memory_format=_layout(x))
                       .requires_grad_() for s in shapes]

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        for t in self.inputs:
            t.grad = None
        return torch.stack([bn(t).square().mean() for bn, t in zip(self.bns, self.inputs)])


class SoloSync(batchnorm.SyncBatchNorm):
    """SyncBatchNorm's synchronized code path over a group of this rank alone: the cost of its
    computation (stats, then apply: two passes) without the communication."""

    def _sync_group(self):
        return (self.process_group, 1) if self.training else None


def _layout(x: torch.Tensor) -> torch.memory_format:
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def latency(fn: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(args.threads)
    counter = CollectiveCounter()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    widths = [int(c) for c in args.channels.split(",")]
    torch.manual_seed(0)
    variants = {
        "torch.nn.BatchNorm2d (local)": resnet_like(widths, nn.BatchNorm2d),
        f"batchnorm.BatchNorm2d (local, {args.backend})": resnet_like(
            widths, lambda c: batchnorm.BatchNorm2d(c, backend=args.backend)),
    }
    variants[f"batchnorm.SyncBatchNorm ({args.backend})"] = convert_sync_batchnorm(
        resnet_like(widths, lambda c: batchnorm.BatchNorm2d(c, backend=args.backend)))
    solo_group = [dist.new_group([r]) for r in range(world)][rank]  # every rank makes each
    solo = convert_sync_batchnorm(
        resnet_like(widths, lambda c: batchnorm.BatchNorm2d(c, backend=args.backend)), solo_group)
    for m in solo.modules():
        if isinstance(m, batchnorm.SyncBatchNorm):
            m.__class__ = SoloSync
    variants[f"sync code path, 1-rank group ({args.backend})"] = solo
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        for m in variants.values():
            m.to(memory_format=torch.channels_last)
    if args.bn_only:
        variants = {k: BNOnly(m, x) for k, m in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.warmup + args.steps):
        for name, model in variants.items():
            dist.barrier()
            t0 = time.perf_counter()
            step(model, x)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    sync_model = next(m for k, m in variants.items() if k.startswith("batchnorm.SyncBatchNorm"))
    layers = [m.num_features for m in sync_model.modules()
              if isinstance(m, batchnorm.SyncBatchNorm)]
    counter.active = True
    step(sync_model, x)
    counter.active = False

    small = torch.zeros(2 + 2 * 64)
    gathered = [torch.empty_like(small) for _ in range(world)]
    lat_gather = latency(lambda: dist.all_gather(gathered, small), 50)
    lat_reduce = latency(lambda: dist.all_reduce(small[: 2 * 64]), 50)
    local, sync = (next(v for k, v in times.items() if k.startswith(key))
                   for key in ("batchnorm.BatchNorm2d", "batchnorm.SyncBatchNorm"))
    diffs = [a - b for a, b in zip(sync, local)]  # paired: same round, same machine state
    if rank == 0:
        out.update(
            diff=(statistics.median(diffs), *statistics.quantiles(diffs, n=5)[::3]),
            times={k: statistics.median(v) for k, v in times.items()},
            q=({k: (statistics.quantiles(v, n=5)[0], statistics.quantiles(v, n=5)[-1])
                for k, v in times.items()}),
            layers=layers, calls=counter.calls, lat=(lat_gather, lat_reduce),
        )
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16, help="per rank")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", default="32,64,128")
    p.add_argument("--backend", default="native")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bn-only", action="store_true",
                   help="time the network's BN layers alone (at their shapes), without convs")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                   help="intra-op threads per process")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(worker, args=(args.world, port, args, out), nprocs=args.world)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"torch {torch.__version__}; python {platform.python_version()}")
    layout = " channels-last" if args.channels_last else ""
    stack = "BN layers only" if args.bn_only else "ResNet-like"
    print(f"{stack}; world {args.world} gloo processes x {args.threads} threads; per-rank input "
          f"({args.batch}, 3, {args.size}, {args.size}){layout}; widths {args.channels}; "
          f"{len(out['layers'])} BN layers; {args.steps} steps")
    print()
    print("| variant | step median (ms) | p20-p80 (ms) | vs local batchnorm |")
    print("|---|---|---|---|")
    base = next(v for k, v in out["times"].items() if k.startswith("batchnorm.BatchNorm2d"))
    for k, v in out["times"].items():
        lo, hi = out["q"][k]
        print(f"| {k} | {v * 1e3:.2f} | {lo * 1e3:.2f}-{hi * 1e3:.2f} | {v / base:.2f}x |")
    n = len(out["layers"])
    d, d20, d80 = out["diff"]
    print(f"\noverhead per step (median of paired differences sync - local): {d * 1e3:.2f} ms "
          f"(p20-p80 {d20 * 1e3:.2f} to {d80 * 1e3:.2f}) = {d / n * 1e6:.0f} us per BN layer; "
          f"gloo latency (W={args.world}, 130 floats): all_gather {out['lat'][0] * 1e6:.0f} us, "
          f"all_reduce {out['lat'][1] * 1e6:.0f} us")

    calls = out["calls"]
    gathers = [b for op, b in calls if op != "all_reduce"]
    reduces = [b for op, b in calls if op == "all_reduce"]
    print(f"\ncollectives per step: {len(gathers)} all-gathers + {len(reduces)} all-reduces for "
          f"{n} layers (a layer whose input needs no gradient skips its all-reduce)")
    # float32 packets: an int64 count in 2 slots + mean(C) + M2(C); the all-reduce is 2C values
    layers = out["layers"]
    predicted_reduces = sorted(8 * c for c in layers)  # every BN input here needs a dx
    print("\n| C | layers | gather sent/rank (B) | gather received/rank (B) | all-reduce (B) |")
    print("|---|---|---|---|---|")
    for c in sorted(set(layers)):
        sent = {g for g, lc in zip(gathers, layers) if lc == c}
        assert sent == {4 * (2 + 2 * c)}, (c, sent)
        g = sent.pop()
        print(f"| {c} | {layers.count(c)} | {g} | {args.world * g} | {8 * c} |")
    assert sorted(reduces) == predicted_reduces, (reduces, predicted_reduces)
    print("(measured sizes equal the predicted 4 (2 + 2C) B gathered and 8C B all-reduced)")
    total = sum(gathers) * args.world + sum(reduces)
    print(f"\nper step and rank: {sum(gathers)} B sent + {sum(gathers) * args.world} B received "
          f"by the gathers, {sum(reduces)} B all-reduced; {total / 1024:.1f} KiB in all")


if __name__ == "__main__":
    main()
