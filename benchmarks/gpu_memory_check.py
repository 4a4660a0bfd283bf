"""The GPU check's memory step (``benchmarks/gpu_check.py memory``): the memory plan verified on the device, early in
the check, where the other steps cannot crowd it out.

The real Wan2.2-TI2V-5B architecture as Stage II (random weights; a small Stage I with the 5B's text width, no
text encoder: prompt embeddings of zeros) generates ``MEMORY_FRAMES`` frames (default 33) at 1280x704, the
whole pipeline, once under ``balanced`` (every DiT resident in its phase) and once under ``24gb`` (the DiTs' blocks
streamed from host memory: pinned buffers, a side stream, events), with the same token chunk, so the one difference
is where the weights live. Checked:

- the two runs' Stage II latents are **bitwise equal** (streaming moves weights, it must not change a result);
- each phase's ``torch.cuda.max_memory_reserved`` (the allocator's cache emptied before it) is within
  ``MEMORY_TOLERANCE`` (15%) of ``swift-i2v plan``'s estimate of that phase, for every phase planned at 1 GiB or
  more: the bridge and the decode (the 2K VAE passes), and Stage II, 10 GiB resident under ``balanced`` and
  1.5 GiB streamed under ``24gb`` (estimates). The estimate counts allocations; the reserve adds the caching
  allocator's rounding and fragmentation, which the tolerance must hold.

One ``checks.jsonl`` line per check (op ``memory``). The dry run (a CPU) runs the tiny models and checks the
equality only: a CPU has no caching allocator to compare with.
"""

from __future__ import annotations

import os
import time

import torch

from swift_model.generation.memory import PHASES

MEMORY_TOLERANCE = 0.15
PROFILES = ("balanced", "24gb")
TOKEN_CHUNK = 4096  # 24gb's own: balanced runs with it too, so the profiles differ only in where weights live
CHECKED_FROM = 1 << 30  # phases planned at 1 GiB or more are compared with the device


def spec_and_request(dry: bool):
    """The models and the request of the step (tiny on a dry run)."""
    from swift_model.generation.request import GenerationRequest
    from swift_model.nets.config import WanDiTConfig
    from swift_model.nets.encoders import tiny_clip_config
    from swift_model.nets.spec import ModelSpec, stage2_config
    from swift_model.nets.vae import public_config

    if dry:
        spec = ModelSpec.tiny("refine")
        size = dict(frames=9, width=128, height=64)
    else:
        # Stage II at its real size; Stage I small (its own memory is another phase's), with the text width of
        # the 5B so that one set of prompt embeddings serves both
        five_b = WanDiTConfig.preset("wan2.2-ti2v-5b")
        stage1 = WanDiTConfig.preset("tiny-i2v", text_dim=five_b.text_dim)
        spec = ModelSpec(stage1, stage2_config(five_b, "refine"), public_config(stage1.out_channels),
                         public_config(five_b.out_channels), None,
                         tiny_clip_config(stage1.image_dim) if stage1.image_dim else None, "refine")
        size = dict(frames=int(os.environ.get("MEMORY_FRAMES", "33")), width=1280, height=704)
    from PIL import Image

    embeds = torch.zeros(1, spec.stage1.text_len, spec.stage1.text_dim)
    request = GenerationRequest(image=Image.new("RGB", (size["width"], size["height"]), (90, 120, 150)),
                                prompt_embeds=embeds, seed=0, **size)
    return spec, request


def random_weights(device: torch.device):
    """A ``materialize`` for ``ModelSpec.build``: each module's storage made on ``device`` with the same random
    numbers for the same module in every build (a generator per module, seeded by its build order)."""
    count = [0]

    def materialize(module: torch.nn.Module, dtype):
        module.to_empty(device=device)
        if dtype is not None:
            module.to(dtype)
        g = torch.Generator(device).manual_seed(1000 + count[0])
        count[0] += 1
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02))
            for b in module.buffers():
                b.zero_()
        return module.eval().requires_grad_(False)

    return materialize


def run_profile(spec, request, profile: str, device: torch.device, dtype: torch.dtype) -> dict:
    """One generation under ``profile``, phase by phase as ``generate`` runs them: the Stage II latents, each
    phase's reserved and allocated peaks (the allocator's cache emptied before each phase, so a phase's reserve is
    its own), and the seconds."""
    from swift_model.generation.memory import MemoryPlan
    from swift_model.generation.pipeline import GenerationState, SwiftI2VPipeline

    plan = MemoryPlan(profile, token_chunk=TOKEN_CHUNK)
    pipe = SwiftI2VPipeline.from_spec(spec, device=device, memory=plan, dtype=dtype,
                                      vae_dtype="bf16" if device.type == "cuda" else "fp32",
                                      materialize=random_weights(device))
    cuda = device.type == "cuda"
    run, state = pipe.prepare(request), GenerationState()
    reserved, allocated = {}, {}
    t0 = time.time()
    for name in PHASES:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        pipe.run_phase(name, run, state)
        if cuda:
            torch.cuda.synchronize()
            reserved[name] = torch.cuda.max_memory_reserved(device)
            allocated[name] = torch.cuda.max_memory_allocated(device)
    out = dict(latents=state.stage2_latents.cpu(), seconds=round(time.time() - t0, 1), reserved=reserved,
               allocated=allocated)
    del pipe, state, run
    if cuda:
        torch.cuda.empty_cache()
    return out


def estimate(spec, request, profile: str, dtype: torch.dtype) -> dict:
    """``swift-i2v plan``'s device peak of each phase of the same run (fake tensors)."""
    from swift_model.generation.memory import MemoryPlan
    from swift_model.planning.planner import plan_generation

    settings = request.replace(image=None, prompt_embeds=None)
    result = plan_generation(spec, settings, memory=MemoryPlan(profile, token_chunk=TOKEN_CHUNK), dtype=dtype,
                             vae_dtype=torch.bfloat16)
    return {name: figures["peak_bytes"] for name, figures in result.phases.items()}


def check_memory(check_case, dry: bool, device: torch.device) -> None:
    """The step: both profiles, then the checks (``check_case``: gpu_check's record context)."""
    spec, request = spec_and_request(dry)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    runs = {}
    for profile in PROFILES:
        with check_case(op="memory", backend=profile, case="run") as rec:
            runs[profile] = run_profile(spec, request, profile, device, dtype)
            rec.update(passed=True, seconds_run=runs[profile]["seconds"])
    if len(runs) == len(PROFILES):
        with check_case(op="memory", backend="streamed", case="latents bitwise 24gb vs balanced") as rec:
            a, b = (runs[p]["latents"] for p in PROFILES)
            rec["max_err"] = float((a.double() - b.double()).abs().max())
            rec["passed"] = bool(torch.equal(a, b))
    for profile, run in runs.items():
        if not run["reserved"]:
            continue
        planned = estimate(spec, request, profile, dtype)
        for name in PHASES:
            if planned.get(name, 0) < CHECKED_FROM:
                continue  # a phase of a few hundred MB: the CUDA context's own allocations would decide the ratio
            with check_case(op="memory", backend=profile, case=f"{name} reserved vs plan") as rec:
                ratio = run["reserved"][name] / planned[name]
                rec.update(reserved_gib=round(run["reserved"][name] / 2**30, 2),
                           allocated_gib=round(run["allocated"][name] / 2**30, 2),
                           planned_gib=round(planned[name] / 2**30, 2), ratio=round(ratio, 3),
                           passed=abs(ratio - 1) <= MEMORY_TOLERANCE)
