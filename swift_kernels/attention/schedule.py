"""Tile schedules for frame-block-sparse attention.

The kernels work on tiles of ``tile_q`` query tokens and ``tile_k`` key tokens. Blocks (latent frames)
hold ``block_tokens`` tokens, which is in general not a multiple of a tile (3,520 at 2K), so a tile may
straddle a block border. For every query tile the schedule lists the key tiles it must visit:

* a pair of tiles is *visited* when at least one (query block, key block) pair it touches is allowed;
* a visited pair is *full* when every block pair it touches is allowed and both tiles lie wholly inside
  the sequence: the kernel then skips the element mask (the fast path);
* otherwise it is *partial*: the kernel masks each element with ``block_mask[i // P, j // P]`` and the
  sequence bounds.

Pairs whose block pairs are all disallowed are absent, so the kernel never touches them.

The schedule is stored as CSR, one row per query tile (or per key tile for the transposed schedule used
by the dK/dV backward): ``indptr[r]:indptr[r+1]`` indexes ``indices``; in each row the full entries come
first, ``num_full[r]`` of them, then the partial ones. All arrays are int32 on the requested device.
"""

from __future__ import annotations

import dataclasses
import functools

import torch


@dataclasses.dataclass(frozen=True)
class TileSchedule:
    """CSR list of the column tiles each row tile visits (full entries first in each row)."""

    indptr: torch.Tensor  # int32 [num_rows + 1]
    num_full: torch.Tensor  # int32 [num_rows]
    indices: torch.Tensor  # int32 [nnz]
    num_rows: int
    num_cols: int
    max_row_len: int

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def to(self, device: torch.device | str) -> "TileSchedule":
        return dataclasses.replace(
            self,
            indptr=self.indptr.to(device),
            num_full=self.num_full.to(device),
            indices=self.indices.to(device),
        )


@dataclasses.dataclass(frozen=True)
class AttentionSchedule:
    """The forward schedule (rows: query tiles) and its transpose (rows: key tiles)."""

    by_query: TileSchedule
    by_key: TileSchedule
    tile_q: int
    tile_k: int
    # The block table as contiguous int8 [n_blocks, n_blocks], the form the kernels read per element;
    # None until get_schedule places a schedule on a device.
    mask_table: torch.Tensor | None = None


def _tile_block_incidence(num_tokens: int, tile: int, block_tokens: int, num_blocks: int) -> torch.Tensor:
    """float64 [num_tiles, num_blocks]: 1 where a tile holds at least one token of a block."""
    num_tiles = -(-num_tokens // tile)
    starts = torch.arange(num_tiles, dtype=torch.int64) * tile
    ends = torch.clamp(starts + tile, max=num_tokens) - 1  # last token of each tile
    first_block = starts // block_tokens
    last_block = ends // block_tokens
    blocks = torch.arange(num_blocks, dtype=torch.int64)
    inc = (blocks[None, :] >= first_block[:, None]) & (blocks[None, :] <= last_block[:, None])
    return inc.to(torch.float64)


def _csr(visit: torch.Tensor, full: torch.Tensor) -> TileSchedule:
    """Build the CSR arrays from boolean [rows, cols] tables, full entries first in each row."""
    num_rows, num_cols = visit.shape
    # Sort key per entry: full entries (0) before partial ones (1), then by column, so the kernel reads
    # each row's keys in address order within both groups.
    rows, cols = torch.nonzero(visit, as_tuple=True)
    is_partial = (~full[rows, cols]).to(torch.int64)
    order = torch.argsort(rows * (2 * num_cols) + is_partial * num_cols + cols)
    indices = cols[order].to(torch.int32)
    counts = visit.sum(dim=1)
    indptr = torch.zeros(num_rows + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, dim=0)
    num_full = (visit & full).sum(dim=1)
    return TileSchedule(
        indptr=indptr.to(torch.int32),
        num_full=num_full.to(torch.int32),
        indices=indices.contiguous(),
        num_rows=num_rows,
        num_cols=num_cols,
        max_row_len=int(counts.max()) if num_rows else 0,
    )


def build_schedule(
    block_mask: torch.Tensor, block_tokens: int, num_tokens: int, tile_q: int, tile_k: int
) -> AttentionSchedule:
    """Build the forward and transposed tile schedules for a block mask (on the CPU).

    ``block_mask`` is a bool ``[n_blocks, n_blocks]`` table; ``num_tokens`` is normally
    ``n_blocks * block_tokens``.
    """
    mask = block_mask.detach().to("cpu", torch.bool)
    num_blocks = mask.shape[0]
    inc_q = _tile_block_incidence(num_tokens, tile_q, block_tokens, num_blocks)
    inc_k = _tile_block_incidence(num_tokens, tile_k, block_tokens, num_blocks)
    allowed = mask.to(torch.float64)
    # Counts of allowed / disallowed block pairs under each tile pair (exact in float64).
    n_allowed = inc_q @ allowed @ inc_k.T
    n_denied = inc_q @ (1.0 - allowed) @ inc_k.T
    visit = n_allowed > 0
    full = n_denied == 0
    # A tile that runs past the end of the sequence needs the bounds mask.
    if num_tokens % tile_q:
        full[-1, :] = False
    if num_tokens % tile_k:
        full[:, -1] = False
    by_query = _csr(visit, full)
    by_key = _csr(visit.T.contiguous(), full.T.contiguous())
    return AttentionSchedule(by_query=by_query, by_key=by_key, tile_q=tile_q, tile_k=tile_k)


@functools.lru_cache(maxsize=64)
def _cached(mask_bytes: bytes, num_blocks: int, block_tokens: int, num_tokens: int, tile_q: int, tile_k: int, device: str):
    mask = torch.frombuffer(bytearray(mask_bytes), dtype=torch.bool).reshape(num_blocks, num_blocks)
    sched = build_schedule(mask, block_tokens, num_tokens, tile_q, tile_k)
    return AttentionSchedule(
        by_query=sched.by_query.to(device),
        by_key=sched.by_key.to(device),
        tile_q=tile_q,
        tile_k=tile_k,
        mask_table=mask.to(device=device, dtype=torch.int8).contiguous(),
    )


def get_schedule(
    block_mask: torch.Tensor,
    block_tokens: int,
    num_tokens: int,
    tile_q: int,
    tile_k: int,
    device: torch.device | str,
) -> AttentionSchedule:
    """Cached :func:`build_schedule`, with the arrays and the int8 block table moved to ``device``.

    The cache key is the mask's contents, so calling every layer of a network with the same mask builds
    the schedule and uploads the table once. Reading a mask that lives on the GPU costs one small device-to-host copy.
    """
    mask = block_mask.detach().to("cpu", torch.bool).contiguous()
    return _cached(
        mask.numpy().tobytes(), mask.shape[0], int(block_tokens), int(num_tokens), int(tile_q), int(tile_k), str(device)
    )


def allowed_pairs(block_mask: torch.Tensor, block_tokens: int) -> int:
    """Number of (query token, key token) pairs a block mask allows: the FLOP count's unit.

    Args:
        block_mask: bool ``[n_blocks, n_blocks]`` (as for :func:`~swift_kernels.frame_block_attention`).
        block_tokens: tokens per block, an int ``>= 1``.

    Returns ``(allowed blocks) * block_tokens**2`` as a Python int (attention forward FLOPs are
    ``4 * heads * head_dim * allowed_pairs`` per batch element).
    """
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 2:
        raise TypeError(f"block_mask must be a 2-D bool tensor, got {getattr(block_mask, 'dtype', type(block_mask).__name__)}")
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int):
        raise TypeError(f"block_tokens must be an int, got {type(block_tokens).__name__}")
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    return int(block_mask.to(torch.int64).sum().item()) * int(block_tokens) ** 2
