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

``rank`` is the spatial rank the layer checks its input for (1, 2, 3 for BatchNorm1d/2d/3d and
their subclasses, such as BatchNormAct2d; null for an any-rank layer: SyncBatchNorm, BatchNorm,
FrozenBatchNorm, or a class that checks the rank its own way); ``momentum`` is PyTorch's
(weight of the new batch; null for a cumulative average); ``frozen`` layers have no
``num_batches_tracked``. A layer that computes ``act(BN(x) + residual)`` (``BatchNormAct*``,
``FrozenBatchNormAct``, ``SyncBatchNormAct``) also has ``"activation"`` and
``"negative_slope"``; a layer whose ``forward`` comes from a class outside torch.nn and this
library (timm's ``BatchNormAct2d``, say) has ``"custom_forward": true``: the manifest cannot
describe what it computes. Manifests written before these fields existed still load.

:func:`reference_layers` rebuilds NumPy reference layers from the manifest and the weights,
without torch modules: what a port to another runtime does. :func:`check_manifest` says
whether a JSON object is such a manifest; :func:`load` and :func:`batchnorm.inspect` use a
``<stem>.json`` found beside a file only when it passes (and describes that file's tensors).
"""

from __future__ import annotations

import json
import re
import warnings
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .. import reference
from ..nn.frozen import FrozenBatchNormAct
from ._modules import _rank_table, bn_config, is_batchnorm

__all__ = ["MANIFEST_KEY", "Loaded", "check_manifest", "load", "manifest", "reference_layers",
           "save"]

MANIFEST_KEY = "batchnorm.manifest"
_FORMAT = "batchnorm.manifest"
_VERSION = 1
_ROLES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Kinds whose layers apply an activation: a manifest entry of one without "activation" was
# written before that field existed, and rebuilding it as a plain BatchNorm would be wrong.
_ACT_KIND = re.compile(r"batchnorm\.\w*BatchNormAct\w*")


class Loaded(NamedTuple):
    """What :func:`load` returns: the state_dict and the manifest (None if there is none)."""

    state_dict: dict[str, Tensor]
    manifest: dict[str, Any] | None


def _rank(module: nn.Module) -> int | None:
    """The spatial rank ``module`` checks its input for: that of the class whose
    ``_check_input_dim`` it runs (``bn_rank`` knows only exact classes, and BatchNormAct2d runs
    BatchNorm2d's). None for any rank, or a check of a class the tools do not know."""
    if isinstance(module, FrozenBatchNormAct):  # checks the rank of the layer it was frozen from
        return module._input_rank
    owner = next((c for c in type(module).__mro__ if "_check_input_dim" in vars(c)), None)
    return _rank_table().get(owner) if owner is not None else None


def _custom_forward(module: nn.Module) -> bool:
    """Whether ``module``'s forward is defined outside torch and this library, so that its
    configuration says nothing certain about what it computes."""
    owner = next((c for c in type(module).__mro__ if "forward" in vars(c)), None)
    return owner is None or not owner.__module__.startswith(("torch.", "batchnorm."))


def manifest(model: nn.Module) -> dict[str, Any]:
    """The manifest of every BatchNorm layer in ``model`` (see the module docstring)."""
    layers = []
    for name, m in model.named_modules():
        if not is_batchnorm(m):
            continue
        prefix = f"{name}." if name else ""
        tensors = {role: prefix + role for role in _ROLES if getattr(m, role, None) is not None}
        entry = {"name": name, **bn_config(m), "rank": _rank(m)}
        if isinstance(getattr(m, "activation", None), str):
            entry["activation"] = m.activation
            entry["negative_slope"] = float(m.negative_slope)
        if _custom_forward(m):
            entry["custom_forward"] = True
        entry["tensors"] = tensors
        layers.append(entry)
    return {"format": _FORMAT, "version": _VERSION, "layers": layers}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_manifest(man: Any, state: dict[str, Tensor] | None = None) -> None:
    """Check that ``man`` is structurally a manifest written by :func:`save`.

    Args:
        man: a parsed JSON value.
        state: the tensors of the file it should describe; when given, every tensor the
            manifest names must be there (else it describes another file).

    Raises:
        ValueError: what is not as :func:`save` writes it.
    """
    if not isinstance(man, dict):
        raise ValueError(f"expected a JSON object with \"format\": \"{_FORMAT}\", got a "
                         f"{type(man).__name__}")
    if man.get("format") != _FORMAT:
        raise ValueError(f"\"format\" is {man.get('format')!r}, expected {_FORMAT!r}")
    version = man.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"\"version\" is {version!r}, expected a positive integer")
    if version > _VERSION:
        raise ValueError(f"version {version} is newer than this library reads ({_VERSION})")
    layers = man.get("layers")
    if not isinstance(layers, list):
        raise ValueError(f"\"layers\" is a {type(layers).__name__}, expected a list")
    required = ("name", "kind", "num_features", "eps", "momentum", "affine",
                "track_running_stats", "tensors")
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict):
            raise ValueError(f"layers[{i}] is a {type(entry).__name__}, expected an object")
        missing = [k for k in required if k not in entry]
        if missing:
            raise ValueError(f"layers[{i}] lacks {', '.join(missing)}")
        where = f"layers[{i}] ({entry['name']!r})"
        ok = (isinstance(entry["name"], str) and isinstance(entry["kind"], str)
              and isinstance(entry["num_features"], int)
              and not isinstance(entry["num_features"], bool) and entry["num_features"] > 0
              and _is_number(entry["eps"])
              and (entry["momentum"] is None or _is_number(entry["momentum"]))
              and isinstance(entry["affine"], bool)
              and isinstance(entry["track_running_stats"], bool))
        if not ok:
            raise ValueError(f"{where}: a field has the wrong type (expected name, kind: "
                             "strings; num_features: a positive integer; eps: a number; "
                             "momentum: a number or null; affine, track_running_stats: "
                             "booleans)")
        tensors = entry["tensors"]
        if not isinstance(tensors, dict) or not all(
                r in _ROLES and isinstance(k, str) for r, k in tensors.items()):
            raise ValueError(f"{where}: \"tensors\" must map roles among {_ROLES} to key "
                             f"names, got {tensors!r}")
        if "activation" in entry and not isinstance(entry["activation"], str):
            raise ValueError(f"{where}: \"activation\" must be a string")
        if "negative_slope" in entry and not _is_number(entry["negative_slope"]):
            raise ValueError(f"{where}: \"negative_slope\" must be a number")
        if state is not None:
            absent = [k for k in tensors.values() if k not in state]
            if absent:
                raise ValueError(f"{where} names tensors the file does not hold "
                                 f"({', '.join(absent)}): a manifest of another file?")
            c = entry["num_features"]
            wrong = [f"{k} {tuple(state[k].shape)}" for r, k in tensors.items()
                     if r != "num_batches_tracked" and tuple(state[k].shape) != (c,)]
            if wrong:
                raise ValueError(f"{where} has num_features {c} but the file holds "
                                 f"{', '.join(wrong)}: a manifest of another file?")


def _sidecar(path: Path, state: dict[str, Tensor]) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, None)`` from ``<stem>.json`` beside ``path`` if it is a manifest of that
    file; ``(None, why not)`` if the file exists but is not; ``(None, None)`` if it is absent."""
    side = path.with_suffix(".json")
    if path.suffix == ".json" or not side.is_file():
        return None, None
    try:
        man = json.loads(side.read_text())
        check_manifest(man, state)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        # json.JSONDecodeError is a ValueError: a JSON file of another tool is no manifest.
        return None, (f"{side.name} beside the file is not a batchnorm.save manifest of this "
                      f"file ({exc})")
    return man, None


def find_manifest(path: str | PathLike[str], state: dict[str, Tensor],
                  header: dict[str, str] | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """The manifest describing the file ``path`` holding ``state``, and notes on what was
    ignored.

    The manifest embedded in a safetensors ``header`` (its metadata) comes first: it travels
    with the weights. Else ``<stem>.json`` beside the file, if :func:`check_manifest` accepts
    it for ``state``. A candidate that fails is ignored with a note saying why (a foreign JSON
    beside a checkpoint is common); so is a sidecar that differs from the header's manifest.
    """
    path = Path(path)
    notes: list[str] = []
    man: dict[str, Any] | None = None
    if header is not None and MANIFEST_KEY in header:
        try:
            man = json.loads(header[MANIFEST_KEY])
            check_manifest(man, state)
        except ValueError as exc:
            man = None
            notes.append(f"the manifest in the safetensors header was ignored ({exc})")
    side, why = _sidecar(path, state)
    if man is None:
        man = side
        if why is not None:
            notes.append(why + ": ignored")
    elif why is not None:
        notes.append(why + ": ignored; the manifest in the safetensors header was used")
    elif side is not None and side != man:
        notes.append(f"{path.with_suffix('.json').name} beside the file differs from the "
                     "manifest in the safetensors header: ignored; the header's was used")
    return man, notes


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


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None, list[str]]:
    """``(state_dict, manifest, notes)`` of a safetensors file (see :func:`find_manifest`)."""
    from safetensors import safe_open

    state: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            state[key] = f.get_tensor(key)
    man, notes = find_manifest(path, state, meta)
    return state, man, notes


def load(path: str | PathLike[str]) -> Loaded:
    """Read a file written by :func:`save`: ``(state_dict, manifest)``.

    The manifest comes from the safetensors header, else from ``<stem>.json`` beside the file
    if that is a manifest of this file (:func:`check_manifest`); None when neither is (any
    safetensors file loads). A candidate that was ignored is reported with a ``UserWarning``.
    """
    path = Path(path)
    state, man, notes = _read(path)
    for note in notes:
        warnings.warn(f"{path}: {note}", stacklevel=2)
    return Loaded(state, man)


def reference_layers(loaded: Loaded) -> dict[str, reference.BatchNorm]:
    """Eval-mode NumPy reference layers (float64) built from a manifest and its weights.

    Uses nothing from torch but the tensors' values: this is the recipe a port to another
    runtime follows (``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``,
    then ``act(y + residual)`` for a layer with an ``activation``: a
    :class:`batchnorm.reference.BatchNormAct`, called as ``layer(x, residual=None)``).

    Raises:
        ValueError: no manifest, one that :func:`check_manifest` refuses, or a layer whose
            output the manifest does not determine: a ``custom_forward`` layer, or a
            BatchNormAct layer from a manifest written before activations were recorded.
    """
    state, man = loaded
    if man is None:
        raise ValueError("no manifest: the layer configs (eps, affine, ...) are unknown")
    check_manifest(man, state)
    layers: dict[str, reference.BatchNorm] = {}
    for entry in man["layers"]:
        name, kind = entry["name"], entry["kind"]
        if entry.get("custom_forward"):
            raise ValueError(f"layer {name!r} ({kind}) has a forward of its own, which the "
                             "manifest cannot describe: no reference layer would compute it")
        common = dict(eps=entry["eps"], momentum=entry["momentum"], affine=entry["affine"],
                      track_running_stats=entry["track_running_stats"])
        bn: reference.BatchNorm
        if "activation" in entry:
            bn = reference.BatchNormAct(
                entry["num_features"], **common, activation=entry["activation"],
                negative_slope=entry.get("negative_slope", 0.01))
        elif _ACT_KIND.fullmatch(kind):
            raise ValueError(f"layer {name!r} ({kind}) applies an activation the manifest "
                             "does not record (written by an older batchnorm.save): save "
                             "the model again")
        else:
            bn = reference.BatchNorm(entry["num_features"], **common)
        values = {role: state[key].to(torch.float64).numpy()
                  for role, key in entry["tensors"].items()}
        if entry["affine"] and "bias" not in values:  # affine without a bias term
            bn.bias = None
        for role, value in values.items():
            if role == "num_batches_tracked":
                bn.num_batches_tracked = int(value)
            else:
                setattr(bn, role, value)
        layers[name] = bn.eval()
    return layers
