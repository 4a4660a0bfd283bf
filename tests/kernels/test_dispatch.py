"""Backend choice with the GPU and the verified table mocked: safe by default, ours only where verified.

The rules (swift_kernels/_backend.py): dense attention -> SDPA; block-sparse attention -> our kernel where it is
verified for this compute capability and torch minor version (or SWIFT_KERNELS_UNVERIFIED=1), else
FlexAttention; fused ops -> Triton where verified, else the reference; an explicit backend always runs what it
names; the CUDA extension is never chosen on an architecture it was not compiled for.
"""

from __future__ import annotations

import types

import pytest
import torch

from swift_kernels import _backend, verified
from swift_kernels._backend import ATTENTION, FLOW_STEP, BackendUnavailableError, arch_serves, choose_backend
from swift_kernels.attention import api, cuda_backend, tiles

CUDA = torch.device("cuda", 0)
MINOR = verified.torch_minor(torch.__version__)


def _row(op, backend, cc="9.0", minor=MINOR):
    return verified.VerifiedRow(op, backend, cc, minor, "2026-01-01", "benchmarks/results/x.json")


@pytest.fixture
def gpu(monkeypatch):
    """A compute capability 9.0 GPU with an extension built for sm_80 and sm_90a, an empty verified table, and no
    environment overrides; returns a setter for the table rows and the capability."""
    fake_ext = types.SimpleNamespace(CUDA_ARCHS=("sm_80", "sm_90a"), TILES=dict(tiles.CUDA_CONSTANTS), HAS_SM90=True)
    state = {"cap": (9, 0), "rows": ()}
    monkeypatch.setattr(_backend, "gpu_present", lambda: True)
    monkeypatch.setattr(_backend, "device_capability", lambda device: state["cap"] if device.type == "cuda" else None)
    monkeypatch.setattr(_backend, "_extension_import_error", lambda: None)
    monkeypatch.setattr(_backend, "_triton_import_error", lambda: None)
    monkeypatch.setattr(_backend, "extension", lambda: fake_ext)
    monkeypatch.setattr(cuda_backend, "extension", lambda: fake_ext)
    monkeypatch.setattr(cuda_backend, "device_capability", lambda device: state["cap"])
    monkeypatch.setattr(verified, "_package_rows", lambda: state["rows"])
    for var in (_backend.ENV_VAR, _backend.UNVERIFIED_ENV, cuda_backend.HOPPER_ENV, "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)

    def set_(rows=(), cap=(9, 0)):
        state["rows"], state["cap"] = tuple(rows), cap

    return set_


def choose(dense=False, backend=None, dtype=torch.bfloat16, head_dim=128):
    return api._choose_backend(backend, CUDA, head_dim, dtype, False, dense)


def test_dense_goes_to_sdpa(gpu):
    gpu([_row("frame_block_attention", "cuda"), _row("frame_block_attention", "triton")])
    assert choose(dense=True) == "sdpa"  # even where our kernels are verified


def test_sparse_with_nothing_verified_goes_to_flex(gpu):
    gpu()
    assert choose() == "flex"
    assert choose(dtype=torch.float32) == "flex"  # fp32 never meets our Triton attention on a GPU


def test_verified_kernel_is_chosen(gpu):
    gpu([_row("frame_block_attention", "triton")])
    assert choose() == "triton"
    gpu([_row("frame_block_attention", "cuda"), _row("frame_block_attention", "triton")])
    assert choose() == "cuda"
    assert choose(head_dim=32) == "triton"  # the extension has no head_dim 32: the next verified kernel
    assert choose(head_dim=96) == "flex"  # neither of ours takes 96


def test_verified_elsewhere_is_not_verified_here(gpu):
    gpu([_row("frame_block_attention", "cuda", cc="8.0"), _row("frame_block_attention", "triton", minor="1.0")])
    assert choose() == "flex"


def test_hopper_forward_needs_its_own_row(gpu, monkeypatch):
    gpu([_row("frame_block_attention", "cuda")])
    assert choose() == "cuda"
    gpu([_row("frame_block_attention", "cuda"), _row("frame_block_attention", "cuda-sm90")])
    assert choose() == "cuda-sm90"
    monkeypatch.setenv(cuda_backend.HOPPER_ENV, "0")
    assert choose() == "cuda"
    monkeypatch.setenv(cuda_backend.HOPPER_ENV, "1")
    gpu([_row("frame_block_attention", "cuda")])
    assert choose() == "cuda-sm90"


def test_unverified_allowed_by_environment(gpu, monkeypatch):
    gpu()
    monkeypatch.setenv(_backend.UNVERIFIED_ENV, "1")
    assert choose() == "cuda-sm90"  # every kernel allowed, the Hopper forward included
    monkeypatch.setenv(cuda_backend.HOPPER_ENV, "0")
    assert choose() == "cuda"
    assert choose(dense=True) == "sdpa"


def test_explicit_backend_is_honoured(gpu, monkeypatch):
    gpu()
    for name in ("triton", "torch", "flex", "sdpa"):
        assert choose(backend=name) == name
    assert choose(backend="cuda") == "cuda"
    assert choose(dense=True, backend="torch") == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    assert choose(dense=True) == "triton"
    with pytest.raises(TypeError, match="dtype"):
        choose(dtype=torch.float32)  # explicit Triton on a GPU refuses fp32 (it would spill kilobytes)


def test_unsupported_architecture_never_chosen(gpu):
    gpu([_row("frame_block_attention", "cuda", cc="10.0"), _row("frame_block_attention", "triton", cc="10.0")],
        cap=(10, 0))
    assert choose() == "triton"  # the extension carries sm_80 and sm_90a: no kernel image for 10.0
    gpu([_row("frame_block_attention", "cuda", cc="10.0")], cap=(10, 0))
    assert choose() == "flex"
    with pytest.raises(BackendUnavailableError, match="compiled for sm_80, sm_90a.*10.0"):
        choose(backend="cuda")
    gpu([_row("frame_block_attention", "cuda", cc="8.6")], cap=(8, 6))
    assert choose() == "cuda"  # the sm_80 cubin runs on 8.6


def test_extension_with_other_tiles_is_unavailable(gpu, monkeypatch):
    gpu([_row("frame_block_attention", "cuda")])
    monkeypatch.setattr(_backend, "extension", lambda: types.SimpleNamespace(CUDA_ARCHS=("sm_90a",), TILES={}))
    assert choose() == "flex"
    with pytest.raises(BackendUnavailableError, match="rebuild"):
        choose(backend="cuda")


def test_fused_ops(gpu):
    gpu()
    assert choose_backend(FLOW_STEP, None, CUDA) == "torch"
    gpu([_row("flow_step", "triton")])
    assert choose_backend(FLOW_STEP, None, CUDA) == "triton"
    gpu([_row("adaln_modulate", "triton")])
    assert choose_backend(FLOW_STEP, None, CUDA) == "torch"  # verification is per op
    with pytest.raises(BackendUnavailableError, match="no 'cuda' implementation"):
        choose_backend(FLOW_STEP, "cuda", CUDA)


def test_cpu_and_fake_cuda_without_a_driver(monkeypatch):
    """On a CPU: dense -> SDPA, sparse -> the reference. CUDA tensors without a CUDA driver (fake tensors of a
    planner): our op (its fake implementation), dense or not."""
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend, "gpu_present", lambda: False)
    cpu = torch.device("cpu")
    assert api._choose_backend(None, cpu, 64, torch.float32, False, True) == "sdpa"
    assert api._choose_backend(None, cpu, 64, torch.float32, False, False) == "torch"
    assert api._choose_backend(None, CUDA, 128, torch.bfloat16, False, True) == "torch"
    assert api._choose_backend(None, CUDA, 128, torch.bfloat16, False, False) == "torch"
    assert choose_backend(ATTENTION, None, CUDA) == "torch"


@pytest.mark.parametrize(
    "arch,cap,serves",
    [
        ("sm_80", (8, 0), True), ("sm_80", (8, 6), True), ("sm_80", (8, 9), True), ("sm_80", (9, 0), False),
        ("sm_86", (8, 0), False), ("sm_90a", (9, 0), True), ("sm_90a", (10, 0), False), ("sm_90", (9, 0), True),
        ("compute_90", (10, 0), True), ("compute_90", (8, 9), False), ("compute_90a", (10, 0), False),
        ("sm_100f", (10, 3), True), ("sm_120", (12, 0), True), ("bogus", (9, 0), False),
    ],
)
def test_arch_serves(arch, cap, serves):
    """SASS runs on the same major with an equal or higher minor; sm_90a only on 9.0; PTX on anything newer."""
    assert arch_serves(arch, cap) is serves


def test_constant_under_compile_marks_as_torch_does():
    """constant_under_compile sets what torch.compiler.assume_constant_result sets (and nothing else), so dynamo
    treats the backend choice and the plan lookup as constants (the fullgraph compile tests rely on it)."""
    from swift_kernels._backend import constant_under_compile

    def a():
        return 1

    def b():
        return 1

    marked = torch.compiler.assume_constant_result(a)
    assert marked is a and constant_under_compile(b) is b
    assert {k: v for k, v in vars(a).items()} == {k: v for k, v in vars(b).items()} == {"_dynamo_marked_constant": True}
