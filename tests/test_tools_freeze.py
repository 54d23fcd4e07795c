"""FrozenBatchNorm and freeze / unfreeze."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import reference
from batchnorm.nn import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from batchnorm.tools import freeze, unfreeze
from helpers import STAT_TOLERANCES, TOLERANCES, assert_close, is_channels_last, make_input


def _random_frozen(cls: type, c: int, dtype: torch.dtype = torch.float32) -> FrozenBatchNorm:
    f = cls(c, eps=1e-3, dtype=dtype)
    with torch.no_grad():
        f.weight.normal_()
        f.bias.normal_()
        f.running_mean.normal_()
        f.running_var.uniform_(0.5, 2.0)
    return f


@pytest.mark.parametrize(
    ("cls", "shape"),
    [(FrozenBatchNorm1d, (4, 3)), (FrozenBatchNorm1d, (4, 3, 5)), (FrozenBatchNorm2d, (2, 3, 4, 5)),
     (FrozenBatchNorm3d, (2, 3, 2, 3, 4)), (FrozenBatchNorm, (2, 3, 2, 2, 2, 2))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_reference_eval(cls: type, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    f = _random_frozen(cls, shape[1])
    x = make_input(shape, dtype, channels_last=len(shape) >= 4)
    y = f(x)
    expected = reference.forward_eval(
        x.double().numpy(), f.running_mean.double().numpy(), f.running_var.double().numpy(),
        f.weight.double().numpy(), f.bias.double().numpy(), eps=1e-3,
    )
    assert y.dtype == dtype and y.shape == x.shape
    assert is_channels_last(y) == is_channels_last(x)
    atol, rtol = TOLERANCES[dtype]
    assert_close(y, torch.from_numpy(expected), atol, rtol, f"{cls.__name__} {dtype}")


def test_rank_checks_and_channels() -> None:
    with pytest.raises(ValueError, match="expected 4D input"):
        FrozenBatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        FrozenBatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="expected 5D input"):
        FrozenBatchNorm3d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="3 channels"):
        FrozenBatchNorm(3)(torch.randn(2, 4, 4))


@pytest.mark.parametrize("affine", [True, False])
def test_loads_a_batchnorm_state_dict_dropping_the_counter(affine: bool) -> None:
    bn = nn.BatchNorm2d(3, affine=affine)
    bn(torch.randn(4, 3, 2, 2) * 3 + 1)
    f = FrozenBatchNorm2d(3)
    with torch.no_grad():  # stale values that loading must overwrite
        f.weight.fill_(7.0)
        f.bias.fill_(7.0)
    result = f.load_state_dict(bn.state_dict())  # strict: no key missing, none unexpected
    assert not result.missing_keys and not result.unexpected_keys
    assert "num_batches_tracked" not in f.state_dict()
    x = torch.randn(4, 3, 2, 2)
    atol, rtol = TOLERANCES[torch.float32]
    assert_close(f(x), bn.eval()(x), atol, rtol, f"frozen vs torch eval, affine={affine}")
    if affine:  # a partial checkpoint (bias missing) is reported, not filled in
        partial = {k: v for k, v in bn.state_dict().items() if k != "bias"}
        with pytest.raises(RuntimeError, match="Missing key"):
            FrozenBatchNorm2d(3).load_state_dict(partial)


def test_frozen_means_fixed_whatever_train_or_eval() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), batchnorm.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2, momentum=None))
    model(torch.randn(8, 3, 4, 4))
    freeze(model)
    assert isinstance(model[1], FrozenBatchNorm2d) and isinstance(model[4], FrozenBatchNorm2d)
    assert all(n.startswith(("0.", "3.")) for n, _ in model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 4, 4)
    model.eval()
    y_eval = model(x)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y_train = model(x)
    y_train.square().sum().backward()
    opt.step()
    assert_close(y_train, y_eval, 0.0, 0.0, "frozen output in train() vs eval()")
    for k, v in model.state_dict().items():
        if k.startswith(("1.", "4.")):
            assert torch.equal(v, state[k]), f"{k} changed under training"


def test_freeze_selection_and_unfreeze_restores() -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Linear(3, 4), batchnorm.BatchNorm1d(4, momentum=0.3, backend="torch")),
        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False)),
    )
    for _ in range(3):
        model(torch.randn(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze(model, ["0"])
    assert isinstance(model[0][1], FrozenBatchNorm1d) and type(model[1][1]) is nn.BatchNorm1d
    freeze(model, [model[1][1]])
    assert isinstance(model[1][1], FrozenBatchNorm1d)
    unfreeze(model)
    bn0, bn1 = model[0][1], model[1][1]
    assert type(bn0) is batchnorm.BatchNorm1d and bn0.momentum == 0.3 and bn0.backend == "torch"
    assert type(bn1) is nn.BatchNorm1d and not bn1.affine
    assert bn0.weight.requires_grad
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed through freeze/unfreeze"
    with pytest.raises(KeyError, match="nope"):
        freeze(model, ["nope"])


def test_freeze_rejects_layers_without_running_stats() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"0: .*no running statistics"):
        freeze(model)


def test_unfreeze_of_a_bare_frozen_layer() -> None:
    f = _random_frozen(FrozenBatchNorm3d, 3, torch.float64)
    bn = unfreeze(f)
    assert type(bn) is batchnorm.BatchNorm3d and bn.momentum == 0.1
    assert int(bn.num_batches_tracked) == 0 and bn.running_mean.dtype == torch.float64
    atol, rtol = STAT_TOLERANCES[torch.float64]
    x = torch.randn(2, 3, 2, 2, 2, dtype=torch.float64)
    assert_close(bn.eval()(x), f(x), atol, rtol, "unfrozen eval vs frozen")
