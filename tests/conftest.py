import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, Triton kernels run under the interpreter on CPU tensors. Triton reads this when
# a kernel is decorated, so it must be set before batchnorm's triton backend is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    """Fresh random data for every test (the seed is printed, so a failure shows it and
    ``BATCHNORM_TEST_SEED=<seed>`` replays it); no process-default backend leaks."""
    import batchnorm

    seed = int(os.environ.get("BATCHNORM_TEST_SEED", "0"))
    seed = seed or int.from_bytes(os.urandom(4), "little")
    print(f"torch seed: {seed} (replay with BATCHNORM_TEST_SEED={seed})")
    torch.manual_seed(seed)
    yield
    batchnorm.set_backend(None)


def pytest_collection_finish(session):
    """With a cold numba cache, a session compiled the kernel modules one at a time as tests
    first needed them (about 15 of a 2-vCPU Zen 3 VM's 16 minutes): a session of many tests
    compiles the missing ones together first, one child process per core
    (``BATCHNORM_TEST_PRECOMPILE=0``: not). Measured on a fresh clone there: 353 s to
    compile, 11 minutes for the whole suite."""
    if len(session.items) < 200 or os.environ.get("BATCHNORM_TEST_PRECOMPILE", "1") == "0":
        return
    try:
        from batchnorm.backends.numba_entry import precompile
    except ImportError:  # numba is optional
        return
    import time

    start = time.perf_counter()
    # what the default suite uses, longest first (not the activation kernels' float16 entries,
    # which it does not use)
    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
    kernels = [(m, d) for m in ("numba_smooth_kernels", "numba_act_kernels")
               for d in (f32, f64, bf16)]
    done = precompile(kernels + [("numba_kernels", d) for d in (f32, f64, f16, bf16)])
    if done:
        print(f"\nnumba kernels compiled first ({time.perf_counter() - start:.0f} s): "
              + ", ".join(done))
