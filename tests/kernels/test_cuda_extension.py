"""The compiled CUDA extension ``swift_kernels._C`` (frame-block-sparse attention, mma.sync kernels).

On a CPU-only machine: the package imports without the extension, and, when the extension was built
(CI compiles it), it loads, exposes its ops, tile sizes and architectures, and validates arguments before
touching a GPU. On a GPU (tests marked ``gpu``): forward and backward against the fp32 PyTorch reference with
the error rule of docs/testing.md (2x the error of PyTorch's SDPA in the same dtype, plus one ulp of the largest
value), for both dtypes and head dims, blocks that straddle tiles, random masks, query rows with no allowed key,
batch and heads > 1, misaligned inputs, and bad arguments. The Hopper forward (``fwd_sm90``) gets the same
forward checks on a 9.0 device.

Under the sanitizers, on a GPU:
    compute-sanitizer --tool memcheck  python -m pytest tests/kernels/test_cuda_extension.py -m gpu -x -q
    compute-sanitizer --tool racecheck python -m pytest tests/kernels/test_cuda_extension.py -m gpu -x -q -k "200"
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import swift_kernels
from helpers import check_rule, max_err, sdpa_baseline
from swift_kernels._backend import _extension_import_error, extension, extension_available
from swift_kernels.attention import reference, tiles
from swift_kernels.attention.plan import AttentionPlan

needs_ext = pytest.mark.skipif(
    not extension_available(), reason=f"swift_kernels._C was not built ({_extension_import_error()})"
)


# ---------------------------------------------------------------------------------------------------
# CPU side


_WITHOUT_EXTENSION = """
import sys
sys.modules["swift_kernels._C"] = None  # any import of the extension now fails, as on a CPU-only install
import torch
import swift_kernels
from swift_kernels._backend import BackendUnavailableError, extension
assert not swift_kernels.extension_available()
try:
    extension()
except BackendUnavailableError:
    pass
else:
    raise AssertionError("extension() did not raise")
q = torch.randn(1, 8, 1, 64)
mask = torch.ones(2, 2, dtype=torch.bool)
try:
    swift_kernels.frame_block_attention(q, q, q, mask, 4, backend="cuda")
except BackendUnavailableError:
    pass
else:
    raise AssertionError("backend='cuda' did not raise")
out = swift_kernels.frame_block_attention(q, q, q, mask, 4)  # the automatic choice still works
assert out.shape == q.shape
print("ok")
"""


def test_package_imports_without_extension():
    """Importing the package and its CPU paths never need the extension (checked in a fresh process in
    which the extension cannot be imported, whether or not it was built here)."""
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


@needs_ext
def test_extension_exposes_ops_tiles_and_archs():
    """The extension's tile sizes are this package's (tiles.py, through the generated header), and it names the
    architectures it carries, which dispatch reads."""
    import re

    ext = extension()
    for name in ("fwd", "fwd_sm90"):
        assert callable(getattr(ext, name)), name
    if ext.HAS_BACKWARD:
        assert callable(ext.bwd)
    assert tuple(ext.SUPPORTED_HEAD_DIMS) == (64, 128)
    assert dict(ext.TILES) == tiles.CUDA_CONSTANTS
    assert isinstance(ext.HAS_SM90, bool)
    assert ext.CUDA_ARCHS and all(re.fullmatch(r"(sm|compute)_\d+[af]?", a) for a in ext.CUDA_ARCHS), ext.CUDA_ARCHS
    assert ext.HAS_SM90 == ("sm_90a" in ext.CUDA_ARCHS)
    assert "sm_90" not in ext.CUDA_ARCHS, "a plain sm_90 cubin beside sm_90a: the driver could load the wrong one"


@needs_ext
def test_extension_rejects_cpu_tensors():
    """Argument checks (TORCH_CHECKs) run before any CUDA call, so they are testable on a CPU."""
    ext = extension()
    q = torch.randn(1, 256, 2, 64, dtype=torch.float16)
    t = AttentionPlan(torch.ones(2, 2, dtype=torch.bool), 128).tables
    for fwd in (ext.fwd, ext.fwd_sm90):
        with pytest.raises(ValueError, match="q must be a CUDA tensor"):
            fwd(q, q, q, t.mask_table, 128, 0.125, t.kv_num, t.kv_idx, t.full_kv_num, t.full_kv_idx)


@needs_ext
def test_backend_module_contract():
    from swift_kernels.attention import cuda_backend

    assert cuda_backend.SUPPORTED_HEAD_DIMS == (64, 128)
    assert cuda_backend.SUPPORTED_DTYPES == (torch.float16, torch.bfloat16)
    cpu = torch.device("cpu")
    assert cuda_backend.unsupported(64, torch.float16, cpu) is None
    assert cuda_backend.unsupported(96, torch.float16, cpu)[0] is ValueError
    assert cuda_backend.unsupported(64, torch.float32, cpu)[0] is TypeError
    with pytest.raises(ValueError, match="CUDA"):
        q = torch.randn(1, 8, 1, 64, dtype=torch.float16)
        cuda_backend.forward(q, q, q, AttentionPlan(torch.ones(2, 2, dtype=torch.bool), 4).tables, 0.125)


# ---------------------------------------------------------------------------------------------------
# GPU side

def _poison_allocator(nbytes: int) -> None:
    """Fill the CUDA caching allocator's free memory with NaN, so outputs the kernel fails to write show up.

    The extension allocates its outputs with torch.empty; they reuse these freed, NaN-filled blocks.
    """
    junk = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")
    del junk


def _random_mask(n: int, gen: torch.Generator, empty_rows: int = 1) -> torch.Tensor:
    mask = torch.rand(n, n, generator=gen) < 0.55
    mask |= torch.eye(n, dtype=torch.bool)
    mask[:, 0] = True  # the anchor
    for r in torch.randperm(n, generator=gen)[:empty_rows].tolist():
        mask[r] = False  # a query block with no allowed key
    return mask


def _inputs(batch, blocks, block_tokens, heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, blocks * block_tokens, heads, head_dim)
    q, k, v, dout = (torch.randn(shape, generator=gen).to("cuda", dtype) for _ in range(4))
    return q, k, v, dout, gen


CASES = [
    # (batch, blocks, block_tokens, heads) -- 200 straddles every tile size; 3520 is the 2K frame.
    pytest.param(2, 5, 200, 3, id="P200-B2-H3"),
    pytest.param(1, 3, 3520, 2, id="P3520-B1-H2"),
]


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("batch,blocks,block_tokens,heads", CASES)
def test_forward_backward_vs_reference(batch, blocks, block_tokens, heads, dtype, head_dim):
    from swift_kernels.attention import cuda_backend

    q, k, v, dout, gen = _inputs(batch, blocks, block_tokens, heads, head_dim, dtype, seed=blocks * 7 + head_dim)
    mask = _random_mask(blocks, gen)
    scale = head_dim**-0.5
    plan = AttentionPlan(mask, block_tokens, q.device)

    _poison_allocator(8 * q.numel() * 4)
    out, lse = cuda_backend.forward(q, k, v, plan.tables, scale)
    ref_out, ref_lse = reference.forward(q.float(), k.float(), v.float(), mask, block_tokens, scale)
    low = sdpa_baseline(q, k, v, dout, plan, scale)  # PyTorch's own low-precision computation of the same thing
    check_rule("out", out, ref_out, low[0], dtype)

    assert lse.dtype == torch.float32 and lse.shape == (batch, heads, q.shape[1])
    empty = ~mask.any(dim=1)
    row_empty = empty.repeat_interleave(block_tokens).to("cuda")
    assert torch.isneginf(lse[:, :, row_empty]).all()
    assert (out[:, row_empty] == 0).all()
    assert torch.isfinite(lse[:, :, ~row_empty]).all()
    torch.testing.assert_close(lse[:, :, ~row_empty], ref_lse[:, :, ~row_empty], atol=2e-2, rtol=0)

    if not extension().HAS_BACKWARD:
        pytest.skip("built with SWIFT_KERNELS_NO_BACKWARD=1")
    _poison_allocator(8 * q.numel() * 4)
    dq, dk, dv = cuda_backend.backward(dout, q, k, v, out, lse, plan.tables, scale)
    rdq, rdk, rdv = reference.backward(
        dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, mask, block_tokens, scale
    )
    for name, got, r32, rlow in (("dq", dq, rdq, low[1]), ("dk", dk, rdk, low[2]), ("dv", dv, rdv, low[3])):
        assert got.dtype == dtype and got.shape == q.shape
        check_rule(name, got, r32, rlow, dtype)
    assert (dq[:, row_empty] == 0).all()
    unseen = ~mask.any(dim=0)  # key blocks nobody attends
    if unseen.any():
        col = unseen.repeat_interleave(block_tokens).to("cuda")
        assert (dk[:, col] == 0).all() and (dv[:, col] == 0).all()


@pytest.mark.gpu
@needs_ext
def test_public_api_autograd_and_misaligned_inputs():
    """backend='cuda' through the public op (autograd included), with inputs at odd offsets and strides."""
    dtype, head_dim, block_tokens, blocks = torch.float16, 64, 96, 4
    gen = torch.Generator().manual_seed(11)
    mask = _random_mask(blocks, gen, empty_rows=0)
    tokens = blocks * block_tokens
    # Views one element into a larger buffer: only 2-byte aligned, so the extension must copy them; the
    # gradients flow back into the buffer.
    n = 2 * tokens * head_dim
    buf = torch.randn(3 * n + 1, generator=gen).to("cuda", dtype).requires_grad_(True)
    q, k, v = (buf[1 + i * n : 1 + (i + 1) * n].view(1, tokens, 2, head_dim) for i in range(3))
    assert q.data_ptr() % 16 != 0
    out = swift_kernels.frame_block_attention(q, k, v, mask, block_tokens, backend="cuda")
    refs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = reference.dense_attention(*refs, mask, block_tokens)
    assert max_err(out, ref) < 1e-2
    dout = torch.randn(out.shape, generator=gen).to("cuda", dtype)
    out.backward(dout)
    ref.backward(dout.double())
    for i, r in enumerate(refs):
        grad = buf.grad[1 + i * n : 1 + (i + 1) * n].view(r.shape)
        assert max_err(grad, r.grad) < 2e-2


@pytest.mark.gpu
@needs_ext
def test_bad_inputs_raise():
    ext = extension()
    block_tokens, blocks = 128, 2
    q = torch.randn(1, blocks * block_tokens, 2, 64, device="cuda", dtype=torch.float16)
    mask = torch.ones(blocks, blocks, dtype=torch.bool)
    t = AttentionPlan(mask, block_tokens, q.device).tables
    tabs = (t.kv_num, t.kv_idx, t.full_kv_num, t.full_kv_idx)
    args = (t.mask_table, block_tokens, 0.125, *tabs)
    with pytest.raises(TypeError, match="q must be float16 or bfloat16"):
        ext.fwd(q.float(), q.float(), q.float(), *args)
    with pytest.raises(TypeError, match="k must have the dtype"):
        ext.fwd(q, q.bfloat16(), q, *args)
    with pytest.raises(ValueError, match="stride"):
        qt = q.transpose(2, 3).contiguous().transpose(2, 3)
        ext.fwd(qt, q, q, *args)
    with pytest.raises(ValueError, match="shape of q"):
        ext.fwd(q, q[:, :128], q, *args)
    with pytest.raises(ValueError, match="head_dim"):
        q96 = torch.randn(1, blocks * block_tokens, 2, 96, device="cuda", dtype=torch.float16)
        ext.fwd(q96, q96, q96, *args)
    with pytest.raises(ValueError, match="tokens"):
        ext.fwd(q, q, q, torch.ones(3, 3, dtype=torch.int8, device="cuda"), *args[1:])
    with pytest.raises(TypeError, match="mask_i8 must be int8"):
        ext.fwd(q, q, q, mask.cuda(), *args[1:])
    with pytest.raises(ValueError, match="kv_num"):
        ext.fwd(q, q, q, t.mask_table, block_tokens, 0.125, t.kv_num[:-1], *tabs[1:])
    with pytest.raises(ValueError, match="kv_idx"):
        ext.fwd(q, q, q, t.mask_table, block_tokens, 0.125, t.kv_num, t.kv_idx[:, :1], *tabs[2:])
    with pytest.raises(TypeError, match="kv_idx must be int32"):
        ext.fwd(q, q, q, t.mask_table, block_tokens, 0.125, t.kv_num, t.kv_idx.long(), *tabs[2:])
    with pytest.raises(ValueError, match="device"):
        ext.fwd(q, q, q, t.mask_table, block_tokens, 0.125, t.kv_num.cpu(), *tabs[1:])


# ---------------------------------------------------------------------------------------------------
# The Hopper (sm_90a: TMA + wgmma) forward: used where verified, or with SWIFT_KERNELS_HOPPER=1.


def _needs_hopper():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"the sm_90a kernel needs a compute capability 9.0 device, got {torch.cuda.get_device_capability()}")
    if not extension().HAS_SM90:
        pytest.skip("swift_kernels._C was built without sm_90a (SWIFT_KERNELS_CUDA_ARCHS)")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("batch,blocks,block_tokens,heads", CASES)
def test_sm90_forward_vs_reference(batch, blocks, block_tokens, heads, dtype, head_dim, monkeypatch):
    from swift_kernels.attention import cuda_backend

    _needs_hopper()
    monkeypatch.setenv("SWIFT_KERNELS_HOPPER", "1")
    q, k, v, _, gen = _inputs(batch, blocks, block_tokens, heads, head_dim, dtype, seed=blocks * 13 + head_dim)
    assert cuda_backend.forward_variant(q.device) == "cuda-sm90"
    mask = _random_mask(blocks, gen)
    scale = head_dim**-0.5
    plan = AttentionPlan(mask, block_tokens, q.device)

    _poison_allocator(8 * q.numel() * 4)
    out, lse = cuda_backend.forward(q, k, v, plan.tables, scale, hopper=True)
    ref_out, ref_lse = reference.forward(q.float(), k.float(), v.float(), mask, block_tokens, scale)
    low_out = sdpa_baseline(q, k, v, None, plan, scale)[0]
    assert out.dtype == dtype and out.shape == q.shape
    check_rule("out (sm90)", out, ref_out, low_out, dtype)

    assert lse.dtype == torch.float32 and lse.shape == (batch, heads, q.shape[1])
    row_empty = (~mask.any(dim=1)).repeat_interleave(block_tokens).to("cuda")
    assert row_empty.any()
    assert torch.isneginf(lse[:, :, row_empty]).all()
    assert (out[:, row_empty] == 0).all()
    assert torch.isfinite(lse[:, :, ~row_empty]).all()
    torch.testing.assert_close(lse[:, :, ~row_empty], ref_lse[:, :, ~row_empty], atol=2e-2, rtol=0)


@pytest.mark.gpu
@needs_ext
def test_sm90_strided_inputs_and_switch(monkeypatch):
    """q, k, v as strided views of one packed [B, L, 3, H, D] buffer (TMA row stride 3 * H * D), single batch
    and head (size-1 dimensions); SWIFT_KERNELS_HOPPER=0 turns the Hopper forward off, =1 on."""
    from swift_kernels.attention import cuda_backend

    _needs_hopper()
    dtype, head_dim, block_tokens, blocks = torch.bfloat16, 128, 200, 3
    gen = torch.Generator().manual_seed(5)
    mask = _random_mask(blocks, gen, empty_rows=0)
    packed = torch.randn(1, blocks * block_tokens, 3, 1, head_dim, generator=gen).to("cuda", dtype)
    q, k, v = packed.unbind(dim=2)
    assert not q.is_contiguous()
    monkeypatch.setenv("SWIFT_KERNELS_HOPPER", "0")
    assert cuda_backend.forward_variant(q.device) == "cuda"
    monkeypatch.setenv("SWIFT_KERNELS_HOPPER", "1")
    assert cuda_backend.forward_variant(q.device) == "cuda-sm90"
    plan = AttentionPlan(mask, block_tokens, q.device)
    out, lse = cuda_backend.forward(q, k, v, plan.tables, head_dim**-0.5, hopper=True)
    ref_out, ref_lse = reference.forward(q.float(), k.float(), v.float(), mask, block_tokens, head_dim**-0.5)
    low_out = sdpa_baseline(q, k, v, None, plan, head_dim**-0.5)[0]
    check_rule("out (sm90, strided)", out, ref_out, low_out, dtype)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)


@needs_ext
def test_hopper_forward_sass_uses_hopper_instructions():
    """The sm_90a cubin's Hopper forward holds wgmma (HGMMA), TMA loads (UTMALDG) and register reallocation
    (USETMAXREG): the kernel is on Hopper's own path, not a fallback; compiled for any other architecture its
    body is a trap."""
    import os
    import shutil

    import triton

    ext = extension()
    if "sm_90a" not in ext.CUDA_ARCHS:
        pytest.skip("the extension was built without sm_90a")
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        pytest.skip("no cuobjdump to disassemble with")
    sass = subprocess.run([tool, "-sass", "-arch", "sm_90a", ext.__file__], capture_output=True, text=True,
                          timeout=300).stdout
    start = sass.find("fba_fwd_sm90_kernel")
    assert start >= 0, "no Hopper forward in the sm_90a cubin"
    body = sass[start:]
    for instr in ("HGMMA", "UTMALDG", "USETMAXREG"):
        assert instr in body, instr
    if "sm_80" in ext.CUDA_ARCHS:
        # In every other cubin the Hopper forward traps instead of returning unwritten memory.
        sass80 = subprocess.run([tool, "-sass", "-arch", "sm_80", ext.__file__], capture_output=True, text=True,
                                timeout=300).stdout
        stub = sass80[sass80.find("fba_fwd_sm90_kernel"):][:2000]
        assert "BPT.TRAP" in stub, stub[:500]
