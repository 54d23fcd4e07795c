"""Export to standard ONNX and check the file against onnxruntime.

This package's BatchNorm modules run custom ops (``batchnorm::forward_eval``) that no ONNX
runtime knows, so the exported graph is built from a copy that uses only standard torch ops:
by default a folded copy (:func:`batchnorm.fold`: BatchNorm merged into Conv/Linear weights,
the rest as ``Mul``/``Add``), or with ``fold=False`` a copy reverted to torch.nn BatchNorm
(``BatchNormalization`` nodes in inference mode, which every runtime supports).

The TorchScript-based exporter (``dynamo=False``) is used by default: for plain
Conv/Linear/BatchNorm graphs it is quick (well under a second) and has no extra
dependency; ``dynamo=True`` selects ``torch.export``-based export (needs onnxscript).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .convert import revert
from .fold import fold as fold_model

__all__ = ["OnnxCheckError", "OnnxExportReport", "export_onnx"]


class OnnxCheckError(AssertionError):
    """onnxruntime's output differs from the torch model's beyond the tolerance."""

    def __init__(self, message: str, report: OnnxExportReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class OnnxExportReport:
    """What :func:`export_onnx` wrote and how well onnxruntime agrees with torch.

    ``max_abs_error``/``max_rel_error`` compare onnxruntime's outputs with the *original*
    model's eval outputs on the example input, ``max_abs_output`` is the largest torch output
    magnitude (all None when ``check=False``).
    """

    path: str
    opset: int
    folded: bool
    exporter: str
    op_counts: dict[str, int] = field(default_factory=dict)
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    max_abs_output: float | None = None
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def ok(self) -> bool:
        """Within ``atol + rtol * max_abs_output`` (True when not checked)."""
        if self.max_abs_error is None or self.max_abs_output is None:
            return True
        return self.max_abs_error <= self.atol + self.rtol * self.max_abs_output

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.op_counts.items()))
        lines = [f"ONNX file: {self.path} (opset {self.opset}, {self.exporter} exporter, "
                 f"{'folded' if self.folded else 'BatchNormalization nodes'})", f"ops: {ops}"]
        if self.max_abs_error is not None:
            lines.append(f"onnxruntime vs torch: max abs error {self.max_abs_error:.3e}, "
                         f"max rel error {self.max_rel_error:.3e}")
        return "\n".join(lines)


def _as_tuple(x: Any) -> tuple[Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _flat_outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat_outputs(o)]
    raise TypeError(f"cannot compare a model output of type {type(out).__name__}")


def _refuse_custom_ops(prepared: nn.Module, folded: bool) -> None:
    """Raise, naming them, if layers that run this package's custom ops (which no ONNX runtime
    knows) are left in the model to export."""
    from ..nn.batchnorm import _BatchNormBase

    left = [(name or "<root>", m) for name, m in prepared.named_modules()
            if isinstance(m, _BatchNormBase)]
    if not left:
        return
    names = ", ".join(
        f"{name} ({type(m).__name__}"
        f"{', no running statistics' if getattr(m, 'running_mean', None) is None else ''})"
        for name, m in left)
    why = ("layers without running statistics normalize with batch statistics even in eval, "
           "which ONNX inference cannot express: build them with track_running_stats=True "
           "(and batchnorm.recalibrate them), or replace them" if folded else
           "fold=False exports torch.nn BatchNorm as BatchNormalization nodes, and these "
           "layers have no torch.nn equivalent: use fold=True")
    raise ValueError(f"export_onnx cannot export {names}: {why}")


def export_onnx(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    path: str | PathLike[str],
    *,
    fold: bool = True,
    opset: int = 17,
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    dynamo: bool = False,
) -> OnnxExportReport:
    """Write ``model`` (in eval mode) as a standard ONNX file and check it with onnxruntime.

    Args:
        model: the model; not modified (a copy is exported).
        example_input: a tensor or a tuple of positional input tensors.
        path: the ``.onnx`` file to write.
        fold: fold BatchNorm into the preceding layers first (else export BatchNormalization).
        opset: ONNX opset version.
        dynamic_batch: make dim 0 of every input and output dynamic (TorchScript exporter).
        check: run the file in onnxruntime (CPU) on ``example_input`` and compare with the
            original model's eval output.
        atol, rtol: allowed ``|ort - torch| <= atol + rtol * max|torch|`` (fp32 defaults).
        dynamo: use the ``torch.export``-based exporter.

    Returns:
        An :class:`OnnxExportReport`.

    Raises:
        ValueError: layers that would run this package's custom ops are left (BatchNorm
            without running statistics; with ``fold=False``, BatchNormAct and subclasses).
        FoldCheckError: with ``fold`` and ``check``, the folded torch model already differs
            from the original on ``example_input`` (before any ONNX).
        OnnxCheckError: onnxruntime disagrees beyond the tolerance (the report is attached).
        ImportError: onnx or onnxruntime is missing (``pip install batchnorm[tools]``).
    """
    args = _as_tuple(example_input)
    path = Path(path)
    # with check=True, fold's own comparison on the example input runs first, so that a
    # fold that changed the function is reported as such, not as an onnxruntime mismatch
    prepared = (fold_model(model, example_input=args if check else None) if fold
                else revert(copy.deepcopy(model)).eval())
    _refuse_custom_ops(prepared, fold)
    names_in = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    with torch.no_grad():
        reference = _flat_outputs(copy.deepcopy(model).eval()(*args))
    names_out = [f"output{i}" if len(reference) > 1 else "output" for i in range(len(reference))]
    exporter = "dynamo" if dynamo else "torchscript"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        if dynamo:
            torch.onnx.export(prepared, args, str(path), input_names=names_in,
                              output_names=names_out, opset_version=max(opset, 18),
                              dynamo=True, verbose=False)
        else:
            axes = {n: {0: "batch"} for n in names_in + names_out} if dynamic_batch else None
            # PRESERVE (the model is in eval mode anyway) keeps the exporter from fusing
            # Conv + BatchNormalization itself when fold=False asks for BN nodes.
            torch.onnx.export(prepared, args, str(path), input_names=names_in,
                              output_names=names_out, opset_version=opset,
                              dynamic_axes=axes, dynamo=False,
                              training=torch.onnx.TrainingMode.PRESERVE)
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    report = OnnxExportReport(
        path=str(path),
        opset=next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset),
        folded=fold,
        exporter=exporter,
        op_counts=dict(Counter(n.op_type for n in proto.graph.node)),
        atol=atol,
        rtol=rtol,
    )
    if not check:
        return report
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    outputs = session.run(None, feeds)
    abs_err = rel_err = ref_max = 0.0
    for got, want in zip(outputs, reference):
        want64 = want.detach().double().cpu()
        diff = (torch.from_numpy(got).double() - want64).abs()
        if diff.numel():
            abs_err = max(abs_err, float(diff.max()))
            ref_max = max(ref_max, float(want64.abs().max()))
            rel_err = max(rel_err, float((diff / want64.abs().clamp_min(1e-12)).max()))
    report.max_abs_error, report.max_rel_error, report.max_abs_output = abs_err, rel_err, ref_max
    if not report.ok:
        raise OnnxCheckError(
            f"onnxruntime output differs from torch: max abs error {abs_err:.3e} > "
            f"atol {atol:g} + rtol {rtol:g} * max|output| {ref_max:.3e} ({path})", report
        )
    return report
