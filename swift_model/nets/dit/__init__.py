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

The package, one job per module: :mod:`.layers` (norms, MLPs, attention projections, the fp32 parameters),
:mod:`.blocks` (:class:`WanBlock` and what a call hands every block), :mod:`.conditioning` (the embedders, the
timestep modulation, :class:`FrameTimesteps`), :mod:`.caches` (:class:`ContextCache`, :class:`AnchorCache` and the
anchor-cache check), :mod:`.sequence` (a call's attention plan and RoPE frame positions), :mod:`.model`
(:class:`WanDiT` and the checkpoint-loader hook), :mod:`.compiled` (regional compilation: one compiled block
reused by every block, :func:`compile_blocks`).

Host-known inputs: ``timestep`` as :class:`FrameTimesteps`, ``frame_positions`` as a sequence of ints and an
anchor cache built with ``precompute_anchor(..., check_latents=False)`` let a call run without reading device data
(no host synchronisation on a GPU; runnable on fake tensors).
"""

from __future__ import annotations

from . import model as _model
from .blocks import BLOCK_BOUNDARIES, AttentionSpec, BlockInputs, WanBlock
from .caches import AnchorCache, ContextCache
from .compiled import CompileStats, compile_blocks
from .conditioning import DeviceFrameTimesteps, FrameTimesteps, Modulation, sinusoidal_embedding
from .layers import FP32_PARAM_PATTERNS, keeps_fp32
from .model import WanDiT, register_pretrained_loader

__all__ = [
    "AnchorCache",
    "AttentionSpec",
    "BLOCK_BOUNDARIES",
    "BlockInputs",
    "CompileStats",
    "ContextCache",
    "DeviceFrameTimesteps",
    "FP32_PARAM_PATTERNS",
    "FrameTimesteps",
    "Modulation",
    "WanBlock",
    "WanDiT",
    "compile_blocks",
    "keeps_fp32",
    "register_pretrained_loader",
    "sinusoidal_embedding",
]


def __getattr__(name: str):
    # the loader registered behind WanDiT.from_pretrained lives in .model (set after this package is imported)
    if name == "_pretrained_loader":
        return _model._pretrained_loader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
