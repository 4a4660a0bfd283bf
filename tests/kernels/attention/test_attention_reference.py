"""The PyTorch reference and the public attention API on the CPU: values, gradients, errors, dispatch."""

import pytest
import torch

import swift_kernels
from swift_kernels import BackendUnavailableError, CSGLayout, csg_attention, frame_block_attention
from swift_kernels.attention import reference
from swift_kernels.attention.reference import dense_attention


def _inputs(batch, blocks, block_tokens, heads, head_dim, dtype=torch.float64, seed=None, requires_grad=False):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    shape = (batch, blocks * block_tokens, heads, head_dim)
    return [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def _random_mask(blocks, p=0.5, empty_row=True):
    mask = torch.rand(blocks, blocks) < p
    if empty_row and blocks > 1:
        mask[torch.randint(blocks, ()).item()] = False  # a query block that sees nothing
    return mask


@pytest.mark.parametrize("block_tokens,chunk", [(5, 1024), (12, 7), (33, 16)])
def test_reference_forward_matches_dense(block_tokens, chunk, monkeypatch):
    # A small QUERY_CHUNK exercises queries split inside a block and chunks that straddle nothing.
    monkeypatch.setattr(reference, "QUERY_CHUNK", chunk)
    blocks = 6
    q, k, v = _inputs(2, blocks, block_tokens, 3, 8)
    mask = _random_mask(blocks)
    scale = 0.37
    out, lse = reference.forward(q, k, v, mask, block_tokens, scale)
    expect = dense_attention(q, k, v, mask, block_tokens, scale)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    # lse against a literal log-sum-exp over the allowed keys.
    tok = torch.arange(blocks * block_tokens) // block_tokens
    allowed = mask[tok[:, None], tok[None, :]]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    expect_lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1).float()
    torch.testing.assert_close(lse, expect_lse, rtol=1e-6, atol=1e-6)
    empty = ~mask.any(dim=1)
    rows = empty[tok]
    assert torch.all(out[:, rows] == 0)
    assert torch.all(torch.isneginf(lse[:, :, rows]))


@pytest.mark.parametrize("block_tokens,chunk", [(4, 1024), (10, 3)])
def test_reference_gradients_match_dense_autograd(block_tokens, chunk, monkeypatch):
    monkeypatch.setattr(reference, "QUERY_CHUNK", chunk)
    blocks = 5
    q, k, v = _inputs(2, blocks, block_tokens, 2, 8, requires_grad=True)
    mask = _random_mask(blocks)
    dout = torch.randn_like(q)
    out = frame_block_attention(q, k, v, mask, block_tokens, backend="torch")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expect_out = dense_attention(q, k, v, mask, block_tokens)
    expect = torch.autograd.grad(expect_out, (q, k, v), dout)
    torch.testing.assert_close(out, expect_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expect):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gradcheck_small():
    q, k, v = _inputs(1, 3, 3, 2, 4, requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    fn = lambda q, k, v: frame_block_attention(q, k, v, mask, 3, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_keep_dtype_and_are_close(dtype):
    q, k, v = _inputs(1, 4, 16, 2, 16, dtype=dtype)
    mask = _random_mask(4, empty_row=False)
    out = frame_block_attention(q, k, v, mask, 16, backend="torch")
    assert out.dtype == dtype and out.shape == q.shape
    expect = dense_attention(q.double(), k.double(), v.double(), mask, 16)
    # The reference computes in fp32 and rounds once at the end: error is one rounding of the output.
    eps = torch.finfo(dtype).eps
    assert (out.double() - expect).abs().max().item() <= 2 * eps * expect.abs().max().item() + 1e-6


def test_csg_attention_equals_frame_block_attention():
    layout = CSGLayout(7, 6, 2, neighbors=(1, 1), mode="clip")
    q, k, v = _inputs(1, layout.num_tokens // 6, 6, 2, 8)
    got = csg_attention(q, k, v, layout, backend="torch")
    want = frame_block_attention(q, k, v, layout.block_mask, layout.block_tokens, backend="torch")
    assert torch.equal(got, want)
    torch.testing.assert_close(got, dense_attention(q, k, v, layout.block_mask, 6), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_plan", [False, True], ids=["layout", "plan"])
def test_compile_fullgraph_traces_the_custom_op(with_plan):
    from swift_kernels import plan_attention

    layout = CSGLayout(5, 4, 2, neighbors=(1, 0), mode="clip")
    q, k, v = _inputs(1, 5, 4, 2, 8, dtype=torch.float32, requires_grad=True)
    arg = plan_attention(layout) if with_plan else layout

    def f(q, k, v):
        return csg_attention(q * 2, k, v, arg, backend="torch").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    got.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = f(q, k, v)
    want.backward()
    torch.testing.assert_close(got, want)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad)


# ----------------------------------------------------------------------------------------------- errors
def _ok():
    q, k, v = _inputs(1, 2, 4, 2, 8, dtype=torch.float32)
    return q, k, v, torch.ones(2, 2, dtype=torch.bool), 4


@pytest.mark.parametrize(
    "mutate,exc,word",
    [
        (lambda a: a.__setitem__(0, a[0].numpy()), TypeError, "q"),
        (lambda a: a.__setitem__(1, a[1][:, :4]), ValueError, "k"),
        (lambda a: a.__setitem__(2, a[2].half()), TypeError, "v"),
        (lambda a: a.__setitem__(0, a[0][0]), ValueError, "q"),
        (lambda a: a.__setitem__(0, a[0].long()), TypeError, "q"),
        (lambda a: a.__setitem__(3, a[3].int()), TypeError, "block_mask"),
        (lambda a: a.__setitem__(3, torch.ones(3, 3, dtype=torch.bool)), ValueError, "block_mask"),
        (lambda a: a.__setitem__(3, [[True]]), TypeError, "block_mask"),
        (lambda a: a.__setitem__(4, 3), ValueError, "block_tokens"),
        (lambda a: a.__setitem__(4, 0), ValueError, "block_tokens"),
        (lambda a: a.__setitem__(4, 4.0), TypeError, "block_tokens"),
        # head_dim 0: a named ValueError, not a ZeroDivisionError from the default scale
        (lambda a: a.__setitem__(slice(0, 3), [t[..., :0] for t in a[:3]]), ValueError, "head_dim"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(mutate, exc, word):
    args = list(_ok())
    mutate(args)
    with pytest.raises(exc, match=word):
        frame_block_attention(*args, backend="torch")


@pytest.mark.parametrize("scale,exc", [(-1.0, ValueError), (float("nan"), ValueError), ("x", TypeError)])
def test_bad_softmax_scale(scale, exc):
    with pytest.raises(exc, match="softmax_scale"):
        frame_block_attention(*_ok(), softmax_scale=scale)


def test_numpy_int_block_tokens_is_an_int():
    import numpy as np

    q, k, v, mask, bt = _ok()
    want = frame_block_attention(q, k, v, mask, bt, backend="torch")
    assert torch.equal(frame_block_attention(q, k, v, mask, np.int64(bt), backend="torch"), want)


def test_csg_attention_checks_layout_and_tokens():
    q, k, v, _, _ = _ok()
    with pytest.raises(TypeError, match="layout"):
        csg_attention(q, k, v, "not a layout")
    layout = CSGLayout(3, 4, 1, mode="clip")
    with pytest.raises(ValueError, match="tokens"):
        csg_attention(q, k, v, layout)


def test_backend_selection(monkeypatch):
    args = _ok()
    with pytest.raises(BackendUnavailableError, match="cuda"):
        frame_block_attention(*args, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        frame_block_attention(*args, backend="bogus")
    monkeypatch.setenv("SWIFT_KERNELS_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError):
        frame_block_attention(*args)
    monkeypatch.setenv("SWIFT_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SWIFT_KERNELS_BACKEND"):
        frame_block_attention(*args)
    # A dtype the asked-for backend lacks is a TypeError (as in the other ops), a head_dim a ValueError,
    # whether the backend comes from the argument or from the environment.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _, _, _, mask, bt = args
    q, k, v = _inputs(1, 2, 4, 2, 16, dtype=torch.float32)  # a head_dim the Triton kernels support
    monkeypatch.setenv("SWIFT_KERNELS_BACKEND", "triton")
    with pytest.raises(TypeError, match="dtype"):
        frame_block_attention(q.double(), k.double(), v.double(), mask, bt)
    monkeypatch.delenv("SWIFT_KERNELS_BACKEND")
    with pytest.raises(TypeError, match="dtype"):
        frame_block_attention(q.double(), k.double(), v.double(), mask, bt, backend="triton")
    with pytest.raises(ValueError, match="head_dim"):
        frame_block_attention(q[..., :6], k[..., :6], v[..., :6], mask, bt, backend="triton")  # 6 unsupported
    monkeypatch.delenv("TRITON_INTERPRET")
    # On a CPU the automatic choice is SDPA for a dense table and the reference otherwise.
    q, k, v, mask, bt = args
    dense = frame_block_attention(q, k, v, mask, bt)
    torch.testing.assert_close(dense, frame_block_attention(q, k, v, mask, bt, backend="torch"), rtol=1e-5, atol=1e-6)
    assert torch.equal(dense, frame_block_attention(q, k, v, mask, bt, backend="sdpa"))
    sparse = torch.tensor([[True, False], [True, True]])
    assert torch.equal(frame_block_attention(q, k, v, sparse, bt), frame_block_attention(q, k, v, sparse, bt, backend="torch"))


def test_package_imports_without_extension():
    assert hasattr(swift_kernels, "csg_attention")
    assert isinstance(swift_kernels.extension_available(), bool)
