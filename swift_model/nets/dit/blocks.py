"""The transformer block of the DiT and what one forward call hands every block.

- :class:`WanBlock`: one Wan block (AdaLN self-attention, cross-attention, FFN) reading only its own parameters,
  with the two block boundaries of :data:`BLOCK_BOUNDARIES` and a chunked no-grad path for long sequences;
- :class:`BlockInputs`: what all blocks of one call share (the modulation, the RoPE table, the embedded context,
  the self-attention spec);
- :class:`AttentionSpec`: how a block runs its self-attention (the plan, the backend, the sequence-parallel group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from swift_kernels import AttentionPlan, frame_block_attention
from swift_kernels.dit_ops import adaln_modulate, gated_residual, qk_norm_rope

from ..config import WanDiTConfig
from ..parallel import ulysses_attention
from .conditioning import Modulation
from .layers import _Attention, _FeedForward, _LayerNorm

# The block boundaries of WanDiT.block_boundary (see WanBlock).
BLOCK_BOUNDARIES = ("fused", "unfused")


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
