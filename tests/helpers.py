"""Helpers shared by the test modules: the one place for them (no test module imports another).

Fixtures live in ``conftest.py``. Two more files serve the tests but are kept out of this module because they
run as processes of their own (and importing them here would load what they load into every test module):

* ``spawn.py``: starts test processes. :func:`spawn.launch` runs a module's ``CASES`` on torch.distributed
  ranks forked from a fork server (gloo; the ``spawned`` fixture of ``conftest.py`` calls it); run as a script,
  it is the command line under torchrun with the frames it encodes recorded (:func:`recorded_video_frames`).
* ``aot_sm90.py``: the script that compiles every production Triton kernel ahead of time for sm_90 and reports
  its registers, spills and shared memory (:func:`run_aot` runs it in a subprocess).

Sections: threads and comparisons; the tolerance rule of low-precision kernels; DiT weights and inputs; the
CSG rules written out naively; images and videos; training data and checkpoints; the tiny pipeline on several
ranks; ahead-of-time compiles for sm_90. ``docs/testing.md`` describes the suite and its rules.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# -- threads and comparisons -----------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the body with ``n`` torch threads (restored afterwards). The suite runs on one thread (conftest.py);
    a comparison with another process pins that process's count too (``OMP_NUM_THREADS``)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max absolute error relative to ``want``'s largest magnitude."""
    err = (got.double() - want.double()).abs().max().item()
    return err / max(want.double().abs().max().item(), 1e-300)


def mismatch(got: torch.Tensor, want: torch.Tensor, rtol: float) -> str | None:
    """Why ``got`` is not ``want`` to ``rtol`` of ``want``'s largest magnitude (``rtol=0``: bitwise), or None."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} vs {tuple(want.shape)} {want.dtype}"
    if not torch.isfinite(want).all():
        return "the reference is not finite"
    if rtol == 0:
        return None if torch.equal(got, want) else f"not bitwise equal (max error {(got - want).abs().max().item():.3e})"
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    return None if err <= rtol * scale else f"max error {err:.3e} > {rtol} x scale {scale:.3e}"


def assert_close_to_scale(a: torch.Tensor, b: torch.Tensor, rtol=2e-5):
    """Equal to fp32 rounding: max error relative to the output's scale."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.isfinite(a).all()
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    assert err <= rtol * scale + 1e-6, f"max error {err:.3e} vs scale {scale:.3e}"


def assert_frames_match(got, want, what: str = "frames") -> None:
    """uint8 frames equal up to fp32 rounding of the values they were quantised from: at most 1 level anywhere,
    in a few values (mean difference < 1e-3 level). Compare frames before a lossy codec: H.264 turns a 1-level
    difference into several levels after decoding."""
    got, want = (torch.as_tensor(np.asarray(f)) for f in (got, want))
    assert got.shape == want.shape and got.dtype == want.dtype == torch.uint8, (got.shape, want.shape)
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3, (
        f"{what} differ by up to {diff.max().item()} (mean {diff.float().mean().item():.2e})")


# -- the tolerance rule of low-precision kernels (docs/testing.md) ----------------------------------------------
# A low-precision kernel passes when its max error against an fp32 (or fp64) reference is at most twice the error
# of the same computation done by PyTorch in that precision, plus a rounding floor of one unit in the last place
# of the largest reference value. For attention, PyTorch's own computation is SDPA in the input dtype (flash,
# cuDNN or memory-efficient on a GPU: fp32 accumulation, like our kernels), run through ``backend="sdpa"``,
# which also gives rows with no allowed key zeros instead of NaN.


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def floor(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """One ulp of the largest value of ``truth`` in ``dtype`` (``finfo(dtype).eps * max|truth|``): the rounding
    of the result itself."""
    return torch.finfo(dtype).eps * truth.abs().max().item()


def bound(truth: torch.Tensor, lowp_baseline: torch.Tensor, dtype: torch.dtype) -> float:
    """The rule (docs/testing.md): 2x PyTorch's own low-precision error plus the rounding floor."""
    return 2 * max_err(lowp_baseline, truth) + floor(truth, dtype)


def check_rule(name: str, got: torch.Tensor, truth: torch.Tensor, lowp_baseline: torch.Tensor, dtype) -> None:
    err, tol = max_err(got, truth), bound(truth, lowp_baseline, dtype)
    assert math.isfinite(err), f"{name}: non-finite values"
    assert err <= tol, f"{name}: error {err:.3e} > bound {tol:.3e} (2 x PyTorch's {max_err(lowp_baseline, truth):.3e} + floor)"


def sdpa_baseline(q, k, v, dout, plan, scale):
    """PyTorch's SDPA in the inputs' dtype on the plan's mask: ``(out, dq, dk, dv)`` (``dout=None``: out only)."""
    from swift_kernels import frame_block_attention

    leaves = [t.detach().clone().requires_grad_(dout is not None) for t in (q, k, v)]
    out = frame_block_attention(*leaves, plan, softmax_scale=scale, backend="sdpa")
    if dout is None:
        return (out.detach(),)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout))


# -- DiT weights and inputs ------------------------------------------------------------------------------------


def random_init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fresh random weights everywhere (no zero biases, non-trivial norm weights): N(0, 1/fan_in); returns
    ``module``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = p[0].numel() ** -0.5 if p.dim() >= 2 else 0.5
            base = 1.0 if p.dim() == 1 and "norm" in name else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return module


def random_dit(preset: str, seed: int = 0, **over):
    """A ``WanDiT`` of a preset (``over``: config fields) with :func:`random_init` weights, in eval mode."""
    from swift_model import WanDiT, WanDiTConfig

    return random_init(WanDiT(WanDiTConfig.preset(preset, **over)).eval(), seed)


def diffusers_model(cfg, seed: int = 0):
    """diffusers' ``WanTransformer3DModel`` of ``cfg`` (a ``WanDiTConfig``) with :func:`random_init` weights."""
    import diffusers

    d = cfg.to_diffusers()
    d.pop("_class_name")
    return random_init(diffusers.WanTransformer3DModel(**d).eval(), seed)


def dit_inputs(cfg, B=2, Fr=3, H=4, W=6, seed=1, per_token=None):
    """``(latents, timesteps, context, clip_fea)`` of a DiT call on random data (``clip_fea`` ``None`` without
    image tokens); per-token timesteps for Wan2.2 TI2V-style configs, 0 on the image frame."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, Fr, H, W, generator=g)
    L = Fr * H * W // 4
    per_token = cfg.per_token_timestep if per_token is None else per_token
    if per_token:
        # Wan2.2 TI2V: the image frame is clean (t = 0), the others carry the step's timestep
        t = (torch.rand(B, 1, generator=g) * 1000).expand(B, L).clone()
        t[:, : H * W // 4] = 0
    else:
        t = torch.rand(B, generator=g) * 1000
    ctx = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    clip = torch.randn(B, cfg.image_len, cfg.image_dim, generator=g) if cfg.image_dim else None
    return x, t, ctx, clip


def layout_dit_inputs(cfg, layout, frames: int, height: int, width: int, generator, batch: int = 2,
                      text_len: int = 9, per_token: bool = False):
    """``(latents, timestep, context, clip_fea)`` of a DiT call on a CSG ``layout`` (``None``: dense over
    ``frames`` latent frames), drawn from ``generator`` in that order. Wan2.2 TI2V-style configs get timesteps per
    frame, ``[B, F]`` (``per_token``: expanded to ``[B, L]``): the clean conditioning blocks at t = 0, the noisy
    ones at the step's t."""
    F_ = frames if layout is None else layout.num_seq_blocks
    x = torch.randn(batch, cfg.in_channels, F_, height, width, generator=generator)
    if cfg.per_token_timestep:
        t = torch.zeros(batch, F_)
        noisy = layout.noisy_blocks if layout is not None else torch.arange(1, F_)
        t[:, noisy] = torch.rand(batch, 1, generator=generator) * 1000
        if per_token:
            t = t[:, :, None].expand(batch, F_, (height // 2) * (width // 2)).reshape(batch, -1)
    else:
        t = torch.rand(batch, generator=generator) * 1000
    ctx = torch.randn(batch, text_len, cfg.text_dim, generator=generator)
    clip = torch.randn(batch, cfg.image_len, cfg.image_dim, generator=generator) if cfg.image_dim else None
    return x, t, ctx, clip


# -- the CSG rules, written out element by element (deliberately naive: loops and membership tests) ------------


def naive_segments(T, A, M):
    """``[(start, end)]`` of the segments of M blocks after A anchors in a clip of T blocks."""
    segs = []
    start = A
    while start < T:
        segs.append((start, min(start + M, T)))
        start += M
    return segs


def naive_window(T, A, M, NL, NR, s):
    """Clip blocks of segment s's window (anchors excluded), in clip order."""
    start, end = naive_segments(T, A, M)[s]
    return [b for b in range(T) if b >= A and start - NL <= b < end + NR]


def naive_role(T, A, M, s, b):
    """The role of clip block ``b`` in segment ``s``'s window: left neighbour, own block or right neighbour."""
    from swift_kernels.attention.layout import ROLE_LEFT, ROLE_OWN, ROLE_RIGHT

    start, end = naive_segments(T, A, M)[s]
    if b < start:
        return ROLE_LEFT
    if b < end:
        return ROLE_OWN
    return ROLE_RIGHT


# -- images and videos -----------------------------------------------------------------------------------------


def random_image(seed: int = 0, height: int = 48, width: int = 80):
    """A PIL RGB image of uniform random pixels."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_png(path, width: int = 40, height: int = 30, seed: int = 0) -> str:
    """:func:`random_image` saved as a PNG at ``path``; returns the path as a string."""
    random_image(seed, height, width).save(path)
    return str(path)


@contextlib.contextmanager
def recorded_video_frames():
    """Record what every ``write_mp4`` call of the package hands to the video encoder, before the lossy codec:
    yields a list that gets one uint8 ``[F, H, W, 3]`` array per video written. The videos are still written.

    Patches ``swift_model.io.video.write_mp4`` and every loaded module's reference to it (``from ... import
    write_mp4``); modules imported inside the block import the recording one."""
    import swift_model.io.video as video

    real = video.write_mp4
    videos: list[np.ndarray] = []

    def write_mp4(frames, path, *args, **kwargs):
        chunks = [c.cpu().numpy() if isinstance(c, torch.Tensor) else np.asarray(c) for c in frames]
        videos.append(np.concatenate([c if c.ndim == 4 else c[None] for c in chunks]))
        return real(chunks, path, *args, **kwargs)

    def swap(old, new):
        for module in list(sys.modules.values()):
            if module is not None and vars(module).get("write_mp4") is old:
                setattr(module, "write_mp4", new)

    swap(real, write_mp4)
    try:
        yield videos
    finally:
        swap(write_mp4, real)


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
            write_mp4(synthetic_video(s, frames, size), str(folder / name), fps=16)  # prepare's default rate
            f.write(json.dumps({"video": name, "caption": f"shapes moving, clip {s}"}) + "\n")
            names.append(name)
    return names


# -- training data and checkpoints -----------------------------------------------------------------------------


def fake_prepared_data(folder: Path, clips: int = 4, latent=(48, 5, 4, 4), text_dim: int = 32, seed: int = 0) -> Path:
    """A prepared-data folder with random latents (no VAE run): ``z`` random, ``z_ref`` a perturbed copy with an
    exact frame 0 (as the bridge makes it), prompt embeddings of a few random tokens."""
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
    from swift_model.generation.pipeline import SwiftI2VPipeline
    from swift_model.loading.checkpoint import save_dit
    from swift_model.nets.encoders import save_prompt_embeds

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


# -- training memory (the gate of the real-size GPU training tests) --------------------------------------------

# the 5B Stage II step of test_training_gpu.py: 81 frames at 2560x1408 (21 latent frames of 88 x 160), every
# window of M=2, N=(1,0) packed with its anchor copy
STEP_5B_LATENTS = (48, 21, 88, 160)


def step_5b_estimate(states_per_weight: int) -> int:
    """Estimated device bytes of one bf16 training step of the 5B Stage II on :data:`STEP_5B_LATENTS`: the bf16
    network (the parameters Wan keeps fp32 at 4 bytes) times ``states_per_weight`` (4: weights, gradients and
    two AdamW moments on the device; 1: the offloaded optimiser) plus the activations counted on fake tensors
    (a few seconds)."""
    from swift_model import WanDiTConfig
    from swift_model.planning.training_step import training_activation_bytes
    from swift_model.training.config import TrainConfig
    from swift_model.training.memory import ParameterCounts, largest_windows

    cfg = WanDiTConfig.preset("wan2.2-ti2v-5b").widened_input(STEP_5B_LATENTS[0])
    layout = largest_windows(STEP_5B_LATENTS, TrainConfig(tiny=True))
    acts = training_activation_bytes(cfg, layout, STEP_5B_LATENTS[2:], dtype=torch.bfloat16)
    return states_per_weight * ParameterCounts.of(cfg).compute_bytes(torch.bfloat16) + acts


# -- the tiny pipeline on several ranks (cases of test_parallel.py's spawned ranks) -----------------------------
# Every rank computes the one-process reference itself (the same pipeline with the default, single-process
# Parallelism), then the same generation split over the ranks, and compares.

# a clip whose every DiT call has at least 4 tokens (Stage I: 3 latent frames of 2 tokens; Stage II: windows
# of 2 or 3 latent frames of 8 tokens), so 4 Ulysses ranks each get some
PIPELINE_SIZE = dict(frames=9, width=128, height=64, segment_blocks=1, neighbors=(1, 1), progress=False)
PIPELINE_RTOL = 1e-5
_TINY_PIPES = {}


@contextlib.contextmanager
def torchrun_env(rank: int, world: int):
    """The environment torchrun gives rank ``rank`` of ``world`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) for the
    block, then the previous one back."""
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rank_pipe(fsdp: bool = False):
    """The tiny pipeline of this rank (built once per process: the first build imports diffusers). ``fsdp``: with
    generate --fsdp's memory plan (the DiTs built in host memory, for distribute() to shard onto the device)."""
    import copy

    if fsdp not in _TINY_PIPES:
        from swift_model.generation.distributed import memory_plan
        from swift_model.generation.pipeline import SwiftI2VPipeline

        # fast: what --fsdp needs
        pipe = SwiftI2VPipeline.tiny(seed=0, device="cpu", memory=memory_plan("fast" if not fsdp else None, fsdp))
        # Stage II VAE tiles small enough that the 128 x 64 clip (a latent of 4 x 8) has 3 of them, encode
        # tiled too: the bridge's encode and the final decode really split over the ranks
        vae = pipe.vae2
        vae.tile_latent = vae.encode_tile_latent = 4
        vae.max_tile = 4  # the tiles the memory profile's budget fits (generate) are no larger
        vae.tile_overlap = vae.encode_tile_overlap = 1
        vae.encode_tile_min_pixels = 0
        assert len(vae.spatial_tiles(4, 8)) == 3 and vae.encode_is_tiled(PIPELINE_SIZE["height"], PIPELINE_SIZE["width"])
        _TINY_PIPES[fsdp] = pipe
    return copy.deepcopy(_TINY_PIPES[fsdp])  # distribute() shards and sets attributes: every case its own copy


def _rank_generate(pipe, **kw):
    return pipe.generate(random_image(3), "a cat", seed=2, **PIPELINE_SIZE, **kw)


def _rank_reference(**kw):
    """The one-process generation: computed by rank 0 alone (the ranks share two cores), its latents sent to
    every rank. Returns ``(result on rank 0 else None, latents)``."""
    import torch.distributed as dist

    result = _rank_generate(_rank_pipe(), **kw) if dist.get_rank() == 0 else None
    box = [None if result is None else result.latents]
    dist.broadcast_object_list(box, src=0)
    if result is not None:
        assert result.info["world_size"] == 1 and result.frames is not None
    return result, box[0]


def pipeline_cases(check) -> dict:
    """``name -> case(group)`` of the tiny two-stage pipeline on several ranks: Ulysses (sequential and joint),
    CFG parallel (with FSDP at 4 ranks), the command line's errors under a torchrun-like environment and the VAE
    passes split over the ranks. ``check(got, want, rtol, what)`` asserts and records (test_parallel's)."""
    import io

    import torch.distributed as dist

    from swift_model.generation.distributed import Parallelism, distribute

    def compare(got, want, what: str) -> None:
        result, latents = want
        check(got.latents, latents, PIPELINE_RTOL, f"{what} latents")
        rank = dist.get_rank()
        if rank == 0:  # rank 0 alone decodes the frames
            assert_frames_match(got.frames, result.frames, f"{what}: frames")
        else:
            assert got.frames is None and got.output is None, f"{what}: rank {rank} returned frames"
        assert got.info["world_size"] == dist.get_world_size()

    def split(joint: bool):
        def case(group):
            want = _rank_reference(joint=joint)
            pipe = _rank_pipe()
            par = Parallelism.build()  # Ulysses over every rank: the default
            assert par.ulysses == dist.get_world_size() and not par.cfg_parallel
            distribute(pipe, par)
            compare(_rank_generate(pipe, joint=joint), want, "joint" if joint else "sequential")
        return case

    def cfg_parallel(group):
        W = dist.get_world_size()
        fsdp = W == 4  # FSDP over every rank, under CFG halves of Ulysses pairs (each composition once)
        # with the shared anchor too: one process reuses the anchor's keys and values, the ranks recompute them
        want = _rank_reference(guidance_scale=3.0, shared_anchor=True)
        pipe = _rank_pipe(fsdp)
        assert pipe.memory.sharded_dits == fsdp and pipe.memory.initial("stage1") == ("cpu" if fsdp else "device")
        par = Parallelism.build(cfg_parallel=True, guidance=True, fsdp=fsdp)
        assert par.ulysses == W // 2 and par.branch == int(dist.get_rank() >= W // 2)
        distribute(pipe, par)
        compare(_rank_generate(pipe, guidance_scale=3.0, shared_anchor=True), want, f"cfg-parallel fsdp={fsdp}")
        # the exchange itself: each half computes its own branch only, every rank gets both, bitwise
        calls = []

        def call(c):
            calls.append(c)
            return torch.full((2, 3), float(c))

        v, vu = par.velocities(call, 1.0, -1.0, True)
        assert calls == [-1.0 if par.branch else 1.0], calls
        assert torch.equal(v, torch.full((2, 3), 1.0)) and torch.equal(vu, torch.full((2, 3), -1.0))

    def cli_errors(group):
        """Under a torchrun-like environment: a bad --ulysses fails on every rank with exit status 2 and one
        message (rank 0's); an input only one rank cannot read stops every rank with the same message."""
        from swift_model.cli import main

        W, rank = dist.get_world_size(), dist.get_rank()
        out_dir = os.environ["SPAWN_OUT_DIR"]
        img = os.path.join(out_dir, "in.png")
        if rank == 0:
            random_image(3).save(img)
        dist.barrier()
        base = ["generate", "--tiny", "--prompt", "p", "--out", os.path.join(out_dir, "x.mp4"), "--frames", "9",
                "--width", "128", "--height", "64", "--quiet"]
        with torchrun_env(rank, W):
            for extra, needle in ((["--image", img, "--ulysses", "3"], f"--ulysses 3 must divide the {W} ranks"),
                                  (["--image", img, "--cfg-parallel"], "--cfg-parallel"),
                                  (["--image", img if rank == 0 else img + ".missing"], "rank 1: ")):
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    status = main(base + extra)
                lines = err.getvalue().strip().splitlines()
                errors = [line for line in lines if line.startswith("error: ")]
                assert status == 2, f"{extra}: exit status {status}"
                if rank == 0:  # may also print the tiny models' notice
                    assert len(errors) == 1 and needle in errors[0], lines
                else:
                    assert lines == [], f"rank {rank} printed {lines}"
        assert not os.path.exists(os.path.join(out_dir, "x.mp4"))

    def vae_tiles(group):
        """The 2K VAE passes over the ranks, on a tiny VAE with tiles small enough to give 6 tiles: the decode
        (uint8 and float) on rank 0 and the tiled encode on every rank are bitwise the one-process ones."""
        from swift_model.nets import vae_parallel
        from swift_model.nets.vae import WanVAE

        rank = dist.get_rank()
        vae = WanVAE.tiny(48, seed=1, tile_latent=3, tile_overlap=1, encode_tile_min_pixels=0,
                          encode_tile_latent=3, encode_tile_overlap=1)
        g = torch.Generator().manual_seed(5)
        z = torch.randn(1, 48, 2, 4, 7, generator=g)  # 2 x 3 tiles of up to 3 x 3: uneven shares at 4 ranks
        assert len(vae.spatial_tiles(4, 7)) == 6
        got8 = vae_parallel.decode_uint8(vae, z, group)
        got = vae_parallel.decode(vae, z, group)
        if rank == 0:  # the one-process references, computed once
            check(got8, vae.decode_uint8(z), 0, "VAE decode uint8")
            check(got, vae.decode(z), 0, "VAE decode float")
        else:
            assert got8 is None and got is None
        video = torch.rand(1, 3, 5, 64, 96, generator=g) * 2 - 1  # a latent of 4 x 6: 6 tiles again
        assert vae.encode_is_tiled(64, 96)
        got = vae_parallel.encode(vae, video, group)
        want = [vae.encode(video) if rank == 0 else None]
        dist.broadcast_object_list(want, src=0)
        check(got, want[0], 0, "VAE encode")

    return {
        "pipeline-sequential": split(False),
        "pipeline-joint": split(True),
        "pipeline-cfg-parallel": cfg_parallel,
        "cli-errors": cli_errors,
        "vae-tiles": vae_tiles,
    }


# -- real-size plans ----------------------------------------------------------------------------------------------


def _preset_plan(key):
    from swift_model.nets.spec import ModelSpec
    from swift_model.planning.planner import plan_generation

    memory, settings = key
    return plan_generation(ModelSpec.preset(), memory=memory, **dict(settings))


def preset_plans(keys) -> dict:
    """``{key: PlanResult}`` of the presets' plans at 2560x1408 for ``keys`` ``(memory, ((setting, value), ...))``,
    computed in worker processes, as many at a time as there are cores (at most 2): a plan is the work of one
    Python thread on fake tensors, so two run in about the time of one on a 2-core machine. The workers fork from
    the session's fork server (``spawn.py``), which has imported torch and the package once. List the largest
    plans first: the workers take the keys in order."""
    import concurrent.futures
    import os

    import spawn

    keys = list(dict.fromkeys(keys))
    workers = max(1, min(2, os.cpu_count() or 1, len(keys)))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn.fork_context()) as pool:
        return dict(zip(keys, pool.map(_preset_plan, keys)))


# -- ahead-of-time compiles for sm_90 (aot_sm90.py) ------------------------------------------------------------


def run_aot(which: str, tmp_path) -> str:
    """Run ``aot_sm90.py which`` in a subprocess (interpreter off); returns its output, or skips without ptxas."""
    import pytest

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(TESTS / "aot_sm90.py"), which], env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0 and "ptxas" in proc.stderr and ("not found" in proc.stderr or "No such file" in proc.stderr):
        pytest.skip("no ptxas available to compile for sm_90")
    print(proc.stdout)  # the resource report, shown with -s or on failure
    assert "OVER-LIMIT" not in proc.stdout, proc.stdout
    assert proc.returncode == 0 and "AOT-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "NO-RESOURCE-REPORT" not in proc.stdout, "cuobjdump is missing: registers and spills were not checked"
    return proc.stdout
