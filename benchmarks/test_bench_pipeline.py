"""End-to-end SwiftI2V pipeline benchmark.

On CPU: the tiny random-weight pipeline at a small size (a smoke benchmark, fast). On a GPU: full-size presets
with random weights (time does not depend on the weights' values) at 2560x1408: Stage I with the
``wan2.1-i2v-14b`` preset at 640x352 (random CLIP image tokens of the real shape), Stage II with
``wan2.2-ti2v-5b`` by CSG, 4 steps each, VAE encode and decode included, for 81/161/241 frames. Recorded in
``extra_info``: seconds per stage, total GPU-seconds (one GPU: the wall time of the run), peak memory, and
for 161/241 frames the time and peak-memory ratios to the 81-frame run. The 81-frame case also times one
Stage II DiT step over the whole 73,920-token clip with dense attention (the end-to-end approach) against one
CSG window step, and reports the Stage II DiT time CSG buys.
"""

import json
import os
import time

import numpy as np
import pytest
import torch

STEPS = 4
WIDTH, HEIGHT = 2560, 1408
# Targets of the issue: time ratio to the 81-frame run, and peak memory within 10% of it.
TIME_TARGETS = {161: 2.1, 241: 3.2}
_RUNS: dict[int, dict] = {}
# One untimed warm-up run (Triton compilation, cuDNN algorithm search) precedes the timed ones. Its frame count
# is SWIFT_BENCH_WARMUP_FRAMES (default 21: every kernel and per-window shape of the timed runs is met already,
# since Stage II windows have the same size at every length and the Stage I token count only scales; an 81-frame
# warm-up would cost about as much as a timed 81-frame run, which a 10-minute device call cannot afford).
WARMUP_FRAMES = int(os.environ.get("SWIFT_BENCH_WARMUP_FRAMES", "21"))
# The 161/241-frame ratios need the 81-frame run. A device call of at most 10 minutes cannot hold all three, so
# with SWIFT_BENCH_STATE_DIR set each run's totals are saved there and read back by a later process on the same
# machine (same build, same GPU).
_STATE_DIR = os.environ.get("SWIFT_BENCH_STATE_DIR")


def _state_file() -> str | None:
    return os.path.join(_STATE_DIR, "pipeline_runs.json") if _STATE_DIR else None


def _load_runs() -> dict[int, dict]:
    path = _state_file()
    if path and os.path.exists(path):
        with open(path) as f:
            return {int(k): v for k, v in json.load(f).items()}
    return {}


def _save_run(frames: int, run: dict) -> None:
    path = _state_file()
    if not path:
        return
    runs = _load_runs()
    runs[frames] = run
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({str(k): v for k, v in runs.items()}, f, indent=2)


def _image(w, h, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_pipeline_tiny_cpu(benchmark):
    from swift_model.generation.pipeline import SwiftI2VPipeline

    pipe = SwiftI2VPipeline.tiny(seed=0, device="cpu")
    img = _image(64, 64)
    result = benchmark.pedantic(lambda: pipe.generate(img, "bench", frames=9, width=128, height=64, progress=False),
                                rounds=1, iterations=1)
    benchmark.extra_info.update(result.report())
    assert result.frames.shape == (9, 64, 128, 3)


# -- full size, GPU -----------------------------------------------------------------------------------------


def _random_init_(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter in place: matrices ~ N(0, 1/fan_in) (activations stay O(1) through the stack),
    norm weights 1, other vectors 0. Drawn on the module's device, so a 14B model is ready in seconds."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, float(p[0].numel()) ** -0.5, generator=g)
            elif "norm" in name or name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def _build_dit(config, device, dtype, seed):
    """A full-size DiT with random weights straight on the GPU: built on the meta device (no memory, no CPU
    init), cast there to bf16 (so no fp32 copy of the weights ever exists: the 14B is 28 GB in bf16, 56 GB in fp32), then
    storage on the GPU and an in-place random fill."""
    from swift_model.nets.dit import WanDiT

    with torch.device("meta"):
        model = WanDiT(config)
    # to_dtype, not .to(dtype): the parameters a real checkpoint keeps in fp32 (timestep MLP, modulation tables,
    # LayerNorms; a few MB) stay fp32 here too, so the benchmark runs the same mixed precision as a real load.
    model = model.to_dtype(dtype).to_empty(device=device)
    _random_init_(model, seed)
    return model.eval().requires_grad_(False)


class _RandomCLIP:
    """CLIP image tokens of the real shape (257 tokens of width 1280 for Wan2.1 I2V), random: the Stage I
    DiT's cost depends on the token count only. ``model`` is an empty module so the pipeline can move it."""

    def __init__(self, dim: int, device, dtype, tokens: int = 257) -> None:
        self.model = torch.nn.Module()
        self.shape, self.device, self.dtype = (1, tokens, dim), device, dtype

    def encode(self, image):
        g = torch.Generator(device=self.device).manual_seed(0)
        return torch.randn(self.shape, generator=g, device=self.device, dtype=torch.float32).to(self.dtype)


@pytest.fixture(scope="module")
def full_pipe():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (full-size presets)")
    from diffusers import AutoencoderKLWan

    from swift_model.nets.config import WanDiTConfig
    from swift_model.generation.pipeline import SwiftI2VPipeline
    from swift_model.nets.vae import WAN21_CONFIG, WAN22_CONFIG, WanVAE

    dev, dt = torch.device("cuda"), torch.bfloat16
    t0 = time.perf_counter()
    c1 = WanDiTConfig.preset("wan2.1-i2v-14b")
    c2 = WanDiTConfig.preset("wan2.2-ti2v-5b")
    c2 = c2.widened_input(extra_in_channels=c2.in_channels)  # the "swift" kind: latents + z_ref channels
    s1 = _build_dit(c1, dev, dt, seed=1)
    s2 = _build_dit(c2, dev, dt, seed=2)
    with torch.device(dev):  # the VAEs are small: default init, on the GPU directly
        vae1 = AutoencoderKLWan(**WAN21_CONFIG).to(dt)
        vae2 = AutoencoderKLWan(**WAN22_CONFIG, latents_mean=[0.0] * 48, latents_std=[1.0] * 48).to(dt)
    clip = _RandomCLIP(c1.image_dim, dev, dt)
    pipe = SwiftI2VPipeline(s1, s2, WanVAE(vae1), WanVAE(vae2), None, clip, stage2_kind="swift", device=dev,
                            random_weights=True)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for m in (s1, s2, vae1, vae2) for p in m.parameters())
    # One cold run first (Triton compilation, cuDNN algorithm search for the VAE convolutions): the timed runs
    # are warm, so the 161/241-frame ratios compare like with like (see WARMUP_FRAMES).
    t0 = time.perf_counter()
    pipe.generate(_image(WIDTH, HEIGHT), prompt_embeds=_prompt_embeds(c1.text_dim), frames=WARMUP_FRAMES, width=WIDTH,
                  height=HEIGHT, steps=STEPS, progress=False)
    torch.cuda.synchronize()
    cold_s = time.perf_counter() - t0
    return pipe, dict(build_seconds=build_s, cold_run_seconds=cold_s, cold_run_frames=WARMUP_FRAMES,
                      weight_bytes=weight_bytes, weight_gib=weight_bytes / 2**30)


def _prompt_embeds(dim: int) -> torch.Tensor:
    # 512 tokens: the UMT5 context length of the Wan models (cross-attention cost as with a real prompt).
    return torch.randn(1, 512, dim, generator=torch.Generator().manual_seed(0))


def _time_cuda(fn, reps: int = 3) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up, timed with CUDA events."""
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return float(np.median(times))


@torch.no_grad()
def _dense_vs_csg_step(pipe, context, T: int, hh: int, ww: int, segment_blocks=2, neighbors=(1, 0)) -> dict:
    """One Stage II DiT step over the whole clip with dense attention (all 21 blocks see each other: the
    end-to-end approach) against one step of one full CSG window (anchor + NL + M + NR blocks, block-sparse).

    Stage II DiT time of the whole clip: dense = t_dense * steps (one pass over the clip per step); CSG =
    t_window * steps * segments (every segment runs its own steps on its window). Their ratio is what CSG buys
    on the Stage II DiT (attention is quadratic in the tokens per call; the rest is linear, so CSG also pays for
    the conditioning blocks it re-reads in every window: the ratio is their net)."""
    from swift_model.generation.csg import CSGPlan

    dit, dev = pipe.stage2, pipe.device
    dtype = next(dit.parameters()).dtype
    C_in = dit.config.in_channels
    P = (hh // 2) * (ww // 2)
    plan = CSGPlan(T, segment_blocks, neighbors, block_tokens=P)
    cache = dit.precompute_context(context.to(dev, dtype), None)
    t = 937.5  # the first step's timestep; the cost does not depend on it

    g = torch.Generator(device=dev).manual_seed(0)
    x_clip = torch.randn(1, C_in, T, hh, ww, generator=g, device=dev, dtype=torch.float32).to(dtype)
    tt_clip = torch.full((1, T * P), t, device=dev)
    tt_clip[:, :P] = 0.0
    dense_mask = torch.ones(T, T, dtype=torch.bool)

    def dense():
        dit(x_clip, tt_clip, None, block_mask=dense_mask, block_tokens=P, frame_positions=torch.arange(T),
            context_cache=cache)

    win = max(plan.windows, key=lambda w: w.num_blocks)
    x_win = x_clip[:, :, : win.num_blocks].contiguous()
    tt_win = win.token_timesteps(t, P, device=dev)

    def window():
        dit(x_win, tt_win, None, layout=win.layout, frame_positions=win.frame_positions(), context_cache=cache)

    torch.cuda.reset_peak_memory_stats(dev)
    t_win = _time_cuda(window)
    t_dense = _time_cuda(dense)
    dense_peak = torch.cuda.max_memory_allocated(dev)
    csg_total = t_win * STEPS * plan.num_segments
    dense_total = t_dense * STEPS
    return dict(
        dense_clip_tokens=T * P, csg_window_tokens=win.num_blocks * P, csg_segments=plan.num_segments,
        dense_step_seconds=t_dense, csg_window_step_seconds=t_win,
        dense_stage2_dit_seconds=dense_total, csg_stage2_dit_seconds=csg_total,
        csg_speedup_vs_dense=dense_total / csg_total, dense_step_peak_memory_gib=dense_peak / 2**30,
        csg_ratio_formula="(t_dense_step * steps) / (t_window_step * steps * segments)",
    )


@pytest.mark.gpu
@pytest.mark.parametrize("frames", [81, 161, 241])
def test_pipeline_full_size_gpu(benchmark, full_pipe, frames):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (full-size presets)")
    pipe, build = full_pipe
    img = _image(WIDTH, HEIGHT)
    emb = _prompt_embeds(pipe.stage1.config.text_dim)
    result = benchmark.pedantic(
        lambda: pipe.generate(img, prompt_embeds=emb, frames=frames, width=WIDTH, height=HEIGHT, steps=STEPS,
                              progress=False),
        rounds=1, iterations=1)
    T = (frames - 1) // 4 + 1
    assert result.frames.shape == (frames, HEIGHT, WIDTH, 3)
    assert result.latents.shape == (1, 48, T, HEIGHT // 16, WIDTH // 16)

    info = result.report()
    info.update(build)
    info["gpu_seconds_total"] = result.seconds["total"]  # one GPU: GPU-seconds = the wall time of the run
    info["device_name"] = torch.cuda.get_device_name()
    info["torch"] = torch.__version__
    info["targets"] = dict(total_seconds_h100=111.0, peak_memory_gib=60.0)
    _RUNS[frames] = dict(total=result.seconds["total"], peak=result.peak_memory_bytes)
    _save_run(frames, _RUNS[frames])
    runs = {**_load_runs(), **_RUNS}  # this process's runs win over saved ones
    if frames in TIME_TARGETS and 81 in runs:
        base = runs[81]
        info["baseline_81_from"] = "this process" if 81 in _RUNS else "SWIFT_BENCH_STATE_DIR"
        info["time_ratio_vs_81"] = result.seconds["total"] / base["total"]
        info["time_ratio_target"] = TIME_TARGETS[frames]
        info["peak_memory_ratio_vs_81"] = result.peak_memory_bytes / base["peak"]
        info["meets_time_target"] = info["time_ratio_vs_81"] <= TIME_TARGETS[frames]
        info["meets_memory_target"] = abs(info["peak_memory_ratio_vs_81"] - 1.0) <= 0.10
    if frames == 81:
        info["dense_vs_csg"] = _dense_vs_csg_step(pipe, emb, T, HEIGHT // 16, WIDTH // 16)
    benchmark.extra_info.update(info)
