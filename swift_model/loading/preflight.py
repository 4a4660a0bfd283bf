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

from .checkpoint import DiTCheckpoint, inspect_dit
from ..nets.encoders import locate_image_encoder, locate_text_encoder
from ..io.files import CheckpointError, CheckpointNotFoundError
from .lora import check_lora
from ..nets.vae import locate_vae


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
                      need_text_encoder: bool = True) -> CheckedCheckpoints:
    """Check the checkpoint arguments of a generation without reading any weight.

    Args:
        stage1: Stage I folder or file (its DiT; its VAE and image encoder when it is a folder).
        stage2: Stage II folder or file (its DiT; its VAE when it is a folder).
        stage1_lora: a LoRA file for Stage I: its keys and shapes are checked against the Stage I model.
        text_encoder: the UMT5 folder (default: ``stage1``).
        need_text_encoder: False when prompt embeddings replace the text encoder.

    Returns a :class:`CheckedCheckpoints`; raises as loading would, naming stage, file and key.
    """
    s1 = inspect_dit(stage1, stage="stage1") if stage1 is not None else None
    s2 = inspect_dit(stage2, stage="stage2") if stage2 is not None else None
    if stage1_lora is not None:
        if s1 is None:
            raise ValueError("stage1_lora needs stage1")
        params = {n: tuple(p.shape) for n, p in s1.meta_model().named_parameters()}
        check_lora(stage1_lora, params, stage="stage1")
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
    return CheckedCheckpoints(s1, s2, vae1, vae2, text, image)
