"""Checks of checkpoint arguments that read no weights (loading layer), for the command line to run before
any model is loaded: a typo in a path or a broken config then costs milliseconds, not a 14B load.

:func:`check_checkpoints` resolves every component the pipeline would load from the given folders (the two
DiTs, their VAEs, the encoders, the LoRA), parses every config and reads the weight files' headers (tensor
names, shapes and dtypes). Errors are :class:`~swift_model.io.files.CheckpointError` (a ``ValueError``) or
``CheckpointNotFoundError`` (a ``FileNotFoundError``) naming the stage, the file and the key or field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..io.files import CheckpointError, CheckpointNotFoundError, read_json
from ..nets.encoders import CLIP_VIT_H, UMT5_XXL, locate_image_encoder, locate_text_encoder
from ..nets.spec import ModelSpec, check_experts, stage2_config
from ..nets.vae import locate_vae, public_config
from .checkpoint import DiTCheckpoint, inspect_dit
from .experts import check_image_encoder_used, stage1_experts
from .lora import check_lora


@dataclass(frozen=True)
class CheckedCheckpoints:
    """What :func:`check_checkpoints` found. Components not asked for are ``None``.

    ``stage1`` / ``stage2``: the DiTs' :class:`~swift_model.loading.checkpoint.DiTCheckpoint` (config, shapes,
    dtypes; pass one to :func:`~swift_model.loading.checkpoint.load_dit` to load it without inspecting again).
    ``vae1`` / ``vae2``: ``(layout, path)`` as :func:`swift_model.nets.vae.locate_vae` gives.
    ``text_encoder``: ``(layout, model path, tokenizer folder)``; ``image_encoder``: ``(layout, path)``.
    """

    stage1: DiTCheckpoint | None
    stage2: DiTCheckpoint | None
    vae1: tuple[str, str] | None
    vae2: tuple[str, str] | None
    text_encoder: tuple[str, str, str] | None
    image_encoder: tuple[str, str] | None
    stage1_2: DiTCheckpoint | None = None  # a two-expert Stage I's low-noise expert (stage1: its high-noise one)
    boundary_ratio: float | None = None  # its hand-over ratio


def _located(locate, path, stage: str, what: str):
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{what}: path does not exist", file=path, stage=stage)
    if not os.path.isdir(path):
        # a DiT file alone has no VAE or encoders beside it; the pipeline loads those from the folder
        raise CheckpointError(f"{what}: not a folder; the pipeline loads the {what} from the checkpoint folder",
                              file=path, stage=stage)
    try:
        return locate(os.fspath(path))
    except CheckpointError:
        raise
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{what}: {exc}", file=path, stage=stage) from None
    except ValueError as exc:
        raise CheckpointError(f"{what}: {exc}", file=path, stage=stage) from None


def check_checkpoints(stage1=None, stage2=None, *, stage1_lora=None, text_encoder=None,
                      need_text_encoder: bool = True, stage1_lora_2=None) -> CheckedCheckpoints:
    """Check the checkpoint arguments of a generation without reading any weight.

    Args:
        stage1: Stage I folder or file (its DiT, or the two experts of Wan2.2-I2V-A14B with their hand-over ratio:
            :func:`~swift_model.loading.experts.stage1_experts`; its VAE and image encoder when it is a folder).
        stage2: Stage II folder or file (its DiT; its VAE when it is a folder); a two-expert folder is refused.
        stage1_lora: a LoRA file for Stage I (the high-noise expert of two): its keys and shapes are checked
            against that model.
        stage1_lora_2: a LoRA file for a two-expert Stage I's low-noise expert (refused for one expert).
        text_encoder: the UMT5 folder (default: ``stage1``).
        need_text_encoder: False when prompt embeddings replace the text encoder.

    Returns a :class:`CheckedCheckpoints`; raises as loading would, naming stage, file and key.
    """
    experts = stage1_experts(stage1, stage="stage1") if stage1 is not None else None
    s1 = inspect_dit(experts.high, stage="stage1") if experts is not None else None
    s1_2 = inspect_dit(experts.low, stage="stage1") if experts is not None and experts.low is not None else None
    if s1_2 is not None:
        try:
            check_experts(s1.config, s1_2.config)
        except ValueError as exc:
            raise CheckpointError(str(exc), file=experts.low, stage="stage1") from None
    s2 = inspect_dit(stage2, stage="stage2") if stage2 is not None else None
    for where, dit, label in ((stage1, s1, "stage1"), (stage2, s2, "stage2")):
        if dit is not None:  # a CLIP encoder the DiT would not use is refused, not silently left out
            check_image_encoder_used(where, takes_image_tokens=label == "stage1" and dit.config.has_image_input,
                                     stage=label)
    for lora, dit, what in ((stage1_lora, s1, "stage1_lora"), (stage1_lora_2, s1_2, "stage1_lora_2")):
        if lora is None:
            continue
        if dit is None:
            raise ValueError(f"{what} needs stage1" if s1 is None else
                             f"{what} is the LoRA of a two-expert Stage I's low-noise expert, and {stage1} holds "
                             "one DiT: pass its LoRA as stage1_lora")
        params = {n: tuple(p.shape) for n, p in dit.meta_model().named_parameters()}
        check_lora(lora, params, stage="stage1")
    vae1 = _located(locate_vae, stage1, "stage1", "VAE") if stage1 is not None else None
    vae2 = _located(locate_vae, stage2, "stage2", "VAE") if stage2 is not None else None
    text = None
    source = text_encoder if text_encoder is not None else stage1
    if need_text_encoder and source is not None:
        text = _located(locate_text_encoder, source, "text encoder" if text_encoder is not None else "stage1",
                        "text encoder")
    image = None
    if s1 is not None and s1.config.has_image_input:
        image = _located(locate_image_encoder, stage1, "stage1", "image encoder")
    return CheckedCheckpoints(s1, s2, vae1, vae2, text, image, s1_2,
                              experts.boundary_ratio if experts is not None else None)


def checkpoint_spec(stage1, stage2, *, stage2_kind: str = "refine", text_encoder=None,
                    load_text_encoder: bool = True) -> ModelSpec:
    """The :class:`~swift_model.nets.spec.ModelSpec` of checkpoint folders, from their configs and headers only (no
    weight is read). The components are found as ``generate`` finds them (:func:`check_checkpoints`: the same
    errors, naming stage and file)."""
    found = check_checkpoints(stage1, stage2, text_encoder=text_encoder, need_text_encoder=load_text_encoder)
    c1 = found.stage1.config
    c2 = stage2_config(found.stage2.config, stage2_kind)

    def fields(where):
        # a diffusers/transformers folder's config.json without its "_" bookkeeping fields, or None
        cfg_file = os.path.join(where, "config.json")
        if not os.path.isfile(cfg_file):
            return None
        return {k: v for k, v in read_json(cfg_file).items() if not k.startswith("_")}

    def vae(located, z_dim):
        layout, where = located
        return fields(where) if layout == "diffusers" else public_config(z_dim)

    def hf_config(located, defaults):
        layout, model_path = located[:2]
        cfg = fields(model_path) if layout != "original" else None
        return dict(defaults) if cfg is None else cfg

    text = hf_config(found.text_encoder, UMT5_XXL) if found.text_encoder is not None else None
    image = hf_config(found.image_encoder, CLIP_VIT_H) if found.image_encoder is not None else None
    return ModelSpec(c1, c2, vae(found.vae1, c1.out_channels), vae(found.vae2, c2.out_channels), text, image,
                     stage2_kind, stage1_2=None if found.stage1_2 is None else found.stage1_2.config,
                     boundary_ratio=found.boundary_ratio)
