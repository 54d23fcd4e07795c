"""Modules: drop-in BatchNorm layers."""

from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
