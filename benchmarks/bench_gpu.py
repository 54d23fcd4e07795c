"""GPU benchmark of the Triton backend (issue 4); see ``batchnorm.benchmarking.gpu``.

Usage (on a machine with an NVIDIA GPU)::

    python benchmarks/bench_gpu.py --device cuda --batch 256
    python benchmarks/bench_gpu.py --device cuda --batch 32
    python benchmarks/bench_gpu.py --compile-report     # no GPU needed
"""

from __future__ import annotations

import sys

from batchnorm.benchmarking.gpu import main

if __name__ == "__main__":
    sys.exit(main())
