"""LoRA training of Stage I at its low resolution (the method's "low-res LoRA").

Stage I (a Wan2.1-I2V-class DiT) runs SwiftI2V at a quarter of the output size per side, below the sizes it
was trained at. A low-rank adapter trained on clips at that size adapts it. Training is plain flow matching on
the Stage I VAE latents of the low-resolution clips, conditioned on each clip's first frame exactly as the
pipeline's Stage I is (:func:`swift_model.training.transition.stage1_conditioning` and
:func:`~swift_model.generation.stage1.stage1_model_input`): the noisy state ``(1 - sigma) z + sigma eps``, timestep
``1000 sigma``, target ``eps - z`` (the sampler's ``x0 = x - sigma v``); with TI2V conditioning the clean image
frame is left out of the loss.

The base weights stay frozen; :class:`LoraAdapters` adds ``scale * up(down(x))`` to the output of each target
linear layer by a forward hook (fp32 factors, the low-rank product never materialised as a full matrix). The
result is written as kohya-style factors with diffusers module names (``blocks.0.attn1.to_q.lora_down.weight``,
``.lora_up.weight``, ``.alpha``), the format :mod:`swift_model.loading.lora` merges: ``swift-i2v generate --stage1-lora``
loads it, and the merged weight is ``W + (alpha / rank) * up @ down``, what the hooks computed.

One process, one clip per step (no FSDP here: the adapter is small, the frozen 14B base in bf16 fits one large
GPU with activation checkpointing, which is on by default on CUDA).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dataset import atomic_write_bytes
from .packing import TIMESTEP_SAMPLINGS, sample_sigmas
from ..generation.stage1 import stage1_conditioning, stage1_model_input

# The linear layers of every block that get an adapter (diffusers names, relative to ``blocks.N``): the
# projections of both attentions and the feed-forward, as the public Wan LoRAs cover.
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
           "ffn.net.0.proj", "ffn.net.2")


class LoraAdapters(nn.Module):
    """Trainable low-rank factors on a frozen DiT's linear layers.

    Args:
        dit: the :class:`~swift_model.WanDiT` to adapt (not modified; :meth:`attach` hooks it).
        rank: the rank ``r`` of every adapter.
        alpha: the LoRA alpha (default ``rank``): the update is ``(alpha / rank) * up @ down``.
        targets: module names relative to each block (default :data:`TARGETS`).
        generator: for the initial ``down`` factors (uniform in ``+-1/sqrt(in_features)``); ``up`` starts at
            zero, so the adapted model starts as the base.
    """

    def __init__(self, dit, rank: int = 16, alpha: float | None = None, targets=TARGETS,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        modules = dict(dit.named_modules())
        self.names: list[str] = []
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for i in range(len(dit.blocks)):
            for t in targets:
                name = f"blocks.{i}.{t}"
                mod = modules.get(name)
                if mod is None:
                    continue
                if not isinstance(mod, nn.Linear):
                    raise ValueError(f"LoRA target {name} is a {type(mod).__name__}, not a linear layer")
                bound = 1.0 / math.sqrt(mod.in_features)
                down = (torch.rand(rank, mod.in_features, generator=generator) * 2 - 1) * bound
                self.down.append(nn.Parameter(down.to(mod.weight.device)))
                self.up.append(nn.Parameter(torch.zeros(mod.out_features, rank, device=mod.weight.device)))
                self.names.append(name)
        if not self.names:
            raise ValueError(f"no LoRA target of {list(targets)} found in the model")
        self._modules_of = [modules[n] for n in self.names]
        self._handles: list = []

    def attach(self) -> "LoraAdapters":
        """Hook every target layer: its output gains ``scale * up(down(x))``. Returns self."""
        self.detach()
        for k, mod in enumerate(self._modules_of):
            self._handles.append(mod.register_forward_hook(self._hook(k)))
        return self

    def detach(self) -> None:
        """Remove the hooks (the DiT is the base again)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, k: int):
        def hook(module, args, out):
            down, up = self.down[k], self.up[k]
            low = F.linear(F.linear(args[0].to(down.dtype), down), up)
            return out + (self.scale * low).to(out.dtype)

        return hook

    @torch.no_grad()
    def delta(self, name: str) -> torch.Tensor:
        """The fp32 weight update ``(alpha / rank) * up @ down`` of target ``name``, as the loader merges it."""
        k = self.names.index(name)
        return self.scale * (self.up[k].float() @ self.down[k].float())

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter as LoRA file tensors (fp32, CPU): ``<module>.lora_down.weight``, ``.lora_up.weight``,
        ``.alpha`` per target."""
        out = {}
        for name, down, up in zip(self.names, self.down, self.up):
            out[f"{name}.lora_down.weight"] = down.detach().float().cpu().contiguous()
            out[f"{name}.lora_up.weight"] = up.detach().float().cpu().contiguous()
            out[f"{name}.alpha"] = torch.tensor(self.alpha)
        return out

    def save(self, path) -> None:
        """Write the LoRA file (safetensors) atomically."""
        from safetensors.torch import save

        atomic_write_bytes(_path(path), save(self.lora_state_dict(), metadata={"format": "swift-i2v stage1 lora",
                                                                              "rank": str(self.rank),
                                                                              "alpha": str(self.alpha)}))


def _path(path):
    from pathlib import Path

    return Path(os.fspath(path))


@dataclass
class Stage1Clip:
    """One training clip, encoded once: Stage I latents ``z`` ``[1, C, T, h, w]``, the conditioning of
    :func:`~swift_model.training.transition.stage1_conditioning`, prompt embeddings and CLIP image tokens (or ``None``)."""

    z: torch.Tensor
    ti2v: bool
    cond: torch.Tensor
    context: torch.Tensor
    clip_fea: torch.Tensor | None


@torch.no_grad()
def encode_clip(dit, vae1, clip_low: torch.Tensor, context: torch.Tensor, image_encoder=None) -> Stage1Clip:
    """A :class:`Stage1Clip` of ``clip_low`` ``[3, F, h1, w1]`` in ``[-1, 1]`` (at the Stage I size)."""
    device = dit.device
    frames = clip_low.shape[1]
    ti2v, cond = stage1_conditioning(dit, vae1, clip_low[:, 0], frames, device)
    z = vae1.encode(clip_low[None]).to(device)
    fea = image_encoder.encode(clip_low[:, 0]) if image_encoder is not None else None
    return Stage1Clip(z, ti2v, cond, context.to(device), None if fea is None else fea.to(device))


def lora_loss(dit, clip: Stage1Clip, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching loss (fp32) of the adapted Stage I on ``clip`` at noise level ``sigma``."""
    dtype = dit.dtype
    x = (1.0 - sigma) * clip.z + sigma * noise
    inp, tt = stage1_model_input(x, clip.ti2v, clip.cond, 1000.0 * sigma, dtype)
    fea = None if clip.clip_fea is None else clip.clip_fea.to(dtype)
    v = dit(inp, tt, clip.context.to(dtype), fea).float()
    target = noise - clip.z
    first = 1 if clip.ti2v else 0  # the clean image frame carries no loss
    return (v[:, :, first:] - target[:, :, first:]).square().mean()


def train_stage1_lora(dit, clips: list[Stage1Clip], *, rank: int = 16, alpha: float | None = None, steps: int = 1000,
                      lr: float = 1e-4, seed: int = 0, shift: float = 5.0, timestep_sampling: str = "logit_normal",
                      checkpoint_blocks: bool | None = None, progress: bool = True) -> tuple[LoraAdapters, list[float]]:
    """Train a :class:`LoraAdapters` on ``clips`` (one random clip and noise level per step, AdamW on the
    factors only, the base frozen). Returns the adapters (detached from ``dit``) and the loss of every step.

    ``checkpoint_blocks``: per-block activation checkpointing (default: on CUDA). The same seed gives the same
    adapter.
    """
    from tqdm.auto import tqdm

    for name, v, lo in (("steps", steps, 1), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if timestep_sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {timestep_sampling!r}")
    if not clips:
        raise ValueError("no training clips")
    g = torch.Generator().manual_seed(seed)
    dit.requires_grad_(False)
    adapters = LoraAdapters(dit, rank, alpha, generator=g).attach()
    opt = torch.optim.AdamW(adapters.parameters(), lr=lr, weight_decay=0.0)
    saved = (dit.checkpoint_blocks, dit.block_boundary)
    dit.checkpoint_blocks = dit.device.type == "cuda" if checkpoint_blocks is None else bool(checkpoint_blocks)
    if dit.checkpoint_blocks:
        dit.block_boundary = "unfused"  # one tensor per checkpointed block boundary
    losses: list[float] = []
    try:
        for _ in tqdm(range(steps), desc="stage I lora", unit="step", disable=not progress, dynamic_ncols=True):
            clip = clips[int(torch.randint(len(clips), (1,), generator=g))]
            sigma = float(sample_sigmas((1,), g, sampling=timestep_sampling, shift=shift)[0])
            noise = torch.randn(clip.z.shape, generator=g).to(clip.z.device)
            loss = lora_loss(dit, clip, sigma, noise)
            if not torch.isfinite(loss):
                raise RuntimeError(f"the loss is not finite ({loss.item()}) at step {len(losses) + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        adapters.detach()
        dit.checkpoint_blocks, dit.block_boundary = saved
    return adapters, losses
