"""The shape of a VAE pass's tiles, chosen from a device budget rather than fixed (nets layer).

A tiled VAE pass computes every latent pixel its tiles cover: with overlaps, the pixels of the overlaps are
computed twice (or four times at a corner), so the work of a pass is its computed area, the sum of its tiles'
areas. The device working set of a tile is the causal caches and one temporal chunk's activations of the tile,
and both are proportional to the tile's area (measured: constant per latent pixel to within 1% from 8x8 to
88x160 latent pixels for the public Wan decoders and encoders). So the cheapest tiling that fits a budget is
the one with the least computed area whose tiles each hold at most ``budget / bytes per latent pixel`` pixels:
:func:`fit_tiles` finds it, and when a whole frame fits it is one tile, a plain causal decode (or encode) in
temporal chunks of whole frames, with no overlap at all.

:meth:`WanVAE.work_bytes_per_pixel <swift_model.nets.vae.WanVAE.work_bytes_per_pixel>` gives the bytes per latent
pixel: it runs a pass on a small tile of a copy of the VAE's architecture on the ``meta`` device (shapes only: no
memory, no data) and counts the peak of the bytes alive at once
(:class:`~swift_model.nets.live_storage.LiveStorageTracker`, to the byte), and the largest tensor per latent pixel,
which caps a tile's area at :data:`MAX_TENSOR_ELEMENTS`. Every figure is an **estimate**: the caching allocator's
fragmentation and library workspaces are not counted.
"""

from __future__ import annotations

import functools
import math

from .vae_tiling import spans

__all__ = ["MAX_TENSOR_ELEMENTS", "fit_tiles", "tiling_cost"]

# The most elements one tensor of a tiled pass may have. A CUDA convolution whose input or output needs 64-bit
# indexing is split along the batch to fit 32-bit indexing; with a batch of one it cannot be, and PyTorch then
# leaves cuDNN for a slow fallback (or fails). The 2K frame is past it for the Wan2.2 decoder: its top stage's
# padded causal-conv input is 512 x 6 x 706 x 1282 elements (2.8e9), so a whole 2560x1408 frame is never one
# tile, whatever the memory budget.
MAX_TENSOR_ELEMENTS = 2**31 - 1


def _axis_options(size: int, overlap: int, max_side: int | None) -> list[tuple[int, int]]:
    """``(side, count)`` for every way of cutting an axis of ``size`` latent pixels into ``count`` overlapping
    spans of ``side`` (the shortest side that needs ``count`` spans), with ``side <= max_side``."""
    options = {}
    for n in range(1, size + 1):
        side = size if n == 1 else math.ceil((size + (n - 1) * overlap) / n)
        if n > 1 and side <= overlap:
            break  # shorter spans would not advance
        if max_side is not None and side > max_side:
            continue
        count = len(spans(size, side, overlap))
        options.setdefault(side, count)
    return sorted(options.items())


def tiling_cost(height: int, width: int, tile: tuple[int, int], overlap: int) -> int:
    """The computed area of a tiling (latent pixels): the sum of its tiles' areas, ``height * width`` untiled."""
    th, tw = tile
    return len(spans(height, th, overlap)) * th * len(spans(width, tw, overlap)) * tw


@functools.lru_cache(maxsize=256)  # the same pass asks for its tiles a few times: search once
def fit_tiles(height: int, width: int, *, overlap: int, max_pixels: int,
              max_side: int | None = None) -> tuple[int, int]:
    """The tile shape ``(tile_h, tile_w)`` (latent pixels) of the cheapest tiling whose tiles fit a budget.

    Among the tilings of a ``height x width`` latent by :func:`~swift_model.nets.vae_tiling.spatial_tiles` with
    the given ``overlap``, those whose tiles hold at most ``max_pixels`` latent pixels (and whose sides are at
    most ``max_side``, when given), it picks the one with the least computed area (:func:`tiling_cost`), then
    the fewest tiles, then the widest tiles (full-width rows keep the blend's host band short). When the whole
    frame fits, that is ``(height, width)``: one tile, no overlap, no blend. The choice depends on the budget
    alone, not on how many processes share the tiles, so a parallel pass blends the same tiles as one process.

    Args:
        height, width: the latent's size (latent pixels).
        overlap: the overlap of neighbouring tiles (latent pixels), as the blend uses it.
        max_pixels: the most latent pixels a tile may hold: the device budget of the pass over its bytes per
            latent pixel (``WanVAE.work_bytes_per_pixel``).
        max_side: an upper bound on either side, or ``None``.

    Raises ``ValueError`` naming the argument when an argument is not a positive int (``overlap`` and
    ``max_side`` aside) or when no tiling fits (``max_pixels`` below the smallest tile the overlap allows).
    """
    for name, v in (("height", height), ("width", width), ("max_pixels", max_pixels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"VAE tile geometry: {name} must be a positive int, got {v!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"VAE tile geometry: overlap must be an int >= 0, got {overlap!r}")
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
        raise ValueError(f"VAE tile geometry: max_side must be a positive int or None, got {max_side!r}")
    best, best_key = None, None
    for th, ny in _axis_options(height, overlap, max_side):
        for tw, nx in _axis_options(width, overlap, max_side):
            if th * tw > max_pixels:
                continue
            n = ny * nx
            key = (n * th * tw, n, -tw)
            if best_key is None or key < best_key:
                best, best_key = (th, tw), key
    if best is None:
        raise ValueError(f"VAE tile geometry: no tiling of a {height}x{width} latent with overlap {overlap} has tiles "
                         f"of at most max_pixels={max_pixels} latent pixels"
                         + (f" and sides of at most max_side={max_side}" if max_side is not None else "")
                         + ": the VAE's device budget is too small")
    return best


