"""The Wan video VAEs (Wan2.1: 16 latent channels, 8x spatial; Wan2.2: 48 channels, 16x spatial), through
diffusers' ``AutoencoderKLWan``.

:class:`WanVAE` adds what the pipeline needs around the library model: latent normalisation with the
checkpoint's ``latents_mean``/``latents_std``, size checks, and a decoder that streams in time (the Wan VAEs
are causal: one latent frame at a time, with a cache of the previous frames' features) and is tiled in space
(each tile has its own cache; overlapping tiles are blended with linear ramps), so decode memory is bounded
by a tile and a frame chunk, not by the clip. Decoded frames leave the device as uint8 as soon as they exist.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

# Architecture of the public VAEs (diffusers config values), used when building from an original Wan file.
WAN21_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
WAN22_CONFIG = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                    temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                    scale_factor_spatial=16, in_channels=12, out_channels=12)


def _tiny_config(z_dim: int) -> dict:
    cfg = dict(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
               latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    if z_dim == 48:
        cfg.update(decoder_base_dim=8, is_residual=True, patch_size=2, scale_factor_spatial=16,
                   in_channels=12, out_channels=12)
    return cfg


def _ramp(n: int, overlap_lo: int, overlap_hi: int) -> torch.Tensor:
    """Blend weights along one axis of a tile: linear ramps over the overlaps with its neighbours."""
    w = torch.ones(n)
    if overlap_lo > 0:
        w[:overlap_lo] = torch.arange(1, overlap_lo + 1, dtype=torch.float32) / (overlap_lo + 1)
    if overlap_hi > 0:
        w[n - overlap_hi:] = torch.minimum(
            w[n - overlap_hi:], torch.arange(overlap_hi, 0, -1, dtype=torch.float32) / (overlap_hi + 1))
    return w


def _tiles(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Overlapping ``[start, end)`` spans covering ``[0, size)`` (one span when it fits)."""
    if size <= tile:
        return [(0, size)]
    stride = tile - overlap
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return [(s, s + tile) for s in starts]


class WanVAE:
    """A Wan video VAE with normalised latents and a bounded-memory streaming decoder.

    Args:
        model: a diffusers ``AutoencoderKLWan``.
        tile_latent: spatial tile size of the decoder, in latent pixels.
        tile_overlap: overlap of neighbouring tiles, in latent pixels.
    """

    def __init__(self, model, tile_latent: int = 32, tile_overlap: int = 8) -> None:
        from diffusers import AutoencoderKLWan
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        if not isinstance(model, AutoencoderKLWan):
            raise TypeError(f"model must be a diffusers AutoencoderKLWan, got {type(model).__name__}")
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.z_dim = int(cfg.z_dim)
        self.patch = int(cfg.patch_size or 1)
        self.spatial_factor = int(cfg.scale_factor_spatial or 8)
        self.temporal_factor = int(cfg.scale_factor_temporal or 4)
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._num_dec_convs = sum(isinstance(m, WanCausalConv3d) for m in model.decoder.modules())
        self.tile_latent = tile_latent
        self.tile_overlap = tile_overlap
        # diffusers' own spatial tiling for the encoder, at a size matching the decoder's tiles.
        tile_px = tile_latent * self.spatial_factor
        model.enable_tiling(tile_sample_min_height=tile_px, tile_sample_min_width=tile_px,
                            tile_sample_stride_height=tile_px - tile_overlap * self.spatial_factor,
                            tile_sample_stride_width=tile_px - tile_overlap * self.spatial_factor)

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, z_dim: int = 16, seed: int = 0, dtype=torch.float32, **kw) -> "WanVAE":
        """A tiny random-weight VAE with the architecture of Wan2.1 (``z_dim=16``) or Wan2.2 (``z_dim=48``)."""
        from diffusers import AutoencoderKLWan

        if z_dim not in (16, 48):
            raise ValueError(f"z_dim must be 16 (Wan2.1) or 48 (Wan2.2), got {z_dim}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoencoderKLWan(**_tiny_config(z_dim))
            if dtype != torch.float32:
                model = model.to(dtype)
        return cls(model, **kw)

    @classmethod
    def from_pretrained(cls, path: str, *, device=None, dtype=torch.float32, **kw) -> "WanVAE":
        """Load from a diffusers folder (``config.json`` + weights, or a pipeline folder with ``vae/``) or an
        original Wan VAE file (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``, or a folder holding one)."""
        from diffusers import AutoencoderKLWan

        if not os.path.exists(path):
            raise FileNotFoundError(f"VAE path does not exist: {path}")
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, "vae", "config.json")):
                path = os.path.join(path, "vae")
            if os.path.isfile(os.path.join(path, "config.json")):
                model = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype)
                return cls(model.to(device) if device is not None else model, **kw)
            files = [f for f in sorted(os.listdir(path)) if "vae" in f.lower() and f.endswith((".pth", ".safetensors"))]
            if not files:
                raise ValueError(f"no VAE found in {path} (expected vae/config.json or a *VAE*.pth file)")
            path = os.path.join(path, files[-1])
        name = os.path.basename(path).lower()
        if "2.2" in name or "2_2" in name:
            # The 48 per-channel latent mean/std of the Wan2.2 VAE are not stored in its original file;
            # they come with the diffusers config, so normalisation would silently be wrong here.
            raise ValueError(
                f"{path}: original-format Wan2.2 VAE files are not supported (they lack the latent "
                "normalisation constants); pass the diffusers-format VAE folder (vae/config.json + weights)"
            )
        config = WAN21_CONFIG
        # Original files: build the architecture and let diffusers convert the original key names.
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
        from diffusers.models.modeling_utils import load_state_dict

        state = load_state_dict(path)
        model = AutoencoderKLWan(**config)
        missing, unexpected = model.load_state_dict(convert_wan_vae_to_diffusers(state), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} is not a Wan VAE checkpoint: missing keys {missing[:5]}..., "
                             f"unexpected keys {unexpected[:5]}...")
        model = model.to(dtype=dtype)
        return cls(model.to(device) if device is not None else model, **kw)

    # -- properties -----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype=None) -> "WanVAE":
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this (VAE factor x the DiT's 2x2 patch)."""
        return self.spatial_factor * 2

    def check_size(self, frames: int, height: int, width: int) -> None:
        """Raise ``ValueError`` when the VAE (and a patch-2 DiT) cannot take this video size."""
        if frames < 1 or (frames - 1) % self.temporal_factor:
            raise ValueError(f"frames must be {self.temporal_factor}k+1 (e.g. 81), got {frames}")
        m = self.size_multiple
        if height < m or width < m or height % m or width % m:
            raise ValueError(f"height and width must be positive multiples of {m} for this VAE, got {width}x{height}")

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, T, h, w)`` of the latents of a ``frames x height x width`` video."""
        self.check_size(frames, height, width)
        return (self.z_dim, (frames - 1) // self.temporal_factor + 1, height // self.spatial_factor,
                width // self.spatial_factor)

    # -- normalisation --------------------------------------------------------------------------------

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._mean.to(z.device, z.dtype)) / self._std.to(z.device, z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self._std.to(z.device, z.dtype) + self._mean.to(z.device, z.dtype)

    # -- encode / decode ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised latents (posterior mean) of ``video`` ``[B, 3, F, H, W]`` in ``[-1, 1]``."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W], got {tuple(video.shape)}")
        self.check_size(video.shape[2], video.shape[3], video.shape[4])
        x = video.to(self.device, self.dtype)
        z = self.model.encode(x).latent_dist.mode()
        return self.normalize(z.float())

    @torch.no_grad()
    def decode_stream(self, z: torch.Tensor, chunk: int = 1) -> Iterator[torch.Tensor]:
        """Decode normalised latents ``[B, C, T, h, w]`` and yield pixel chunks ``[B, 3, f, H, W]`` (float32 in
        [-1, 1] on the VAE's device), ``chunk`` latent frames at a time: 1 + 4*(chunk-1) pixel frames first,
        then 4*chunk. Memory is bounded by one spatial tile's features and one chunk's pixels."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        if z.dim() != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be [B, {self.z_dim}, T, h, w], got {tuple(z.shape)}")
        model = self.model
        dev, dt = self.device, self.dtype
        B, _, T, h, w = z.shape
        ys, xs = _tiles(h, self.tile_latent, self.tile_overlap), _tiles(w, self.tile_latent, self.tile_overlap)
        sf = self.spatial_factor
        caches = {(i, j): [None] * self._num_dec_convs for i in range(len(ys)) for j in range(len(xs))}
        weights = {}
        for i, (y0, y1) in enumerate(ys):
            for j, (x0, x1) in enumerate(xs):
                oy0 = (ys[i - 1][1] - y0) * sf if i > 0 else 0
                oy1 = (y1 - ys[i + 1][0]) * sf if i + 1 < len(ys) else 0
                ox0 = (xs[j - 1][1] - x0) * sf if j > 0 else 0
                ox1 = (x1 - xs[j + 1][0]) * sf if j + 1 < len(xs) else 0
                wy = _ramp((y1 - y0) * sf, oy0, oy1)
                wx = _ramp((x1 - x0) * sf, ox0, ox1)
                weights[i, j] = (wy[:, None] * wx[None, :]).to(dev)
        for t0 in range(0, T, chunk):
            zc = self.denormalize(z[:, :, t0:t0 + chunk].to(dev, torch.float32)).to(dt)
            out = None
            wsum = None
            for i, (y0, y1) in enumerate(ys):
                for j, (x0, x1) in enumerate(xs):
                    x = model.post_quant_conv(zc[:, :, :, y0:y1, x0:x1])
                    pieces = []
                    for f in range(x.shape[2]):
                        idx = [0]
                        pieces.append(model.decoder(x[:, :, f:f + 1], feat_cache=caches[i, j], feat_idx=idx,
                                                    first_chunk=(t0 + f == 0)))
                    tile = torch.cat(pieces, 2)
                    if self.patch > 1:
                        tile = unpatchify(tile, patch_size=self.patch)
                    tile = tile.float().clamp_(-1, 1)
                    if out is None:
                        out = torch.zeros(B, 3, tile.shape[2], h * sf, w * sf, device=dev)
                        wsum = torch.zeros(h * sf, w * sf, device=dev)
                    wt = weights[i, j]
                    out[:, :, :, y0 * sf:y1 * sf, x0 * sf:x1 * sf] += tile * wt
                    wsum[y0 * sf:y1 * sf, x0 * sf:x1 * sf] += wt
            yield out / wsum

    def decode(self, z: torch.Tensor, chunk: int = 1) -> torch.Tensor:
        """The whole decoded video ``[B, 3, F, H, W]`` as float32 on the CPU (see :meth:`decode_stream`)."""
        return torch.cat([c.cpu() for c in self.decode_stream(z, chunk)], 2)

    def decode_uint8(self, z: torch.Tensor, chunk: int = 1) -> torch.Tensor:
        """Decoded video of the first sample as uint8 frames ``[F, H, W, 3]`` on the CPU, built chunk by chunk."""
        frames = []
        for c in self.decode_stream(z[:1], chunk):
            frames.append(((c[0].permute(1, 2, 3, 0) + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8).cpu())
        return torch.cat(frames, 0)
