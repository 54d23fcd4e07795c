"""The benchmark harness behind ``batchnorm bench``.

``--device cpu`` (the default) runs :mod:`.cpu` (the numba backend vs ATen, issue 3);
``--device cuda`` runs :mod:`.gpu` (the Triton backend, issue 4). Each is imported only when
chosen, so neither numba nor triton is needed to import this package.
"""

from __future__ import annotations

import argparse

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Route ``batchnorm bench [--device {cpu,cuda}] ...`` to the device's benchmark; every
    argument (``--device`` included) is passed on. Returns the exit status."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    known, _ = parser.parse_known_args(argv)
    if known.device == "cuda":
        from .gpu import main as run
    else:
        from .cpu import main as run
    return int(run(argv) or 0)
