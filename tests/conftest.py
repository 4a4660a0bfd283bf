"""Test configuration shared by every test module.

Triton kernels are tested on CPU tensors through Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here, at
collection time, before triton is first imported) when there is no GPU. Kinds of Triton tests:

* ``interpreter`` tests run Triton kernels on CPU tensors (marked so, or parametrized with ``backend="triton"``
  and not marked ``gpu``). They must never meet CUDA: on a machine with a GPU (where the interpreter is off, so
  Triton would compile for the GPU and reject CPU tensors) they are skipped in this process and run by
  ``test_interpreter_tests_in_a_subprocess`` in a child process that sees no GPU.
* ``triton_device`` tests run Triton kernels on the test device: in the interpreter without a GPU, on the GPU
  with the real compiler otherwise.
* ``gpu`` tests need a CUDA GPU and are skipped without one.

Triton releases before 3.7 break in the interpreter with NumPy 2.4 or newer (``only 0-dimensional arrays can be
converted to Python scalars``): there, tests that would run the interpreter are skipped with that reason.

Torch runs on one thread in the test process, whatever ``OMP_NUM_THREADS`` and the machine's core count say: the
numbers a test compares are then the same computation on every machine and in every environment (CPU reductions
and BLAS split their work, hence their rounding, by thread count), they match the spawned ranks and the torchrun
processes (one thread each), and the tiny models run several times faster than with threads fighting over a
shared 2-core machine. Use ``helpers.torch_threads`` for a test that needs more.

Shared helper functions are in helpers.py; docs/testing.md describes the suite, its markers and its rules.
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

torch.set_num_threads(1)  # see the module docstring

try:  # diffusers' log handler binds the stderr of the moment it is made: make it now, on the session's stream,
    # not inside a test whose captured stderr (capsys) is closed when the test ends (a later warning would then
    # print "--- Logging error ---" and a traceback into another test's output)
    from diffusers.utils import logging as _diffusers_logging

    _diffusers_logging.get_logger("diffusers")
except ImportError:  # pragma: no cover
    pass


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def interpreter_broken_reason() -> str | None:
    """Why Triton's CPU interpreter cannot run here (None when it can)."""
    try:
        import numpy
        import triton
    except ImportError as exc:  # pragma: no cover - depends on the install
        return f"Triton's interpreter needs triton and numpy ({exc})"
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s CPU interpreter breaks with NumPy {numpy.__version__} (>= 2.4): "
                "its interpreter tests need Triton >= 3.7 or NumPy < 2.4")
    return None


def is_interpreter_test(item) -> bool:
    if "interpreter" in item.keywords:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("backend") == "triton" and "gpu" not in item.keywords


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SWIFT_TESTS_INTERPRETER_ONLY") == "1":
        # the child process of test_interpreter_tests_in_a_subprocess: only the tests that need the interpreter
        keep = [i for i in items if is_interpreter_test(i) or "triton_device" in i.keywords]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
    broken = interpreter_broken_reason()
    for item in items:
        interp = is_interpreter_test(item)
        if _HAS_GPU and interp:
            item.add_marker(pytest.mark.skip(
                reason="runs Triton's CPU interpreter on CPU tensors: on a GPU machine it runs in a child process "
                       "without the GPU (test_interpreter_tests_in_a_subprocess)"))
        elif broken and (interp or ("triton_device" in item.keywords and not _HAS_GPU)):
            item.add_marker(pytest.mark.skip(reason=broken))
        elif not _HAS_GPU and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def gpu_device():
    """The CUDA device; tests using it are skipped where there is none."""
    if not _HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): what the
    whole session already runs on (see the module docstring); the fixture says that a module's exact comparisons
    or timings rely on it, and keeps it so should a test of another module have changed the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae16():
    """The tiny 16-channel (Wan2.1-style) VAE, seed 0."""
    from swift_model.nets.vae import WanVAE

    return WanVAE.tiny(16, seed=0)


@pytest.fixture(scope="module")
def vae48():
    """The tiny 48-channel (Wan2.2-style) VAE, seed 1."""
    from swift_model.nets.vae import WanVAE

    return WanVAE.tiny(48, seed=1)


@pytest.fixture(scope="module")
def tiny_pipe():
    """The tiny random-weight two-stage pipeline of the demo (seed 0, CPU), one per module."""
    from swift_model.generation.pipeline import SwiftI2VPipeline

    return SwiftI2VPipeline.tiny(seed=0, device="cpu")


@pytest.fixture(scope="module")
def spawned(request, tmp_path_factory):
    """``spawned(world_size)``: the verdicts of the ranks that ran this module's ``CASES`` (tests/spawn.py), spawned
    once per world size on first use. ``spawn.check(run, case)`` fails a test with one case's failures."""
    from spawn import launch

    runs = {}

    def get(world_size: int) -> dict:
        if world_size not in runs:
            runs[world_size] = launch(request.module.__name__, world_size,
                                      str(tmp_path_factory.mktemp(f"world{world_size}")))
        return runs[world_size]

    return get
