"""Which DiTs a checkpoint folder holds (loading layer): one, or the two experts of Wan2.2-I2V-A14B, and the
components a diffusers pipeline folder names. Reads configs only, never a weight.

Wan2.2-I2V-A14B has two transformers of one architecture: a high-noise expert for the first steps and a
low-noise expert for the rest, handed over at ``t = boundary_ratio * 1000`` (as diffusers'
``WanImageToVideoPipeline`` runs them). Its layouts:

- **diffusers**: ``transformer/`` (high noise), ``transformer_2/`` (low noise) and ``model_index.json`` with
  ``"boundary_ratio"`` (0.9 in the public release). Two experts without a ratio are refused naming the file:
  the hand-over step is never guessed.
- **original**: ``high_noise_model/`` and ``low_noise_model/`` (each an original-Wan DiT folder), the Wan2.1 VAE
  and UMT5 files beside them. The release ships no ratio in its files: it is in the release's own per-task
  config (``boundary = 0.900`` for the I2V task), read here from :data:`ORIGINAL_BOUNDARY` by the experts'
  ``model_type``; another ``model_type`` is refused.

A folder is never half-loaded: a pipeline folder whose ``model_index.json`` names a component no part of the
pipeline uses (:data:`PIPELINE_COMPONENTS`), a ``transformer_2/`` without a ``model_index.json``, or a
two-expert folder given where one DiT is loaded (Stage II, :func:`~swift_model.loading.checkpoint.load_dit`)
is refused with a :class:`~swift_model.io.files.CheckpointError` naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..io.files import CheckpointError, CheckpointNotFoundError, read_json
from ..nets.spec import check_boundary_ratio

__all__ = ["ORIGINAL_BOUNDARY", "PIPELINE_COMPONENTS", "Stage1Experts", "check_image_encoder_used", "check_one_dit",
           "read_model_index", "stage1_experts"]

MODEL_INDEX = "model_index.json"
HIGH, LOW = "high_noise_model", "low_noise_model"

# The components of a diffusers Wan pipeline folder, and what the pipeline does with each. The scheduler is the
# sampling rule: ours (flow matching, the request's steps and shift) takes its place, as every Wan scheduler
# samples the same flow; the encoders and VAE are loaded from the Stage I folder (a Stage II folder's text
# encoder is the same UMT5-XXL: the prompt is encoded once for both stages).
PIPELINE_COMPONENTS = {
    "transformer": "the DiT (a two-expert model's high-noise expert)",
    "transformer_2": "a two-expert model's low-noise expert (Stage I only)",
    "vae": "the stage's VAE",
    "text_encoder": "the UMT5 text encoder",
    "tokenizer": "the UMT5 tokenizer",
    "image_encoder": "the CLIP image encoder (DiTs with image tokens)",
    "image_processor": "the CLIP image encoder's preprocessing",
    "scheduler": "replaced by the pipeline's flow-matching sampler",
}

# The original release's hand-over ratio by the experts' config.json "model_type": the release's own task config
# for I2V-A14B (Wan2.2 repository, wan/configs/wan_i2v_A14B.py: boundary = 0.900).
ORIGINAL_BOUNDARY = {"i2v": 0.9}


@dataclass(frozen=True)
class Stage1Experts:
    """Where a Stage I checkpoint's DiTs are.

    ``high``: the DiT path to load (the only DiT of a one-expert checkpoint; the high-noise expert of two).
    ``low``: the low-noise expert's path, or ``None``. ``boundary_ratio``: the hand-over ratio of two experts
    (``None`` for one). ``source``: the file the ratio was read from (``model_index.json`` or the experts'
    ``config.json``), for messages.
    """

    high: Path
    low: Path | None = None
    boundary_ratio: float | None = None
    source: Path | None = None


def _named(index: dict, name: str) -> bool:
    """Whether ``model_index.json`` names component ``name`` (diffusers writes ``[null, null]`` for an absent
    optional one)."""
    spec = index.get(name)
    return isinstance(spec, (list, tuple)) and any(v is not None for v in spec)


def read_model_index(folder, *, stage: str) -> dict | None:
    """The parsed ``model_index.json`` of a pipeline folder (``None`` when it has none), after checking that it
    names no component outside :data:`PIPELINE_COMPONENTS` (refused: the pipeline would silently leave it
    out) and that ``transformer_2`` comes with ``transformer``."""
    path = Path(os.fspath(folder)) / MODEL_INDEX
    if not path.is_file():
        return None
    index = read_json(path, stage=stage)
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)):
            continue  # bookkeeping and pipeline settings (boundary_ratio, expand_timesteps)
        if _named(index, name) and name not in PIPELINE_COMPONENTS:
            raise CheckpointError(f"names component {name!r} ({'/'.join(map(str, spec))}), which this pipeline "
                                  f"does not use; refusing to load the folder without it (known components: "
                                  f"{', '.join(PIPELINE_COMPONENTS)})", file=path, stage=stage, key=name)
    if _named(index, "transformer_2") and not _named(index, "transformer"):
        raise CheckpointError("names transformer_2 without transformer: a low-noise expert alone cannot run the "
                              "high-noise steps", file=path, stage=stage, key="transformer_2")
    return index


def _diffusers_experts(folder: Path, index: dict, stage: str) -> Stage1Experts:
    path = folder / MODEL_INDEX
    ratio = index.get("boundary_ratio")
    if not _named(index, "transformer_2"):
        if ratio is not None:
            raise CheckpointError(f"boundary_ratio {ratio!r} without a transformer_2: no low-noise expert to hand "
                                  "over to", file=path, stage=stage, key="boundary_ratio")
        if (folder / "transformer_2").is_dir():
            raise CheckpointError("a transformer_2/ folder is present but model_index.json does not name it; "
                                  "refusing to run its transformer/ alone", file=path, stage=stage,
                                  key="transformer_2")
        return Stage1Experts(folder)
    if ratio is None:
        raise CheckpointError("names two experts (transformer, transformer_2) but no boundary_ratio: the step "
                              "at which the low-noise expert takes over is unknown (Wan2.2-I2V-A14B's is 0.9); "
                              "add it, it is never guessed", file=path, stage=stage, key="boundary_ratio")
    try:
        ratio = check_boundary_ratio(ratio)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(str(exc), file=path, stage=stage, key="boundary_ratio") from None
    for sub in ("transformer", "transformer_2"):
        if not (folder / sub).is_dir():
            raise CheckpointNotFoundError(f"model_index.json names {sub} but the folder {sub}/ is missing",
                                          file=path, stage=stage, key=sub)
    return Stage1Experts(folder / "transformer", folder / "transformer_2", ratio, path)


def _original_experts(folder: Path, stage: str) -> Stage1Experts:
    for sub in (HIGH, LOW):
        if not (folder / sub).is_dir():
            raise CheckpointNotFoundError(f"an original two-expert folder needs both {HIGH}/ and {LOW}/; {sub}/ is "
                                          "missing", file=folder / sub, stage=stage)
    cfg_path = folder / HIGH / "config.json"
    model_type = read_json(cfg_path, stage=stage).get("model_type")
    if model_type not in ORIGINAL_BOUNDARY:
        raise CheckpointError(f"model_type {model_type!r}: no published boundary_ratio for this two-expert model "
                              f"(known: {', '.join(f'{k}: {v}' for k, v in ORIGINAL_BOUNDARY.items())}); the hand-"
                              "over step is never guessed", file=cfg_path, stage=stage, key="model_type")
    return Stage1Experts(folder / HIGH, folder / LOW, ORIGINAL_BOUNDARY[model_type], cfg_path)


def stage1_experts(path, *, stage: str = "stage1") -> Stage1Experts:
    """The DiTs of Stage I checkpoint ``path`` (a folder or a single file), from its configs only. Raises
    :class:`~swift_model.io.files.CheckpointError` naming the file for a two-expert folder without a ratio, a
    half-described folder or a component nothing uses (see the module docstring)."""
    p = Path(os.fspath(path))
    if not p.is_dir():
        return Stage1Experts(p)
    index = read_model_index(p, stage=stage)
    if index is not None:
        return _diffusers_experts(p, index, stage)
    if (p / "transformer_2").is_dir():
        raise CheckpointNotFoundError("a transformer_2/ folder (a second expert) but no model_index.json to say "
                                      "when it takes over (its boundary_ratio); refusing to run transformer/ "
                                      "alone", file=p / MODEL_INDEX, stage=stage)
    if (p / HIGH).is_dir() or (p / LOW).is_dir():
        return _original_experts(p, stage)
    return Stage1Experts(p)


def check_one_dit(path, *, stage: str) -> None:
    """Refuse a two-expert folder where one DiT is loaded (Stage II, ``WanDiT.from_pretrained``): loading its
    first expert alone would run a wrong model without a word. Checks a pipeline folder's components too."""
    p = Path(os.fspath(path))
    if not p.is_dir():
        return
    index = read_model_index(p, stage=stage)
    two = (index is not None and _named(index, "transformer_2")) or (p / "transformer_2").is_dir() \
        or (p / HIGH).is_dir() or (p / LOW).is_dir()
    if two:
        raise CheckpointError("holds two experts (a two-expert Wan2.2 A14B model), where one DiT is loaded: use it "
                              "as Stage I (which runs both), or name one expert's folder to load it alone",
                              file=p / MODEL_INDEX if index is not None else p, stage=stage)


def check_image_encoder_used(folder, *, takes_image_tokens: bool, stage: str) -> None:
    """Refuse a pipeline folder whose ``model_index.json`` names a CLIP ``image_encoder`` that its DiT does not
    take (no image tokens): the encoder would be left out without a word."""
    p = Path(os.fspath(folder))
    index = read_model_index(p, stage=stage) if p.is_dir() else None
    if index is not None and _named(index, "image_encoder") and not takes_image_tokens:
        raise CheckpointError("names an image_encoder, but the DiT takes no image tokens (its config has no "
                              "image_dim): refusing to load the folder without it", file=p / MODEL_INDEX,
                              stage=stage, key="image_encoder")
