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
