"""Triton frame-block-sparse attention (forward and backward) against a dense masked softmax in fp64.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by conftest.py
before triton is imported); shapes are kept small there. ``triton_device`` tests run on the GPU when there is
one; ``interpreter`` tests (fp32) only in the interpreter (see conftest.py). GPU tests (marked ``gpu``) check
bf16/fp16 at the real Stage II sizes (3,520 tokens per block, 24 heads of 128).

Tolerance rule (docs/testing.md, tests/helpers.py): a low-precision result passes when its max error against
the fp64 (fp32 at real sizes) truth is at most twice the error of the same computation done by PyTorch in that
precision, plus one ulp of the largest value; fp32 (exact fp32 products in the kernels) is held to a tight
absolute bound.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from helpers import bound, max_err, sdpa_baseline  # noqa: E402
from swift_kernels._backend import triton_interpreting  # noqa: E402
from swift_kernels.attention import triton_backend as tb  # noqa: E402
from swift_kernels.attention.plan import AttentionPlan  # noqa: E402

HAS_GPU = torch.cuda.is_available()
# Interpreter tests run on CPU tensors; on a GPU machine the same tests run on the GPU.
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")

if not HAS_GPU and not triton_interpreting():  # pragma: no cover - conftest sets the variable
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)


# ----------------------------------------------------------------------------------------------------
# Dense truth and the low-precision PyTorch baseline


def token_mask(block_mask: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """bool [L, L]: query i may attend key j iff block_mask[i // P, j // P]."""
    blocks = torch.arange(block_mask.shape[0] * block_tokens, device=block_mask.device) // block_tokens
    return block_mask[blocks[:, None], blocks[None, :]]


def dense_attention(q, k, v, block_mask, block_tokens, scale, dtype):
    """Dense masked softmax attention computed with every tensor in ``dtype``; returns (out, lse).

    Rows with no allowed key give out = 0 and lse = -inf. Differentiable (autograd gives the gradients).
    """
    q, k, v = (t.to(dtype) for t in (q, k, v))
    allowed = token_mask(block_mask.to(q.device), block_tokens)
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - (-inf)) is NaN on empty rows: replace the shift there so those rows give exactly 0.
    probs = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.einsum("bhlm,bmhd->blhd", probs, v)
    return out, lse


def dense_grads(q, k, v, dout, block_mask, block_tokens, scale, dtype):
    """(out, lse, dq, dk, dv) of the dense computation in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out, lse = dense_attention(*leaves, block_mask, block_tokens, scale, dtype)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return (out.detach(), lse.detach(), *grads)


FP32_ATOL = 2e-5


# ----------------------------------------------------------------------------------------------------
# Helpers


def random_qkv(batch, blocks, block_tokens, heads, head_dim, dtype, layout="contiguous"):
    """Fresh random q, k, v [B, L, H, D] (never zeros), in one of several memory layouts."""
    L = blocks * block_tokens
    shape = (batch, L, heads, head_dim)
    if layout == "contiguous":
        return tuple(torch.randn(shape, device=DEVICE).to(dtype) for _ in range(3))
    if layout == "packed":  # Wan's fused qkv projection: [B, L, 3, H, D] viewed per tensor
        qkv = torch.randn(batch, L, 3, heads, head_dim, device=DEVICE).to(dtype)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if layout == "bhld":  # [B, H, L, D] transposed to [B, L, H, D]
        return tuple(torch.randn(batch, heads, L, head_dim, device=DEVICE).to(dtype).transpose(1, 2) for _ in range(3))
    raise ValueError(layout)


def random_mask(blocks, generator, p=0.5, empty_row=True, empty_col=False):
    mask = torch.rand(blocks, blocks, generator=generator) < p
    mask[0, 0] = True  # at least one allowed pair
    if empty_row and blocks > 1:
        mask[blocks - 2] = False  # a query block that sees nothing
    if empty_col and blocks > 2:
        mask[:, 1] = False  # a key block nobody sees
    return mask


def tables(mask: torch.Tensor, block_tokens: int):
    """The kernel tables of a block table on the test device (what the public API passes the backend)."""
    return AttentionPlan(mask, block_tokens, DEVICE).tables


@pytest.fixture(autouse=True)
def poison_allocations(monkeypatch):
    """Fill every fresh torch.empty / empty_like float buffer with NaN, so an element the kernels
    forget to write shows up as NaN instead of passing by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: _poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: _poison(real_empty_like(*a, **kw)))


def check_against_dense(q, k, v, mask, block_tokens, config=None, scale=None):
    """Run the Triton forward and backward and compare every element with the fp64 dense truth."""
    dtype = q.dtype
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    dout = torch.randn(q.shape, device=q.device).to(dtype)

    out, lse = tb.forward(q, k, v, tables(mask, block_tokens), scale, config=config)
    dq, dk, dv = tb.backward(dout, q, k, v, out, lse, tables(mask, block_tokens), scale, config=config)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert t.dtype == dtype and t.shape == q.shape, name
        assert not torch.isnan(t).any(), f"{name} has NaN (unwritten or bad masking)"
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])

    truth = dense_grads(q, k, v, dout, mask, block_tokens, scale, torch.float64)
    t_out, t_lse, t_dq, t_dk, t_dv = truth

    # lse: -inf exactly on empty rows, close elsewhere.
    empty_rows = torch.isinf(t_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty_rows)
    finite = ~empty_rows
    lse_tol = FP32_ATOL if dtype == torch.float32 else 1e-2
    if finite.any():
        assert max_err(lse[finite], t_lse[finite]) <= lse_tol

    # Empty rows: exactly zero output and zero dq.
    rows = empty_rows[0, 0]  # the mask is per block, so the same rows are empty for every (b, h)
    assert torch.all(out[:, rows] == 0)
    assert torch.all(dq[:, rows] == 0)

    results = {"out": (out, t_out), "dq": (dq, t_dq), "dk": (dk, t_dk), "dv": (dv, t_dv)}
    if dtype == torch.float32:
        for name, (got, want) in results.items():
            assert max_err(got, want) <= FP32_ATOL * max(1.0, want.abs().max().item()), name
    else:
        lowp = dense_grads(q, k, v, dout, mask, block_tokens, scale, dtype)
        for (name, (got, want)), base in zip(results.items(), (lowp[0], *lowp[2:])):
            err, tol = max_err(got, want), bound(want, base, dtype)
            assert err <= tol, f"{name}: error {err:.3g} > bound {tol:.3g}"
    return out, lse, dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# Interpreter / GPU correctness at small sizes

SMALL_CASES = [
    # (batch, blocks, block_tokens, heads, head_dim, config)
    pytest.param(2, 5, 40, 2, 64, None, id="P40-tile64"),  # blocks straddle tiles; L=200 not a tile multiple
    pytest.param(1, 4, 72, 2, 64, None, id="P72-tile64"),
    pytest.param(
        2, 3, 100, 2, 64,
        tb.AttnConfig(fwd_m=128, fwd_n=64, dkdv_m=64, dkdv_n=128, dq_m=128, dq_n=64),
        id="P100-tile128x64",  # mixed tile shapes: a different schedule per pass
    ),
    pytest.param(1, 4, 40, 2, 128, None, id="P40-D128"),
    pytest.param(  # the GPU default tile shapes; blocks longer than every tile: the two-block mask path
        1, 3, 136, 2, 32, tb.AttnConfig(), id="P136-gpu-tiles",
    ),
]


# fp32 runs in the interpreter only (on a GPU the Triton backend refuses fp32 attention, which would spill).
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.interpreter),
                                   pytest.param(torch.float16, marks=pytest.mark.triton_device)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch,blocks,block_tokens,heads,head_dim,config", SMALL_CASES)
def test_forward_backward_random_mask(dtype, batch, blocks, block_tokens, heads, head_dim, config):
    gen = torch.Generator().manual_seed(1000 * blocks + block_tokens + head_dim)
    mask = random_mask(blocks, gen, empty_row=True, empty_col=True)
    q, k, v = random_qkv(batch, blocks, block_tokens, heads, head_dim, dtype)
    _, _, _, dk, dv = check_against_dense(q, k, v, mask, block_tokens, config=config)
    # Key block 1 is seen by nobody: its dk and dv are exactly zero.
    cols = slice(block_tokens, 2 * block_tokens)
    assert torch.all(dk[:, cols] == 0) and torch.all(dv[:, cols] == 0)


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["packed", "bhld"])
def test_strided_inputs(layout):
    """Non-contiguous [B, L, H, D] views (fused qkv, transposed [B, H, L, D]) are read through strides."""
    gen = torch.Generator().manual_seed(7)
    mask = random_mask(3, gen, p=0.7, empty_row=False)
    q, k, v = random_qkv(2, 3, 48, 2, 32, torch.float32, layout=layout)
    assert not q.is_contiguous()
    check_against_dense(q, k, v, mask, 48, scale=0.3)


@pytest.mark.triton_device
def test_dense_mask_full_tiles_only():
    """All-True mask with block_tokens a tile multiple: every tile pair takes the unmasked path."""
    mask = torch.ones(3, 3, dtype=torch.bool)
    q, k, v = random_qkv(1, 3, 64, 2, 64, torch.float16)
    check_against_dense(q, k, v, mask, 64)


@pytest.mark.interpreter
def test_all_false_mask():
    """No allowed pair at all: zero output, lse = -inf everywhere, zero gradients."""
    mask = torch.zeros(3, 3, dtype=torch.bool)
    q, k, v = random_qkv(1, 3, 40, 2, 16, torch.float32)
    out, lse = tb.forward(q, k, v, tables(mask, 40), 0.25)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    dq, dk, dv = tb.backward(torch.randn_like(q), q, k, v, out, lse, tables(mask, 40), 0.25)
    assert all(torch.all(g == 0) for g in (dq, dk, dv))


@pytest.mark.interpreter
def test_large_scores_no_overflow():
    """Scores of several hundred (scale 1 on large inputs) must not overflow exp: online softmax."""
    gen = torch.Generator().manual_seed(3)
    mask = random_mask(3, gen, p=0.8, empty_row=False)
    q, k, v = (t * 4 for t in random_qkv(1, 3, 40, 1, 32, torch.float32))
    out, lse = tb.forward(q, k, v, tables(mask, 40), 1.0)
    want_out, want_lse = dense_attention(q, k, v, mask, 40, 1.0, torch.float64)
    assert torch.isfinite(out).all()
    assert max_err(out, want_out) <= 1e-4 * want_out.abs().max().item()
    assert max_err(lse, want_lse) <= 1e-4 * want_lse.abs().max().item()


@pytest.mark.interpreter
def test_end_to_end_through_api():
    """frame_block_attention(..., backend="triton") matches backend="torch", forward and gradients."""
    from swift_kernels.attention import frame_block_attention

    gen = torch.Generator().manual_seed(11)
    mask = random_mask(4, gen)
    q, k, v = random_qkv(1, 4, 40, 2, 64, torch.float32)
    dout = torch.randn(q.shape, device=q.device)
    results = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = frame_block_attention(*leaves, mask, 40, backend=backend)
        out.backward(dout)
        results[backend] = (out.detach(), *(t.grad for t in leaves))
    for got, want in zip(results["triton"], results["torch"]):
        assert max_err(got, want) <= FP32_ATOL * max(1.0, want.abs().max().item())


# ----------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.triton_device
def test_bad_inputs():
    """Inputs are validated once, at the public entry; the Triton backend's own limits are named there."""
    from swift_kernels.attention import frame_block_attention

    mask = torch.ones(2, 2, dtype=torch.bool)
    q, k, v = random_qkv(1, 2, 16, 1, 32, torch.float32)

    def fba(*args):
        return frame_block_attention(*args, backend="triton")

    with pytest.raises(ValueError, match="head_dim"):
        x = torch.randn(1, 32, 1, 48, device=DEVICE)
        fba(x, x, x, mask, 16)
    with pytest.raises(TypeError, match="dtype"):
        fba(q.double(), k.double(), v.double(), mask, 16)
    with pytest.raises(TypeError, match="k"):
        fba(q, k.half(), v, mask, 16)
    with pytest.raises(ValueError, match="v"):
        fba(q, k, v[:, :16], mask, 16)
    with pytest.raises(ValueError, match="block_mask"):
        fba(q, k, v, torch.ones(3, 3, dtype=torch.bool), 16)
    with pytest.raises(TypeError, match="block_mask"):
        fba(q, k, v, mask.int(), 16)
    for bad in (96, 256, 8):
        with pytest.raises(ValueError, match="config"):
            tb.AttnConfig(fwd_m=bad)


# ----------------------------------------------------------------------------------------------------
# GPU: real Stage II sizes


def _reference():
    from swift_kernels.attention import reference

    return reference


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("blocks,mask_kind", [(4, "window"), (5, "clip")])
def test_gpu_real_sizes(dtype, blocks, mask_kind):
    """Stage II sizes: 3,520 tokens per block, 24 heads of 128, vs the fp32 reference; the bound is
    2x SDPA's error in the same dtype plus a floor."""
    block_tokens, heads, head_dim = 3520, 24, 128
    ref = _reference()
    if mask_kind == "window":
        mask = torch.ones(blocks, blocks, dtype=torch.bool)
    else:  # anchor + segments of 2 with one left neighbour: every row has an allowed key (SDPA baseline)
        mask = torch.zeros(blocks, blocks, dtype=torch.bool)
        mask[:, 0] = True
        mask[0, :] = True
        for i in range(1, blocks):
            seg = (i - 1) // 2
            lo, hi = max(1, 1 + 2 * seg - 1), min(blocks, 1 + 2 * seg + 2)
            mask[i, lo:hi] = True
    q, k, v = random_qkv(1, blocks, block_tokens, heads, head_dim, dtype)
    dout = torch.randn(q.shape, device=DEVICE).to(dtype)
    scale = head_dim**-0.5
    out, lse = tb.forward(q, k, v, tables(mask, block_tokens), scale)
    dq, dk, dv = tb.backward(dout, q, k, v, out, lse, tables(mask, block_tokens), scale)

    f32 = [t.float() for t in (q, k, v)]
    t_out, t_lse = ref.forward(*f32, mask, block_tokens, scale)
    t_grads = ref.backward(dout.float(), *f32, t_out, t_lse, mask, block_tokens, scale)
    base = sdpa_baseline(q, k, v, dout, AttentionPlan(mask, block_tokens, DEVICE), scale)
    assert max_err(lse, t_lse) <= 1e-2
    for name, got, want, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (t_out, *t_grads), base):
        assert not torch.isnan(got).any(), name
        err, tol = max_err(got, want), bound(want, b, dtype)
        assert err <= tol, f"{name}: error {err:.3g} > bound {tol:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_head_dim_64_empty_rows(dtype):
    """head_dim 64 with the GPU tile configuration, rows with no key, P = 3,520 (not a tile multiple)."""
    gen = torch.Generator().manual_seed(5)
    mask = random_mask(3, gen, empty_row=True, empty_col=True)
    q, k, v = random_qkv(2, 3, 3520, 4, 64, dtype)
    check_against_dense(q, k, v, mask, 3520)


@pytest.mark.interpreter
def test_very_negative_scores_after_masked_tile():
    """A row whose first visited key tile is wholly masked and whose allowed scores are all far below 0
    (about -290): the running max must stay -inf across the masked tile (not a finite stand-in, or
    exp(s - 0) underflows to 0 and the row would come out empty)."""
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 2] = True  # block 0 sees only block 2; key tile 0 (blocks 0-1) is visited for block 1's sake
    mask[1, 0] = True
    mask[2, 2] = True
    gen = torch.Generator(device=DEVICE.type).manual_seed(2)
    shape = (1, 120, 2, 32)
    q = 3 + 0.1 * torch.randn(shape, device=DEVICE, generator=gen)
    k = -(3 + 0.1 * torch.randn(shape, device=DEVICE, generator=gen))
    v = torch.randn(shape, device=DEVICE, generator=gen)
    out, lse = tb.forward(q, k, v, tables(mask, 40), 1.0)
    want_out, want_lse = dense_attention(q, k, v, mask, 40, 1.0, torch.float64)
    assert want_lse.max() < -250
    assert max_err(lse, want_lse) <= 1e-4 * want_lse.abs().max().item()
    assert max_err(out, want_out) <= 1e-4


# ----------------------------------------------------------------------------------------------
# The interpreter accepts code that the GPU compiler rejects. Without a GPU, compile every production
# attention kernel config ahead of time for Hopper (sm_90), in a subprocess with the interpreter off, so such
# code fails here rather than on the first GPU run; tests/aot_sm90.py also reports each config's registers,
# stack frame (spills) and shared memory and fails past its documented limits.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_attention_kernels_compile_for_sm90(tmp_path):
    from helpers import run_aot

    run_aot("attention", tmp_path)
