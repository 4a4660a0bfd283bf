"""Test configuration shared by every test module.

Without a GPU, Triton kernels are tested through Triton's CPU interpreter; the variable must be set before
triton is first imported, which is why it is set here, at collection time.
"""

import os

import pytest

try:
    import torch

    _HAS_GPU = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_GPU = False

if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _HAS_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def gpu_device():
    """The CUDA device; tests using it are skipped where there is none."""
    if not _HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
