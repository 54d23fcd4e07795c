"""The ``batchnorm`` command: ``demo``, ``inspect PATH`` and ``bench ...``.

Thin by design: each command calls tested library functions. Exit codes: 0 success; 1 the
inspected file has error-level findings (NaN/Inf, negative variance); 2 usage errors and
files that cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(epochs=args.epochs, progress=not args.no_progress,
                      output_dir=args.output, log=lambda s: print(f"- {s}", flush=True))
    print(result.format())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .tools.inspect import CheckpointError, inspect

    try:
        report = inspect(args.path)
    except (FileNotFoundError, CheckpointError) as exc:
        print(f"batchnorm inspect: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 1 if report.errors else 0


def _bench(argv: list[str]) -> int:
    try:
        from . import benchmarking  # type: ignore[attr-defined]
    except ImportError as exc:
        print(f"batchnorm bench: error: the benchmarking module is not available ({exc})",
              file=sys.stderr)
        return 2
    run = getattr(benchmarking, "main", None)
    if run is None:
        print("batchnorm bench: error: the benchmarking module is not available "
              "(batchnorm.benchmarking has no main(argv))", file=sys.stderr)
        return 2
    return int(run(argv) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm", description="BatchNorm with PyTorch's semantics: tools and demo.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train, recalibrate, fold and export a small CNN on "
                                       "scikit-learn's digits, and print a summary")
    demo.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    demo.add_argument("--output", metavar="DIR", default=None,
                      help="keep the ONNX, safetensors and manifest files in DIR")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    insp = sub.add_parser("inspect", help="report the BatchNorm layers of a safetensors file "
                                          "or torch checkpoint (loaded with weights_only=True)")
    insp.add_argument("path", help="a .safetensors file or a torch.save checkpoint")
    insp.add_argument("--json", action="store_true", help="print the report as JSON")
    insp.set_defaults(func=_inspect)

    # Listed for --help; main() forwards everything after "bench" untouched (argparse's
    # REMAINDER would still parse a leading "--option").
    sub.add_parser("bench", help="run the benchmarks (arguments are forwarded to "
                                 "batchnorm.benchmarking)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``batchnorm`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
