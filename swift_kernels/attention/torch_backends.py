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


# -- FlexAttention ------------------------------------------------------------------------------------------------
#
# On a GPU FlexAttention must run compiled: eager it materialises the whole score matrix (at a 2K Stage II window of
# 73,920 tokens, hundreds of GB). torch.compile specialises on shapes and, past its recompile limit, silently runs
# the function eagerly. So the compiled call runs with that fallback turned into an error, and this module keeps
# the set of shapes compiled in the process and refuses a new one past FLEX_MAX_SHAPES with a message that says
# what to do, before torch.compile's own limit is reached.

FLEX_MAX_SHAPES = 32  # distinct attention shapes one process compiles FlexAttention for
FLEX_EAGER_MAX_SCORE_BYTES = 4 << 30  # eager FlexAttention (CPU) materialises batch x heads x Nq x Nk fp32 scores
_flex_shapes: set = set()
# Tests only: run the GPU's compiled path on CPU tensors (CPU inductor), to trace what a GPU would compile.
COMPILED_ON_CPU = False


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # one compiled function: dynamo keeps one graph per shape (its guards), reused on every later call
    return torch.compile(flex_attention, dynamic=False)


def flex_shared_memory_fwd(block_m: int, block_n: int, head_dim: int, stages: int, element_bytes: int) -> int:
    """Estimated shared memory of FlexAttention's forward kernel: the query tile, plus a key and a value tile per
    pipeline stage (Triton's software pipelining buffers ``stages`` of them)."""
    return block_m * head_dim * element_bytes + stages * 2 * block_n * head_dim * element_bytes


# shared memory a block may opt in to, by compute capability, where the device does not say (CUDA programming
# guide, "Compute Capabilities": 163 KB on sm_80, 99 KB on sm_86/sm_89, 227 KB on sm_90)
SHARED_MEMORY_OPTIN = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024,
                       (9, 0): 227 * 1024}
_FLEX_DEFAULT_FWD = (128, 64, 3)  # FlexAttention's usual forward tiles (block_m, block_n, stages) at head_dim 128
# smaller configurations, largest first, for GPUs whose shared memory cannot hold the defaults
_FLEX_SMALL = (
    dict(BLOCK_M=64, BLOCK_N=64, num_stages=2, num_warps=4, BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32),
    dict(BLOCK_M=64, BLOCK_N=32, num_stages=2, num_warps=4, BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16),
    dict(BLOCK_M=32, BLOCK_N=32, num_stages=1, num_warps=4, BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16),
)


def flex_kernel_options(capability: tuple[int, int], shared_memory: int | None, head_dim: int,
                        dtype: torch.dtype) -> dict | None:
    """FlexAttention ``kernel_options`` for a GPU: ``None`` (PyTorch's tuned defaults) where the default tiles fit
    its shared memory (sm_80, sm_90 at head_dim 128), else the largest of our smaller configurations that fits
    (sm_86 and sm_89, 99 KB a block: the defaults need about 128 KB at head_dim 128 and fail to launch there).

    ``shared_memory``: the bytes a block may opt in to (``None``: from :data:`SHARED_MEMORY_OPTIN`, or 99 KB for
    an unknown capability, the smallest of the table). ``ValueError`` when not even the smallest fits.
    """
    smem = shared_memory or SHARED_MEMORY_OPTIN.get(tuple(capability), 99 * 1024)
    elt = 4 if dtype == torch.float32 else 2
    bm, bn, stages = _FLEX_DEFAULT_FWD
    if flex_shared_memory_fwd(bm, bn, head_dim, stages, elt) <= smem:
        return None
    for opts in _FLEX_SMALL:
        if flex_shared_memory_fwd(opts["BLOCK_M"], opts["BLOCK_N"], head_dim, opts["num_stages"], elt) <= smem:
            return dict(opts)
    raise ValueError(f"FlexAttention at head_dim {head_dim} ({dtype}) does not fit the {smem // 1024} KB of shared "
                     f"memory of an sm_{capability[0]}{capability[1]} GPU; use another attention backend")


@functools.lru_cache(maxsize=None)
def _device_kernel_options(index: int, head_dim: int, dtype: torch.dtype) -> dict | None:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", None)
    return flex_kernel_options((props.major, props.minor), smem, head_dim, dtype)


def _flex_key(q, k, plan: AttentionPlan, scale: float):
    # what the compiled graph specialises on: the shapes, dtype and device of the inputs and of the plan's tables
    # (T blocks of block_tokens tokens), gradients, and the scale (a Python float, baked in as a constant)
    return (tuple(q.shape), tuple(k.shape), q.dtype, str(q.device), q.requires_grad and torch.is_grad_enabled(),
            plan.num_blocks, plan.block_tokens, float(scale))


def _check_new_shape(key) -> None:
    if key in _flex_shapes:
        return
    if len(_flex_shapes) >= FLEX_MAX_SHAPES:
        raise RuntimeError(f"FlexAttention has been compiled for {len(_flex_shapes)} attention shapes in this "
                           f"process, the most it compiles (swift_kernels.attention.torch_backends.FLEX_MAX_SHAPES); "
                           f"a new one ({key[0]}) would compile again, and past torch.compile's recompile limit "
                           "FlexAttention runs eagerly, materialising every score. Use fewer distinct sequence "
                           "lengths (e.g. pack training sequences to a few lengths) or attention backend 'triton'")
    _flex_shapes.add(key)


def flex(q, k, v, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """FlexAttention with the plan's ``BlockMask``: compiled on a GPU (one graph per shape, at most
    :data:`FLEX_MAX_SHAPES` shapes, never the eager fallback; kernel options that fit the GPU's shared memory:
    :func:`flex_kernel_options`); eager on a CPU, an unfused reference, for sizes whose scores fit
    :data:`FLEX_EAGER_MAX_SCORE_BYTES`. Inside a ``torch.compile`` region it is traced as part of that graph."""
    from torch.nn.attention.flex_attention import flex_attention

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    block_mask = plan.to_block_mask()
    if torch.compiler.is_compiling():  # the enclosing graph compiles it (one fused kernel there)
        out = flex_attention(qt, kt, vt, block_mask=block_mask, scale=scale)
    elif q.device.type == "cuda" or COMPILED_ON_CPU:
        _check_new_shape(_flex_key(q, k, plan, scale))
        options = None if q.device.type != "cuda" else _device_kernel_options(
            q.device.index if q.device.index is not None else torch.cuda.current_device(), q.shape[-1], q.dtype)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True,
                                        recompile_limit=max(torch._dynamo.config.recompile_limit,
                                                            FLEX_MAX_SHAPES + 8)):
            out = _compiled_flex()(qt, kt, vt, block_mask=block_mask, scale=scale, kernel_options=options)
    else:
        scores = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1] * 4
        if scores > FLEX_EAGER_MAX_SCORE_BYTES:
            raise ValueError(f"eager FlexAttention on the {q.device.type} would materialise {scores / 2**30:.1f} GiB "
                             f"of scores ({q.shape[1]} x {k.shape[1]} tokens, {q.shape[2]} heads); use attention "
                             "backend 'torch' (the chunked reference) or 'triton' there")
        if not torch.is_grad_enabled():
            qt, kt, vt = qt.detach(), kt.detach(), vt.detach()  # FlexAttention on a CPU refuses inputs needing grad
        out = flex_attention(qt, kt, vt, block_mask=block_mask, scale=scale)
    return out.transpose(1, 2).contiguous()


TORCH = AttentionBackend("torch", forward=reference_forward, backward=reference_backward)
SDPA = AttentionBackend("sdpa", forward=sdpa, differentiable=True, dense_first=True)
FLEX = AttentionBackend("flex", unsupported=flex_unsupported, forward=flex, differentiable=True, gpu_fallback=True)
