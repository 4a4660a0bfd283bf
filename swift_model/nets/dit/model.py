"""The DiT itself: :class:`WanDiT` (embedding, the blocks in order, the head, the caches it builds, the call's
checks) and the hook through which the loading layer supplies :meth:`WanDiT.from_pretrained`
(:func:`register_pretrained_loader`). The package docstring (:mod:`swift_model.nets.dit`) describes the model."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from swift_kernels import AttentionPlan, CSGLayout
from swift_kernels.dit_ops import adaln_modulate, gated_residual, rope_table

from ..config import WanDiTConfig
from ..parallel import check_heads, gather_tokens, group_rank, group_size, shard_sizes, token_range
from .blocks import BLOCK_BOUNDARIES, AttentionSpec, BlockInputs, WanBlock
from .caches import AnchorCache, ContextCache, check_anchor_cache
from .conditioning import (FrameTimesteps, Modulation, _ConditionEmbedder, frame_timestep_tensors,
                           timestep_modulation)
from .layers import keeps_fp32
from .sequence import frame_position_tuple, position_tuple, resolve_sequence


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
        # device copies of host-known call inputs (per-frame timesteps' values and row index), keyed by the host
        # values: a call in a loop copies nothing from the host once its inputs were seen (or prepare_call ran)
        self._host_inputs: dict[Any, Any] = {}
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
                          frame_positions: Sequence[int] | torch.Tensor | None = None, *,
                          check_latents: bool = True, attention_plan: AttentionPlan | None = None) -> AnchorCache:
        """The keys and values of a shared anchor that attends only itself, to pass as
        ``forward(..., anchor_cache=...)`` to every call whose sequence starts with it (CSG windows and whole
        clips laid out with ``anchor_attends="anchor"``): those calls then skip the anchor's tokens, and the
        cache costs one forward on the anchor alone.

        Args:
            latents: ``[B, C_in, A, H, W]``: the anchor blocks' model input, as the calls bring it.
            context_cache: the conditioning (:meth:`precompute_context`); the calls must pass the same object.
            frame_positions: the anchors' RoPE frame positions (default ``0..A-1``); a sequence of ints is read on
                the host, a tensor once (a synchronisation for a GPU tensor).
            check_latents: whether every call compares its anchor blocks with ``latents`` (``torch.equal``, a read
                of device data). Pass ``False`` when the calls bring this anchor input by construction (the CSG
                loop never modifies the anchor block): the layout, positions, timesteps, conditioning and shapes
                are still checked, on the host with :class:`FrameTimesteps` and positions given as a sequence.
            attention_plan: the anchor's own (dense) attention plan, built ahead; default: looked up (built on
                first use, a host-to-device copy).

        The anchor runs at timestep 0 (it is clean, :meth:`FrameTimesteps.zeros`), attending only itself. Memory:
        two ``[B, A*P, dim]`` tensors per block (an estimate for Wan2.2-TI2V-5B at 2560x1408 in bf16:
        30 x 2 x 3520 x 3072 x 2 bytes, about 1.3 GB per conditioning).
        """
        if not isinstance(context_cache, ContextCache):
            raise TypeError(f"context_cache must come from precompute_context, got {type(context_cache).__name__}")
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            raise ValueError(f"anchor latents must be [B, C, A, H, W], got {getattr(latents, 'shape', type(latents))}")
        if not isinstance(check_latents, bool):
            raise TypeError(f"check_latents must be a bool, got {type(check_latents).__name__}")
        A = latents.shape[2]
        positions = tuple(range(A)) if frame_positions is None else frame_position_tuple(frame_positions)
        kv: list = []
        output = self.forward(latents, FrameTimesteps.zeros(A), frame_positions=positions,
                              context_cache=context_cache, attention_plan=attention_plan, _record_kv=kv)
        return AnchorCache(kv=kv, output=output, latents=latents.clone(), positions=positions,
                           context_cache=context_cache, check_latents=check_latents)

    def _time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(temb [N, dim], e [N, 6, dim]) of timesteps ``t`` [N], fp32."""
        return self.condition_embedder.time(t)

    def _modulation(self, timestep, B: int, F_: int, P: int, device) -> Modulation:
        """The modulation of ``timestep`` for ``B`` samples of ``F_`` latent frames of ``P`` tokens
        (:func:`~swift_model.nets.dit.conditioning.timestep_modulation`)."""
        return timestep_modulation(timestep, B, F_, P, device, self._time, indexed=self.indexed_modulation,
                                   host_cache=self._host_inputs)

    def _rope(self, grid: tuple[int, int, int], positions: tuple | torch.Tensor | None, device) -> torch.Tensor:
        """The RoPE table of ``grid`` at the frame ``positions`` (a tuple, or a CPU tensor read here), cached."""
        positions = position_tuple(positions)
        key = (grid, positions, str(device))
        tab = self._rope_cache.get(key)
        if tab is None:
            tab = rope_table(grid, self.config.head_dim, frame_positions=positions, theta=self.config.rope_theta, device=device)
            if len(self._rope_cache) > 64:
                self._rope_cache.clear()
            self._rope_cache[key] = tab
        return tab

    @property
    def host_input_cache(self) -> dict:
        """The device copies of host-known call inputs (per-frame timesteps' values and row index) the calls reuse,
        keyed by the host values (filled by the calls and by :meth:`prepare_call`)."""
        return self._host_inputs

    def prepare_call(self, latent_shape: Sequence[int], frame_positions: Sequence[int] | None = None,
                     timesteps: Sequence[FrameTimesteps] = ()) -> torch.Tensor:
        """Build ahead what a call on latents of ``latent_shape`` (``[B, C, F, H, W]``) at ``frame_positions``
        (default ``0..F-1``) with each of ``timesteps`` copies from the host to the device: its RoPE table and the
        timesteps' distinct values and row index. The calls then copy nothing from the host (a host-to-device
        copy waits for the device), so a loop of them never stalls; returns the RoPE table (float32 ``[L, ...]``).
        """
        if len(latent_shape) != 5:
            raise ValueError(f"latent_shape must be [B, C, F, H, W], got {tuple(latent_shape)}")
        B, _, Fr, Hl, Wl = (int(v) for v in latent_shape)
        pt, ph, pw = self.config.patch_size
        grid = (Fr // pt, Hl // ph, Wl // pw)
        positions = None if frame_positions is None else frame_position_tuple(frame_positions, grid[0])
        for t in timesteps:
            if not isinstance(t, FrameTimesteps) or len(t) != grid[0]:
                raise ValueError(f"timesteps must be FrameTimesteps of {grid[0]} frames, got {t!r}")
            frame_timestep_tensors(t, B, grid[1] * grid[2], self.device, self._host_inputs)
        return self._rope(grid, positions, self.device)

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
        rope_table: torch.Tensor | None = None,
        _record_kv: list | None = None,
    ) -> torch.Tensor:
        """Velocity prediction for ``latents``.

        Args:
            latents: ``[B, C_in, F, H, W]`` (H, W multiples of the patch). With a layout, F is the number of
                blocks of the layout's sequence (one block = one latent frame).
            timestep: ``[B]`` (per sample), ``[B, L]`` (per token, ``L = F*H*W/4``, Wan2.2 TI2V / CSG) or
                ``[B, F]`` (per latent frame), float or int; a scalar is broadcast. Or a :class:`FrameTimesteps`:
                one value per latent frame known on the host, the same bits as the per-token tensor
                (:meth:`FrameTimesteps.token_timesteps`) with no read of device data (a per-token tensor's
                distinct values are found with ``torch.unique``: a synchronisation on a GPU). Or a
                :class:`~swift_model.nets.dit.conditioning.DeviceFrameTimesteps`: that structure with the values
                read from a device tensor (a CUDA graph's static input).
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
                ``layout.block_ids``). A sequence of ints is kept on the host (the RoPE table's cache key, the
                anchor-cache check); a tensor is copied to the host once, which for a GPU tensor is a
                synchronisation.
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
                of layout, anchor input, positions, timesteps or conditioning is a ``ValueError``; the anchor
                input is compared unless the cache was built with ``check_latents=False``). Not with ``sp_group``.
            rope_table: the RoPE table of this call's frame positions (:meth:`prepare_call` returns it), used
                instead of the model's own lookup: a CUDA graph passes a static buffer it refills per window.

        Returns:
            ``[B, C_out, F, H, W]`` in ``latents.dtype``.

        With :class:`FrameTimesteps`, ``frame_positions`` as a sequence, a caller-built ``attention_plan`` or a
        ``layout``, and an ``anchor_cache`` (if any) built with ``check_latents=False``, the call reads no device
        data: it runs without a host synchronisation, and on fake tensors.
        """
        B, (Fp, Hp, Wp) = self._check_latents(latents)
        P, device = Hp * Wp, self.device
        L = Fp * P
        plan, layout, positions = resolve_sequence(
            Fp, P, device, attention_plan=attention_plan, layout=layout, block_mask=block_mask,
            mask_block_tokens=block_tokens, frame_positions=frame_positions)
        if rope_table is None:
            freqs = self._rope((Fp, Hp, Wp), positions, device)
        elif not isinstance(rope_table, torch.Tensor) or rope_table.shape[0] != L or rope_table.device != device:
            raise ValueError(f"rope_table must be a tensor of {L} rows (one per token) on {device}, got "
                             f"{tuple(getattr(rope_table, 'shape', ()))} on {getattr(rope_table, 'device', None)}")
        else:
            freqs = rope_table
        sp_group, sp_sizes = self._sequence_parallel(sp_group, L)
        anchor_tokens = 0
        if anchor_cache is not None:
            anchor_tokens = self._check_anchor_cache(anchor_cache, layout, latents, timestep, positions, context_cache,
                                                     sp_group, P)
        ctx, img = self._conditioning(context, clip_fea, context_cache, B)
        mod = self._modulation(timestep, B, Fp, P, device)
        x, freqs, mod = self._embed_patches(latents, anchor_cache, anchor_tokens, freqs, mod, L)
        if sp_group is not None:
            x, freqs, mod = self._shard_tokens(x, freqs, mod, sp_group, L, len(sp_sizes))

        chunk = self.inference_chunk_tokens
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"inference_chunk_tokens must be a positive int or None, got {chunk!r}")
        inputs = BlockInputs(modulation=mod, rope=freqs, context=ctx, image_context=img,
                             attention=AttentionSpec(plan, attention_backend, sp_group, sp_sizes),
                             token_chunk=None if torch.is_grad_enabled() else chunk)
        # the stream is handed over in a list that _run_blocks empties: a reference left in this frame would keep
        # the embedded tokens alive through every block (one [B, L, dim] tensor more at each block's peak)
        stream = [x]
        del x
        out = self._head(*self._run_blocks(stream, inputs, context_cache, anchor_cache, _record_kv), mod)
        if sp_group is not None:
            out = gather_tokens(out, sp_group, list(sp_sizes))  # the full velocity, identical on every rank
        return self._unpatchify(out, latents, anchor_cache if anchor_tokens else None)

    def _check_latents(self, latents) -> tuple[int, tuple[int, int, int]]:
        """``(B, (F, H, W))`` in patches of a call's latents; raises unless they fit the model."""
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
        if latents.device != self.device:
            raise ValueError(f"latents are on {latents.device} but the model is on {self.device}")
        return B, (Fr // pt, Hl // ph, Wl // pw)

    def _sequence_parallel(self, sp_group, num_tokens: int) -> tuple[Any, tuple[int, ...] | None]:
        """``(group, tokens of every rank)``, or ``(None, None)`` for one rank; checked before any work, identically
        on every rank."""
        W = group_size(sp_group)
        if W <= 1:
            return None, None
        check_heads(self.config.num_heads, W)
        return sp_group, tuple(shard_sizes(num_tokens, W))

    def _conditioning(self, context, clip_fea, context_cache: ContextCache | None,
                      batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The embedded text and image tokens of a call (``None, None`` with a valid ``context_cache``)."""
        if context_cache is None:
            if context is None:
                raise ValueError("context (text embeddings) is required unless context_cache is given")
            return self._embed_context(context, clip_fea, batch)
        if not isinstance(context_cache, ContextCache):
            raise TypeError(f"context_cache must come from precompute_context, got {type(context_cache).__name__}")
        if context_cache.batch not in (1, batch):
            raise ValueError(f"context_cache was built for batch {context_cache.batch}, latents have batch {batch}")
        if len(context_cache.kv) != len(self.blocks):
            raise ValueError(f"context_cache holds {len(context_cache.kv)} blocks, the model has {len(self.blocks)}")
        return None, None

    def _embed_patches(self, latents: torch.Tensor, anchor_cache: AnchorCache | None, anchor_tokens: int,
                       freqs: torch.Tensor, mod: Modulation,
                       num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, Modulation]:
        """Patch embedding ``[B, C, F, H, W] -> [B, L, dim]`` with the RoPE rows and modulation of those tokens:
        with ``anchor_tokens`` (those of ``anchor_cache``), only the tokens after the cached anchor run."""
        if not anchor_tokens:
            x = self.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2).contiguous()
            return x, freqs, mod
        A, pt = anchor_cache.blocks, self.config.patch_size[0]
        x = self.patch_embedding(latents[:, :, A * pt:].to(self.dtype)).flatten(2).transpose(1, 2).contiguous()
        return x, freqs[anchor_tokens:], mod.shard(anchor_tokens, num_tokens)

    @staticmethod
    def _shard_tokens(x: torch.Tensor, freqs: torch.Tensor, mod: Modulation, sp_group, num_tokens: int,
                      world_size: int) -> tuple[torch.Tensor, torch.Tensor, Modulation]:
        """This rank's tokens of the sequence-parallel group: the stream, their RoPE rows and their modulation
        rows (nothing else is per token)."""
        start, end = token_range(num_tokens, world_size, group_rank(sp_group))
        return x[:, start:end].contiguous(), freqs[start:end], mod.shard(start, end)

    def _unpatchify(self, out: torch.Tensor, latents: torch.Tensor, anchor_cache: AnchorCache | None) -> torch.Tensor:
        """The head's tokens ``[B, L', prod(patch) * C_out]`` as ``[B, C_out, F, H, W]`` in ``latents.dtype``,
        after the cached anchor's output when the anchor did not run."""
        cfg = self.config
        B, _, Fr, Hl, Wl = latents.shape
        pt, ph, pw = cfg.patch_size
        Hp, Wp = Hl // ph, Wl // pw
        # features are ordered (pt, ph, pw, c)
        Fo = Fr // pt - (0 if anchor_cache is None else anchor_cache.blocks)
        out = out.view(B, Fo, Hp, Wp, pt, ph, pw, cfg.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, cfg.out_channels, Fo * pt, Hl, Wl).to(latents.dtype)
        if anchor_cache is not None:
            out = torch.cat([anchor_cache.output.to(out.dtype).expand(B, -1, -1, -1, -1), out], 2)
        return out

    def _check_anchor_cache(self, cache, layout, latents, timestep, positions, context_cache, sp_group, P) -> int:
        """Raise unless ``cache`` is exact for this call; return the anchor's token count
        (:func:`~swift_model.nets.dit.caches.check_anchor_cache`)."""
        return check_anchor_cache(cache, layout, latents, timestep, positions, context_cache, sp_group, P)

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
