"""The architectures of every model of a generation, and how to build them: :class:`ModelSpec`.

A spec names the two DiTs (:class:`~swift_model.nets.config.WanDiTConfig`), the two VAEs (``AutoencoderKLWan``
arguments) and the encoders (``UMT5Config`` / ``CLIPVisionConfig`` arguments, or ``None``). It comes from
built-in presets (:meth:`ModelSpec.preset`), the tiny demo models (:meth:`ModelSpec.tiny`), or checkpoint
folders' configs and headers (:func:`swift_model.loading.preflight.checkpoint_spec`). :meth:`ModelSpec.build`
makes the models: with seeded random weights (the tiny demo), or on the meta device, handed to a function that
gives them storage (fake tensors for the planner, uninitialised memory for a GPU measurement).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .config import WanDiTConfig
from .dit import WanDiT
from .encoders import (CLIP_VIT_H, TEXT_LEN, UMT5_XXL, ByteTokenizer, ImageEncoder, TextEncoder, tiny_clip_config,
                       tiny_umt5_config)
from .vae import WanVAE, public_config, tiny_config

# Stage II's kinds: "swift" starts the noisy tokens from pure noise (the method's network, which reads z_ref through
# its widened input), "refine" from z_ref noised to a start sigma (training-free with the public Wan2.2-TI2V-5B).
STAGE2_KINDS = ("swift", "refine")


def stage2_extra_channels(config: WanDiTConfig, kind: str) -> int:
    """Input channels to add to a Stage II DiT for ``kind``: a public (unwidened, ``in == out``) checkpoint used
    as the method's network (``"swift"``, noisy latents channel-concatenated with ``z_ref``) is widened by its
    latent channels, the extra ones starting at zero; otherwise none."""
    if kind not in STAGE2_KINDS:
        raise ValueError(f"stage2_kind must be one of {STAGE2_KINDS}, got {kind!r}")
    return config.in_channels if kind == "swift" and config.in_channels == config.out_channels else 0


# Stage I presets of two-expert models (Wan2.2 A14B: a high-noise and a low-noise transformer of one architecture)
# -> the boundary ratio of their published pipeline config (model_index.json "boundary_ratio" of the diffusers
# release; the original release's i2v-A14B config sets the same 0.900).
TWO_EXPERT_PRESETS = {"wan2.2-i2v-a14b": 0.9}


def check_boundary_ratio(value, where: str = "boundary_ratio") -> float:
    """``value`` as a float in ``[0, 1]`` (the fraction of the 1000 training timesteps at which a two-expert
    Stage I hands over from its high-noise to its low-noise expert); ``TypeError``/``ValueError`` naming
    ``where`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a number in [0, 1], got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{where} must be in [0, 1], got {value!r}")
    return float(value)


def check_experts(high: WanDiTConfig, low: WanDiTConfig) -> None:
    """``ValueError`` unless two Stage I experts take the same inputs (the conditioning is prepared once for both):
    the same input/output channels, patch, text and image widths, heads (Ulysses splits both alike) and head dim."""
    fields = ("in_channels", "out_channels", "patch_size", "text_dim", "image_dim", "freq_dim", "num_heads")
    diff = [f"{f} {getattr(high, f)} vs {getattr(low, f)}" for f in fields if getattr(high, f) != getattr(low, f)]
    if high.dim // high.num_heads != low.dim // low.num_heads:
        diff.append(f"head dim {high.dim // high.num_heads} vs {low.dim // low.num_heads}")
    if diff:
        raise ValueError("the two Stage I experts (high-noise, low-noise) must take the same inputs: "
                         + "; ".join(diff))


def stage2_config(config: WanDiTConfig, kind: str) -> WanDiTConfig:
    """The Stage II architecture the pipeline builds for ``kind`` from a checkpoint's ``config``."""
    extra = stage2_extra_channels(config, kind)
    return config.widened_input(extra) if extra else config


@dataclasses.dataclass
class Models:
    """The models of a generation, ready for :class:`~swift_model.generation.pipeline.SwiftI2VPipeline`."""

    stage1: WanDiT
    stage2: WanDiT
    vae1: WanVAE
    vae2: WanVAE
    text_encoder: TextEncoder | None
    image_encoder: ImageEncoder | None
    stage1_2: WanDiT | None = None  # Stage I's low-noise expert (two-expert models), else None


# materialize(module, dtype) -> module: gives a module built on the meta device its storage (dtype: cast the
# floating-point tensors to it; None: keep each tensor's dtype).
Materialize = Callable[[torch.nn.Module, "torch.dtype | None"], torch.nn.Module]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture of every model of a generation (no weights).

    ``stage1`` / ``stage2``: the DiT configs as the pipeline builds them (Stage II widened for ``"swift"``);
    ``vae1`` / ``vae2``: ``AutoencoderKLWan`` arguments; ``text_encoder``: ``UMT5Config`` arguments or ``None``
    (prompt embeddings given); ``image_encoder``: ``CLIPVisionConfig`` arguments or ``None``; ``stage1_2``: the
    config of Stage I's low-noise expert for a two-expert model (Wan2.2-I2V-A14B; ``stage1`` is then the
    high-noise one) and ``boundary_ratio`` its hand-over ratio (both ``None`` for one expert).
    """

    stage1: WanDiTConfig
    stage2: WanDiTConfig
    vae1: dict
    vae2: dict
    text_encoder: dict | None
    image_encoder: dict | None
    stage2_kind: str
    stage1_2: WanDiTConfig | None = None
    boundary_ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.stage1_2 is None) != (self.boundary_ratio is None):
            raise ValueError("a two-expert Stage I needs both stage1_2 and boundary_ratio (one expert: neither)")
        if self.stage1_2 is not None:
            check_boundary_ratio(self.boundary_ratio)
            check_experts(self.stage1, self.stage1_2)

    @classmethod
    def tiny(cls, stage2_kind: str = "swift") -> "ModelSpec":
        """The tiny random-weight models of the demo and the tests (``SwiftI2VPipeline.tiny``)."""
        c1, c2 = WanDiTConfig.preset("tiny-i2v"), WanDiTConfig.preset("tiny-ti2v")
        if c2.text_dim != c1.text_dim:
            raise ValueError("tiny presets must share the text width")
        image = tiny_clip_config(c1.image_dim) if c1.image_dim else None
        return cls(c1, stage2_config(c2, stage2_kind), tiny_config(16), tiny_config(48), tiny_umt5_config(c1.text_dim),
                   image, stage2_kind)

    @classmethod
    def preset(cls, stage1: str = "wan2.1-i2v-14b", stage2: str = "wan2.2-ti2v-5b", *, stage2_kind: str = "refine",
               text_encoder: bool = True) -> "ModelSpec":
        """Built-in presets (``WanDiTConfig.preset`` names) with the public VAEs and encoders; ``text_encoder=False``
        for a run from prompt embeddings. A two-expert Stage I preset (:data:`TWO_EXPERT_PRESETS`:
        ``wan2.2-i2v-a14b``) gives both experts, of the same architecture, and the published boundary ratio."""
        c1, c2 = WanDiTConfig.preset(stage1), WanDiTConfig.preset(stage2)
        ratio = TWO_EXPERT_PRESETS.get(str(stage1).lower())
        return cls(c1, stage2_config(c2, stage2_kind), public_config(c1.out_channels), public_config(c2.out_channels),
                   dict(UMT5_XXL) if text_encoder else None, dict(CLIP_VIT_H) if c1.image_dim else None, stage2_kind,
                   stage1_2=None if ratio is None else c1, boundary_ratio=ratio)

    def build(self, *, seed: int = 0, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32,
              materialize: Materialize | None = None) -> Models:
        """The models of this spec on the CPU.

        Without ``materialize``: random weights drawn from ``seed`` (the DiTs from ``seed``, one after the other;
        the VAEs from ``seed`` and ``seed + 1``; the encoders from ``seed``), as the tiny demo draws them. With it:
        every module is built on the meta device and ``materialize(module, dtype)`` gives it storage. ``dtype``:
        the DiTs' matmul weights and the encoders (the DiTs keep their fp32 parameters fp32); ``vae_dtype``: the
        VAEs'.
        """
        from diffusers import AutoencoderKLWan
        from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

        def make(build, seed_):
            if materialize is not None:
                with torch.device("meta"):
                    return build()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_)
                return build()

        s1, s2 = make(lambda: (WanDiT(self.stage1), WanDiT(self.stage2)), seed)
        experts = ()
        if self.stage1_2 is not None:  # drawn after the other two, so a one-expert spec builds as before
            experts = (make(lambda: WanDiT(self.stage1_2), seed + 2),)
        dits = []
        for dit in (s1, s2, *experts):
            if dtype != torch.float32:
                dit.to_dtype(dtype)
            dits.append(dit if materialize is None else materialize(dit, None))

        def own(module, dt):
            if materialize is not None:
                return materialize(module, dt)
            return module if dt is None else module.to(dt)

        # WanVAE casts a random-weight model itself (the weights are drawn in fp32 for every dtype)
        vae_storage = vae_dtype if materialize is not None else None
        vaes = [WanVAE(own(make(lambda c=cfg: AutoencoderKLWan(**c), seed + i), vae_storage), dtype=vae_dtype)
                for i, cfg in enumerate((self.vae1, self.vae2))]
        text = image = None
        if self.text_encoder is not None:
            model = own(make(lambda: UMT5EncoderModel(UMT5Config(**self.text_encoder)), seed), dtype)
            text = TextEncoder(model, ByteTokenizer(int(model.config.vocab_size)), max_length=TEXT_LEN)
        if self.image_encoder is not None:
            model = own(make(lambda: CLIPVisionModel(CLIPVisionConfig(**self.image_encoder)), seed), dtype)
            image = ImageEncoder(model, int(model.config.image_size))
        return Models(*dits[:2], *vaes, text, image, stage1_2=dits[2] if experts else None)
