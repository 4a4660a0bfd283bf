"""The Wan video VAEs (Wan2.1: 16 latent channels, 8x spatial; Wan2.2: 48 channels, 16x spatial), through
diffusers' ``AutoencoderKLWan``.

:class:`WanVAE` adds what the pipeline needs around the library model: latent normalisation with the
checkpoint's ``latents_mean``/``latents_std``, size checks, and a decoder that streams in time (the Wan VAEs
are causal: one latent frame at a time, with a cache of the previous frames' features) and is tiled in space
(overlapping tiles are blended with linear ramps, :mod:`.vae_tiling`). The decode is tile-major: one tile
runs through every latent frame with its own cache, its pixels go to the host, and its cache is freed before
the next tile, so the device working set is one tile's caches and one frame's activations, whatever the
length of the video; the blend happens in a host buffer. Encodes are tiled the same way above 1280x720. The
tiles are fixed squares, or, given a device budget (:meth:`WanVAE.set_tile_budget`), the cheapest tiling that
fits it (:mod:`.vae_geometry`): a whole frame where it fits, decoded as the library's plain causal pass.
"""

from __future__ import annotations

import os
import re
from typing import Iterator

import torch

from ..io.files import read_json, read_tensors
from .live_storage import LiveStorageTracker
from .vae_geometry import MAX_TENSOR_ELEMENTS, fit_tiles
from .vae_tiling import Tile, TileBlender, check_tile, spatial_tiles, to_uint8

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


def tiny_config(z_dim: int) -> dict:
    """``AutoencoderKLWan`` arguments of the tiny random-weight VAE with the architecture of Wan2.1
    (``z_dim=16``) or Wan2.2 (``z_dim=48``): the demo's and the tests'."""
    if z_dim not in (16, 48):
        raise ValueError(f"z_dim must be 16 (Wan2.1) or 48 (Wan2.2), got {z_dim}")
    cfg = dict(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
               latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    if z_dim == 48:
        cfg.update(decoder_base_dim=8, is_residual=True, patch_size=2, scale_factor_spatial=16,
                   in_channels=12, out_channels=12)
    return cfg


def public_config(z_dim: int) -> dict:
    """``AutoencoderKLWan`` arguments of the public VAE with ``z_dim`` latent channels (16: Wan2.1, 48: Wan2.2),
    latent statistics included."""
    if z_dim == 16:
        return dict(WAN21_CONFIG, latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD)
    if z_dim == 48:
        return dict(WAN22_CONFIG, latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD)
    raise ValueError(f"no public Wan VAE has {z_dim} latent channels (16: Wan2.1, 48: Wan2.2)")


def default_dtype(device) -> torch.dtype:
    """The VAE dtype used when none is asked for: bfloat16 on a GPU, float32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(name) -> torch.dtype | None:
    """``"bf16"``/``"fp32"`` (or a ``torch.dtype`` of those, or ``None`` for the default) -> the dtype."""
    if name is None or name in (torch.bfloat16, torch.float32):
        return name
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"VAE dtype must be 'bf16' or 'fp32', got {name!r}")
    return table[name]


# Encodes larger than this (pixels per frame) are tiled; smaller ones (e.g. the 640x352 Stage I conditioning
# encode) run in one piece, as the library's untiled encode. 1280x720 in bf16 fits any card the pipeline
# supports in one piece; a 2560x1408 encode (the bridge's) does not need to.
ENCODE_TILE_MIN_PIXELS = 1280 * 720

# The tile a pass's working set per latent pixel is measured on (WanVAE.work_bytes_per_pixel): the working set
# is proportional to the tile's area (an 8x8 tile reads it about 1% high: the edges' padding), and the causal
# caches are full from the third latent frame on. Cached per architecture, dtype and pass: (bytes, elements of
# the largest tensor) per latent pixel.
_MEASURE_SIDE = 8
_MEASURE_FRAMES = 3
_WORK_PER_PIXEL: dict = {}


def _chunk_to_device(module, args, kwargs):
    """Forward pre-hook of the VAE encoder: its input chunk moves to the encoder's device and dtype."""
    p = next(module.parameters())
    if args and isinstance(args[0], torch.Tensor) and (args[0].device != p.device or args[0].dtype != p.dtype):
        args = (args[0].to(p.device, p.dtype),) + tuple(args[1:])
    return args, kwargs


class WanVAE:
    """A Wan video VAE with normalised latents, a bounded-memory tiled decoder and an encoder tiled when large.

    Decoding is tile-major: each spatial tile (:meth:`spatial_tiles`) runs through all its latent frames with
    one causal-conv cache, its pixels go to the host, and the cache is freed before the next tile. The device
    working set is one tile's cache and one frame's activations whatever the video's size and length; the
    tiles are blended on the host (:class:`~swift_model.nets.vae_tiling.TileBlender`). :meth:`decode_tiles` and
    :meth:`decode_blender` expose the two halves so several processes can share a decode.

    Args:
        model: a diffusers ``AutoencoderKLWan``.
        tile_latent: spatial tile size of the decoder, in latent pixels.
        tile_overlap: overlap of neighbouring tiles, in latent pixels.
        encode_tile_latent, encode_tile_overlap: the same for a tiled encode (default: twice the decoder's:
            the encoder's middle attention block sees one tile, so larger tiles stay closer to the untiled
            encode, and an encode runs once per video).
        dtype: cast the model to this dtype (``torch.bfloat16``/``torch.float32``, or ``"bf16"``/``"fp32"``);
            ``None`` keeps the model's dtype. Latents in and out stay float32 either way.
        encode_tile_min_pixels: encodes of more pixels per frame than this are tiled.
        max_tile: with a budget (:meth:`set_tile_budget`), the longest tile side (latent pixels) either pass may
            use, or ``None``.

    Tile geometry: without a budget, the tiles are the fixed squares above. With one
    (:meth:`set_tile_budget`, which the pipeline sets from its memory profile), each pass takes the cheapest
    tiling whose tiles' estimated working set fits the budget
    (:func:`~swift_model.nets.vae_geometry.fit_tiles`): a whole frame when it fits (a plain causal pass in
    temporal chunks of whole frames: no overlap, no blend), else as few and as large tiles as the budget allows,
    each blended as before.
    """

    def __init__(self, model, tile_latent: int = 32, tile_overlap: int = 8, *, dtype=None,
                 encode_tile_min_pixels: int = ENCODE_TILE_MIN_PIXELS, encode_tile_latent: int | None = None,
                 encode_tile_overlap: int | None = None, max_tile: int | None = None) -> None:
        from diffusers import AutoencoderKLWan
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        if not isinstance(model, AutoencoderKLWan):
            raise TypeError(f"model must be a diffusers AutoencoderKLWan, got {type(model).__name__}")
        encode_tile_latent = 2 * tile_latent if encode_tile_latent is None else encode_tile_latent
        encode_tile_overlap = 2 * tile_overlap if encode_tile_overlap is None else encode_tile_overlap
        check_tile(tile_latent, tile_overlap)  # checks the tile arguments
        check_tile(encode_tile_latent, encode_tile_overlap)
        if max_tile is not None:
            check_tile(max_tile, 0)
        dtype = parse_dtype(dtype)
        if dtype is not None and next(model.parameters()).dtype != dtype:
            # nn.Module.to: diffusers' own ``to`` warns about modules to keep in float32, of which this
            # model has none.
            model = torch.nn.Module.to(model, dtype=dtype)
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.z_dim = int(cfg.z_dim)
        self.patch = int(cfg.patch_size or 1)
        self.spatial_factor = int(cfg.scale_factor_spatial or 8)
        self.temporal_factor = int(cfg.scale_factor_temporal or 4)
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._stats: dict = {}  # (device, dtype) -> (mean, std) there
        self._num_dec_convs = sum(isinstance(m, WanCausalConv3d) for m in model.decoder.modules())
        self._num_enc_convs = sum(isinstance(m, WanCausalConv3d) for m in model.encoder.modules())
        self.tile_latent = tile_latent
        self.tile_overlap = tile_overlap
        self.encode_tile_min_pixels = encode_tile_min_pixels
        self.encode_tile_latent = encode_tile_latent
        self.encode_tile_overlap = encode_tile_overlap
        # Tiles from a device budget (set_tile_budget); None: the fixed tiles above.
        self.max_tile = max_tile
        self.decode_budget: int | None = None
        self.encode_budget: int | None = None
        # Our own tiling replaces the library's (whose decode keeps every tile's output on the device).
        model.disable_tiling()
        # The encoder gets its input in chunks the library cuts from the clip (1 or 4 frames): each chunk moves
        # to the encoder's device here, so a clip on the CPU (a 2K training clip, the bridge's upsampled
        # reference) never needs the device memory of the whole clip or tile.
        if not getattr(model.encoder, "_swift_chunk_to_device", False):
            model.encoder.register_forward_pre_hook(_chunk_to_device, with_kwargs=True)
            model.encoder._swift_chunk_to_device = True

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, z_dim: int = 16, seed: int = 0, dtype=torch.float32, **kw) -> "WanVAE":
        """A tiny random-weight VAE with the architecture of Wan2.1 (``z_dim=16``) or Wan2.2 (``z_dim=48``);
        the weights are drawn in float32 (the same values for every ``dtype``), then cast."""
        from diffusers import AutoencoderKLWan

        config = tiny_config(z_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoencoderKLWan(**config)
        return cls(model, dtype=dtype, **kw)

    @classmethod
    def from_pretrained(cls, path: str, *, device=None, dtype=torch.float32, config: dict | None = None,
                        **kw) -> "WanVAE":
        """Load from a diffusers folder (``config.json`` + weights, or a pipeline folder with ``vae/``) or an
        original Wan VAE file (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``, or a folder holding one), in ``dtype``
        (``torch.float32``/``torch.bfloat16`` or ``"fp32"``/``"bf16"``).

        ``config``: ``AutoencoderKLWan`` arguments for an original file whose architecture is not the public
        one (default: :data:`WAN21_CONFIG` or :data:`WAN22_CONFIG`, told apart by the file's keys); the
        latent statistics default to the public VAE's constants.
        """
        from diffusers import AutoencoderKLWan

        dtype = parse_dtype(dtype) or torch.float32
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
        return cls(model.to(device) if device is not None else model, dtype=dtype, **kw)

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

    def _latent_stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent mean and std on ``device`` in ``dtype``, copied there once (a decode normalises every tile's
        every latent frame: no copy of them per call)."""
        stats = self._stats.get((device, dtype))
        if stats is None:
            stats = self._stats[device, dtype] = (self._mean.to(device, dtype), self._std.to(device, dtype))
        return stats

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(z.device, z.dtype)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(z.device, z.dtype)
        return z * std + mean


    # -- tiles ----------------------------------------------------------------------------------------

    def spatial_tiles(self, latent_h: int, latent_w: int) -> list[Tile]:
        """The tiles (row-major, :class:`~swift_model.nets.vae_tiling.Tile`, in latent pixels) that a decode of a
        ``latent_h x latent_w`` latent runs through (fixed squares, or fitted to the decode budget)."""
        return spatial_tiles(latent_h, latent_w, self.tile_shape("decode", latent_h, latent_w), self.tile_overlap)

    def encode_spatial_tiles(self, latent_h: int, latent_w: int) -> list[Tile]:
        """The tiles of a tiled encode of a video whose latent is ``latent_h x latent_w`` (pixel crops of
        ``tile * spatial_factor``; fixed squares, or fitted to the encode budget)."""
        return spatial_tiles(latent_h, latent_w, self.tile_shape("encode", latent_h, latent_w),
                             self.encode_tile_overlap)

    # -- tiles from a device budget -------------------------------------------------------------------

    def set_tile_budget(self, *, decode: int | None = None, encode: int | None = None) -> None:
        """Fit the tiles of the decode and of a tiled encode to device budgets (bytes a tile's working set may
        take; ``None``: the fixed tiles). The bytes per latent pixel of each budgeted pass are estimated here,
        once per architecture and dtype (:meth:`work_bytes_per_pixel`), so later passes do no host work for
        it."""
        for name, v in (("decode", decode), ("encode", encode)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"set_tile_budget: {name} must be an int (bytes) or None, got {v!r}")
            if v is not None:
                self.work_bytes_per_pixel(name)
        self.decode_budget, self.encode_budget = decode, encode

    def tile_shape(self, kind: str, latent_h: int, latent_w: int):
        """The tile side (an int: the fixed squares) or ``(tile_h, tile_w)`` (fitted to the budget) of a
        ``kind`` pass (``"decode"``/``"encode"``) over a ``latent_h x latent_w`` latent."""
        decode = _check_kind(kind) == "decode"
        budget = self.decode_budget if decode else self.encode_budget
        if budget is None:
            return self.tile_latent if decode else self.encode_tile_latent
        per_pixel = self.work_bytes_per_pixel(kind)
        if budget < per_pixel:
            raise ValueError(f"VAE {kind}: a device budget of {budget / 2**30:.2f} GiB holds no tile "
                             f"({per_pixel / 2**20:.2f} MiB per latent pixel)")
        # no tensor of the pass past 32-bit indexing (MAX_TENSOR_ELEMENTS), whatever the budget
        largest = self.largest_elements_per_pixel(kind)
        max_pixels = min(int(budget // per_pixel), int(MAX_TENSOR_ELEMENTS // largest))
        return fit_tiles(latent_h, latent_w, overlap=self.tile_overlap if decode else self.encode_tile_overlap,
                         max_pixels=max_pixels, max_side=self.max_tile)

    def work_bytes_per_pixel(self, kind: str) -> float:
        """The estimated device bytes per latent pixel of one tile's working set in a ``kind`` pass (``"decode"``,
        ``"encode"``): its causal caches and one temporal chunk's activations, both proportional to the tile's
        area. Measured on a copy of the architecture on the ``meta`` device (no memory, no data), an
        :data:`_MEASURE_SIDE`-square tile over :data:`_MEASURE_FRAMES` latent frames, once per architecture, dtype
        and pass in a process. An estimate: fragmentation and library workspaces are not counted."""
        key = self._work_key(kind)
        if key not in _WORK_PER_PIXEL:
            _WORK_PER_PIXEL[key] = self._measure_work(kind)
        return _WORK_PER_PIXEL[key][0]

    def largest_elements_per_pixel(self, kind: str) -> float:
        """The elements per latent pixel of the largest tensor a ``kind`` pass makes on the device (measured with
        :meth:`work_bytes_per_pixel`): a tile of ``n`` latent pixels makes one of about ``n`` times that."""
        self.work_bytes_per_pixel(kind)
        return _WORK_PER_PIXEL[self._work_key(kind)][1]

    def _work_key(self, kind: str) -> tuple:
        return (_check_kind(kind), str(self.dtype), repr(sorted(dict(self.model.config).items())))

    @torch.no_grad()
    def _measure_work(self, kind: str) -> tuple[float, float]:
        """``(bytes, elements of the largest tensor)`` per latent pixel of a ``kind`` pass (see
        :meth:`work_bytes_per_pixel`)."""
        with torch.device("meta"):
            model = type(self.model).from_config(dict(self.model.config))
        meta = WanVAE(model, dtype=self.dtype)
        n, T = _MEASURE_SIDE, _MEASURE_FRAMES
        if kind == "decode":
            z = torch.empty(1, self.z_dim, T, n, n, device="meta")
            with LiveStorageTracker("meta", round_to=1) as peak:  # to the byte: nothing is allocated
                for _ in meta._tile_frames(z, Tile(0, 0, 0, 0, n, 0, n)):
                    pass
        else:
            # the clip on the host, as the bridge's: the encoder's pre-hook moves each chunk to the device
            video = torch.zeros(1, 3, self.num_frames(T), n * self.spatial_factor, n * self.spatial_factor,
                                dtype=self.dtype)
            with LiveStorageTracker("meta", round_to=1) as peak:  # to the byte: nothing is allocated
                meta._encode_chunks(video)
        return peak.peak_bytes / (n * n), peak.largest / (n * n)

    def _encode_chunks(self, video: torch.Tensor) -> torch.Tensor:
        """The posterior mean of ``video`` ``[B, 3, F, H, W]`` (any device and dtype), as the library's
        ``encode(...).latent_dist.mode()`` computes it without tiling (frame 0, then 4 frames at a time through
        one causal cache, then ``quant_conv``), but each chunk cast, moved to the device and patchified on its own:
        the clip is never copied whole on the host (the library's cast and patchify of a 2K clip at 81 frames would
        be two more 1.6 GiB copies). The same values: the cast and the patchify are elementwise or copies of each
        frame, and the encoder sees the same chunks."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

        model, dev, dt = self.model, self.device, self.dtype
        cache = [None] * self._num_enc_convs
        outs = []
        for i in range(1 + (video.shape[2] - 1) // 4):
            f0, f1 = (0, 1) if i == 0 else (1 + 4 * (i - 1), 1 + 4 * i)
            x = video[:, :, f0:f1].to(dev, dt)
            if self.patch > 1:
                x = patchify(x, patch_size=self.patch)
            outs.append(model.encoder(x, feat_cache=cache, feat_idx=[0]))
            del x
        h = model.quant_conv(torch.cat(outs, 2))
        return h.chunk(2, dim=1)[0]  # the Gaussian's mean: its mode

    def num_frames(self, latent_frames: int) -> int:
        """Pixel frames of ``latent_frames`` latent frames (``1 + 4 * (T - 1)``)."""
        return 1 + self.temporal_factor * (latent_frames - 1)

    def encode_is_tiled(self, height: int, width: int) -> bool:
        """Whether :meth:`encode` tiles a ``height x width`` video: above ``encode_tile_min_pixels`` pixels per
        frame (default 1280x720) and larger than one tile."""
        sf = self.spatial_factor
        return (height * width > self.encode_tile_min_pixels
                and len(self.encode_spatial_tiles(height // sf, width // sf)) > 1)

    def _check_latents(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.dim() != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"VAE decode: z must be [B, {self.z_dim}, T, h, w], got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")

    def _check_video(self, video: torch.Tensor) -> None:
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"VAE encode: video must be [B, 3, F, H, W], got "
                             f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}")
        self.check_size(video.shape[2], video.shape[3], video.shape[4])

    @staticmethod
    def _check_tiles(tiles, h: int, w: int, what: str) -> None:
        for t in tiles:
            if not isinstance(t, Tile) or t.y1 > h or t.x1 > w:
                raise ValueError(f"VAE {what}: {t!r} is not a tile of a {h}x{w} latent")

    def decode_blender(self, z_shape, *, uint8: bool = False) -> TileBlender:
        """A :class:`~swift_model.nets.vae_tiling.TileBlender` for the decode of latents of shape ``z_shape``
        ``(B, C, T, h, w)``: it takes the ``(tile, pixels)`` pairs of :meth:`decode_tiles` (from any process, in
        any order) and its :meth:`~swift_model.nets.vae_tiling.TileBlender.result` is the decoded video, float32
        ``[B, 3, F, H, W]`` in ``[-1, 1]`` or, with ``uint8=True``, uint8 frames ``[B, F, H, W, 3]``."""
        B, _, T, h, w = z_shape
        return TileBlender(self.spatial_tiles(h, w), B, 3, self.num_frames(T), scale=self.spatial_factor,
                           uint8=uint8)

    @torch.no_grad()
    def decode_tiles(self, z: torch.Tensor, tiles: list[Tile], *, progress: bool = False
                     ) -> Iterator[tuple[Tile, torch.Tensor]]:
        """Decode normalised latents ``z`` ``[B, C, T, h, w]`` tile by tile and yield ``(tile, pixels)``:
        ``pixels`` is the tile's whole clip ``[B, 3, F, th*f, tw*f]``, float32 on the CPU, clamped to
        ``[-1, 1]``, not yet weighted (``f`` = the spatial factor, ``F`` = :meth:`num_frames`).

        ``tiles`` is any subset of :meth:`spatial_tiles` ``(h, w)`` (e.g. ``tiles[rank::world]`` on each rank
        of a parallel decode); the blend is :meth:`decode_blender`'s. Each tile runs all its latent frames
        with one causal-conv cache, frame by frame, sending each frame's pixels to the host as it is made;
        the cache is dropped before the next tile, so the device holds one tile's cache and one frame's
        activations, whatever the size or length of the video.
        """
        self._check_latents(z)
        B, _, T, h, w = z.shape
        tiles = list(tiles)
        self._check_tiles(tiles, h, w, "decode_tiles")
        sf, F = self.spatial_factor, self.num_frames(T)
        bar = _progress(progress, len(tiles) * T, "decode", "tile-frame")
        try:
            for tile in tiles:
                out = torch.empty(B, 3, F, tile.height * sf, tile.width * sf)
                f0 = 0
                for px in self._tile_frames(z, tile):
                    out[:, :, f0:f0 + px.shape[2]] = px  # to the host now: the device keeps no frames
                    f0 += px.shape[2]
                    del px
                    bar.update(1)
                if f0 != F:
                    raise RuntimeError(f"VAE decode: {T} latent frames gave {f0} frames, expected {F}")
                yield tile, out
                del out  # the consumer is done with it: freed before the next tile's is made
        finally:
            bar.close()

    def _tile_frames(self, z: torch.Tensor, tile: Tile) -> Iterator[torch.Tensor]:
        """The pixels of ``tile`` of normalised latents ``z``, one latent frame at a time (float32 on the VAE's
        device, clamped to ``[-1, 1]``: 1 frame, then 4 per latent frame), with one causal cache that is freed
        when the tile ends."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        model, dev, dt = self.model, self.device, self.dtype
        zt = z[:, :, :, tile.y0:tile.y1, tile.x0:tile.x1]
        cache = [None] * self._num_dec_convs
        for t in range(z.shape[2]):
            x = model.post_quant_conv(self.denormalize(zt[:, :, t:t + 1].to(dev, torch.float32)).to(dt))
            px = model.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=(t == 0))
            del x
            if self.patch > 1:
                px = unpatchify(px, patch_size=self.patch)
            yield px.float().clamp_(-1, 1)
        del cache  # free this tile's causal caches before the next tile starts

    def _decode_blended(self, z: torch.Tensor, *, uint8: bool, progress: bool) -> torch.Tensor:
        self._check_latents(z)
        blender = self.decode_blender(tuple(z.shape), uint8=uint8)
        for tile, pixels in self.decode_tiles(z, blender.tiles, progress=progress):
            blender.add(tile, pixels)
            del pixels  # before the next tile's output is made: one tile's clip on the host at a time
        return blender.result()

    def _frame_spans(self, latent_frames: int, chunk: int) -> list[tuple[int, int]]:
        """Pixel-frame spans of ``chunk`` latent frames each: ``1 + 4*(chunk-1)`` frames first, then ``4*chunk``."""
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"VAE decode: chunk must be a positive int, got {chunk!r}")
        return [(0 if t0 == 0 else self.num_frames(t0), self.num_frames(min(t0 + chunk, latent_frames)))
                for t0 in range(0, latent_frames, chunk)]

    # -- encode / decode ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_tiles(self, video: torch.Tensor, tiles: list[Tile]) -> Iterator[tuple[Tile, torch.Tensor]]:
        """Encode ``video`` ``[B, 3, F, H, W]`` (in ``[-1, 1]``, any device) tile by tile and yield
        ``(tile, latents)``: normalised latents (posterior mean) ``[B, C, T, th, tw]``, float32 on the CPU.

        ``tiles`` are latent tiles of the video's latent (any subset of :meth:`encode_spatial_tiles`
        ``(H // f, W // f)``); each one encodes its pixel crop on its own (only the crop goes to the device).
        Blend them with :meth:`encode_blender`, as :meth:`encode` does.
        """
        self._check_video(video)
        sf = self.spatial_factor
        self._check_tiles(tiles, video.shape[3] // sf, video.shape[4] // sf, "encode_tiles")
        for tile in tiles:
            # cast where the clip is; the encoder's pre-hook moves each chunk to the device
            z = self._encode_chunks(video[:, :, :, tile.y0 * sf:tile.y1 * sf, tile.x0 * sf:tile.x1 * sf])
            yield tile, self.normalize(z.float()).cpu()

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised latents (posterior mean, float32, on the VAE's device) of ``video`` ``[B, 3, F, H, W]`` in
        ``[-1, 1]``. Videos of at most ``encode_tile_min_pixels`` pixels per frame (default 1280x720) are
        encoded in one piece; larger ones tile by tile (:meth:`encode_tiles`), blended with linear ramps in
        latent space, so the device holds one tile's pixels and caches."""
        self._check_video(video)
        B, _, F, H, W = video.shape
        if not self.encode_is_tiled(H, W):
            return self.normalize(self._encode_chunks(video).float())
        blender = self.encode_blender(tuple(video.shape))
        for tile, z in self.encode_tiles(video, blender.tiles):
            blender.add(tile, z)
        return blender.result().to(self.device)

    def encode_blender(self, video_shape) -> TileBlender:
        """A :class:`~swift_model.nets.vae_tiling.TileBlender` for the tiled encode of a video of shape
        ``video_shape`` ``(B, 3, F, H, W)``: it takes :meth:`encode_tiles`' pairs (from any process, in any
        order); its result is the normalised latents ``[B, C, T, H // f, W // f]``, float32 on the CPU."""
        B, _, F, H, W = video_shape
        sf = self.spatial_factor
        return TileBlender(self.encode_spatial_tiles(H // sf, W // sf), B, self.z_dim,
                           (F - 1) // self.temporal_factor + 1, scale=1)

    def decode_stream(self, z: torch.Tensor, chunk: int = 1, *, progress: bool = False) -> Iterator[torch.Tensor]:
        """Decode normalised latents ``[B, C, T, h, w]`` and yield pixel chunks ``[B, 3, f, H, W]`` (float32 in
        ``[-1, 1]`` on the VAE's device), ``chunk`` latent frames at a time: ``1 + 4*(chunk-1)`` pixel frames
        first, then ``4*chunk``.

        The decode is tile-major (:meth:`decode_tiles`): the whole clip is decoded and blended on the host
        (float32, the size of the video) before the first chunk is yielded; the device holds one tile's
        caches during the decode and one chunk afterwards.
        """
        video = self._decode_blended(z, uint8=False, progress=progress)
        for f0, f1 in self._frame_spans(z.shape[2], chunk):
            yield video[:, :, f0:f1].to(self.device)

    def decode(self, z: torch.Tensor, chunk: int = 1, *, progress: bool = False) -> torch.Tensor:
        """The whole decoded video ``[B, 3, F, H, W]`` as float32 on the CPU (see :meth:`decode_tiles`; ``chunk``
        is accepted for compatibility and does not change the result)."""
        self._frame_spans(1, chunk)  # checks chunk
        return self._decode_blended(z, uint8=False, progress=progress)

    def decode_uint8_stream(self, z: torch.Tensor, chunk: int = 1, *, progress: bool = False
                            ) -> Iterator[torch.Tensor]:
        """Decoded frames of the first sample as uint8 chunks ``[f, H, W, 3]`` on the CPU, for a video writer.

        The blend finalises each cell of the output (between tile edges) to uint8 as soon as no tile still to come
        covers it, so the host holds the uint8 video, one tile's clip and the open overlaps in float32, not a
        float32 copy of the video.
        """
        self._check_latents(z)
        spans = self._frame_spans(z.shape[2], chunk)
        tiles = self.spatial_tiles(z.shape[3], z.shape[4])
        if len(tiles) == 1:
            # One tile is the whole frame: a plain causal decode in temporal chunks of whole frames, nothing to
            # blend, so each chunk goes out as uint8 as soon as it is decoded (the host holds one chunk).
            yield from self._whole_frames_uint8(z[:1], tiles[0], chunk, progress)
            return
        video = self._decode_blended(z[:1], uint8=True, progress=progress)[0]
        for f0, f1 in spans:
            yield video[f0:f1]

    def _whole_frames_uint8(self, z: torch.Tensor, tile: Tile, chunk: int, progress: bool) -> Iterator[torch.Tensor]:
        """uint8 chunks ``[f, H, W, 3]`` of ``chunk`` latent frames of the first sample, decoded whole-frame."""
        bar = _progress(progress, z.shape[2], "decode", "frame")
        pending = []
        try:
            for t, px in enumerate(self._tile_frames(z, tile)):
                pending.append(to_uint8(px[0].cpu()))  # the bytes the blender would store for this frame
                bar.update(1)
                if len(pending) == chunk or t == z.shape[2] - 1:
                    yield torch.cat(pending, 0)
                    pending = []
        finally:
            bar.close()

    def decode_uint8(self, z: torch.Tensor, chunk: int = 1, *, progress: bool = False) -> torch.Tensor:
        """Decoded video of the first sample as uint8 frames ``[F, H, W, 3]`` on the CPU."""
        self._check_latents(z)
        self._frame_spans(1, chunk)  # checks chunk
        tiles = self.spatial_tiles(z.shape[3], z.shape[4])
        if len(tiles) == 1:  # whole frames: the frames as they are decoded, in one chunk
            return next(self._whole_frames_uint8(z[:1], tiles[0], z.shape[2], progress))
        return self._decode_blended(z[:1], uint8=True, progress=progress)[0]


def _check_kind(kind: str) -> str:
    if kind not in ("decode", "encode"):
        raise ValueError(f"VAE pass must be 'decode' or 'encode', got {kind!r}")
    return kind


def _progress(enabled: bool, total: int, desc: str, unit: str):
    """A tqdm bar (a silent one when ``enabled`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
