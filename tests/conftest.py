import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    """Fresh but reproducible random data per test; no process-default backend leaks."""
    import batchnorm

    torch.manual_seed(int.from_bytes(os.urandom(4), "little") if os.environ.get(
        "BATCHNORM_TEST_RANDOM_SEED") else 1234)
    yield
    batchnorm.set_backend(None)
