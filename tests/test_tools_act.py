"""The life-cycle tools on BatchNormAct: freeze, unfreeze, fold (with and without a residual),
ONNX export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.nn import FrozenBatchNormAct, ResidualActivation
from helpers import TOLERANCES, assert_close, make_input


class Block(nn.Module):
    """conv -> BatchNormAct with the block input as residual (a ResNet basic block's tail)."""

    def __init__(self, activation: str = "relu") -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = batchnorm.BatchNormAct2d(4, activation=activation, negative_slope=0.2)
        self.head = nn.Sequential(nn.Conv2d(4, 3, 1), batchnorm.BatchNormAct2d(3, activation="elu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x), x))


def _trained(model: nn.Module) -> nn.Module:
    for _ in range(3):
        model(make_input((4, 4, 6, 6)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, batchnorm.BatchNormAct):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu"])
def test_fold_batchnorm_act_keeps_activation_and_residual(activation):
    model = _trained(Block(activation))
    folded = batchnorm.fold(model)
    assert isinstance(folded.bn, ResidualActivation) and folded.bn.activation == activation
    assert isinstance(folded.head[1], ResidualActivation)
    x = make_input((2, 4, 6, 6))
    assert_close(folded(x), model(x), *TOLERANCES[torch.float32], f"folded {activation}")


def test_unfoldable_batchnorm_act_becomes_frozen_act():
    model = _trained(nn.Sequential(nn.ReLU(), batchnorm.BatchNormAct2d(4, activation="silu")))
    folded = batchnorm.fold(model)
    assert isinstance(folded[1], FrozenBatchNormAct) and folded[1].activation == "silu"
    x = make_input((2, 4, 3, 3))
    assert_close(folded(x), model(x), *TOLERANCES[torch.float32], "frozen act")
    with pytest.raises(ValueError, match="expected 4D input"):
        folded(make_input((2, 4, 3)))


def test_freeze_and_unfreeze_batchnorm_act():
    model = _trained(nn.Sequential(nn.Conv2d(4, 4, 1),
                                   batchnorm.BatchNormAct2d(4, activation="leaky_relu",
                                                            negative_slope=0.3)))
    x, r = make_input((2, 4, 3, 3)), make_input((2, 4, 3, 3))
    before = model[1](x, r)
    batchnorm.freeze(model)
    frozen = model[1]
    assert isinstance(frozen, FrozenBatchNormAct)
    model.train()  # frozen: train() changes nothing
    assert_close(frozen(x, r), before, *TOLERANCES[torch.float32], "frozen act with residual")
    batchnorm.unfreeze(model)
    thawed = model[1]
    assert type(thawed) is batchnorm.BatchNormAct2d
    assert (thawed.activation, thawed.negative_slope) == ("leaky_relu", 0.3)
    thawed.eval()
    assert_close(thawed(x, r), before, *TOLERANCES[torch.float32], "unfrozen act")


def test_frozen_act_checks_the_residual_and_the_rank_of_its_source():
    """A residual that would broadcast is an error, as in BatchNormAct (it was added with
    broadcasting before); the rank check is that of the layer it was frozen from."""
    frozen = FrozenBatchNormAct.from_batchnorm(batchnorm.BatchNormAct2d(3).eval())
    x = make_input((2, 3, 4, 4))
    with pytest.raises(ValueError, match="residual must match the input's shape"):
        frozen(x, make_input((1, 3, 4, 4)))
    with pytest.raises(ValueError, match="expected 4D input"):
        frozen(make_input((2, 3, 4)))
    any_rank = FrozenBatchNormAct.from_batchnorm(batchnorm.BatchNormAct(3).eval())
    assert any_rank(make_input((2, 3, 4))).shape == (2, 3, 4)


def test_frozen_act_pickled_before_input_rank_loads():
    """A whole-module pickle from before ``_input_rank`` kept the class whose check ran
    (``_rank_check``); unpickling maps it to the rank."""
    frozen = FrozenBatchNormAct.from_batchnorm(batchnorm.BatchNormAct2d(3).eval())
    state = frozen.__dict__.copy()
    del state["_input_rank"]
    state["_rank_check"] = batchnorm.BatchNorm2d
    old = FrozenBatchNormAct.__new__(FrozenBatchNormAct)
    old.__setstate__(state)
    assert old._input_rank == 2 and "_rank_check" not in old.__dict__
    with pytest.raises(ValueError, match="expected 4D input"):
        old(make_input((2, 3, 4)))


def test_onnx_export_of_batchnorm_act_model(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is in the tools extra")
    model = _trained(Block("leaky_relu"))
    report = batchnorm.export_onnx(model, make_input((2, 4, 6, 6)), tmp_path / "act.onnx")
    assert report.max_abs_error <= 1e-4
