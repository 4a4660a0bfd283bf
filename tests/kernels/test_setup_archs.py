"""setup.py's CUDA architecture list: NGC-style TORCH_CUDA_ARCH_LIST strings build what the kernels can serve."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module, without running setup() (SWIFT_KERNELS_SETUP_IMPORT=1)."""
    old = os.environ.get("SWIFT_KERNELS_SETUP_IMPORT")
    os.environ["SWIFT_KERNELS_SETUP_IMPORT"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("swift_setup", os.path.join(ROOT, "setup.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["SWIFT_KERNELS_SETUP_IMPORT"]
        else:
            os.environ["SWIFT_KERNELS_SETUP_IMPORT"] = old
    return module


@pytest.mark.parametrize(
    "arch_list,targets,skipped",
    [
        # NGC containers: old architectures are skipped with one line; 9.0 is sm_90a only; +PTX adds PTX.
        ("5.2 6.0 6.1 7.0 7.5 8.0 8.6 9.0+PTX", ["sm_80", "sm_86", "sm_90a", "compute_90"], "5.2, 6.0, 6.1, 7.0, 7.5"),
        ("9.0", ["sm_90a"], None),
        ("9.0a", ["sm_90a"], None),
        ("8.0;9.0", ["sm_80", "sm_90a"], None),
        ("Ampere Hopper", ["sm_80", "sm_86", "compute_86", "sm_90a", "compute_90"], None),
        ("sm_80,sm_90a", ["sm_80", "sm_90a"], None),
        ("7.5", [], "7.5"),
    ],
)
def test_torch_cuda_arch_list(setup_py, arch_list, targets, skipped):
    got, notes = setup_py.parse_cuda_archs(None, arch_list)
    assert got == targets
    assert "sm_90" not in got  # never a plain sm_90 cubin beside sm_90a
    skip_notes = [n for n in notes if n.startswith("skipping")]
    if skipped:
        assert len(skip_notes) == 1 and skipped in skip_notes[0] and "8.0 or newer" in skip_notes[0]
    else:
        assert not skip_notes


def test_swift_variable_wins_and_default(setup_py):
    assert setup_py.parse_cuda_archs("90a", "5.2 8.0")[0] == ["sm_90a"]
    assert setup_py.parse_cuda_archs(None, None) == (["sm_80", "sm_90a"], [])
    assert setup_py.parse_cuda_archs("", "") == (["sm_80", "sm_90a"], [])
    with pytest.raises(ValueError, match="unrecognised CUDA architecture 'banana'"):
        setup_py.parse_cuda_archs("8.0;banana", None)


def test_gencode_flags(setup_py):
    assert setup_py._gencode("sm_90a") == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert setup_py._gencode("compute_90") == ["-gencode=arch=compute_90,code=compute_90"]
