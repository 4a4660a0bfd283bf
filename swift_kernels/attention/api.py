"""Public entry points of frame-block-sparse attention: validation, backend dispatch, autograd.

Inputs are validated here, once; the backends trust what they are given. A block table or a layout is
turned into an :class:`~swift_kernels.attention.plan.AttentionPlan` (looked up, built on first use); a plan
passes straight through.

Our kernels run as ``torch.library`` custom ops (``swift_kernels::fba_forward`` and
``swift_kernels::fba_backward``) with fake implementations, so ``torch.compile(fullgraph=True)`` traces through
them; autograd is attached with ``register_autograd``, and ``torch.utils.flop_counter`` counts them as
``4 * batch * heads * head_dim * allowed_pairs`` forward and 2.5 times that backward (only computed pairs). The
``"sdpa"`` and ``"flex"`` backends are PyTorch's own differentiable ops, called directly.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import _backend, _registry
from .._backend import ATTENTION, choose_backend, constant_under_compile, warn_once
from .layout import CSGLayout
from .plan import PLANS_BY_ID, AttentionPlan, KernelTables, normalize_device, plan_attention, plan_id_of_layout


# Under torch.compile the choice is made once, eagerly, while tracing (imports and environment lookups
# cannot be traced) and baked into the graph as a constant.
@constant_under_compile
def _choose_backend(backend, device, head_dim, dtype, empty, dense) -> str:
    """The backend of one call, read from the registered records (:mod:`swift_kernels._registry`); see
    :mod:`swift_kernels._backend` for the rules. Dense plans prefer the record marked ``dense_first`` (SDPA),
    when there is a device to ask which SDPA kernel to run: not for fake CUDA tensors on a CPU machine. A
    backend with variants comes back as the one to run here (``"cuda-sm90"`` when the Hopper forward is to)."""
    name = choose_backend(
        ATTENTION, backend, device,
        why_not=lambda n: _registry.get(n).unsupported(head_dim, dtype, device),
        prefer=_registry.dense_first() if dense and (device.type != "cuda" or _backend.gpu_present()) else None,
    )
    record = _registry.get(name)
    if empty and not record.differentiable:
        return _registry.REFERENCE  # nothing to launch; the reference handles empty batches
    return record.variant(device) if record.variant is not None else name


# ---------------------------------------------------------------------------------------------------------
# Our kernels as custom ops


def _run_forward(backend: str, q, k, v, t: KernelTables, scale: float):
    return _registry.get(backend).forward_of(backend)(q, k, v, t, scale)


def _run_backward(backend: str, dout, q, k, v, out, lse, t: KernelTables, scale: float):
    record = _registry.get(backend)  # a variant's forward (cuda-sm90) shares its backend's backward
    missing = record.backward_missing()
    if missing is not None:
        # Every backward consumes the same (out, natural-log lse) contract, so the reference takes over.
        warn_once(f"fba-no-{record.name}-backward", f"{missing}; using the reference")
        record = _registry.get(_registry.REFERENCE)
    return record.backward(dout, q, k, v, out, lse, t, scale)


@torch.library.custom_op("swift_kernels::fba_forward", mutates_args=())
def _fba_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_table: torch.Tensor,
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    full_kv_num: torch.Tensor,
    full_kv_idx: torch.Tensor,
    q_num: torch.Tensor,
    q_idx: torch.Tensor,
    full_q_num: torch.Tensor,
    full_q_idx: torch.Tensor,
    block_tokens: int,
    scale: float,
    allowed_pairs: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    t = KernelTables(mask_table, block_tokens, kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num,
                     full_q_idx)
    out, lse = _run_forward(backend, q, k, v, t, scale)
    return out, lse


@_fba_forward.register_fake
def _fba_forward_fake(q, k, v, *tables_and_scalars):
    batch, tokens, heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((batch, heads, tokens), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("swift_kernels::fba_backward", mutates_args=())
def _fba_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask_table: torch.Tensor,
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    full_kv_num: torch.Tensor,
    full_kv_idx: torch.Tensor,
    q_num: torch.Tensor,
    q_idx: torch.Tensor,
    full_q_num: torch.Tensor,
    full_q_idx: torch.Tensor,
    block_tokens: int,
    scale: float,
    allowed_pairs: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = KernelTables(mask_table, block_tokens, kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num,
                     full_q_idx)
    dq, dk, dv = _run_backward(backend, dout, q, k, v, out, lse, t, scale)
    return dq, dk, dv


@_fba_backward.register_fake
def _fba_backward_fake(dout, q, k, v, *rest):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, *tables = inputs[:12]
    block_tokens, scale, allowed_pairs, backend = inputs[12:]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tables)
    ctx.scalars = (block_tokens, scale, allowed_pairs, backend)
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, *tables = ctx.saved_tensors
    dq, dk, dv = _fba_backward(dout.contiguous(), q, k, v, out, lse, *tables, *ctx.scalars)
    return (dq, dk, dv) + (None,) * 13


_fba_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


# FLOPs of our op count only the computed (allowed) token pairs, not L * L: the forward is
# 4 * batch * heads * head_dim * pairs (two matmuls of 2 FLOPs per multiply-add), the backward 2.5 times that.
@register_flop_formula(torch.ops.swift_kernels.fba_forward)
def _fba_forward_flops(q_shape, *args, out_shape=None, **kwargs) -> int:
    batch, _, heads, head_dim = q_shape
    allowed = args[13]  # (k, v, 9 tables, block_tokens, scale, allowed_pairs, backend) after q
    return 4 * batch * heads * head_dim * allowed


@register_flop_formula(torch.ops.swift_kernels.fba_backward)
def _fba_backward_flops(dout_shape, *args, out_shape=None, **kwargs) -> int:
    batch, _, heads, head_dim = dout_shape
    allowed = args[16]  # (q, k, v, out, lse, 9 tables, block_tokens, scale, allowed_pairs, backend)
    return 10 * batch * heads * head_dim * allowed


# ---------------------------------------------------------------------------------------------------------
# Public API


def _check_qkv(q, k, v, softmax_scale) -> float:
    """Validate q, k, v and the softmax scale of an attention call; returns the scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if q.shape[-1] < 1:
        raise ValueError(f"q must have head_dim >= 1, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    if softmax_scale is None:
        return q.shape[-1] ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return float(softmax_scale)


def _check_table_for(q: torch.Tensor, block_mask, block_tokens) -> None:
    """A raw block table must fit q's tokens (checked before its plan is looked up, with clear messages)."""
    from .plan import check_table

    block_tokens = check_table(block_mask, block_tokens)
    tokens = q.shape[1]
    if tokens % block_tokens:
        raise ValueError(f"tokens ({tokens}) must be a multiple of block_tokens ({block_tokens})")
    n_blocks = tokens // block_tokens
    if tuple(block_mask.shape) != (n_blocks, n_blocks):
        raise ValueError(
            f"block_mask must be [n_blocks, n_blocks] = [{n_blocks}, {n_blocks}] "
            f"(tokens {tokens} / block_tokens {block_tokens}), got {tuple(block_mask.shape)}"
        )
    if block_mask.device.type != "cpu" and block_mask.device != q.device:
        raise ValueError(f"block_mask must be on the CPU or on the device of q ({q.device}), got {block_mask.device}")


def _check_plan(plan: AttentionPlan, q: torch.Tensor) -> None:
    if q.shape[1] != plan.num_tokens:
        raise ValueError(
            f"q has {q.shape[1]} tokens but the plan lays out {plan.num_tokens} "
            f"({plan.num_blocks} blocks of {plan.block_tokens})"
        )
    if q.device != plan.device:
        raise ValueError(f"the plan's tables are on {plan.device} but q is on {q.device}: build the plan there")


def _attend(q, k, v, plan: AttentionPlan, scale: float, backend) -> torch.Tensor:
    """Run attention with a validated plan: choose the backend, then call it."""
    name = _choose_backend(backend, q.device, q.shape[-1], q.dtype, q.numel() == 0, plan.dense)
    record = _registry.get(name)
    if record.differentiable:
        return record.forward_of(name)(q, k, v, plan, scale)
    # Kernels need a unit stride in head_dim; everything else is passed through as strides.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    t = plan.tables
    out, _ = _fba_forward(
        q, k, v, t.mask_table, t.kv_num, t.kv_idx, t.full_kv_num, t.full_kv_idx, t.q_num, t.q_idx,
        t.full_q_num, t.full_q_idx, plan.block_tokens, scale, plan.allowed_pairs, name,
    )
    return out


def frame_block_attention(q, k, v, block_mask, block_tokens=None, softmax_scale=None, backend=None):
    """Self-attention where whole blocks of tokens attend whole blocks, as a block table says.

    Args:
        q, k, v: ``[batch, tokens, heads, head_dim]`` tensors of one shape, dtype and device, with
            ``tokens = n_blocks * block_tokens``.
        block_mask: an :class:`~swift_kernels.AttentionPlan` (built once with :func:`~swift_kernels.plan_attention`:
            then the call does no host work), or a bool ``[n_blocks, n_blocks]`` table (its plan is looked up by
            content on every call): query token ``i`` may attend key token ``j`` iff
            ``block_mask[i // block_tokens, j // block_tokens]``. A query with no allowed key outputs zeros.
        block_tokens: tokens per block (one latent frame: 3,520 at 2K for the 5B DiT); required with a table,
            optional with a plan (must match).
        softmax_scale: defaults to ``head_dim ** -0.5``.
        backend: ``None`` for the automatic choice (dense plans: SDPA; block-sparse: our kernels where verified
            on this GPU, else FlexAttention; the PyTorch reference on a CPU; ``SWIFT_KERNELS_BACKEND``
            overrides), or one of ``"torch"``, ``"triton"``, ``"cuda"``, ``"sdpa"``, ``"flex"``.

    Returns:
        The attention output, same shape and dtype as ``q``; differentiable with respect to q, k and v.

    Raises:
        TypeError: a non-tensor, a non-float q/k/v, a non-bool block_mask, a dtype the requested backend lacks.
        ValueError: mismatched shapes or devices, a bad block_tokens/softmax_scale, a head_dim the requested
            backend lacks, a plan built for other tokens or another device. ``BackendUnavailableError``: the
            requested backend cannot run here.
    """
    scale = _check_qkv(q, k, v, softmax_scale)
    if isinstance(block_mask, AttentionPlan):
        plan = block_mask
        if block_tokens is not None and block_tokens != plan.block_tokens:
            raise ValueError(f"block_tokens ({block_tokens}) differs from the plan's ({plan.block_tokens})")
    else:
        if block_tokens is None:
            raise TypeError("block_tokens is required with a block table (or pass an AttentionPlan)")
        _check_table_for(q, block_mask, block_tokens)
        plan = plan_attention(block_mask, block_tokens, device=q.device)
    _check_plan(plan, q)
    return _attend(q, k, v, plan, scale, backend)


def csg_attention(q, k, v, layout, softmax_scale=None, backend=None):
    """Attention laid out by a :class:`~swift_kernels.CSGLayout` (window, packed windows or whole clip).

    Equal to ``frame_block_attention(q, k, v, plan_attention(layout, device=q.device), ...)``.

    Args:
        q, k, v: ``[batch, layout.num_tokens, heads, head_dim]`` tensors of one shape, dtype and device.
        layout: the :class:`~swift_kernels.CSGLayout` of the sequence, or its
            :class:`~swift_kernels.AttentionPlan` (build it once per window shape and pass it to every layer).
        softmax_scale, backend: as in :func:`frame_block_attention` (defaults ``head_dim ** -0.5`` and the
            automatic choice).

    Returns:
        The attention output, same shape and dtype as ``q``; differentiable with respect to q, k and v.
    """
    if isinstance(layout, AttentionPlan):
        return frame_block_attention(q, k, v, layout, None, softmax_scale, backend)
    if not isinstance(layout, CSGLayout):
        raise TypeError(f"layout must be a CSGLayout or an AttentionPlan, got {type(layout).__name__}")
    scale = _check_qkv(q, k, v, softmax_scale)
    if q.shape[1] != layout.num_tokens:
        raise ValueError(f"q has {q.shape[1]} tokens but the layout lays out {layout.num_tokens}")
    device = normalize_device(q.device)
    if torch.compiler.is_compiling():
        plan = PLANS_BY_ID[plan_id_of_layout(layout._key(), device)]
    else:
        plan = plan_attention(layout, device=device)
    return _attend(q, k, v, plan, scale, backend)
