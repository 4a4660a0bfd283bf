"""Spatial tiles of a VAE pass and the blending of their outputs, shared by every tiled decode and encode.

A latent of ``h x w`` is covered by overlapping rectangular tiles (:func:`spatial_tiles`, row-major). Each
tile is decoded (or encoded) on its own; its output is weighted by linear ramps over the overlaps with its
neighbours (:meth:`Tile.weight`) and summed into a host buffer by a :class:`TileBlender`, which divides by the
summed weights. The blender works in any order of tiles (a parallel decode adds tiles as ranks finish them)
and finalises each cell of the output (between tile edges) as soon as every tile covering it has been added, so
its float32 working memory is the tile being added and the overlaps still open, not the whole output.

Single-process and multi-process decodes use the same three pieces: ``tiles = spatial_tiles(...)``; each
worker runs its share (e.g. ``tiles[rank::world]``) through the VAE; one process calls
``blender.add(tile, out)`` for every tile and reads ``blender.result()``. Because the blend is a per-element
weighted sum, the result does not depend on which process decoded which tile; the order of the additions
only changes float32 rounding (the row-major order reproduces the one-process decode bit for bit).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Tile:
    """One spatial tile, in latent pixels: rows ``[y0, y1)``, columns ``[x0, x1)``.

    ``index`` is its position in :func:`spatial_tiles`' list, ``row``/``col`` its position in the grid; the
    ``blend_*`` fields are how far (latent pixels) its neighbours above, below, left and right overlap it,
    the lengths of its blend ramps.
    """

    index: int
    row: int
    col: int
    y0: int
    y1: int
    x0: int
    x1: int
    blend_top: int = 0
    blend_bottom: int = 0
    blend_left: int = 0
    blend_right: int = 0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    def weight(self, scale: int = 1) -> torch.Tensor:
        """Blend weights ``[height*scale, width*scale]`` (float32, CPU) of this tile's output at ``scale`` output
        pixels per latent pixel: 1 inside, linear ramps ``k/(n+1)`` over the overlaps."""
        wy = _ramp(self.height * scale, self.blend_top * scale, self.blend_bottom * scale)
        wx = _ramp(self.width * scale, self.blend_left * scale, self.blend_right * scale)
        return wy[:, None] * wx[None, :]


def _ramp(n: int, overlap_lo: int, overlap_hi: int) -> torch.Tensor:
    """Blend weights along one axis of a tile: linear ramps over the overlaps with its neighbours."""
    w = torch.ones(n)
    if overlap_lo > 0:
        w[:overlap_lo] = torch.arange(1, overlap_lo + 1, dtype=torch.float32) / (overlap_lo + 1)
    if overlap_hi > 0:
        w[n - overlap_hi:] = torch.minimum(
            w[n - overlap_hi:], torch.arange(overlap_hi, 0, -1, dtype=torch.float32) / (overlap_hi + 1))
    return w


def spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Overlapping ``[start, end)`` spans of length ``tile`` covering ``[0, size)`` with stride ``tile - overlap``
    (one span when it fits; the last span is moved back to end at ``size``)."""
    if size <= tile:
        return [(0, size)]
    stride = tile - overlap
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return [(s, s + tile) for s in starts]


def _pair(tile):
    return tile if isinstance(tile, tuple) and len(tile) == 2 else (tile, tile)


def check_tile(tile, overlap: int, split: tuple[bool, bool] = (True, True)) -> tuple[int, int]:
    """``(tile_h, tile_w)`` of ``tile`` (a side, or a pair of sides, in latent pixels), checked with ``overlap``:
    ``ValueError`` naming the argument unless the sides are positive ints and ``0 <= overlap < side`` for each
    side that is ``split`` (a side that covers the whole latent has no neighbour to overlap)."""
    pair = _pair(tile)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"VAE tiling: tile must be a positive int or a pair of them, got {tile!r}")
    shortest = min((v for v, s in zip(pair, split) if s), default=None)
    if (isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0
            or (shortest is not None and overlap >= shortest)):
        raise ValueError(f"VAE tiling: overlap must be an int in [0, tile={shortest}), got {overlap!r}")
    return pair


def spatial_tiles(height: int, width: int, tile, overlap: int) -> list[Tile]:
    """The tiles covering a ``height x width`` latent, row-major, with their blend overlaps.

    Args:
        height, width: latent size (latent pixels).
        tile: tile side (latent pixels), or ``(tile_h, tile_w)`` for rectangular tiles; a side that fits in one
            tile is not split.
        overlap: overlap of neighbouring tiles (latent pixels), ``0 <= overlap < tile`` (each side).
    """
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"VAE tiling: {name} must be a positive int, got {v!r}")
    # a side the latent fits in is not split: its overlap is never used, so it need not be shorter than it
    th, tw = check_tile(tile, overlap, split=(False, False))
    tile_h, tile_w = check_tile(tile, overlap, split=(height > th, width > tw))
    ys, xs = spans(height, tile_h, overlap), spans(width, tile_w, overlap)
    out = []
    for i, (y0, y1) in enumerate(ys):
        for j, (x0, x1) in enumerate(xs):
            out.append(Tile(len(out), i, j, y0, y1, x0, x1,
                            blend_top=ys[i - 1][1] - y0 if i > 0 else 0,
                            blend_bottom=y1 - ys[i + 1][0] if i + 1 < len(ys) else 0,
                            blend_left=xs[j - 1][1] - x0 if j > 0 else 0,
                            blend_right=x1 - xs[j + 1][0] if j + 1 < len(xs) else 0))
    return out


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[..., 3, F, H, W]`` floats in ``[-1, 1]`` -> uint8 ``[..., F, H, W, 3]`` (round to nearest)."""
    return ((x.movedim(-4, -1) + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


FINALISE_FRAMES = 8  # frames of a band weighted, divided or converted at once (bounds the blend's temporaries)


class TileBlender:
    """Sums tile outputs with their blend weights into one output on the host and finalises it cell by cell.

    The output is ``[B, C, F, H, W]`` float32 (``uint8=False``) or ``[B, F, H, W, C]`` uint8 (``uint8=True``,
    values in ``[-1, 1]`` mapped to ``0..255``), with ``H, W = latent size * scale``. The output is cut into cells
    at every tile edge (rows into bands, columns into spans); a cell keeps a float32 accumulator (and a weight
    sum) only from the first tile that touches it until the last tile covering it is added, then it is divided by
    its weight sum and written to the output. A cell that one tile alone covers (the inside of a tile, away from
    its overlaps) goes to the output straight from that tile's output, with the same arithmetic and no
    accumulator: the float32 working memory is the tile's output and the overlaps still open. Tiles may come in
    any order and from any process; each tile is added once.

    Args:
        tiles: the complete tiling (:func:`spatial_tiles`).
        batch, channels, frames: the leading sizes of every tile output ``[B, C, F, th*scale, tw*scale]``.
        scale: output pixels per latent pixel (the VAE's spatial factor for a decode, 1 for an encode).
        uint8: store finished cells as uint8 frames (a decode for video files) instead of float32.
    """

    def __init__(self, tiles: list[Tile], batch: int, channels: int, frames: int, *, scale: int = 1,
                 uint8: bool = False) -> None:
        if not tiles:
            raise ValueError("TileBlender: tiles must not be empty")
        self.tiles = list(tiles)
        self.scale = scale
        self.uint8 = uint8
        self.lead = (batch, channels, frames)
        self.height = max(t.y1 for t in self.tiles) * scale
        self.width = max(t.x1 for t in self.tiles) * scale
        if uint8:
            self.output = torch.empty(batch, frames, self.height, self.width, channels, dtype=torch.uint8)
        else:
            self.output = torch.empty(batch, channels, frames, self.height, self.width)
        rows = sorted({t.y0 * scale for t in self.tiles} | {t.y1 * scale for t in self.tiles})
        cols = sorted({t.x0 * scale for t in self.tiles} | {t.x1 * scale for t in self.tiles})
        self.bands = list(zip(rows[:-1], rows[1:]))  # output row spans; each inside every tile row it meets
        self.spans = list(zip(cols[:-1], cols[1:]))  # output column spans, likewise
        # For each cell (band, span): the indices of the tiles covering it (all must be added before it is final).
        self._cover = {(k, j): {t.index for t in self.tiles if t.y0 * scale < b1 and t.y1 * scale > b0
                                and t.x0 * scale < c1 and t.x1 * scale > c0}
                       for k, (b0, b1) in enumerate(self.bands) for j, (c0, c1) in enumerate(self.spans)}
        self._acc: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._added: set[int] = set()
        self._final: set[tuple[int, int]] = set()

    @property
    def complete(self) -> bool:
        """Whether every tile has been added (then the whole output is final)."""
        return len(self._final) == len(self._cover)

    def final_rows(self) -> list[tuple[int, int]]:
        """The output row spans ``[r0, r1)`` that are final across the whole width (no tile still to come
        covers them)."""
        return [b for k, b in enumerate(self.bands) if all((k, j) in self._final for j in range(len(self.spans)))]

    def add(self, tile: Tile, out: torch.Tensor) -> None:
        """Add one tile's output ``[B, C, F, th*scale, tw*scale]`` (float32; moved to the CPU if elsewhere),
        weighted by :meth:`Tile.weight`, and finalise the cells it completes."""
        if tile.index >= len(self.tiles) or self.tiles[tile.index] != tile:
            raise ValueError(f"TileBlender.add: tile {tile} is not part of this tiling")
        if tile.index in self._added:
            raise ValueError(f"TileBlender.add: tile {tile.index} was already added")
        s = self.scale
        want = (*self.lead, tile.height * s, tile.width * s)
        if tuple(out.shape) != want:
            raise ValueError(f"TileBlender.add: tile {tile.index} output must be {want}, got {tuple(out.shape)}")
        out = out.to("cpu", torch.float32)
        wt = tile.weight(s)
        ty0, tx0 = tile.y0 * s, tile.x0 * s
        self._added.add(tile.index)
        for (k, j), cover in self._cover.items():
            if tile.index not in cover:
                continue
            (b0, b1), (c0, c1) = self.bands[k], self.spans[j]
            w = wt[b0 - ty0:b1 - ty0, c0 - tx0:c1 - tx0]
            src = out[..., b0 - ty0:b1 - ty0, c0 - tx0:c1 - tx0]
            if cover == {tile.index}:
                # this tile alone: (0 + out * w) / (0 + w), what an accumulator would hold, without one
                self._write(k, j, lambda f0, f1, src=src, w=w: (src[:, :, f0:f1] * w) / w)
                continue
            if (k, j) not in self._acc:
                self._acc[k, j] = (torch.zeros(*self.lead, b1 - b0, c1 - c0), torch.zeros(b1 - b0, c1 - c0))
            acc, wsum = self._acc[k, j]
            # a few frames at a time: the product is a temporary the size of what it sees (the same sums, in the
            # same order, as one whole-tile product)
            for f0 in range(0, acc.shape[2], FINALISE_FRAMES):
                acc[:, :, f0:f0 + FINALISE_FRAMES] += src[:, :, f0:f0 + FINALISE_FRAMES] * w
            wsum += w
            if cover <= self._added:
                acc, wsum = self._acc.pop((k, j))
                self._write(k, j, lambda f0, f1, acc=acc, wsum=wsum: acc[:, :, f0:f1] / wsum)

    def _write(self, k: int, j: int, values) -> None:
        """Write cell ``(k, j)`` to the output, ``values(f0, f1)`` giving its float32 frames ``[f0, f1)``: a few
        frames at a time, so that the division and the conversion make small temporaries (a cell may be every
        row of an 81-frame 2K clip, 3.3 GiB in float32)."""
        (b0, b1), (c0, c1) = self.bands[k], self.spans[j]
        for f0 in range(0, self.lead[2], FINALISE_FRAMES):
            f1 = f0 + FINALISE_FRAMES
            if self.uint8:
                self.output[:, f0:f1, b0:b1, c0:c1] = to_uint8(values(f0, f1))
            else:
                self.output[:, :, f0:f1, b0:b1, c0:c1] = values(f0, f1)
        self._final.add((k, j))

    def result(self) -> torch.Tensor:
        """The blended output (see the class docstring); ``RuntimeError`` before every tile has been added."""
        if not self.complete:
            missing = sorted(t.index for t in self.tiles if t.index not in self._added)
            raise RuntimeError(f"TileBlender.result: tiles {missing} have not been added")
        return self.output
