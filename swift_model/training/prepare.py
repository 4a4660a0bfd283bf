"""``swift-i2v prepare``: videos and captions -> Stage II training data (see :mod:`swift_model.training.dataset`).

For each video (resampled to ``fps``, by default the 16 fps the pipeline generates at; resized to cover the
output size and centre-cropped; its first ``frames = 4k + 1`` frames at that rate; a rotation tag is applied):
the Stage II latents ``z`` of the full-size clip, the stage-transition reference ``z_ref``
(:mod:`swift_model.training.transition`) and the caption's prompt embeddings (the text encoder, or one
``--prompt-embeds`` file for every clip). One shard per clip; a video already done is not redone; a video that
cannot be read, is too short, runs at a lower frame rate than ``fps`` or is smaller than the output (it would be
upscaled; ``allow_upscale`` keeps it) is skipped with its reason in the manifest and one warning. Under ``torchrun``
the videos are split over the ranks (video ``i`` on rank ``i % world``); each rank leaves a completion marker
when its clips are done, and rank 0 writes the manifest once all markers are there. No rank waits in a collective
with a fixed timeout while another works (ranks' work is uneven: skipped videos, clips done by an earlier run).
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
MARKERS = ".ranks"  # the data folder's subfolder of the ranks' completion markers (torchrun)


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
    fps: int = 16  # the clips' frame rate: sources are resampled to it (0: every source frame, as it comes)
    allow_upscale: bool = False  # keep sources smaller than the output (upscaled) instead of skipping them
    stage1: str = "tiny"  # where Stage I (DiT, VAE, encoders) came from
    stage1_lora: str | None = None
    stage2_vae: str = "tiny"  # where the Stage II VAE came from
    text: str = "captions"  # "captions" (the text encoder) or the prompt-embeddings file used for every clip

    def check(self) -> None:
        """``ValueError``/``TypeError`` naming the setting that cannot work."""
        for name in ("frames", "width", "height", "transition_steps", "seed", "fps"):
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
        if self.fps < 0:
            raise ValueError(f"--fps must be >= 0 (0: every source frame), got {self.fps}")
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
    if checked.stage1_2 is not None:  # never half-loaded: the references would come from the high-noise expert alone
        raise ValueError(f"{stage1} is a two-expert Stage I (Wan2.2-I2V-A14B); prepare's Stage I references run one "
                         "DiT and do not take two experts yet: use a one-DiT Stage I (e.g. Wan2.1-I2V-14B)")
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


def read_frames(path, count: int, fps: int = 0, *, min_size: tuple[int, int] | None = None):
    """The first ``count`` frames of a video at ``fps`` (0: every source frame) as uint8 ``[count, H, W, 3]``
    (:func:`~swift_model.io.video.read_video_frames`). ``min_size=(width, height)``: a video smaller than that
    (which would be upscaled to cover it) is refused too. ``ValueError`` with the reason."""
    from ..io.video import read_video_frames

    frames, _ = read_video_frames(path, count, fps or None)
    if min_size is not None:
        width, height = min_size
        h, w = frames.shape[1:3]
        if w < width or h < height:
            raise ValueError(f"{w}x{h} is smaller than the output {width}x{height} (it would be upscaled; "
                             "--allow-upscale keeps such videos)")
    return frames


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
    token = _run_token(rank, world)
    if world > 1 and rank == 0:  # earlier runs' markers (every rank of those runs has finished)
        (root / MARKERS).mkdir(exist_ok=True)
        for old_marker in (root / MARKERS).iterdir():
            if not old_marker.name.startswith(token):
                old_marker.unlink(missing_ok=True)
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
            frames = read_frames(Path(os.fspath(videos)) / name, settings.frames, settings.fps,
                                 min_size=None if settings.allow_upscale else (settings.width, settings.height))
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

    mine_done = {"made": made, "already_done": done, "skipped": skipped}
    _, T, h, w = models.vae2.latent_shape(settings.frames, settings.height, settings.width)
    result = _finish(root, token, rank, world, mine_done,
                     lambda: _collect(root, names, wanted, (C2, T, h, w), text_dim))
    result["_this_rank"] = mine_done
    return result


def _finish(root: Path, token: str, rank: int, world: int, mine_done: dict, collect) -> dict:
    """The end of a run on every rank: rank 0 waits for every rank's completion marker, then writes the manifest
    (``collect()``) and a marker saying so; the other ranks wait for that marker and read the manifest."""
    if world > 1:
        markers = root / MARKERS
        markers.mkdir(exist_ok=True)
        atomic_write_json(markers / f"{token}-rank{rank}.json", mine_done)
        if rank == 0:
            _wait_for([markers / f"{token}-rank{r}.json" for r in range(1, world)], "the other ranks' clips")
    if rank != 0:
        _wait_for([root / MARKERS / f"{token}-manifest.json"], "rank 0's manifest")
        return json.loads((root / MANIFEST).read_text())
    result = collect()
    atomic_write_json(root / MANIFEST, result)
    if world > 1:
        atomic_write_json(root / MARKERS / f"{token}-manifest.json", {})
        for r in range(world):  # every rank has finished its clips: the markers have served
            (root / MARKERS / f"{token}-rank{r}.json").unlink(missing_ok=True)
    return result


def _run_token(rank: int, world: int) -> str:
    """A name for this run's completion markers, the same on every rank (one collective, at the start, before
    the ranks' work differs), so a marker left by an earlier, interrupted run is never taken for this one's."""
    if world == 1:
        return "single"
    import secrets

    import torch.distributed as dist

    box = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _wait_for(paths: list[Path], what: str, poll_s: float = 0.5, report_s: float = 300.0) -> None:
    """Wait until every file of ``paths`` exists: no deadline (the ranks' work is uneven: skipped clips, clips
    done by an earlier run), unlike a collective's fixed timeout; a rank that dies ends the job through torchrun.
    A line every ``report_s`` seconds says what is awaited."""
    import time

    start = last = time.monotonic()
    while True:
        missing = [p for p in paths if not p.exists()]
        if not missing:
            return
        now = time.monotonic()
        if now - last >= report_s:
            _warn(f"still waiting for {what} after {now - start:.0f} s ({len(missing)} to come)")
            last = now
        time.sleep(poll_s)


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
