"""Steps of the repository's GPU check (run by benchmarks/gpu_check.sh, one step per process).

    python benchmarks/gpu_check.py STEP [ARG]       # OUT=<folder> required; DRY=1 for the CPU dry run

Steps: ``env``; ``attention BACKENDS`` (comma-separated: triton, cuda, cuda-sm90, flex, sdpa;
``DTYPES=bf16,fp16`` narrows the dtypes); ``ops``; ``memory`` (the memory plan on the device:
``benchmarks/gpu_memory_check.py``); ``bench-fwd``; ``bench-ops``; ``bench-bwd``; ``vae``; ``e2e``; ``summary``.

Correctness (``attention``, ``ops``) runs at the real Stage II sizes: a CSG window of 4 latent frames (14,080
tokens, dense) and the whole 21-frame clip (73,920 tokens, block-sparse: segments of 2 frames, one left
neighbour), 24 heads of 128, bf16 and fp16, forward and backward, each against the fp32 PyTorch reference, with
the rule of docs/testing.md: the error may be at most twice that of PyTorch's own computation in the same dtype (each
window gathered, then dense SDPA) plus one ulp of the largest value. Inputs are fresh random numbers per case,
outputs land in NaN-poisoned memory. One line per case goes to ``checks.jsonl``; ``summary`` folds them into
``results.json`` (device, versions, date, per op/backend pass or fail), which ``python -m swift_kernels.verified
update`` turns into verified-table rows.

Speed (``bench-*``) records one line per measurement in ``bench.jsonl`` as it finishes: forward TFLOP/s (only
allowed pairs counted) of ours vs SDPA's flash and cuDNN kernels (each window gathered, then dense) vs
FlexAttention on the window, the clip and the packed windows, with an 8192^3 bf16 matrix product as the measured
ceiling; fused-op GB/s vs a device-to-device copy; forward+backward; and a 2K Wan2.2 VAE
decode (random weights) in seconds per latent frame. Last, ``e2e``: the whole generation at 2K with random weights
(``benchmarks/e2e.py``), seconds and achieved TFLOP/s per phase, eager and compiled.

The dry run (``DRY=1``, on a CPU) runs every step on tiny sizes (Triton in its interpreter, fp16 and fp32): it
checks the plumbing, measures nothing and verifies nothing (``results.json`` says ``dry_run``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
import time
import traceback

OUT = os.environ["OUT"]
DRY = os.environ.get("DRY", "0") == "1"
if sys.argv[1:2] != ["summary"]:  # the summary reads JSON only: it starts without torch
    import torch
    import torch.nn.functional as F

    GPU = torch.cuda.is_available() and not DRY
    DEV = torch.device("cuda") if GPU else torch.device("cpu")
    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEADLINE = float(os.environ.get("DEADLINE", time.time() + 3600))  # the step's own end: stop starting new work
T0 = time.time()

# heads, head_dim, block tokens, clip blocks; DiT tokens and channels; latent frames, height, width; GEMM n;
# log2 of the copy's elements; VAE latent frames
if DRY:
    H, D, P, T, L_DIT, C_DIT, LT, LH, LW, NG, NC, VAE_T = 1, 64, 32, 5, 32, 128, 2, 4, 6, 128, 12, 1
else:
    H, D, P, T, L_DIT, C_DIT, LT, LH, LW, NG, NC, VAE_T = 24, 128, 3520, 21, 14080, 3072, 21, 88, 160, 8192, 29, 3


def out_path(name: str) -> str:
    return os.path.join(OUT, name)


def emit(file: str, **record) -> None:
    """Append one JSON line to ``$OUT/<file>`` (written as each result is known) and echo it."""
    record["at_s"] = round(time.time() - T0, 1)
    line = json.dumps(record, default=str)
    with open(out_path(file), "a", encoding="utf-8") as f:
        f.write(line + "\n")
    print(line, flush=True)


def time_left() -> float:
    return DEADLINE - time.time()


def has_time(seconds: float) -> bool:
    """Whether the step has ``seconds`` left for one more piece of work (a dry run needs about one)."""
    return time_left() > (1.0 if DRY else seconds)


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def poison() -> None:
    """Fill the caching allocator's free memory with NaN, so outputs a kernel fails to write show up as NaN."""
    if GPU:
        free = torch.cuda.mem_get_info()[0]
        junk = torch.full((int(free * 0.6) // 4,), float("nan"), device=DEV)
        del junk


def layouts():
    from swift_kernels import CSGLayout

    return {
        "window": CSGLayout(T, P, 2, (1, 0), mode="window", segment=1),  # anchor + 1 left + 2 own: 4 blocks, dense
        "clip": CSGLayout(T, P, 2, (1, 0), mode="clip"),  # 21 blocks once each, block-sparse
    }


def bench_layouts(grad: bool):
    """The layouts timed: the window and the clip, and in the forward the packed windows (every segment's window
    in one sequence, 31 blocks: 109,120 tokens at 2K) too."""
    from swift_kernels import CSGLayout

    cases = layouts()
    if not grad and not DRY:  # the same code path as the clip: the dry run saves its time
        cases["packed"] = CSGLayout(T, P, 2, (1, 0), mode="packed")
    return cases


def groups(layout):
    """((q0, q1), [(k0, k1), ...]): runs of query blocks sharing one mask row, and the key ranges it allows."""
    m, out, i = layout.block_mask.tolist(), [], 0
    while i < len(m):
        j = i + 1
        while j < len(m) and m[j] == m[i]:
            j += 1
        keys, s = [], None
        for c, allowed in enumerate(m[i] + [False]):
            if allowed and s is None:
                s = c
            if not allowed and s is not None:
                keys.append((s * P, c * P))
                s = None
        out.append(((i * P, j * P), keys))
        i = j
    return out


def gathered_sdpa(layout, sdpa_backend=None):
    """The layout as one SDPA call per query group on its gathered keys ([B, L, H, D] in and out): PyTorch's own
    way to compute the same function, and our rival."""
    from torch.nn.attention import sdpa_kernel

    gs = groups(layout)

    def run(q, k, v):
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))

        def cat(x, ranges):
            return x[:, :, ranges[0][0]:ranges[0][1]] if len(ranges) == 1 else torch.cat([x[:, :, a:b] for a, b in ranges], 2)

        def call():
            return [F.scaled_dot_product_attention(qh[:, :, a:b], cat(kh, ks), cat(vh, ks)).transpose(1, 2)
                    for (a, b), ks in gs]

        if sdpa_backend is None:
            outs = call()
        else:
            with sdpa_kernel(sdpa_backend):
                outs = call()
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    return run


# ---------------------------------------------------------------------------------------------------------------
# env


def step_env() -> None:
    import importlib.metadata
    import shutil
    import subprocess

    mods = {}
    for name in ("triton", "numpy", "pytest", "diffusers", "transformers", "flash-attn", "ninja", "pybind11"):
        try:
            mods[name] = importlib.metadata.version(name)  # installed distributions, without importing them
        except importlib.metadata.PackageNotFoundError:
            mods[name] = None
    env = {"dry_run": DRY, "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "modules": mods, "nproc": os.cpu_count(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "tools": {t: shutil.which(t) for t in ("nvcc", "nvidia-smi", "cuobjdump", "compute-sanitizer")}}
    if GPU:
        p = torch.cuda.get_device_properties(0)
        env["device"] = {"name": p.name, "cc": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                         "mem_gib": round(p.total_memory / 2**30, 1), "l2_mb": getattr(p, "L2_cache_size", 0) / 2**20}
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = f"unavailable: {exc}"
    else:
        env["device"] = {"name": f"CPU ({platform.processor() or platform.machine()})", "cc": None}
    try:
        import swift_kernels

        env["extension"] = {"available": swift_kernels.extension_available()}
        if swift_kernels.extension_available():
            from swift_kernels._backend import extension

            ext = extension()
            env["extension"].update(archs=list(ext.CUDA_ARCHS), has_sm90=ext.HAS_SM90, has_backward=ext.HAS_BACKWARD)
    except Exception as exc:
        env["extension"] = {"error": f"{type(exc).__name__}: {exc}"}
    with open(out_path("env.json"), "w", encoding="utf-8") as f:
        json.dump(env, f, indent=1)
    print(json.dumps(env))


# ---------------------------------------------------------------------------------------------------------------
# correctness


@contextlib.contextmanager
def check_case(**rec):
    """Yield a check record to fill; an exception fails the case (and is logged) instead of ending the step.
    The record goes to checks.jsonl with its duration either way."""
    t0 = time.time()
    try:
        yield rec
    except Exception as exc:
        rec["passed"] = False
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        traceback.print_exc()
    rec["seconds"] = round(time.time() - t0, 1)
    emit("checks.jsonl", **rec)


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _bound(truth, baseline, dtype) -> float:
    return 2 * _max_err(baseline, truth) + torch.finfo(dtype).eps * truth.abs().max().item()


def check_attention(backend: str) -> None:
    """Our attention on ``backend`` (or PyTorch's: ``flex``, ``sdpa``) against the fp32 reference, each layout and
    dtype, forward and backward (the Hopper forward: forward only)."""
    from swift_kernels import frame_block_attention, plan_attention
    from swift_kernels.attention import reference

    name = "cuda" if backend == "cuda-sm90" else backend
    if backend == "cuda-sm90":
        os.environ["SWIFT_KERNELS_HOPPER"] = "1"
    dtypes = os.environ.get("DTYPES") or ("fp16" if DRY and backend == "triton" else "fp32" if DRY else "bf16,fp16")
    grads = [False] if backend == "cuda-sm90" or (backend == "flex" and not GPU) else [False, True]
    for case, layout in layouts().items():
        if (backend == "sdpa" and case != "window") or (backend == "flex" and case == "window"):
            continue  # SDPA serves dense plans, FlexAttention block-sparse ones (as the automatic choice does)
        plan = plan_attention(layout, device=DEV)
        for dt_name in dtypes.split(","):
            dtype = DTYPES[dt_name]
            for grad in grads:
                if not has_time(20):
                    emit("checks.jsonl", op="frame_block_attention", backend=backend, case=f"{case}-{dt_name}",
                         skipped="no time left in this step")
                    continue
                with check_case(op="frame_block_attention", backend=backend, tokens=layout.num_tokens, heads=H,
                                head_dim=D, dtype=dt_name, case=f"{case}-{dt_name}-{'fwd+bwd' if grad else 'fwd'}") as rec:
                    if backend == "cuda-sm90":
                        from swift_kernels.attention import cuda_backend

                        assert cuda_backend.forward_variant(DEV) == "cuda-sm90", "the Hopper forward is not selected"
                    gen = torch.Generator(device=DEV).manual_seed(int(time.time() * 1e6) % 2**31)
                    shape = (1, layout.num_tokens, H, D)
                    q, k, v, dout = (torch.randn(shape, generator=gen, device=DEV).to(dtype) for _ in range(4))
                    # the truth: the fp32 reference (block by block)
                    f32 = [t.float() for t in (q, k, v)]
                    t_out, t_lse = reference.forward(*f32, layout.block_mask, P, D**-0.5)
                    truths = [t_out]
                    if grad:
                        truths += list(reference.backward(dout.float(), *f32, t_out, t_lse, layout.block_mask, P, D**-0.5))
                    del f32, t_lse
                    # PyTorch's own low-precision computation of the same function
                    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
                    with torch.set_grad_enabled(grad):
                        b_out = gathered_sdpa(layout)(*leaves)
                        bases = [b_out.detach()] + (list(torch.autograd.grad(b_out, leaves, dout)) if grad else [])
                    del b_out, leaves
                    poison()
                    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
                    with torch.set_grad_enabled(grad):
                        out = frame_block_attention(*leaves, plan, backend=name)
                        gots = [out.detach()] + (list(torch.autograd.grad(out, leaves, dout)) if grad else [])
                    sync()
                    rec["errors"], rec["bounds"], ok = {}, {}, True
                    for tname, got, want, base in zip(("out", "dq", "dk", "dv"), gots, truths, bases):
                        err = _max_err(got, want)
                        bnd = _bound(want, base, dtype)
                        rec["errors"][tname], rec["bounds"][tname] = round(err, 6), round(bnd, 6)
                        ok &= bool(torch.isfinite(got).all()) and got.shape == q.shape and got.dtype == dtype and err <= bnd
                    rec["passed"] = ok
                if GPU:
                    torch.cuda.empty_cache()


def check_ops() -> None:
    """The Triton sampler and DiT ops against their PyTorch references at real sizes (bf16 and fp16)."""
    from swift_kernels import adaln_modulate, flow_step, gated_residual, qk_norm_rope, rope_table

    tol = {torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float16: dict(rtol=2e-3, atol=2e-3),
           torch.float32: dict(rtol=2e-5, atol=2e-5)}
    dtypes = ("fp16",) if DRY else ("bf16", "fp16")
    for dt_name in dtypes:
        dtype = DTYPES[dt_name]
        r = lambda *s, dt=dtype: torch.randn(*s, device=DEV).to(dt)  # noqa: E731
        x, y = r(1, L_DIT, C_DIT), r(1, L_DIT, C_DIT)
        e = r(1, 6, C_DIT, dt=torch.float32)
        sh, sc, gt = e[:, 0:1], e[:, 1:2], e[:, 2:3]
        heads = C_DIT // D
        grid = (4, L_DIT // (4 * 80), 80) if not DRY else (1, L_DIT // 8, 8)
        qkv = r(1, L_DIT, 3 * C_DIT)
        q, k = qkv[..., :C_DIT].view(1, L_DIT, heads, D), qkv[..., C_DIT:2 * C_DIT].view(1, L_DIT, heads, D)
        wq, wk = (1 + 0.3 * r(C_DIT, dt=torch.float32)).to(dtype), (1 + 0.3 * r(C_DIT, dt=torch.float32)).to(dtype)
        freqs = rope_table(grid, D, frame_positions=list(range(5, 5 + grid[0])), device=DEV)
        lat = (1, 48, LT, LH, LW)
        xs, vs, ref = r(*lat), r(*lat), r(*lat)
        cond = torch.zeros(LT, dtype=torch.bool, device=DEV)
        cond[0] = True
        cases = {
            "adaln_modulate": lambda b: adaln_modulate(x, sh, sc, backend=b),
            "gated_residual": lambda b: gated_residual(x, y, gt, shift=sh, scale=sc, backend=b),
            "qk_norm_rope": lambda b: qk_norm_rope(q, k, wq, wk, freqs, backend=b),
            "flow_step": lambda b: flow_step(xs, vs, 0.9375, 0.8333, mode="renoise", seed=7, offset=11, cond_mask=cond,
                                             ref=ref, return_x0=True, backend=b),
        }
        for op, fn in cases.items():
            with check_case(op=op, backend="triton", case=f"{op}-{dt_name}", dtype=dt_name) as rec:
                poison()
                got, want = fn("triton"), fn("torch")
                sync()
                got = [t for t in (got if isinstance(got, tuple) else (got,)) if t is not None]
                want = [t for t in (want if isinstance(want, tuple) else (want,)) if t is not None]
                rec["max_err"] = max(_max_err(a, b) for a, b in zip(got, want))
                ok = all(bool(torch.isfinite(a).all()) for a in got)
                for a, b in zip(got, want):
                    try:
                        torch.testing.assert_close(a.float(), b.float(), **tol[dtype])
                    except AssertionError as exc:
                        ok = False
                        rec["mismatch"] = str(exc)[:300]
                rec["passed"] = ok


# ---------------------------------------------------------------------------------------------------------------
# speed


def timed(fn, reps=10, warm=2):
    """(result, first call ms including compilation, median ms, min ms); CUDA events on a GPU."""
    if DRY:
        reps, warm = 1, 0
    t = time.time()
    r = fn()
    sync()
    first = 1e3 * (time.time() - t)
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        if GPU:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t))
    ts.sort()
    return r, first, ts[len(ts) // 2], ts[0]


def bench_gemm() -> None:
    dt = torch.bfloat16 if GPU else torch.float32
    a, b = (torch.randn(NG, NG, device=DEV).to(dt) for _ in range(2))  # random data, never zeros
    c = torch.empty_like(a)
    _, _, med, _ = timed(lambda: torch.matmul(a, b, out=c), reps=20, warm=3)
    emit("bench.jsonl", kind="gemm", shape=[NG] * 3, dtype=str(dt)[6:], median_ms=round(med, 3),
         tflops=round(2 * NG**3 / med / 1e9, 1))


def attention_impls(layout, plan, grad):
    """(name, role, fn) of every implementation to time on this layout."""
    from torch.nn.attention import SDPBackend

    from swift_kernels import frame_block_attention
    from swift_kernels._backend import backend_unavailable_reason

    def ours(backend, hopper=False):
        def run(q, k, v):
            os.environ["SWIFT_KERNELS_HOPPER"] = "1" if hopper else "0"
            return frame_block_attention(q, k, v, plan, backend=backend)
        return run

    if GPU:
        yield "sdpa-flash", "rival", gathered_sdpa(layout, SDPBackend.FLASH_ATTENTION)
        yield "sdpa-cudnn", "rival", gathered_sdpa(layout, SDPBackend.CUDNN_ATTENTION)
    else:
        yield "sdpa", "rival", gathered_sdpa(layout)
    if not plan.dense and (GPU or not grad):
        yield "flex", "rival", ours("flex")
    yield "auto", "default", ours(None)
    if backend_unavailable_reason("triton", DEV) is None:
        yield "triton", "ours", ours("triton")
    if os.environ.get("BENCH_CUDA") == "1" and backend_unavailable_reason("cuda", DEV) is None:
        yield "cuda", "ours", ours("cuda")
        if os.environ.get("BENCH_SM90") == "1" and not grad:
            yield "cuda-sm90", "ours", ours("cuda", hopper=True)


def bench_attention(grad: bool) -> None:
    from swift_kernels import plan_attention

    dtype = torch.bfloat16 if GPU else torch.float32  # fp32 on a CPU: the interpreter and FlexAttention take it
    for case, layout in bench_layouts(grad).items():
        plan = plan_attention(layout, device=DEV)
        gen = torch.Generator(device=DEV).manual_seed(0)
        shape = (1, layout.num_tokens, H, D)
        q, k, v, do = (torch.randn(shape, generator=gen, device=DEV).to(dtype) for _ in range(4))
        flops = 4.0 * H * D * plan.allowed_pairs * (3.5 if grad else 1.0)
        ref = ref_name = None
        for name, role, fn in attention_impls(layout, plan, grad):
            rec = dict(kind="attention", case=case, tokens=layout.num_tokens, heads=H, head_dim=D,
                       dtype=str(dtype)[6:], pass_="fwd+bwd" if grad else "fwd", impl=name, role=role)
            if not has_time(15):
                rec["skipped"] = "no time left in this step"
                emit("bench.jsonl", **rec)
                continue
            try:
                if grad:
                    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
                    run = lambda fn=fn, leaves=leaves: torch.autograd.grad(fn(*leaves), leaves, do)  # noqa: E731
                else:
                    run = lambda fn=fn: fn(q, k, v)  # noqa: E731
                with torch.set_grad_enabled(grad):
                    res, first, med, best = timed(run)
                res = res if grad else (res,)
                if ref is None:
                    ref, ref_name = [r.float() for r in res], name
                rec["ref"] = ref_name
                rec["max_err_vs_ref"] = max(_max_err(r, e) for r, e in zip(res, ref))
                rec.update(first_ms=round(first, 1), median_ms=round(med, 3), min_ms=round(best, 3),
                           tflops=round(flops / med / 1e9, 1))
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            emit("bench.jsonl", **rec)
        del q, k, v, do, ref
        if GPU:
            torch.cuda.empty_cache()


def bench_ops() -> None:
    from swift_kernels import adaln_modulate, flow_step, gated_residual, qk_norm_rope, rope_table
    from swift_kernels._backend import backend_unavailable_reason

    dt = torch.bfloat16 if GPU else torch.float16
    x = torch.randn(1 << NC, device=DEV).to(dt)
    y = torch.empty_like(x)
    _, _, med, _ = timed(lambda: y.copy_(x), reps=20)
    copy = 2 * x.numel() * x.element_size() / med / 1e6
    emit("bench.jsonl", kind="copy", gbps=round(copy, 1), bytes=2 * x.numel() * x.element_size())
    del x, y
    r = lambda *s, d=dt: torch.randn(*s, device=DEV).to(d)  # noqa: E731
    x, y = r(1, L_DIT, C_DIT), r(1, L_DIT, C_DIT)
    e = r(1, 6, C_DIT, d=torch.float32)
    sh, sc, gt = e[:, 0:1], e[:, 1:2], e[:, 2:3]
    qkv = r(1, L_DIT, 3 * C_DIT)
    heads = C_DIT // D
    q, k = qkv[..., :C_DIT].view(1, L_DIT, heads, D), qkv[..., C_DIT:2 * C_DIT].view(1, L_DIT, heads, D)
    wq, wk = r(C_DIT), r(C_DIT)
    grid = (4, L_DIT // (4 * 80), 80) if not DRY else (1, L_DIT // 8, 8)
    fr = rope_table(grid, D, frame_positions=list(range(5, 5 + grid[0])), device=DEV)
    lat = (1, 48, LT, LH, LW)
    xs, vs, ref = r(*lat), r(*lat), r(*lat)
    out = torch.empty((1, 96, *lat[2:]), device=DEV, dtype=dt)
    nb = lambda *t: sum(u.numel() * u.element_size() for u in t)  # noqa: E731 -- bytes read + written once each
    cases = [
        ("adaln_modulate", lambda b: adaln_modulate(x, sh, sc, backend=b), nb(x, sh, sc, x)),
        ("gated_residual+adaln", lambda b: gated_residual(x, y, gt, shift=sh, scale=sc, backend=b),
         nb(x, y, gt, sh, sc, x, x)),
        ("qk_norm_rope", lambda b: qk_norm_rope(q, k, wq, wk, fr, backend=b), nb(q, k, wq, wk, fr, q, k)),
        ("flow_step renoise+ref", lambda b: flow_step(xs, vs, 0.9375, 0.8333, mode="renoise", seed=1, ref=ref, out=out,
                                                      backend=b), nb(xs, vs, ref, out)),
    ]
    triton_ok = backend_unavailable_reason("triton", DEV) is None
    for name, fn, nbytes in cases:
        rec = dict(kind="op", op=name, bytes=nbytes)
        if not has_time(10):
            rec["skipped"] = "no time left in this step"
        else:
            try:
                if triton_ok:
                    _, first, med, _ = timed(lambda: fn("triton"), reps=20)
                    rec.update(first_ms=round(first, 1), median_ms=round(med, 4), gbps=round(nbytes / med / 1e6, 1),
                               share_of_copy=round(nbytes / med / 1e6 / copy, 3))
                _, _, emed, _ = timed(lambda: fn("torch"), reps=20)
                rec.update(reference_ms=round(emed, 4))
                if triton_ok:
                    rec["speedup_vs_reference"] = round(emed / med, 2)
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        emit("bench.jsonl", **rec)


def triton_kernel_report() -> None:
    """Registers, spills and shared memory of every Triton kernel this process compiled (GPU only)."""
    if not GPU:
        return
    import triton

    for modname in [m for m in list(sys.modules) if m.startswith("swift_kernels.") and m.endswith("triton_kernels")]:
        mod = sys.modules[modname]
        for name in dir(mod):
            fn = getattr(mod, name)
            if not isinstance(fn, triton.runtime.jit.JITFunction):
                continue
            for _, cache in getattr(fn, "device_caches", {}).items():
                for key, kern in cache[0].items():
                    try:
                        kern._init_handles()
                        emit("kernels.jsonl", kernel=name, n_regs=kern.n_regs, n_spills=kern.n_spills,
                             shared=kern.metadata.shared, warps=kern.metadata.num_warps,
                             stages=kern.metadata.num_stages, key=str(key)[:200])
                    except Exception as exc:
                        emit("kernels.jsonl", kernel=name, error=str(exc)[:200])


def bench_vae() -> None:
    """A 2K Wan2.2 VAE decode (random weights, bf16) of a few latent frames: seconds per latent frame."""
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as exc:
        emit("bench.jsonl", kind="vae", skipped=f"diffusers is not importable ({exc}); carry a diffusers wheel in "
                                                 "build/gpu-carry/")
        return
    # Wan2.2's VAE (diffusers' AutoencoderKLWan config of Wan-AI/Wan2.2-TI2V-5B-Diffusers); tiny in the dry run.
    if DRY:
        cfg = dict(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                   temperal_downsample=[False, True, True], is_residual=True, patch_size=2, scale_factor_spatial=16,
                   in_channels=12, out_channels=12)
    else:
        cfg = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                   temperal_downsample=[False, True, True], is_residual=True, patch_size=2, scale_factor_spatial=16,
                   in_channels=12, out_channels=12)
    dt = torch.bfloat16 if GPU else torch.float32
    torch.manual_seed(0)
    with torch.device(DEV):
        vae = AutoencoderKLWan(**cfg, latents_mean=[0.0] * 48, latents_std=[1.0] * 48).to(dt).eval()
    z = torch.randn(1, 48, VAE_T, LH, LW, device=DEV).to(dt)
    rec = dict(kind="vae", model="Wan2.2 VAE (random weights)", latent=list(z.shape), dtype=str(dt)[6:])
    try:
        with torch.no_grad():
            t = time.time()
            video = vae.decode(z).sample
            sync()
            first = time.time() - t
            rec.update(first_s=round(first, 2), frames=video.shape[2], height=video.shape[3], width=video.shape[4])
            if has_time(3 * first + 10):
                del video
                _, _, med, _ = timed(lambda: vae.decode(z).sample, reps=2, warm=0)
                rec.update(median_s=round(med / 1e3, 2), s_per_latent_frame=round(med / 1e3 / VAE_T, 3))
        if GPU:
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    except Exception as exc:
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    emit("bench.jsonl", **rec)


def check_memory() -> None:
    """The memory plan on the device (``benchmarks/gpu_memory_check.py``): the real Wan2.2-TI2V-5B Stage II at
    1280x704 under ``balanced`` and ``24gb``, latents bitwise equal, the reserved peak within 15% of the plan."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_memory_check.py")
    spec = importlib.util.spec_from_file_location("swift_gpu_memory_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.check_memory(check_case, DRY, DEV)


def bench_e2e() -> None:
    """The end-to-end benchmark (``benchmarks/e2e.py``) within the step's limit: the presets with random weights at
    2560x1408 and ``E2E_FRAMES`` frames (default 17: the check's budget has no room for 81), eager then compiled
    (``E2E_VARIANTS``); the tiny models, eager only, in the dry run. One line per variant in ``bench.jsonl`` as it
    finishes (seconds and achieved TFLOP/s per phase, the plan's FLOPs, the GEMM ceiling); a variant the step's
    time cannot hold is skipped by the benchmark itself, with its reason."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e.py")
    spec = importlib.util.spec_from_file_location("swift_e2e", path)
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    argv = ["--dry-run"] if DRY else ["--frames", os.environ.get("E2E_FRAMES", "17")]
    argv += ["--variants", os.environ.get("E2E_VARIANTS", "eager" if DRY else "eager,compiled")]

    def on_variant(name, results):
        emit("bench.jsonl", kind="e2e", variant=name, settings=results["settings"],
             gemm_tflops=results["gemm"]["tflops"], plan_flops=results["plan"]["flops"],
             plan_peak_bytes=results["plan"]["peak_bytes_estimate"],
             build_s=results.get("build_s"), **results["variants"][name])

    try:
        e2e.run(e2e.parse_args(argv), on_variant=on_variant)
    except Exception as exc:  # the plan, the ceiling or the build failed: no variant ran
        emit("bench.jsonl", kind="e2e", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        traceback.print_exc()


# ---------------------------------------------------------------------------------------------------------------
# summary


def _lines(name: str) -> list[dict]:
    path = out_path(name)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summary() -> dict:
    env = {}
    if os.path.exists(out_path("env.json")):
        with open(out_path("env.json"), encoding="utf-8") as f:
            env = json.load(f)
    checks: dict[str, dict] = {}
    for c in _lines("checks.jsonl"):
        entry = checks.setdefault(f"{c['op']}/{c['backend']}", {"passed": True, "cases": []})
        case = {k: c[k] for k in ("case", "passed", "errors", "bounds", "max_err", "error", "skipped", "seconds") if k in c}
        case["passed"] = bool(c.get("passed", False)) and "skipped" not in c
        entry["cases"].append(case)
        entry["passed"] = entry["passed"] and case["passed"]
    results = {
        "kind": "swift-i2v gpu check",
        "dry_run": bool(env.get("dry_run", DRY)),
        "date": env.get("date") or datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "budget_s": os.environ.get("BUDGET_S"),
        "device": env.get("device", {}),
        "versions": {"torch": env.get("torch"), "triton": (env.get("modules") or {}).get("triton"),
                     "cuda": env.get("cuda"), "cudnn": env.get("cudnn"), "python": env.get("python"),
                     "numpy": (env.get("modules") or {}).get("numpy")},
        "extension": env.get("extension"),
        "checks": checks,
        "steps": _lines("steps.jsonl"),
        "bench": _lines("bench.jsonl"),
        "kernels": _lines("kernels.jsonl"),
    }
    with open(out_path("results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    # the short table the reply shows
    for key, entry in sorted(checks.items()):
        bad = [c["case"] for c in entry["cases"] if not c["passed"]]
        print(f"{key:40s} {'PASS' if entry['passed'] else 'FAIL'} ({len(entry['cases'])} cases)"
              + (f"  failed/skipped: {', '.join(bad)}" if bad else ""))
    for r in results["bench"]:
        if r.get("kind") == "attention":
            print(f"{r['case']:7s} {r['pass_']:8s} {r['impl']:12s} " + (
                r.get("error") or r.get("skipped") or f"{r['median_ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s"))
        elif r.get("kind") == "e2e":
            rates = r.get("rates") or {}
            print(f"e2e {r.get('variant', '')} " + (r.get("error") or r.get("reason") or ", ".join(
                f"{k} {v['seconds']:.1f} s" + (f" {v['tflops']:.0f} TFLOP/s" if "tflops" in v else "")
                for k, v in rates.items())))
        elif r.get("kind") == "op":
            print(f"{r['op']:24s} " + (r.get("error") or r.get("skipped") or
                                       f"{r.get('gbps', '-')} GB/s, {r.get('share_of_copy', '-')} of copy"))
        else:
            print(json.dumps(r))
    return results


STEPS = {
    "env": step_env,
    "attention": lambda arg: [check_attention(b) for b in arg.split(",")],
    "ops": check_ops,
    "bench-fwd": lambda: (bench_gemm(), bench_attention(False)),
    "bench-bwd": lambda: bench_attention(True),
    "bench-ops": bench_ops,
    "vae": bench_vae,
    "memory": check_memory,
    "e2e": bench_e2e,
    "summary": summary,
}


def main(argv) -> int:
    if not argv or argv[0] not in STEPS:
        print(__doc__)
        return 2
    step = STEPS[argv[0]]
    try:
        step(*argv[1:2]) if argv[0] == "attention" else step()
    finally:
        if argv[0].startswith("bench"):
            try:
                triton_kernel_report()
            except Exception:
                traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
