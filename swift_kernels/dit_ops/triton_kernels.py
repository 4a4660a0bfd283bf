"""Triton kernels of the fused DiT elementwise ops: one program per token row, one HBM pass each.

A row of ``C`` channels (3,072 for Wan2.2-5B) is held in registers as one power-of-two block, so the
LayerNorm / RMSNorm statistics and the elementwise tail need a single read of each input and a single
write of each output. Math is fp32; loads and stores are in the tensors' own dtypes.

Modulation rows (shift / scale / gate) are addressed as ``base + b * s_b + j * s_j`` where ``j`` is the
token (per-token layout), anything with ``s_j = 0`` (per sample), or, with ``INDEXED``, the table row
``mod_index[b, l]`` loaded first: a table of K rows (K = a few distinct timesteps) is read by every token,
so it stays in L2/L1 and HBM sees only the one index per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


@triton.jit
def _layer_norm_modulate(xf, m, C, eps, sh_ptr, sc_ptr, cols):
    mean = tl.sum(xf, axis=0) / C
    d = tl.where(m, xf - mean, 0.0)
    var = tl.sum(d * d, axis=0) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    sh = tl.load(sh_ptr + cols, mask=m, other=0.0).to(tl.float32)
    sc = tl.load(sc_ptr + cols, mask=m, other=0.0).to(tl.float32)
    return d * rstd * (1.0 + sc) + sh


@triton.jit
def _mod_row(idx_ptr, b, l, sib, sil, INDEXED: tl.constexpr):
    """Which modulation row token (b, l) reads: its table index, or the token itself."""
    if INDEXED:
        return tl.load(idx_ptr + b * sib + l * sil).to(tl.int64)
    return l


@triton.jit
def _adaln_kernel(
    x_ptr, sh_ptr, sc_ptr, out_ptr, idx_ptr,
    L, C,
    sxb, sxl, shb, shl, scb, scl, sib, sil,
    eps,
    INDEXED: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    l = (row % L).to(tl.int64)
    j = _mod_row(idx_ptr, b, l, sib, sil, INDEXED)
    cols = tl.arange(0, BLOCK_C)
    m = cols < C
    xf = tl.load(x_ptr + b * sxb + l * sxl + cols, mask=m, other=0.0).to(tl.float32)
    y = _layer_norm_modulate(xf, m, C, eps, sh_ptr + b * shb + j * shl, sc_ptr + b * scb + j * scl, cols)
    tl.store(out_ptr + row.to(tl.int64) * C + cols, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gated_residual_kernel(
    x_ptr, y_ptr, g_ptr, sh_ptr, sc_ptr, nx_ptr, mod_ptr, idx_ptr,
    L, C,
    sxb, sxl, syb, syl, sgb, sgl, shb, shl, scb, scl, sib, sil,
    eps,
    FUSED: tl.constexpr, INDEXED: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    l = (row % L).to(tl.int64)
    j = _mod_row(idx_ptr, b, l, sib, sil, INDEXED)
    cols = tl.arange(0, BLOCK_C)
    m = cols < C
    xf = tl.load(x_ptr + b * sxb + l * sxl + cols, mask=m, other=0.0).to(tl.float32)
    yf = tl.load(y_ptr + b * syb + l * syl + cols, mask=m, other=0.0).to(tl.float32)
    gf = tl.load(g_ptr + b * sgb + j * sgl + cols, mask=m, other=0.0).to(tl.float32)
    # round to the residual dtype first: the modulation must see exactly the stored new_x
    nx = (xf + gf * yf).to(nx_ptr.dtype.element_ty)
    out_off = row.to(tl.int64) * C + cols
    tl.store(nx_ptr + out_off, nx, mask=m)
    if FUSED:
        z = _layer_norm_modulate(nx.to(tl.float32), m, C, eps, sh_ptr + b * shb + j * shl, sc_ptr + b * scb + j * scl, cols)
        tl.store(mod_ptr + out_off, z.to(mod_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rms_rope_row(
    in_ptr, w_ptr, out_ptr, cos, sin, H, HD, eps,
    s_h, D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D)[None, :]
    m = (h < H) & (d < D)
    xf = tl.load(in_ptr + h * s_h + d, mask=m, other=0.0).to(tl.float32)
    ss = tl.sum(tl.sum(xf * xf, axis=1), axis=0)
    rstd = 1.0 / tl.sqrt(ss / HD + eps)
    # WanRMSNorm rounds the normalised value to the input dtype before the weight
    n = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + h * D + d, mask=m, other=0.0).to(tl.float32)
    u = tl.reshape(n * w, (BLOCK_H, D // 2, 2))
    a, bb = tl.split(u)
    c = cos[None, :]
    s = sin[None, :]
    o = tl.reshape(tl.join(a * c - bb * s, a * s + bb * c), (BLOCK_H, D))
    tl.store(out_ptr + h * D + d, o.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, wq_ptr, wk_ptr, f_ptr, qo_ptr, ko_ptr,
    L, H, HD,
    sqb, sql, sqh, skb, skl, skh, sfb, sfl,
    eps,
    D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    l = (row % L).to(tl.int64)
    j = tl.arange(0, D // 2)
    fbase = f_ptr + b * sfb + l * sfl
    # one (cos, sin) row serves every head of q and of k
    cos = tl.load(fbase + 2 * j)
    sin = tl.load(fbase + 2 * j + 1)
    obase = row.to(tl.int64) * HD
    _rms_rope_row(q_ptr + b * sqb + l * sql, wq_ptr, qo_ptr + obase, cos, sin, H, HD, eps, sqh, D, BLOCK_H)
    _rms_rope_row(k_ptr + b * skb + l * skl, wk_ptr, ko_ptr + obase, cos, sin, H, HD, eps, skh, D, BLOCK_H)


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    """(batch, row) strides of a [B, L or 1, C] tensor or a [B, K, C] / [K, C] table; a broadcast dim
    (size 1, or a table shared by the batch) gets stride 0."""
    if t.dim() == 2:
        return 0, (t.stride(0) if t.shape[0] > 1 else 0)
    return (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


def _index_args(index, dummy):
    """(pointer, batch stride, token stride, INDEXED) of the per-token row index ([B, L] or [L])."""
    if index is None:
        return dummy, 0, 0, False
    if index.dim() == 1:
        return index, 0, index.stride(0), True
    return index, (index.stride(0) if index.shape[0] > 1 else 0), index.stride(1), True


def adaln_modulate(x, shift, scale, eps, out_dtype, mod_index=None):
    B, L, C = x.shape
    out = torch.empty((B, L, C), dtype=out_dtype or x.dtype, device=x.device)
    BLOCK_C = triton.next_power_of_2(C)
    idx, sib, sil, indexed = _index_args(mod_index, x)
    _adaln_kernel[(B * L,)](
        x, shift, scale, out, idx, L, C, *_row_strides(x), *_row_strides(shift), *_row_strides(scale), sib, sil,
        float(eps), INDEXED=indexed, BLOCK_C=BLOCK_C, num_warps=_num_warps(BLOCK_C),
    )
    return out


def gated_residual(x, y, gate, shift=None, scale=None, eps=1e-6, out_dtype=None, mod_index=None):
    B, L, C = x.shape
    new_x = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    fused = shift is not None
    mod = torch.empty((B, L, C), dtype=out_dtype or x.dtype, device=x.device) if fused else new_x
    sh, sc = (shift, scale) if fused else (gate, gate)
    BLOCK_C = triton.next_power_of_2(C)
    idx, sib, sil, indexed = _index_args(mod_index, x)
    _gated_residual_kernel[(B * L,)](
        x, y, gate, sh, sc, new_x, mod, idx, L, C,
        *_row_strides(x), *_row_strides(y), *_row_strides(gate), *_row_strides(sh), *_row_strides(sc), sib, sil,
        float(eps), FUSED=fused, INDEXED=indexed, BLOCK_C=BLOCK_C, num_warps=_num_warps(BLOCK_C),
    )
    return (new_x, mod) if fused else new_x


def qk_norm_rope(q, k, weight_q, weight_k, freqs, eps):
    B, L, H, D = q.shape
    qo = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((B, L, H, D), dtype=k.dtype, device=k.device)
    f = freqs.to(torch.float32)
    if f.stride(-1) != 1 or f.stride(-2) != 2:
        f = f.contiguous()
    sfb = f.stride(0) if (f.dim() == 4 and f.shape[0] > 1) else 0
    sfl = f.stride(-3)
    wq = weight_q.contiguous()
    wk = weight_k.contiguous()
    BLOCK_H = triton.next_power_of_2(H)
    _qk_norm_rope_kernel[(B * L,)](
        q, k, wq, wk, f, qo, ko, L, H, H * D,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), sfb, sfl,
        float(eps), D=D, BLOCK_H=BLOCK_H, num_warps=_num_warps(BLOCK_H * D),
    )
    return qo, ko
