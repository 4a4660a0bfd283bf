"""Stage-transition references: ``z_ref`` for training made the way inference makes it.

At inference Stage II reads the hybrid reference of Stage I's output (:mod:`swift_model.bridge`). Training
on ``z_ref`` built from a bicubic-downsampled clip would teach Stage II to undo blur, not Stage I's real
artefacts. The method's "stage-transition training" instead lets Stage I itself lightly denoise the
downsampled clip:

1. the clip at the Stage I size, encoded by the Stage I VAE: ``z1``;
2. noised to the transition level: ``x = (1 - sigma_t) z1 + sigma_t eps``;
3. the remaining Stage I steps from ``sigma_t`` to 0, conditioned on the clip's first frame as Stage I is at
   inference (Wan2.1 I2V: mask and image-latent channels plus CLIP tokens; Wan2.2 TI2V style: the image
   latent as frame 0);
4. the bridge: decode, bicubic upsample to the full size, frame 0 := the full-size first frame, Stage II VAE
   encode (:func:`swift_model.bridge.hybrid_reference`).
"""

from __future__ import annotations

import math

import torch

from .bridge import hybrid_reference
from .csg import flow_steps, flow_update, gaussian


def remaining_steps(transition_sigma: float, steps: int = 4, shift: float = 5.0) -> int:
    """How many of a ``steps``-step schedule (with ``shift``) lie at or below ``transition_sigma``: the Stage I
    steps left at that noise level (at least 1). The 4-step shift-5 schedule has 1 left at 0.5, 3 at 0.9."""
    s0 = transition_sigma / (shift - (shift - 1.0) * transition_sigma)  # the unshifted time of sigma_t
    return max(1, math.ceil(steps * s0 - 1e-9))


def stage1_conditioning(dit, vae1, image_low: torch.Tensor, frames: int, device) -> tuple[bool, torch.Tensor]:
    """``(ti2v, cond)``: how Stage I is conditioned on the first frame ``image_low`` ``[3, h1, w1]``.

    ``ti2v`` (the DiT's input has the VAE's channels): ``cond`` is the image latent ``[1, C, 1, h, w]``, put in
    as clean frame 0. Otherwise (Wan2.1 I2V, ``2C + 4`` input channels): ``cond`` ``[1, 4 + C, T, h, w]`` holds
    4 mask channels (1 on the image frame) and the latents of ``[image, black frames...]``, concatenated to
    the noisy latents. The pipeline's Stage I and the training references both use it (with
    :func:`stage1_model_input`), so Stage I is conditioned alike at inference and in training.
    """
    C = vae1.z_dim
    h1, w1 = image_low.shape[1:]
    _, T, h, w = vae1.latent_shape(frames, h1, w1)
    if dit.config.in_channels == C:
        return True, vae1.encode(image_low[None, :, None]).to(device)
    if dit.config.in_channels != 2 * C + 4:
        raise ValueError(f"stage1 DiT of the wrong kind: {dit.config.in_channels} input channels fit neither "
                         f"{C} (TI2V) nor {2 * C + 4} (I2V) for a {C}-channel VAE")
    video = torch.zeros(1, 3, frames, h1, w1)
    video[0, :, 0] = image_low
    y = vae1.encode(video).to(device)
    mask = torch.zeros(1, 4, T, h, w, device=device)
    mask[:, :, 0] = 1.0
    return False, torch.cat([mask, y], 1)


def stage1_model_input(x: torch.Tensor, ti2v: bool, cond: torch.Tensor, t: float,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input, timesteps)`` of one Stage I DiT call on the state ``x`` ``[1, C, T, h, w]`` at timestep ``t``,
    conditioned by :func:`stage1_conditioning`'s ``(ti2v, cond)``.

    TI2V: ``cond`` is written into frame 0 of ``x`` (in place: the state keeps the clean image latent) and the
    per-token timesteps are 0 on that frame; I2V: ``cond`` is concatenated on the channels, one timestep.
    """
    _, _, T, h, w = x.shape
    if ti2v:
        frame_tokens = (h // 2) * (w // 2)
        x[:, :, :1] = cond
        tt = torch.full((1, T * frame_tokens), float(t), device=x.device)
        tt[:, :frame_tokens] = 0.0
        return x.to(dtype), tt
    return torch.cat([x.to(dtype), cond.to(dtype)], 1), torch.full((1,), float(t), device=x.device)


@torch.no_grad()
def transition_latents(dit, vae1, clip_low: torch.Tensor, context: torch.Tensor, *, sigma: float, steps: int,
                       shift: float = 5.0, seed: int = 0, clip_fea: torch.Tensor | None = None,
                       step_mode: str = "renoise") -> torch.Tensor:
    """Stage I latents of ``clip_low`` after noising to ``sigma`` and ``steps`` Stage I steps back to 0.

    Args:
        dit: the Stage I :class:`~swift_model.WanDiT`; vae1: its :class:`~swift_model.vae.WanVAE`.
        clip_low: the clip at the Stage I size, ``[3, F, h1, w1]`` in ``[-1, 1]``.
        context: prompt embeddings ``[1, L, text_dim]``.
        sigma: the transition noise level in ``(0, 1]``; steps: Stage I steps from it to 0 (the schedule of
            :func:`swift_model.csg.flow_steps` with ``start_sigma=sigma``).
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
    (:func:`swift_model.bridge.hybrid_reference`) with the full-size first frame of ``clip_full`` ``[3, F, H, W]``.
    Returns ``[1, C2, T, H/16, W/16]`` (float32)."""
    z1 = transition_latents(dit, vae1, clip_low, context, sigma=sigma, steps=steps, shift=shift, seed=seed,
                            clip_fea=clip_fea)
    H, W = clip_full.shape[2:]
    return hybrid_reference(z1, vae1, vae2, clip_full[:, 0], H, W)
