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
    SyncBatchNorm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
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
    "SyncBatchNorm",
    "__version__",
    "available_backends",
    "batch_norm",
    "batch_norm_act",
    "convert_sync_batchnorm",
    "get_default_backend",
    "reference",
    "registered_backends",
    "revert_sync_batchnorm",
    "set_backend",
]
