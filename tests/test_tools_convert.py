"""convert / revert: torch.nn BatchNorm <-> ours, exact round trip."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import convert, revert
from helpers import STAT_TOLERANCES, TOLERANCES, assert_close, assert_same_state


def _torch_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4),
        nn.Unflatten(2, (2, 3)), nn.BatchNorm2d(4, momentum=None, affine=False),
        nn.Unflatten(3, (3, 1)), nn.BatchNorm3d(4, eps=1e-3),
        nn.Flatten(), nn.SyncBatchNorm(24),
    ).to(dtype)


def _trained(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    for _ in range(2):
        model(torch.randn(5, 3, 8, dtype=dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_round_trip_is_exact(dtype: torch.dtype, training: bool) -> None:
    model = _trained(_torch_model(dtype), dtype).train(training)
    original = copy.deepcopy(model)
    kinds = [type(m) for m in model.modules()]

    converted = convert(model, backend="torch")
    ours = [type(m) for m in converted.modules()]
    assert ours[2] is batchnorm.BatchNorm1d and ours[4] is batchnorm.BatchNorm2d
    assert ours[6] is batchnorm.BatchNorm3d and ours[8] is batchnorm.SyncBatchNorm
    assert all(m.training == training for m in converted.modules())
    assert_same_state(converted, original, "converted")
    assert converted[3].momentum is None and not converted[3].affine and converted[5].eps == 1e-3
    assert all(m.backend == "torch" for m in converted.modules()
               if isinstance(m, batchnorm.BatchNorm))

    back = revert(converted)
    assert [type(m) for m in back.modules()] == kinds
    assert_same_state(back, original, "reverted")
    assert all(m.training == training for m in back.modules())


def test_converted_model_computes_the_same() -> None:
    dtype = torch.float64
    model = _trained(_torch_model(dtype), dtype)
    reference = copy.deepcopy(model)
    converted = convert(model)
    atol, rtol = TOLERANCES[dtype]
    for mode in (True, False):
        x = torch.randn(6, 3, 8, dtype=dtype)
        converted.train(mode)
        reference.train(mode)
        assert_close(converted(x), reference(x), atol, rtol, f"output, training={mode}")
        # "auto" may run another backend than ATen (numba for (N, C) inputs): the running
        # buffers agree to rounding, not bit for bit
        want = reference.state_dict()
        for key, got in converted.state_dict().items():
            assert_close(got, want[key], *STAT_TOLERANCES[dtype], f"{key}, training={mode}")


def test_parameters_are_shared_so_optimizers_keep_working() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model[1].weight
    convert(model)
    assert model[1].weight is weight
    model(torch.randn(8, 3)).square().sum().backward()
    before = weight.detach().clone()
    opt.step()
    assert not torch.equal(model[1].weight.detach(), before), "optimizer step did not reach BN"


def test_root_shared_and_lazy_modules() -> None:
    bn = nn.BatchNorm2d(3)
    root = convert(bn)
    assert type(root) is batchnorm.BatchNorm2d and root.weight is bn.weight

    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    convert(model)
    assert model[0] is model[2] and type(model[0]) is batchnorm.BatchNorm1d

    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="forward pass"):
        convert(lazy)
    lazy(torch.randn(2, 5, 3, 3))  # materializes as torch.nn.BatchNorm2d
    assert type(convert(lazy)[0]) is batchnorm.BatchNorm2d


def test_subclasses_are_left_alone_with_a_warning() -> None:
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(MyBN(3), nn.BatchNorm2d(3), batchnorm.BatchNormAct2d(3))
    with pytest.warns(UserWarning, match="subclass.*: 0"):
        convert(model)
    assert type(model[0]) is MyBN and type(model[1]) is batchnorm.BatchNorm2d
    with pytest.warns(UserWarning, match="subclass.*: 2"):
        revert(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2]) is batchnorm.BatchNormAct2d


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        convert(nn.BatchNorm1d(2), backend="nope")
    with pytest.raises(TypeError, match="any-rank"):
        revert(nn.Sequential(batchnorm.BatchNorm(3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert revert(convert(nn.Linear(2, 2))).weight.shape == (2, 2)  # no BN: no-op
