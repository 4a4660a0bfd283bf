"""One DiT step (a full forward) at the paper's shapes, against diffusers' WanTransformer3DModel.

GPU cases (bf16, random weights; time does not depend on the values):

- ``ti2v-5b-window``: the Stage II call, Wan2.2-TI2V-5B preset on one CSG window of 4 blocks (anchor, 1 left
  neighbour, 2 noisy blocks) of 88x160 latents: latent ``[1, 48, 4, 88, 160]`` = 14,080 tokens, per-token
  timesteps (0 on the clean blocks), RoPE at the blocks' clip positions. (The "swift" variant's 96 input
  channels change only the patch embedding, a negligible share of the time; the public 48 is used so
  diffusers runs the same weights.)
- ``i2v-14b-360p``: the Stage I call, Wan2.1-I2V-14B preset (CLIP image tokens) on the whole 81-frame 360P
  clip: latent ``[1, 36, 21, 44, 80]`` (640x352 / 8) = 21 x 22 x 40 = 18,480 tokens.

The model is built on the ``meta`` device, cast there, and materialised on the GPU (``to_empty`` + random init); diffusers'
model gets the *same* tensors (``load_state_dict(assign=True)``), so both fit in memory together.

Recorded in ``extra_info``: the case and shapes, ``flops`` (matmul FLOPs of the forward: projections, FFN,
attention over all allowed pairs, cross-attention incl. the text/image K/V projections), ``tflops_median``,
``gemm_peak_tflops`` (a bf16 8192^3 matmul measured in the same run), ``mfu`` (= tflops / GEMM peak),
``diffusers_ms`` and ``speedup_vs_diffusers`` (diffusers' median time / ours), ``cached_context_ms`` (ours
with the cross-attention K/V precomputed, as the pipeline runs it), and ``max_abs_diff_vs_diffusers``.

On a CPU the tiny presets run on small latents in fp32 (a smoke run: the numbers mean nothing).
"""

from __future__ import annotations

import functools
import statistics
import time

import pytest
import torch

from swift_kernels import CSGLayout
from swift_model import WanDiT, WanDiTConfig

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32

if ON_GPU:
    CASES = {
        "ti2v-5b-window": dict(preset="wan2.2-ti2v-5b", latent=(1, 48, 4, 88, 160), clip_T=21, window=True),
        "i2v-14b-360p": dict(preset="wan2.1-i2v-14b", latent=(1, 36, 21, 44, 80), clip_T=21, window=False),
    }
else:
    CASES = {
        "ti2v-5b-window": dict(preset="tiny-ti2v", latent=(1, 48, 4, 8, 8), clip_T=9, window=True),
        "i2v-14b-360p": dict(preset="tiny-i2v", latent=(1, 36, 5, 8, 8), clip_T=5, window=False),
    }


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _median_seconds(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def gemm_peak_tflops() -> float:
    """bf16 (fp32 on CPU) matmul throughput of a large square GEMM, measured once per run."""
    n = 8192 if ON_GPU else 512
    a = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    b = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    t = _median_seconds(lambda: a @ b, reps=20 if ON_GPU else 3, warmup=3)
    return 2 * n**3 / t / 1e12


def dit_flops(cfg: WanDiTConfig, tokens: int, pairs: int, text_len: int, image_len: int) -> float:
    """Matmul FLOPs of one forward (elementwise work and the timestep MLP not counted)."""
    d, f = cfg.dim, cfg.ffn_dim
    per_block = (
        tokens * 2 * d * d * 4  # q, k, v, o
        + 4 * pairs * d  # self-attention QK^T and PV over the allowed pairs
        + tokens * 2 * d * d * 2  # cross q, o
        + (text_len + image_len) * 2 * d * d * 2  # cross k, v (text and image tokens)
        + 4 * tokens * (text_len + image_len) * d  # cross-attention scores and values
        + tokens * 2 * d * f * 2  # FFN
    )
    patch = tokens * 2 * cfg.in_channels * 4 * d + tokens * 2 * d * cfg.out_channels * 4
    text = text_len * 2 * (cfg.text_dim * d + d * d)
    return float(cfg.num_layers * per_block + patch + text)


def _build(cfg: WanDiTConfig) -> WanDiT:
    # Cast on the meta device first, then allocate: materialising in fp32 and casting afterwards would hold the
    # 14B model in fp32 (56 GB) on the GPU before the cast, and leave the allocator's cache fragmented for the
    # case after it. The random draw then happens in the final dtype (values do not matter for timing; diffusers
    # gets the very same tensors).
    with torch.device("meta"):
        model = WanDiT(cfg)
    model = model.to_dtype(DTYPE).to_empty(device=DEVICE).reset_parameters().eval().requires_grad_(False)
    return model


def _diffusers_twin(model: WanDiT):
    """diffusers' model sharing our tensors (only the time projection gets its own low-precision copy:
    diffusers feeds it the low-precision embedding)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    d = model.config.to_diffusers()
    d.pop("_class_name")
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(**d)
    sd = dict(model.state_dict())
    for k in ("condition_embedder.time_proj.weight", "condition_embedder.time_proj.bias"):
        sd[k] = sd[k].to(DTYPE).clone()
    ref.load_state_dict(sd, strict=True, assign=True)
    cfg = model.config
    ref.rope = WanRotaryPosEmbed(cfg.head_dim, cfg.patch_size, 1024).to(DEVICE)  # non-persistent buffers
    return ref.eval().requires_grad_(False)


@pytest.mark.parametrize("case", list(CASES))
def test_dit_step(benchmark, case):
    spec = CASES[case]
    cfg = WanDiTConfig.preset(spec["preset"])
    torch.manual_seed(0)
    model = _build(cfg)
    B, C, Fr, Hl, Wl = spec["latent"]
    P = (Hl // 2) * (Wl // 2)
    L = Fr * P
    x = torch.randn(B, C, Fr, Hl, Wl, device=DEVICE, dtype=DTYPE)
    ctx = torch.randn(B, cfg.text_len, cfg.text_dim, device=DEVICE, dtype=DTYPE)
    clip = torch.randn(B, cfg.image_len, cfg.image_dim, device=DEVICE, dtype=DTYPE) if cfg.image_dim else None
    kwargs = {}
    if spec["window"]:
        # segment 2 of a clip of clip_T blocks with M=2, N=(1, 0): window = anchor, 1 left, 2 noisy blocks
        layout = CSGLayout(spec["clip_T"], P, segment_blocks=2, neighbors=(1, 0), mode="window", segment=2)
        assert layout.num_seq_blocks == Fr
        kwargs["layout"] = layout
        t = torch.zeros(B, Fr, device=DEVICE)
        t[:, layout.noisy_blocks] = 750.0
        t = t[:, :, None].expand(B, Fr, P).reshape(B, L)  # per token, as diffusers takes it
        ref_kwargs_positions = layout.block_ids
    else:
        t = torch.full((B,), 750.0, device=DEVICE)
        ref_kwargs_positions = None
    pairs = L * L  # dense within the window / clip
    image_len = cfg.image_len if cfg.image_dim else 0
    flops = dit_flops(cfg, L, pairs, cfg.text_len, image_len)

    def ours():
        with torch.no_grad():
            return model(x, t, ctx, clip, **kwargs)

    rounds = 5 if ON_GPU else 2
    out = benchmark.pedantic(lambda: (ours(), _sync())[0], rounds=rounds, warmup_rounds=1, iterations=1)
    median = float(benchmark.stats.stats.median) if benchmark.stats is not None else _median_seconds(ours, 1)

    cache = model.precompute_context(ctx, clip)
    cached = _median_seconds(lambda: model(x, t, context_cache=cache, **kwargs), reps=rounds)

    info = {
        "case": case, "preset": spec["preset"], "latent": list(spec["latent"]), "tokens": L, "dtype": str(DTYPE),
        "device_name": torch.cuda.get_device_name() if ON_GPU else "cpu", "torch": torch.__version__,
        "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d", time.gmtime()), "role": "ours", "impl": "swift",
        "flops": flops, "tflops_median": flops / median / 1e12, "gemm_peak_tflops": gemm_peak_tflops(),
        "cached_context_ms": cached * 1e3,
    }
    info["mfu"] = info["tflops_median"] / info["gemm_peak_tflops"]

    # diffusers on the same weights and inputs. Its RoPE positions are 0..F-1; for the window case our
    # output is compared at the same positions (frame_positions=arange), timed with the clip positions.
    ref = _diffusers_twin(model)

    def theirs():
        with torch.no_grad():
            return ref(x, t, ctx, clip, return_dict=False)[0]

    ref_time = _median_seconds(theirs, reps=3 if ON_GPU else 1)
    with torch.no_grad():
        same_pos = model(x, t, ctx, clip) if ref_kwargs_positions is not None else out
        diff = (same_pos.float() - theirs().float()).abs().max().item()
    info.update(diffusers_ms=ref_time * 1e3, speedup_vs_diffusers=ref_time / median, max_abs_diff_vs_diffusers=diff,
                ours_ms=median * 1e3)
    benchmark.extra_info.update(info)
    assert torch.isfinite(out.float()).all()
    del ref
