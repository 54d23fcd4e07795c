"""The ``batchnorm`` command and the demo's logic."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.cli import main
from batchnorm.demo import run_demo
from batchnorm.tools import save


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchnorm.cli", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def checkpoint(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4, momentum=0.99))
    model(torch.randn(4, 3, 5, 5))
    path = tmp_path / "m.safetensors"
    save(model, path)
    return path


def test_inspect_prints_text_and_json(checkpoint) -> None:
    out = _cli("inspect", str(checkpoint))
    assert out.returncode == 0, out.stderr
    assert "batchnorm.BatchNorm2d" in out.stdout and "keras_momentum" in out.stdout
    out = _cli("inspect", str(checkpoint), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["layers"][0]["momentum"] == 0.99
    assert {f["code"] for f in data["findings"]} == {"keras_momentum"}


def test_inspect_exit_codes(tmp_path, capsys) -> None:
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x80\x02 not really a pickle")
    assert main(["inspect", str(bad)]) == 2
    assert "corrupt or unreadable torch checkpoint" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    state = {"bn.running_mean": torch.zeros(2), "bn.running_var": torch.tensor([1.0, -1.0])}
    torch.save(state, tmp_path / "neg.pt")
    assert main(["inspect", str(tmp_path / "neg.pt")]) == 1  # an error-level finding
    assert "negative_var" in capsys.readouterr().out


def test_bench_forwards_or_fails_clearly(capsys, monkeypatch) -> None:
    try:
        from batchnorm.benchmarking import main as _  # noqa: F401
    except ImportError:
        assert main(["bench", "--anything"]) == 2
        assert "benchmarking module is not available" in capsys.readouterr().err
    else:
        seen = []
        monkeypatch.setattr("batchnorm.benchmarking.main", lambda argv: seen.append(argv) or 0)
        assert main(["bench", "--shape", "2,3", "-x"]) == 0
        assert seen == [["--shape", "2,3", "-x"]]


def test_demo_logic_in_brief(tmp_path) -> None:
    result = run_demo(epochs=1, progress=False, output_dir=tmp_path, log=None,
                      latency_repeats=3)
    # One epoch: the running averages lag behind the weights; recalibration catches up.
    assert 0.0 < result.accuracy_eval <= 1.0 and result.accuracy_recalibrated > 0.6
    assert abs(result.accuracy_folded - result.accuracy_recalibrated) <= 2 / result.n_test
    assert result.onnx_max_abs_error < 1e-4 and result.onnx_prediction_agreement == 1.0
    assert "BatchNormalization" not in result.onnx_ops and result.onnx_ops["Conv"] == 3
    assert {p.name for p in tmp_path.iterdir()} == {"digits.onnx", "digits.safetensors",
                                                    "digits.json"}
    table = result.format()
    assert "after recalibration" in table and "ONNX vs torch" in table


@pytest.mark.slow
def test_demo_command_end_to_end() -> None:
    out = _cli("demo", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "test accuracy after recalibration" in out.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--shape", "2,x"], "comma-separated integers"),
    (["--shape", "2,,3"], "comma-separated integers"),
    (["--shape", "3"], "at least two positive sizes"),
    (["--shape", "0,3"], "at least two positive sizes"),
    (["--threads", "0"], "positive integer"),
    (["--threads", "-1"], "positive integer"),
])
def test_bench_refuses_bad_arguments_before_any_work(args, message, capsys) -> None:
    """A user mistake is an argparse error (exit 2, one clear line), not a traceback after
    the copy-bandwidth measurement."""
    from batchnorm.benchmarking import cpu

    with pytest.raises(SystemExit) as exc:
        cpu.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
