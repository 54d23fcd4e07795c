"""Bad input gets a clear exception, raised before any state changes."""

from __future__ import annotations

import math

import pytest
import torch

import batchnorm
from batchnorm import BatchNormShapeError
from helpers import assert_same_state, backend_params

BACKENDS = backend_params()


def _trained(cls=batchnorm.BatchNorm2d, c=3, **kw):
    bn = cls(c, **kw)
    bn(torch.randn(4, c, 3, 3) if cls is batchnorm.BatchNorm2d else torch.randn(4, c, 3))
    return bn


def _raises_without_side_effects(module, x, exc, match):
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(exc, match=match) as info:
        module(x)
    after = module.state_dict()
    for k, v in before.items():
        if v.is_meta:  # a parameter deliberately put on another device has no values
            continue
        assert torch.equal(after[k], v), f"{k} changed although the call raised {info.value!r}"
    return info.value


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_errors_leave_state_untouched(backend):
    bn = _trained(backend=backend)
    cases = [
        (torch.randn(2, 3, 4), ValueError, r"expected 4D input \(got 3D input\)"),
        (torch.randn(2, 4, 3, 3), ValueError, "expected input with 3 channels"),
        (torch.randn(2, 4, 3, 3), RuntimeError, "expected input with 3 channels"),
        (torch.randint(0, 5, (2, 3, 3, 3)), TypeError, "floating-point input"),
        (torch.ones(2, 3, 3, 3, dtype=torch.bool), TypeError, "floating-point input"),
        (torch.randn(1, 3, 1, 1), ValueError,
         r"Expected more than 1 value per channel when training, got input size "
         r"torch.Size\(\[1, 3, 1, 1\]\)"),
    ]
    for x, exc, match in cases:
        _raises_without_side_effects(bn, x, exc, match)


def test_one_value_per_channel_does_not_tick_the_counter():
    """torch.nn increments num_batches_tracked before it raises; we raise first."""
    bn = batchnorm.BatchNorm1d(4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 4))
    assert int(bn.num_batches_tracked) == 0
    bn.eval()
    assert bn(torch.randn(1, 4)).shape == (1, 4)  # eval with buffers: fine


def test_one_value_per_channel_in_eval_without_buffers():
    bn = batchnorm.BatchNorm1d(4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 4, 1))


def test_bad_hyper_parameters_leave_state_untouched():
    for attr, value, match in [
        ("eps", math.nan, "eps must be a finite number"),
        ("eps", math.inf, "eps must be a finite number"),
        ("eps", -1e-5, "eps must be positive during training"),
        ("eps", 0.0, "eps must be positive during training"),
        ("momentum", 1.5, r"momentum must be a number in \[0, 1\]"),
        ("momentum", -0.1, r"momentum must be a number in \[0, 1\]"),
        ("momentum", math.nan, r"momentum must be a number in \[0, 1\]"),
    ]:
        bn = _trained()
        setattr(bn, attr, value)
        _raises_without_side_effects(bn, torch.randn(2, 3, 2, 2), ValueError, match)
    bn = _trained().eval()
    bn.eps = -1.0
    with pytest.raises(ValueError, match="eps must be non-negative"):
        bn(torch.randn(2, 3, 2, 2))


def test_buffers_of_wrong_length_or_device():
    bn = _trained()
    bn.running_mean = torch.zeros(4)
    err = _raises_without_side_effects(bn, torch.randn(2, 3, 2, 2), RuntimeError,
                                       "running_mean should contain 3 elements not 4")
    assert isinstance(err, BatchNormShapeError) and isinstance(err, ValueError)
    bn = _trained()
    bn.weight = torch.nn.Parameter(torch.ones(3, device="meta"))
    _raises_without_side_effects(bn, torch.randn(2, 3, 2, 2), ValueError,
                                 "weight is on meta but input is on cpu")


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"running_mean": torch.zeros(3), "running_var": None}, ValueError, "given together"),
        ({"running_mean": None, "running_var": None, "training": False}, ValueError,
         "running_mean must be defined in evaluation mode"),
        ({"weight": torch.ones(2)}, RuntimeError, "weight should contain 3 elements not 2"),
        ({"bias": torch.ones(3, 1)}, RuntimeError, "bias should contain 3 elements not 3"),
        ({"weight": torch.ones(3, dtype=torch.int64)}, TypeError, "weight must be floating"),
        ({"momentum": 2.0}, ValueError, "momentum"),
        ({"momentum": True}, ValueError, "momentum"),
        ({"eps": float("nan")}, ValueError, "eps"),
        ({"backend": "nope"}, ValueError, "unknown backend 'nope'"),
    ],
)
def test_functional_errors(kwargs, exc, match):
    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "training": True}
    args.update(kwargs)
    rm = args["running_mean"].clone() if args["running_mean"] is not None else None
    with pytest.raises(exc, match=match):
        batchnorm.batch_norm(torch.randn(4, 3, 2), **args)
    if rm is not None:
        assert torch.equal(args["running_mean"], rm), "running_mean changed on error"


def test_functional_rejects_non_tensor_and_low_rank():
    with pytest.raises(TypeError, match="expected input to be a Tensor"):
        batchnorm.batch_norm([1.0, 2.0], None, None, training=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 dims"):
        batchnorm.batch_norm(torch.randn(5), None, None, training=True)


def test_unavailable_or_unsupported_backend_is_a_clear_error():
    x = torch.randn(4, 3)
    with pytest.raises(batchnorm.BackendUnavailableError) as info:
        # the "cuda-only" check: pretend with a device type no backend lists
        batchnorm.backends.get_backend("native").__class__.device_types = ("cuda",)
        try:
            batchnorm.batch_norm(x, None, None, training=True, backend="native")
        finally:
            batchnorm.backends.get_backend("native").__class__.device_types = ()
    assert "runs on cuda tensors, got a cpu tensor" in str(info.value)


def test_error_leaves_torch_module_state_comparable():
    """Sanity for the helper: a successful call does change state."""
    a, b = _trained(), _trained()
    b.load_state_dict(a.state_dict())
    a(torch.randn(2, 3, 2, 2))
    with pytest.raises(AssertionError):
        assert_same_state(a, b, "after a training step")
