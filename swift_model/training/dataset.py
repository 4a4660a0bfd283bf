"""The prepared Stage II training data: one safetensors shard per clip and a manifest (``swift-i2v prepare``
writes it, ``swift-i2v train`` reads it).

A data folder holds::

    manifest.json            settings, latent shape, text width, the clips and the skipped videos
    clips/<id>.safetensors   z [C, T, h, w], z_ref [C, T, h, w], prompt_embeds [L, text_dim]
    clips/<id>.skip.json     why a video was skipped (read back into the manifest)

``z`` is the Stage II VAE's (normalised) latents of the full-size clip, ``z_ref`` the stage-transition
reference of the same clip (see :mod:`swift_model.training.transition`), ``prompt_embeds`` the caption's text
embeddings without their zero padding (:func:`load_clip` pads them back to the DiT's text length). Every
file is written to a temporary name and renamed when complete, so a crash never leaves a half-written shard
that a rerun would take for a finished one.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

MANIFEST = "manifest.json"
CLIPS = "clips"
FORMAT = "swift-i2v-stage2-data"
VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, renamed when complete."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: Path, obj) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_folder_json(folder, name: str, *, kind: str, hint: str) -> tuple[dict, Path]:
    """``(object, path)`` of the JSON file ``name`` in ``folder``: ``FileNotFoundError`` naming the ``kind`` of
    folder when it is missing and ``hint`` when the file is, ``ValueError`` when it is no JSON object."""
    folder = Path(os.fspath(folder))
    if not folder.is_dir():
        raise FileNotFoundError(f"{kind} not found: {folder}")
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"no {name} in {folder}: {hint}")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a JSON object")
    return obj, path


def save_clip(path: Path, z: torch.Tensor, z_ref: torch.Tensor, prompt_embeds: torch.Tensor, metadata: dict) -> None:
    """Write one clip's shard atomically. ``prompt_embeds`` ``[L, D]`` or ``[1, L, D]``: trailing all-zero rows
    (the text encoder's padding) are dropped; ``metadata`` values are stored as JSON strings."""
    from safetensors.torch import save

    emb = prompt_embeds.detach().float().cpu()
    if emb.dim() == 3:
        emb = emb[0]
    nonzero = torch.nonzero(emb.abs().amax(dim=1) > 0).flatten()
    emb = emb[: int(nonzero[-1]) + 1 if nonzero.numel() else 1]
    tensors = {"z": z.detach().cpu().contiguous(), "z_ref": z_ref.detach().cpu().contiguous(),
               "prompt_embeds": emb.contiguous()}
    atomic_write_bytes(path, save(tensors, metadata={k: json.dumps(v) for k, v in metadata.items()}))


def clip_metadata(path: Path) -> dict | None:
    """The metadata of a shard (header only), or ``None`` when the file is missing or not a readable shard."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
    except Exception:  # noqa: BLE001 -- any unreadable file counts as not done
        return None
    if not {"z", "z_ref", "prompt_embeds"} <= keys:
        return None
    try:
        return {k: json.loads(v) for k, v in meta.items()}
    except ValueError:
        return None


def manifest(settings: dict, latent_shape, text_dim: int, clips: list[dict], skipped: list[dict]) -> dict:
    """The manifest of a data folder: ``clips`` as ``{"id", "video", "caption", "file"}`` (``file`` relative to the
    folder), ``skipped`` as ``{"video", "reason"}``, ``latent_shape`` ``(C, T, h, w)``."""
    import datetime

    C, T, h, w = (int(v) for v in latent_shape)
    return {
        "format": FORMAT, "version": VERSION, "settings": settings,
        "latent": {"channels": C, "frames": T, "height": h, "width": w}, "text_dim": int(text_dim),
        "clips": clips, "skipped": skipped,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class ClipEntry:
    """One prepared clip of the manifest."""

    id: str
    video: str
    caption: str
    file: str


class PreparedData:
    """A prepared data folder, opened for training.

    Raises ``FileNotFoundError`` when the folder or its manifest is missing, ``ValueError`` when the manifest
    is not one, lists no clip, or names a shard that is gone.
    """

    def __init__(self, root, manifest: dict) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.clips = [ClipEntry(c["id"], c["video"], c.get("caption", ""), c["file"]) for c in manifest["clips"]]
        lat = manifest["latent"]
        self.latent_shape = (int(lat["channels"]), int(lat["frames"]), int(lat["height"]), int(lat["width"]))
        self.text_dim = int(manifest["text_dim"])
        self.settings = manifest["settings"]

    @classmethod
    def open(cls, root) -> "PreparedData":
        """Open ``root`` (a folder written by ``swift-i2v prepare``)."""
        manifest, path = read_folder_json(root, MANIFEST, kind="data folder", hint="run swift-i2v prepare first")
        root = path.parent
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a swift-i2v prepared-data manifest")
        if manifest.get("version") != VERSION:
            raise ValueError(f"{path} has format version {manifest.get('version')!r}, this swift-i2v reads {VERSION}")
        clips = manifest.get("clips")
        if not isinstance(clips, list) or not clips:
            skipped = manifest.get("skipped") or []
            why = f" ({len(skipped)} skipped: {skipped[0]['video']}: {skipped[0]['reason']}...)" if skipped else ""
            raise ValueError(f"the manifest {path} lists no clips{why}")
        for key in ("latent", "text_dim", "settings"):
            if key not in manifest:
                raise ValueError(f"{path} has no {key!r}")
        data = cls(root, manifest)
        for c in data.clips:
            if not (root / c.file).is_file():
                raise ValueError(f"{path} lists {c.file}, which does not exist")
        return data

    def __len__(self) -> int:
        return len(self.clips)

    def load_clip(self, index: int, text_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, z_ref, prompt_embeds)`` of clip ``index``: float32 ``[C, T, h, w]`` twice and ``[text_len, D]``
        (zero-padded or truncated to ``text_len`` when given)."""
        from safetensors.torch import load_file

        entry = self.clips[index]
        path = self.root / entry.file
        try:
            t = load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot read the clip shard {path}: {exc}") from None
        z, z_ref, emb = t["z"].float(), t["z_ref"].float(), t["prompt_embeds"].float()
        if tuple(z.shape) != self.latent_shape or tuple(z_ref.shape) != self.latent_shape:
            raise ValueError(f"{path}: latents of shape {tuple(z.shape)}, the manifest says {self.latent_shape}")
        if text_len is not None:
            emb = emb[:text_len]
            if emb.shape[0] < text_len:
                emb = torch.cat([emb, emb.new_zeros(text_len - emb.shape[0], emb.shape[1])])
        return z, z_ref, emb
