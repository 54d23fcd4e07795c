"""export_onnx: layers it cannot export, and a fold that changed the function, are reported
as such before any ONNX is written (not as an exporter failure or an onnxruntime mismatch)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools.fold import FoldCheckError

pytest.importorskip("onnx", reason="export_onnx needs onnx (pip install batchnorm[tools])")
pytest.importorskip("onnxruntime", reason="export_onnx checks with onnxruntime")


def test_layers_without_an_onnx_form_are_named(tmp_path) -> None:
    x = torch.randn(2, 3, 5, 5)
    act = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNormAct2d(4, activation="relu"))
    with pytest.warns(UserWarning), \
            pytest.raises(ValueError, match=r"1 \(BatchNormAct2d\).*fold=True"):
        batchnorm.export_onnx(act, x, tmp_path / "a.onnx", fold=False)
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(),
                             batchnorm.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="no running statistics"):
        batchnorm.export_onnx(no_stats, x, tmp_path / "b.onnx")
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


class _Untraceable(nn.Module):
    """The parent also calls the Sequential's first layer; torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        with torch.no_grad():
            self.body[1].running_mean.normal_()
            self.body[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            x = x * 0
        return self.body(x) + self.body[0](x)


def test_a_fold_that_changed_the_function_is_blamed_on_fold(tmp_path) -> None:
    with pytest.warns(UserWarning, match="could not trace"), \
            pytest.raises(FoldCheckError, match="fold changed the model's output"):
        batchnorm.export_onnx(_Untraceable().eval(), torch.randn(2, 3, 4, 4),
                              tmp_path / "c.onnx")
