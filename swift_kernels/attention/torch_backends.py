"""The PyTorch backends: the reference (``"torch"``), SDPA for dense plans, FlexAttention for block-sparse ones.

The reference follows our op's contract (:mod:`.reference`, given the plan's tables). SDPA and FlexAttention are
differentiable PyTorch ops, called directly (autograd and ``torch.compile`` handle them); they take and return
``[batch, tokens, heads, head_dim]`` like every backend, so outputs are transposed views made contiguous (free
for SDPA's flash and cuDNN kernels, which write that layout already). Their records are at the end.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .._registry import AttentionBackend
from . import reference
from .plan import AttentionPlan, KernelTables


def reference_forward(q, k, v, t: KernelTables, scale: float):
    """The reference forward on the plan's tables: ``(out, lse)``."""
    return reference.forward(q, k, v, t.mask_table.to("cpu", torch.bool), t.block_tokens, scale)


def reference_backward(dout, q, k, v, out, lse, t: KernelTables, scale: float):
    """The reference backward on the plan's tables: ``(dq, dk, dv)``."""
    return reference.backward(dout, q, k, v, out, lse, t.mask_table.to("cpu", torch.bool), t.block_tokens, scale)


def sdpa(q, k, v, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """``scaled_dot_product_attention`` over the plan's tokens (cuDNN or flash on a GPU, as PyTorch picks).

    A dense plan (the automatic use) needs no mask. A block-sparse plan, asked for explicitly, becomes a token
    mask of ``num_tokens**2`` booleans (small sequences only); its query rows with no allowed key give zeros,
    as in every backend (they are computed against all keys, then zeroed, so no NaN reaches the gradients).
    """
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    if plan.dense:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
        return out.transpose(1, 2).contiguous()
    mask = plan.block_mask.to(q.device)
    has_key = mask.any(dim=1)
    mask = mask | ~has_key[:, None]
    blocks = torch.arange(plan.num_tokens, device=q.device) // plan.block_tokens
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[blocks[:, None], blocks[None, :]], scale=scale)
    out = torch.where(has_key[blocks][None, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2).contiguous()


def flex_unsupported(head_dim: int, dtype: torch.dtype, device: torch.device):
    """Why FlexAttention cannot take these inputs (None when it can): its compiled GPU kernels take
    fp16/bf16/fp32 and head dims of at least 16."""
    if device.type == "cuda":
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return TypeError, f"dtype {dtype} on a GPU (FlexAttention takes fp16/bf16/fp32)"
        if head_dim < 16:
            return ValueError, f"head_dim {head_dim} on a GPU (FlexAttention needs >= 16)"
    return None


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Without torch.compile FlexAttention materialises the whole score matrix; compiled it is one fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def flex(q, k, v, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """FlexAttention with the plan's ``BlockMask`` (compiled on a GPU; eager, an unfused reference, on a CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    if q.device.type == "cpu" and not torch.is_grad_enabled():
        q, k, v = q.detach(), k.detach(), v.detach()  # FlexAttention on a CPU refuses inputs that require grad
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=plan.to_block_mask(), scale=scale)
    return out.transpose(1, 2).contiguous()


TORCH = AttentionBackend("torch", forward=reference_forward, backward=reference_backward)
SDPA = AttentionBackend("sdpa", forward=sdpa, differentiable=True, dense_first=True)
FLEX = AttentionBackend("flex", unsupported=flex_unsupported, forward=flex, differentiable=True, gpu_fallback=True)
