"""A Wan-compatible diffusion transformer (Wan2.1 / Wan2.2) on swift_kernels' fused ops.

The network computes what the original Wan ``WanModel`` and diffusers' ``WanTransformer3DModel`` compute; the
parameter names are diffusers' (so a diffusers state dict loads as is; :mod:`swift_model.loading.checkpoint` maps the
original Wan names both ways). What differs is how it runs:

- self-attention goes through :func:`swift_kernels.frame_block_attention` with a block mask (dense by default,
  a :class:`~swift_kernels.CSGLayout`'s when given), so one CSG window, packed windows or a whole clip with
  the CSG mask are all one call;
- RoPE positions of each latent frame come from the caller (a CSG window's blocks keep their clip positions);
- the elementwise chains are fused: LayerNorm + AdaLN (:func:`~swift_kernels.dit_ops.adaln_modulate`), each
  gated residual fused with the *next* norm (self-attn residual + cross-attn LayerNorm, cross-attn residual +
  FFN AdaLN, FFN residual + the next block's AdaLN or the head's), RMSNorm of q/k + 3D RoPE in one pass
  (:func:`~swift_kernels.dit_ops.qk_norm_rope`);
- every transformer block is a module (:class:`WanBlock`) that reads only its own parameters, so FSDP2,
  activation checkpointing and weight streaming work per block. The fusion across blocks is kept by passing
  activations: in the *fused* boundary (inference, the default) a block hands its FFN output and gate to the
  next block, which adds them in the pass of its own AdaLN; the *unfused* boundary (training) completes each
  block's residual in the block. :attr:`WanDiT.block_boundary` chooses, :attr:`WanDiT.checkpoint_blocks`
  turns on per-block activation checkpointing; all four combinations give the same bits;
- ``forward(..., sp_group=...)`` runs the tokens sharded over a process group (Ulysses sequence parallelism,
  :mod:`swift_model.nets.parallel`);
- the per-token timestep embedding (Wan2.2 TI2V, CSG windows) is computed once per distinct timestep value,
  and the fused ops read the modulation as ``[K, dim]`` tables of those K values plus a per-token row index
  (``mod_index``) instead of ``[B, L, dim]`` fp32 tensors per token;
- text/image cross-attention keys and values can be computed once (:meth:`WanDiT.precompute_context`) and
  reused across steps and segments; so can a shared anchor's self-attention keys and values, when the
  anchor attends only itself (:meth:`WanDiT.precompute_anchor`, ``forward(..., anchor_cache=...)``).

Numerics: timestep embedding, modulation and norms in fp32 (as the originals); matmuls in the parameter
dtype (bf16 on a GPU by default through :meth:`WanDiT.from_pretrained`, fp32 on a CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from swift_kernels import AttentionPlan, CSGLayout, frame_block_attention, plan_attention
from swift_kernels.dit_ops import adaln_modulate, gated_residual, qk_norm_rope, rope_table

from .config import WanDiTConfig
from .parallel import check_heads, gather_tokens, group_rank, group_size, shard_sizes, token_range, ulysses_attention

# The block table of dense attention: one block holding the whole sequence.
_DENSE_TABLE = torch.ones(1, 1, dtype=torch.bool)

# The block boundaries of WanDiT.block_boundary (see WanBlock).
BLOCK_BOUNDARIES = ("fused", "unfused")

# Parameters kept in fp32 whatever the model dtype (diffusers' _keep_in_fp32_modules and the original's fp32
# autocast regions): the timestep MLP, the modulation tables and the affine LayerNorms.
FP32_PARAM_PATTERNS = ("condition_embedder.time_embedder.", "condition_embedder.time_proj.", "scale_shift_table",
                       ".norm2.", "image_embedder.norm1.", "image_embedder.norm2.")


def keeps_fp32(name: str) -> bool:
    """Whether the parameter ``name`` stays fp32 when the model is cast to a low precision."""
    return any(p in name for p in FP32_PARAM_PATTERNS) or name.startswith("scale_shift_table")


# -------------------------------------------------------------------------------------------------------------
# modules (names follow diffusers' WanTransformer3DModel)
# -------------------------------------------------------------------------------------------------------------


class _RMSNorm(nn.Module):
    """Wan's RMSNorm across the whole width: ``norm(x.float()).type_as(x) * weight``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        n = (xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)).type_as(x)
        return n * self.weight.to(x.dtype)


class _LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, result in the input dtype (diffusers' FP32LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class _Proj(nn.Module):
    """``Linear`` followed by GELU (diffusers' ``GELU`` activation module, holding ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class _FeedForward(nn.Module):
    """``net.0.proj`` -> GELU -> ``net.2`` (index 1 is diffusers' dropout slot)."""

    def __init__(self, dim: int, inner: int, dim_out: int | None = None, approximate: str = "tanh") -> None:
        super().__init__()
        self.net = nn.ModuleList([_Proj(dim, inner, approximate), nn.Identity(), nn.Linear(inner, dim_out or dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class _Attention(nn.Module):
    """Projections and q/k norms of one attention (self or cross); the attention itself is in the block."""

    def __init__(self, dim: int, eps: float, added_kv_dim: int | None = None) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = _RMSNorm(dim, eps)
        self.norm_k = _RMSNorm(dim, eps)
        if added_kv_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_dim, dim)
            self.norm_added_k = _RMSNorm(dim, eps)
        else:
            self.add_k_proj = self.add_v_proj = self.norm_added_k = None


class WanBlock(nn.Module):
    """One Wan transformer block: AdaLN self-attention, cross-attention to the text (and CLIP image) tokens, FFN.

    A block reads only its own parameters (so FSDP2, activation checkpointing and weight streaming work per
    block); what it shares with the other blocks arrives as :class:`BlockInputs` (the timestep modulation, the
    RoPE table, the embedded context, the self-attention spec).

    Two block boundaries, bitwise equal in outputs and gradients:

    - *fused* (inference): the block returns its FFN output and gate unapplied (``defer_residual=True``), and the
      next block adds them in the same pass as its own AdaLN (``pending``): one read of the residual stream
      saved per block. The head finishes the last block's residual.
    - *unfused* (training): the block completes its own residual and the next one does its own AdaLN, so under
      activation checkpointing a block boundary holds one ``[B, L, dim]`` tensor instead of two.
    """

    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.attn1 = _Attention(d, cfg.eps)
        self.attn2 = _Attention(d, cfg.eps, added_kv_dim=d if cfg.image_dim is not None else None)
        self.norm2 = _LayerNorm(d, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else None
        self.ffn = _FeedForward(d, cfg.ffn_dim, approximate="tanh")
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        self.num_heads, self.head_dim, self.eps = cfg.num_heads, cfg.head_dim, cfg.eps

    def context_kv(self, context: torch.Tensor, image_context: torch.Tensor | None = None) -> tuple:
        """Cross-attention keys and values of this block: ``(k, v, k_img, v_img)``, each ``[B, N, H, D]``.

        ``context``: the embedded text ``[B, text_len, dim]``; ``image_context``: the embedded CLIP tokens
        ``[B, 257, dim]`` or ``None`` (then ``k_img = v_img = None``). :meth:`WanDiT.precompute_context` calls it
        once per conditioning to reuse the result across steps and segments.

        A second entry point into the block's parameters besides :meth:`forward` (wrappers that gather or
        stream weights per block must treat it as one: :func:`swift_model.nets.parallel.fsdp_shard_blocks` does).
        """
        return self._cross_kv(context, image_context)

    def _cross_kv(self, context: torch.Tensor, image_context: torch.Tensor | None) -> tuple:
        # the body of context_kv, called by forward directly: a wrapper hooked on context_kv (FSDP's
        # registered forward method) would free the gathered weights when it returns, in the middle of forward
        a, H, D = self.attn2, self.num_heads, self.head_dim
        k = a.norm_k(a.to_k(context)).unflatten(-1, (H, D))
        v = a.to_v(context).unflatten(-1, (H, D))
        ki = vi = None
        if image_context is not None:
            ki = a.norm_added_k(a.add_k_proj(image_context)).unflatten(-1, (H, D))
            vi = a.add_v_proj(image_context).unflatten(-1, (H, D))
        return k, v, ki, vi

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: "AttentionSpec") -> torch.Tensor:
        """The self-attention of ``q, k, v [B, L, H, D]`` as ``spec`` says (the block's only attention call).

        With a sequence-parallel group, ``q, k, v`` hold this rank's tokens and the attention runs over the
        whole sequence per head shard (:func:`swift_model.nets.parallel.ulysses_attention`).
        """
        def attend(q, k, v):
            return frame_block_attention(q, k, v, spec.plan, backend=spec.backend)

        if spec.sp_group is None:
            return attend(q, k, v)
        return ulysses_attention(q, k, v, attend, spec.sp_sizes, spec.sp_group)

    def _self_attention(self, qkv: list, spec: "AttentionSpec", anchor_kv) -> torch.Tensor:
        """The self-attention of ``qkv = [q, k, v]``, taken out of the list (so that no caller's reference keeps
        them alive beside the anchor-extended copies), after the cached anchor's keys and values if any."""
        q, k, v = qkv
        qkv.clear()
        if anchor_kv is None:
            return self.attention(q, k, v, spec)
        # The anchor's keys and values come from the cache. Its own query rows are not needed (its output is
        # cached as well): zero queries keep the attention's square shape at the cost of n rows attending the
        # anchor block alone.
        ka, va = anchor_kv
        B, _, H, D = q.shape
        n = ka.shape[1]
        q = torch.cat([q.new_zeros(B, n, H, D), q], 1)
        k = torch.cat([ka.expand(B, -1, -1, -1), k], 1)
        v = torch.cat([va.expand(B, -1, -1, -1), v], 1)
        return self.attention(q, k, v, spec)[:, n:]

    def forward(
        self,
        x: torch.Tensor,
        inputs: "BlockInputs",
        pending: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        context_kv: tuple | None = None,
        defer_residual: bool = False,
        anchor_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        record_kv: list | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Run the block on the residual stream ``x [B, L, dim]``.

        Args:
            x: the residual stream (this rank's tokens under sequence parallelism).
            inputs: what all blocks share (:class:`BlockInputs`).
            pending: ``(y, gate)``, the previous block's FFN output and gate not yet added to ``x`` (fused
                boundary); this block finishes that residual in the pass of its own AdaLN. ``None``: ``x`` is
                complete.
            context_kv: this block's cross-attention ``(k, v, k_img, v_img)`` from a :class:`ContextCache`;
                default: computed from ``inputs.context`` / ``inputs.image_context``.
            defer_residual: return this block's FFN residual unapplied (fused boundary) instead of adding it.
            anchor_kv: ``(k, v)`` ``[B or 1, n, H, D]`` of a shared anchor that attends only itself
                (:class:`AnchorCache`): ``x`` then holds the other tokens, and the self-attention runs over the
                anchor's cached keys and values followed by theirs (``inputs.attention`` lays out both).
            record_kv: a list to which this block appends its self-attention ``(k, v)`` (after norm and RoPE).

        Returns:
            ``(x, pending)``: with ``defer_residual`` the stream without this block's FFN residual and that
            residual as ``(y, gate)``; otherwise the completed stream and ``None``. A chunked call
            (``inputs.token_chunk``, see :meth:`_forward_chunked`) always returns the completed stream.
        """
        chunk = inputs.token_chunk
        if chunk is not None and x.shape[1] > chunk and not torch.is_grad_enabled():
            return self._forward_chunked(x, inputs, pending, chunk, context_kv=context_kv, anchor_kv=anchor_kv,
                                         record_kv=record_kv)
        H, D, eps = self.num_heads, self.head_dim, self.eps
        mod = inputs.modulation
        mi = mod.index  # None unless the modulation comes as tables + a per-token row index
        table = self.scale_shift_table
        if pending is None:
            xm = adaln_modulate(x, mod.get(table, 0), mod.get(table, 1), eps, mod_index=mi)
        else:
            y, gate = pending
            x, xm = gated_residual(x, y, gate, shift=mod.get(table, 0), scale=mod.get(table, 1), eps=eps,
                                   mod_index=mi)
        B, L, C = x.shape
        # self-attention
        a1 = self.attn1
        q = a1.to_q(xm).view(B, L, H, D)
        k = a1.to_k(xm).view(B, L, H, D)
        v = a1.to_v(xm).view(B, L, H, D)
        # RMSNorm across all heads of a token: per token, so it runs before any sequence-parallel exchange
        q, k = qk_norm_rope(q, k, a1.norm_q.weight, a1.norm_k.weight, inputs.rope, eps)
        if record_kv is not None:
            record_kv.append((k, v))
        qkv = [q, k, v]
        del q, k, v
        o = self._self_attention(qkv, inputs.attention, anchor_kv)
        y = a1.to_out[0](o.reshape(B, L, C))
        gate = mod.get(table, 2)
        if self.norm2 is not None:
            # LN(x)*w + b written as an AdaLN with scale = w - 1, shift = b, fused into the residual pass.
            w = mod.const(self.norm2.weight.float() - 1.0)
            b = mod.const(self.norm2.bias)
            x, xn = gated_residual(x, y, gate, shift=b, scale=w, eps=self.norm2.eps, mod_index=mi)
        else:
            x = gated_residual(x, y, gate, mod_index=mi)
            xn = x
        # cross-attention: local queries against the whole (replicated) context, no communication
        a2 = self.attn2
        kc, vc, ki, vi = context_kv if context_kv is not None else self._cross_kv(inputs.context, inputs.image_context)
        q = a2.norm_q(a2.to_q(xn)).view(B, L, H, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, kc.transpose(1, 2).expand(B, -1, -1, -1),
                                           vc.transpose(1, 2).expand(B, -1, -1, -1))
        if ki is not None:
            o = o + F.scaled_dot_product_attention(q, ki.transpose(1, 2).expand(B, -1, -1, -1),
                                                   vi.transpose(1, 2).expand(B, -1, -1, -1))
        y = a2.to_out[0](o.transpose(1, 2).reshape(B, L, C))
        ones = mod.const(torch.ones(C, device=x.device))
        x, xm = gated_residual(x, y, ones, shift=mod.get(table, 3), scale=mod.get(table, 4), eps=eps, mod_index=mi)
        # feed-forward
        y = self.ffn(xm)
        gate = mod.get(table, 5)
        if defer_residual:
            return x, (y, gate)
        return gated_residual(x, y, gate, mod_index=mi), None

    def _forward_chunked(self, x: torch.Tensor, inputs: "BlockInputs", pending, chunk: int, *,
                         context_kv: tuple | None, anchor_kv: tuple | None,
                         record_kv: list | None) -> tuple[torch.Tensor, None]:
        """:meth:`forward` without autograd, with the per-token work done ``chunk`` tokens at a time.

        Everything but the self-attention acts on each token alone (AdaLN, the projections, q/k norm and RoPE,
        the cross-attention queries, the FFN), so it runs on slices of the sequence; only the self-attention
        sees all tokens at once. What is alive at the peak is then the stream, q, k, v and the attention output
        (five ``[B, L, dim]`` tensors) plus one chunk's intermediates (the FFN's ``[chunk, ffn_dim]`` hidden
        pair being the largest), instead of about a dozen ``[B, L, dim]`` tensors and two ``[B, L, ffn_dim]``
        ones: the working set of a long clip (Stage I at 241 frames) then grows with the clip by five
        stream-sized tensors, not by about twenty. The same numbers as :meth:`forward` up to the matmuls' rounding on row slices.

        The block completes its own residual here (the unfused boundary): inside a chunk the FFN output is
        added while it is fresh, which is what the fused boundary buys when the sequence is not chunked. A
        ``pending`` residual from an unchunked previous block is completed first.
        """
        H, D, eps = self.num_heads, self.head_dim, self.eps
        mod, table = inputs.modulation, self.scale_shift_table
        if pending is not None:
            x = gated_residual(x, *pending, mod_index=mod.index)
        B, L, C = x.shape
        spans = [(s, min(s + chunk, L)) for s in range(0, L, chunk)]
        a1, a2 = self.attn1, self.attn2
        # self-attention inputs, chunk by chunk into whole-sequence q, k, v
        q, k, v = (x.new_empty(B, L, H, D) for _ in range(3))
        for s, e in spans:
            mc = mod.shard(s, e)
            xm = adaln_modulate(x[:, s:e], mc.get(table, 0), mc.get(table, 1), eps, mod_index=mc.index)
            qc, kc = qk_norm_rope(a1.to_q(xm).view(B, e - s, H, D), a1.to_k(xm).view(B, e - s, H, D),
                                  a1.norm_q.weight, a1.norm_k.weight, inputs.rope[s:e], eps)
            q[:, s:e], k[:, s:e] = qc, kc
            v[:, s:e] = a1.to_v(xm).view(B, e - s, H, D)
            del xm, qc, kc
        if record_kv is not None:
            record_kv.append((k, v))
        qkv = [q, k, v]
        del q, k, v
        o = self._self_attention(qkv, inputs.attention, anchor_kv)
        kc, vc, ki, vi = context_kv if context_kv is not None else self._cross_kv(inputs.context, inputs.image_context)
        kc, vc = kc.transpose(1, 2).expand(B, -1, -1, -1), vc.transpose(1, 2).expand(B, -1, -1, -1)
        if ki is not None:
            ki, vi = ki.transpose(1, 2).expand(B, -1, -1, -1), vi.transpose(1, 2).expand(B, -1, -1, -1)
        out = torch.empty_like(x)
        for s, e in spans:
            mc, n = mod.shard(s, e), e - s
            mi = mc.index
            y = a1.to_out[0](o[:, s:e].reshape(B, n, C))
            if self.norm2 is not None:
                w, b = mc.const(self.norm2.weight.float() - 1.0), mc.const(self.norm2.bias)
                xs, xn = gated_residual(x[:, s:e], y, mc.get(table, 2), shift=b, scale=w, eps=self.norm2.eps,
                                        mod_index=mi)
            else:
                xs = xn = gated_residual(x[:, s:e], y, mc.get(table, 2), mod_index=mi)
            qc = a2.norm_q(a2.to_q(xn)).view(B, n, H, D).transpose(1, 2)
            oc = F.scaled_dot_product_attention(qc, kc, vc)
            if ki is not None:
                oc = oc + F.scaled_dot_product_attention(qc, ki, vi)
            y = a2.to_out[0](oc.transpose(1, 2).reshape(B, n, C))
            del qc, oc, xn
            ones = mc.const(torch.ones(C, device=x.device))
            xs, xm = gated_residual(xs, y, ones, shift=mc.get(table, 3), scale=mc.get(table, 4), eps=eps,
                                    mod_index=mi)
            y = self.ffn(xm)
            del xm
            out[:, s:e] = gated_residual(xs, y, mc.get(table, 5), mod_index=mi)
            del xs, y
        return out, None


class _TimeEmbedder(nn.Module):
    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)


class _TextEmbedder(nn.Module):
    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class _ImageEmbedder(nn.Module):
    def __init__(self, image_dim: int, dim: int) -> None:
        super().__init__()
        self.norm1 = _LayerNorm(image_dim)
        self.ff = _FeedForward(image_dim, image_dim, dim_out=dim, approximate="none")
        self.norm2 = _LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.ff(self.norm1(x)))


class _ConditionEmbedder(nn.Module):
    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        self.time_embedder = _TimeEmbedder(cfg.freq_dim, cfg.dim)
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_embedder = _TextEmbedder(cfg.text_dim, cfg.dim)
        self.image_embedder = _ImageEmbedder(cfg.image_dim, cfg.dim) if cfg.image_dim is not None else None


# -------------------------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding ``[cos(t*w), sin(t*w)]``, ``w_i = 10000^(-i/(dim/2))``, computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = t.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat((torch.cos(ang), torch.sin(ang)), dim=1).float()


def _linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight.float(), None if layer.bias is None else layer.bias.float())


class Modulation:
    """Timestep-dependent modulation in the layout the fused ops read.

    ``e`` is the projected embedding ``[K, 6, dim]`` of the K distinct timestep values (per token) or
    ``[B, 6, dim]`` (per sample); ``temb`` ``[K or B, dim]``; ``inv`` ``[B, L]`` maps tokens to values.

    Three layouts: per sample (``inv is None``: ``[B, 1, dim]`` vectors); per token *indexed* (the default
    for per-token timesteps: ``[K, dim]`` tables plus :attr:`index`, passed to the ops as ``mod_index``,
    so a block reads K rows and one index per token instead of six ``[B, L, dim]`` fp32 tensors); per token
    *expanded* (``indexed=False``: ``[B, L, dim]`` gathers, the reference layout the tests compare with).
    """

    def __init__(self, temb: torch.Tensor, e: torch.Tensor, inv: torch.Tensor | None, indexed: bool = True) -> None:
        self.temb, self.e, self.inv = temb, e, inv
        self.indexed = inv is not None and indexed
        # int32 halves the index bytes the kernels read; the index is [B, L], converted once per forward
        self.index = inv.to(torch.int32) if self.indexed else None
        self.batch = inv.shape[0] if inv is not None else e.shape[0]

    def _layout(self, m: torch.Tensor) -> torch.Tensor:
        # m: [K or B, dim] -> [B, 1, dim] (per sample), [K, dim] (indexed table) or [B, L, dim] (expanded)
        if self.inv is None:
            return m[:, None, :]
        return m if self.indexed else m[self.inv]

    def get(self, table: torch.Tensor, j: int) -> torch.Tensor:
        """``table[0, j] + e[:, j]`` laid out for the fused ops (fp32)."""
        return self._layout(table[0, j].float() + self.e[:, j])

    def shard(self, start: int, end: int) -> "Modulation":
        """The modulation of tokens ``start:end`` only (a sequence-parallel rank's shard): the per-token
        index is sliced, the tables (of every distinct timestep of the whole sequence) are shared."""
        if self.inv is None:
            return self
        return Modulation(self.temb, self.e, self.inv[:, start:end].contiguous(), indexed=self.indexed)

    def head(self, table: torch.Tensor, j: int) -> torch.Tensor:
        """The head's shift (j=0) / scale (j=1): ``table[0, j] + temb``."""
        return self._layout(table[0, j].float() + self.temb)

    def const(self, v: torch.Tensor) -> torch.Tensor:
        """A timestep-independent vector ``v [dim]`` in the layout of :meth:`get` (a stride-0 view, no copy):
        in one fused call every modulation input must share the layout (tables of the same K)."""
        v = v.float()
        if self.indexed:
            return v.expand(self.e.shape[0], v.shape[0])
        return v.expand(self.batch, 1, v.shape[0])


@dataclass(frozen=True)
class AttentionSpec:
    """How a block runs its self-attention (:meth:`WanBlock.attention`).

    Attributes:
        plan: the :class:`~swift_kernels.AttentionPlan` of the whole sequence (built once per forward call, or
            passed in by the caller once per window shape), shared by every block: no block does host work.
        backend: the kernel backend for :func:`~swift_kernels.frame_block_attention` (``None``: automatic).
        sp_group: the sequence-parallel process group, or ``None``.
        sp_sizes: tokens of every rank of ``sp_group`` (:func:`swift_model.nets.parallel.shard_sizes`).
    """

    plan: AttentionPlan
    backend: str | None = None
    sp_group: Any = None
    sp_sizes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BlockInputs:
    """What every block of one forward call reads besides its own parameters and the residual stream.

    Attributes:
        modulation: the timestep modulation (:class:`Modulation`); each block adds its own table to it.
        rope: the RoPE (cos, sin) table ``[L, head_dim // 2, 2]`` fp32 of the block's tokens.
        attention: the self-attention spec (:class:`AttentionSpec`).
        context: the embedded text ``[B or 1, text_len, dim]`` from which a block computes its cross-attention
            keys/values (``None`` when they come from a :class:`ContextCache`).
        image_context: the embedded CLIP image tokens ``[B or 1, 257, dim]`` (Wan2.1 I2V), or ``None``.
        token_chunk: run the per-token work of each block in chunks of this many tokens (inference only, for
            sequences longer than that: :meth:`WanBlock.forward`), or ``None``.
    """

    modulation: Modulation
    rope: torch.Tensor
    attention: AttentionSpec
    context: torch.Tensor | None = None
    image_context: torch.Tensor | None = None
    token_chunk: int | None = None


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
    """

    kv: list
    output: torch.Tensor
    latents: torch.Tensor
    positions: tuple[int, ...]
    context_cache: ContextCache

    @property
    def blocks(self) -> int:
        """Anchor blocks (latent frames)."""
        return self.latents.shape[2]


# -------------------------------------------------------------------------------------------------------------
# the model
# -------------------------------------------------------------------------------------------------------------


class WanDiT(nn.Module):
    """Wan-class DiT (Wan2.1 T2V/I2V, Wan2.2 I2V/TI2V) running on swift_kernels.

    Args:
        config: a :class:`WanDiTConfig` (e.g. ``WanDiTConfig.preset("wan2.2-ti2v-5b")``).

    Parameters are created with PyTorch's default initialisation (plus Wan's for the modulation tables);
    :meth:`reset_parameters` re-draws them (useful after ``to_empty``). Use :meth:`from_pretrained` to load
    public checkpoints.
    """

    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        if not isinstance(config, WanDiTConfig):
            raise TypeError(f"config must be a WanDiTConfig, got {type(config).__name__}")
        self.config = config
        d = config.dim
        self.patch_embedding = nn.Conv3d(config.in_channels, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.condition_embedder = _ConditionEmbedder(config)
        self.blocks = nn.ModuleList([WanBlock(config) for _ in range(config.num_layers)])
        self.proj_out = nn.Linear(d, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d) / d**0.5)
        self._rope_cache: dict[Any, torch.Tensor] = {}
        # Per-token timesteps: pass the modulation to the fused ops as [K, dim] tables of the K distinct
        # timestep values plus a per-token row index (True), or expanded to [B, L, dim] per token (False; the
        # same numbers, ~6 x B*L*dim*4 more bytes read per block: kept as the reference layout).
        self.indexed_modulation = True
        # Block boundary: "fused" (inference: each block finishes the previous block's FFN residual in the pass
        # of its own AdaLN) or "unfused" (training: each block completes its own residual, so a checkpointed
        # boundary holds one [B, L, dim] tensor). Both give the same bits.
        self.block_boundary = "fused"
        # Activation checkpointing per block (torch.utils.checkpoint, non-reentrant) while grad is enabled:
        # a block's activations are recomputed in the backward instead of kept.
        self.checkpoint_blocks = False
        # Inference on sequences longer than this runs each block's per-token work in chunks of this many
        # tokens (WanBlock._forward_chunked): the working set of a long clip grows by a few stream-sized tensors
        # per token, not by the FFN's width. None: never chunk. The pipeline sets it from its memory plan.
        self.inference_chunk_tokens: int | None = 16384

    # -- bookkeeping ----------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the matmuls (that of the projection weights)."""
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        """The device of the parameters."""
        return self.proj_out.weight.device

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> "WanDiT":
        """Re-draw every parameter in place (works on any device, e.g. after ``to_empty``).

        Linear/conv weights ~ N(0, 1/fan_in) (so activations keep unit scale through random blocks), biases
        small, norm weights 1 (LayerNorm biases 0), modulation tables N(0, 1/dim) as in Wan.
        """
        def randn(p):
            # draw on the parameter's own device unless a (CPU) generator asks for reproducibility
            if generator is None:
                return torch.randn(p.shape, device=p.device, dtype=p.dtype)
            return torch.randn(p.shape, generator=generator, device=generator.device).to(p)

        for name, p in self.named_parameters():
            if name.endswith("scale_shift_table"):
                p.copy_(randn(p) / self.config.dim**0.5)
            elif p.dim() >= 2:
                p.copy_(randn(p) / p[0].numel() ** 0.5)
            elif ".norm" in name or "norm_" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(randn(p) * 0.02)
        return self

    def to_dtype(self, dtype: torch.dtype) -> "WanDiT":
        """Cast the parameters to ``dtype`` except those kept in fp32 (timestep MLP, modulation, LayerNorms)."""
        for name, p in self.named_parameters():
            target = torch.float32 if keeps_fp32(name) else dtype
            if p.dtype != target:
                p.data = p.data.to(target)
        self._rope_cache.clear()
        return self

    # -- conditioning ---------------------------------------------------------------------------------

    def _embed_text(self, context, batch: int) -> torch.Tensor:
        cfg = self.config
        if isinstance(context, (list, tuple)):  # one [L_i, text_dim] tensor per sample (the original's form)
            context = torch.stack([self._pad_text(c, f"context[{i}]") for i, c in enumerate(context)])
        else:
            if not isinstance(context, torch.Tensor):
                raise TypeError(f"context must be a tensor [B, L_text, {cfg.text_dim}] or a list, got {type(context).__name__}")
            if context.dim() == 2:
                context = context.unsqueeze(0)
            if context.dim() != 3 or context.shape[-1] != cfg.text_dim:
                raise ValueError(f"context must be [B, L_text, {cfg.text_dim}], got {tuple(context.shape)}")
            context = torch.stack([self._pad_text(c, "context") for c in context])
        if context.shape[0] not in (1, batch):
            raise ValueError(f"context batch ({context.shape[0]}) must be 1 or the latents' batch ({batch})")
        return self.condition_embedder.text_embedder(context.to(self.device, self.dtype))

    def _pad_text(self, c: torch.Tensor, name: str) -> torch.Tensor:
        cfg = self.config
        if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape[-1] != cfg.text_dim:
            raise ValueError(f"{name} must be [L_text, {cfg.text_dim}] per sample, got {getattr(c, 'shape', type(c))}")
        c = c[: cfg.text_len]
        if c.shape[0] < cfg.text_len:  # zero padding, as the original (the padding still goes through the MLP)
            c = torch.cat((c, c.new_zeros(cfg.text_len - c.shape[0], c.shape[1])))
        return c

    @torch.no_grad()
    def precompute_context(self, context, clip_fea: torch.Tensor | None = None, *, batch: int | None = None) -> ContextCache:
        """Cross-attention keys/values of every block for ``context`` (and ``clip_fea``), to pass as
        ``forward(..., context_cache=...)``: saves the text MLP and 2-4 projections per block and step.

        Args:
            context: ``[B, L_text, text_dim]`` text embeddings (padded/truncated to ``text_len``).
            clip_fea: ``[B, 257, image_dim]`` CLIP image tokens, required by Wan2.1-I2V-class models.
        """
        B = batch if batch is not None else (len(context) if isinstance(context, (list, tuple)) else
                                            (context.shape[0] if isinstance(context, torch.Tensor) and context.dim() == 3 else 1))
        return self._context_kv(context, clip_fea, B)

    def _embed_context(self, context, clip_fea, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embedded text ``[B or 1, text_len, dim]`` and CLIP tokens ``[B or 1, 257, dim]`` (or None)."""
        cfg = self.config
        ctx = self._embed_text(context, batch)
        img = None
        if cfg.image_dim is not None:
            if clip_fea is None:
                raise ValueError(f"this model ({cfg.name}) needs clip_fea [B, {cfg.image_len}, {cfg.image_dim}] (CLIP image tokens)")
            if not isinstance(clip_fea, torch.Tensor) or clip_fea.dim() != 3 or clip_fea.shape[-1] != cfg.image_dim:
                raise ValueError(f"clip_fea must be [B, N, {cfg.image_dim}], got {getattr(clip_fea, 'shape', type(clip_fea))}")
            if clip_fea.shape[0] not in (1, batch):
                raise ValueError(f"clip_fea batch ({clip_fea.shape[0]}) must be 1 or {batch}")
            img = self.condition_embedder.image_embedder(clip_fea.to(self.device, self.dtype))
        elif clip_fea is not None:
            raise ValueError(f"this model ({cfg.name}) takes no CLIP image tokens; pass clip_fea=None")
        return ctx, img

    def _context_kv(self, context, clip_fea, batch: int) -> ContextCache:
        ctx, img = self._embed_context(context, clip_fea, batch)
        # each block computes its own keys/values (WanBlock.context_kv reads only that block's parameters)
        kv = [blk.context_kv(ctx, img) for blk in self.blocks]
        return ContextCache(kv=kv, batch=ctx.shape[0], dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def precompute_anchor(self, latents: torch.Tensor, context_cache: ContextCache,
                          frame_positions: Sequence[int] | torch.Tensor | None = None) -> AnchorCache:
        """The keys and values of a shared anchor that attends only itself, to pass as
        ``forward(..., anchor_cache=...)`` to every call whose sequence starts with it (CSG windows and whole
        clips laid out with ``anchor_attends="anchor"``): those calls then skip the anchor's tokens, and the
        cache costs one forward on the anchor alone.

        Args:
            latents: ``[B, C_in, A, H, W]``: the anchor blocks' model input, as the calls bring it.
            context_cache: the conditioning (:meth:`precompute_context`); the calls must pass the same object.
            frame_positions: the anchors' RoPE frame positions (default ``0..A-1``).

        The anchor runs at timestep 0 (it is clean), attending only itself. Memory: two ``[B, A*P, dim]``
        tensors per block (an estimate for Wan2.2-TI2V-5B at 2560x1408 in bf16: 30 x 2 x 3520 x 3072 x 2 bytes,
        about 1.3 GB per conditioning).
        """
        if not isinstance(context_cache, ContextCache):
            raise TypeError(f"context_cache must come from precompute_context, got {type(context_cache).__name__}")
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            raise ValueError(f"anchor latents must be [B, C, A, H, W], got {getattr(latents, 'shape', type(latents))}")
        B, _, A, Hl, Wl = latents.shape
        P = (Hl // self.config.patch_size[1]) * (Wl // self.config.patch_size[2])
        pos = torch.arange(A) if frame_positions is None else torch.as_tensor(frame_positions).flatten().cpu()
        kv: list = []
        t = torch.zeros(B, A * P, device=self.device)
        output = self.forward(latents, t, frame_positions=pos, context_cache=context_cache, _record_kv=kv)
        return AnchorCache(kv=kv, output=output, latents=latents.clone(), positions=tuple(int(p) for p in pos.tolist()),
                           context_cache=context_cache)

    def _time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(temb [N, dim], e [N, 6, dim]) of timesteps ``t`` [N], fp32."""
        ce = self.condition_embedder
        s = sinusoidal_embedding(t, self.config.freq_dim)
        temb = _linear32(ce.time_embedder.linear_2, F.silu(_linear32(ce.time_embedder.linear_1, s)))
        e = _linear32(ce.time_proj, F.silu(temb)).unflatten(1, (6, self.config.dim))
        return temb, e

    def _modulation(self, timestep, B: int, F_: int, P: int, device) -> Modulation:
        L = F_ * P
        try:
            t = torch.as_tensor(timestep, device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}") from exc
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"timestep must be a float or integer tensor, got {t.dtype}")
        if t.dim() == 0:
            t = t.expand(B)
        if t.dim() == 1:
            if t.shape[0] == 1:
                t = t.expand(B)
            if t.shape[0] != B:
                raise ValueError(f"timestep [B] must have B={B} entries, got {tuple(t.shape)}")
            temb, e = self._time(t)
            return Modulation(temb, e, None)
        if t.dim() != 2 or t.shape[0] not in (1, B) or t.shape[1] not in (L, F_):
            raise ValueError(f"timestep must be [B], [B, L] (L={L} tokens) or [B, F] (F={F_} frames), got {tuple(t.shape)}")
        if t.shape[1] != L:  # per frame -> per token
            t = t[:, :, None].expand(t.shape[0], F_, P).reshape(t.shape[0], L)
        t = t.expand(B, L)
        # Per-token timesteps take few distinct values (0 for conditioning tokens, the step's t otherwise):
        # embed each value once and gather, instead of running the MLPs on every token.
        uniq, inv = torch.unique(t, return_inverse=True)
        temb, e = self._time(uniq)
        if uniq.numel() == 1:  # one value everywhere: the cheaper per-sample layout, same numbers
            return Modulation(temb.expand(B, -1), e.expand(B, -1, -1), None)
        return Modulation(temb, e, inv, indexed=self.indexed_modulation)

    def _rope(self, grid: tuple[int, int, int], positions: torch.Tensor | None, device) -> torch.Tensor:
        key = (grid, None if positions is None else tuple(positions.tolist()), str(device))
        tab = self._rope_cache.get(key)
        if tab is None:
            tab = rope_table(grid, self.config.head_dim, frame_positions=positions, theta=self.config.rope_theta, device=device)
            if len(self._rope_cache) > 64:
                self._rope_cache.clear()
            self._rope_cache[key] = tab
        return tab

    # -- forward ---------------------------------------------------------------------------------------

    def forward(
        self,
        latents: torch.Tensor,
        timestep,
        context=None,
        clip_fea: torch.Tensor | None = None,
        *,
        layout: CSGLayout | None = None,
        block_mask: torch.Tensor | None = None,
        block_tokens: int | None = None,
        attention_plan: AttentionPlan | None = None,
        frame_positions: Sequence[int] | torch.Tensor | None = None,
        context_cache: ContextCache | None = None,
        attention_backend: str | None = None,
        sp_group: "torch.distributed.ProcessGroup | None" = None,
        anchor_cache: AnchorCache | None = None,
        _record_kv: list | None = None,
    ) -> torch.Tensor:
        """Velocity prediction for ``latents``.

        Args:
            latents: ``[B, C_in, F, H, W]`` (H, W multiples of the patch). With a layout, F is the number of
                blocks of the layout's sequence (one block = one latent frame).
            timestep: ``[B]`` (per sample), ``[B, L]`` (per token, ``L = F*H*W/4``, Wan2.2 TI2V / CSG) or
                ``[B, F]`` (per latent frame), float or int; a scalar is broadcast.
            context: ``[B, L_text, text_dim]`` text embeddings (or a list of ``[L_i, text_dim]``), padded with
                zeros / truncated to ``text_len``. Not needed with ``context_cache``.
            clip_fea: ``[B, 257, image_dim]`` CLIP image tokens (Wan2.1 I2V class only).
            layout: a :class:`~swift_kernels.CSGLayout`: its ``block_mask`` drives the self-attention and its
                ``block_ids`` are the RoPE frame positions.
            block_mask, block_tokens: a raw block mask instead of a layout (``block_tokens`` defaults to the
                tokens of one latent frame).
            attention_plan: an :class:`~swift_kernels.AttentionPlan` (``swift_kernels.plan_attention(layout,
                device=...)``) instead of a layout or mask: build it once per window shape and pass it to every
                call, so no call looks a plan up. A plan built from a layout also supplies the RoPE positions.
                Without it, the plan of ``layout`` / ``block_mask`` (dense when neither is given) is looked up
                once per call and shared by every block.
            frame_positions: ``[F]`` RoPE frame index of each latent frame (default ``arange(F)``, or
                ``layout.block_ids``).
            context_cache: the result of :meth:`precompute_context`.
            attention_backend: forwarded to :func:`~swift_kernels.frame_block_attention`.
            sp_group: a sequence-parallel (Ulysses) process group of W ranks, all calling ``forward`` with the
                same arguments: each rank runs its share of the tokens (:func:`swift_model.nets.parallel.shard_sizes`),
                the self-attention exchanges heads and tokens (:func:`swift_model.nets.parallel.ulysses_attention`),
                and the output is gathered, so every rank returns the full (identical) velocity. ``num_heads``
                must be a multiple of W (``ValueError`` otherwise). Differentiable: parameter gradients are then
                each rank's partial sums, to be summed over the group (see :func:`swift_model.nets.parallel.gather_tokens`).
            anchor_cache: from :meth:`precompute_anchor`: the sequence starts with that shared anchor, which
                attends only itself (the layout's ``anchor_attends="anchor"``); its tokens are not run again,
                its keys, values and output come from the cache (the same numbers up to rounding; a mismatch
                of layout, anchor input, timesteps or conditioning is a ``ValueError``). Not with ``sp_group``.

        Returns:
            ``[B, C_out, F, H, W]`` in ``latents.dtype``.
        """
        cfg = self.config
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.dim() != 5:
            raise ValueError(f"latents must be [B, C, F, H, W], got shape {tuple(latents.shape)}")
        if not latents.is_floating_point():
            raise TypeError(f"latents must be a floating-point tensor, got {latents.dtype}")
        B, C, Fr, Hl, Wl = latents.shape
        if C != cfg.in_channels:
            raise ValueError(f"latents must have {cfg.in_channels} channels (config.in_channels), got {C}")
        pt, ph, pw = cfg.patch_size
        if Fr % pt or Hl % ph or Wl % pw:
            raise ValueError(f"latents' (F, H, W) = {(Fr, Hl, Wl)} must be multiples of the patch {cfg.patch_size}")
        Fp, Hp, Wp = Fr // pt, Hl // ph, Wl // pw
        P = Hp * Wp
        L = Fp * P
        H = cfg.num_heads
        device, dtype = self.device, self.dtype
        if latents.device != device:
            raise ValueError(f"latents are on {latents.device} but the model is on {device}")

        # -- attention layout and RoPE positions
        if attention_plan is not None:
            if not isinstance(attention_plan, AttentionPlan):
                raise TypeError(f"attention_plan must be an AttentionPlan, got {type(attention_plan).__name__}")
            if layout is not None or block_mask is not None or block_tokens is not None:
                raise ValueError("pass one of attention_plan, layout or block_mask/block_tokens")
            if attention_plan.num_tokens != L:
                raise ValueError(f"attention_plan covers {attention_plan.num_tokens} tokens, the latents have {L}")
            if attention_plan.device != device:
                raise ValueError(f"attention_plan lives on {attention_plan.device}, the model on {device}")
            layout = attention_plan.layout
            if layout is not None and frame_positions is None and layout.block_tokens == P:
                frame_positions = layout.block_ids
            plan = attention_plan
        elif layout is not None:
            if not isinstance(layout, CSGLayout):
                raise TypeError(f"layout must be a CSGLayout, got {type(layout).__name__}")
            if block_mask is not None or block_tokens is not None:
                raise ValueError("pass either layout or block_mask/block_tokens, not both")
            if layout.num_seq_blocks != Fp or layout.block_tokens != P:
                raise ValueError(
                    f"layout lays out {layout.num_seq_blocks} blocks of {layout.block_tokens} tokens, but the latents "
                    f"have {Fp} latent frames of {P} tokens"
                )
            if frame_positions is None:
                frame_positions = layout.block_ids
            plan = plan_attention(layout, device=device)
        elif block_mask is not None:
            plan = plan_attention(block_mask, P if block_tokens is None else block_tokens, device=device)
        else:
            if block_tokens is not None:
                raise ValueError("block_tokens needs a block_mask")
            plan = plan_attention(_DENSE_TABLE, L, device=device)
        pos = None
        if frame_positions is not None:
            try:
                pos = torch.as_tensor(frame_positions).flatten().cpu()
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(f"frame_positions must be numbers, got {frame_positions!r}") from exc
            if pos.numel() != Fp:
                raise ValueError(f"frame_positions must have {Fp} entries (one per latent frame), got {pos.numel()}")
        freqs = self._rope((Fp, Hp, Wp), pos, device)

        # -- sequence parallelism: checked before any work, identically on every rank
        W = group_size(sp_group)
        if W > 1:
            check_heads(H, W)
            sp_sizes = shard_sizes(L, W)
        else:
            sp_group = sp_sizes = None

        anchor_tokens = 0
        if anchor_cache is not None:
            anchor_tokens = self._check_anchor_cache(anchor_cache, layout, latents, timestep, pos, context_cache,
                                                     sp_group, P)

        # -- conditioning
        ctx = img = None
        if context_cache is None:
            if context is None:
                raise ValueError("context (text embeddings) is required unless context_cache is given")
            ctx, img = self._embed_context(context, clip_fea, B)
        elif not isinstance(context_cache, ContextCache):
            raise TypeError(f"context_cache must come from precompute_context, got {type(context_cache).__name__}")
        elif context_cache.batch not in (1, B):
            raise ValueError(f"context_cache was built for batch {context_cache.batch}, latents have batch {B}")
        elif len(context_cache.kv) != len(self.blocks):
            raise ValueError(f"context_cache holds {len(context_cache.kv)} blocks, the model has {len(self.blocks)}")
        mod = self._modulation(timestep, B, Fp, P, device)

        # -- patch embedding: [B, C, F, H, W] -> [B, L, dim]
        if anchor_tokens:  # only the tokens after the cached anchor run
            A = anchor_cache.blocks
            x = self.patch_embedding(latents[:, :, A * pt:].to(dtype)).flatten(2).transpose(1, 2).contiguous()
            freqs = freqs[anchor_tokens:]
            mod = mod.shard(anchor_tokens, L)
        else:
            x = self.patch_embedding(latents.to(dtype)).flatten(2).transpose(1, 2).contiguous()
        if sp_group is not None:
            # this rank's tokens: the stream, their RoPE rows and their modulation rows; nothing else is per token
            start, end = token_range(L, W, group_rank(sp_group))
            x = x[:, start:end].contiguous()
            freqs = freqs[start:end]
            mod = mod.shard(start, end)

        chunk = self.inference_chunk_tokens
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"inference_chunk_tokens must be a positive int or None, got {chunk!r}")
        inputs = BlockInputs(modulation=mod, rope=freqs, context=ctx, image_context=img,
                             attention=AttentionSpec(plan, attention_backend, sp_group,
                                                     None if sp_sizes is None else tuple(sp_sizes)),
                             token_chunk=None if torch.is_grad_enabled() else chunk)
        # the stream is handed over in a list that _run_blocks empties: a reference left in this frame would keep
        # the embedded tokens alive through every block (one [B, L, dim] tensor more at each block's peak)
        stream = [x]
        del x
        out = self._head(*self._run_blocks(stream, inputs, context_cache, anchor_cache, _record_kv), mod)
        if sp_group is not None:
            out = gather_tokens(out, sp_group, sp_sizes)  # the full velocity, identical on every rank
        # unpatchify: features are ordered (pt, ph, pw, c)
        Fo = Fp - anchor_tokens // P
        out = out.view(B, Fo, Hp, Wp, pt, ph, pw, cfg.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, cfg.out_channels, Fo * pt, Hl, Wl).to(latents.dtype)
        if anchor_tokens:
            out = torch.cat([anchor_cache.output.to(out.dtype).expand(B, -1, -1, -1, -1), out], 2)
        return out

    def _check_anchor_cache(self, cache, layout, latents, timestep, positions, context_cache, sp_group, P) -> int:
        """Raise unless ``cache`` is exact for this call; return the anchor's token count."""
        from swift_kernels.attention.layout import ROLE_ANCHOR

        if not isinstance(cache, AnchorCache):
            raise TypeError(f"anchor_cache must come from precompute_anchor, got {type(cache).__name__}")
        if sp_group is not None:
            raise ValueError("anchor_cache does not combine with sp_group")
        A = cache.blocks
        roles = None if layout is None else layout.block_roles.tolist()
        if (layout is None or layout.anchor_attends != "anchor" or roles[:A] != [ROLE_ANCHOR] * A
                or ROLE_ANCHOR in roles[A:]):
            raise ValueError("anchor_cache needs a layout whose sequence starts with the one shared anchor, attending "
                             "only itself (CSGLayout(anchor_attends='anchor'), no anchor copies)")
        if context_cache is not cache.context_cache:
            raise ValueError("anchor_cache was built with another context_cache (the anchor depends on the conditioning)")
        head = latents[:, :, :A]
        if head.shape[1:] != cache.latents.shape[1:] or cache.latents.shape[0] not in (1, latents.shape[0]) \
                or not torch.equal(head, cache.latents.expand_as(head).to(head.dtype)):
            raise ValueError("the sequence's anchor blocks differ from the ones anchor_cache was built from")
        if positions is None or tuple(positions[:A].tolist()) != cache.positions:
            raise ValueError(f"the anchors' frame positions must be {cache.positions} as in anchor_cache")
        t = torch.as_tensor(timestep, device=latents.device)
        if t.dim() != 2 or t.shape[1] not in (latents.shape[2] * P, latents.shape[2]):
            raise ValueError("with anchor_cache, timestep must be per token or per frame (0 on the anchor)")
        if bool((t[:, :A * P] if t.shape[1] != latents.shape[2] else t[:, :A]).ne(0).any()):
            raise ValueError("with anchor_cache the anchor's timestep must be 0 (it is clean)")
        return A * P

    def _run_blocks(self, stream: list, inputs: BlockInputs, context_cache: ContextCache | None,
                    anchor_cache: AnchorCache | None = None, record_kv: list | None = None):
        """Every block in order, at the chosen boundary, checkpointed or not; returns ``(x, pending)``.
        ``stream``: ``[x]``, the embedded tokens, taken out of the list (so that only this frame holds them)."""
        x = stream.pop()
        if self.block_boundary not in BLOCK_BOUNDARIES:
            raise ValueError(f"block_boundary must be one of {BLOCK_BOUNDARIES}, got {self.block_boundary!r}")
        defer = self.block_boundary == "fused"
        recompute = self.checkpoint_blocks and torch.is_grad_enabled()
        pending = None
        for i, blk in enumerate(self.blocks):
            kv = None if context_cache is None else context_cache.kv[i]
            extra = {}  # only when used, so wrapped blocks that predate them see the same call
            if anchor_cache is not None:
                extra["anchor_kv"] = anchor_cache.kv[i]
            if record_kv is not None:
                extra["record_kv"] = record_kv
            if recompute:
                x, pending = checkpoint(blk, x, inputs, pending, context_kv=kv, defer_residual=defer,
                                        use_reentrant=False, **extra)
            else:
                x, pending = blk(x, inputs, pending, context_kv=kv, defer_residual=defer, **extra)
        return x, pending

    def _head(self, x: torch.Tensor, pending, mod: Modulation) -> torch.Tensor:
        """Final AdaLN (finishing the last block's residual when it is pending) and output projection."""
        shift, scale = mod.head(self.scale_shift_table, 0), mod.head(self.scale_shift_table, 1)
        if pending is None:
            xm = adaln_modulate(x, shift, scale, self.config.eps, mod_index=mod.index)
        else:
            _, xm = gated_residual(x, *pending, shift=shift, scale=scale, eps=self.config.eps, mod_index=mod.index)
        return self.proj_out(xm)

    # -- loading ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        lora=None,
        lora_scale: float = 1.0,
        config: WanDiTConfig | None = None,
        extra_in_channels: int = 0,
        stage: str | None = None,
    ) -> "WanDiT":
        """Load a public checkpoint: a diffusers-format folder or an original Wan file/folder.

        ``path``: folder or file. ``device``: default CUDA when available, else CPU. ``dtype``: default bf16 on
        CUDA, fp32 on CPU (the timestep MLP, modulation tables and affine LayerNorms stay fp32). ``lora``: a
        LoRA path, state dict or list of ``(path_or_state_dict, scale)`` merged at load time, at ``lora_scale``.
        ``config``: the architecture when the checkpoint has none. ``extra_in_channels``: zero-initialised extra
        input channels (48 for the Stage II "swift" variant). ``stage``: the label errors carry (``"stage1"``,
        ``"stage2"``). Returns the model in eval-ready form on ``device``. Raises ``FileNotFoundError`` (missing
        files), ``TypeError``/``ValueError`` (bad arguments, unreadable files, unknown format,
        missing/unexpected keys, shape mismatches); see :func:`swift_model.loading.checkpoint.load_dit`.
        """
        if _pretrained_loader is None:
            raise RuntimeError("no checkpoint loader registered: import swift_model (its __init__ imports "
                               "swift_model.loading.checkpoint, which registers it)")
        return _pretrained_loader(path, device=device, dtype=dtype, lora=lora, lora_scale=lora_scale, config=config,
                                  extra_in_channels=extra_in_channels, stage=stage, model_cls=cls)


# The checkpoint loader belongs to a later layer (swift_model.loading.checkpoint), which imports this module; this
# module must not import it back (not even lazily inside a function: that is the cycle the layering
# forbids). The loader hands itself over when it is imported instead, and swift_model/__init__.py imports
# it, so it is in place before any code can reach WanDiT. The dependency points one way, and the call
# goes through a function value.
_pretrained_loader = None


def register_pretrained_loader(loader) -> None:
    """Install the function behind :meth:`WanDiT.from_pretrained` (called by :mod:`swift_model.loading.checkpoint`)."""
    global _pretrained_loader
    _pretrained_loader = loader
