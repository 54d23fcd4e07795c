"""batchnorm: Batch Normalization with PyTorch's exact semantics, fused kernels and tools.

Quick start::

    import batchnorm
    bn = batchnorm.BatchNorm2d(64)            # drop-in for torch.nn.BatchNorm2d
    y = batchnorm.batch_norm(x, rm, rv, training=True, backend="auto")
"""

from __future__ import annotations

from . import reference
from ._validation import BatchNormShapeError
from .backends import (
    BackendUnavailableError,
    available_backends,
    get_default_backend,
    registered_backends,
    set_backend,
)
from .functional import batch_norm, batch_norm_act
from .nn import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormAct,
    SyncBatchNorm,
    SyncBatchNormAct,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from .tools import (
    convert,
    export_onnx,
    fold,
    freeze,
    inspect,
    load,
    recalibrate,
    revert,
    save,
    unfreeze,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormShapeError",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormAct",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "__version__",
    "available_backends",
    "batch_norm",
    "batch_norm_act",
    "convert",
    "convert_sync_batchnorm",
    "export_onnx",
    "fold",
    "freeze",
    "get_default_backend",
    "inspect",
    "load",
    "recalibrate",
    "reference",
    "registered_backends",
    "revert",
    "revert_sync_batchnorm",
    "save",
    "set_backend",
    "unfreeze",
]
