"""``swift-i2v prepare``: videos and captions -> Stage II training data (see :mod:`swift_model.training.dataset`).

For each video (resized and centre-cropped to the output size, cut to its first ``frames = 4k + 1`` frames):
the Stage II latents ``z`` of the full-size clip, the stage-transition reference ``z_ref``
(:mod:`swift_model.training.transition`) and the caption's prompt embeddings (the text encoder, or one
``--prompt-embeds`` file for every clip). One shard per clip; a video already done is not redone; a video that
cannot be read or is too short is skipped with its reason in the manifest and one warning. Under ``torchrun``
the videos are split over the ranks (video ``i`` on rank ``i % world``) and rank 0 writes the manifest.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .dataset import CLIPS, MANIFEST, atomic_write_json, clip_metadata, manifest, save_clip
from .transition import remaining_steps, stage_transition_reference

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
LATENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PrepareSettings:
    """What a prepared clip depends on (stored in the manifest and in every shard; a rerun with other settings
    into the same folder is refused)."""

    frames: int = 81
    width: int = 2560
    height: int = 1408
    transition_sigma: float = 0.5
    transition_steps: int = 0  # 0: the steps a 4-step schedule has left at transition_sigma
    shift: float = 5.0
    seed: int = 0
    latent_dtype: str = "float32"
    stage1: str = "tiny"  # where Stage I (DiT, VAE, encoders) came from
    stage1_lora: str | None = None
    stage2_vae: str = "tiny"  # where the Stage II VAE came from
    text: str = "captions"  # "captions" (the text encoder) or the prompt-embeddings file used for every clip

    def check(self) -> None:
        """``ValueError``/``TypeError`` naming the setting that cannot work."""
        for name in ("frames", "width", "height", "transition_steps", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"--{name.replace('_', '-')} must be an int, got {v!r}")
        if self.frames < 5 or (self.frames - 1) % 4:
            raise ValueError(f"--frames must be 4k+1 and at least 5 (e.g. 81), got {self.frames}")
        if not 0.0 < self.transition_sigma <= 1.0:
            raise ValueError(f"--transition-sigma must be in (0, 1], got {self.transition_sigma}")
        if self.transition_steps < 0:
            raise ValueError(f"--transition-steps must be >= 0, got {self.transition_steps}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"--latent-dtype must be one of {sorted(LATENT_DTYPES)}, got {self.latent_dtype!r}")
        if self.width % 4 or self.height % 4:
            raise ValueError(f"--width and --height must be multiples of 4 (Stage I runs at a quarter per side), "
                             f"got {self.width}x{self.height}")

    @property
    def steps(self) -> int:
        """Stage I steps from the transition sigma to 0."""
        return self.transition_steps or remaining_steps(self.transition_sigma, 4, self.shift)


@dataclass
class PrepareModels:
    """Stage I and the VAEs/encoders ``prepare`` runs (:func:`load_prepare_models`)."""

    stage1: object
    vae1: object
    vae2: object
    text_encoder: object | None
    image_encoder: object | None
    stage1_source: str
    vae2_source: str


def load_prepare_models(*, stage1=None, stage2=None, stage1_lora=None, lora_scale: float = 1.0, text_encoder=None,
                        need_text_encoder: bool = True, tiny: bool = False, device=None,
                        need_stage2: bool = True) -> PrepareModels:
    """Load what ``prepare`` needs: the Stage I DiT (with its LoRA merged), the Stage I VAE, image encoder and
    (unless prompt embeddings replace it) text encoder from ``stage1``, and the Stage II VAE from ``stage2``.
    ``tiny``: the tiny random-weight models of ``swift-i2v demo`` instead. ``need_stage2=False``: Stage I only
    (``vae2`` is then ``None``). The checkpoint arguments are checked from configs and headers before any weight
    is read."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if tiny:
        from ..generation.pipeline import SwiftI2VPipeline

        pipe = SwiftI2VPipeline.tiny(seed=0, device=device)
        return PrepareModels(pipe.stage1, pipe.vae1, pipe.vae2, pipe.text_encoder, pipe.image_encoder, "tiny", "tiny")
    if stage1 is None or (stage2 is None and need_stage2):
        if not need_stage2:
            raise ValueError("needs --stage1 (the Stage I checkpoint folder: DiT, VAE and encoders), or --tiny")
        raise ValueError("prepare needs --stage1 (Stage I DiT, its VAE and encoders) and --stage2 (for the Stage II "
                         "VAE) checkpoint folders, or --tiny")
    from ..nets.dit import WanDiT
    from ..nets.encoders import ImageEncoder, TextEncoder
    from ..loading.preflight import check_checkpoints
    from ..nets.vae import WanVAE, locate_vae

    checked = check_checkpoints(stage1, None, stage1_lora=stage1_lora, text_encoder=text_encoder,
                                need_text_encoder=need_text_encoder)
    if need_stage2:
        locate_vae(os.fspath(stage2))  # the Stage II VAE must be there (its DiT is not needed here)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # the inspected checkpoint: its headers are not read a second time
    dit = WanDiT.from_pretrained(checked.stage1, device=device, dtype=dtype, lora=stage1_lora, lora_scale=lora_scale,
                                 stage="stage1")
    vae1 = WanVAE.from_pretrained(os.fspath(stage1), device=device)
    vae2 = WanVAE.from_pretrained(os.fspath(stage2), device=device) if need_stage2 else None
    text = TextEncoder.from_pretrained(os.fspath(text_encoder or stage1), device=device, dtype=dtype) \
        if need_text_encoder else None
    image = ImageEncoder.from_pretrained(os.fspath(stage1), device=device, dtype=dtype) \
        if checked.stage1.config.has_image_input else None
    return PrepareModels(dit, vae1, vae2, text, image, os.path.abspath(stage1),
                         os.path.abspath(stage2) if need_stage2 else "")


# -- inputs ---------------------------------------------------------------------------------------------------


def list_videos(folder) -> list[str]:
    """Video files under ``folder`` (recursively), as sorted paths relative to it (``/``-separated)."""
    root = Path(os.fspath(folder))
    if not root.is_dir():
        raise FileNotFoundError(f"videos folder not found: {root}")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def read_captions(path) -> dict[str, str]:
    """``{video: caption}`` from JSON lines (``{"video": ..., "caption": ...}`` per line) or a CSV file with the
    columns ``video`` and ``caption``. ``video`` is a path relative to the videos folder or a file name."""
    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    out: dict[str, str] = {}
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"video", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"captions file {path}: a CSV needs the columns 'video' and 'caption'")
            for row in reader:
                out[row["video"]] = row["caption"] or ""
        return out
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"captions file {path} line {n}: not JSON ({exc})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("video"), str) or not isinstance(rec.get("caption"), str):
                raise ValueError(f"captions file {path} line {n}: expected {{\"video\": str, \"caption\": str}}")
            out[rec["video"]] = rec["caption"]
    return out


def clip_id(video: str) -> str:
    """A file-name-safe id of a video path (stable across reruns)."""
    stem = video.rsplit(".", 1)[0]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem.replace("/", "__"))
    return f"{safe}-{zlib.crc32(video.encode()):08x}"


def read_frames(path, count: int):
    """The first ``count`` frames of a video as uint8 ``[count, H, W, 3]``; ``ValueError`` when it cannot be read
    or is shorter."""
    import imageio.v2 as imageio
    import numpy as np

    frames = []
    try:
        with imageio.get_reader(os.fspath(path), format="FFMPEG") as reader:
            for frame in reader:
                frames.append(np.asarray(frame))
                if len(frames) == count:
                    break
    except Exception as exc:  # noqa: BLE001 -- whatever the decoder says, the video is unusable
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ValueError(f"cannot read the video: {msg}") from None
    if len(frames) < count:
        raise ValueError(f"too short: {len(frames)} frames, needs {count}")
    if frames[0].ndim != 3 or frames[0].shape[2] < 3:
        raise ValueError(f"unexpected frame shape {frames[0].shape}")
    return np.stack([f[..., :3] for f in frames])


def _to_clip(frames, width: int, height: int) -> torch.Tensor:
    """``[3, F, height, width]`` in ``[-1, 1]``: each frame resized and centre-cropped as generate does images."""
    from PIL import Image

    from ..io.video import image_to_tensor

    return torch.stack([image_to_tensor(Image.fromarray(f), width, height) for f in frames], 1)


# -- the run --------------------------------------------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _warn(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def prepare(videos, out, models: PrepareModels, settings: PrepareSettings, *, captions=None, prompt_embeds=None,
            progress: bool = True) -> dict:
    """Prepare every video of ``videos`` into the data folder ``out`` (see the module docstring).

    Args:
        videos: the folder of videos.
        out: the data folder (created; a folder prepared before with the same settings is completed).
        models: :func:`load_prepare_models`'s result.
        settings: :class:`PrepareSettings` (``stage1``/``stage2_vae``/``text`` are filled in from ``models``
            and the prompt source).
        captions: a captions file (JSON lines or CSV), required unless ``prompt_embeds`` is given.
        prompt_embeds: a safetensors file of prompt embeddings used for every clip (instead of the text encoder).

    Returns the manifest (on every rank; the file is written by rank 0 after all ranks are done).
    """
    import dataclasses

    from ..nets.encoders import load_prompt_embeds

    rank, world = _rank_world()
    settings = dataclasses.replace(settings, stage1=models.stage1_source, stage2_vae=models.vae2_source,
                                   text=os.path.abspath(prompt_embeds) if prompt_embeds is not None else "captions")
    settings.check()
    models.vae2.check_size(settings.frames, settings.height, settings.width)
    models.vae1.check_size(settings.frames, settings.height // 4, settings.width // 4)
    names = list_videos(videos)
    if not names:
        raise ValueError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) in {videos}")
    if captions is None and prompt_embeds is None:
        raise ValueError("prepare needs --captions (and the text encoder) or --prompt-embeds")
    caption_of = read_captions(captions) if captions is not None else {}
    fixed = load_prompt_embeds(os.fspath(prompt_embeds)) if prompt_embeds is not None else None
    if fixed is None and models.text_encoder is None:
        raise ValueError("captions need the text encoder (or pass --prompt-embeds)")
    text_dim = fixed.shape[-1] if fixed is not None else models.text_encoder.dim
    if text_dim != models.stage1.config.text_dim:
        raise ValueError(f"the prompt embeddings are {text_dim}-wide, the Stage I DiT takes {models.stage1.config.text_dim}")
    root = Path(os.fspath(out))
    clips_dir = root / CLIPS
    clips_dir.mkdir(parents=True, exist_ok=True)
    wanted = asdict(settings)
    previous = root / MANIFEST
    if previous.is_file():
        try:
            old = json.loads(previous.read_text()).get("settings")
        except (OSError, ValueError, AttributeError):
            old = None
        if old is not None and old != wanted:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in wanted.items() if old.get(k) != v)
            raise ValueError(f"{root} was prepared with other settings ({diff}); use another --out")

    from tqdm.auto import tqdm

    C2 = models.vae2.z_dim
    mine = [n for i, n in enumerate(names) if i % world == rank]
    done = made = skipped = 0
    for name in tqdm(mine, desc="prepare", unit="clip", disable=not progress or rank != 0, dynamic_ncols=True):
        cid = clip_id(name)
        shard = clips_dir / f"{cid}.safetensors"
        skip_file = clips_dir / f"{cid}.skip.json"
        meta = clip_metadata(shard)
        if meta is not None:
            if meta.get("settings") != wanted:
                raise ValueError(f"{shard} was prepared with other settings; use another --out")
            done += 1
            continue
        caption = caption_of.get(name, caption_of.get(name.rsplit("/", 1)[-1]))
        try:
            if caption is None and fixed is None:
                raise ValueError(f"no caption for it in {captions}")
            frames = read_frames(Path(os.fspath(videos)) / name, settings.frames)
        except ValueError as exc:
            _warn(f"skipped {name}: {exc}")
            atomic_write_json(skip_file, {"video": name, "reason": str(exc)})
            skipped += 1
            continue
        full = _to_clip(frames, settings.width, settings.height)
        low = _to_clip(frames, settings.width // 4, settings.height // 4)
        context = fixed if fixed is not None else models.text_encoder.encode(caption or "")
        clip_fea = models.image_encoder.encode(low[:, 0]) if models.image_encoder is not None else None
        seed = (settings.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)
        z = models.vae2.encode(full[None])[0]  # the clip stays on the CPU; the VAE moves it chunk by chunk
        z_ref = stage_transition_reference(models.stage1, models.vae1, models.vae2, full, low, context,
                                           sigma=settings.transition_sigma, steps=settings.steps,
                                           shift=settings.shift, seed=seed, clip_fea=clip_fea)[0]
        if z.shape[0] != C2 or z.shape != z_ref.shape:
            raise RuntimeError(f"latents {tuple(z.shape)} and reference {tuple(z_ref.shape)} do not match")
        dt = LATENT_DTYPES[settings.latent_dtype]
        save_clip(shard, z.to(dt), z_ref.to(dt), context,
                  {"video": name, "caption": caption or "", "settings": wanted})
        if skip_file.exists():
            skip_file.unlink()
        made += 1

    import torch.distributed as dist

    if world > 1:
        dist.barrier()
    _, T, h, w = models.vae2.latent_shape(settings.frames, settings.height, settings.width)
    result = _collect(root, names, wanted, (C2, T, h, w), text_dim)
    if rank == 0:
        atomic_write_json(root / MANIFEST, result)
    if world > 1:
        dist.barrier()
    result["_this_rank"] = {"made": made, "already_done": done, "skipped": skipped}
    return result


def _collect(root: Path, names, wanted, latent, text_dim) -> dict:
    clips, skipped = [], []
    for name in names:
        cid = clip_id(name)
        shard = root / CLIPS / f"{cid}.safetensors"
        meta = clip_metadata(shard)
        if meta is not None:
            clips.append({"id": cid, "video": name, "caption": meta.get("caption", ""), "file": f"{CLIPS}/{cid}.safetensors"})
            continue
        try:
            reason = json.loads((root / CLIPS / f"{cid}.skip.json").read_text())["reason"]
        except (OSError, ValueError, KeyError):
            reason = "not prepared (its rank did not finish)"
        skipped.append({"video": name, "reason": reason})
    return manifest(wanted, latent, text_dim, clips, skipped)
