"""Shape catalogue shared by tests and benchmarks.

Each entry is ``(name, shape)`` with channels at dim 1. ``FAST`` is what the default test run
uses; the benchmark sets are the layers users actually run.
"""

from __future__ import annotations

__all__ = [
    "CAMPPLUS",
    "EDGE",
    "FAST",
    "RESNET50",
    "RESNET50_N32",
    "VOLUMETRIC",
    "resnet50",
]

Shape = tuple[int, ...]

# (C, H) of every distinct BatchNorm2d input in torchvision's ResNet-50 at 224x224.
_RESNET50_CH: tuple[tuple[int, int], ...] = (
    (64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28),
    (256, 28), (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7),
)


def resnet50(n: int) -> list[tuple[str, Shape]]:
    """ResNet-50's BatchNorm2d input shapes at batch size ``n`` (NCHW)."""
    return [(f"r50_c{c}_h{h}", (n, c, h, h)) for c, h in _RESNET50_CH]


RESNET50_N32 = resnet50(32)
RESNET50 = RESNET50_N32

# Speaker encoders (CAMPPlus-like): BatchNorm1d on (N, C) embeddings and (N, C, T) frames.
CAMPPLUS: list[tuple[str, Shape]] = [
    ("campp_fc_512", (64, 512)),
    ("campp_seq_512x200", (64, 512, 200)),
    ("campp_seq_128x200", (64, 128, 200)),
    ("campp_2d_32x80x200", (16, 32, 80, 200)),
]

VOLUMETRIC: list[tuple[str, Shape]] = [("vol_c32_16x32x32", (4, 32, 16, 32, 32))]

# Corner cases for correctness: 2 values per channel, odd sizes, C = 1, large C.
EDGE: list[tuple[str, Shape]] = [
    ("two_values", (2, 3)),
    ("two_values_spatial", (1, 4, 2)),
    ("one_channel", (5, 1, 3, 3)),
    ("odd_2d", (3, 5, 7, 9)),
    ("odd_3d", (3, 7, 13)),
    ("wide_c", (4, 1031, 3)),
    ("odd_5d", (2, 3, 3, 5, 7)),
]

# Small shapes of every rank for the fast default test run.
FAST: list[tuple[str, Shape]] = [
    ("nc", (8, 5)),
    ("ncl", (4, 6, 9)),
    ("nchw", (3, 4, 5, 6)),
    ("ncdhw", (2, 3, 4, 3, 5)),
    *EDGE,
]
