"""Tile sizes of frame-block-sparse attention: the one source for the plan, the Triton and the CUDA kernels.

Every attention plan describes its sequence in *sparse blocks* of :data:`SPARSE_BLOCK` tokens, for queries
and keys alike (FlexAttention's default ``BLOCK_SIZE``, so a plan's tables are a FlexAttention
``BlockMask`` as they are). Each kernel program owns a sparse block or a power-of-two part of one, and
walks the sparse blocks its table row lists in tiles that also divide :data:`SPARSE_BLOCK`.

The CUDA kernels read these numbers from ``csrc/attention/fba_tiles.h``, which is generated from this file
(``python -c "import swift_kernels.attention.tiles as t; print(t.cuda_header(), end='')" >
csrc/attention/fba_tiles.h``); a test checks that the committed
header equals the generated text, and the compiled extension reports its own values (``_C.TILES``), which the
CUDA backend checks against these before it launches anything.
"""

from __future__ import annotations

SPARSE_BLOCK = 128
"""Tokens per sparse block of a plan, for queries and keys."""

# CUDA extension (mma.sync kernels, sm_80+): 8 warps of 16 rows own 128 query rows (forward, dQ) or 128 key
# rows (dK/dV); the partner tiles they walk are 64 tokens wide.
CUDA_THREADS = 256
CUDA_FWD_TILE_Q = 128  # query rows per CTA of the forward and the dQ kernel
CUDA_FWD_TILE_K = 64  # key tile they walk
CUDA_BWD_TILE_Q = 64  # query tile the dK/dV kernel walks
CUDA_BWD_TILE_K = 128  # key rows per CTA of the dK/dV kernel
# Hopper forward (sm_90a, TMA + wgmma): two consumer warpgroups of 64 query rows, 128-key tiles.
CUDA_SM90_TILE_Q = 128
CUDA_SM90_TILE_K = 128

# The values the generated header carries, by the names the C++ code uses.
CUDA_CONSTANTS = {
    "kSparseBlock": SPARSE_BLOCK,
    "kThreads": CUDA_THREADS,
    "kFwdTileQ": CUDA_FWD_TILE_Q,
    "kFwdTileK": CUDA_FWD_TILE_K,
    "kBwdTileQ": CUDA_BWD_TILE_Q,
    "kBwdTileK": CUDA_BWD_TILE_K,
    "kSm90TileQ": CUDA_SM90_TILE_Q,
    "kSm90TileK": CUDA_SM90_TILE_K,
}


def check_tile(name: str, tile: int) -> None:
    """Raise ValueError unless ``tile`` is a power of two in ``[16, SPARSE_BLOCK]`` (so it divides a sparse block)."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 16 or tile > SPARSE_BLOCK or tile & (tile - 1):
        raise ValueError(f"{name} must be a power of two in [16, {SPARSE_BLOCK}] (a part of a sparse block), got {tile!r}")


def cuda_header() -> str:
    """The text of ``csrc/attention/fba_tiles.h``."""
    lines = [
        "// GENERATED from swift_kernels/attention/tiles.py (its cuda_header()): do not edit.",
        "// Tile sizes of the CUDA attention kernels; tests/test_plan.py checks that this file equals the generated text.",
        "#pragma once",
        "",
        "namespace swift_kernels {",
        "namespace attention {",
        "",
    ]
    lines += [f"constexpr int {name} = {value};" for name, value in CUDA_CONSTANTS.items()]
    lines += [
        "",
        "// Every CTA owns one sparse block of rows, and its partner tiles divide a sparse block.",
        "static_assert(kFwdTileQ == kSparseBlock && kBwdTileK == kSparseBlock && kSm90TileQ == kSparseBlock,",
        '              "a CTA owns one sparse block");',
        "static_assert(kSparseBlock % kFwdTileK == 0 && kSparseBlock % kBwdTileQ == 0 && kSparseBlock % kSm90TileK == 0,",
        '              "partner tiles divide a sparse block");',
        "",
        "}  // namespace attention",
        "}  // namespace swift_kernels",
        "",
    ]
    return "\n".join(lines)

