"""CPU benchmark of the numba backend (issue 3); see ``batchnorm.benchmarking.cpu``.

Usage::

    python benchmarks/bench_cpu.py                      # full run (long)
    python benchmarks/bench_cpu.py --quick              # smoke run
    python benchmarks/bench_cpu.py --no-compile --plot benchmarks/out/cpu.png --out benchmarks/out
"""

from __future__ import annotations

import sys

from batchnorm.benchmarking.cpu import main

if __name__ == "__main__":
    sys.exit(main())
