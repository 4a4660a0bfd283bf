"""How Stage I is conditioned on the first frame: the conditioning latents and each DiT call's input.

The pipeline's Stage I and the stage-transition training references (:mod:`swift_model.training.transition`)
both go through these functions, so Stage I sees its conditioning the same way in inference and training.
"""

from __future__ import annotations

import torch

from ..nets.dit import FrameTimesteps


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
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | FrameTimesteps]:
    """``(input, timesteps)`` of one Stage I DiT call on the state ``x`` ``[1, C, T, h, w]`` at timestep ``t``,
    conditioned by :func:`stage1_conditioning`'s ``(ti2v, cond)``.

    TI2V: ``cond`` is written into frame 0 of ``x`` (in place: the state keeps the clean image latent) and the
    timesteps are 0 on that frame and ``t`` on the others, given per frame on the host
    (:class:`~swift_model.nets.dit.FrameTimesteps`: the per-token timesteps, with no device data read); I2V:
    ``cond`` is concatenated on the channels, one timestep.
    """
    T = x.shape[2]
    if ti2v:
        x[:, :, :1] = cond
        return x.to(dtype), FrameTimesteps((0.0,) + (float(t),) * (T - 1))
    return torch.cat([x.to(dtype), cond.to(dtype)], 1), torch.full((1,), float(t), device=x.device)
