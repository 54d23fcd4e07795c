"""Inspect the BatchNorm layers of a model, a state_dict or a checkpoint file.

:func:`inspect` returns an :class:`InspectReport`: each layer's configuration and a list of
health findings, each with a severity (``error``, ``warning``, ``info``) and a stable code:

==========================  ========  ===============================================
code                        severity  meaning
==========================  ========  ===============================================
``nonfinite``               error     NaN or Inf in a parameter or running statistic
``negative_var``            error     ``running_var < 0`` (no variance is negative)
``near_zero_var``           warning   ``running_var <= eps``: eps dominates, output ~ beta
``huge_var``                warning   ``running_var > 1e6``: exploding activations
``dead_channels``           warning   ``|weight| < 1e-5``: the channel outputs a constant
``never_updated``           warning   ``num_batches_tracked == 0`` and statistics at
                                      their initial values (mean 0, var 1)
``counter_zero``            info      ``num_batches_tracked == 0`` but statistics set
                                      (imported from another framework?)
``train_mode_in_eval``      warning   a BatchNorm in training mode inside a model in
                                      eval mode (uses batch statistics at inference)
``model_in_training_mode``  info      the model is in training mode (call ``eval()``
                                      before inference)
``keras_momentum``          warning   ``momentum >= 0.5``: Keras/Flax's convention (weight
                                      of the OLD value) ported as is
``keras_eps``               info      ``eps == 1e-3``, Keras' default (PyTorch: 1e-5)
``manifest_ignored``        info      a ``<stem>.json`` beside the file (or the header's
                                      manifest) is not a manifest of this file: not used
==========================  ========  ===============================================

Files: safetensors or torch checkpoints, read with ``torch.load(weights_only=True)`` (never
unpickles code). Layer configs come from the manifest of :func:`batchnorm.save`: the one in
the safetensors header, else a ``<stem>.json`` beside the file (any checkpoint) that
:func:`batchnorm.tools.serialize.check_manifest` accepts for the file's tensors; anything else
found there is ignored, with a ``manifest_ignored`` note. In a bare
state_dict a BatchNorm is any key prefix with both ``running_mean`` and ``running_var``;
eps and momentum are then unknown unless a manifest says them.
"""

from __future__ import annotations

import math
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._modules import bn_config, is_batchnorm

__all__ = ["CheckpointError", "Finding", "InspectReport", "LayerReport", "inspect",
           "read_checkpoint"]

_SEVERITIES = ("error", "warning", "info")
DEAD_WEIGHT = 1e-5
HUGE_VAR = 1e6


class CheckpointError(ValueError):
    """A file that is not a readable safetensors file or torch checkpoint."""


@dataclass
class Finding:
    """One health finding: ``severity`` in (error, warning, info), a stable ``code``, the layer
    it concerns (None for the whole model) and a sentence for humans."""

    severity: str
    code: str
    layer: str | None
    message: str


@dataclass
class LayerReport:
    """Configuration and statistics summary of one BatchNorm layer.

    ``config_known`` is False for a bare state_dict without a manifest: eps, momentum and
    training are then unknown (None). Otherwise ``momentum=None`` is a cumulative average.
    """

    name: str
    kind: str
    num_features: int
    config_known: bool = True
    eps: float | None = None
    momentum: float | None = None
    affine: bool | None = None
    track_running_stats: bool | None = None
    training: bool | None = None
    frozen: bool = False
    dtype: str | None = None
    num_batches_tracked: int | None = None
    running_mean_range: tuple[float, float] | None = None
    running_var_range: tuple[float, float] | None = None
    weight_range: tuple[float, float] | None = None


@dataclass
class InspectReport:
    """The result of :func:`inspect`: layers, findings and where they came from."""

    source: str
    layers: list[LayerReport] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    model_training: bool | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """No error and no warning."""
        return not self.errors and not self.warnings

    def codes(self) -> set[str]:
        """Every finding code."""
        return {f.code for f in self.findings}

    def layer_codes(self, layer: str) -> set[str]:
        """The finding codes of one layer."""
        return {f.code for f in self.findings if f.layer == layer}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A plain-text table of the layers followed by the findings."""
        def num(v: Any) -> str:
            if v is None:
                return "?"
            if isinstance(v, bool):
                return "yes" if v else "no"
            return f"{v:g}" if isinstance(v, float) else str(v)

        def rng(r: tuple[float, float] | None) -> str:
            return "-" if r is None else f"[{r[0]:.3g}, {r[1]:.3g}]"

        head = ("layer", "kind", "C", "eps", "momentum", "affine", "mode", "batches",
                "running_var")
        rows = [head]
        for lr in self.layers:
            mode = "frozen" if lr.frozen else {None: "?", True: "train", False: "eval"}[
                lr.training]
            momentum = "cumulative" if lr.config_known and lr.momentum is None else num(
                lr.momentum)
            rows.append((lr.name or "<root>", lr.kind, str(lr.num_features), num(lr.eps),
                         momentum, num(lr.affine), mode, num(lr.num_batches_tracked),
                         rng(lr.running_var_range)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"BatchNorm report for {self.source}: {len(self.layers)} layer(s)"]
        if self.model_training is not None:
            lines[0] += f", model in {'training' if self.model_training else 'eval'} mode"
        if self.layers:
            lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append("")
        if not self.findings:
            lines.append("No problems found.")
        for f in sorted(self.findings, key=lambda f: _SEVERITIES.index(f.severity)):
            where = f" [{f.layer or '<root>'}]" if f.layer is not None else ""
            lines.append(f"{f.severity.upper():7s} {f.code}{where}: {f.message}")
        n_err, n_warn = len(self.errors), len(self.warnings)
        lines.append(f"{n_err} error(s), {n_warn} warning(s), "
                     f"{len(self.findings) - n_err - n_warn} note(s)")
        return "\n".join(lines)


# ---- reading files ---------------------------------------------------------------------------
def _looks_like_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= path.stat().st_size - 8 and head[8:9] == b"{"


def _flatten(obj: Any, prefix: str, out: dict[str, Tensor]) -> None:
    if isinstance(obj, Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}" if prefix else str(i), out)


def read_checkpoint(path: str | PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """``(flat state_dict, manifest or None)`` from a safetensors file or a torch checkpoint.

    Nested checkpoints (``{"model": state_dict, "optimizer": ..., "epoch": 3}``) are
    flattened with dotted keys. Torch files are loaded with ``weights_only=True``. The
    manifest is found as :func:`batchnorm.tools.serialize.find_manifest` says; a candidate
    that was ignored (a ``<stem>.json`` of another tool, say) is reported with a
    ``UserWarning``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a directory, a corrupt or truncated file, an unsupported format, or a
            pickle that needs code to load (a whole pickled ``nn.Module``, say).
    """
    state, man, notes = _read_checkpoint(path)
    for note in notes:
        warnings.warn(f"{path}: {note}", stacklevel=2)
    return state, man


def _read_checkpoint(path: str | PathLike[str]
                     ) -> tuple[dict[str, Tensor], dict[str, Any] | None, list[str]]:
    """:func:`read_checkpoint`, with the notes on ignored manifests returned, not warned."""
    from .serialize import _read, find_manifest

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    if not p.is_file():
        raise CheckpointError(f"{p} is not a file")
    if _looks_like_safetensors(p):
        try:
            return _read(p)
        except Exception as exc:
            raise CheckpointError(f"{p}: corrupt or truncated safetensors file ({exc})") from exc
    with p.open("rb") as f:
        magic = f.read(2)
    if not (zipfile.is_zipfile(p) or magic[:1] == b"\x80"):
        raise CheckpointError(
            f"{p}: unsupported file format (expected a .safetensors file or a torch checkpoint "
            "written by torch.save)"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
        detail = " ".join(detail.split()) or type(exc).__name__
        if "Unsupported global" not in text:
            raise CheckpointError(f"{p}: corrupt or unreadable torch checkpoint ({detail})"
                                  ) from exc
        raise CheckpointError(
            f"{p}: refusing to load: the checkpoint holds objects other than tensors and plain "
            "containers, and weights_only=True never runs code to rebuild them (save "
            f"model.state_dict() instead of the model). torch said: {detail}"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"{p}: corrupt or unreadable torch checkpoint ({exc})") from exc
    state: dict[str, Tensor] = {}
    _flatten(obj, "", state)
    if not state:
        raise CheckpointError(f"{p}: the checkpoint holds no tensors")
    man, notes = find_manifest(p, state)
    return state, man, notes


# ---- gathering layers ------------------------------------------------------------------------
@dataclass
class _Layer:
    report: LayerReport
    tensors: dict[str, Tensor]


def _module_layers(model: nn.Module) -> list[_Layer]:
    layers = []
    for name, m in model.named_modules():
        if not is_batchnorm(m):
            continue
        tensors = {r: getattr(m, r) for r in
                   ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
                   if isinstance(getattr(m, r, None), Tensor)}
        cfg = bn_config(m)
        layers.append(_Layer(LayerReport(
            name=name, kind=cfg["kind"], num_features=cfg["num_features"], eps=cfg["eps"],
            momentum=cfg["momentum"], affine=cfg["affine"],
            track_running_stats=cfg["track_running_stats"], training=m.training,
            frozen=cfg["frozen"], dtype=cfg["dtype"],
        ), tensors))
    return layers


def _state_layers(state: Mapping[str, Any], man: dict[str, Any] | None) -> list[_Layer]:
    configs = {e["name"]: e for e in (man or {}).get("layers", []) if "name" in e}
    prefixes = [k[: -len("running_mean")] for k in state if k.endswith("running_mean")
                and k[: -len("running_mean")] + "running_var" in state]
    layers = []
    for prefix in prefixes:
        name = prefix[:-1] if prefix.endswith(".") else prefix
        tensors = {r: state[prefix + r] for r in
                   ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
                   if isinstance(state.get(prefix + r), Tensor)}
        cfg = configs.get(name, {})
        rm = tensors["running_mean"]
        layers.append(_Layer(LayerReport(
            name=name, kind=cfg.get("kind", "BatchNorm (state_dict)"),
            num_features=int(rm.numel()), config_known=bool(cfg), eps=cfg.get("eps"),
            momentum=cfg.get("momentum"),
            affine=cfg.get("affine", "weight" in tensors),
            track_running_stats=cfg.get("track_running_stats", True),
            frozen=bool(cfg.get("frozen", False)),
            dtype=str(rm.dtype).removeprefix("torch."),
        ), tensors))
    return layers


# ---- checks ----------------------------------------------------------------------------------
def _range(t: Tensor) -> tuple[float, float] | None:
    t = t.detach().double()
    finite = t[torch.isfinite(t)]
    return None if finite.numel() == 0 else (float(finite.min()), float(finite.max()))


def _check(layer: _Layer, model_training: bool | None, out: list[Finding]) -> None:
    r, t = layer.report, layer.tensors
    name = r.name

    def add(severity: str, code: str, message: str) -> None:
        out.append(Finding(severity, code, name, message))

    c = r.num_features
    bad = {k: int((~torch.isfinite(v.detach())).sum()) for k, v in t.items()
           if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        add("error", "nonfinite", "NaN/Inf values in " + ", ".join(
            f"{k} ({n} of {t[k].numel()})" for k, n in bad.items()))
    eps = r.eps if r.eps is not None else 1e-5
    if "running_var" in t:
        var = t["running_var"].detach().double()
        r.running_var_range = _range(var)
        var = var[torch.isfinite(var)]  # NaN/Inf are reported above
        if (n := int((var < 0).sum())):
            add("error", "negative_var", f"{n} of {c} channels have running_var < 0")
        if (n := int(((var >= 0) & (var <= eps)).sum())):
            add("warning", "near_zero_var",
                f"{n} of {c} channels have running_var <= eps ({eps:g}): eps dominates the "
                "normalization (constant or dead input channels)")
        if (n := int((var > HUGE_VAR).sum())):
            add("warning", "huge_var", f"{n} of {c} channels have running_var > {HUGE_VAR:g} "
                "(exploding activations; overflows float16 beyond 65504)")
    if "running_mean" in t:
        r.running_mean_range = _range(t["running_mean"])
    if "weight" in t:
        w = t["weight"].detach().double()
        r.weight_range = _range(w)
        w = w[torch.isfinite(w)]
        if (n := int((w.abs() < DEAD_WEIGHT).sum())):
            what = ("all weights ~ 0 (zero-initialized gamma never trained?)" if n == c else
                    f"{n} of {c} channels have |weight| < {DEAD_WEIGHT:g}")
            add("warning", "dead_channels", f"{what}: those channels output a constant (bias)")
    if "num_batches_tracked" in t:
        r.num_batches_tracked = int(t["num_batches_tracked"])
        if r.num_batches_tracked == 0 and "running_mean" in t and "running_var" in t:
            at_init = bool((t["running_mean"] == 0).all()) and bool((t["running_var"] == 1).all())
            if at_init:
                add("warning", "never_updated",
                    "num_batches_tracked == 0 and running statistics at their initial values "
                    "(mean 0, var 1): the statistics were never updated, so eval mode does not "
                    "normalize (train the model, or run batchnorm.recalibrate)")
            else:
                add("info", "counter_zero",
                    "num_batches_tracked == 0 but the running statistics are set (imported "
                    "from another framework, or recalibrated?)")
    if model_training is False and r.training and not r.frozen:
        add("warning", "train_mode_in_eval",
            "in training mode inside a model in eval mode: it normalizes with batch statistics "
            "and updates its running statistics at inference")
    if r.momentum is not None and r.momentum >= 0.5:
        add("warning", "keras_momentum",
            f"momentum {r.momentum:g} weighs the NEW batch in PyTorch; Keras/Flax's momentum "
            f"weighs the OLD value, so their {r.momentum:g} is PyTorch's "
            f"{1 - r.momentum:.3g}")
    if r.eps is not None and math.isclose(r.eps, 1e-3):
        add("info", "keras_eps", "eps 1e-3 is Keras' default (PyTorch's is 1e-5): ported?")


def inspect(model_or_state_dict: nn.Module | Mapping[str, Any] | str | PathLike[str]
            ) -> InspectReport:
    """Report the BatchNorm layers of a model, a state_dict or a checkpoint file.

    Args:
        model_or_state_dict: an ``nn.Module``; a (possibly nested) mapping of tensors; or the
            path of a safetensors file or a torch checkpoint.

    Returns:
        An :class:`InspectReport` (``format()`` for text, ``to_dict()`` for JSON).

    Raises:
        FileNotFoundError, CheckpointError: for a path that cannot be read (see
            :func:`read_checkpoint`).
    """
    obj = model_or_state_dict
    model_training = None
    notes: list[str] = []
    if isinstance(obj, nn.Module):
        source = type(obj).__name__
        layers = _module_layers(obj)
        model_training = obj.training
    elif isinstance(obj, Mapping):
        source = "state_dict"
        flat: dict[str, Tensor] = {}
        _flatten(obj, "", flat)
        layers = _state_layers(flat, None)
    elif isinstance(obj, (str, PathLike)):
        source = str(obj)
        state, man, notes = _read_checkpoint(obj)
        layers = _state_layers(state, man)
    else:
        raise TypeError(
            "inspect expects an nn.Module, a state_dict or a file path, got "
            f"{type(obj).__name__}"
        )
    report = InspectReport(source=source, layers=[lay.report for lay in layers],
                           model_training=model_training)
    report.findings += [Finding("info", "manifest_ignored", None, note) for note in notes]
    if model_training:
        report.findings.append(Finding(
            "info", "model_in_training_mode", None,
            "the model is in training mode: BatchNorm uses batch statistics and updates its "
            "running statistics; call model.eval() before inference"))
    for lay in layers:
        _check(lay, model_training, report.findings)
    return report
