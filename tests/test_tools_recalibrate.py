"""recalibrate: precise BatchNorm statistics, checked against an independent computation."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

import batchnorm
from batchnorm.tools import recalibrate
from helpers import TOLERANCES, assert_close

F64 = torch.float64


class Net(nn.Module):
    """BN layers in a chain and on a residual branch, a dropout, a torch.nn BN and ours."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = batchnorm.BatchNorm2d(6, momentum=None)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.bn3 = batchnorm.BatchNorm2d(6, momentum=0.3)
        self.head = nn.Linear(6, 4)
        self.bn4 = batchnorm.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(torch.relu(self.bn1(self.conv1(x))))
        y = torch.relu(self.bn2(self.conv2(y)) + self.bn3(y))
        return self.bn4(self.head(y.mean((2, 3))))


def _net() -> Net:
    net = Net().to(F64)
    net.train()
    for _ in range(3):  # some running statistics and counters to restore
        net(torch.randn(8, 3, 5, 5, dtype=F64) * 2 + 1)
    return net


def _data(n: int = 120, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 5, 5, generator=g, dtype=F64) * 3 + 2


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, sizes))


def _bn_input_stats(model: nn.Module, batches: list[torch.Tensor], train_bn: bool
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer: (mean, unbiased var) of its input over all batches, from concatenated
    inputs (no streaming merge). BN layers normalize with running stats (eval) or batch stats."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].detach())))
    flags = {m: m.training for m in model.modules()}
    saved = {n: b.clone() for n, b in model.named_buffers()}
    for m in model.modules():
        m.train(isinstance(m, _BatchNorm) and train_bn)
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    for m, f in flags.items():
        m.training = f
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(saved[n])
    out = {}
    for name, xs in seen.items():
        x = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in xs], 1)
        out[name] = (x.mean(1), x.var(1, correction=1))
    return out


def test_exact_mode_equals_eval_time_input_statistics_whatever_the_split() -> None:
    x = _data()
    base = _net().eval()
    results = []
    for sizes in ([120], [7] * 17 + [1], [50, 3, 67]):
        net = copy.deepcopy(base)
        recalibrate(net, _split(x, sizes), progress=False)
        results.append({n: b.clone() for n, b in net.named_buffers()})
        expected = _bn_input_stats(net, [x], train_bn=False)
        assert set(expected) == {"bn1", "bn2", "bn3", "bn4"}
        atol, rtol = TOLERANCES[F64]
        for name, (mean, var) in expected.items():
            bn = net.get_submodule(name)
            assert_close(bn.running_mean, mean, atol, rtol, f"{name}.running_mean split={sizes}")
            assert_close(bn.running_var, var, atol, rtol, f"{name}.running_var split={sizes}")
    for other in results[1:]:
        for k, v in results[0].items():
            assert_close(other[k], v, *TOLERANCES[F64], f"{k}: depends on the batch split")


def test_batch_mode_equals_train_time_input_statistics() -> None:
    x = _data()
    batches = _split(x, [40, 25, 55])
    net = _net().eval()
    expected = _bn_input_stats(net, batches, train_bn=True)
    recalibrate(net, batches, progress=False, mode="batch")
    atol, rtol = TOLERANCES[F64]
    for name, (mean, var) in expected.items():
        bn = net.get_submodule(name)
        assert_close(bn.running_mean, mean, atol, rtol, f"{name}.running_mean")
        assert_close(bn.running_var, var, atol, rtol, f"{name}.running_var")
    # The first layer has no BatchNorm upstream: exact in either mode.
    exact = copy.deepcopy(net)
    recalibrate(exact, batches, progress=False)
    assert_close(exact.bn1.running_var, net.bn1.running_var, atol, rtol, "bn1 exact vs batch")


@pytest.mark.parametrize("mode", ["exact", "batch"])
def test_only_bn_statistics_change_and_state_is_restored(mode: str) -> None:
    net = _net()
    net.eval()
    net.bn2.train()  # a mixed state, restored as it was
    net.drop.train()
    before = {n: b.clone() for n, b in net.named_buffers()}
    params = {n: p.clone() for n, p in net.named_parameters()}
    flags = {n: m.training for n, m in net.named_modules()}
    momenta = {n: m.momentum for n, m in net.named_modules() if isinstance(m, _BatchNorm)}
    recalibrate(net, _split(_data(), [30] * 4), progress=True, mode=mode)
    assert {n: m.training for n, m in net.named_modules()} == flags
    assert {n: m.momentum for n, m in net.named_modules() if isinstance(m, _BatchNorm)} == momenta
    for n, p in net.named_parameters():
        assert torch.equal(p, params[n]), f"parameter {n} changed"
    for n, b in net.named_buffers():
        if n.endswith("num_batches_tracked"):
            assert torch.equal(b, before[n]), f"{n} not restored"
        else:
            assert not torch.equal(b, before[n]), f"{n} not recalibrated"


def test_state_is_restored_when_the_data_raises() -> None:
    net = _net().eval()
    before = {n: b.clone() for n, b in net.named_buffers()}

    def batches():
        yield _data(10)
        raise RuntimeError("broken loader")

    with pytest.raises(RuntimeError, match="broken loader"):
        recalibrate(net, batches(), progress=False, mode="batch")
    assert not any(m.training for m in net.modules())
    assert net.bn1.momentum is None and net.bn3.momentum == 0.3
    for n, b in net.named_buffers():
        assert torch.equal(b, before[n]), f"{n} changed by a failed recalibration"


def test_num_batches_inputs_and_errors() -> None:
    x = _data(60)
    net = _net().eval()
    recalibrate(net, [(b, 0) for b in _split(x, [20, 20, 20])], num_batches=1, progress=False)
    expected = _bn_input_stats(net, [x[:20]], train_bn=False)
    assert_close(net.bn4.running_var, expected["bn4"][1], *TOLERANCES[F64], "num_batches=1")
    with pytest.raises(TypeError, match="re-iterable"):
        recalibrate(net, iter([x]), progress=False)
    with pytest.raises(ValueError, match="mode"):
        recalibrate(net, [x], mode="fast")


def test_layers_not_reached_are_left_alone_with_a_warning() -> None:
    class OneBranch(nn.ModuleDict):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self["used"](x)

    model = OneBranch({"used": nn.BatchNorm1d(3), "unused": nn.BatchNorm1d(3)})
    before = model["unused"].running_var.clone()
    with pytest.warns(UserWarning, match="never reached unused"):
        recalibrate(model, [torch.randn(10, 3)], progress=False)
    assert torch.equal(model["unused"].running_var, before)


class _Passes:
    """A re-iterable list of batches that counts its iterations and can fail on one of them."""

    def __init__(self, batches: list[torch.Tensor], fail_on: int | None = None) -> None:
        self.batches, self.fail_on, self.passes = batches, fail_on, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        # Counted here, not in a generator body: an iterator opened and never used counts too.
        self.passes += 1
        return self._yield(self.passes)

    def _yield(self, this_pass: int) -> Iterator[torch.Tensor]:
        for k, b in enumerate(self.batches):
            if this_pass == self.fail_on and k == 1:  # after a batch has gone through
                raise OSError(f"data source failed on pass {this_pass}")
            yield b


def _snapshot(net: nn.Module) -> dict[str, Any]:
    return {"buffers": {n: b.clone() for n, b in net.named_buffers()},
            "flags": {n: m.training for n, m in net.named_modules()},
            "momenta": {n: m.momentum for n, m in net.named_modules()
                        if isinstance(m, _BatchNorm)}}


def _assert_unchanged(net: nn.Module, before: dict[str, Any], why: str) -> None:
    after = _snapshot(net)
    assert after["flags"] == before["flags"], f"training flags changed {why}"
    assert after["momenta"] == before["momenta"], f"momenta changed {why}"
    for n, b in after["buffers"].items():
        old = before["buffers"][n]
        assert torch.equal(b, old), (
            f"{n} changed {why}: max |diff| {(b.double() - old.double()).abs().max().item()}")


@pytest.mark.parametrize("fail_on", [2, 3, 4])
@pytest.mark.parametrize("where", ["data", "model"])
def test_exact_mode_restores_every_buffer_when_a_later_pass_raises(fail_on: int, where: str
                                                                   ) -> None:
    # Net has 4 BN layers, so exact mode makes 4 passes; by pass p, layers 1..p-1 have been
    # written: a failure must put every one of them back bit for bit.
    net = _net().eval()
    net.bn2.train()  # a mixed state, restored as it was
    before = _snapshot(net)
    data = _Passes(_split(_data(40), [10] * 4), fail_on if where == "data" else None)

    def forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if data.passes == fail_on:
            raise KeyboardInterrupt  # not an Exception: restored all the same
        return model(batch)

    with pytest.raises(OSError if where == "data" else KeyboardInterrupt):
        recalibrate(net, data, progress=False, forward=forward if where == "model" else None)
    assert data.passes == fail_on, f"failed on pass {data.passes}, meant {fail_on}"
    _assert_unchanged(net, before, f"by a recalibration that failed on pass {fail_on}")
    # ...and the same call without the failure does change them (the check above can fail).
    recalibrate(net, _Passes(data.batches), progress=False)
    assert not torch.equal(net.bn1.running_var, before["buffers"]["bn1.running_var"])


def test_a_pass_that_yields_nothing_raises_and_restores() -> None:
    class Once:  # re-iterable in type, one-shot in fact: every iter() hands out one iterator
        def __init__(self, batches: list[torch.Tensor]) -> None:
            self.it = iter(batches)

        def __iter__(self) -> Iterator[torch.Tensor]:
            return self.it

    net = _net().eval()
    before = _snapshot(net)
    with pytest.raises(RuntimeError, match="pass 2 over the data yielded no batch"):
        recalibrate(net, Once(_split(_data(40), [20, 20])), progress=False)
    _assert_unchanged(net, before, "by a recalibration over one-shot data")


class _Shared(nn.Module):
    """``a`` is called twice per forward on inputs that no BN statistics affect; ``b`` is fed
    by both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.a = batchnorm.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 1)
        self.b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.conv(self.a(x) + self.a(x * 2 + 1)))


class _Twice(nn.Module):
    """``a`` applied to its own output: the second call's input depends on its statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.a = batchnorm.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(self.a(x))


def _old_stats(model: nn.Module, mean: float, var: float) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.fill_(mean)
                m.running_var.fill_(var)
    return model


def test_a_layer_applied_to_its_own_output_is_warned_about() -> None:
    batches = [torch.randn(n, 3, 5, 5, dtype=F64) * 2 + 3 for n in (2, 3, 4)]
    model = _old_stats(_Twice().to(F64), 5.0, 100.0)
    with pytest.warns(UserWarning, match=r"called more than once per forward: a \(2 calls\)"
                      r".*a\(a\(x\)\), has no single-pass answer"):
        recalibrate(model, batches, progress=False)
    # Batch mode normalizes with batch statistics, as training does: nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recalibrate(_Twice().to(F64), batches, progress=False, mode="batch")


def test_a_layer_reused_on_independent_inputs_is_still_exact() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(n, 3, 5, 5, dtype=F64) * 2 + 3 for n in (2, 3, 4)]
    base = _Shared().to(F64).eval()
    results = []
    for old_mean, old_var in ((0.0, 1.0), (5.0, 100.0)):
        model = _old_stats(copy.deepcopy(base), old_mean, old_var)
        with pytest.warns(UserWarning, match=r"a \(2 calls\)"):
            recalibrate(model, batches, progress=False)
        # a's statistics cover both calls' inputs, b's its eval-time input after a's update.
        expected = _bn_input_stats(model, batches, train_bn=False)
        for name, (mean, var) in expected.items():
            bn = model.get_submodule(name)
            what = f"{name} from old stats ({old_mean}, {old_var})"
            assert_close(bn.running_mean, mean, *TOLERANCES[F64], f"{what}: running_mean")
            assert_close(bn.running_var, var, *TOLERANCES[F64], f"{what}: running_var")
        results.append({n: b.clone() for n, b in model.named_buffers()})
    for n, b in results[1].items():
        assert_close(b, results[0][n], *TOLERANCES[F64], f"{n} depends on the old statistics")


def test_exact_mode_iterates_the_data_once_per_layer_and_no_more() -> None:
    # No probe iterator: Net's 4 layers take exactly 4 iterations (a DataLoader with workers
    # would start them for every iterator opened), batch mode exactly 1.
    batches = _split(_data(40), [10] * 4)
    for mode, passes in (("exact", 4), ("batch", 1)):
        data = _Passes(batches)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # and no warning for a plain re-iterable
            recalibrate(_net().eval(), data, progress=False, mode=mode)
        assert data.passes == passes, f"mode={mode}: {data.passes} iterations of the data"


def _loader_cases() -> dict[str, Callable[[TensorDataset], DataLoader]]:
    return {
        "shuffle": lambda ds: DataLoader(ds, batch_size=10, shuffle=True),
        "batch_sampler": lambda ds: DataLoader(
            ds, batch_sampler=BatchSampler(RandomSampler(ds), 10, drop_last=False)),
    }


@pytest.mark.parametrize("case", sorted(_loader_cases()))
def test_a_shuffling_dataloader_is_warned_about_in_exact_mode(case: str) -> None:
    x = _data(40)
    loader = _loader_cases()[case](TensorDataset(x))
    with pytest.warns(UserWarning, match=r"RandomSampler.*different random subset.*"
                      r"num_batches=2.*shuffle=False"):
        recalibrate(_net().eval(), loader, num_batches=2, progress=False)
    # Over all the data every pass covers the same samples: still exact, and the warning says
    # that only random augmentation can make the passes differ.
    net = _net().eval()
    with pytest.warns(UserWarning, match="same samples.*augmentation"):
        recalibrate(net, loader, progress=False)
    for name, (mean, var) in _bn_input_stats(net, [x], train_bn=False).items():
        bn = net.get_submodule(name)
        assert_close(bn.running_mean, mean, *TOLERANCES[F64], f"{name}.running_mean ({case})")
        assert_close(bn.running_var, var, *TOLERANCES[F64], f"{name}.running_var ({case})")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one pass: nothing differs between layers
        recalibrate(_net().eval(), loader, num_batches=2, progress=False, mode="batch")


def test_an_ordered_dataloader_gives_the_same_statistics_as_its_batches() -> None:
    x = _data(40)
    base = _net().eval()
    from_loader, from_list = copy.deepcopy(base), copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recalibrate(from_loader, DataLoader(TensorDataset(x), batch_size=10), num_batches=2,
                    progress=False)
    recalibrate(from_list, _split(x[:20], [10, 10]), progress=False)
    for (n, a), b in zip(from_loader.named_buffers(), from_list.buffers()):
        assert torch.equal(a, b), f"{n}: {a} != {b}"
