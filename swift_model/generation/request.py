"""What one video asks for: :class:`GenerationRequest`, checked when it is built, before any model is read.

The same object goes through ``SwiftI2VPipeline.generate``, ``swift-i2v generate``/``demo``/``plan``, the
planner (:func:`swift_model.planning.planner.plan_generation`) and the reports, so a setting is named, typed and
checked in one place. What depends on the models (the exact size multiple of the VAEs, a text encoder for a
prompt) is checked by the pipeline (``SwiftI2VPipeline.prepare``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from .csg import STAGE2_KINDS, check_int, parse_neighbors

# The smallest size multiple of any Wan pipeline: a Wan2.1 (8x) Stage I VAE under a 2x2 patch at a quarter of
# the output size per side (a Wan2.2 Stage I VAE needs 128; the pipeline checks the exact value).
MIN_SIZE_MULTIPLE = 64

STEP_MODES = ("renoise", "euler")


def check_size(frames, width, height, size_multiple: int = MIN_SIZE_MULTIPLE) -> None:
    """``TypeError``/``ValueError`` unless ``frames`` is ``4k + 1 >= 5`` and ``width``/``height`` are positive
    multiples of ``size_multiple`` (Stage I runs at a quarter of each side)."""
    for name, v in (("frames", frames), ("width", width), ("height", height)):
        check_int(v, name)
    if frames < 5 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4k+1 and at least 5 (e.g. 81), got {frames}")
    m = size_multiple
    if width < m or height < m or width % m or height % m:
        raise ValueError(f"width and height must be positive multiples of {m} (Stage I runs at a quarter per "
                         f"side), got {width}x{height}")


def _check_embeds(name: str, value) -> None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a float tensor or a safetensors path, got "
                            f"{getattr(value, 'dtype', type(value).__name__)}")


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One video: its inputs and every setting of the run, checked when the request is built (``TypeError`` /
    ``ValueError`` naming the argument).

    Inputs:
        image: a path or a PIL image (resized and centre-cropped to the output aspect); ``None`` only for a
            plan, which needs no picture.
        prompt: the text prompt (needs the pipeline's text encoder; ignored when ``prompt_embeds`` is given).
        prompt_embeds: a float ``[1, L, text_dim]`` tensor or a safetensors path (tensor ``"prompt_embeds"``),
            in place of the text encoder.
        negative_prompt, negative_prompt_embeds: the unconditional branch of the guidance (empty prompt by
            default).
        image_embeds: CLIP image tokens ``[1, N, image_dim]`` for a Stage I DiT that takes them, in place of the
            CLIP image encoder.

    Settings:
        frames: output frames, ``4k + 1`` and ``>= 5`` (default 81).
        width, height: output size in pixels (default 2560 x 1408), multiples of :data:`MIN_SIZE_MULTIPLE` here
            and of what both VAEs need in the pipeline. Stage I runs at a quarter of each side.
        steps: sampling steps per stage (default 4); shift: flow-matching timestep shift (default 5.0).
        seed: a non-negative int; the same seed gives the same video. step_mode: ``"renoise"`` or ``"euler"``.
        guidance_scale: classifier-free guidance in both stages (``None`` or 1.0: off, the default: the 4-step
            models are distilled without it; stored as ``None``); costs a second DiT call per step.
        guidance_scale_2: the guidance of a two-expert Stage I's low-noise expert (diffusers'
            ``guidance_scale_2``; ``None``: ``guidance_scale``, as diffusers). Needs ``guidance_scale`` (the
            guidance is on or off for the whole run: diffusers too runs no unconditional branch when its first
            scale is off) and a two-expert Stage I (the pipeline checks that).
        segment_blocks: ``M``, latent frames per CSG segment (default 2); neighbors: ``(NL, NR)``, an int or
            ``"NL,NR"``, clean neighbour latent frames each segment sees (default ``(1, 0)``; stored as a pair).
        joint: denoise all segments at once (clip-mode attention) instead of one window at a time.
        start_sigma: the noise level each segment starts from, in ``(0, 1]`` (``"refine"`` kind only; checked for
            every kind, so a bad value is never silently ignored; default 0.6).
        shared_anchor: the anchor (the input image's latent frame) attends only itself in every Stage II window,
            for Stage II networks trained that way (a departure from the paper, whose windows are dense); its
            keys and values are then computed once and reused by every window and step.
        stage2_kind: ``None`` (the pipeline's own) or the kind it was built for (``"swift"``/``"refine"``).
        output: write the mp4 there (``None``: return the frames); fps: its frame rate, an int ``>= 1``.
    """

    image: Any = None
    prompt: str | None = None
    prompt_embeds: Any = None
    negative_prompt: str = ""
    negative_prompt_embeds: Any = None
    image_embeds: torch.Tensor | None = None
    frames: int = 81
    width: int = 2560
    height: int = 1408
    steps: int = 4
    shift: float = 5.0
    seed: int = 0
    step_mode: str = "renoise"
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    segment_blocks: int = 2
    neighbors: Any = (1, 0)
    joint: bool = False
    start_sigma: float = 0.6
    shared_anchor: bool = False
    stage2_kind: str | None = None
    output: str | None = None
    fps: int = 16

    def __post_init__(self) -> None:
        check_size(self.frames, self.width, self.height)
        check_int(self.segment_blocks, "segment_blocks", 1)
        object.__setattr__(self, "neighbors", parse_neighbors(self.neighbors))
        self._check_sampling()
        self._check_inputs()
        for name in ("joint", "shared_anchor"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.stage2_kind is not None and self.stage2_kind not in STAGE2_KINDS:
            raise ValueError(f"stage2_kind must be one of {STAGE2_KINDS} or None, got {self.stage2_kind!r}")
        check_int(self.fps, "fps", 1)
        if self.output is not None and not isinstance(self.output, (str, os.PathLike)):
            raise TypeError(f"output must be a path, got {type(self.output).__name__}")

    def _check_sampling(self) -> None:
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        check_int(self.steps, "steps", 1)
        shift = self.shift
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ValueError(f"shift must be a positive number, got {shift!r}")
        if self.step_mode not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {STEP_MODES}, got {self.step_mode!r}")
        g = self.guidance_scale
        if g is not None:
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0:
                raise ValueError(f"guidance_scale must be a positive float or None, got {g!r}")
            object.__setattr__(self, "guidance_scale", None if float(g) == 1.0 else float(g))
        g2 = self.guidance_scale_2
        if g2 is not None:
            if isinstance(g2, bool) or not isinstance(g2, (int, float)) or not g2 > 0:
                raise ValueError(f"guidance_scale_2 must be a positive float or None, got {g2!r}")
            if self.guidance_scale is None:
                raise ValueError("guidance_scale_2 needs guidance_scale: with guidance off the low-noise expert "
                                 "would ignore it (set guidance_scale > 1, or leave guidance_scale_2 out)")
            object.__setattr__(self, "guidance_scale_2", float(g2))
        s = self.start_sigma
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
            raise ValueError(f"start_sigma must be a number in (0, 1], got {s!r}")

    def _check_inputs(self) -> None:
        if not isinstance(self.negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise TypeError(f"prompt must be a string (or pass prompt_embeds), got {type(self.prompt).__name__}")
        _check_embeds("prompt_embeds", self.prompt_embeds)
        _check_embeds("negative_prompt_embeds", self.negative_prompt_embeds)

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance is on."""
        return self.guidance_scale is not None

    def replace(self, **changes) -> "GenerationRequest":
        """A copy with ``changes`` applied, checked again."""
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict:
        """The settings (not the inputs) as JSON-serialisable values, for reports."""
        return dict(frames=self.frames, width=self.width, height=self.height, steps=self.steps, shift=self.shift,
                    seed=self.seed, step_mode=self.step_mode, guidance_scale=self.guidance_scale,
                    guidance_scale_2=self.guidance_scale_2,
                    segment_blocks=self.segment_blocks, neighbors=list(self.neighbors), joint=self.joint,
                    start_sigma=self.start_sigma, shared_anchor=self.shared_anchor)
