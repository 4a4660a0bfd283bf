"""The ``"cuda"`` backend of frame-block-sparse attention: the compiled extension ``swift_kernels._C``.

The kernels (``csrc/attention/``) are FlashAttention-2 style ``mma.sync`` kernels for sm_80 and newer
(Ampere, Ada, and Hopper through the sm_90a build): fp16 and bf16, head_dim 64 and 128, forward and
backward. A Hopper-specific forward (``fwd_sm90``: TMA loads by a producer warp, ``wgmma`` products by two
consumer warpgroups, 128 x 128 tiles) is compiled into the sm_90a build (``_C.HAS_SM90``). It runs on a
compute capability 9.0 device when ``SWIFT_KERNELS_HOPPER=1`` asks for it, or when it is verified for that
device and this torch (:mod:`swift_kernels.verified`, op ``frame_block_attention``, backend ``cuda-sm90``) or
``SWIFT_KERNELS_UNVERIFIED=1`` is set, unless ``SWIFT_KERNELS_HOPPER=0`` forbids it (the variables are read at
every call). The backward always runs the ``mma.sync`` kernels; it needs only the forward's ``lse``, which both
forwards define identically.

Every kernel reads the plan's tables (:class:`~swift_kernels.attention.plan.KernelTables`, FlexAttention's
``BlockMask`` layout over sparse blocks of 128 tokens): the forward and the dQ kernel walk the ``kv_*`` rows
(one CTA per query sparse block), the dK/dV kernel the ``q_*`` rows (one CTA per key sparse block). The tile
sizes come from :mod:`swift_kernels.attention.tiles`, which the C++ code reads through the generated
``fba_tiles.h``; the extension reports its own (``_C.TILES``) and :func:`check_extension_tiles` refuses an
extension that disagrees.

Work order: a kernel's grid is (sparse block, batch * heads) with the block index fastest, so the CTAs
running at one time are neighbouring blocks of one head; they read mostly the same key (or query) tiles, and
the anchor block, which every row reads, stays in L2.

Backend contract: ``forward(q, k, v, tables, scale) -> (out, lse)``, ``backward(dout, q, k, v, out, lse,
tables, scale) -> (dq, dk, dv)``, ``unsupported(head_dim, dtype, device)``; inputs are validated by
:mod:`swift_kernels.attention.api` (and again, cheaply, by the extension's own checks). Its record,
:data:`CUDA`, is at the end: available where :func:`~swift_kernels._backend.extension_unavailable` says so,
with the Hopper forward as its variant ``"cuda-sm90"``.
"""

from __future__ import annotations

import functools
import os

import torch

from .._backend import (
    BackendUnavailableError, device_capability, extension, extension_unavailable, is_verified_here, unverified_allowed,
)
from .._registry import AttentionBackend
from . import tiles
from .plan import KernelTables

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
HOPPER_ENV = "SWIFT_KERNELS_HOPPER"


def unsupported(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[type[Exception], str] | None:
    """Why the extension cannot take inputs of this head_dim and dtype (None when it can)."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return ValueError, f"head_dim {head_dim} (supported: {SUPPORTED_HEAD_DIMS})"
    if dtype not in SUPPORTED_DTYPES:
        return TypeError, f"dtype {dtype} (supported: {SUPPORTED_DTYPES})"
    return None


@functools.lru_cache(maxsize=None)
def check_extension_tiles() -> None:
    """Raise BackendUnavailableError unless the extension's tile sizes are those of :mod:`.tiles`."""
    ext = extension()
    theirs = dict(getattr(ext, "TILES", {}))
    if theirs != tiles.CUDA_CONSTANTS:
        raise BackendUnavailableError(
            f"swift_kernels._C was built with tile sizes {theirs or 'of an older version'}, but this package "
            f"expects {tiles.CUDA_CONSTANTS}: rebuild it (pip install --no-build-isolation .)"
        )


def forward_variant(device: torch.device) -> str:
    """``"cuda-sm90"`` when the forward on ``device`` takes the Hopper kernel, else ``"cuda"`` (see the module
    docstring for when)."""
    flag = os.environ.get(HOPPER_ENV, "")
    if flag == "0" or not getattr(extension(), "HAS_SM90", False) or device_capability(device) != (9, 0):
        return "cuda"
    if flag == "1" or unverified_allowed() or is_verified_here("frame_block_attention", "cuda-sm90", device):
        return "cuda-sm90"
    return "cuda"


def forward(q, k, v, t: KernelTables, scale, *, hopper: bool = False):
    """Forward: ``(out [B, L, H, D] in q.dtype, lse fp32 [B, H, L])`` (natural-log log-sum-exp)."""
    check_extension_tiles()
    ext = extension()
    return (ext.fwd_sm90 if hopper else ext.fwd)(
        q, k, v, t.mask_table, int(t.block_tokens), float(scale), t.kv_num, t.kv_idx, t.full_kv_num, t.full_kv_idx,
    )


def forward_sm90(q, k, v, t: KernelTables, scale):
    """The Hopper forward (``fwd_sm90``), same contract as :func:`forward`."""
    return forward(q, k, v, t, scale, hopper=True)


def backward_missing() -> str | None:
    """Why this build has no backward kernels (``None`` when it has them)."""
    # An extension built with SWIFT_KERNELS_NO_BACKWARD=1 has forward kernels only; every backward consumes the
    # same (out, natural-log lse) contract, so the reference's takes over.
    if getattr(extension(), "HAS_BACKWARD", True):
        return None
    return "the CUDA extension has no backward kernels"


def backward(dout, q, k, v, out, lse, t: KernelTables, scale):
    """Backward: ``(dq, dk, dv)`` in the input dtype; rows with ``lse = -inf`` contribute nothing."""
    check_extension_tiles()
    ext = extension()
    if not getattr(ext, "HAS_BACKWARD", False):
        raise NotImplementedError(
            "the extension swift_kernels._C was built with SWIFT_KERNELS_NO_BACKWARD=1 and has no backward; "
            "use backend='triton' or 'torch' for gradients, or rebuild without that flag"
        )
    return ext.bwd(
        dout, q, k, v, out, lse, t.mask_table, int(t.block_tokens), float(scale),
        t.kv_num, t.kv_idx, t.full_kv_num, t.full_kv_idx, t.q_num, t.q_idx, t.full_q_num, t.full_q_idx,
    )


CUDA = AttentionBackend(
    "cuda", unavailable=extension_unavailable, unsupported=unsupported, forward=forward, backward=backward,
    backward_missing=backward_missing, custom=True, rank=2, variant=forward_variant,
    variants={"cuda-sm90": forward_sm90},
)
