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
import re
from typing import Iterator

import torch

from .files import read_json, read_tensors

# Architecture of the public VAEs (diffusers config values), used when building from an original Wan file.
WAN21_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
WAN22_CONFIG = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                    temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                    scale_factor_spatial=16, in_channels=12, out_channels=12)

# Per-channel latent statistics (latent = (mu - mean) / std). The original Wan ``.pth`` files do not store
# them; they are constants of the Wan code: ``WanVAE.__init__`` in Wan-Video/Wan2.1 ``wan/modules/vae.py``
# (16 values, also diffusers' ``AutoencoderKLWan`` defaults) and ``Wan2_2_VAE.__init__`` in
# Wan-Video/Wan2.2 ``wan/modules/vae2_2.py`` (48 values, also ``latents_mean``/``latents_std`` of
# Wan-AI/Wan2.2-TI2V-5B-Diffusers ``vae/config.json`` and diffusers' ``scripts/convert_wan_to_diffusers.py``).
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667]
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]

# Sub-module names of the original Wan residual block (``residual`` is an nn.Sequential: RMS norm, SiLU,
# conv, RMS norm, SiLU, dropout, conv) and their diffusers ``WanResidualBlock`` names.
_RESIDUAL_NAMES = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
                   "shortcut": "conv_shortcut"}


def convert_wan22_vae_original(state: dict) -> dict:
    """Rename the keys of an original Wan2.2 VAE state dict (``Wan2.2_VAE.pth``, ``vae2_2.py`` naming) to
    diffusers' ``AutoencoderKLWan`` (``is_residual=True``) naming.

    The Wan2.2 encoder stage ``i`` is ``encoder.downsamples.i.downsamples.j`` (residual blocks, then one
    resample module); diffusers splits it into ``down_blocks.i.resnets.j`` and ``down_blocks.i.downsampler``
    (the decoder likewise with ``upsamples``/``up_blocks``/``upsampler``). The parameter-free average
    shortcuts have no keys. Unknown keys are kept as they are, so a wrong file fails the strict load.
    """
    top = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
    out = {}
    for key, value in state.items():
        new = key
        for a, b in top.items():
            if key.startswith(a):
                new = b + key[len(a):]
        m = re.match(r"^(encoder|decoder)\.(.*)$", key)
        if m:
            part, rest = m.groups()
            rest = re.sub(r"^conv1\.", "conv_in.", rest)
            rest = re.sub(r"^head\.0\.", "norm_out.", rest)
            rest = re.sub(r"^head\.2\.", "conv_out.", rest)
            rest = re.sub(r"^middle\.1\.", "mid_block.attentions.0.", rest)
            rest = re.sub(r"^middle\.([02])\.", lambda g: f"mid_block.resnets.{int(g.group(1)) // 2}.", rest)
            st = re.match(r"^(downsamples|upsamples)\.(\d+)\.\1\.(\d+)\.(.*)$", rest)
            if st:
                kind, i, j, tail = st.groups()
                blocks = "down_blocks" if kind == "downsamples" else "up_blocks"
                if tail.startswith(("resample.", "time_conv.")):
                    rest = f"{blocks}.{i}.{'downsampler' if kind == 'downsamples' else 'upsampler'}.{tail}"
                else:
                    rest = f"{blocks}.{i}.resnets.{j}.{tail}"
            for a, b in _RESIDUAL_NAMES.items():
                rest = re.sub(r"(^|\.)" + re.escape(a) + r"\.", lambda g, b=b: f"{g.group(1)}{b}.", rest)
            new = f"{part}.{rest}"
        out[new] = value
    return out


def _is_vae_config(path: str) -> bool:
    """Whether ``path`` is a diffusers ``AutoencoderKLWan`` config (not, e.g., an original Wan DiT's config)."""
    if not os.path.isfile(path):
        return False
    return read_json(path).get("_class_name") == "AutoencoderKLWan"  # an unreadable config raises, naming it


def locate_vae(path: str) -> tuple[str, str]:
    """Where the VAE of checkpoint ``path`` is, without reading weights: ``("diffusers", folder)`` for a
    diffusers ``AutoencoderKLWan`` folder (or a pipeline folder's ``vae/``), ``("original", file)`` for an
    original Wan VAE file (``path`` itself, or the ``*VAE*.pth`` of an original Wan folder)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"VAE path does not exist: {path}")
    if not os.path.isdir(path):
        return "original", path
    if os.path.isfile(os.path.join(path, "vae", "config.json")):
        path = os.path.join(path, "vae")
    if _is_vae_config(os.path.join(path, "config.json")):
        return "diffusers", path
    # An original Wan folder: its config.json (if any) is the DiT's, the VAE is a *VAE*.pth file.
    files = [f for f in sorted(os.listdir(path)) if "vae" in f.lower() and f.endswith((".pth", ".safetensors"))]
    if not files:
        raise ValueError(f"no VAE found in {path} (expected vae/config.json or a *VAE*.pth file)")
    return "original", os.path.join(path, files[-1])


def _is_wan22_original(state: dict) -> bool:
    """Wan2.2's VAE nests its stages (``encoder.downsamples.0.downsamples.0...``); Wan2.1's does not."""
    return any(k.startswith("encoder.downsamples.0.downsamples.") for k in state)


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


def _chunk_to_device(module, args, kwargs):
    """Forward pre-hook of the VAE encoder: its input chunk moves to the encoder's device and dtype."""
    p = next(module.parameters())
    if args and isinstance(args[0], torch.Tensor) and (args[0].device != p.device or args[0].dtype != p.dtype):
        args = (args[0].to(p.device, p.dtype),) + tuple(args[1:])
    return args, kwargs


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
        # The encoder gets its input in chunks diffusers cuts from the clip (1 or 4 frames, one spatial tile):
        # each chunk moves to the encoder's device here, so a clip on the CPU (a 2K training clip, the
        # bridge's upsampled reference) never needs the device memory of the whole clip.
        if not getattr(model.encoder, "_swift_chunk_to_device", False):
            model.encoder.register_forward_pre_hook(_chunk_to_device, with_kwargs=True)
            model.encoder._swift_chunk_to_device = True

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
    def from_pretrained(cls, path: str, *, device=None, dtype=torch.float32, config: dict | None = None,
                        **kw) -> "WanVAE":
        """Load from a diffusers folder (``config.json`` + weights, or a pipeline folder with ``vae/``) or an
        original Wan VAE file (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``, or a folder holding one).

        ``config``: ``AutoencoderKLWan`` arguments for an original file whose architecture is not the public
        one (default: :data:`WAN21_CONFIG` or :data:`WAN22_CONFIG`, told apart by the file's keys); the
        latent statistics default to the public VAE's constants.
        """
        from diffusers import AutoencoderKLWan

        layout, path = locate_vae(path)
        if layout == "diffusers":
            model = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype)
            return cls(model.to(device) if device is not None else model, **kw)
        # Original files: build the architecture and rename the original keys. The file's layout (not its
        # name) tells Wan2.1 from Wan2.2; the latent statistics come from the constants above.
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        state = read_tensors(path, stage="VAE")
        wan22 = _is_wan22_original(state)
        arch = dict(config if config is not None else (WAN22_CONFIG if wan22 else WAN21_CONFIG))
        arch.setdefault("latents_mean", WAN22_LATENTS_MEAN if wan22 else WAN21_LATENTS_MEAN)
        arch.setdefault("latents_std", WAN22_LATENTS_STD if wan22 else WAN21_LATENTS_STD)
        model = AutoencoderKLWan(**arch)
        converted = convert_wan22_vae_original(state) if wan22 else convert_wan_vae_to_diffusers(state)
        missing, unexpected = model.load_state_dict(converted, strict=False)
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
        # cast where the clip is; the encoder's pre-hook moves each chunk to the device (same values as
        # moving the whole clip first: the cast and diffusers' patchify/tiling are elementwise or copies)
        x = video.to(dtype=self.dtype)
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
