"""Sparse-block tables of frame-block-sparse attention, computed from the small block table.

Blocks (latent frames) hold ``block_tokens`` tokens, in general not a multiple of a sparse block (3,520 at
2K), so a sparse block may straddle a frame border. For a pair of sparse blocks (query rows, key columns):

* it is *visited* when at least one (query frame, key frame) pair it touches is allowed;
* a visited pair is *full* when every frame pair it touches is allowed and both blocks lie wholly inside the
  sequence: kernels then skip the element mask (the fast path);
* otherwise it is *partial*: kernels mask each element with ``block_mask[i // P, j // P]`` and the bounds.

These are exactly the tables FlexAttention's ``create_block_mask`` derives from the token-level mask, here
computed from the block table with a few small matrix products, never forming the ``L x L`` mask. They are
stored the way FlexAttention stores them (:func:`ordered`): per row, a count and the columns in ascending
order, partial and full lists apart.
"""

from __future__ import annotations

import torch


def _incidence(num_tokens: int, tile: int, block_tokens: int, num_blocks: int) -> torch.Tensor:
    """float64 ``[num_tiles, num_blocks]``: 1 where a tile holds at least one token of a block."""
    num_tiles = -(-num_tokens // tile)
    starts = torch.arange(num_tiles, dtype=torch.int64) * tile
    ends = torch.clamp(starts + tile, max=num_tokens) - 1  # last token of each tile
    first_block = starts // block_tokens
    last_block = ends // block_tokens
    blocks = torch.arange(num_blocks, dtype=torch.int64)
    inc = (blocks[None, :] >= first_block[:, None]) & (blocks[None, :] <= last_block[:, None])
    return inc.to(torch.float64)


def tile_tables(
    block_mask: torch.Tensor, block_tokens: int, num_tokens: int, tile_q: int, tile_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(partial, full)`` tables ``[q_tiles, k_tiles]`` of a block table (on the CPU).

    ``block_mask`` is bool ``[n, n]`` with ``n * block_tokens == num_tokens``; tiles are ``tile_q`` query and
    ``tile_k`` key tokens. A padded last tile is never full (``create_block_mask`` pads with False).
    """
    mask = block_mask.detach().to("cpu", torch.bool)
    n = mask.shape[0]
    inc_q = _incidence(num_tokens, tile_q, block_tokens, n)
    inc_k = _incidence(num_tokens, tile_k, block_tokens, n)
    allowed = mask.to(torch.float64)
    # Counts of allowed / disallowed block pairs under each tile pair (exact in float64).
    visited = (inc_q @ allowed @ inc_k.T) > 0
    full = (inc_q @ (1.0 - allowed) @ inc_k.T) == 0
    if num_tokens % tile_q:
        full[-1, :] = False
    if num_tokens % tile_k:
        full[:, -1] = False
    full &= visited
    return visited & ~full, full


def ordered(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's encoding of a bool ``[..., rows, cols]`` table: int32 ``(num [..., rows], idx [..., rows,
    cols])``, per row the count of True entries, then their columns in ascending order followed by the other
    columns (a stable descending sort of the 0/1 row)."""
    t = table.to(torch.int32)
    num = t.sum(dim=-1).to(torch.int32)
    idx = torch.argsort(t, dim=-1, descending=True, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def allowed_pairs(block_mask: torch.Tensor, block_tokens: int) -> int:
    """Number of (query token, key token) pairs a block mask allows: the FLOP count's unit.

    Args:
        block_mask: bool ``[n_blocks, n_blocks]`` (as for :func:`~swift_kernels.frame_block_attention`).
        block_tokens: tokens per block, an int ``>= 1``.

    Returns ``(allowed blocks) * block_tokens**2`` as a Python int (attention forward FLOPs are
    ``4 * heads * head_dim * allowed_pairs`` per batch element). A plan has it precomputed:
    :attr:`AttentionPlan.allowed_pairs <swift_kernels.AttentionPlan.allowed_pairs>`.
    """
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 2:
        raise TypeError(f"block_mask must be a 2-D bool tensor, got {getattr(block_mask, 'dtype', type(block_mask).__name__)}")
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int):
        raise TypeError(f"block_tokens must be an int, got {type(block_tokens).__name__}")
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    return int(block_mask.to(torch.int64).sum().item()) * int(block_tokens) ** 2
