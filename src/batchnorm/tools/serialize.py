"""Save and load weights as safetensors plus a JSON manifest of every BatchNorm layer.

Layout, for ``save(model, "model.safetensors")``:

* ``model.safetensors``: the model's ``state_dict`` under torch's key names (``<layer>.weight``,
  ``.bias``, ``.running_mean``, ``.running_var``, ``.num_batches_tracked``), the manifest also
  stored in the header metadata under ``"batchnorm.manifest"`` so that one file describes
  itself;
* ``model.json``: the same manifest, for code generators (PyCandle-style) that read layer
  configs beside the weights.

Manifest::

    {"format": "batchnorm.manifest", "version": 1,
     "layers": [{"name": "features.1", "kind": "batchnorm.BatchNorm2d", "num_features": 64,
                 "eps": 1e-05, "momentum": 0.1, "affine": true, "bias": true,
                 "track_running_stats": true, "frozen": false, "dtype": "float32", "rank": 2,
                 "tensors": {"weight": "features.1.weight", ...}}, ...]}

``rank`` is the spatial rank of the layer's class (1, 2, 3 for BatchNorm1d/2d/3d, null for an
any-rank layer: SyncBatchNorm, BatchNorm, FrozenBatchNorm); ``momentum`` is PyTorch's (weight
of the new batch; null for a cumulative average); ``frozen`` layers have no
``num_batches_tracked``. :func:`reference_layers` rebuilds NumPy reference layers from the
manifest and the weights, without torch modules: what a port to another runtime does.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .. import reference
from ._modules import bn_config, is_batchnorm

__all__ = ["MANIFEST_KEY", "Loaded", "load", "manifest", "reference_layers", "save"]

MANIFEST_KEY = "batchnorm.manifest"
_FORMAT = "batchnorm.manifest"
_VERSION = 1


class Loaded(NamedTuple):
    """What :func:`load` returns: the state_dict and the manifest (None if there is none)."""

    state_dict: dict[str, Tensor]
    manifest: dict[str, Any] | None


def manifest(model: nn.Module) -> dict[str, Any]:
    """The manifest of every BatchNorm layer in ``model`` (see the module docstring)."""
    layers = []
    for name, m in model.named_modules():
        if not is_batchnorm(m):
            continue
        prefix = f"{name}." if name else ""
        tensors = {role: prefix + role for role in
                   ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
                   if getattr(m, role, None) is not None}
        layers.append({"name": name, **bn_config(m), "tensors": tensors})
    return {"format": _FORMAT, "version": _VERSION, "layers": layers}


def _manifest_path(path: Path) -> Path:
    if path.suffix == ".json":
        raise ValueError(f"{path}: the weights file needs a suffix other than .json "
                         "(the manifest is written beside it as <stem>.json)")
    return path.with_suffix(".json")


def save(model: nn.Module, path: str | PathLike[str]) -> Path:
    """Write ``model``'s state_dict as safetensors and the BatchNorm manifest beside it.

    Returns:
        The manifest's path (``path`` with the suffix ``.json``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    man_path = _manifest_path(path)
    # Clone: safetensors refuses tensors sharing storage (tied weights, views).
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in
             model.state_dict().items()}
    man = manifest(model)
    text = json.dumps(man, indent=2)
    save_file(state, str(path), metadata={MANIFEST_KEY: json.dumps(man)})
    man_path.write_text(text + "\n")
    return man_path


def load(path: str | PathLike[str]) -> Loaded:
    """Read a file written by :func:`save`: ``(state_dict, manifest)``.

    The manifest comes from ``<stem>.json`` beside the file when present, else from the
    safetensors header; None when neither exists (any safetensors file loads).
    """
    from safetensors import safe_open

    path = Path(path)
    state: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            state[key] = f.get_tensor(key)
    man: dict[str, Any] | None = None
    side = path.with_suffix(".json")
    if path.suffix != ".json" and side.is_file():
        man = json.loads(side.read_text())
    elif MANIFEST_KEY in meta:
        man = json.loads(meta[MANIFEST_KEY])
    return Loaded(state, man)


def reference_layers(loaded: Loaded) -> dict[str, reference.BatchNorm]:
    """Eval-mode NumPy reference layers (float64) built from a manifest and its weights.

    Uses nothing from torch but the tensors' values: this is the recipe a port to another
    runtime follows (``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``).
    """
    state, man = loaded
    if man is None:
        raise ValueError("no manifest: the layer configs (eps, affine, ...) are unknown")
    layers = {}
    for entry in man["layers"]:
        bn = reference.BatchNorm(
            entry["num_features"], eps=entry["eps"], momentum=entry["momentum"],
            affine=entry["affine"], track_running_stats=entry["track_running_stats"],
        )
        values = {role: state[key].to(torch.float64).numpy()
                  for role, key in entry["tensors"].items()}
        if entry["affine"] and "bias" not in values:  # affine without a bias term
            bn.bias = None
        for role, value in values.items():
            if role == "num_batches_tracked":
                bn.num_batches_tracked = int(value)
            else:
                setattr(bn, role, value)
        layers[entry["name"]] = bn.eval()
    return layers
