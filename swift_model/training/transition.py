"""Stage-transition references: ``z_ref`` for training made the way inference makes it.

At inference Stage II reads the hybrid reference of Stage I's output (:mod:`swift_model.generation.bridge`). Training
on ``z_ref`` built from a bicubic-downsampled clip would teach Stage II to undo blur, not Stage I's real
artefacts. The method's "stage-transition training" instead lets Stage I itself lightly denoise the
downsampled clip:

1. the clip at the Stage I size, encoded by the Stage I VAE: ``z1``;
2. noised to the transition level: ``x = (1 - sigma_t) z1 + sigma_t eps``;
3. the remaining Stage I steps from ``sigma_t`` to 0, conditioned on the clip's first frame as Stage I is at
   inference (Wan2.1 I2V: mask and image-latent channels plus CLIP tokens; Wan2.2 TI2V style: the image
   latent as frame 0);
4. the bridge: decode, bicubic upsample to the full size, frame 0 := the full-size first frame, Stage II VAE
   encode (:func:`swift_model.generation.bridge.hybrid_reference`).
"""

from __future__ import annotations

import math

import torch

from ..generation.bridge import hybrid_reference
from ..generation.csg import flow_steps, flow_update, gaussian
from ..generation.stage1 import stage1_conditioning, stage1_model_input


def remaining_steps(transition_sigma: float, steps: int = 4, shift: float = 5.0) -> int:
    """How many of a ``steps``-step schedule (with ``shift``) lie at or below ``transition_sigma``: the Stage I
    steps left at that noise level (at least 1). The 4-step shift-5 schedule has 1 left at 0.5, 3 at 0.9."""
    s0 = transition_sigma / (shift - (shift - 1.0) * transition_sigma)  # the unshifted time of sigma_t
    return max(1, math.ceil(steps * s0 - 1e-9))


@torch.no_grad()
def transition_latents(dit, vae1, clip_low: torch.Tensor, context: torch.Tensor, *, sigma: float, steps: int,
                       shift: float = 5.0, seed: int = 0, clip_fea: torch.Tensor | None = None,
                       step_mode: str = "renoise") -> torch.Tensor:
    """Stage I latents of ``clip_low`` after noising to ``sigma`` and ``steps`` Stage I steps back to 0.

    Args:
        dit: the Stage I :class:`~swift_model.WanDiT`; vae1: its :class:`~swift_model.nets.vae.WanVAE`.
        clip_low: the clip at the Stage I size, ``[3, F, h1, w1]`` in ``[-1, 1]``.
        context: prompt embeddings ``[1, L, text_dim]``.
        sigma: the transition noise level in ``(0, 1]``; steps: Stage I steps from it to 0 (the schedule of
            :func:`swift_model.generation.csg.flow_steps` with ``start_sigma=sigma``).
        seed: the noise seed (the same seed gives the same latents).
        clip_fea: CLIP image tokens for Stage I DiTs that take them.

    Returns normalised Stage I latents ``[1, C, T, h, w]`` (float32, on the DiT's device).
    """
    if not 0.0 < sigma <= 1.0:
        raise ValueError(f"transition sigma must be in (0, 1], got {sigma}")
    device = dit.device
    dtype = dit.dtype
    frames = clip_low.shape[1]
    ti2v, cond = stage1_conditioning(dit, vae1, clip_low[:, 0], frames, device)
    z1 = vae1.encode(clip_low[None]).to(device)
    eps = gaussian(z1.shape, seed, 1, device, torch.float32)
    x = (1.0 - sigma) * z1 + sigma * eps
    numel = x.numel()
    cache = dit.precompute_context(context.to(device, dtype), None if clip_fea is None else clip_fea.to(device, dtype))
    for i, (t, s, s_next) in enumerate(flow_steps(steps, shift, start_sigma=sigma)):
        inp, tt = stage1_model_input(x, ti2v, cond, t, dtype)
        v = dit(inp, tt, None, context_cache=cache).float()
        x = flow_update(x, v, s, s_next, mode=step_mode, seed=seed, offset=(i + 1) * numel)
    if ti2v:
        x[:, :, :1] = cond
    return x


@torch.no_grad()
def stage_transition_reference(dit, vae1, vae2, clip_full: torch.Tensor, clip_low: torch.Tensor,
                               context: torch.Tensor, *, sigma: float, steps: int, shift: float = 5.0,
                               seed: int = 0, clip_fea: torch.Tensor | None = None) -> torch.Tensor:
    """``z_ref`` of a training clip: :func:`transition_latents` of ``clip_low`` through the bridge
    (:func:`swift_model.generation.bridge.hybrid_reference`) with the full-size first frame of ``clip_full`` ``[3, F, H, W]``.
    Returns ``[1, C2, T, H/16, W/16]`` (float32)."""
    z1 = transition_latents(dit, vae1, clip_low, context, sigma=sigma, steps=steps, shift=shift, seed=seed,
                            clip_fea=clip_fea)
    H, W = clip_full.shape[2:]
    return hybrid_reference(z1, vae1, vae2, clip_full[:, 0], H, W)
