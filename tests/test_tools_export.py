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


def _act_model() -> nn.Module:
    """BatchNormAct layers (two activations with a negative branch) and a frozen one."""
    model = nn.Sequential(
        batchnorm.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2),
        batchnorm.BatchNormAct2d(4, activation="elu"),
        batchnorm.BatchNormAct2d(4, activation="gelu"),
        batchnorm.BatchNormAct1d(4, activation="silu"),
    )
    with torch.no_grad():
        for m in model:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
            m.weight.normal_()
            m.bias.normal_()
    freeze(model, ["3"])
    return model.eval()


def test_manifest_records_activation_and_rank_of_act_layers(tmp_path) -> None:
    save(_act_model(), tmp_path / "a.safetensors")
    layers = {e["name"]: e for e in load(tmp_path / "a.safetensors").manifest["layers"]}
    got = {n: (e["kind"], e["rank"], e.get("activation"), e.get("negative_slope"))
           for n, e in layers.items()}
    assert got == {
        "0": ("batchnorm.BatchNormAct2d", 2, "leaky_relu", 0.2),
        "1": ("batchnorm.BatchNormAct2d", 2, "elu", 0.01),
        "2": ("batchnorm.BatchNormAct2d", 2, "gelu", 0.01),
        # Frozen from a BatchNormAct1d: keeps that rank check and the activation.
        "3": ("batchnorm.FrozenBatchNormAct", 1, "silu", 0.01),
    }, got
    assert not any("custom_forward" in e for e in layers.values())


def test_reference_layers_reproduce_act_layers(tmp_path) -> None:
    model = _act_model().double()
    save(model, tmp_path / "a.safetensors")
    layers = reference_layers(load(tmp_path / "a.safetensors"))
    assert all(isinstance(lay, batchnorm.reference.BatchNormAct) for lay in layers.values())
    for name, shape in {"0": (3, 4, 5, 5), "1": (3, 4, 5, 5), "2": (3, 4, 5, 5),
                        "3": (3, 4, 6)}.items():
        # Scaled up so that every activation's negative branch is exercised.
        x = torch.randn(shape, dtype=torch.float64) * 3
        with torch.no_grad():
            want = model.get_submodule(name)(x)
            assert (want < 0).any() or name == "2", name  # the slope matters
            got = torch.from_numpy(np.asarray(layers[name](x.numpy())))
            assert_close(got, want, 1e-12, 1e-12, f"layer {name}, residual None")
            r = torch.randn(shape, dtype=torch.float64)
            got = torch.from_numpy(np.asarray(layers[name](x.numpy(), r.numpy())))
            assert_close(got, model.get_submodule(name)(x, r), 1e-12, 1e-12,
                         f"layer {name}, with a residual")
    with pytest.raises(NotImplementedError, match="forward only"):
        layers["0"].backward(np.ones((3, 4, 5, 5)))


def _rewrite_manifest(path, edit) -> None:
    """Rewrite the manifest of a saved file, in the header and beside it."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    man = json.loads(path.with_suffix(".json").read_text())
    edit(man)
    save_file(state, str(path), metadata={MANIFEST_KEY: json.dumps(man)})
    path.with_suffix(".json").write_text(json.dumps(man))


def test_old_manifest_without_activation_loads_but_is_not_rebuilt_wrongly(tmp_path) -> None:
    path = tmp_path / "old.safetensors"
    model = nn.Sequential(batchnorm.BatchNorm2d(4), batchnorm.BatchNormAct2d(4))
    save(model, path)

    def strip(man: dict) -> None:
        for e in man["layers"]:
            e.pop("activation", None)
            e.pop("negative_slope", None)

    _rewrite_manifest(path, strip)
    loaded = load(path)
    assert loaded.manifest is not None and len(loaded.manifest["layers"]) == 2
    with pytest.raises(ValueError, match=r"'1' \(batchnorm.BatchNormAct2d\).*older"):
        reference_layers(loaded)
    # Plain layers of an old manifest still rebuild.
    _rewrite_manifest(path, lambda man: man["layers"].pop())
    assert set(reference_layers(load(path))) == {"0"}


class _DoubledBN(nn.BatchNorm2d):
    """A subclass whose forward the manifest cannot describe."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(input)


def test_reference_layers_refuse_a_custom_forward(tmp_path) -> None:
    save(nn.Sequential(_DoubledBN(3)), tmp_path / "c.safetensors")
    loaded = load(tmp_path / "c.safetensors")
    entry = loaded.manifest["layers"][0]
    assert entry["custom_forward"] is True and entry["rank"] == 2, entry
    with pytest.raises(ValueError, match="forward of its own"):
        reference_layers(loaded)


def test_load_prefers_the_header_and_ignores_a_foreign_sidecar(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3))
    save(model, path)
    header_man = json.loads(path.with_suffix(".json").read_text())
    for foreign in (["not", "a", "manifest"], {"format": "something.else", "layers": []},
                    {"format": "batchnorm.manifest", "version": 1, "layers": [
                        {**header_man["layers"][0], "tensors": {"weight": "other.weight"}}]}):
        path.with_suffix(".json").write_text(json.dumps(foreign))
        with pytest.warns(UserWarning, match="m.json beside the file is not a batchnorm.save"):
            assert load(path).manifest == header_man, foreign
    # A valid sidecar that disagrees with the header loses to it, with a warning.
    path.with_suffix(".json").write_text(json.dumps(
        {**header_man, "layers": [{**header_man["layers"][0], "eps": 0.5}]}))
    with pytest.warns(UserWarning, match="differs from the manifest in the safetensors header"):
        assert load(path).manifest == header_man


def test_load_uses_a_valid_sidecar_when_the_header_has_none(tmp_path) -> None:
    from safetensors.torch import save_file

    model = nn.Sequential(nn.BatchNorm1d(3, eps=1e-3))
    path = tmp_path / "bare.safetensors"
    save_file(model.state_dict(), str(path))
    man = batchnorm.tools.serialize.manifest(model)
    path.with_suffix(".json").write_text(json.dumps(man))
    assert load(path).manifest == man
    path.with_suffix(".json").write_text('{"layers": {}}')
    with pytest.warns(UserWarning, match="not a batchnorm.save manifest"):
        assert load(path).manifest is None


@pytest.mark.parametrize(("man", "message"), [
    ([1, 2], "got a list"),
    ({"format": "x"}, "expected 'batchnorm.manifest'"),
    ({"format": "batchnorm.manifest", "version": 99, "layers": []}, "newer"),
    ({"format": "batchnorm.manifest", "version": 1, "layers": {}}, "expected a list"),
    ({"format": "batchnorm.manifest", "version": 1, "layers": [{"name": "a"}]}, "lacks kind"),
])
def test_check_manifest_says_what_is_wrong(man, message: str) -> None:
    from batchnorm.tools.serialize import check_manifest

    with pytest.raises(ValueError, match=message):
        check_manifest(man)
