"""The ``"cuda"`` backend of frame-block-sparse attention: the compiled extension ``swift_kernels._C``.

The kernels (``csrc/attention/``) are FlashAttention-2 style ``mma.sync`` kernels for sm_80 and newer
(Ampere, Ada, and Hopper through the sm_90a build): fp16 and bf16, head_dim 64 and 128, forward and
backward. A Hopper-specific forward (``fwd_sm90``: TMA loads by a producer warp, ``wgmma`` products by two
consumer warpgroups, 128 x 128 tiles) is compiled into the sm_90a build (``_C.HAS_SM90``) but is OPT-IN
until it has been verified on a GPU: it is used only on a compute capability 9.x device when the
environment variable ``SWIFT_KERNELS_HOPPER=1`` is set (read at every call). Once its GPU tests pass, the
default flips to using it on Hopper. The backward always runs the ``mma.sync`` kernels; it needs only the
forward's ``lse``, which both forwards define identically.

They are driven by the CSR tile schedule of :mod:`swift_kernels.attention.schedule`, built (and cached)
here with the tile sizes the extension reports:

* the forward and the dQ kernel walk ``schedule.by_query`` of a schedule with ``_C.tile_sizes(D)``
  (128-token query tiles, 64-token key tiles);
* the dK/dV kernel walks ``schedule.by_key`` of a schedule with ``_C.bwd_tile_sizes(D)`` (64-token query
  tiles, 128-token key tiles), so each CTA owns 128 keys.

Work order: a kernel's grid is (tile, batch * heads) with the tile index fastest, so the CTAs running at
one time are neighbouring tiles of one head; they read mostly the same key (or query) tiles, and the
anchor block, which every tile reads, stays in L2.

This module follows the backend contract of :mod:`swift_kernels.attention.api`.
"""

from __future__ import annotations

import os

import torch

from .._backend import extension
from .schedule import get_schedule

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block_tokens: int) -> None:
    if q.device.type != "cuda":
        raise ValueError(f"q must be a CUDA tensor for the cuda backend, got device {q.device}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q must be float16 or bfloat16 for the cuda backend, got {q.dtype}")
    if q.dim() != 4 or q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q must be [batch, tokens, heads, head_dim] with head_dim in {SUPPORTED_HEAD_DIMS}, got {tuple(q.shape)}")
    if block_mask.dim() != 2 or block_mask.shape[0] != block_mask.shape[1]:
        raise ValueError(f"block_mask must be a square [n_blocks, n_blocks] table, got {tuple(block_mask.shape)}")
    if q.shape[1] != block_mask.shape[0] * block_tokens:
        raise ValueError(
            f"q has {q.shape[1]} tokens but block_mask has {block_mask.shape[0]} blocks of {block_tokens} tokens"
        )


def _use_hopper(ext, q: torch.Tensor) -> bool:
    """Whether the forward takes the sm_90a kernel: opt-in (``SWIFT_KERNELS_HOPPER=1``), built, on a 9.x device."""
    if os.environ.get("SWIFT_KERNELS_HOPPER", "0") != "1" or not getattr(ext, "HAS_SM90", False):
        return False
    return torch.cuda.get_device_capability(q.device)[0] == 9


def forward(q, k, v, block_mask, block_tokens, scale):
    """Forward: ``(out [B, L, H, D] in q.dtype, lse fp32 [B, H, L])`` (natural-log log-sum-exp)."""
    _check(q, k, v, block_mask, block_tokens)
    ext = extension()
    hopper = _use_hopper(ext, q)
    tile_q, tile_k = (ext.sm90_tile_sizes if hopper else ext.tile_sizes)(q.shape[-1])
    schedule = get_schedule(block_mask, block_tokens, q.shape[1], tile_q, tile_k, q.device)
    sched = schedule.by_query
    return (ext.fwd_sm90 if hopper else ext.fwd)(
        q, k, v, schedule.mask_table, int(block_tokens), float(scale),
        sched.indptr, sched.num_full, sched.indices,
    )


def backward(dout, q, k, v, out, lse, block_mask, block_tokens, scale):
    """Backward: ``(dq, dk, dv)`` in the input dtype; rows with ``lse = -inf`` contribute nothing."""
    _check(q, k, v, block_mask, block_tokens)
    ext = extension()
    if not getattr(ext, "HAS_BACKWARD", False):
        raise NotImplementedError(
            "the extension swift_kernels._C was built with SWIFT_KERNELS_NO_BACKWARD=1 and has no backward; "
            "use backend='triton' or 'torch' for gradients, or rebuild without that flag"
        )
    head_dim = q.shape[-1]
    fq, fk = ext.tile_sizes(head_dim)
    bq, bk = ext.bwd_tile_sizes(head_dim)
    fwd_schedule = get_schedule(block_mask, block_tokens, q.shape[1], fq, fk, q.device)
    by_query = fwd_schedule.by_query
    by_key = get_schedule(block_mask, block_tokens, q.shape[1], bq, bk, q.device).by_key
    return ext.bwd(
        dout, q, k, v, out, lse, fwd_schedule.mask_table, int(block_tokens), float(scale),
        by_query.indptr, by_query.num_full, by_query.indices,
        by_key.indptr, by_key.num_full, by_key.indices,
    )
