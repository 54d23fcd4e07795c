"""fold: BatchNorm folded into Conv / ConvTranspose / Linear, pure math and module plumbing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

import batchnorm
from batchnorm.demo import make_resnet_like
from batchnorm.nn import FrozenBatchNorm, FrozenBatchNorm1d
from batchnorm.tools import fold, fold_conv_bn_weights, fold_linear_bn_weights
from batchnorm.tools.fold import FoldCheckError, LinearFoldCheck, foldable_pairs
from helpers import TOLERANCES, assert_close, assert_same_state

F32, F64 = torch.float32, torch.float64


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Trained-looking BN statistics and affine (fresh ones are the identity map)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm)) and (
                m.running_mean is not None
            ):
                m.running_mean.normal_()
                m.running_var.uniform_(0.3, 3.0)
                if m.weight is not None:
                    m.weight.normal_()
                    m.bias.normal_()
    return model


CASES = [
    (nn.Conv1d(4, 6, 3, bias=True), batchnorm.BatchNorm1d(6), (2, 4, 9)),
    (nn.Conv2d(4, 6, 3, groups=2, bias=False), batchnorm.BatchNorm2d(6, affine=False),
     (2, 4, 7, 7)),
    (nn.Conv3d(3, 4, 2), nn.BatchNorm3d(4, eps=1e-3), (2, 3, 4, 4, 4)),
    (nn.ConvTranspose1d(4, 6, 3, bias=False), nn.BatchNorm1d(6), (2, 4, 5)),
    (nn.ConvTranspose2d(4, 6, 3, groups=2, stride=2), batchnorm.BatchNorm2d(6), (2, 4, 5, 5)),
    (nn.ConvTranspose3d(2, 4, 2, groups=2, bias=False), nn.BatchNorm3d(4), (1, 2, 3, 3, 3)),
    (nn.Linear(5, 6), batchnorm.BatchNorm1d(6), (7, 5)),
    (nn.Linear(5, 6, bias=False), batchnorm.BatchNorm1d(6, affine=False), (7, 5)),
]


@pytest.mark.parametrize(("layer", "bn", "shape"), CASES,
                         ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_fold_pairs_equal_the_eval_model(layer, bn, shape, dtype) -> None:
    model = _randomize_bn(nn.Sequential(layer, bn)).to(dtype).eval()
    x = torch.randn(shape, dtype=dtype)
    folded = fold(model, example_input=x)
    rest = folded[1].rest if isinstance(layer, nn.Linear) else folded[1]
    assert isinstance(rest, nn.Identity)
    atol, rtol = TOLERANCES[dtype]
    with torch.no_grad():
        assert_close(folded(x), model(x), atol, rtol, f"folded {type(layer).__name__}")


@pytest.mark.parametrize("transpose", [False, True])
def test_pure_math_matches_torch_fusion(transpose: bool) -> None:
    groups = 1 if transpose else 2  # torch's transposed fusion assumes groups == 1
    conv = nn.ConvTranspose2d(4, 6, 3) if transpose else nn.Conv2d(4, 6, 3, groups=groups)
    conv = conv.double()
    bn = _randomize_bn(nn.BatchNorm2d(6)).double()
    ours = fold_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                bn.weight, bn.bias, transpose=transpose, groups=groups)
    theirs = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                  bn.eps, bn.weight, bn.bias, transpose=transpose)
    for a, b, what in zip(ours, theirs, ("weight", "bias")):
        assert_close(a, b, *TOLERANCES[F64], what)
    lin = nn.Linear(3, 6).double()
    w, b = fold_linear_bn_weights(lin.weight, lin.bias, bn.running_mean, bn.running_var, bn.eps,
                                  bn.weight, bn.bias)
    x = torch.randn(4, 3, dtype=F64)
    bn1d = nn.BatchNorm1d(6).double().eval()
    bn1d.load_state_dict(bn.state_dict())
    assert_close(x @ w.T + b, bn1d(lin(x)), *TOLERANCES[F64], "linear fold")


def test_resnet_like_folds_every_bn_and_matches_eval() -> None:
    model = _randomize_bn(make_resnet_like(8, (1, 2))).eval()
    original = copy.deepcopy(model)
    pairs, method = foldable_pairs(model)
    n_bn = sum(isinstance(m, batchnorm.BatchNorm2d) for m in model.modules())
    assert method == "fx" and len(pairs) == n_bn, pairs
    folded = fold(model)
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm))
                   for m in folded.modules())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert_close(folded(x), model(x), 1e-4, 1e-4, "folded ResNet-like")
    assert_same_state(model, original, "fold must not modify its input")
    assert type(folded) is type(model) and type(folded[3]) is type(model[3])


class TwoUsers(nn.Module):
    """conv1's output feeds bn1 and the residual add: bn1 must not be folded into conv1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = batchnorm.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = batchnorm.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        z = self.bn2(self.conv2(torch.relu(self.bn1(y)) + y))
        return self.bn3(z) + self.bn3(z * 2)  # bn3 is called twice


def test_conv_with_two_users_and_shared_bn_are_not_folded() -> None:
    model = _randomize_bn(TwoUsers()).eval()
    pairs, method = foldable_pairs(model)
    assert method == "fx" and pairs == [("conv2", "bn2")]
    folded = fold(model)
    assert isinstance(folded.bn2, nn.Identity)
    assert type(folded.bn1) is batchnorm.FrozenBatchNorm2d
    assert type(folded.bn3) is batchnorm.FrozenBatchNorm2d
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close(folded(x), model(x), 1e-5, 1e-4, "partially folded model")


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 5)
        self.bn = batchnorm.BatchNorm1d(5)
        self.spare = nn.BatchNorm1d(5, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x).mean((2, 3))
        if y.sum() > 1e9:  # data-dependent control flow: symbolic tracing fails
            y = y * 0
        return self.bn(self.head(y))


def test_untraceable_model_falls_back_to_sequential() -> None:
    model = _randomize_bn(Untraceable()).eval()
    with pytest.warns(UserWarning, match="could not trace"):
        pairs, method = foldable_pairs(model)
    assert method == "sequential" and pairs == [("features.0", "features.1")]
    with pytest.warns(UserWarning, match="could not trace"):
        folded = fold(model)
    assert isinstance(folded.features[1], nn.Identity)
    assert type(folded.bn) is FrozenBatchNorm1d  # not provably foldable: frozen
    assert type(folded.spare) is nn.BatchNorm1d  # no running stats: left alone
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        assert_close(folded(x), model(x), 1e-5, 1e-4, "sequential fallback")


def test_frozen_bn_after_conv_is_folded_too() -> None:
    model = _randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 1), batchnorm.FrozenBatchNorm2d(3)))
    folded = fold(model)
    assert isinstance(folded[1], nn.Identity)
    x = torch.randn(2, 2, 3, 3)
    with torch.no_grad():
        assert_close(folded(x), model(x), 1e-5, 1e-4, "frozen folded")


class TiedConvs(nn.Module):
    """``bn(c1(x)) + c2(x)`` with c2's weight tied to c1's."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2.weight = self.c1.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c1(x)) + self.c2(x)


def _check_fold_keeps_output(model: nn.Module, x: torch.Tensor, what: str) -> nn.Module:
    model = _randomize_bn(model).eval()
    folded = fold(model, example_input=x)
    with torch.no_grad():
        assert_close(folded(x), model(x), 1e-5, 1e-4, what)
    return folded


def test_tied_or_parametrized_weights_are_not_folded() -> None:
    """Folding rewrites the layer's weight: a weight tied to another layer's, or one a
    parametrization / weight_norm hook recomputes, must stay (the BN is frozen instead)."""
    x = torch.randn(2, 3, 6, 6)
    assert foldable_pairs(_randomize_bn(TiedConvs()))[0] == []
    folded = _check_fold_keeps_output(TiedConvs(), x, "tied weights")
    assert type(folded.bn) is batchnorm.FrozenBatchNorm2d
    tied_seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1))
    tied_seq[2].weight = tied_seq[0].weight
    _check_fold_keeps_output(tied_seq, x, "tied weights in a Sequential")
    from torch.nn.utils import parametrizations

    for wrapped in (parametrizations.weight_norm(nn.Conv2d(3, 4, 3)),
                    parametrizations.spectral_norm(nn.Conv2d(3, 4, 3))):
        model = nn.Sequential(wrapped, nn.BatchNorm2d(4))
        assert foldable_pairs(model)[0] == []
        _check_fold_keeps_output(model, x, "parametrized")
    hooked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    hooked[0].register_forward_hook(lambda m, i, o: o * 2.0)
    assert foldable_pairs(hooked)[0] == []
    _check_fold_keeps_output(hooked, x, "hooked layer")


class SkipSequential(nn.Sequential):
    """A Sequential subclass whose forward also uses the first layer's output directly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self[0](x)
        return self[1](y) + y


class UntraceableSkip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = SkipSequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # untraceable
            x = x * 0
        return self.body(x)


def test_sequential_fallback_skips_containers_with_their_own_forward() -> None:
    model = _randomize_bn(UntraceableSkip()).eval()
    with pytest.warns(UserWarning, match="could not trace"):
        assert foldable_pairs(model)[0] == []
    with pytest.warns(UserWarning, match="could not trace"):
        _check_fold_keeps_output(model, torch.randn(2, 3, 4, 4), "Sequential subclass")


class UntraceableSideCall(nn.Module):
    """The parent also calls the Sequential's first layer: invisible without tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            x = x * 0
        return self.body(x) + self.body[0](x)


def test_example_input_catches_what_the_fallback_cannot_see() -> None:
    model = _randomize_bn(UntraceableSideCall()).eval()
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match="could not trace"):
        fold(model)  # folds body.0 into body.1: wrong for the side call, and only warned
    with pytest.warns(UserWarning, match="could not trace"), \
            pytest.raises(FoldCheckError, match="fold changed the model's output"):
        fold(model, example_input=x)


def test_linear_fold_raises_on_another_rank() -> None:
    """Linear -> BatchNorm1d is folded as (N, C); an (N, C, L) output with L == C (which
    passes the channel-count check) raises instead of computing a wrong answer."""
    model = _randomize_bn(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).eval()
    folded = fold(model)
    assert isinstance(folded[1], LinearFoldCheck)
    x2 = torch.randn(5, 4)
    with torch.no_grad():
        assert_close(folded(x2), model(x2), 1e-5, 1e-4, "(N, C)")
        with pytest.raises(Exception, match="assuming \\(N, C\\) output"):
            folded(torch.randn(5, 4, 4))
    traced = torch.fx.symbolic_trace(folded)  # the check stays traceable
    with torch.no_grad():
        assert_close(traced(x2), model(x2), 1e-5, 1e-4, "traced")
