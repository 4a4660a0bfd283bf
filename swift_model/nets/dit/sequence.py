"""What a forward call's token sequence is: its attention plan and the RoPE frame position of each latent frame.

:func:`resolve_sequence` turns the call's ``attention_plan`` / ``layout`` / ``block_mask`` and ``frame_positions``
arguments into the plan every block shares and the positions as a tuple of Python numbers
(:func:`call_positions`): positions given as a sequence stay a tuple of Python numbers, the RoPE table's cache key
and what the anchor-cache check compares, with no tensor round trip; a tensor is copied to the host once.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

from swift_kernels import AttentionPlan, CSGLayout, plan_attention

# The block table of dense attention: one block holding the whole sequence.
_DENSE_TABLE = torch.ones(1, 1, dtype=torch.bool)


def frame_position_tuple(frame_positions: Sequence[int] | torch.Tensor, frames: int | None = None) -> tuple:
    """``frame_positions`` as a tuple of Python numbers (ints stay ints), checked to hold ``frames`` entries.

    A sequence (list, tuple, range, NumPy array) is read on the host; a tensor is read once (for a tensor on a
    GPU that is a device-to-host copy and a synchronisation). ``TypeError`` for anything but numbers.
    """
    if isinstance(frame_positions, torch.Tensor):
        values = frame_positions.detach().flatten().tolist()
    elif isinstance(frame_positions, (str, bytes)) or not hasattr(frame_positions, "__iter__"):
        raise TypeError(f"frame_positions must be numbers, got {frame_positions!r}")
    else:
        values = list(frame_positions)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"frame_positions must be numbers, got {frame_positions!r}")
    positions = tuple(int(v) if isinstance(v, numbers.Integral) else float(v) for v in values)
    if frames is not None and len(positions) != frames:
        raise ValueError(f"frame_positions must have {frames} entries (one per latent frame), got {len(positions)}")
    return positions


def call_positions(frame_positions, frames: int) -> tuple | torch.Tensor:
    """A call's ``frame_positions`` as it travels through the forward: a sequence as a tuple
    (:func:`frame_position_tuple`, read on the host), a tensor as a CPU tensor (copied to the host once, a
    synchronisation for a GPU tensor; its values are read where they are needed: :func:`position_tuple`)."""
    if not isinstance(frame_positions, torch.Tensor):
        return frame_position_tuple(frame_positions, frames)
    positions = frame_positions.detach().flatten().cpu()
    if positions.numel() != frames:
        raise ValueError(f"frame_positions must have {frames} entries (one per latent frame), got {positions.numel()}")
    return positions


def position_tuple(positions: tuple | torch.Tensor | None) -> tuple | None:
    """Positions from :func:`call_positions` as a tuple (a tensor's values read here; a tuple as it is)."""
    return frame_position_tuple(positions) if isinstance(positions, torch.Tensor) else positions


def resolve_sequence(frames: int, block_tokens: int, device, *, attention_plan: AttentionPlan | None,
                     layout: CSGLayout | None, block_mask: torch.Tensor | None, mask_block_tokens: int | None,
                     frame_positions) -> tuple[AttentionPlan, CSGLayout | None, tuple | None]:
    """``(plan, layout, positions)`` of a call on ``frames`` latent frames of ``block_tokens`` tokens each.

    Exactly one of ``attention_plan``, ``layout`` or ``block_mask`` (with ``mask_block_tokens``, default one frame)
    describes the attention; none means dense. ``layout`` is the call's layout or the plan's. ``positions``:
    ``frame_positions`` (:func:`call_positions`: a tuple for a sequence, a CPU tensor for a tensor), else the
    layout's ``block_ids`` (a CPU tensor) when the layout's blocks are latent frames, else ``None`` (``0..F-1``).
    """
    L = frames * block_tokens
    if attention_plan is not None:
        if not isinstance(attention_plan, AttentionPlan):
            raise TypeError(f"attention_plan must be an AttentionPlan, got {type(attention_plan).__name__}")
        if layout is not None or block_mask is not None or mask_block_tokens is not None:
            raise ValueError("pass one of attention_plan, layout or block_mask/block_tokens")
        if attention_plan.num_tokens != L:
            raise ValueError(f"attention_plan covers {attention_plan.num_tokens} tokens, the latents have {L}")
        if attention_plan.device != device:
            raise ValueError(f"attention_plan lives on {attention_plan.device}, the model on {device}")
        layout = attention_plan.layout
        if layout is not None and frame_positions is None and layout.block_tokens == block_tokens:
            frame_positions = layout.block_ids
        plan = attention_plan
    elif layout is not None:
        if not isinstance(layout, CSGLayout):
            raise TypeError(f"layout must be a CSGLayout, got {type(layout).__name__}")
        if block_mask is not None or mask_block_tokens is not None:
            raise ValueError("pass either layout or block_mask/block_tokens, not both")
        if layout.num_seq_blocks != frames or layout.block_tokens != block_tokens:
            raise ValueError(
                f"layout lays out {layout.num_seq_blocks} blocks of {layout.block_tokens} tokens, but the latents "
                f"have {frames} latent frames of {block_tokens} tokens"
            )
        if frame_positions is None:
            frame_positions = layout.block_ids
        plan = plan_attention(layout, device=device)
    elif block_mask is not None:
        plan = plan_attention(block_mask, block_tokens if mask_block_tokens is None else mask_block_tokens,
                              device=device)
    else:
        if mask_block_tokens is not None:
            raise ValueError("block_tokens needs a block_mask")
        plan = plan_attention(_DENSE_TABLE, L, device=device)
    positions = None if frame_positions is None else call_positions(frame_positions, frames)
    return plan, layout, positions
