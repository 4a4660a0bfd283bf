"""The hybrid reference between the stages.

Stage I's 360P latents are decoded with the Stage I VAE, upsampled to the output size in pixel space
(bicubic), frame 0 is replaced by the full-resolution input image (so the anchor block carries the real
image's detail, not an upsampled copy), and the video is encoded with the Stage II VAE: ``z_ref``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def reference_video(stage1_latents: torch.Tensor, vae1, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The upsampled pixel video ``[1, 3, F, height, width]`` (float32, CPU, in [-1, 1]) whose frame 0 is ``image``.

    Args:
        stage1_latents: normalised Stage I latents ``[1, C1, T, h, w]``.
        vae1: the Stage I :class:`~swift_model.nets.vae.WanVAE`.
        image: the full-resolution input image ``[3, height, width]`` in ``[-1, 1]``.
    """
    if image.dim() != 3 or tuple(image.shape) != (3, height, width):
        raise ValueError(f"image must be [3, {height}, {width}], got {tuple(image.shape)}")
    chunks = []
    for chunk in vae1.decode_stream(stage1_latents[:1]):
        b, c, f, h, w = chunk.shape
        frames = chunk[0].permute(1, 0, 2, 3)  # [f, 3, h, w]: interpolate frame by frame
        up = F.interpolate(frames.float(), size=(height, width), mode="bicubic", align_corners=False).clamp_(-1, 1)
        chunks.append(up.permute(1, 0, 2, 3).cpu())
    video = torch.cat(chunks, 1)[None]
    video[0, :, 0] = image.to(video.dtype).cpu()
    return video


@torch.no_grad()
def hybrid_reference(stage1_latents: torch.Tensor, vae1, vae2, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``z_ref``: the Stage II VAE's normalised latents of :func:`reference_video`."""
    return vae2.encode(reference_video(stage1_latents, vae1, image, height, width))
