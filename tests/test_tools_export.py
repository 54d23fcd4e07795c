"""ONNX export checked by onnxruntime; safetensors + manifest save/load; NumPy inference from
the manifest and weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.demo import make_resnet_like
from batchnorm.tools import export_onnx, freeze, load, save
from batchnorm.tools.export import OnnxCheckError
from batchnorm.tools.serialize import MANIFEST_KEY, reference_layers
from helpers import TOLERANCES, assert_close

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")


def _trained(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(shape) * 2 + 1)
    return model.eval()


@pytest.mark.parametrize("fold", [True, False])
def test_export_onnx_matches_torch(tmp_path, fold: bool) -> None:
    model = _trained(make_resnet_like(8, (1, 1)), (4, 3, 12, 12))
    x = torch.randn(5, 3, 12, 12)
    report = export_onnx(model, x, tmp_path / "m.onnx", fold=fold)
    assert report.ok and report.max_abs_error is not None and report.max_abs_error < 1e-4
    n_bn = sum(isinstance(m, batchnorm.BatchNorm2d) for m in model.modules())
    assert report.op_counts.get("BatchNormalization", 0) == (0 if fold else n_bn)
    assert not any(k.startswith("batchnorm") for k in report.op_counts)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x2 = torch.randn(2, 3, 12, 12)  # another batch size: dim 0 is dynamic
    with torch.no_grad():
        assert_close(sess.run(None, {"input": x2.numpy()})[0], model(x2), 1e-4, 1e-4, "ort")
    assert "ONNX file" in report.format() and report.to_dict()["folded"] is fold


def test_export_reports_a_mismatch(tmp_path) -> None:
    model = _trained(nn.Sequential(nn.Conv2d(2, 3, 1), batchnorm.BatchNorm2d(3)), (4, 2, 3, 3))
    with pytest.raises(OnnxCheckError, match="max abs error") as info:
        export_onnx(model, torch.randn(2, 2, 3, 3), tmp_path / "m.onnx", atol=0.0, rtol=0.0)
    assert info.value.report.max_abs_error >= 0.0


def _mixed_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4, eps=1e-3, momentum=None),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False),
        nn.Flatten(), nn.Linear(64, 5), batchnorm.BatchNorm1d(5, bias=False),
        nn.Unflatten(1, (5, 1)), batchnorm.BatchNorm(5),
    )
    _trained(model, (6, 3, 6, 6))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.normal_()
    return model


def test_save_load_round_trip_and_manifest(tmp_path) -> None:
    model = _mixed_model()
    freeze(model, ["3"])
    man_path = save(model, tmp_path / "m.safetensors")
    assert man_path == tmp_path / "m.json"
    state, man = load(tmp_path / "m.safetensors")
    expected = model.state_dict()
    assert list(state) == list(expected) or set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    layers = {e["name"]: e for e in man["layers"]}
    assert set(layers) == {"1", "3", "6", "8"}
    assert layers["1"] == {
        "name": "1", "kind": "batchnorm.BatchNorm2d", "num_features": 4, "eps": 1e-3,
        "momentum": None, "affine": True, "bias": True, "track_running_stats": True,
        "frozen": False, "dtype": "float32", "rank": 2,
        "tensors": {r: f"1.{r}" for r in
                    ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")},
    }
    assert layers["3"]["kind"] == "batchnorm.FrozenBatchNorm2d" and layers["3"]["frozen"]
    assert layers["6"]["bias"] is False and "bias" not in layers["6"]["tensors"]
    assert layers["8"]["rank"] is None
    # The header carries the same manifest, for a file travelling alone.
    man_path.unlink()
    assert load(tmp_path / "m.safetensors").manifest == json.loads(json.dumps(man))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert MANIFEST_KEY in f.metadata()


def test_numpy_inference_from_manifest_matches_torch(tmp_path) -> None:
    model = _mixed_model()
    save(model, tmp_path / "m.safetensors")
    layers = reference_layers(load(tmp_path / "m.safetensors"))
    inputs = {"1": (6, 4, 4, 4), "3": (6, 4, 4, 4), "6": (6, 5), "8": (6, 5, 1)}
    for name, shape in inputs.items():
        x = torch.randn(shape)
        got = layers[name](x.double().numpy())
        with torch.no_grad():
            want = model.get_submodule(name)(x)
        atol, rtol = TOLERANCES[torch.float32]
        assert_close(torch.from_numpy(np.asarray(got)), want, atol, rtol, f"layer {name}")


def test_save_rejects_a_json_weights_path(tmp_path) -> None:
    with pytest.raises(ValueError, match="suffix"):
        save(nn.BatchNorm1d(2), tmp_path / "m.json")
