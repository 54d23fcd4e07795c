"""inspect: configuration and health findings for models, state_dicts and files."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import freeze, inspect, save
from batchnorm.tools.inspect import CheckpointError, read_checkpoint
from batchnorm.tools.serialize import manifest


def _healthy() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5))
    for _ in range(2):
        model(torch.randn(8, 3, 4, 4))
    return model.eval()


def test_healthy_model_has_no_findings() -> None:
    report = inspect(_healthy())
    assert report.ok and report.findings == [], report.format()
    assert [lay.name for lay in report.layers] == ["1", "5"]
    first = report.layers[0]
    assert (first.kind, first.num_features, first.eps, first.momentum) == (
        "batchnorm.BatchNorm2d", 4, 1e-5, 0.1)
    assert first.num_batches_tracked == 2 and first.training is False
    assert report.layers[1].kind == "torch.nn.BatchNorm1d"
    assert "No problems found" in report.format()
    json.dumps(report.to_dict())  # JSON-serializable


def test_each_finding() -> None:
    model = nn.Sequential(
        batchnorm.BatchNorm1d(3),                                   # 0 never updated
        nn.BatchNorm1d(3, momentum=0.99, eps=1e-3),                 # 1 keras conventions
        batchnorm.BatchNorm1d(3),                                   # 2 nan, negative var
        batchnorm.BatchNorm1d(3),                                   # 3 tiny/huge var, dead
        batchnorm.BatchNorm1d(3),                                   # 4 left in train mode
    )
    with torch.no_grad():
        for i in range(1, 5):
            model[i].num_batches_tracked.fill_(10)
            model[i].running_mean.normal_()
        model[2].running_mean[0] = float("nan")
        model[2].running_var[1] = -1.0
        model[3].running_var.copy_(torch.tensor([0.0, 1e-7, 1e7]))
        model[3].weight[1] = 0.0
    model.eval()
    model[4].train()
    report = inspect(model)
    assert report.layer_codes("0") == {"never_updated"}
    assert report.layer_codes("1") == {"keras_momentum", "keras_eps"}
    assert report.layer_codes("2") == {"nonfinite", "negative_var"}
    assert report.layer_codes("3") == {"near_zero_var", "huge_var", "dead_channels"}
    assert report.layer_codes("4") == {"train_mode_in_eval"}
    assert {f.code for f in report.errors} == {"nonfinite", "negative_var"}
    text = report.format()
    assert "ERROR   nonfinite [2]" in text and "2 error(s)" in text
    assert "PyTorch's 0.01" in next(f.message for f in report.findings
                                   if f.code == "keras_momentum")
    # A model in training mode gets one note (not per layer).
    assert "model_in_training_mode" in inspect(_healthy().train()).codes()


def test_counter_zero_with_set_statistics_is_only_a_note() -> None:
    bn = batchnorm.BatchNorm2d(2)
    with torch.no_grad():
        bn.running_var.fill_(2.0)
    report = inspect(bn.eval())
    assert report.codes() == {"counter_zero"} and report.ok


def test_state_dict_and_nested_checkpoint(tmp_path) -> None:
    model = _healthy()
    freeze(model, ["5"])
    report = inspect(model.state_dict())
    assert [lay.name for lay in report.layers] == ["1", "5"]
    assert report.layers[0].eps is None and report.layers[0].num_batches_tracked == 2
    assert report.layers[1].num_batches_tracked is None  # frozen: no counter
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model": model.state_dict(), "optimizer": {"lr": 0.1}}, path)
    report = inspect(path)
    assert [lay.name for lay in report.layers] == ["model.1", "model.5"]


def test_safetensors_with_manifest(tmp_path) -> None:
    model = _healthy()
    with torch.no_grad():
        model[1].running_var[0] = float("inf")
    save(model, tmp_path / "m.safetensors")
    report = inspect(str(tmp_path / "m.safetensors"))
    first = report.layers[0]
    assert first.kind == "batchnorm.BatchNorm2d" and first.eps == 1e-5 and first.momentum == 0.1
    assert report.layer_codes("1") == {"nonfinite"}


def test_unreadable_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        inspect(tmp_path / "missing.pt")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="unsupported file format"):
        inspect(bad)
    good = tmp_path / "m.safetensors"
    save(_healthy(), good)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors"):
        inspect(truncated)
    zipped = tmp_path / "z.pt"
    torch.save(_healthy().state_dict(), zipped)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(zipped.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        inspect(broken)
    pickled = tmp_path / "whole_model.pt"
    torch.save(_healthy(), pickled)  # a pickled nn.Module needs code to load
    with pytest.raises(CheckpointError, match="weights_only=True"):
        inspect(pickled)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        inspect(42)


def _checkpoints_with_foreign_sidecars(tmp_path):
    """A torch checkpoint and a saved safetensors file, each beside a JSON list named like
    a manifest (``<stem>.json``)."""
    model = _healthy()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    save(model, tmp_path / "model2.safetensors")  # header manifest, and model2.json
    for stem in ("model", "model2"):
        (tmp_path / f"{stem}.json").write_text('["not", "a", "manifest"]')
    return tmp_path / "model.pt", tmp_path / "model2.safetensors"


def test_foreign_sidecar_is_ignored_with_a_note(tmp_path) -> None:
    pt, st = _checkpoints_with_foreign_sidecars(tmp_path)
    report = inspect(pt)
    assert report.codes() == {"manifest_ignored"}, report.format()
    assert not report.layers[0].config_known and report.layers[0].eps is None
    note = report.findings[0]
    assert note.severity == "info" and "model.json" in note.message and "list" in note.message
    report = inspect(st)
    # The header's manifest is used: the configs are known.
    assert report.codes() == {"manifest_ignored"}, report.format()
    assert report.layers[0].config_known and report.layers[0].kind == "batchnorm.BatchNorm2d"
    assert "header was used" in report.findings[0].message
    # A dict that is not this library's manifest is not taken for one either.
    (tmp_path / "model.json").write_text('{"layers": [{"name": "1", "eps": 0.5}]}')
    report = inspect(pt)
    assert report.layers[0].eps is None and "manifest_ignored" in report.codes()
    with pytest.warns(UserWarning, match="model.json beside the file is not a batchnorm.save"):
        read_checkpoint(pt)


def test_valid_sidecar_beside_a_torch_checkpoint_is_used(tmp_path) -> None:
    model = _healthy()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(json.dumps(manifest(model)))
    report = inspect(tmp_path / "m.pt")
    assert report.findings == [] and report.layers[0].eps == 1e-5, report.format()
    assert report.layers[0].kind == "batchnorm.BatchNorm2d"
    # The same manifest beside a checkpoint whose tensors it does not describe is refused.
    torch.save({"other.running_mean": torch.zeros(2), "other.running_var": torch.ones(2)},
               tmp_path / "m.pt")
    report = inspect(tmp_path / "m.pt")
    assert report.codes() == {"manifest_ignored"}, report.format()
    assert "another file" in next(f.message for f in report.findings
                                  if f.code == "manifest_ignored")


def test_cli_inspect_ignores_a_foreign_sidecar(tmp_path, capsys) -> None:
    from batchnorm.cli import main

    for path in _checkpoints_with_foreign_sidecars(tmp_path):
        # 0: no error-level finding (1 would claim NaN/negative variance; 2 an unreadable file).
        assert main(["inspect", str(path)]) == 0, capsys.readouterr()
        out = capsys.readouterr()
        assert "INFO    manifest_ignored" in out.out and out.err == "", out
        assert main(["inspect", str(path), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert [f["code"] for f in data["findings"]] == ["manifest_ignored"]
