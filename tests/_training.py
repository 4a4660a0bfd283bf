"""Helpers of the training tests: a synthetic video set and tiny checkpoint folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription (several times faster)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_video(seed: int, frames: int = 17, size: int = 80) -> np.ndarray:
    """uint8 ``[frames, size, size, 3]``: textured shapes moving over a textured background (per-seed colours,
    textures, sizes and velocities)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    angle = rng.uniform(0, np.pi)
    ramp = (np.cos(angle) * x + np.sin(angle) * y) / size
    period = rng.uniform(6, 14)
    background = c0 + (c1 - c0) * ramp[..., None] + 18 * np.sin(2 * np.pi * (x + 0.5 * y) / period)[..., None]
    shapes = []
    for _ in range(rng.integers(1, 4)):
        shapes.append(dict(pos=rng.uniform(0.2, 0.8, 2) * size, vel=rng.uniform(-2.5, 2.5, 2), r=rng.uniform(7, 16),
                           colour=rng.uniform(0, 255, 3), stripes=rng.uniform(3, 7), square=bool(rng.integers(2))))
    out = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        img = background.copy()
        for s in shapes:
            cx, cy = s["pos"] + f * s["vel"]
            if s["square"]:
                inside = (np.abs(x - cx) < s["r"]) & (np.abs(y - cy) < s["r"])
            else:
                inside = (x - cx) ** 2 + (y - cy) ** 2 < s["r"] ** 2
            tex = 0.65 + 0.35 * np.sign(np.sin(2 * np.pi * (x - cx) / s["stripes"]))
            img[inside] = (s["colour"] * tex[..., None])[inside]
        out[f] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_videos(folder: Path, seeds, frames: int = 17, size: int = 80) -> list[str]:
    """One mp4 per seed in ``folder`` (``clip{seed}.mp4``) and a JSON-lines captions file; returns the names."""
    from swift_model.io.video import write_mp4

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    with open(folder / "captions.jsonl", "w") as f:
        for s in seeds:
            name = f"clip{s:03d}.mp4"
            write_mp4(synthetic_video(s, frames, size), str(folder / name), fps=8)
            f.write(json.dumps({"video": name, "caption": f"shapes moving, clip {s}"}) + "\n")
            names.append(name)
    return names


def fake_prepared_data(folder: Path, clips: int = 4, latent=(48, 5, 4, 4), text_dim: int = 32, seed: int = 0) -> Path:
    """A prepared-data folder with random latents (no VAE run): ``z`` random, ``z_ref`` a perturbed copy with an
    exact frame 0 (as the bridge makes it), prompt embeddings of a few random tokens."""
    import torch

    from swift_model.training.dataset import CLIPS, MANIFEST, atomic_write_json, manifest, save_clip

    folder = Path(folder)
    (folder / CLIPS).mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    entries = []
    for i in range(clips):
        z = torch.randn(latent, generator=g)
        z_ref = z + 0.3 * torch.randn(latent, generator=g)
        z_ref[:, 0] = z[:, 0]
        emb = torch.randn(5 + i, text_dim, generator=g)
        cid = f"clip{i}"
        save_clip(folder / CLIPS / f"{cid}.safetensors", z, z_ref, emb, {"video": f"{cid}.mp4", "caption": ""})
        entries.append({"id": cid, "video": f"{cid}.mp4", "caption": "", "file": f"{CLIPS}/{cid}.safetensors"})
    atomic_write_json(folder / MANIFEST, manifest({"fake": True, "seed": seed}, latent, text_dim, entries, []))
    return folder


def tiny_checkpoints(root: Path) -> tuple[Path, Path, Path]:
    """``(stage1, stage2, prompt_embeds)``: the demo's tiny models written as checkpoint folders (Stage I: DiT,
    VAE, CLIP image encoder; Stage II: the public-style 48/48 DiT and its VAE) and a prompt-embeddings file (the
    tiny byte tokenizer cannot be saved as a tokenizer folder, so the commands run on prompt embeddings)."""
    import torch

    from swift_model.loading.checkpoint import save_dit
    from swift_model.nets.encoders import save_prompt_embeds
    from swift_model.generation.pipeline import SwiftI2VPipeline

    pipe = SwiftI2VPipeline.tiny(seed=0, stage2_kind="refine", device="cpu")
    s1, s2 = root / "stage1", root / "stage2"
    save_dit(pipe.stage1, s1)
    pipe.vae1.model.save_pretrained(str(s1 / "vae"))
    pipe.image_encoder.model.save_pretrained(str(s1 / "image_encoder"))
    save_dit(pipe.stage2, s2)
    pipe.vae2.model.save_pretrained(str(s2 / "vae"))
    emb = root / "prompt.safetensors"
    save_prompt_embeds(str(emb), pipe.text_encoder.encode("textured shapes moving over a background"))
    return s1, s2, emb
