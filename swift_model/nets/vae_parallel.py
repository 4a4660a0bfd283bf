"""The VAE's spatial tiles spread over the ranks of a process group: parallel decode and encode.

A tiled VAE pass (:meth:`WanVAE.spatial_tiles <swift_model.nets.vae.WanVAE.spatial_tiles>`) is embarrassingly
parallel: every tile is decoded (or encoded) on its own and only the blend joins them. Rank ``r`` of ``W``
runs ``tiles[r::W]``; each finished tile goes to rank 0, which adds every tile to one
:class:`~swift_model.nets.vae_tiling.TileBlender` in the tiles' own (row-major) order, whichever rank made it. The
tiles, their split and the order of the additions are the same as in one process, so the result is bitwise the
one-process tiled pass (tested at 2 and 4 ranks).

Transport: point-to-point. The shape of every tile's output follows from the tile alone, so rank 0 posts a
receive of the right size for each tile, in tile order, and no shapes are exchanged; a sender keeps at most
two tiles in flight (the host holds two tiles, not its whole share). With NCCL the tiles travel through the
device (one tile at a time); with gloo through the host. Untested on GPUs.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable

import torch
import torch.distributed as dist

__all__ = ["blend_on_rank0", "decode", "decode_uint8", "encode"]

_IN_FLIGHT = 2  # tiles a sender may have posted and not yet seen received


def _comm_device(group) -> torch.device:
    """Where tensors must be for the group's backend: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def blend_on_rank0(tiles: list, run: Callable[[list], Iterable], shape_of: Callable, blender, group,
                   *, progress: bool = False, desc: str = "VAE tiles") -> bool:
    """Run ``tiles`` split over ``group`` and add every output to ``blender`` on the group's rank 0.

    Args:
        tiles: the whole tiling, in order (:func:`swift_model.nets.vae_tiling.spatial_tiles`).
        run: ``run(subset)`` yields ``(tile, output)`` for the tiles of ``subset``, in its order (e.g.
            ``lambda s: vae.decode_tiles(z, s)``); outputs float32 on the CPU.
        shape_of: ``shape_of(tile)``: the shape of that tile's output (the receiver allocates it).
        blender: a :class:`~swift_model.nets.vae_tiling.TileBlender` (only rank 0's is used).
        group: the process group (every rank calls this with the same tiles); ``None``: one process.
        progress: a tqdm bar of tiles on rank 0 (``desc`` its label).

    Returns whether this rank holds the blended result (rank 0). A collective over ``group``.
    """
    from tqdm.auto import tqdm

    W = _size(group)
    rank = 0 if group is None else dist.get_rank(group)
    mine = iter(run(tiles[rank::W]))
    if rank == 0:
        bar = tqdm(total=len(tiles), desc=desc, unit="tile", disable=not progress, dynamic_ncols=True)
        try:
            dev = None if W == 1 else _comm_device(group)
            for i, tile in enumerate(tiles):  # the one-process order of the additions: bitwise the same blend
                owner = i % W
                if owner == 0:
                    got, out = next(mine)
                    if got != tile:
                        raise RuntimeError(f"parallel VAE: rank 0 produced {got} where {tile} was due")
                else:
                    buf = torch.empty(shape_of(tile), dtype=torch.float32, device=dev)
                    dist.recv(buf, src=dist.get_global_rank(group, owner), group=group)
                    out = buf.cpu()
                blender.add(tile, out)
                del out  # one tile's clip on the host at a time
                bar.update(1)
        finally:
            bar.close()
        return True
    dev = _comm_device(group)
    dst = dist.get_global_rank(group, 0)
    pending: deque = deque()
    for _, out in mine:
        if len(pending) >= _IN_FLIGHT:
            pending.popleft().wait()  # and its buffer is freed
        buf = out.to(dev, torch.float32).contiguous()
        pending.append(_Sent(dist.isend(buf, dst=dst, group=group), buf))
    while pending:
        pending.popleft().wait()
    return False


class _Sent:
    """A posted send and the buffer it reads, which must live until the send completes."""

    def __init__(self, work, buf) -> None:
        self.work, self.buf = work, buf

    def wait(self) -> None:
        self.work.wait()
        self.buf = None


def decode_uint8(vae, z: torch.Tensor, group=None, *, progress: bool = False) -> torch.Tensor | None:
    """uint8 frames ``[F, H, W, 3]`` of the first sample of normalised latents ``z``, decoded tile by tile over
    the ranks of ``group`` (every rank passes the same ``z``): the result on rank 0, ``None`` on the others.

    Bitwise :meth:`WanVAE.decode_uint8 <swift_model.nets.vae.WanVAE.decode_uint8>` of one process. ``group=None``:
    one process.
    """
    return _decode(vae, z[:1], group, uint8=True, progress=progress)


def decode(vae, z: torch.Tensor, group=None, *, progress: bool = False) -> torch.Tensor | None:
    """The decoded video ``[B, 3, F, H, W]`` (float32, CPU, in ``[-1, 1]``) on rank 0 (``None`` elsewhere),
    decoded tile by tile over the ranks of ``group``; bitwise the one-process :meth:`WanVAE.decode`."""
    return _decode(vae, z, group, uint8=False, progress=progress)


def _decode(vae, z, group, *, uint8: bool, progress: bool):
    if not isinstance(z, torch.Tensor) or z.dim() != 5:
        raise ValueError(f"parallel VAE decode: z must be [B, C, T, h, w], got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    blender = vae.decode_blender(tuple(z.shape), uint8=uint8)
    B, F, sf = z.shape[0], vae.num_frames(z.shape[2]), vae.spatial_factor

    def shape_of(tile):
        return (B, 3, F, tile.height * sf, tile.width * sf)

    is_root = blend_on_rank0(blender.tiles, lambda subset: vae.decode_tiles(z, subset), shape_of, blender, group,
                             progress=progress, desc="decode")
    if not is_root:
        return None
    out = blender.result()
    return out[0] if uint8 else out


def encode(vae, video: torch.Tensor, group=None) -> torch.Tensor:
    """Normalised latents of ``video`` ``[B, 3, F, H, W]`` on every rank of ``group`` (on the VAE's device).

    A video the VAE encodes tiled (:meth:`WanVAE.encode_is_tiled <swift_model.nets.vae.WanVAE.encode_is_tiled>`,
    the 2K reference of the bridge) is encoded tile by tile over the ranks, blended on rank 0 and sent to
    every rank: bitwise the one-process :meth:`WanVAE.encode`. A smaller one is encoded whole by every rank,
    as one process does. Every rank passes the same ``video``.
    """
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"parallel VAE encode: video must be [B, 3, F, H, W], got "
                         f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}")
    B, _, F, H, W = video.shape
    vae.check_size(F, H, W)  # before any tile runs: an error then stops every rank at once, not mid-exchange
    if _size(group) == 1 or not vae.encode_is_tiled(H, W):
        return vae.encode(video)
    blender = vae.encode_blender(tuple(video.shape))
    B, C, T, h, w = blender.output.shape
    is_root = blend_on_rank0(blender.tiles, lambda subset: vae.encode_tiles(video, subset),
                             lambda t: (B, C, T, t.height, t.width), blender, group)
    dev = _comm_device(group)
    z = blender.result().to(dev) if is_root else torch.empty(B, C, T, h, w, device=dev)
    dist.broadcast(z, src=dist.get_global_rank(group, 0), group=group)
    return z.to(vae.device)
