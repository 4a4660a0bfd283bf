"""The end-to-end benchmark: the whole generation at real size with random weights, seconds and achieved TFLOP/s
per phase beside a measured bf16 GEMM ceiling, eager and compiled, in one JSON.

    python benchmarks/e2e.py                          # on a GPU: 2560x1408x81, presets, --memory auto
    python benchmarks/e2e.py --frames 17 --out r.json # a shorter clip (the GPU check runs this within its budget)
    python benchmarks/e2e.py --dry-run                # on a CPU: the tiny models (a minute, most of it compiling)

What runs: the presets' architectures (Wan2.1-I2V-14B Stage I with its CLIP image encoder, Wan2.2-TI2V-5B Stage
II, both Wan VAEs; ``ModelSpec.preset``) built straight on the device with random weights (a run's time does not
depend on the weights' values; matrices drawn ~ N(0, 1/fan_in) so activations stay O(1)), from random prompt
embeddings of the real shape (no text encoder: the method's work does not count it), 4 steps each. Per variant
(``eager``, then ``compiled``: ``SwiftI2VPipeline(..., compile=True)`` on the same models, skipped with a
recorded reason where the pipeline does not take ``compile``), one cold run (Triton and cuDNN autotuning,
compilation) and one timed run. Each phase's achieved rate is the plan's FLOPs for it
(:func:`swift_model.planning.planner.plan_generation` at the same size and profile, on fake tensors) over its
measured seconds (``GenerationResult.seconds``: wall clock with a device synchronisation after each phase), beside
an 8192^3 bf16 matrix product timed with CUDA events.

Memory: ``--memory auto`` (the default) takes ``fast`` (every model on the GPU for the whole run, so no weight copy
counts in a timed phase) where the plan's estimated peak of the run is at most :data:`FAST_SHARE` of the device's
memory, else ``balanced`` (the DiTs move between the phases, and their copies count in the phases' seconds). The
weights are about 40 GB in bf16 (14B + 5B, CLIP, both VAEs): an 80 GB H100 holds ``fast``. The choice and its
reason are in ``settings``, the estimated peak in ``plan``, the measured one in each variant.

The JSON (``--out``; always printed last): ``kind``, ``dry_run``, ``date``, ``device``, ``versions``,
``settings``, ``plan`` (FLOPs per phase, the estimated peak), ``gemm`` (the ceiling), ``variants`` (per variant:
``status``, ``first_run_s``, ``seconds``, ``rates`` per phase with ``tflops`` and ``share_of_ceiling``,
``peak_memory_bytes``, ``latents_finite``; or ``skipped``/``error``), ``method_work`` (the method's own work and
its seconds at the measured ceiling, at the size it is counted at) and ``unmeasured``.

``--dry-run`` runs every part on the tiny models at 128x64x9 on the CPU (fp32; no CUDA events): it checks the
plumbing and measures nothing. A time limit (``--time-limit``, or the ``DEADLINE`` the GPU check sets) skips, with
the reason recorded, any run that would not finish before it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import math
import os
import platform
import sys
import time

import torch

KIND = "swift-i2v e2e benchmark"
VARIANTS = ("eager", "compiled")
NO_GPU = "no CUDA GPU visible: run with --dry-run on a CPU"
# --memory auto takes "fast" where its estimated peak is at most this share of the device's memory: the estimate
# leaves out the CUDA context, library workspaces and fragmentation, and is held to within 15% of the measured peak
# (the GPU check's t-mem step)
FAST_SHARE = 0.85
# what a compiled variant is given beyond the eager run's cold time before it starts: compilation of both DiTs'
# blocks (estimates, not measurements)
COMPILE_ALLOWANCE_S = {True: 20.0, False: 180.0}  # keyed by dry_run


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module's docstring)."""
    ap = argparse.ArgumentParser(prog="python benchmarks/e2e.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the tiny models at 128x64x9 on the CPU (plumbing only)")
    ap.add_argument("--frames", type=int, default=None, help="output frames, 4k+1 (default 81; dry run 9)")
    ap.add_argument("--width", type=int, default=None, help="default 2560 (dry run 128)")
    ap.add_argument("--height", type=int, default=None, help="default 1408 (dry run 64)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--memory", default="auto", choices=("auto", "fast", "balanced", "24gb"),
                    help="the memory profile (default auto: fast where its estimated peak fits the device, else "
                    "balanced)")
    ap.add_argument("--stage2-kind", default="refine", choices=("refine", "swift"))
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated among eager, compiled (default both)")
    ap.add_argument("--gemm-n", type=int, default=None, help="the ceiling's square matrix size (default 8192; dry 256)")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds from the start after which no run starts "
                    "that would not finish (default: the DEADLINE environment variable, else none)")
    ap.add_argument("--out", default=None, help="write the JSON here (rewritten after every part)")
    args = ap.parse_args(argv)
    defaults = (9, 128, 64, 256) if args.dry_run else (81, 2560, 1408, 8192)
    for name, value in zip(("frames", "width", "height", "gemm_n"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        ap.error(f"--variants must name some of {', '.join(VARIANTS)}, got {args.variants!r}")
    # eager first: compiling changes the shared models in place (their blocks run the compiled block after it)
    args.variants = [v for v in VARIANTS if v in variants]
    if args.gemm_n < 16:
        ap.error(f"--gemm-n must be at least 16, got {args.gemm_n}")
    return args


class Clock:
    """The benchmark's time limit: an absolute deadline (or none)."""

    def __init__(self, time_limit: float | None) -> None:
        env = os.environ.get("DEADLINE")
        self.deadline = time.time() + time_limit if time_limit is not None else (float(env) if env else None)

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.time()

    def allows(self, seconds: float) -> bool:
        return self.left() > seconds


# -------------------------------------------------------------------------------------------------------------
# the parts
# -------------------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    """The device and the versions the numbers were measured with."""
    dev = dict(type=device.type)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_bytes=props.total_memory)
    else:
        dev.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    versions = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version())
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    return dict(device=dev, versions=versions)


def gemm_ceiling(device: torch.device, n: int, reps: int = 20, warm: int = 3) -> dict:
    """The rate of an ``n``^3 matrix product on ``device`` (bf16 on a GPU, timed with CUDA events; fp32 on a CPU,
    timed with the host clock): the median of ``reps`` runs after ``warm`` untimed ones."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen, device=device).to(dtype) for _ in range(2))  # random data, never zeros
    c = torch.empty_like(a)
    for _ in range(warm):
        torch.matmul(a, b, out=c)
    times = []
    for _ in range(reps):
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=c)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            torch.matmul(a, b, out=c)
            times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    return dict(n=n, dtype=str(dtype).replace("torch.", ""), reps=reps, median_s=median,
                timer="cuda events" if gpu else "host clock", tflops=2.0 * n**3 / median / 1e12)


def random_storage(device: torch.device):
    """A ``materialize(module, dtype)`` for :meth:`ModelSpec.build <swift_model.nets.spec.ModelSpec.build>`: a meta
    module gets storage on ``device`` (``dtype``: cast its floating-point tensors) and random values drawn there
    (a 14B model is ready in seconds on a GPU): matrices and convolutions ~ N(0, 1/fan_in), norm scales (1-d
    weights, the VAE's ``gamma``) 1, other vectors 0, integer buffers (CLIP's position ids) the positions 0..n-1
    and float buffers 0."""
    def materialize(module: torch.nn.Module, dtype):
        module.to_empty(device=device)
        if dtype is not None:
            module.to(dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for name, p in module.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf == "gamma" or (p.dim() == 1 and leaf == "weight"):  # norms' scales (the VAE's: gamma)
                    p.fill_(1.0)
                elif p.dim() >= 2:
                    p.normal_(0.0, float(p[0].numel()) ** -0.5, generator=gen)
                else:
                    p.zero_()
            for _, b in module.named_buffers():
                if b.is_floating_point():
                    b.zero_()
                elif b.dim() >= 1:
                    b.copy_(torch.arange(b.shape[-1], device=device).expand_as(b))
        return module.eval().requires_grad_(False)

    return materialize


def spec_of(args):
    """The architectures: the presets (no text encoder), or the tiny models in a dry run."""
    from swift_model.nets.spec import ModelSpec

    spec = ModelSpec.tiny(args.stage2_kind) if args.dry_run else ModelSpec.preset(stage2_kind=args.stage2_kind,
                                                                                  text_encoder=False)
    return dataclasses.replace(spec, text_encoder=None)


def request_of(args, spec):
    """The request both the plan and the runs take: a random picture, random prompt embeddings of the real
    shape (the context length and width of Stage I's text input)."""
    import numpy as np
    from PIL import Image

    from swift_model.generation.request import GenerationRequest

    pixels = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    embeds = torch.randn(1, spec.stage1.text_len, spec.stage1.text_dim, generator=torch.Generator().manual_seed(0))
    return GenerationRequest(image=Image.fromarray(pixels), prompt_embeds=embeds, frames=args.frames,
                             width=args.width, height=args.height, steps=args.steps)


def plan_of(spec, request, memory: str, device: torch.device, dtype, vae_dtype) -> dict:
    """The plan of the same run (an estimate on fake tensors): FLOPs and estimated peak per phase."""
    from swift_model.planning.planner import plan_generation

    t0 = time.perf_counter()
    result = plan_generation(spec, request, memory=memory, device=device.type, dtype=dtype, vae_dtype=vae_dtype)
    return dict(profile=result.profile, flops={k: v["flops"] for k, v in result.phases.items()},
                flops_total=result.flops, peak_bytes_estimate=result.peak_bytes,
                peak_bytes_by_phase={k: v["peak_bytes"] for k, v in result.phases.items()},
                seconds_to_plan=round(time.perf_counter() - t0, 2))


def choose_plan(spec, request, memory: str, device: torch.device, dtype, vae_dtype,
                device_bytes: int | None) -> tuple[dict, str]:
    """The plan of the run and why its profile: ``memory`` as asked, or for ``"auto"`` ``fast`` where its estimated
    peak is at most :data:`FAST_SHARE` of ``device_bytes`` (``None``: a CPU, whose memory the plan does not model),
    else ``balanced``."""
    if memory != "auto":
        return plan_of(spec, request, memory, device, dtype, vae_dtype), "asked for"
    plan = plan_of(spec, request, "fast", device, dtype, vae_dtype)
    peak = plan["peak_bytes_estimate"] / 2**30
    if device_bytes is None:
        return plan, "auto: fast (no device memory to fit)"
    if plan["peak_bytes_estimate"] <= FAST_SHARE * device_bytes:
        return plan, f"auto: fast's estimated peak {peak:.1f} GiB is within {FAST_SHARE:.0%} of the device's " \
                     f"{device_bytes / 2**30:.1f} GiB"
    return (plan_of(spec, request, "balanced", device, dtype, vae_dtype),
            f"auto: balanced, as fast's estimated peak {peak:.1f} GiB is over {FAST_SHARE:.0%} of the device's "
            f"{device_bytes / 2**30:.1f} GiB")


def compile_unsupported_reason() -> str | None:
    """Why the compiled variant cannot run in this tree (``None`` when ``SwiftI2VPipeline`` takes ``compile``)."""
    from swift_model.generation.pipeline import SwiftI2VPipeline

    if "compile" not in inspect.signature(SwiftI2VPipeline.__init__).parameters:
        return "SwiftI2VPipeline does not take compile= in this version of the package"
    return None


def make_pipeline(models, stage2_kind: str, memory: str, device: torch.device, compiled: bool):
    """A pipeline over ``models`` (the same modules for both variants: the weights exist once)."""
    from swift_model.generation.pipeline import SwiftI2VPipeline

    extra = dict(compile=True) if compiled else {}
    return SwiftI2VPipeline(models.stage1, models.stage2, models.vae1, models.vae2, None, models.image_encoder,
                            stage2_kind=stage2_kind, device=device, memory=memory, random_weights=True, **extra)


# -------------------------------------------------------------------------------------------------------------
# one variant
# -------------------------------------------------------------------------------------------------------------


def phase_seconds(seconds: dict) -> dict:
    """``GenerationResult.seconds`` keyed by phase name (``text_encoding``, ...; ``total``), other keys kept."""
    from swift_model.generation.pipeline import SECONDS_KEYS

    by_key = {v: k for k, v in SECONDS_KEYS.items()}
    return {by_key.get(k, k): float(v) for k, v in seconds.items()}


def _one_run(pipe, request, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = pipe.generate(request=request, progress=False)
    wall = time.perf_counter() - t0
    out = dict(wall_s=wall, seconds=phase_seconds(result.seconds), peak_memory_bytes=int(result.peak_memory_bytes),
               latents_finite=bool(torch.isfinite(result.latents).all()),
               frames_shape=None if result.frames is None else list(result.frames.shape),
               compile=result.info.get("compile"))
    del result
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run_variant(name: str, pipe, request, device, plan: dict, ceiling_tflops: float, clock: Clock,
                timed_estimate_s: float | None = None) -> dict:
    """A cold run then a timed run of ``pipe``; the timed run's seconds and achieved rates per phase.

    The timed run is skipped (its reason recorded; the cold run's figures kept) when ``clock`` has not time for
    it (its estimate: the cold run's time, or ``timed_estimate_s``, whichever is smaller, plus a fifth)."""
    from swift_model.planning.performance import phase_rates

    rec: dict = dict(status="ok")
    cold = _one_run(pipe, request, device)
    rec.update(first_run_s=cold["wall_s"], first_run_seconds=cold["seconds"], first_run_compile=cold["compile"])
    need = 1.2 * min(cold["wall_s"], timed_estimate_s or math.inf)
    if clock.allows(need):
        run, rec["timed"] = _one_run(pipe, request, device), True
    else:
        run, rec["timed"] = cold, False
        rec["timed_skipped"] = f"no time left for a timed run (~{need:.0f} s needed, {clock.left():.0f} s left): " \
                               "the figures are the cold run's"
    rec.update(wall_s=run["wall_s"], seconds=run["seconds"], peak_memory_bytes=run["peak_memory_bytes"],
               peak_memory_gib=run["peak_memory_bytes"] / 2**30, latents_finite=run["latents_finite"],
               frames_shape=run["frames_shape"], compile=run["compile"])
    rec["rates"] = phase_rates(plan["flops"], run["seconds"], ceiling_tflops)
    # the measured peak beside the plan's estimate of the same run (device memory: a GPU only)
    if device.type == "cuda":
        rec["peak_over_estimate"] = run["peak_memory_bytes"] / plan["peak_bytes_estimate"]
    print(f"[e2e] {name}: " + ", ".join(f"{k} {v['seconds']:.2f} s" + (f" {v['tflops']:.1f} TFLOP/s" if "tflops" in v
                                                                       else "") for k, v in rec["rates"].items()),
          flush=True)
    return rec


# -------------------------------------------------------------------------------------------------------------
# the whole benchmark
# -------------------------------------------------------------------------------------------------------------


def _write(results: dict, path: str | None) -> None:
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, path)


def _method_work(args, ceiling_tflops: float) -> dict:
    """The method's own work and its seconds at the measured ceiling, where the run is at the size it is counted
    at; otherwise why not."""
    from swift_model.planning.performance import METHOD_WORK, WORK_SIZE, floor_seconds, method_work_flops

    at_size = not args.dry_run and all(getattr(args, k) == v for k, v in WORK_SIZE.items())
    rec = dict(counted_at=WORK_SIZE, items_pflop={k: v for k, _, v in METHOD_WORK})
    if at_size:
        rec.update(flops=method_work_flops(), seconds_at_ceiling=floor_seconds(ceiling_tflops))
    else:
        rec["not_compared"] = "this run is not at the size the method's work is counted at"
    return rec


def _variant_gate(name: str, args, clock: Clock, eager: dict | None) -> str | None:
    """Why variant ``name`` does not run (``None``: it runs)."""
    if name == "compiled":
        reason = compile_unsupported_reason()
        if reason:
            return reason
        if eager and eager.get("status") == "ok":
            need = 2 * eager["first_run_s"] + COMPILE_ALLOWANCE_S[args.dry_run]
            if not clock.allows(need):
                return (f"not enough time left (~{need:.0f} s needed: two runs and compilation; "
                        f"{clock.left():.0f} s left)")
    return None


def _header(args, spec, device: torch.device, dtype, vae_dtype, profile: str, memory_choice: str) -> dict:
    """The JSON's fields that say what runs where."""
    return dict(kind=KIND, schema=1, dry_run=bool(args.dry_run),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **environment(device),
                settings=dict(frames=args.frames, width=args.width, height=args.height, steps=args.steps,
                              memory=profile, memory_choice=memory_choice, stage1=spec.stage1.name,
                              stage2=spec.stage2.name, stage2_kind=args.stage2_kind,
                              dtype=str(dtype).replace("torch.", ""), vae_dtype=str(vae_dtype).replace("torch.", ""),
                              text_encoder=None, weights="random"),
                unmeasured=["real weights (random weights: the same shapes and FLOPs)",
                            "the text encoder (random prompt embeddings of the real shape)",
                            "writing the mp4 (the frames stay in memory)"])


def run(args, on_variant=None) -> dict:
    """The benchmark of ``args`` (:func:`parse_args`): every part, the JSON rewritten after each;
    ``on_variant(name, results)`` is called as each variant's record is known (run, skipped or failed)."""
    from swift_model.nets.vae import parse_dtype

    clock = Clock(args.time_limit)
    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        raise RuntimeError(NO_GPU)
    device = torch.device("cuda") if gpu else torch.device("cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    vae_dtype = parse_dtype("bf16" if gpu else "fp32")
    spec = spec_of(args)
    request = request_of(args, spec)
    device_bytes = torch.cuda.get_device_properties(device).total_memory if gpu else None
    plan, memory_choice = choose_plan(spec, request, args.memory, device, dtype, vae_dtype, device_bytes)
    profile = plan["profile"]  # the pipelines run the profile planned
    results = _header(args, spec, device, dtype, vae_dtype, profile, memory_choice)
    results["plan"] = plan
    _write(results, args.out)
    results["gemm"] = gemm_ceiling(device, args.gemm_n, reps=3 if args.dry_run else 20, warm=1 if args.dry_run else 3)
    ceiling = results["gemm"]["tflops"]
    results["method_work"] = _method_work(args, ceiling)
    t0 = time.perf_counter()
    models = spec.build(dtype=dtype, vae_dtype=vae_dtype, materialize=random_storage(device))
    if gpu:
        torch.cuda.synchronize()
    results["build_s"] = time.perf_counter() - t0
    results["variants"] = variants = {}
    _write(results, args.out)
    for name in args.variants:
        reason = _variant_gate(name, args, clock, variants.get("eager"))
        if reason:
            variants[name] = dict(status="skipped", reason=reason)
            print(f"[e2e] {name}: skipped: {reason}", flush=True)
        else:
            try:
                pipe = make_pipeline(models, args.stage2_kind, profile, device, compiled=name == "compiled")
                variants[name] = run_variant(name, pipe, request, device, plan, ceiling, clock,
                                             timed_estimate_s=variants.get("eager", {}).get("wall_s"))
            except Exception as exc:  # one variant's failure is its record; the other still runs
                variants[name] = dict(status="error", error=f"{type(exc).__name__}: {str(exc)[:500]}")
                print(f"[e2e] {name}: error: {type(exc).__name__}: {exc}", flush=True)
            finally:
                pipe = None
        _write(results, args.out)
        if on_variant is not None:
            on_variant(name, results)
    return results


def main(argv=None) -> int:
    """Run the benchmark; print the JSON last."""
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"error: {NO_GPU}", file=sys.stderr)
        return 2
    results = run(args)
    _write(results, args.out)
    print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's packages
    sys.exit(main())
