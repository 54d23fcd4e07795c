"""recalibrate: precise BatchNorm statistics, checked against an independent computation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

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
