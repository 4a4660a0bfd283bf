"""Fused sampler and DiT elementwise ops: achieved bandwidth and speed-ups over the PyTorch sequences
they replace.

Sizes: on a GPU the real Stage II ones (bf16, one window of 14,080 tokens x 3,072 channels, 24 heads of
128; the sampler on the 2K latent [1, 48, 21, 88, 160] with a 48-channel reference); on a CPU small ones
in fp32 through the torch backend (a smoke run: CPU ratios are not meaningful).

Each benchmark records in ``extra_info``: ``bytes`` (each input read once, each output written once),
``gbps`` (achieved bandwidth, median), ``copy_gbps`` (``torch.empty_like(x).copy_(x)`` of a large tensor,
measured in the same run), ``share_of_copy`` (gbps / copy_gbps), ``eager_ms`` / ``speedup_vs_eager`` (the
unfused eager PyTorch sequence) and, on a GPU, ``compiled_ms`` / ``speedup_vs_compile`` (``torch.compile``
of that same sequence).
"""

from __future__ import annotations

import datetime
import functools
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from swift_kernels.dit_ops import adaln_modulate, gated_residual, qk_norm_rope, rope_table
from swift_kernels.dit_ops import reference as dit_ref
from swift_kernels.sampler import flow_step

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"

if ON_GPU:
    B, L, C, H, D, DTYPE = 1, 14080, 3072, 24, 128, torch.bfloat16
    GRID = (4, 44, 80)  # one 4-block window at 2K: 4 x 3,520 tokens
    LATENT, C_REF = (1, 48, 21, 88, 160), 48
    BACKEND = "triton"
else:
    B, L, C, H, D, DTYPE = 1, 256, 384, 6, 64, torch.float32
    GRID = (4, 8, 8)
    LATENT, C_REF = (1, 16, 3, 16, 20), 16
    BACKEND = "torch"
assert GRID[0] * GRID[1] * GRID[2] == L and H * D == C


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _median_seconds(fn, reps: int | None = None, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` (device-synchronised), for the baselines measured beside ours."""
    reps = reps or (20 if ON_GPU else 5)
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def copy_bandwidth() -> float:
    """Device copy bandwidth in GB/s (read + write), measured once per run."""
    n = (1 << 29) if ON_GPU else (1 << 22)
    x = torch.randn(n, device=DEVICE).to(DTYPE)
    y = torch.empty_like(x)
    t = _median_seconds(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / t / 1e9


def _environment() -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name() if ON_GPU else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(DTYPE),
        "backend": BACKEND,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _run(benchmark, timer, ours, eager, nbytes: int, shapes: dict):
    timer(benchmark, ours)
    info = benchmark.extra_info
    info.update(_environment())
    info.update(shapes)
    info["bytes"] = nbytes
    if benchmark.stats is None:  # --benchmark-disable
        return
    t_ours = float(benchmark.stats.stats.median)
    info["gbps"] = nbytes / t_ours / 1e9
    info["copy_gbps"] = copy_bandwidth()
    info["share_of_copy"] = info["gbps"] / info["copy_gbps"]
    t_eager = _median_seconds(eager)
    info["eager_ms"] = 1e3 * t_eager
    info["speedup_vs_eager"] = t_eager / t_ours
    if ON_GPU:
        compiled = torch.compile(eager)
        t_comp = _median_seconds(compiled, warmup=3)
        info["compiled_ms"] = 1e3 * t_comp
        info["speedup_vs_compile"] = t_comp / t_ours


def _rand(*shape, dtype=DTYPE):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.benchmark(group="dit-ops")
@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
def test_bench_adaln_modulate(benchmark, timer, per_token):
    x = _rand(B, L, C)
    e = _rand(B, L if per_token else 1, 6, C, dtype=torch.float32)
    shift, scale = e[:, :, 0], e[:, :, 1]
    out = adaln_modulate(x, shift, scale, backend=BACKEND)

    def eager():  # the Wan block's sequence: LayerNorm in fp32, modulation in fp32, cast for the GEMM
        return (F.layer_norm(x.float(), (C,), eps=1e-6) * (1 + scale) + shift).to(DTYPE)

    _run(benchmark, timer, lambda: adaln_modulate(x, shift, scale, backend=BACKEND), eager,
         _bytes(x, shift, scale, out), {"op": "adaln_modulate", "shape": [B, L, C], "per_token": per_token})


@pytest.mark.benchmark(group="dit-ops")
@pytest.mark.parametrize("fused", [False, True], ids=["residual", "residual+adaln"])
def test_bench_gated_residual(benchmark, timer, fused):
    x = _rand(B, L, C)
    y = _rand(B, L, C)
    e = _rand(B, 1, 6, C, dtype=torch.float32)
    shift, scale, gate = e[:, :, 0], e[:, :, 1], e[:, :, 2]
    kw = dict(shift=shift, scale=scale) if fused else {}
    outs = gated_residual(x, y, gate, backend=BACKEND, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)

    def eager():
        nx = (x.float() + gate * y.float()).to(DTYPE)
        if not fused:
            return nx
        return nx, (F.layer_norm(nx.float(), (C,), eps=1e-6) * (1 + scale) + shift).to(DTYPE)

    _run(benchmark, timer, lambda: gated_residual(x, y, gate, backend=BACKEND, **kw), eager,
         _bytes(x, y, gate, *outs, *((shift, scale) if fused else ())),
         {"op": "gated_residual" + ("+adaln_modulate" if fused else ""), "shape": [B, L, C]})


@pytest.mark.benchmark(group="dit-ops")
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual+adaln_modulate"])
def test_bench_dit_ops_indexed(benchmark, timer, op):
    """Per-token timesteps as ``[K, C]`` tables + a per-token row index (``mod_index``), as a CSG window
    gives them: 4 latent-frame blocks, the first two clean (t = 0), the last two noisy (the step's t): K = 2.

    Bytes: x (and y) read, outputs written, the K-row tables read once each (they stay in cache) and the
    int32 index read once: no per-token modulation. ``expanded_ms`` / ``speedup_vs_expanded``: the same op
    on the expanded ``[B, L, C]`` fp32 modulation (what the model passed before), measured in the same run;
    the eager baseline gathers the tables per token, then runs the unfused sequence.
    """
    K = 2
    x = _rand(B, L, C)
    y = _rand(B, L, C)
    e = _rand(K, 6, C, dtype=torch.float32)
    shift, scale, gate = e[:, 0], e[:, 1], e[:, 2]
    P = L // 4
    idx = torch.tensor([0, 0, 1, 1], device=DEVICE, dtype=torch.int32).repeat_interleave(P)[None].expand(B, L).contiguous()
    sh_t, sc_t, g_t = (t[idx.long()] for t in (shift, scale, gate))  # the expanded layout, for the comparison
    fused = op != "adaln_modulate"

    if fused:
        def ours():
            return gated_residual(x, y, gate, shift=shift, scale=scale, mod_index=idx, backend=BACKEND)

        def expanded():
            return gated_residual(x, y, g_t, shift=sh_t, scale=sc_t, backend=BACKEND)

        def eager():
            i = idx.long()
            nx = (x.float() + gate[i] * y.float()).to(DTYPE)
            return nx, (F.layer_norm(nx.float(), (C,), eps=1e-6) * (1 + scale[i]) + shift[i]).to(DTYPE)
    else:
        def ours():
            return adaln_modulate(x, shift, scale, mod_index=idx, backend=BACKEND)

        def expanded():
            return adaln_modulate(x, sh_t, sc_t, backend=BACKEND)

        def eager():
            i = idx.long()
            return (F.layer_norm(x.float(), (C,), eps=1e-6) * (1 + scale[i]) + shift[i]).to(DTYPE)

    outs = ours()
    outs = outs if isinstance(outs, tuple) else (outs,)
    want = expanded()
    for a, b in zip(outs, want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the indexed layout changes no number
    tables = (gate, shift, scale) if fused else (shift, scale)
    ins = (x, y) if fused else (x,)
    nbytes = _bytes(*ins, *outs, *tables, idx)
    _run(benchmark, timer, ours, eager, nbytes,
         {"op": op, "shape": [B, L, C], "mod_index": True, "table_rows": K, "index_dtype": "int32"})
    if benchmark.stats is not None:
        t_exp = _median_seconds(expanded)
        info = benchmark.extra_info
        info["expanded_ms"] = 1e3 * t_exp
        info["expanded_bytes"] = _bytes(*ins, *outs, *((g_t, sh_t, sc_t) if fused else (sh_t, sc_t)))
        info["speedup_vs_expanded"] = t_exp / float(benchmark.stats.stats.median)


@pytest.mark.benchmark(group="dit-ops")
def test_bench_qk_norm_rope(benchmark, timer):
    qkv = _rand(B, L, 3 * C)
    q = qkv[..., :C].view(B, L, H, D)
    k = qkv[..., C : 2 * C].view(B, L, H, D)
    wq = _rand(C)
    wk = _rand(C)
    freqs = rope_table(GRID, D, frame_positions=[0, 5, 6, 7], device=DEVICE)
    qo, ko = qk_norm_rope(q, k, wq, wk, freqs, backend=BACKEND)

    def eager():  # the same math unfused: fp32 RMSNorm over H*D, round, weight, real-valued RoPE
        return dit_ref.qk_norm_rope(q, k, wq, wk, freqs)

    _run(benchmark, timer, lambda: qk_norm_rope(q, k, wq, wk, freqs, backend=BACKEND), eager,
         _bytes(q, k, wq, wk, freqs, qo, ko),
         {"op": "qk_norm_rope", "shape": [B, L, H, D], "grid": list(GRID)})


@pytest.mark.benchmark(group="sampler")
@pytest.mark.parametrize("mode", ["renoise", "euler"])
@pytest.mark.parametrize("with_ref", [False, True], ids=["state", "state+model_input"])
def test_bench_flow_step(benchmark, timer, mode, with_ref):
    x = _rand(*LATENT)
    v = _rand(*LATENT)
    sigma, sigma_next = 0.9375, 0.8333333333333334
    ref = _rand(LATENT[0], C_REF, *LATENT[2:]) if with_ref else None
    out = torch.empty((LATENT[0], LATENT[1] + C_REF, *LATENT[2:]), device=DEVICE, dtype=DTYPE) if with_ref else torch.empty_like(x)
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def ours():
        return flow_step(x, v, sigma, sigma_next, mode=mode, seed=1234, ref=ref, out=out, backend=BACKEND)

    def eager():  # the unfused step: fp32 math, a stored noise tensor, then the channel concat
        xf = x.float()
        vf = v.float()
        if mode == "euler":
            new = xf + (sigma_next - sigma) * vf
        else:
            eps = torch.randn(xf.shape, generator=gen, device=DEVICE, dtype=torch.float32)
            new = (1 - sigma_next) * (xf - sigma * vf) + sigma_next * eps
        new = new.to(DTYPE)
        return torch.cat([new, ref], dim=1) if with_ref else new

    eager_fn = eager
    if ON_GPU and mode == "renoise":
        # torch.compile cannot trace an explicit Generator: compile the same sequence with the global one
        def eager_fn():
            xf = x.float()
            new = ((1 - sigma_next) * (xf - sigma * v.float()) + sigma_next * torch.randn_like(xf)).to(DTYPE)
            return torch.cat([new, ref], dim=1) if with_ref else new

    _run(benchmark, timer, ours, eager_fn, _bytes(x, v, out, *((ref,) if with_ref else ())),
         {"op": "flow_step", "mode": mode, "latent": list(LATENT), "ref_channels": C_REF if with_ref else 0})
