"""Fused DiT elementwise ops: references and Triton kernels against plain fp64 formulas."""

from __future__ import annotations


import pytest
import torch

from swift_kernels._backend import BackendUnavailableError
from swift_kernels.dit_ops import adaln_modulate, gated_residual, qk_norm_rope, rope_split, rope_table

# Tolerances against fp64: the result is rounded once to the output dtype (+ fp32 math noise).
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
# bf16 is tested on the GPU only: the CPU interpreter is not trusted for bf16 (see the project notes)
CPU_TRITON_DTYPES = (torch.float32, torch.float16)


def _rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


def _close(out, ref64, dtype):
    torch.testing.assert_close(out.double(), ref64, **TOL[dtype])


# ----------------------------------------------------------------------------------------------
# plain fp64 formulas, written independently of the package
# ----------------------------------------------------------------------------------------------


def _f64_adaln(x, shift, scale, eps):
    x = x.double()
    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)
    return y * (1 + scale.double()) + shift.double()


def _wan_rope_freqs(grid, d, theta=10000.0, frame_positions=None):
    # Wan's rope_params per part, as complex128 polar numbers, indexed like Wan's rope_apply
    c = d // 2
    parts = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    assert sum(p // 2 for p in parts) == c
    F, Hh, Ww = grid
    tpos = torch.arange(F, dtype=torch.float64) if frame_positions is None else torch.tensor(frame_positions, dtype=torch.float64)
    out = []
    for pos, n in ((tpos, parts[0]), (torch.arange(Hh, dtype=torch.float64), parts[1]), (torch.arange(Ww, dtype=torch.float64), parts[2])):
        inv = 1.0 / torch.pow(theta, torch.arange(0, n, 2, dtype=torch.float64) / n)
        out.append(torch.polar(torch.ones(len(pos), n // 2, dtype=torch.float64), torch.outer(pos, inv)))
    ft, fh, fw = out
    f = torch.cat(
        [ft[:, None, None].expand(F, Hh, Ww, -1), fh[None, :, None].expand(F, Hh, Ww, -1), fw[None, None].expand(F, Hh, Ww, -1)],
        dim=-1,
    )
    return f.reshape(F * Hh * Ww, c)


def _f64_norm_rope(x, w, fcomplex, eps):
    # RMSNorm over H*D (rounded to x.dtype as WanRMSNorm does), then complex rotation of (2i, 2i+1)
    B, L, H, D = x.shape
    xd = x.double()
    n = xd * torch.rsqrt(xd.pow(2).mean(dim=(2, 3), keepdim=True) + eps)
    n = n.to(x.dtype).double() * w.double().reshape(H, D)
    z = torch.view_as_complex(n.reshape(B, L, H, D // 2, 2).contiguous())
    if fcomplex.dim() == 2:
        fcomplex = fcomplex[None]
    return torch.view_as_real(z * fcomplex[:, :, None, :]).reshape(B, L, H, D)


# ----------------------------------------------------------------------------------------------
# rope table
# ----------------------------------------------------------------------------------------------


def test_rope_split_wan_128():
    assert rope_split(128) == (44, 42, 42)
    assert sum(rope_split(64)) == 64


@pytest.mark.parametrize("frame_positions", [None, [0, 5, 6, 9]])
def test_rope_table_matches_wan(frame_positions):
    grid = (4, 3, 5)
    t = rope_table(grid, 128, frame_positions=frame_positions)
    assert t.shape == (60, 64, 2) and t.dtype == torch.float32
    f = _wan_rope_freqs(grid, 128, frame_positions=frame_positions)
    torch.testing.assert_close(t[..., 0].double(), f.real, rtol=0, atol=1e-7)
    torch.testing.assert_close(t[..., 1].double(), f.imag, rtol=0, atol=1e-7)


def test_rope_table_frame_positions_shift_only_time_part():
    a = rope_table((2, 2, 2), 64)
    b = rope_table((2, 2, 2), 64, frame_positions=[3, 4])
    nt = rope_split(64)[0] // 2
    assert torch.equal(a[:, nt:], b[:, nt:])
    assert not torch.allclose(a[:, 1:nt], b[:, 1:nt])


def test_rope_table_rejects_bad_sizes():
    with pytest.raises(ValueError, match="grid"):
        rope_table((2, 2), 64)
    with pytest.raises(ValueError, match="frame_positions"):
        rope_table((2, 2, 2), 64, frame_positions=[0, 1, 2])
    with pytest.raises(ValueError, match="head_dim"):
        rope_table((2, 2, 2), 63)


# ----------------------------------------------------------------------------------------------
# adaln_modulate / gated_residual
# ----------------------------------------------------------------------------------------------


def _mods(B, L, C, per_token, dtype=torch.float32):
    """shift, scale as strided views of one [B, (L,) 6, C] table, as Wan chunks its modulation."""
    if per_token:
        e = _rand(B, L, 6, C, dtype=dtype)
        return e[:, :, 0], e[:, :, 1], e[:, :, 2]
    e = _rand(B, 6, C, dtype=dtype)
    return e[:, 0:1], e[:, 1:2], e[:, 2:3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_token", [False, True])
def test_adaln_modulate_torch(dtype, per_token):
    B, L, C = 2, 7, 40
    x = _rand(B, L, C, dtype=dtype) * 3 + 1
    shift, scale, _ = _mods(B, L, C, per_token)
    out = adaln_modulate(x, shift, scale, 1e-6, backend="torch")
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    _close(out, _f64_adaln(x, shift, scale, 1e-6), dtype)


def test_adaln_modulate_out_dtype():
    x = _rand(2, 3, 16)
    shift, scale, _ = _mods(2, 3, 16, False)
    out = adaln_modulate(x, shift, scale, out_dtype=torch.bfloat16, backend="torch")
    assert out.dtype == torch.bfloat16
    _close(out, _f64_adaln(x, shift, scale, 1e-6), torch.bfloat16)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", CPU_TRITON_DTYPES)
@pytest.mark.parametrize("per_token", [False, True])
def test_adaln_modulate_triton(dtype, per_token):
    B, L, C = 2, 5, 48  # C not a power of two: masked lanes must not enter the statistics
    x = _rand(B, L, C, dtype=dtype) * 2 - 0.5
    shift, scale, _ = _mods(B, L, C, per_token, dtype=dtype)
    out = adaln_modulate(x, shift, scale, 1e-5, out_dtype=torch.float32, backend="triton")
    assert out.dtype == torch.float32
    _close(out, _f64_adaln(x, shift, scale, 1e-5), torch.float32)
    out = adaln_modulate(x, shift, scale, 1e-5, backend="triton")
    _close(out, _f64_adaln(x, shift, scale, 1e-5), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_token", [False, True])
def test_gated_residual_torch(dtype, per_token):
    B, L, C = 2, 6, 24
    x = _rand(B, L, C, dtype=dtype)
    y = _rand(B, L, C, dtype=dtype)
    shift, scale, gate = _mods(B, L, C, per_token)
    new_x = gated_residual(x, y, gate, backend="torch")
    ref = x.double() + gate.double() * y.double()
    assert new_x.dtype == dtype
    _close(new_x, ref, dtype)
    nx2, mod = gated_residual(x, y, gate, shift=shift, scale=scale, out_dtype=torch.float32, backend="torch")
    assert torch.equal(nx2, new_x)
    # the fused modulation equals the unfused sequence on the rounded residual
    assert torch.equal(mod, adaln_modulate(new_x, shift, scale, out_dtype=torch.float32, backend="torch"))
    _close(mod, _f64_adaln(new_x, shift, scale, 1e-6), torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", CPU_TRITON_DTYPES)
def test_gated_residual_triton(dtype):
    B, L, C = 2, 5, 48
    x = _rand(B, L, C, dtype=dtype)
    y = _rand(B, L, C, dtype=dtype)
    shift, scale, gate = _mods(B, L, C, True, dtype=dtype)
    new_x = gated_residual(x, y, gate, backend="triton")
    _close(new_x, x.double() + gate.double() * y.double(), dtype)
    nx2, mod = gated_residual(x, y, gate[:, :1], shift=shift[:, :1], scale=scale, backend="triton")
    _close(nx2, x.double() + gate[:, :1].double() * y.double(), dtype)
    _close(mod, _f64_adaln(nx2, shift[:, :1], scale, 1e-6), dtype)


# ----------------------------------------------------------------------------------------------
# modulation tables + per-token row index (mod_index)
# ----------------------------------------------------------------------------------------------

# (table is per sample [B, K, C], index is per sample [B, L]) for each layout the ops accept
IDX_LAYOUTS = [(True, True), (False, True), (True, False), (False, False)]
IDX_CASES = [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32), ("triton", torch.float16)]


def _tables(B, K, C, per_sample_table, n=3):
    """n tables as strided views of one fp32 [B, K, n+3, C] / [K, n+3, C] tensor (as a model slices them)."""
    e = _rand(B, K, n + 3, C) if per_sample_table else _rand(K, n + 3, C)
    return [e[..., j, :] for j in range(n)]


def _index(B, L, K, per_sample_index, dtype=torch.int64):
    """Random rows in [0, K) with every row used (so scatter-adds really accumulate several tokens)."""
    shape = (B, L) if per_sample_index else (L,)
    idx = torch.randint(0, K, shape)
    idx.view(-1)[:K] = torch.arange(K)
    return idx.to(dtype)


def _gather64(table, idx, B, L):
    """The per-token [B, L, C] fp64 tensor that token (b, l) reads, by plain Python loops."""
    C = table.shape[-1]
    out = torch.empty(B, L, C, dtype=torch.float64)
    for b in range(B):
        for l in range(L):
            r = int(idx[b, l] if idx.dim() == 2 else idx[l])
            out[b, l] = (table[b, r] if table.dim() == 3 else table[r]).double()
    return out


@pytest.mark.parametrize("backend,dtype", IDX_CASES)
@pytest.mark.parametrize("per_sample_table,per_sample_index", IDX_LAYOUTS)
def test_indexed_modulation_matches_gathered(backend, dtype, per_sample_table, per_sample_index):
    B, L, C, K = 2, 7, 40, 3  # C not a power of two: masked lanes
    x = _rand(B, L, C, dtype=dtype) * 2 + 0.5
    y = _rand(B, L, C, dtype=dtype)
    shift, scale, gate = _tables(B, K, C, per_sample_table)
    idx = _index(B, L, K, per_sample_index, torch.int32 if per_sample_table else torch.int64)
    sh64, sc64, g64 = (_gather64(t, idx, B, L) for t in (shift, scale, gate))
    tol = torch.float32 if dtype == torch.float64 else dtype

    out = adaln_modulate(x, shift, scale, 1e-5, mod_index=idx, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    _close(out, _f64_adaln(x, sh64, sc64, 1e-5), tol)
    # the same numbers as the expanded per-token layout through the same backend
    expanded = adaln_modulate(x, sh64.float(), sc64.float(), 1e-5, backend=backend)
    torch.testing.assert_close(out, expanded, rtol=0, atol=0)

    new_x = gated_residual(x, y, gate, mod_index=idx, backend=backend)
    _close(new_x, x.double() + g64 * y.double(), tol)
    nx2, mod = gated_residual(x, y, gate, shift=shift, scale=scale, out_dtype=torch.float32, mod_index=idx, backend=backend)
    assert torch.equal(nx2, new_x) and mod.dtype == torch.float32
    _close(mod, _f64_adaln(new_x, sh64, sc64, 1e-6), torch.float32)


def test_indexed_small_integer_dtypes():
    """Any integer index dtype is accepted (uint8 is not taken as a mask)."""
    B, L, C, K = 2, 5, 8, 3
    x = _rand(B, L, C)
    shift, scale, _ = _tables(B, K, C, False)
    idx = _index(B, L, K, True)
    ref = adaln_modulate(x, shift, scale, mod_index=idx, backend="torch")
    for dt in (torch.uint8, torch.int8, torch.int16, torch.int32):
        assert torch.equal(adaln_modulate(x, shift, scale, mod_index=idx.to(dt), backend="torch"), ref)


def test_gradcheck_indexed_modulation():
    B, L, C, K = 2, 5, 6, 3
    x, y = _leaf(_rand(B, L, C)), _leaf(_rand(B, L, C))
    idx = _index(B, L, K, True)
    idx[0, -1] = 1  # a repeated row within a sample
    for per_sample_table in (True, False):
        shift, scale, gate = (_leaf(t) for t in _tables(B, K, C, per_sample_table))
        assert torch.autograd.gradcheck(
            lambda a, s, c: adaln_modulate(a, s, c, mod_index=idx, backend="torch"), (x, shift, scale)
        )
        assert torch.autograd.gradcheck(lambda a, b, g: gated_residual(a, b, g, mod_index=idx, backend="torch"), (x, y, gate))
        assert torch.autograd.gradcheck(
            lambda a, b, g, s, c: gated_residual(a, b, g, shift=s, scale=c, mod_index=idx, backend="torch"),
            (x, y, gate, shift, scale),
        )
    # shared index [L] with a per-sample table
    shift, scale, _ = (_leaf(t) for t in _tables(B, K, C, True))
    idx1 = _index(B, L, K, False)
    assert torch.autograd.gradcheck(lambda a, s, c: adaln_modulate(a, s, c, mod_index=idx1, backend="torch"), (x, shift, scale))


def test_indexed_table_grads_are_scatter_adds():
    """d(table row k) = sum over the tokens that read row k of the per-token gradient (and 0 for unused rows)."""
    B, L, C, K = 2, 6, 8, 4
    x, y = _rand(B, L, C), _rand(B, L, C)
    idx = torch.tensor([[0, 2, 2, 0, 2, 2], [2, 0, 0, 0, 2, 2]])  # row 1 and 3 unused
    gate = _rand(K, C).requires_grad_()
    gate_tok = _gather64(gate.detach(), idx, B, L).float().requires_grad_()
    w = _rand(B, L, C)
    (gated_residual(x, y, gate, mod_index=idx, backend="torch") * w).sum().backward()
    (gated_residual(x, y, gate_tok, backend="torch") * w).sum().backward()
    want = torch.zeros(K, C)
    for b in range(B):
        for l in range(L):
            want[idx[b, l]] += gate_tok.grad[b, l]
    torch.testing.assert_close(gate.grad, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(gate.grad[1], torch.zeros(C)) and torch.equal(gate.grad[3], torch.zeros(C))


@pytest.mark.interpreter
def test_indexed_triton_backward_matches_torch():
    B, L, C, K = 2, 5, 24, 3
    x, y = _rand(B, L, C), _rand(B, L, C)
    tabs = _tables(B, K, C, True)
    idx = _index(B, L, K, True)
    w1, w2 = _rand(B, L, C), _rand(B, L, C)
    grads = []
    for backend in ("torch", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, y, *tabs)]
        a, b, shift, scale, gate = leaves
        h = adaln_modulate(a, shift, scale, mod_index=idx, backend=backend)
        nx, h2 = gated_residual(a, b * h, gate, shift=shift, scale=scale, mod_index=idx, backend=backend)
        ((nx * w1).sum() + (h2 * w2).sum()).backward()
        grads.append([t.grad for t in leaves])
    for ga, gb in zip(*grads):
        assert ga is not None
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_indexed_opcheck_and_compile():
    B, L, C, K = 2, 4, 16, 2
    x, y = _rand(B, L, C), _rand(B, L, C)
    shift, scale, gate = (t.contiguous() for t in _tables(B, K, C, False))
    idx = _index(B, L, K, True)
    ops = torch.ops.swift_kernels
    torch.library.opcheck(ops.adaln_modulate, (x, shift, scale, 1e-6, None, "torch", idx))
    torch.library.opcheck(ops.gated_residual, (x, y, gate, "torch", idx))
    torch.library.opcheck(ops.gated_residual_adaln, (x, y, gate, shift, scale, 1e-6, None, "torch", idx))

    def block(x, y, idx):
        h = adaln_modulate(x, shift, scale, mod_index=idx, backend="torch")
        nx, h2 = gated_residual(x, y * h, gate, shift=shift, scale=scale, mod_index=idx, backend="torch")
        return nx + h2 + gated_residual(nx, y, gate, mod_index=idx, backend="torch")

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, y, idx), block(x, y, idx), rtol=0, atol=0)


def test_indexed_validation_errors():
    B, L, C, K = 2, 3, 8, 2
    x = _rand(B, L, C)
    shift, scale, gate = _tables(B, K, C, False)
    idx = _index(B, L, K, True)
    with pytest.raises(TypeError, match="mod_index"):
        adaln_modulate(x, shift, scale, mod_index=idx.float())
    with pytest.raises(TypeError, match="mod_index"):
        adaln_modulate(x, shift, scale, mod_index=idx.bool())
    with pytest.raises(TypeError, match="mod_index"):
        adaln_modulate(x, shift, scale, mod_index=[0, 1, 0])
    with pytest.raises(ValueError, match="mod_index"):
        adaln_modulate(x, shift, scale, mod_index=idx[:, :2])
    with pytest.raises(ValueError, match="mod_index"):
        adaln_modulate(x, shift, scale, mod_index=idx[None])
    with pytest.raises(ValueError, match="mod_index"):
        adaln_modulate(x, shift, scale, mod_index=idx.to("meta"))
    bad = idx.clone()
    bad[1, 2] = K  # one past the table
    with pytest.raises(ValueError, match=r"mod_index values must lie in \[0, 2\)"):
        adaln_modulate(x, shift, scale, mod_index=bad)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="mod_index values"):
        gated_residual(x, x, gate, mod_index=bad, backend="torch")
    with pytest.raises(ValueError, match="shift"):
        adaln_modulate(x, shift[:, :4], scale, mod_index=idx)  # wrong C
    with pytest.raises(ValueError, match="scale"):
        adaln_modulate(x, shift, _rand(3, K, C), mod_index=idx)  # wrong batch
    with pytest.raises(ValueError, match="shift"):
        adaln_modulate(x, shift[:0], scale, mod_index=idx)  # K = 0
    with pytest.raises(ValueError, match="shift"):
        adaln_modulate(x, _rand(B, 1, K, C), scale, mod_index=idx)  # 4-D
    with pytest.raises(ValueError, match="same number of rows"):
        gated_residual(x, x, gate, shift=shift, scale=_rand(K + 1, C), mod_index=idx)
    with pytest.raises(ValueError, match="gate"):
        gated_residual(x, x, _rand(K, C).t(), mod_index=idx)  # last dim not contiguous
    with pytest.raises(ValueError, match="shift"):
        adaln_modulate(x, shift.to("meta"), scale, mod_index=idx)
    # without mod_index a table is not a valid modulation
    with pytest.raises(ValueError, match="shift"):
        adaln_modulate(x, shift, scale)


# ----------------------------------------------------------------------------------------------
# qk_norm_rope
# ----------------------------------------------------------------------------------------------


def _qk_inputs(B, grid, H, D, dtype):
    L = grid[0] * grid[1] * grid[2]
    qkv = _rand(B, L, 3 * H * D, dtype=dtype)  # q and k are strided views of a fused projection
    q = qkv[..., : H * D].view(B, L, H, D)
    k = qkv[..., H * D : 2 * H * D].view(B, L, H, D)
    wq = (1 + 0.3 * torch.randn(H * D)).to(dtype)
    wk = (1 + 0.3 * torch.randn(H * D)).to(dtype)
    return q, k, wq, wk


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_qk_norm_rope_torch(dtype):
    B, grid, H, D = 2, (2, 2, 3), 3, 32
    q, k, wq, wk = _qk_inputs(B, grid, H, D, dtype)
    fpos = [0, 4]
    freqs = rope_table(grid, D, frame_positions=fpos)
    qo, ko = qk_norm_rope(q, k, wq, wk, freqs, 1e-6, backend="torch")
    assert qo.is_contiguous() and qo.dtype == dtype and qo.shape == q.shape
    fc = _wan_rope_freqs(grid, D, frame_positions=fpos)
    _close(qo, _f64_norm_rope(q, wq, fc, 1e-6), dtype if dtype != torch.float64 else torch.float32)
    _close(ko, _f64_norm_rope(k, wk, fc, 1e-6), dtype if dtype != torch.float64 else torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", CPU_TRITON_DTYPES)
@pytest.mark.parametrize("per_batch_freqs", [False, True])
def test_qk_norm_rope_triton(dtype, per_batch_freqs):
    B, grid, H, D = 2, (2, 1, 3), 3, 16  # H not a power of two
    q, k, wq, wk = _qk_inputs(B, grid, H, D, dtype)
    if per_batch_freqs:  # two CSG windows with different clip positions in one batch
        freqs = torch.stack([rope_table(grid, D, frame_positions=[0, 1]), rope_table(grid, D, frame_positions=[0, 7])])
        fc = torch.stack([_wan_rope_freqs(grid, D, frame_positions=[0, 1]), _wan_rope_freqs(grid, D, frame_positions=[0, 7])])
    else:
        freqs = rope_table(grid, D)
        fc = _wan_rope_freqs(grid, D)
    qo, ko = qk_norm_rope(q, k, wq, wk, freqs, backend="triton")
    assert qo.is_contiguous() and ko.dtype == dtype
    _close(qo, _f64_norm_rope(q, wq, fc, 1e-6), dtype)
    _close(ko, _f64_norm_rope(k, wk, fc, 1e-6), dtype)
    tq, tk = qk_norm_rope(q, k, wq, wk, freqs, backend="torch")
    torch.testing.assert_close(qo, tq, **TOL[dtype])
    torch.testing.assert_close(ko, tk, **TOL[dtype])


# ----------------------------------------------------------------------------------------------
# autograd, torch.library, torch.compile
# ----------------------------------------------------------------------------------------------


def _leaf(t):
    return t.detach().double().requires_grad_()


def test_gradcheck_adaln_modulate():
    x = _leaf(_rand(2, 3, 8))
    shift, scale, _ = _mods(2, 3, 8, False)
    assert torch.autograd.gradcheck(lambda a, b, c: adaln_modulate(a, b, c, backend="torch"), (x, _leaf(shift), _leaf(scale)))


def test_gradcheck_gated_residual():
    x, y = _leaf(_rand(2, 3, 8)), _leaf(_rand(2, 3, 8))
    shift, scale, gate = (_leaf(t) for t in _mods(2, 3, 8, True))
    assert torch.autograd.gradcheck(lambda a, b, g: gated_residual(a, b, g, backend="torch"), (x, y, _leaf(gate[:, :1])))
    assert torch.autograd.gradcheck(
        lambda a, b, g, s, c: gated_residual(a, b, g, shift=s, scale=c, backend="torch"), (x, y, gate, shift, scale)
    )


def test_gradcheck_qk_norm_rope():
    q, k, wq, wk = (_leaf(t) for t in _qk_inputs(1, (1, 2, 2), 2, 12, torch.float64))
    freqs = rope_table((1, 2, 2), 12, frame_positions=[3])
    assert torch.autograd.gradcheck(lambda a, b, c, d: qk_norm_rope(a, b, c, d, freqs, backend="torch"), (q, k, wq, wk))


@pytest.mark.interpreter
def test_triton_backward_matches_torch():
    q, k, wq, wk = _qk_inputs(1, (1, 2, 2), 2, 16, torch.float32)
    freqs = rope_table((1, 2, 2), 16)
    grads = []
    for backend in ("torch", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, wq, wk)]
        qo, ko = qk_norm_rope(*leaves, freqs, backend=backend)
        (qo * torch.arange(qo.numel()).reshape(qo.shape).sin() + ko.square()).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_opcheck_library_ops():
    x = _rand(2, 3, 8)
    shift, scale, gate = _mods(2, 3, 8, False)
    ops = torch.ops.swift_kernels
    torch.library.opcheck(ops.adaln_modulate, (x, shift.contiguous(), scale.contiguous(), 1e-6, None, "torch"))
    torch.library.opcheck(ops.gated_residual, (x, _rand(2, 3, 8), gate.contiguous(), "torch"))
    q, k, wq, wk = _qk_inputs(1, (1, 2, 2), 2, 12, torch.float32)
    torch.library.opcheck(
        ops.qk_norm_rope, (q.contiguous(), k.contiguous(), wq, wk, rope_table((1, 2, 2), 12), 1e-6, "torch")
    )


def test_torch_compile_fullgraph():
    B, L, C = 1, 4, 16
    x = _rand(B, L, C)
    shift, scale, gate = _mods(B, L, C, False)
    y = _rand(B, L, C)

    def block(x, y):
        h = adaln_modulate(x, shift, scale, backend="torch")
        nx, h2 = gated_residual(x, y * h, gate, shift=shift, scale=scale, backend="torch")
        return nx + h2

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, y), block(x, y), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def test_validation_errors():
    x = _rand(2, 3, 8)
    shift, scale, gate = _mods(2, 3, 8, False)
    with pytest.raises(ValueError, match="shift"):
        adaln_modulate(x, shift[:, :, :4], scale)
    with pytest.raises(ValueError, match="scale"):
        adaln_modulate(x, shift, _rand(2, 2, 8))
    with pytest.raises(TypeError, match="x"):
        adaln_modulate(x.to(torch.int32), shift, scale)
    with pytest.raises(ValueError, match="x"):
        adaln_modulate(x.transpose(1, 2), shift, scale)
    with pytest.raises(ValueError, match="shift"):
        adaln_modulate(x, shift.to("meta"), scale)
    with pytest.raises(ValueError, match="backend"):
        adaln_modulate(x, shift, scale, backend="nope")
    with pytest.raises(BackendUnavailableError):
        adaln_modulate(x, shift, scale, backend="cuda")
    with pytest.raises(ValueError, match="y"):
        gated_residual(x, _rand(2, 3, 7), gate)
    with pytest.raises(ValueError, match="together"):
        gated_residual(x, x, gate, shift=shift)
    q, k, wq, wk = _qk_inputs(1, (1, 2, 2), 2, 12, torch.float32)
    freqs = rope_table((1, 2, 2), 12)
    with pytest.raises(ValueError, match="weight_q"):
        qk_norm_rope(q, k, wq[:-1], wk, freqs)
    with pytest.raises(ValueError, match="freqs"):
        qk_norm_rope(q, k, wq, wk, freqs[:-1])
    with pytest.raises(TypeError, match="freqs"):
        qk_norm_rope(q, k, wq, wk, freqs.half())
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        qk_norm_rope(q, k.half(), wq, wk, freqs)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        qk_norm_rope(q, k[:, :, :1], wq, wk, freqs)


def test_triton_needs_power_of_two_head_dim(monkeypatch):
    """An explicit Triton request with a head dim the kernel cannot take is a ValueError (raised before any
    kernel runs, so the interpreter flag only makes Triton available for CPU tensors here)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, wq, wk = _qk_inputs(1, (1, 2, 2), 2, 12, torch.float32)
    with pytest.raises(ValueError, match="power-of-two"):
        qk_norm_rope(q, k, wq, wk, rope_table((1, 2, 2), 12), backend="triton")


def test_validation_names_the_argument():
    """Non-tensors and bad scalars raise TypeError/ValueError naming the argument, before any device check."""
    x, shift, scale, gate = _rand(2, 3, 8), _rand(2, 1, 8), _rand(2, 1, 8), _rand(2, 1, 8)
    with pytest.raises(TypeError, match="shift"):
        gated_residual(x, x, gate, shift=[0.0], scale=scale)
    with pytest.raises(TypeError, match="scale"):
        gated_residual(x, x, gate, shift=shift, scale="1")
    with pytest.raises(TypeError, match="eps"):
        adaln_modulate(x, shift, scale, True)
    with pytest.raises(TypeError, match="eps"):
        adaln_modulate(x, shift, scale, "1e-6")
    for bad in (float("inf"), float("nan"), -1e-6):
        with pytest.raises(ValueError, match="eps"):
            adaln_modulate(x, shift, scale, bad)


def test_env_backend_is_explicit(monkeypatch):
    """SWIFT_KERNELS_BACKEND asks as firmly as the argument: an unmet request raises, it never falls back."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SWIFT_KERNELS_BACKEND", "triton")
    x, shift, scale = _rand(2, 3, 8, dtype=torch.float64), _rand(2, 1, 8), _rand(2, 1, 8)
    with pytest.raises(TypeError, match="triton"):
        adaln_modulate(x, shift, scale)
    q, k, wq, wk = _qk_inputs(1, (1, 2, 2), 2, 12, torch.float32)
    with pytest.raises(ValueError, match="power-of-two"):
        qk_norm_rope(q, k, wq, wk, rope_table((1, 2, 2), 12))
    monkeypatch.delenv("SWIFT_KERNELS_BACKEND")
    out = adaln_modulate(x, shift, scale)  # automatic choice: float64 goes to the reference
    assert out.dtype == torch.float64


def test_rope_table_rejects_bad_types():
    with pytest.raises(TypeError, match="grid"):
        rope_table(5, 8)
    with pytest.raises(TypeError, match="grid"):
        rope_table((1.5, 2, 2), 8)
    with pytest.raises(TypeError, match="head_dim"):
        rope_table((1, 2, 2), True)
    with pytest.raises(TypeError, match="theta"):
        rope_table((1, 2, 2), 8, theta="big")
    with pytest.raises(ValueError, match="theta"):
        rope_table((1, 2, 2), 8, theta=float("nan"))
    with pytest.raises(TypeError, match="frame_positions"):
        rope_table((2, 2, 2), 8, frame_positions="ab")
    with pytest.raises(ValueError, match="frame_positions"):
        rope_table((2, 2, 2), 8, frame_positions=[0.0, float("nan")])
    with pytest.raises(ValueError, match="device"):
        rope_table((1, 2, 2), 8, device="nowhere")
    import numpy as np

    # integer-like sizes (NumPy ints, as from shapes) are ints
    assert torch.equal(rope_table((np.int64(1), 2, 2), np.int64(8)), rope_table((1, 2, 2), 8))


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_dit_ops(dtype, gpu_device):
    B, L, C, H, D = 2, 3520 // 16, 3072, 24, 128
    x = _rand(B, L, C, dtype=dtype, device=gpu_device)
    y = _rand(B, L, C, dtype=dtype, device=gpu_device)
    e = _rand(B, 6, C, dtype=torch.float32, device=gpu_device)
    shift, scale, gate = e[:, 0:1], e[:, 1:2], e[:, 2:3]
    ref = _f64_adaln(x, shift, scale, 1e-6)
    naive = torch.nn.functional.layer_norm(x, (C,), eps=1e-6) * (1 + scale.to(dtype)) + shift.to(dtype)
    floor = 2 * torch.finfo(dtype).eps * ref.abs().max().item()
    out = adaln_modulate(x, shift, scale, backend="triton")
    assert (out.double() - ref).abs().max().item() <= 2 * (naive.double() - ref).abs().max().item() + floor
    nx, mod = gated_residual(x, y, gate, shift=shift, scale=scale, backend="triton")
    _close(nx, x.double() + gate.double() * y.double(), dtype)
    torch.testing.assert_close(mod, adaln_modulate(nx, shift, scale, backend="torch"), **TOL[dtype])
    grid = (1, 10, 22)
    qkv = _rand(B, grid[0] * grid[1] * grid[2], 3 * H * D, dtype=dtype, device=gpu_device)
    q = qkv[..., : H * D].view(B, -1, H, D)
    k = qkv[..., H * D : 2 * H * D].view(B, -1, H, D)
    wq = (1 + 0.3 * torch.randn(H * D, device=gpu_device)).to(dtype)
    wk = (1 + 0.3 * torch.randn(H * D, device=gpu_device)).to(dtype)
    freqs = rope_table(grid, D, frame_positions=[5], device=gpu_device)
    qo, ko = qk_norm_rope(q, k, wq, wk, freqs, backend="triton")
    tq, tk = qk_norm_rope(q, k, wq, wk, freqs, backend="torch")
    torch.testing.assert_close(qo, tq, **TOL[dtype])
    torch.testing.assert_close(ko, tk, **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_indexed_modulation(dtype, gpu_device):
    """A CSG-window layout (3 distinct timesteps over 4 blocks of tokens) at the 5B width, vs the expanded one."""
    B, P, C, K = 1, 3520 // 16, 3072, 3
    L = 4 * P
    x = _rand(B, L, C, dtype=dtype, device=gpu_device)
    y = _rand(B, L, C, dtype=dtype, device=gpu_device)
    e = _rand(K, 6, C, device=gpu_device)
    shift, scale, gate = e[:, 0], e[:, 1], e[:, 2]
    idx = torch.tensor([0, 1, 1, 2], device=gpu_device).repeat_interleave(P)[None].expand(B, L)
    sh, sc, g = (t[idx] for t in (shift, scale, gate))  # the expanded per-token layout
    torch.testing.assert_close(adaln_modulate(x, shift, scale, mod_index=idx, backend="triton"),
                               adaln_modulate(x, sh, sc, backend="triton"), rtol=0, atol=0)
    nx, mod = gated_residual(x, y, gate, shift=shift, scale=scale, mod_index=idx, backend="triton")
    nx2, mod2 = gated_residual(x, y, g, shift=sh, scale=sc, backend="triton")
    torch.testing.assert_close(nx, nx2, rtol=0, atol=0)
    torch.testing.assert_close(mod, mod2, rtol=0, atol=0)
    _close(nx, x.double() + g.double() * y.double(), dtype)


# ----------------------------------------------------------------------------------------------
# Without a GPU the interpreter cannot catch code the GPU compiler rejects: compile every kernel of the
# sampler and DiT ops ahead of time for Hopper (sm_90, bf16 and fp16) in a subprocess without the interpreter,
# with their registers and spills held to the limits of tests/aot_sm90.py (no spills at all).
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90(tmp_path):
    from helpers import run_aot

    run_aot("ops", tmp_path)
