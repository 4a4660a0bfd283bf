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
    # written chunk by chunk into the one host video (a list of chunks and their concatenation would hold the
    # 2K clip twice: 3.3 GiB in float32 at 81 frames)
    video = torch.empty(1, 3, vae1.num_frames(stage1_latents.shape[2]), height, width)
    f0 = 0
    for chunk in vae1.decode_stream(stage1_latents[:1]):
        frames = chunk[0].permute(1, 0, 2, 3)  # [f, 3, h, w]: interpolate frame by frame
        up = F.interpolate(frames.float(), size=(height, width), mode="bicubic", align_corners=False).clamp_(-1, 1)
        video[0, :, f0:f0 + up.shape[0]] = up.permute(1, 0, 2, 3)
        f0 += up.shape[0]
        del chunk, frames, up
    if f0 != video.shape[2]:
        raise RuntimeError(f"bridge: the Stage I decode gave {f0} frames, expected {video.shape[2]}")
    video[0, :, 0] = image.to(video.dtype).cpu()
    return video


@torch.no_grad()
def hybrid_reference(stage1_latents: torch.Tensor, vae1, vae2, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``z_ref``: the Stage II VAE's normalised latents of :func:`reference_video`."""
    return vae2.encode(reference_video(stage1_latents, vae1, image, height, width))
