"""Tools for the whole life of a BatchNorm layer: convert, freeze, recalibrate, fold, export,
save/load and inspect.

Every optional dependency (onnx, onnxruntime, safetensors, tqdm) is imported inside the
function that needs it, so importing this package costs nothing beyond torch.
"""

from __future__ import annotations

from .convert import convert, revert
from .export import export_onnx
from .fold import FoldCheckError, fold, fold_conv_bn_weights, fold_linear_bn_weights
from .freeze import freeze, unfreeze
from .inspect import InspectReport, inspect
from .recalibrate import recalibrate
from .serialize import load, save

__all__ = [
    "FoldCheckError",
    "InspectReport",
    "convert",
    "export_onnx",
    "fold",
    "fold_conv_bn_weights",
    "fold_linear_bn_weights",
    "freeze",
    "inspect",
    "load",
    "recalibrate",
    "revert",
    "save",
    "unfreeze",
]
