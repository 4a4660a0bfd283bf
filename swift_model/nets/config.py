"""Configuration of the Wan-class diffusion transformer (:class:`WanDiTConfig`) and its presets.

The presets match the public checkpoints (Wan2.1 / Wan2.2) and add tiny ones for CPU tests and demos:

==================== ====== ====== ===== ====== ======== ========= ===================================
name                  dim    layers heads ffn    in / out image     timestep
==================== ====== ====== ===== ====== ======== ========= ===================================
``wan2.1-t2v-1.3b``   1536   30     12    8960   16 / 16  -         per sample
``wan2.1-t2v-14b``    5120   40     40    13824  16 / 16  -         per sample
``wan2.1-i2v-14b``    5120   40     40    13824  36 / 16  CLIP 1280 per sample
``wan2.2-i2v-a14b``   5120   40     40    13824  36 / 16  -         per sample
``wan2.2-t2v-a14b``   5120   40     40    13824  16 / 16  -         per sample
``wan2.2-ti2v-5b``    3072   30     24    14336  48 / 48  -         per token (0 on the image frame)
``tiny-t2v``          64     2      4     128    16 / 16  -         per sample
``tiny-i2v``          64     2      4     128    36 / 16  CLIP 32   per sample
``tiny-ti2v``         64     2      4     128    48 / 48  -         per token
==================== ====== ====== ===== ====== ======== ========= ===================================

Shared by all: patch (1, 2, 2), text embeddings of ``text_dim`` padded to ``text_len = 512`` tokens, a 256-dim
sinusoidal timestep embedding, 6-way AdaLN, RMSNorm of q and k across heads, 3D RoPE, LayerNorm with affine
before the cross-attention, GELU-tanh FFN. The tiny presets use head dim 16 and a 32-dim text embedding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..io.files import read_json

_KINDS = ("t2v", "i2v", "ti2v")


@dataclass(frozen=True)
class WanDiTConfig:
    """Hyper-parameters of a Wan-class DiT.

    Attributes:
        dim: hidden width (``num_heads * head_dim``).
        num_layers: transformer blocks.
        num_heads: attention heads (head dim = ``dim // num_heads``).
        ffn_dim: FFN hidden width.
        in_channels / out_channels: latent channels in and out (``in > out`` for I2V models whose input
            carries the conditioning channels, and for the Stage II "swift" variant).
        text_dim: width of the text encoder's embeddings (UMT5-XXL: 4096).
        text_len: text tokens after padding/truncation (512).
        freq_dim: sinusoidal timestep embedding width (256).
        patch_size: (t, h, w) patch of the latent (1, 2, 2).
        eps: epsilon of every norm.
        image_dim: width of the CLIP image tokens (1280) for Wan2.1 I2V, or ``None``.
        image_len: number of CLIP image tokens (257).
        cross_attn_norm: LayerNorm (with affine) before the cross-attention.
        per_token_timestep: the model is used with one timestep per token (Wan2.2 TI2V); informational,
            the forward accepts both forms for every model.
        rope_theta: RoPE base.
        kind: ``"t2v"``, ``"i2v"`` or ``"ti2v"``.
        extra_in_channels: input channels added on top of a public checkpoint's (Stage II "swift"
            variant); loaded from a public checkpoint they start at zero weights.
        name: preset name (informational).
    """

    dim: int = 1536
    num_layers: int = 30
    num_heads: int = 12
    ffn_dim: int = 8960
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    image_dim: int | None = None
    image_len: int = 257
    cross_attn_norm: bool = True
    per_token_timestep: bool = False
    rope_theta: float = 10000.0
    kind: str = "t2v"
    extra_in_channels: int = 0
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for attr in ("dim", "num_layers", "num_heads", "ffn_dim", "in_channels", "out_channels", "text_dim",
                     "text_len", "freq_dim", "image_len"):
            v = getattr(self, attr)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{attr} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{attr} must be >= 1, got {v}")
        if isinstance(self.extra_in_channels, bool) or not isinstance(self.extra_in_channels, int) or self.extra_in_channels < 0:
            raise ValueError(f"extra_in_channels must be an int >= 0, got {self.extra_in_channels!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of num_heads ({self.num_heads})")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head dim (dim // num_heads = {self.head_dim}) must be even and >= 6 for 3D RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")
        ps = tuple(int(p) for p in self.patch_size)
        if len(ps) != 3 or min(ps) < 1:
            raise ValueError(f"patch_size must be three positive ints, got {self.patch_size!r}")
        object.__setattr__(self, "patch_size", ps)
        if self.image_dim is not None and (isinstance(self.image_dim, bool) or not isinstance(self.image_dim, int) or self.image_dim < 1):
            raise ValueError(f"image_dim must be a positive int or None, got {self.image_dim!r}")
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.extra_in_channels > self.in_channels:
            raise ValueError("extra_in_channels cannot exceed in_channels")

    @property
    def head_dim(self) -> int:
        """Per-head width ``dim // num_heads``."""
        return self.dim // self.num_heads

    @property
    def base_in_channels(self) -> int:
        """Input channels of the public checkpoint this config extends (``in_channels - extra_in_channels``)."""
        return self.in_channels - self.extra_in_channels

    @property
    def has_image_input(self) -> bool:
        """Whether the model takes CLIP image tokens (Wan2.1 I2V)."""
        return self.image_dim is not None

    # -- presets ----------------------------------------------------------------------------------

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        """Names accepted by :meth:`preset`."""
        return tuple(_PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "WanDiTConfig":
        """The config of a named preset (see the module docstring), with optional field overrides."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        key = name.lower()
        if key not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(_PRESETS)}")
        fields = dict(_PRESETS[key])
        fields.update(overrides)
        fields.setdefault("name", key)
        return cls(**fields)

    def widened_input(self, extra_in_channels: int) -> "WanDiTConfig":
        """The Stage II "swift" variant: ``extra_in_channels`` more input channels (e.g. 48 for ``z_ref``).

        The output channels are unchanged. Loaded from a public checkpoint, the new channels' patch-embedding
        weights start at zero, so the widened model computes exactly what the public one does.
        """
        if isinstance(extra_in_channels, bool) or not isinstance(extra_in_channels, int):
            raise TypeError(f"extra_in_channels must be an int, got {type(extra_in_channels).__name__}")
        if extra_in_channels < 0:
            raise ValueError(f"extra_in_channels must be >= 0, got {extra_in_channels}")
        return dataclasses.replace(
            self,
            in_channels=self.in_channels + extra_in_channels,
            extra_in_channels=self.extra_in_channels + extra_in_channels,
            name=f"{self.name}+in{extra_in_channels}" if extra_in_channels else self.name,
        )

    def replace(self, **changes: Any) -> "WanDiTConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # -- conversion to/from the checkpoint configs ------------------------------------------------------

    def to_diffusers(self) -> dict[str, Any]:
        """The ``config.json`` dict of diffusers' ``WanTransformer3DModel`` for this config."""
        return {
            "_class_name": "WanTransformer3DModel",
            "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads",
            "eps": self.eps,
            "image_dim": self.image_dim,
            "added_kv_proj_dim": self.dim if self.image_dim is not None else None,
            "rope_max_seq_len": 1024,
            "pos_embed_seq_len": None,
        }

    def to_wan(self) -> dict[str, Any]:
        """The ``config.json`` dict of the original Wan ``WanModel`` for this config."""
        return {
            "_class_name": "WanModel",
            "model_type": self.kind,
            "patch_size": list(self.patch_size),
            "text_len": self.text_len,
            "in_dim": self.in_channels,
            "dim": self.dim,
            "ffn_dim": self.ffn_dim,
            "freq_dim": self.freq_dim,
            "text_dim": self.text_dim,
            "out_dim": self.out_channels,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "eps": self.eps,
            "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": True,
        }

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "WanDiTConfig":
        """A config from either a diffusers ``WanTransformer3DModel`` or an original Wan ``WanModel`` config dict.

        A field of the wrong type raises :class:`ConfigFieldError` (a ``ValueError``) naming the field.
        """
        if not isinstance(cfg, dict):
            raise TypeError(f"cfg must be a dict, got {type(cfg).__name__}")
        f = _Fields(cfg)
        if "num_attention_heads" in cfg:  # diffusers
            heads = f.integer("num_attention_heads")
            hd = f.integer("attention_head_dim", 128)
            image_dim = f.integer("image_dim", None)
            in_ch = f.integer("in_channels", 16)
            out_ch = f.integer("out_channels", None) or in_ch
            if cfg.get("pos_embed_seq_len"):
                raise ConfigFieldError("pos_embed_seq_len", "configs with pos_embed_seq_len (Wan FLF2V) are not supported")
            kind = "i2v" if (image_dim is not None or in_ch > out_ch) else ("ti2v" if in_ch == 48 else "t2v")
            return f.build(
                cls, dim=heads * hd, num_layers=f.integer("num_layers", 40), num_heads=heads,
                ffn_dim=f.integer("ffn_dim", 13824), in_channels=in_ch, out_channels=out_ch,
                text_dim=f.integer("text_dim", 4096), freq_dim=f.integer("freq_dim", 256),
                patch_size=f.ints3("patch_size"), eps=f.number("eps", 1e-6), image_dim=image_dim,
                cross_attn_norm=f.flag("cross_attn_norm", True), kind=kind,
                per_token_timestep=kind == "ti2v", name="diffusers",
            )
        if "dim" in cfg and "num_heads" in cfg:  # original Wan
            model_type = f.text("model_type", "t2v")
            if model_type in ("flf2v", "vace"):
                raise ConfigFieldError("model_type", f"original Wan model_type {model_type!r} is not supported")
            kind = model_type if model_type in _KINDS else "t2v"
            # Wan2.1 I2V carries CLIP image tokens; Wan2.2 I2V (same model_type) does not: the weights decide,
            # so callers pass image_dim explicitly via the checkpoint loader when img_emb is present.
            return f.build(
                cls, dim=f.integer("dim"), num_layers=f.integer("num_layers", 32), num_heads=f.integer("num_heads"),
                ffn_dim=f.integer("ffn_dim", 8960), in_channels=f.integer("in_dim", 16), out_channels=f.integer("out_dim", 16),
                text_dim=f.integer("text_dim", 4096), text_len=f.integer("text_len", 512),
                freq_dim=f.integer("freq_dim", 256), patch_size=f.ints3("patch_size"),
                eps=f.number("eps", 1e-6), image_dim=f.integer("image_dim", None),
                cross_attn_norm=f.flag("cross_attn_norm", True), kind=kind,
                per_token_timestep=kind == "ti2v", name="wan",
            )
        raise ValueError(
            "config dict is neither a diffusers WanTransformer3DModel config (num_attention_heads, ...) "
            f"nor an original Wan config (dim, num_heads, ...); keys: {sorted(cfg)[:20]}"
        )

    @classmethod
    def from_json(cls, path) -> "WanDiTConfig":
        """:meth:`from_dict` of a ``config.json`` file (read by :func:`swift_model.io.files.read_json`)."""
        return cls.from_dict(read_json(path))


class ConfigFieldError(ValueError):
    """A checkpoint config field of the wrong type or value; ``field`` names it."""

    def __init__(self, field: str | None, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"field {field!r}: {problem}" if field else problem)


_MISSING = object()


class _Fields:
    """Typed reads of a checkpoint config dict; each failure names its field (JSON has no int/str
    confusion to forgive, so a string where a number belongs is an error, not something to parse)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg

    def _get(self, name: str, default):
        v = self.cfg.get(name, default)
        if v is _MISSING:
            raise ConfigFieldError(name, "missing")
        return v

    def integer(self, name: str, default=_MISSING):
        v = self._get(name, default)
        if v is None and default is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigFieldError(name, f"expected an integer, got {v!r}")
        return v

    def number(self, name: str, default=_MISSING) -> float:
        v = self._get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigFieldError(name, f"expected a number, got {v!r}")
        return float(v)

    def flag(self, name: str, default=_MISSING) -> bool:
        v = self._get(name, default)
        if not isinstance(v, bool):
            raise ConfigFieldError(name, f"expected true or false, got {v!r}")
        return v

    def text(self, name: str, default=_MISSING) -> str:
        v = self._get(name, default)
        if not isinstance(v, str):
            raise ConfigFieldError(name, f"expected a string, got {v!r}")
        return v

    def ints3(self, name: str) -> tuple[int, int, int]:
        v = self._get(name, (1, 2, 2))
        if not isinstance(v, (list, tuple)) or len(v) != 3 or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
            raise ConfigFieldError(name, f"expected a list of three integers, got {v!r}")
        return tuple(v)

    @staticmethod
    def build(cls, **fields):
        """``cls(**fields)``, with the dataclass's own range checks reported as config errors."""
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise ConfigFieldError(None, f"values that make no model: {exc}") from None


_COMMON_14B = dict(dim=5120, num_layers=40, num_heads=40, ffn_dim=13824)
_TINY = dict(dim=64, num_layers=2, num_heads=4, ffn_dim=128, text_dim=32)

_PRESETS: dict[str, dict[str, Any]] = {
    "wan2.1-t2v-1.3b": dict(dim=1536, num_layers=30, num_heads=12, ffn_dim=8960, in_channels=16, out_channels=16),
    "wan2.1-t2v-14b": dict(**_COMMON_14B, in_channels=16, out_channels=16),
    "wan2.1-i2v-14b": dict(**_COMMON_14B, in_channels=36, out_channels=16, image_dim=1280, kind="i2v"),
    "wan2.2-i2v-a14b": dict(**_COMMON_14B, in_channels=36, out_channels=16, kind="i2v"),
    "wan2.2-t2v-a14b": dict(**_COMMON_14B, in_channels=16, out_channels=16),
    "wan2.2-ti2v-5b": dict(dim=3072, num_layers=30, num_heads=24, ffn_dim=14336, in_channels=48, out_channels=48,
                           kind="ti2v", per_token_timestep=True),
    "tiny-t2v": dict(**_TINY, in_channels=16, out_channels=16),
    "tiny-i2v": dict(**_TINY, in_channels=36, out_channels=16, image_dim=32, kind="i2v"),
    "tiny-ti2v": dict(**_TINY, in_channels=48, out_channels=48, kind="ti2v", per_token_timestep=True),
}
