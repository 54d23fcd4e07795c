"""SyncBatchNorm: sharded training equals single-process BN; conversion; bounded failures.

The ``distributed`` tests spawn gloo worlds on 127.0.0.1 (a free port each) whose processes run
the checks of ``_dist_worker.py`` and report them; every world runs under a deadline and its
processes are killed on overrun. The other tests need no process group.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import queue
import socket
import time

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import _dist_worker
import batchnorm
from batchnorm import (
    SyncBatchNorm,
    SyncBatchNormAct,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from helpers import TOLERANCES, assert_close, assert_same_state, make_input

distributed = pytest.mark.distributed


# ---- harness ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class World:
    """Ranks ``start`` (default: all) of a ``world``-rank gloo world running ``scenario``, with
    group timeout ``timeout_s``; :meth:`collect` waits for the reports of ranks ``report``
    (default: those started)."""

    def __init__(
        self,
        scenario: str,
        world: int,
        *,
        start: list[int] | None = None,
        report: list[int] | None = None,
        timeout_s: float = 20.0,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        port = _free_port()
        start = list(range(world)) if start is None else start
        self.waiting = set(start if report is None else report)
        self.procs = {
            r: ctx.Process(target=_dist_worker.entry, daemon=True,
                           args=(scenario, r, world, port, timeout_s, self.queue))
            for r in start
        }
        for p in self.procs.values():
            p.start()

    def collect(self, deadline_s: float) -> dict[int, list[tuple[str, str | None, str]]]:
        """The reports that arrived within ``deadline_s``; then every process still running is
        killed."""
        reports: dict[int, list] = {}
        end = time.monotonic() + deadline_s
        try:
            while self.waiting and time.monotonic() < end:
                try:
                    rank, results = self.queue.get(timeout=1.0)
                except queue.Empty:
                    if not any(self.procs[r].is_alive() for r in self.waiting):
                        break  # the ranks we wait for died without reporting
                    continue
                reports[rank] = results
                self.waiting.discard(rank)
        finally:
            for p in self.procs.values():
                p.join(timeout=2.0)
                if p.is_alive():
                    p.kill()
                    p.join()
        return reports


def assert_world_ok(reports: dict, ranks: list[int], checks: list[str]) -> None:
    """Every rank of ``ranks`` reported, ran exactly ``checks`` and none of them failed."""
    missing = [r for r in ranks if r not in reports]
    failures = [
        f"rank {rank} / {name}:\n{err}"
        for rank, results in sorted(reports.items())
        for name, err, _ in results
        if err is not None
    ]
    assert not missing and not failures, (
        f"ranks that did not report: {missing}\n" + "\n".join(failures)
    )
    for rank in ranks:
        assert [name for name, _, _ in reports[rank]] == checks, f"rank {rank} ran other checks"


# ---- distributed: sharded equals whole ----------------------------------------------------------
@distributed
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_training_equals_single_process(world):
    """2 and 3 gloo ranks: uneven splits, an empty rank, a one-row shard, channels-last, fp64
    and fp32, 2D to 5D, every available CPU backend; forward, dx, group sums of dweight/dbias
    and running stats against torch.nn.BatchNorm and the reference on the whole batch; a total
    of one value per channel raises on every rank; every rank empty; eval never communicates;
    process groups (world size 1, a subset of ranks); DDP steps equal single-process training
    with identical buffers on every rank."""
    # The group timeout bounds a wait in a collective while the peer works: a rank's first
    # use of a numba kernel loads (cold cache: compiles) it, which on a 2-vCPU machine took
    # over the default 20 s (a send timed out). A hang still fails, at the deadline.
    reports = World("main", world, timeout_s=120.0).collect(deadline_s=180.0)
    expected = [name for name, _ in _dist_worker.main_checks(0, world)]
    assert_world_ok(reports, list(range(world)), expected)


# ---- distributed: failures are bounded ----------------------------------------------------------
FAIL_TIMEOUT_S = 3.0


@distributed
def test_failing_peer_gives_error_within_timeout_not_a_hang():
    """A peer that never arrives (world of 2, one process started), one that dies after joining
    and one that stays alive but never reaches the collective: rank 0 gets an error within the
    group's timeout. The three worlds run at once (they mostly wait)."""
    worlds = {
        "peer never arrives": World("peer_never_arrives", 2, start=[0],
                                    timeout_s=FAIL_TIMEOUT_S),
        "peer died": World("peer_dies", 2, report=[0], timeout_s=FAIL_TIMEOUT_S),
        "peer never reaches the collective": World("peer_stalls", 2, report=[0],
                                                   timeout_s=FAIL_TIMEOUT_S),
    }
    for check, world in worlds.items():
        reports = world.collect(deadline_s=60.0)
        assert 0 in reports, f"{check}: rank 0 did not report (hung or crashed)"
        (name, err, detail), *_ = reports[0]
        assert name == check and err is None, f"{name}: {err} {detail}"


# ---- without a process group --------------------------------------------------------------------
def test_without_process_group_is_plain_batchnorm():
    assert not torch.distributed.is_initialized()
    x = make_input((6, 3, 4, 5), torch.float64, channels_last=True)
    sync, plain = SyncBatchNorm(3, dtype=torch.float64), nn.BatchNorm2d(3, dtype=torch.float64)
    xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = make_input(x.shape, torch.float64)
    sync(xs).backward(dy)
    plain(xp).backward(dy)
    tol = TOLERANCES[torch.float64]
    assert_close(xs.grad, xp.grad, *tol, "dx")
    assert_close(sync.weight.grad, plain.weight.grad, *tol, "dweight")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(sync, name), getattr(plain, name), *tol, name)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        SyncBatchNorm(3)(torch.randn(1, 3))


def test_state_dict_and_construction_match_torch():
    for kwargs in ({}, {"affine": False}, {"track_running_stats": False}, {"momentum": None},
                   {"bias": False}):
        ours, theirs = SyncBatchNorm(4, **kwargs), nn.SyncBatchNorm(4, **kwargs)
        assert isinstance(ours, _BatchNorm) and ours.process_group is None
        assert_same_state(ours, theirs, str(kwargs))
        assert ours.extra_repr() == theirs.extra_repr()
        theirs.load_state_dict(ours.state_dict())
    assert SyncBatchNorm(3, process_group="g").process_group == "g"


def test_zero_channels_is_an_error_like_torch():
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        SyncBatchNorm(0)(torch.randn(2, 0, 3))


# ---- conversion ---------------------------------------------------------------------------------
def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, eps=1e-3, momentum=None),
        nn.Sequential(batchnorm.BatchNorm1d(5, affine=False, backend="torch")),
        batchnorm.BatchNorm3d(2, track_running_stats=False),
        nn.SyncBatchNorm(6, momentum=0.2),
        batchnorm.BatchNorm(7, bias=False),
    )


def test_convert_and_revert_keep_state_flags_device_dtype():
    model = _model().to(torch.float64)
    model[1].eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-1, 1)
                m.num_batches_tracked.fill_(3)
    before = {name: type(m) for name, m in model.named_modules()}
    tensors = {id(t) for t in (*model.parameters(), *model.buffers())}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    converted = convert_sync_batchnorm(model, process_group="group")
    for name, m in converted.named_modules():
        if issubclass(before[name], _BatchNorm):
            assert type(m) is SyncBatchNorm and m.process_group == "group", name
            assert m.training == (name != "1"), name
    assert converted[2][0].backend == "torch" and converted[1].momentum is None
    assert converted[1].eps == 1e-3 and not converted[2][0].affine
    assert not converted[3].track_running_stats and converted[5].bias is None
    # the very same tensors (an optimizer built before still holds them), same dtype
    assert {id(t) for t in (*converted.parameters(), *converted.buffers())} == tensors
    assert all(t.dtype == torch.float64 for t in converted.parameters())
    assert list(converted.state_dict()) == list(state)

    reverted = revert_sync_batchnorm(converted)
    assert {name: type(m) for name, m in reverted.named_modules()} == before
    assert reverted[2][0].backend == "torch" and not reverted[1].training
    assert {id(t) for t in (*reverted.parameters(), *reverted.buffers())} == tensors
    for k, v in reverted.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_convert_a_single_layer_and_the_torch_spelling():
    bn = nn.BatchNorm1d(3)
    sync = SyncBatchNorm.convert_sync_batchnorm(bn)
    assert type(sync) is SyncBatchNorm and sync.weight is bn.weight
    assert convert_sync_batchnorm(sync) is sync  # already synchronized
    back = revert_sync_batchnorm(sync)
    assert type(back) is nn.BatchNorm1d and back.running_var is bn.running_var
    # built directly: reverts to the any-rank BatchNorm
    assert type(revert_sync_batchnorm(SyncBatchNorm(3, backend="native"))) is batchnorm.BatchNorm
    assert revert_sync_batchnorm(SyncBatchNorm(3, backend="native")).backend == "native"


class _ReluBN(batchnorm.BatchNorm2d):
    """BatchNorm + ReLU as a subclass would write it: its own forward."""

    def forward(self, x):
        return torch.relu(super().forward(x))

    def to_sync_batchnorm(self, process_group):
        return _SyncReluBN.from_batchnorm(self, process_group)


class _SyncReluBN(SyncBatchNorm):
    """Its synchronized variant; the inherited to_local_batchnorm rebuilds _ReluBN."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_subclass_behaviour_is_kept_or_refused_never_dropped():
    model = nn.Sequential(_ReluBN(3))
    x = make_input((4, 3, 2, 2))
    expected = model(x)
    converted = convert_sync_batchnorm(model)
    assert type(converted[0]) is _SyncReluBN
    assert_close(converted(x), expected, 0, 0, "activation kept")
    assert type(revert_sync_batchnorm(converted)[0]) is _ReluBN

    class Forgetful(nn.BatchNorm2d):  # overrides forward, offers no sync variant
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="overrides forward"):
        convert_sync_batchnorm(nn.Sequential(Forgetful(3)))

    class Plain(nn.BatchNorm2d):  # adds no behaviour: converted like its base, reverted to it
        pass

    converted = convert_sync_batchnorm(nn.Sequential(Plain(3)))
    assert type(converted[0]) is SyncBatchNorm
    assert type(revert_sync_batchnorm(converted)[0]) is Plain


def test_batchnorm_act_converts_to_sync_batchnorm_act_and_back():
    act = batchnorm.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.3, momentum=None,
                                   backend="torch", dtype=torch.float64)
    x, r = make_input((4, 3, 2, 2), torch.float64), make_input((4, 3, 2, 2), torch.float64)
    sync = convert_sync_batchnorm(nn.Sequential(copy.deepcopy(act)))[0]
    assert type(sync) is SyncBatchNormAct and isinstance(sync, batchnorm.BatchNormAct)
    assert (sync.activation, sync.negative_slope, sync.backend) == ("leaky_relu", 0.3, "torch")
    assert_close(sync(x, r), act(x, r), 0, 0, "no group: BatchNormAct itself")
    back = revert_sync_batchnorm(sync)
    assert type(back) is batchnorm.BatchNormAct2d and back.negative_slope == 0.3
    assert back.weight is sync.weight and back.momentum is None
    assert type(revert_sync_batchnorm(SyncBatchNormAct(3))) is batchnorm.BatchNormAct
