"""Several processes on one DiT: Ulysses sequence parallelism and FSDP2 weight sharding (torch.distributed).

**Sequence parallelism (DeepSpeed-Ulysses).** The tokens of a sequence are split over the ranks of a process
group (:func:`shard_sizes`: as even as possible, any length, no padding). Everything a Wan block does is
per token -- the AdaLN and gated residuals, the q/k/v projections, the RMSNorm of q and k (across all heads of
one token), RoPE, the cross-attention (each query token against the whole, replicated text), the FFN -- except
the self-attention, which needs every token. For it, one all-to-all turns "my tokens, all heads" into "all
tokens, my heads" (:func:`tokens_to_heads`, q, k and v in one exchange), each rank attends its head shard over
the whole sequence with the unchanged block mask, and a second all-to-all turns the output back
(:func:`heads_to_tokens`). :func:`ulysses_attention` is the three steps. The exchanges are differentiable: the
backward of each is the other one. :func:`gather_tokens` reassembles a token-sharded output on every rank.

**FSDP2.** :func:`fsdp_shard_blocks` shards every transformer block's weights over the ranks with
``torch.distributed.fsdp.fully_shard``, so a model larger than one device's memory runs: each block's weights
are all-gathered just before it runs and freed after.

Collectives are issued in the same order on every rank by construction (every rank runs the same blocks in
the same order, forward and backward). Nothing here is specific to GPUs: with the gloo backend it runs on CPUs,
which is how it is tested.

Ulysses sequence parallelism: Jacobs et al., "DeepSpeed Ulysses" (arXiv 2309.14509); the same split is used by
Wan's ``--ulysses_size`` and xDiT's ``ulysses_degree``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "check_heads",
    "fsdp_ignored_params",
    "fsdp_shard_blocks",
    "gather_tokens",
    "group_rank",
    "group_size",
    "heads_to_tokens",
    "shard_sizes",
    "shard_tokens",
    "token_range",
    "tokens_to_heads",
    "ulysses_attention",
]


# -------------------------------------------------------------------------------------------------------------
# shard arithmetic
# -------------------------------------------------------------------------------------------------------------


def shard_sizes(num_tokens: int, world_size: int) -> list[int]:
    """Tokens held by each rank when ``num_tokens`` are split over ``world_size`` ranks.

    As even as possible, in rank order: the first ``num_tokens % world_size`` ranks hold one token more (the
    split of ``torch.tensor_split``). Any length works; no padding. Raises ``ValueError`` when a rank would hold
    no token (``num_tokens < world_size``): every rank must have work for the fused ops.
    """
    for name, value in (("num_tokens", num_tokens), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if num_tokens < world_size:
        raise ValueError(f"a sequence of {num_tokens} tokens cannot be split over {world_size} ranks (one token each at least)")
    base, extra = divmod(num_tokens, world_size)
    return [base + (r < extra) for r in range(world_size)]


def token_range(num_tokens: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, end)`` of rank ``rank``'s tokens in the full sequence (see :func:`shard_sizes`)."""
    sizes = shard_sizes(num_tokens, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in ``group`` (1 when ``group`` is None: no parallelism)."""
    if group is None:
        return 1
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"the sequence-parallel group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    return dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank inside ``group`` (0 when ``group`` is None)."""
    return 0 if group is None else dist.get_rank(group)


def check_heads(num_heads: int, world_size: int) -> None:
    """Ulysses splits the attention heads over the ranks: ``num_heads`` must be a multiple of ``world_size``."""
    if num_heads % world_size:
        raise ValueError(
            f"sequence parallelism splits the attention heads over the ranks: {num_heads} heads cannot be split "
            f"over {world_size} ranks (the number of heads must be a multiple of the sequence-parallel group size)"
        )


# torch >= 2.14 renames all_gather_into_tensor (deprecated there) to all_gather_single; same signature
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _check_sizes(sizes: Sequence[int], group) -> list[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) != group_size(group):
        raise ValueError(f"sizes must have one entry per rank of the group ({group_size(group)}), got {len(sizes)}")
    if min(sizes) < 1:
        raise ValueError(f"every rank must hold at least one token, got sizes {sizes}")
    return sizes


# -------------------------------------------------------------------------------------------------------------
# the two Ulysses exchanges
# -------------------------------------------------------------------------------------------------------------
#
# all_to_all_single splits its buffers along dim 0, so each exchange lays its send buffer out with the
# destination first. Tokens to heads: rank r sends, to rank d, its L_r tokens of head group d; rank d receives
# L_s tokens from each rank s, in rank order, which concatenate to the full sequence (uneven L_s is fine: the
# split sizes are per rank). Heads to tokens is the exact inverse permutation, hence each is the other's
# adjoint (backward).


def _tokens_to_heads(tensors: Sequence[torch.Tensor], sizes: list[int], group) -> list[torch.Tensor]:
    """``[B, L_r, H, D]`` tensors (this rank's tokens, all heads) -> ``[B, L, H/W, D]`` (all tokens, head shard r)."""
    W = group_size(group)
    S = len(tensors)
    B, Lr, H, D = tensors[0].shape
    Hs = H // W
    send = tensors[0].new_empty((W, Lr, S, B, Hs, D))
    for i, t in enumerate(tensors):  # one copy per tensor into the destination-major layout
        send[:, :, i] = t.reshape(B, Lr, W, Hs, D).permute(2, 1, 0, 3, 4)
    L = sum(sizes)
    recv = send.new_empty((L, S, B, Hs, D))
    dist.all_to_all_single(recv.view(L, -1), send.view(W * Lr, -1), output_split_sizes=sizes,
                           input_split_sizes=[Lr] * W, group=group)
    # contiguous: the attention then sees the same memory layout as a single-process call
    return [recv[:, i].permute(1, 0, 2, 3).contiguous() for i in range(S)]


def _heads_to_tokens(tensors: Sequence[torch.Tensor], sizes: list[int], group) -> list[torch.Tensor]:
    """``[B, L, H/W, D]`` tensors (all tokens, head shard r) -> ``[B, L_r, H, D]`` (this rank's tokens, all heads)."""
    W = group_size(group)
    S = len(tensors)
    B, L, Hs, D = tensors[0].shape
    Lr = sizes[group_rank(group)]
    send = tensors[0].new_empty((L, S, B, Hs, D))
    for i, t in enumerate(tensors):
        send[:, i] = t.permute(1, 0, 2, 3)
    recv = send.new_empty((W, Lr, S, B, Hs, D))
    dist.all_to_all_single(recv.view(W * Lr, -1), send.view(L, -1), output_split_sizes=[Lr] * W,
                           input_split_sizes=sizes, group=group)
    # [W, L_r, S, B, Hs, D] -> S x [B, L_r, W*Hs, D]: the head groups of the W sources, in rank order
    return [recv[:, :, i].permute(2, 1, 0, 3, 4).reshape(B, Lr, W * Hs, D) for i in range(S)]


def _save(ctx, sizes, group, outs) -> tuple[torch.Tensor, ...]:
    ctx.sizes, ctx.group = sizes, group
    ctx.like = [(o.shape, o.dtype, o.device) for o in outs]
    return tuple(outs)


def _present(ctx, grads) -> list[torch.Tensor]:
    # autograd hands None for an output that did not reach the loss; the collective must still run on every
    # rank with the same buffers, so a missing gradient is sent as zeros
    return [torch.zeros(s, dtype=d, device=dev) if g is None else g for g, (s, d, dev) in zip(grads, ctx.like)]


class _TokensToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sizes, group, *tensors):
        return _save(ctx, sizes, group, _tokens_to_heads(tensors, sizes, group))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *_heads_to_tokens(_present(ctx, grads), ctx.sizes, ctx.group))


class _HeadsToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sizes, group, *tensors):
        return _save(ctx, sizes, group, _heads_to_tokens(tensors, sizes, group))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *_tokens_to_heads(_present(ctx, grads), ctx.sizes, ctx.group))


def _check_exchange(tensors, name: str) -> None:
    if not tensors:
        raise ValueError(f"{name}: no tensor given")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: tensors must be [batch, tokens, heads, head_dim], got {getattr(t, 'shape', type(t))} at {i}")
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{name}: tensors must share shape, dtype and device; tensor {i} is {tuple(t.shape)} {t.dtype}")


def tokens_to_heads(tensors: Sequence[torch.Tensor], sizes: Sequence[int], group: dist.ProcessGroup) -> tuple[torch.Tensor, ...]:
    """First Ulysses exchange: this rank's tokens with all heads -> all tokens with this rank's heads.

    Args:
        tensors: one or more ``[B, L_r, H, D]`` tensors of one shape (q, k and v go in one exchange), ``L_r =
            sizes[rank]``.
        sizes: tokens of every rank of ``group``, in rank order (:func:`shard_sizes`), uneven allowed.
        group: the sequence-parallel process group (``W`` ranks); ``H`` must be a multiple of ``W``.

    Returns:
        A tuple of ``[B, L, H/W, D]`` tensors, ``L = sum(sizes)``: rank ``r`` holds heads ``r*H/W .. (r+1)*H/W - 1``
        of every token, in sequence order. Differentiable (the backward is :func:`heads_to_tokens`).
    """
    tensors = list(tensors)
    _check_exchange(tensors, "tokens_to_heads")
    sizes = _check_sizes(sizes, group)
    check_heads(tensors[0].shape[2], group_size(group))
    if tensors[0].shape[1] != sizes[group_rank(group)]:
        raise ValueError(f"tokens_to_heads: this rank holds {tensors[0].shape[1]} tokens but sizes say {sizes[group_rank(group)]}")
    return _TokensToHeads.apply(sizes, group, *tensors)


def heads_to_tokens(tensors: Sequence[torch.Tensor], sizes: Sequence[int], group: dist.ProcessGroup) -> tuple[torch.Tensor, ...]:
    """Second Ulysses exchange, the inverse of :func:`tokens_to_heads`: ``[B, L, H/W, D]`` -> ``[B, L_r, H, D]``.

    Differentiable (the backward is :func:`tokens_to_heads`).
    """
    tensors = list(tensors)
    _check_exchange(tensors, "heads_to_tokens")
    sizes = _check_sizes(sizes, group)
    if tensors[0].shape[1] != sum(sizes):
        raise ValueError(f"heads_to_tokens: tensors hold {tensors[0].shape[1]} tokens but sizes sum to {sum(sizes)}")
    return _HeadsToTokens.apply(sizes, group, *tensors)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    sizes: Sequence[int],
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Self-attention of a token-sharded sequence, sharded over heads (DeepSpeed-Ulysses).

    Args:
        q, k, v: ``[B, L_r, H, D]``: this rank's tokens (``L_r = sizes[rank]``), all heads, already normed and
            rotated (RMSNorm across heads and RoPE are per token, so they run before the exchange).
        attend: ``attend(q, k, v) -> out`` on the *whole* sequence for a subset of heads, ``[B, L, h, D]``; e.g.
            ``lambda q, k, v: frame_block_attention(q, k, v, block_mask, block_tokens)``: the block mask needs
            no change, since every head shard sees every token.
        sizes: tokens of every rank, in rank order (:func:`shard_sizes`).
        group: the sequence-parallel group; ``None`` or a group of one rank calls ``attend`` directly.

    Returns ``[B, L_r, H, D]``: this rank's tokens of the attention output. Two all-to-alls (q, k, v together;
    then the output); differentiable, with two all-to-alls in the backward as well. Raises ``ValueError`` when
    ``H`` is not a multiple of the group size.
    """
    if group_size(group) == 1:
        return attend(q, k, v)
    qh, kh, vh = tokens_to_heads((q, k, v), sizes, group)
    (out,) = heads_to_tokens((attend(qh, kh, vh),), sizes, group)
    return out


# -------------------------------------------------------------------------------------------------------------
# token sharding and gathering
# -------------------------------------------------------------------------------------------------------------


def shard_tokens(t: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """This rank's shard (:func:`token_range`) of the full sequence ``t`` along ``dim`` (a contiguous copy).

    Differentiable (the gradient is zero outside the shard).
    """
    W = group_size(group)
    if W == 1:
        return t
    start, end = token_range(t.shape[dim], W, group_rank(group))
    return t.narrow(dim, start, end - start).contiguous()


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, sizes, group, dim):
        ctx.dim, ctx.range = dim, (sum(sizes[: group_rank(group)]), t.shape[dim])
        x = t.movedim(dim, 0)
        longest = max(sizes)
        # all_gather_into_tensor wants equal pieces: pad every shard to the longest, then trim
        piece = x.new_zeros((longest, *x.shape[1:]))
        piece[: x.shape[0]] = x
        full = piece.new_empty((len(sizes) * longest, *x.shape[1:]))
        _all_gather_single(full, piece, group=group)
        parts = [full[i * longest: i * longest + n] for i, n in enumerate(sizes)]
        return torch.cat(parts).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        # Every rank computes the same loss from the same gathered output, so the gradient of this rank's
        # shard is its slice of the (identical) full gradient; no communication.
        start, n = ctx.range
        return grad.narrow(ctx.dim, start, n).contiguous(), None, None, None


def gather_tokens(t: torch.Tensor, group: dist.ProcessGroup | None, sizes: Sequence[int] | None = None,
                  dim: int = 1) -> torch.Tensor:
    """The full sequence, on every rank, from the ranks' token shards ``t`` (concatenated along ``dim``).

    ``sizes``: tokens of every rank (default: exchanged, which costs one small collective; callers that know
    the total length pass :func:`shard_sizes`). The result is identical on every rank. Differentiable, with
    the convention of sequence-parallel training: every rank computes the same loss from the gathered tensor,
    and the gradient of the shard is the slice of that full gradient (parameter gradients are then each
    rank's partial sums: reduce them with a *sum* over the group).
    """
    W = group_size(group)
    if W == 1:
        return t
    if sizes is None:
        n = torch.tensor([t.shape[dim]], dtype=torch.int64, device=t.device)
        every = torch.empty(W, dtype=torch.int64, device=t.device)
        _all_gather_single(every, n, group=group)
        sizes = every.tolist()
    sizes = _check_sizes(sizes, group)
    if t.shape[dim] != sizes[group_rank(group)]:
        raise ValueError(f"gather_tokens: this rank holds {t.shape[dim]} tokens but sizes say {sizes[group_rank(group)]}")
    return _GatherTokens.apply(t, sizes, group, dim % t.dim())


# -------------------------------------------------------------------------------------------------------------
# FSDP2
# -------------------------------------------------------------------------------------------------------------


def fsdp_ignored_params(block: torch.nn.Module, index: int,
                        keep_whole: Callable[[str], bool] | None = None) -> set[torch.nn.Parameter]:
    """The parameters of ``block`` (the model's ``blocks[index]``) that :func:`fsdp_shard_blocks` leaves whole:
    those ``keep_whole("blocks.{index}.{name}")`` names, or by default those in a dtype other than the block's
    most common one (FSDP2 gathers one dtype per group). The planner's model of FSDP uses the same rule."""
    if keep_whole is not None:
        return {p for n, p in block.named_parameters() if keep_whole(f"blocks.{index}.{n}")}
    numel: dict[torch.dtype, int] = {}
    for p in block.parameters():
        numel[p.dtype] = numel.get(p.dtype, 0) + p.numel()
    if not numel:
        return set()
    main = max(numel, key=numel.get)
    return {p for p in block.parameters() if p.dtype != main}


def fsdp_shard_blocks(model: torch.nn.Module, group: dist.ProcessGroup | None = None, *,
                      reshard_after_forward: bool = True, mp_policy=None,
                      keep_whole: Callable[[str], bool] | None = None, device=None,
                      prefetch: bool = False) -> torch.nn.Module:
    """Shard every transformer block of ``model`` (its ``blocks``) over ``group`` with FSDP2, in place.

    Each block becomes an FSDP2 module (``torch.distributed.fsdp.fully_shard``): its weights live sharded
    across the ranks and are all-gathered just before the block runs (and freed after when
    ``reshard_after_forward``), so a model bigger than one device runs on several (the blocks of Wan2.1-I2V-14B
    hold 16.2B parameters, ~32 GB in bf16; each of 4 ranks then keeps ~8 GB of them, plus one gathered block
    at a time). The root's own parameters (patch embedding, condition embedders, head: 0.24B for that model,
    ~0.85 GB since the timestep MLP stays fp32) are replicated. Every rank must run the same forward calls (as
    with sequence parallelism, which composes with it over the same group). Estimates from parameter counts.

    Known pitfalls, handled here:

    - FSDP2 all-gathers a group's parameters in one buffer of one dtype: a block keeps a few small parameters in
      fp32 whatever the model's dtype (the modulation table and the cross-attention LayerNorm: see
      ``swift_model.nets.dit.keeps_fp32``), so a block's parameters in a dtype other than its most common one are
      left out of the sharding (``ignored_params``: replicated, ~160 KB per block of the 14B), keeping their
      precision.
      In training, ignored parameters get no gradient reduction from FSDP: reduce them yourself.
    - ``MixedPrecisionPolicy`` casts the floating-point forward inputs to ``param_dtype`` by default, which would
      round the fp32 RoPE table and modulation; the default policy here has ``cast_forward_inputs=False``.
    - A block's cross-attention keys/values are also computed outside its forward (``context_kv``, by
      ``WanDiT.precompute_context``); that method is registered as an FSDP forward method, so it all-gathers too.

    Args:
        model: a module whose ``blocks`` (a ``ModuleList``) are the units to shard, e.g. a ``WanDiT``; its
            parameters on the device the group communicates on (CUDA with NCCL, CPU with gloo).
        group: the process group (default: the whole world).
        reshard_after_forward: free each block's gathered weights after its forward (the memory saving).
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy``; default: no casts at all.
        keep_whole: ``keep_whole(name)`` (``name`` as in ``model.named_parameters()``, e.g.
            ``"blocks.3.scale_shift_table"``) says which block parameters to leave out of the sharding instead of
            the dtype rule above; training with fp32 master weights and bf16 compute passes
            ``swift_model.nets.dit.keeps_fp32``, so those parameters are neither sharded nor cast by ``mp_policy``.
        device: where the model runs, when its weights are still elsewhere (e.g. loaded into host memory, so
            that no rank ever holds the whole model on its GPU): each block's shard is moved there as it is
            sharded, then the rest of the model (the root's parameters, the parameters left whole). Default:
            where the parameters are.
        prefetch: overlap each block's all-gather with the previous block's compute (inference). Each block on
            its own would be an FSDP root whose all-gather waits for the work queued before it; so the model
            becomes the root (``fully_shard(model)`` with its own parameters left whole: nothing more is
            sharded), every block prefetches the next one's all-gather in its forward
            (``set_modules_to_forward_prefetch``), and the root is initialised at once, so a block method called
            before the model's first forward (``context_kv``) finds the blocks already under it. Two gathered
            blocks are then alive at a time. Training shards the root itself (``swift_model.training``) and
            leaves this off.

    Returns ``model`` (its blocks now ``FSDPModule``\\ s). Untested on a GPU.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not dist.is_initialized():
        raise RuntimeError("fsdp_shard_blocks needs torch.distributed to be initialised (init_process_group)")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise TypeError(f"model must have a non-empty ModuleList `blocks`, got {type(model).__name__}")
    group = dist.group.WORLD if group is None else group
    device = next(model.parameters()).device if device is None else torch.device(device)
    mesh = DeviceMesh.from_group(group, device_type=device.type)
    policy = MixedPrecisionPolicy(cast_forward_inputs=False) if mp_policy is None else mp_policy
    for i, blk in enumerate(blocks):
        ignored = fsdp_ignored_params(blk, i, keep_whole)
        fully_shard(blk, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy,
                    ignored_params=ignored or None)
        if hasattr(blk, "context_kv"):
            register_fsdp_forward_method(blk, "context_kv")
    # fully_shard moved the sharded parameters to the mesh's device; the rest follows (in place, so the
    # Parameter objects FSDP and the model hold stay the same)
    from torch.distributed.tensor import DTensor

    for mod in model.modules():
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None and not isinstance(t, DTensor) and t.device != device:
                t.data = t.data.to(device)
    if prefetch:
        _prefetch_blocks(model, mesh, policy)
    return model


def _prefetch_blocks(model: torch.nn.Module, mesh, policy) -> None:
    """The root and forward prefetch of :func:`fsdp_shard_blocks` (``prefetch=True``)."""
    from torch.distributed.fsdp import fully_shard

    own = {p for name, p in model.named_parameters() if not name.startswith("blocks.")}
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy, ignored_params=own or None)
    blocks = list(model.blocks)
    for block, following in zip(blocks, blocks[1:]):
        block.set_modules_to_forward_prefetch([following])
    # FSDP2 takes the first module to run as the root; precompute_context runs the blocks' context_kv before the
    # model's forward, so the root is initialised now (FSDPState._lazy_init: no public call does only this)
    model._get_fsdp_state()._lazy_init()
