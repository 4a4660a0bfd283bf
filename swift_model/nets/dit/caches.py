"""What the DiT computes once and reuses across calls: the cross-attention keys/values of a conditioning
(:class:`ContextCache`) and a shared anchor's self-attention keys/values and output (:class:`AnchorCache`), with
the check that an anchor cache is exact for a call (:func:`check_anchor_cache`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swift_kernels import CSGLayout

from .conditioning import DeviceFrameTimesteps, FrameTimesteps
from .sequence import position_tuple


@dataclass
class ContextCache:
    """Cross-attention keys/values of every block for one text (and image) conditioning.

    ``kv[i] = (k, v, k_img, v_img)`` with ``k, v`` ``[B, text_len, H, D]`` (``k_img``/``v_img`` ``None``
    without image tokens). Reusable across steps and CSG segments with the same conditioning.
    """

    kv: list
    batch: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class AnchorCache:
    """A shared anchor's self-attention keys/values in every block, and its output (:meth:`WanDiT.precompute_anchor`).

    Valid for calls whose sequence starts with these anchor blocks and whose layout lets them attend only
    themselves (``CSGLayout(anchor_attends="anchor")``, one shared anchor): the anchor's tokens then depend on
    nothing else, so their keys and values are the same in every window and step with the same conditioning.

    Attributes:
        kv: per block ``(k, v)`` ``[B, n, H, D]`` (``n = blocks * block_tokens``), after norm and RoPE.
        output: the anchor blocks' model output ``[B, C_out, blocks, H, W]``.
        latents: the anchor blocks' input ``[B, C_in, blocks, H, W]`` (a call must bring the same).
        positions: the anchors' RoPE frame positions.
        context_cache: the :class:`ContextCache` it was built with (a call must pass the same object).
        check_latents: whether a call's anchor blocks are compared with :attr:`latents` (``torch.equal``: a read
            of device data, a synchronisation on a GPU). The builder turns it off when the calls bring the anchor
            input by construction (the CSG loop never modifies the anchor block); the other checks (layout,
            positions, timesteps, conditioning, shapes) stay.
    """

    kv: list
    output: torch.Tensor
    latents: torch.Tensor
    positions: tuple[int, ...]
    context_cache: ContextCache
    check_latents: bool = True

    @property
    def blocks(self) -> int:
        """Anchor blocks (latent frames)."""
        return self.latents.shape[2]


def starts_with_shared_anchor(layout: CSGLayout | None, blocks: int) -> bool:
    """Whether ``layout``'s sequence starts with ``blocks`` anchor blocks attending only themselves and holds no
    other anchor block, read from the layout's parameters (no tensor is read).

    The anchor blocks of a layout's sequence are its ``anchor_blocks`` leading blocks, and, in ``"packed"`` mode
    with ``anchor_copies``, a copy at the start of every packed window: one window's copy is the one shared anchor.
    """
    if layout is None or layout.anchor_attends != "anchor" or layout.anchor_blocks != blocks:
        return False
    copies = layout.mode == "packed" and layout.anchor_copies and layout.num_segments > 0
    return not copies or blocks == 0 or len(layout.segments) == 1


def _anchor_timestep_is_zero(timestep, latents: torch.Tensor, blocks: int, block_tokens: int) -> bool:
    """Whether the call's anchor blocks carry timestep 0: on the host for :class:`FrameTimesteps` (and the host
    structure of :class:`DeviceFrameTimesteps`, whose caller keeps its device values to that structure), else by
    reading the tensor (``ValueError`` unless it is per token or per frame)."""
    if isinstance(timestep, DeviceFrameTimesteps):
        timestep = timestep.frames
    if isinstance(timestep, FrameTimesteps):
        return all(v == 0 for v in timestep.values[:blocks])
    t = torch.as_tensor(timestep, device=latents.device)
    if t.dim() != 2 or t.shape[1] not in (latents.shape[2] * block_tokens, latents.shape[2]):
        raise ValueError("with anchor_cache, timestep must be per token or per frame (0 on the anchor)")
    return not bool((t[:, :blocks * block_tokens] if t.shape[1] != latents.shape[2] else t[:, :blocks]).ne(0).any())


def check_anchor_cache(cache, layout: CSGLayout | None, latents: torch.Tensor, timestep,
                       positions: tuple | None, context_cache, sp_group, block_tokens: int) -> int:
    """Raise unless ``cache`` is exact for a call; return the anchor's token count.

    ``positions``: the call's frame positions, a tuple or a CPU tensor (or ``None``). With
    :class:`FrameTimesteps`, tuple positions and a cache built with ``check_latents=False`` nothing here reads
    tensor data.
    """
    if not isinstance(cache, AnchorCache):
        raise TypeError(f"anchor_cache must come from precompute_anchor, got {type(cache).__name__}")
    if sp_group is not None:
        raise ValueError("anchor_cache does not combine with sp_group")
    A = cache.blocks
    if not starts_with_shared_anchor(layout, A):
        raise ValueError("anchor_cache needs a layout whose sequence starts with the one shared anchor, attending "
                         "only itself (CSGLayout(anchor_attends='anchor'), no anchor copies)")
    if context_cache is not cache.context_cache:
        raise ValueError("anchor_cache was built with another context_cache (the anchor depends on the conditioning)")
    head = latents[:, :, :A]
    if head.shape[1:] != cache.latents.shape[1:] or cache.latents.shape[0] not in (1, latents.shape[0]) \
            or cache.check_latents and not torch.equal(head, cache.latents.expand_as(head).to(head.dtype)):
        raise ValueError("the sequence's anchor blocks differ from the ones anchor_cache was built from")
    positions = position_tuple(positions)
    if positions is None or positions[:A] != cache.positions:
        raise ValueError(f"the anchors' frame positions must be {cache.positions} as in anchor_cache")
    if not _anchor_timestep_is_zero(timestep, latents, A, block_tokens):
        raise ValueError("with anchor_cache the anchor's timestep must be 0 (it is clean)")
    return A * block_tokens
