"""Worker side of tests/test_sync.py: one process of a gloo world on loopback.

:func:`entry` runs a named scenario and puts ``(rank, [(check, error or None, detail), ...])`` on
the parent's queue. Scenarios run many checks in one world (process start-up costs seconds); a
failing check records its error and the next one runs. Every rank holds the same full batch
(seeded generators), runs SyncBatchNorm on its shard and compares with single-process BatchNorm
on the concatenated batch, so no tensors travel back to the parent.
"""

from __future__ import annotations

import copy
import os
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import batchnorm
from batchnorm import SyncBatchNorm, convert_sync_batchnorm
from batchnorm import reference as ref
from helpers import STAT_TOLERANCES, TOLERANCES, assert_close, is_channels_last, make_input

Results = list[tuple[str, str | None, str]]

# Fused CPU backends join when they are available; triton on CPU only runs interpreted (slow).
BACKENDS = [b for b in ("torch", "native", "numba") if b in batchnorm.available_backends()]
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def init(rank: int, world: int, port: int, timeout_s: float) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def entry(scenario: str, rank: int, world: int, port: int, timeout_s: float, queue: Any) -> None:
    """Process target: run ``scenario`` and report to ``queue``."""
    torch.set_num_threads(1)  # several ranks share few cores
    results: Results = []
    try:
        SCENARIOS[scenario](rank, world, port, timeout_s, results)
    except BaseException as exc:
        results.append((f"{scenario} (whole scenario)", _describe(exc), ""))
    queue.put((rank, results))
    if dist.is_initialized():
        dist.destroy_process_group()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_tb(exc.__traceback__))}"


def _check(results: Results, name: str, fn: Callable[[], Any]) -> None:
    try:
        detail = fn()
        results.append((name, None, "" if detail is None else str(detail)))
    except Exception as exc:
        results.append((name, _describe(exc), ""))


# ---- sharded forward/backward/running stats against single-process BN ---------------------------
def _shard_case(
    rank: int,
    splits: list[int],
    spatial: tuple[int, ...],
    dtype: torch.dtype,
    channels_last: bool,
    backend: str,
    group: Any = None,
    steps: int = 1,
    **module_kwargs: Any,
) -> str:
    """Run SyncBatchNorm on this rank's shard of a batch split ``splits`` (rows per rank of the
    group) and compare output, dx, the group sums of dweight/dbias and the running buffers with
    torch.nn.BatchNorm and the NumPy reference on the whole batch, for ``steps`` steps."""
    channels = 3
    n = sum(splits)
    shape = (n, channels, *spatial)
    lo = sum(splits[:rank])
    rows = slice(lo, lo + splits[rank])
    gen = torch.Generator().manual_seed(1234 + n)
    full_bn = TORCH_BN[len(shape)](channels, dtype=dtype, **module_kwargs)
    with torch.no_grad():
        if full_bn.weight is not None:
            full_bn.weight.copy_(1 + 0.2 * torch.randn(channels, generator=gen, dtype=dtype))
            full_bn.bias.copy_(0.3 * torch.randn(channels, generator=gen, dtype=dtype))
        if full_bn.running_mean is not None:
            full_bn.running_mean.copy_(torch.randn(channels, generator=gen, dtype=dtype))
            full_bn.running_var.copy_(0.5 + torch.rand(channels, generator=gen, dtype=dtype))
    sync = SyncBatchNorm(channels, process_group=group, dtype=dtype, backend=backend,
                         **module_kwargs)
    sync.load_state_dict(full_bn.state_dict())
    np_bn = ref.BatchNorm(channels, eps=full_bn.eps, momentum=full_bn.momentum,
                          affine=full_bn.affine, track_running_stats=full_bn.track_running_stats)
    np_bn.load_state_dict({k: v.double().numpy() for k, v in full_bn.state_dict().items()})
    tol, stol = TOLERANCES[dtype], STAT_TOLERANCES[dtype]
    for step in range(steps):
        seed = 100 * step + n
        x = make_input(shape, dtype, channels_last=channels_last, seed=seed)
        dy = make_input(shape, dtype, channels_last=channels_last, seed=seed + 1, shift=0.1,
                        scale=1.0)
        full_bn.zero_grad()
        sync.zero_grad()
        xf = x.clone().requires_grad_()
        yf = full_bn(xf)
        yf.backward(dy)
        y_np = np_bn.forward(x.double().numpy())
        dx_np = np_bn.backward(dy.double().numpy())

        xs = x[rows].detach().requires_grad_()
        ys = sync(xs)
        ys.backward(dy[rows])
        what = f"step {step}"
        assert_close(ys, yf[rows], *tol, f"{what} y vs torch.nn")
        assert_close(ys, y_np[rows], *tol, f"{what} y vs reference")
        assert_close(xs.grad, xf.grad[rows], *tol, f"{what} dx vs torch.nn")
        assert_close(xs.grad, dx_np[rows], *tol, f"{what} dx vs reference")
        if channels_last and splits[rank] > 1:
            assert is_channels_last(ys) and is_channels_last(xs.grad), "layout not kept"
        for name in ("weight", "bias"):
            p = getattr(sync, name)
            if p is None:
                continue
            total = p.grad.clone()  # local sums; DDP would reduce them
            dist.all_reduce(total, group=group)
            assert_close(total, getattr(full_bn, name).grad, *tol, f"{what} group sum d{name}")
        for name in ("running_mean", "running_var"):
            if getattr(sync, name) is not None:
                assert_close(getattr(sync, name), getattr(full_bn, name), *stol, f"{what} {name}")
                assert_close(getattr(sync, name), getattr(np_bn, name), *stol,
                             f"{what} {name} vs reference")
        if sync.num_batches_tracked is not None:
            assert int(sync.num_batches_tracked) == int(full_bn.num_batches_tracked)
    return f"shard {tuple(xs.shape)} of {shape}"


def _cases(world: int) -> list[tuple[str, dict]]:
    """(name, kwargs of _shard_case) for a world of ``world`` ranks."""
    uneven = {2: [3, 5], 3: [2, 5, 3]}[world]
    one_empty = {2: [0, 6], 3: [4, 0, 3]}[world]
    one_row = {2: [1, 4], 3: [1, 3, 1]}[world]
    cases = []
    for b in BACKENDS:
        cases += [
            (f"{b} 4D fp64 uneven", dict(splits=uneven, spatial=(4, 5), dtype=torch.float64,
                                         channels_last=False, backend=b)),
            (f"{b} 4D fp32 channels-last one empty rank",
             dict(splits=one_empty, spatial=(5, 3), dtype=torch.float32, channels_last=True,
                  backend=b)),
            (f"{b} 2D fp64 one-row shard", dict(splits=one_row, spatial=(), dtype=torch.float64,
                                                channels_last=False, backend=b)),
            (f"{b} 3D fp32 uneven", dict(splits=uneven, spatial=(7,), dtype=torch.float32,
                                         channels_last=False, backend=b)),
            (f"{b} 5D fp64 channels-last one empty rank",
             dict(splits=one_empty, spatial=(2, 3, 4), dtype=torch.float64, channels_last=True,
                  backend=b)),
            (f"{b} 5D fp32 uneven", dict(splits=uneven, spatial=(3, 2, 2), dtype=torch.float32,
                                         channels_last=False, backend=b)),
        ]
    base = dict(splits=uneven, spatial=(3, 3), dtype=torch.float64, channels_last=False,
                backend="torch")
    cases += [
        ("momentum=None, 3 steps", {**base, "momentum": None, "steps": 3}),
        ("momentum=0.3 eps=1e-3, 2 steps", {**base, "momentum": 0.3, "eps": 1e-3, "steps": 2}),
        ("affine=False", {**base, "affine": False}),
        ("track_running_stats=False", {**base, "track_running_stats": False}),
    ]
    return cases


# ---- the other checks of the main worlds --------------------------------------------------------
def _total_one_value_raises(rank: int, world: int) -> str:
    """One value per channel in total (a (1, C) shard on rank 0, empty shards elsewhere):
    every rank raises, and no state changed (with momentum=None the next step's weight is
    then 1, as for a first batch)."""
    for spatial in ((), (1, 1)):
        bn = SyncBatchNorm(4, momentum=None)
        x = torch.randn((1 if rank == 0 else 0, 4, *spatial))
        try:
            bn(x)
        except ValueError as exc:
            assert "Expected more than 1 value per channel when training" in str(exc), exc
        else:
            raise AssertionError(f"no error on rank {rank} for spatial {spatial}")
        assert int(bn.num_batches_tracked) == 0, "the counter ticked before the error"
        assert torch.equal(bn.running_mean, torch.zeros(4)), "running_mean changed"
        x = make_input((2 + rank, 4, *spatial), torch.float64, seed=5 + rank).float()
        bn(x)
        xs = [make_input((2 + r, 4, *spatial), torch.float64, seed=5 + r).float()
              for r in range(world)]
        want = torch.cat(xs).double().mean([0, *range(2, x.dim())])
        assert_close(bn.running_mean, want, *STAT_TOLERANCES[torch.float32],
                     "cumulative running_mean after the failed step")
        assert int(bn.num_batches_tracked) == 1
    dist.barrier()  # every rank got here: none is left waiting in a collective
    return "raised on this rank"


def _one_rank_fails_its_checks(rank: int, world: int) -> str:
    """Rank 1's input fails validation (wrong channel count; float64 input into float32
    parameters; on another device, "meta", where a packet on the input's device would make
    the gather a no-op on that rank): rank 1 raises its own error, the others a RuntimeError
    naming rank 1, all promptly (not at the group's timeout) and with no state changed
    anywhere."""
    for bad in ("channels", "dtype", "device"):
        bn = SyncBatchNorm(3)
        x = make_input((4, 3, 2))
        if rank == 1:
            x = {"channels": make_input((4, 5, 2)), "dtype": x.double(),
                 "device": x.to("meta")}[bad]
        start = time.monotonic()
        try:
            bn(x)
        except (RuntimeError, TypeError, ValueError) as exc:
            if rank != 1:
                assert "rank(s) [1]" in str(exc) and "failed its checks" in str(exc), exc
        else:
            raise AssertionError(f"no error on rank {rank} ({bad})")
        took = time.monotonic() - start
        assert took < 5.0, f"the error took {took:.1f}s ({bad}): a rank waited in a collective"
        assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(3))
    dist.barrier()
    return "every rank raised at once"


def _ranks_with_different_input_dtypes(rank: int, world: int) -> None:
    """A float64 module fed float64 on rank 0 and float32 elsewhere: the statistics still
    merge exactly (the packets have one size and dtype on every rank)."""
    splits = [3 + r for r in range(world)]
    x = make_input((sum(splits), 3, 4), torch.float64, seed=21)
    lo = sum(splits[:rank])
    shard = x[lo: lo + splits[rank]]
    if rank > 0:
        shard = shard.float()
    bn = SyncBatchNorm(3, dtype=torch.float64)
    y = bn(shard)
    full = nn.BatchNorm1d(3, dtype=torch.float64)
    want = full(torch.cat([x[:splits[0]]] + [x[sum(splits[:r]): sum(splits[:r + 1])].float()
                                              .double() for r in range(1, world)]))
    # float32 everywhere: the float32 ranks' statistics (computed in float32) enter the merge
    assert_close(y, want[lo: lo + splits[rank]], *TOLERANCES[torch.float32], "y")
    assert_close(bn.running_mean, full.running_mean, *STAT_TOLERANCES[torch.float32],
                 "running_mean")


def _all_ranks_empty(rank: int, world: int) -> None:
    bn, plain = SyncBatchNorm(3), nn.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = bn(x)
    plain(x.detach())
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(plain, name)), name


def _eval_does_not_communicate(rank: int, world: int) -> str:
    """Only rank 0 calls the layers: a collective would block until the group's timeout."""
    if rank == 0:
        x = make_input((5, 3, 4, 4))
        bn, plain = SyncBatchNorm(3), batchnorm.BatchNorm2d(3)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        plain.load_state_dict(bn.state_dict())
        bn.eval()
        plain.eval()
        assert_close(bn(x), plain(x), 0, 0, "eval with running stats")
        bn2 = SyncBatchNorm(3, track_running_stats=False).eval()  # eval with batch statistics
        assert_close(bn2(x), batchnorm.BatchNorm2d(3, track_running_stats=False).eval()(x), 0, 0,
                     "eval without buffers")
    dist.barrier()
    return "rank 0 alone ran eval"


def _input_without_grad(rank: int, world: int) -> None:
    """A first layer: no dx, so backward has no collective; dweight/dbias still local sums."""
    splits = [2 + r for r in range(world)]
    x = make_input((sum(splits), 3, 4), torch.float64, seed=7)
    dy = make_input(x.shape, torch.float64, seed=8)
    full = nn.BatchNorm1d(3, dtype=torch.float64)
    full(x).backward(dy)
    bn = SyncBatchNorm(3, dtype=torch.float64)
    lo = sum(splits[:rank])
    bn(x[lo : lo + splits[rank]]).backward(dy[lo : lo + splits[rank]])
    for name in ("weight", "bias"):
        g = getattr(bn, name).grad.clone()
        dist.all_reduce(g)
        assert_close(g, getattr(full, name).grad, *TOLERANCES[torch.float64], name)


def _subgroups(rank: int, world: int) -> str:
    """A group of one rank is plain BN; a group of ranks {0, 1} leaves the others out."""
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    pair = dist.new_group([0, 1])
    x = make_input((4, 3, 3, 3), torch.float64, seed=11 + rank)
    bn = SyncBatchNorm(3, process_group=singles[rank], dtype=torch.float64)
    plain = batchnorm.BatchNorm2d(3, dtype=torch.float64)
    assert_close(bn(x), plain(x), 0, 0, "world-size-1 group")
    assert torch.equal(bn.running_var, plain.running_var)
    if rank < 2:
        _shard_case(rank, [3, 4], (2, 3), torch.float64, False, "torch", group=pair)
    dist.barrier()
    return "ranks 0 and 1 synchronized; the others did not take part"


def _sync_act(rank: int, world: int) -> None:
    """A converted BatchNormAct keeps its activation and takes a residual: sharded equals
    BatchNormAct on the whole batch (output, dx, dresidual, dweight/dbias sums, buffers)."""
    splits = [3 + 2 * r for r in range(world)]
    n = sum(splits)
    lo = sum(splits[:rank])
    rows = slice(lo, lo + splits[rank])
    full = batchnorm.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.2,
                                    dtype=torch.float64)
    with torch.no_grad():  # the same on every rank
        full.weight.copy_(torch.tensor([0.6, 1.3, -0.8]))
        full.bias.copy_(torch.tensor([0.2, -0.4, 0.1]))
    sync = convert_sync_batchnorm(copy.deepcopy(full))
    assert type(sync).__name__ == "SyncBatchNormAct" and sync.negative_slope == 0.2
    x, r, dy = (make_input((n, 3, 4, 4), torch.float64, seed=s) for s in (20, 21, 22))
    xf, rf = x.clone().requires_grad_(), r.clone().requires_grad_()
    yf = full(xf, rf)
    yf.backward(dy)
    xs, rs = x[rows].clone().requires_grad_(), r[rows].clone().requires_grad_()
    ys = sync(xs, rs)
    ys.backward(dy[rows])
    tol = TOLERANCES[torch.float64]
    assert_close(ys, yf[rows], *tol, "y")
    assert_close(xs.grad, xf.grad[rows], *tol, "dx")
    assert_close(rs.grad, rf.grad[rows], *tol, "dresidual")
    for name in ("weight", "bias"):
        g = getattr(sync, name).grad.clone()
        dist.all_reduce(g)
        assert_close(g, getattr(full, name).grad, *tol, f"group sum d{name}")
    for name in ("running_mean", "running_var"):
        assert_close(getattr(sync, name), getattr(full, name), *tol, name)


def _ddp_step(rank: int, world: int, splits: list[int], loss_scale: str) -> str:
    """Two SGD steps of a small conv net under DDP with SyncBN match single-process training on
    the whole batch; the BN buffers are bitwise identical on every rank (DDP's buffer broadcast
    is off, so the equality comes from the synchronized statistics)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), batchnorm.BatchNorm2d(6, momentum=None), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    ).double()
    single = copy.deepcopy(model)
    with warnings.catch_warnings():  # torch 2.13 renames it; the old name works on torch >= 2.4
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated")
        ddp = DDP(convert_sync_batchnorm(copy.deepcopy(model)), broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    n = sum(splits)
    lo = sum(splits[:rank])
    rows = slice(lo, lo + splits[rank])
    for step in range(2):
        x = make_input((n, 3, 6, 6), torch.float64, seed=50 + step)
        t = make_input((n, 4), torch.float64, seed=60 + step)
        opt_single.zero_grad()
        ((single(x) - t) ** 2).sum().div(n).backward()
        opt_single.step()
        opt.zero_grad()
        # DDP averages gradients over ranks: scale by world / n so that the average is the
        # gradient of the whole batch's mean loss, whatever the split.
        ((ddp(x[rows]) - t[rows]) ** 2).sum().mul(world / n).backward()
        opt.step()
    tol = TOLERANCES[torch.float64]
    ours = ddp.module.state_dict()
    for key, value in single.state_dict().items():
        assert_close(ours[key], value, *tol, f"{key} vs single-process training")
    for key, value in ours.items():
        if "running" in key or "num_batches" in key:
            gathered = [torch.empty_like(value) for _ in range(world)]
            dist.all_gather(gathered, value)
            assert all(torch.equal(g, gathered[0]) for g in gathered), f"{key} differs by rank"
    return f"split {splits}, {loss_scale}"


def main_checks(rank: int, world: int) -> list[tuple[str, Callable[[], Any]]]:
    """The checks of a main world, in the order every rank runs them."""
    checks: list[tuple[str, Callable[[], Any]]] = [
        (name, lambda kw=kwargs: _shard_case(rank, **kw)) for name, kwargs in _cases(world)
    ]
    even = [4] * world
    with_empty = [5, 0, *([3] * (world - 2))]
    checks += [
        ("total of one value per channel raises everywhere",
         lambda: _total_one_value_raises(rank, world)),
        ("one rank's input fails its checks: every rank raises at once",
         lambda: _one_rank_fails_its_checks(rank, world)),
        ("ranks with different input dtypes", lambda: _ranks_with_different_input_dtypes(
            rank, world)),
        ("every rank empty", lambda: _all_ranks_empty(rank, world)),
        ("eval never communicates", lambda: _eval_does_not_communicate(rank, world)),
        ("input without grad", lambda: _input_without_grad(rank, world)),
        ("BatchNormAct converted: activation and residual kept", lambda: _sync_act(rank, world)),
        ("DDP step, even split", lambda: _ddp_step(rank, world, even, "mean loss")),
        ("DDP step, uneven split with an empty rank",
         lambda: _ddp_step(rank, world, with_empty, "loss scaled by world / n")),
    ]
    if world >= 3:
        checks.append(("process groups", lambda: _subgroups(rank, world)))
    return checks


def main_world(rank: int, world: int, port: int, timeout_s: float, results: Results) -> None:
    init(rank, world, port, timeout_s)
    for name, fn in main_checks(rank, world):
        _check(results, name, fn)


# ---- failures: bounded by the group's timeout ---------------------------------------------------
def _expect_error(results: Results, name: str, timeout_s: float, fn: Callable[[], Any]) -> None:
    """``fn`` must raise within the timeout (plus start-up slack); record what and when."""
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:
        took = time.monotonic() - start
        err = None if took < timeout_s + 10 else f"error only after {took:.1f}s"
        results.append((name, err, f"{type(exc).__name__} after {took:.1f}s: {exc}"[:300]))
    else:
        results.append((name, "no error", ""))


def _train_step() -> None:
    bn = SyncBatchNorm(3)
    bn(torch.randn(4, 3, 2, 2)).sum().backward()


def peer_never_arrives(rank: int, world: int, port: int, timeout_s: float,
                       results: Results) -> None:
    """Only this rank of the world is started."""
    def go() -> None:
        init(rank, world, port, timeout_s)
        _train_step()

    _expect_error(results, "peer never arrives", timeout_s, go)


def peer_dies(rank: int, world: int, port: int, timeout_s: float, results: Results) -> None:
    """Rank 1 exits right after joining; rank 0 then trains a SyncBatchNorm layer."""
    init(rank, world, port, timeout_s)
    dist.barrier()
    if rank == 1:
        os._exit(0)
    time.sleep(0.5)
    _expect_error(results, "peer died", timeout_s, _train_step)


def peer_stalls(rank: int, world: int, port: int, timeout_s: float, results: Results) -> None:
    """Rank 1 stays alive but never reaches the collective."""
    init(rank, world, port, timeout_s)
    dist.barrier()
    if rank == 1:
        time.sleep(timeout_s + 30)  # the parent kills it once rank 0 has reported
        return
    _expect_error(results, "peer never reaches the collective", timeout_s, _train_step)


SCENARIOS: dict[str, Callable[[int, int, int, float, Results], None]] = {
    "main": main_world,
    "peer_never_arrives": peer_never_arrives,
    "peer_dies": peer_dies,
    "peer_stalls": peer_stalls,
}
