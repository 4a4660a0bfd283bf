"""Triton kernels of frame-block-sparse attention (FlashAttention-2 style), forward and backward.

Tensors are ``[B, L, H, D]`` with a unit stride in ``D``; every other stride is passed explicitly. The
log-sum-exp and ``delta`` are contiguous fp32 ``[B, H, L]``. Each program owns a tile of rows inside one
sparse block of ``SPARSE`` tokens and walks that sparse block's row of the plan's tables (FlexAttention's
``BlockMask`` layout, see ``plan.py``): first the *full* sparse blocks, where every element is allowed and in
bounds so no mask is computed, then the *partial* ones, where each element is masked with
``block_mask[row_tok // P, col_tok // P]`` (read from an int8 ``[NB, NB]`` table) and the sequence
bounds. Each listed sparse block is visited in tiles of ``BLOCK_N`` (or ``BLOCK_M``) tokens, a power-of-two
part of it. Sparse blocks that are wholly disallowed are not listed and are never visited.

The softmax works in base 2: scores are multiplied by ``scale * log2(e)`` so ``exp2`` can be used; the
stored log-sum-exp is converted back to the natural log.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E_FLOAT = 1.4426950408889634  # log2(e): for the launch code (scale * log2(e))
# Globals read inside @triton.jit functions must be constexpr (plain floats compile in the interpreter
# only).
LOG2E = tl.constexpr(LOG2E_FLOAT)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _block_allowed(mask_tab, qb, kb, NB):
    """block_mask[qb, kb] as an int8 scalar."""
    return tl.load(mask_tab + qb * NB + kb)


@triton.jit
def _element_mask(mask_tab, row_tok, col_tok, row0, col0, L, P, NB,
                  TRANSPOSED: tl.constexpr, TWO_BLOCKS: tl.constexpr):
    """Allowed elements of a [rows, cols] score tile: the block table entry of each element's (query
    block, key block) and both tokens in bounds. Rows are queries, or keys when TRANSPOSED (dK/dV pass).
    ``row0``/``col0`` are the first tokens of the row/column tiles.

    TWO_BLOCKS (block_tokens >= both tiles, the real case: 3,520): a tile then spans at most two blocks,
    so four scalar table reads and comparisons against one block border give the mask. Gathering the
    table per element instead costs one 64-bit address per element and spills registers at 128x64 tiles.
    """
    if TWO_BLOCKS:
        # Clamped: a tile of a partial sparse block may lie past the last block; its tokens are out of
        # bounds and masked below, but the table reads must stay inside the table.
        rb0 = tl.minimum(row0 // P, NB - 1)
        cb0 = tl.minimum(col0 // P, NB - 1)
        rb1 = tl.minimum(rb0 + 1, NB - 1)  # clamped: tokens past the last block are out of bounds anyway
        cb1 = tl.minimum(cb0 + 1, NB - 1)
        if TRANSPOSED:
            a00 = _block_allowed(mask_tab, cb0, rb0, NB)
            a01 = _block_allowed(mask_tab, cb1, rb0, NB)
            a10 = _block_allowed(mask_tab, cb0, rb1, NB)
            a11 = _block_allowed(mask_tab, cb1, rb1, NB)
        else:
            a00 = _block_allowed(mask_tab, rb0, cb0, NB)
            a01 = _block_allowed(mask_tab, rb0, cb1, NB)
            a10 = _block_allowed(mask_tab, rb1, cb0, NB)
            a11 = _block_allowed(mask_tab, rb1, cb1, NB)
        row_first = row_tok < (rb0 + 1) * P
        col_first = col_tok < (cb0 + 1) * P
        row_in = row_tok < L
        # Per row: is the element allowed if its column lies in the first / the second column block?
        if_col0 = (tl.where(row_first, a00, a10) != 0) & row_in
        if_col1 = (tl.where(row_first, a01, a11) != 0) & row_in
        allowed = tl.where(col_first[None, :], if_col0[:, None], if_col1[:, None])
        return allowed & (col_tok < L)[None, :]
    else:
        in_bounds = (row_tok[:, None] < L) & (col_tok[None, :] < L)
        rb = row_tok // P
        cb = col_tok // P
        if TRANSPOSED:
            idx = cb[None, :] * NB + rb[:, None]
        else:
            idx = rb[:, None] * NB + cb[None, :]
        allowed = tl.load(mask_tab + idx, mask=in_bounds, other=0)
        return in_bounds & (allowed != 0)


@triton.jit
def _tile_start(idx_row, i, SPARSE: tl.constexpr, TILE: tl.constexpr):
    """First token of the ``i``-th tile of ``TILE`` tokens along a table row: part ``i % (SPARSE // TILE)`` of
    the sparse block ``idx_row[i // (SPARSE // TILE)]``."""
    return tl.load(idx_row + i // (SPARSE // TILE)) * SPARSE + (i % (SPARSE // TILE)) * TILE


@triton.jit
def _row_ranges(num, idx, full_num, full_idx, idx_stride, row, SPARSE: tl.constexpr, TILE: tl.constexpr):
    """The table row ``row``: its full and partial index lists and the tile counts to walk in each."""
    n_full = tl.load(full_num + row) * (SPARSE // TILE)
    n_part = tl.load(num + row) * (SPARSE // TILE)
    return full_idx + row * idx_stride, n_full, idx + row * idx_stride, n_part


@triton.jit
def _load_kv_tile(k_base, v_base, stride_kl, stride_vl, idx_row, i, offs_d, L,
                  BLOCK_N: tl.constexpr, SPARSE: tl.constexpr, MASKED: tl.constexpr):
    """K and V of the ``i``-th key tile along a table row: its first token, token offsets, and the two tiles.

    Partial (MASKED) tiles may run past the sequence: those rows read as zeros, never as garbage that
    could turn into NaN in ``P @ V``.
    """
    col0 = _tile_start(idx_row, i, SPARSE, BLOCK_N)
    start_n = col0.to(tl.int64)  # 64-bit for the pointer arithmetic
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = k_base + start_n * stride_kl + offs_n[:, None] * stride_kl + offs_d[None, :]
    v_ptrs = v_base + start_n * stride_vl + offs_n[:, None] * stride_vl + offs_d[None, :]
    if MASKED:
        in_n = (col0 + offs_n) < L
        k = tl.load(k_ptrs, mask=in_n[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=in_n[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return col0, offs_n, k, v


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, idx_row, n_tiles, offs_m, offs_d,
    mask_tab, L, P, NB, qk_scale,
    row0, BLOCK_N: tl.constexpr, SPARSE: tl.constexpr, MASKED: tl.constexpr, TWO_BLOCKS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online-softmax update of one query tile over the first ``n_tiles`` key tiles of a table row."""
    for i in range(0, n_tiles):
        col0, offs_n, k, v = _load_kv_tile(
            k_base, v_base, stride_kl, stride_vl, idx_row, i, offs_d, L, BLOCK_N, SPARSE, MASKED
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            allowed = _element_mask(mask_tab, offs_m, col0 + offs_n, row0, col0, L, P, NB, False, TWO_BLOCKS)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_new
        if MASKED:
            # A row may have seen no allowed key yet (m_new = -inf); subtracting -inf would give NaN.
            # Subtracting a finite stand-in makes the row's p and alpha exp2(-inf) = 0 (acc, l stay 0).
            # m_i itself keeps -inf: a finite value there would later shift real scores far below 0
            # and exp2 would underflow.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_tile_coords(H, L, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Where a (query tile, batch*head) program works: tile and batch*head ids, batch and head (64-bit,
    for pointer arithmetic), the tile's first row, its row and head-dim offsets, and which rows exist."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m.to(tl.int64) * BLOCK_M
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    return pid_m, pid_bh, b, h, start_m, offs_m, offs_d, offs_m < L


@triton.jit
def fwd_kernel(
    Q, K, V, Out, Lse, mask_tab, num, idx, full_num, full_idx, idx_stride,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    H, L, P, NB, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE: tl.constexpr,
    TWO_BLOCKS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (query tile, batch*head): out and lse of BLOCK_M query rows."""
    pid_m, pid_bh, b, h, start_m, offs_m, offs_d, in_m = _query_tile_coords(H, L, BLOCK_M, HEAD_DIM)

    # 64-bit base offsets: batch * tokens * heads * head_dim can pass 2**31 at 2K.
    q_ptrs = Q + b * stride_qb + h * stride_qh + start_m * stride_ql \
        + tl.arange(0, BLOCK_M)[:, None] * stride_ql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=in_m[:, None], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    full_row, n_full, part_row, n_part = _row_ranges(
        num, idx, full_num, full_idx, idx_stride, (pid_m * BLOCK_M) // SPARSE, SPARSE, BLOCK_N
    )
    # Full tiles first: they make m_i finite for every row, so the partial tiles rarely hit the -inf guard.
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, full_row, n_full, offs_m, offs_d,
        mask_tab, L, P, NB, qk_scale, pid_m * BLOCK_M, BLOCK_N, SPARSE, False, TWO_BLOCKS, PRECISION,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, part_row, n_part, offs_m, offs_d,
        mask_tab, L, P, NB, qk_scale, pid_m * BLOCK_M, BLOCK_N, SPARSE, True, TWO_BLOCKS, PRECISION,
    )

    # A row with no allowed key has l_i = 0: output 0 and lse = -inf (no 0/0).
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * LN2, float("-inf"))

    o_ptrs = Out + b * stride_ob + h * stride_oh + start_m * stride_ol \
        + tl.arange(0, BLOCK_M)[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=in_m[:, None])
    tl.store(Lse + pid_bh.to(tl.int64) * L + offs_m, lse, mask=in_m)


@triton.jit
def bwd_preprocess_kernel(
    Out, dOut, Delta,
    stride_ob, stride_ol, stride_oh,
    stride_db, stride_dl, stride_dh,
    H, L,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, l] = sum_d dout * out in fp32: the row term of the softmax gradient."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_m = offs_m < L
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows * stride_ol + offs_d[None, :],
                mask=in_m[:, None], other=0.0).to(tl.float32)
    do = tl.load(dOut + b * stride_db + h * stride_dh + rows * stride_dl + offs_d[None, :],
                 mask=in_m[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=in_m)


@triton.jit
def _load_lse2(Lse_row, offs, L):
    """Base-2 lse of rows ``offs``; +inf where the row has no allowed key or lies past L, so that
    exp2(s - lse2) = 0 there (the row contributes nothing) instead of exp2(s + inf)."""
    lse = tl.load(Lse_row + offs, mask=offs < L, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, q_base, do_base, lse_row, delta_row, stride_ql, stride_dol, idx_row, n_tiles,
    offs_n, offs_d, mask_tab, L, P, NB, qk_scale,
    key0, BLOCK_M: tl.constexpr, SPARSE: tl.constexpr, MASKED: tl.constexpr, TWO_BLOCKS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over the first ``n_tiles`` query tiles of a transposed table row
    (transposed math: rows of the score tile are keys, columns are queries)."""
    for i in range(0, n_tiles):
        row0 = _tile_start(idx_row, i, SPARSE, BLOCK_M)
        start_m = row0.to(tl.int64)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        qT_ptrs = q_base + start_m * stride_ql + tl.arange(0, BLOCK_M)[None, :] * stride_ql + offs_d[:, None]
        do_ptrs = do_base + start_m * stride_dol + tl.arange(0, BLOCK_M)[:, None] * stride_dol + offs_d[None, :]
        if MASKED:
            in_m = offs_m < L
            qT = tl.load(qT_ptrs, mask=in_m[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=in_m[:, None], other=0.0)
            delta = tl.load(delta_row + offs_m, mask=in_m, other=0.0)
        else:
            qT = tl.load(qT_ptrs)
            do = tl.load(do_ptrs)
            delta = tl.load(delta_row + offs_m)
        lse2 = _load_lse2(lse_row, offs_m, L)
        sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        pT = tl.math.exp2(sT - lse2[None, :])
        if MASKED:
            allowed = _element_mask(mask_tab, offs_n, offs_m, key0, row0, L, P, NB, True, TWO_BLOCKS)
            pT = tl.where(allowed, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
    return dk, dv


@triton.jit
def bwd_dkdv_kernel(
    Q, K, V, dOut, dK, dV, Lse, Delta, mask_tab, num, idx, full_num, full_idx, idx_stride,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_dob, stride_dol, stride_doh,
    stride_dkb, stride_dkl, stride_dkh,
    stride_dvb, stride_dvl, stride_dvh,
    H, L, P, NB, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE: tl.constexpr,
    TWO_BLOCKS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (key tile, batch*head): dK and dV of BLOCK_N keys, walking the transposed
    tables (the query sparse blocks that see this key tile). Owning the key tile avoids atomics."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_n = pid_n.to(tl.int64) * BLOCK_N
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_n = offs_n < L
    rows = start_n + tl.arange(0, BLOCK_N)[:, None]

    k = tl.load(K + b * stride_kb + h * stride_kh + rows * stride_kl + offs_d[None, :], mask=in_n[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows * stride_vl + offs_d[None, :], mask=in_n[:, None], other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = dOut + b * stride_dob + h * stride_doh
    lse_row = Lse + pid_bh.to(tl.int64) * L
    delta_row = Delta + pid_bh.to(tl.int64) * L

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    full_row, n_full, part_row, n_part = _row_ranges(
        num, idx, full_num, full_idx, idx_stride, (pid_n * BLOCK_N) // SPARSE, SPARSE, BLOCK_M
    )
    dk, dv = _dkdv_tiles(
        dk, dv, k, v, q_base, do_base, lse_row, delta_row, stride_ql, stride_dol, full_row, n_full,
        offs_n, offs_d, mask_tab, L, P, NB, qk_scale, pid_n * BLOCK_N, BLOCK_M, SPARSE, False, TWO_BLOCKS, PRECISION,
    )
    dk, dv = _dkdv_tiles(
        dk, dv, k, v, q_base, do_base, lse_row, delta_row, stride_ql, stride_dol, part_row, n_part,
        offs_n, offs_d, mask_tab, L, P, NB, qk_scale, pid_n * BLOCK_N, BLOCK_M, SPARSE, True, TWO_BLOCKS, PRECISION,
    )
    # The scores are scale * q.k, so dK picks up the softmax scale once, here.
    dk = dk * scale
    tl.store(dK + b * stride_dkb + h * stride_dkh + rows * stride_dkl + offs_d[None, :],
             dk.to(dK.dtype.element_ty), mask=in_n[:, None])
    tl.store(dV + b * stride_dvb + h * stride_dvh + rows * stride_dvl + offs_d[None, :],
             dv.to(dV.dtype.element_ty), mask=in_n[:, None])


@triton.jit
def _dq_tiles(
    dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, idx_row, n_tiles, offs_m, offs_d,
    mask_tab, L, P, NB, qk_scale,
    row0, BLOCK_N: tl.constexpr, SPARSE: tl.constexpr, MASKED: tl.constexpr, TWO_BLOCKS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Accumulate dQ of one query tile over the first ``n_tiles`` key tiles of a table row."""
    for i in range(0, n_tiles):
        col0, offs_n, k, v = _load_kv_tile(
            k_base, v_base, stride_kl, stride_vl, idx_row, i, offs_d, L, BLOCK_N, SPARSE, MASKED
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            allowed = _element_mask(mask_tab, offs_m, col0 + offs_n, row0, col0, L, P, NB, False, TWO_BLOCKS)
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def bwd_dq_kernel(
    Q, K, V, dOut, dQ, Lse, Delta, mask_tab, num, idx, full_num, full_idx, idx_stride,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_dob, stride_dol, stride_doh,
    stride_dqb, stride_dql, stride_dqh,
    H, L, P, NB, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE: tl.constexpr,
    TWO_BLOCKS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (query tile, batch*head): dQ of BLOCK_M queries, walking the forward tables."""
    pid_m, pid_bh, b, h, start_m, offs_m, offs_d, in_m = _query_tile_coords(H, L, BLOCK_M, HEAD_DIM)
    rows = start_m + tl.arange(0, BLOCK_M)[:, None]

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_ql + offs_d[None, :], mask=in_m[:, None], other=0.0)
    do = tl.load(dOut + b * stride_dob + h * stride_doh + rows * stride_dol + offs_d[None, :],
                 mask=in_m[:, None], other=0.0)
    lse2 = _load_lse2(Lse + pid_bh.to(tl.int64) * L, offs_m, L)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * L + offs_m, mask=in_m, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_row, n_full, part_row, n_part = _row_ranges(
        num, idx, full_num, full_idx, idx_stride, (pid_m * BLOCK_M) // SPARSE, SPARSE, BLOCK_N
    )
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, full_row, n_full, offs_m, offs_d,
        mask_tab, L, P, NB, qk_scale, pid_m * BLOCK_M, BLOCK_N, SPARSE, False, TWO_BLOCKS, PRECISION,
    )
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, part_row, n_part, offs_m, offs_d,
        mask_tab, L, P, NB, qk_scale, pid_m * BLOCK_M, BLOCK_N, SPARSE, True, TWO_BLOCKS, PRECISION,
    )
    dq = dq * scale
    tl.store(dQ + b * stride_dqb + h * stride_dqh + rows * stride_dql + offs_d[None, :],
             dq.to(dQ.dtype.element_ty), mask=in_m[:, None])
