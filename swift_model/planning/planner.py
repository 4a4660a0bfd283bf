"""A memory and FLOP estimate of a generation that needs no GPU (planning layer): ``swift-i2v plan``.

:func:`plan_generation` builds the pipeline's models at their real size on fake tensors
(``torch._subclasses.FakeTensorMode``: shapes, dtypes and devices, no data), on a fake ``cuda`` device, and
runs the pipeline's own phase methods (:meth:`SwiftI2VPipeline.run_phase
<swift_model.generation.pipeline.SwiftI2VPipeline.run_phase>`, the sequence ``generate`` runs) on a request
prepared by the pipeline itself: the same :class:`~swift_model.generation.residency.Residency` moves the weights
as the :class:`~swift_model.generation.memory.MemoryPlan` says, the same Stage I loop, bridge, CSG loop and VAE
decoder run. The run is observed, not rewritten: its seams are the planner's own dispatch and function modes
(:mod:`swift_model.planning.tracker`: live storage, FLOPs, SDPA as a GPU runs it), the forward of the planner's
own model instances (:class:`~swift_model.planning.tracker.Replay`), and, for one rank of several, a fake process
group and a model of FSDP2's shards (:mod:`swift_model.planning.ranks`). Per phase it reports:

- ``peak_bytes``: the most device bytes alive at once (weights, activations, caches);
- ``flops``: ``torch.utils.flop_counter.FlopCounterMode``'s count (our attention op counts allowed token pairs
  only);
- ``h2d_bytes``: bytes copied to the device: weights brought in by the plan, blocks streamed by ``24gb``;
- ``host_peak_bytes``: the most host bytes alive at once, pageable and page-locked alike (weights kept in host
  memory, the streamers' packed blocks and staging buffers, which are page-locked at their exact size, and the
  phase's host work: the decode's blended frames). Pages of weight files read through a memory map are the
  operating system's page cache, not resident memory of the run: ``mapped_bytes`` counts the bytes read that way
  (a ``24gb`` Stage I's blocks, each use);

and for the run: ``host_load_bytes``, the host memory the loader fills before the first phase (every weight it
reads to the CPU), and ``host_peak_bytes``, the larger of that and every phase's (models are built on the planner's
side as :func:`~swift_model.planning.host.as_loaded` says a loader leaves them).

Everything here is an **estimate**: the caching allocator's fragmentation, the CUDA context, library workspaces
(cuBLAS, cuDNN), the Python process itself (the interpreter, PyTorch's and CUDA's libraries: about 1-3 GiB of
host memory) and the loader's one-tensor transients are not counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from ..generation.distributed import Parallelism, check_pipeline, memory_plan, resolve_degrees
from ..generation.memory import PHASES, MemoryPlan
from ..generation.pipeline import Conditioning, GenerationState, SwiftI2VPipeline
from ..generation.request import GenerationRequest
from ..nets.dit import WanDiT
from ..nets.spec import ModelSpec
from ..nets.vae import default_dtype as default_vae_dtype
from ..nets.vae import parse_dtype as parse_vae_dtype
from .host import as_loaded, loaded_host_bytes
from .ranks import ShardedBlocksModel, fake_process_group
from .tracker import Counters, GpuAttentionMode, Replay

__all__ = ["PlanResult", "measure_on_device", "plan_generation"]


@dataclasses.dataclass
class PlanResult:
    """What :func:`plan_generation` estimates (every number is an estimate)."""

    profile: str
    phases: dict  # phase -> {"peak_bytes", "flops", "h2d_bytes", "host_peak_bytes", "mapped_bytes"}
    info: dict
    # the layout of the ranks; with several, every figure is rank 0's (see planning.ranks)
    parallel: dict = dataclasses.field(default_factory=lambda: dict(world_size=1, ulysses=1, cfg_parallel=False,
                                                                    fsdp=False))

    @property
    def peak_bytes(self) -> int:
        return max(p["peak_bytes"] for p in self.phases.values())

    @property
    def flops(self) -> int:
        return sum(p["flops"] for p in self.phases.values())

    @property
    def host_peak_bytes(self) -> int:
        """The most host bytes alive at once over the loading and the phases planned."""
        return max(self.info.get("host_load_bytes", 0), *(p["host_peak_bytes"] for p in self.phases.values()))

    def to_json(self) -> dict:
        """``{"profile", "phases": {name: {"peak_bytes", "flops", "h2d_bytes", "host_peak_bytes", "mapped_bytes"}},
        "peak_bytes", "flops", "host_peak_bytes", "host_load_bytes", "world_size", "parallel": {...}}`` (figures per
        rank: rank 0's; host figures per process). ``parallel`` names the degrees as
        ``generate --report`` does (``world_size``, ``ulysses_degree``, ``cfg_degree``, ``data_parallel_degree``,
        ``fsdp``), and keeps the earlier ``ulysses`` and ``cfg_parallel``."""
        par = self.parallel
        cfg = 2 if par["cfg_parallel"] else 1
        degrees = dict(world_size=par["world_size"], ulysses_degree=par["ulysses"], cfg_degree=cfg,
                       data_parallel_degree=par["world_size"] // (par["ulysses"] * cfg), fsdp=par["fsdp"])
        return dict(profile=self.profile, phases={k: dict(v) for k, v in self.phases.items()},
                    peak_bytes=self.peak_bytes, flops=self.flops, host_peak_bytes=self.host_peak_bytes,
                    host_load_bytes=self.info.get("host_load_bytes", 0), world_size=par["world_size"],
                    parallel=dict(degrees, ulysses=par["ulysses"], cfg_parallel=par["cfg_parallel"]))


# -------------------------------------------------------------------------------------------------------------
# the models, at their real size, without weights
# -------------------------------------------------------------------------------------------------------------


def _fake_storage(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """A fake CPU tensor for every meta parameter and buffer of ``module`` (call inside the fake mode; ``to_empty``
    would try to swap the tensors), a tied parameter one tensor as in the real model; floating-point ones cast to
    ``dtype`` when given. Assigning a registered
    parameter or buffer's name replaces it in place (a buffer keeps its persistence)."""
    made: dict[int, torch.nn.Parameter] = {}  # tied parameters (UMT5's shared embedding) stay one tensor
    for mod in module.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in made:
                target = dtype if dtype is not None and p.is_floating_point() else p.dtype
                made[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=target, device="cpu"),
                                                 requires_grad=False)
            setattr(mod, name, made[id(p)])
        for name, b in list(mod.named_buffers(recurse=False)):
            setattr(mod, name, torch.empty(b.shape, dtype=b.dtype, device="cpu"))
    return module


def _uninitialised_storage(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """Real CPU storage for a meta ``module`` (buffers zeroed, a DiT's weights drawn small: random weights for a
    measurement of memory, not of quality)."""
    module.to_empty(device="cpu")
    if dtype is not None:
        module.to(dtype)
    for _, b in module.named_buffers():
        b.zero_()
    if isinstance(module, WanDiT):
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02)
    return module.eval().requires_grad_(False)


# -------------------------------------------------------------------------------------------------------------
# the plan
# -------------------------------------------------------------------------------------------------------------


def _request_for(spec: ModelSpec, request: GenerationRequest) -> GenerationRequest:
    """``request`` with what a plan does not need from the user: a blank picture, and a prompt (or, without a
    text encoder, zero prompt embeddings: their values do not change the estimate)."""
    from PIL import Image

    changes = {}
    if request.image is None:
        changes["image"] = Image.new("RGB", (request.width, request.height), (127, 127, 127))
    if request.prompt is None and request.prompt_embeds is None:
        if spec.text_encoder is not None:
            changes["prompt"] = "a prompt"
        else:
            changes["prompt_embeds"] = torch.zeros(1, spec.stage1.text_len, spec.stage1.text_dim)
    if request.guided and request.negative_prompt_embeds is None and spec.text_encoder is None:
        changes["negative_prompt_embeds"] = torch.zeros(1, spec.stage1.text_len, spec.stage1.text_dim)
    if request.output is not None:
        changes["output"] = None  # a plan writes nothing
    return request.replace(**changes) if changes else request


def _stand_in(pipe: SwiftI2VPipeline, run, state: GenerationState, name: str) -> None:
    """What phase ``name`` would have left in ``state``, as stand-ins of its shapes (a plan of other phases)."""
    dev, spec1 = pipe.device, pipe.stage1.config
    if name == "text_encoding":
        def left_by(encoder, component):  # where an encoder leaves its result: where it ran
            on_device = encoder is not None and pipe.memory.placement("text_encoding", component) == "device"
            return dev if on_device else "cpu"

        context = torch.zeros(1, spec1.text_len, spec1.text_dim, device=left_by(pipe.text_encoder, "text_encoder"))
        clip = None
        if spec1.image_dim:
            clip = torch.zeros(1, spec1.image_len, spec1.image_dim,
                               device=left_by(pipe.image_encoder, "image_encoder"))
        state.conditioning = Conditioning(context, torch.zeros_like(context) if run.request.guided else None, clip)
    elif name == "stage1":
        state.stage1_latents = torch.zeros(1, *run.stage1_shape, device=dev)
    elif name == "bridge":
        state.stage1_latents = None
        state.reference = torch.zeros(1, *run.stage2_shape, device=dev)
    elif name == "stage2":
        state.reference = None
        state.stage2_latents = torch.zeros(1, *run.stage2_shape, device=dev)


def _layout(memory, request: GenerationRequest, world_size, ulysses, cfg_parallel, fsdp):
    """The degrees and the memory plan of a plan, checked as ``generate`` checks them (the same messages)."""
    degrees = resolve_degrees(world_size, ulysses=ulysses, cfg_parallel=cfg_parallel, fsdp=fsdp,
                              guidance=request.guided)
    if isinstance(memory, MemoryPlan):
        plan = memory if not fsdp or memory.sharded_dits else memory_plan(memory.profile, fsdp=True)
    else:
        plan = memory_plan(memory, fsdp=fsdp)
    return degrees, plan


def _fake_pipeline(spec, plan, device, dtype, vae_dtype, degrees, guided: bool, fake_mode,
                   ranks: contextlib.ExitStack):
    """The pipeline of ``spec`` on fake tensors, on rank 0 of the layout; returns it, the FSDP shards and the host
    bytes its loader fills (:func:`~swift_model.planning.host.loaded_host_bytes`: whole DiTs under ``--fsdp``,
    which each rank loads before keeping its shards)."""
    with fake_mode:
        pipe = SwiftI2VPipeline.from_spec(spec, device="cpu" if device == "cpu" else device, memory=plan,
                                          dtype=dtype, vae_dtype=vae_dtype, materialize=_fake_storage,
                                          random_weights=False)
        as_loaded(pipe.components(), plan)  # what the loader leaves in files under this plan
    load_bytes = loaded_host_bytes(pipe.components(), plan)
    shards = []
    if degrees["world_size"] > 1:
        # rank 0 of the layout: the same groups as a real run, collectives that move no data
        ranks.enter_context(fake_process_group(degrees["world_size"]))
        pipe.parallel = Parallelism.build(ulysses=degrees["ulysses"], cfg_parallel=degrees["cfg_parallel"],
                                          fsdp=degrees["fsdp"], guidance=guided)
        if degrees["fsdp"]:
            with fake_mode:
                for dit in pipe.dits().values():
                    shards += ShardedBlocksModel(dit, degrees["world_size"], pipe.device).shards
    return pipe, shards, load_bytes


def _replays(pipe: SwiftI2VPipeline, counters: Counters) -> list[Replay]:
    """Replay wrappers on the pipeline's repeated calls: every DiT block (one record set per DiT), the VAEs'
    encoders and decoders."""
    replays = []
    for dit in pipe.dits().values():  # each expert of a two-expert Stage I has its own records
        shared: dict = {}
        replays += [Replay(b, counters, shared) for b in dit.blocks]
    for vae in (pipe.vae1, pipe.vae2):
        replays += [Replay(vae.model.decoder, counters), Replay(vae.model.encoder, counters)]
    return replays


def _run_phases(pipe, run, counters: Counters, wanted, device: str, fake_mode, fsdp: bool, shards) -> tuple:
    """Every phase of ``run`` under the counters (stand-ins for the phases not ``wanted``): per phase its
    figures, its timing and the components resident on the device."""
    tracker, host = counters.tracker, counters.host
    phases, timings, resident = {}, {}, {}
    # the weights already on the device (all of them under "fast", placed when the pipeline is built; on a CPU
    # plan, every weight, as a real CPU run has them) count from the start, and those in host memory on the host
    weights = [t for m in pipe.components().values() if m is not None for t in (*m.parameters(), *m.buffers())]
    tracker.track(*weights, *shards)
    host.track(*weights)
    state = GenerationState()
    with contextlib.ExitStack() as modes:
        for mode in (fake_mode, tracker, *([host] if host is not tracker else []), counters.flop_counter,
                     GpuAttentionMode()):
            modes.enter_context(mode)
        if device != "cpu":
            # the sharded DiTs are where the sharding put them (as after distribute() in a real run)
            pipe.residency.place_initial({c: m for c, m in pipe.components().items()
                                          if not (fsdp and c in pipe.dits())})
        pipe.residency.h2d_bytes.clear()
        pipe.residency.mapped_bytes.clear()
        for name in PHASES:
            if name not in wanted:
                _stand_in(pipe, run, state, name)
                continue
            flops0, ops0, t0 = counters.flops(), tracker.ops, time.perf_counter()
            # the phase's count starts once the previous phase's weights have left, as on the device
            pipe.residency.evict(name, pipe.components())
            with tracker.section() as sec, host.section() as host_sec:
                pipe.run_phase(name, run, state)
            timings[name] = (tracker.ops - ops0, round(time.perf_counter() - t0, 2))
            resident[name] = list(pipe.residency.resident.get(name, ()))
            phases[name] = dict(peak_bytes=int(sec["peak"]), flops=int(counters.flops() - flops0),
                                h2d_bytes=int(pipe.residency.h2d_bytes.get(name, 0)),
                                host_peak_bytes=int(host_sec["peak"]),
                                mapped_bytes=int(pipe.residency.mapped_bytes.get(name, 0)))
    return phases, timings, resident


@torch.no_grad()
def plan_generation(spec: ModelSpec, request: GenerationRequest | None = None, *, memory=None, device: str = "cuda",
                    dtype=None, vae_dtype=None, replay: bool = True, phases=None, world_size: int = 1,
                    ulysses: int | None = None, cfg_parallel: bool = False, fsdp: bool = False,
                    **settings) -> PlanResult:
    """Estimate the device memory, FLOPs and host-to-device bytes of each phase of a generation.

    Args:
        spec: the models (:meth:`ModelSpec.preset <swift_model.nets.spec.ModelSpec.preset>`,
            :meth:`ModelSpec.tiny <swift_model.nets.spec.ModelSpec.tiny>`,
            :func:`~swift_model.loading.preflight.checkpoint_spec`).
        request: the :class:`~swift_model.generation.request.GenerationRequest` to plan (its image and prompt may
            be left out); or its fields as ``settings`` (``frames``, ``width``, ``height``, ``steps``, ...).
        memory: the memory profile or :class:`~swift_model.generation.memory.MemoryPlan`.
        device: the device type to estimate (``"cuda"``; ``"cpu"`` to compare with a real CPU run).
        dtype: the DiTs' and encoders' dtype (default bf16 on ``cuda``, fp32 on ``cpu``, as ``from_pretrained``);
            vae_dtype: the VAEs' (``"bf16"``/``"fp32"`` or a dtype; default as ``generate``: bf16 on ``cuda``,
            fp32 on ``cpu``).
        replay: replay repeated block / VAE calls (:class:`~swift_model.planning.tracker.Replay`) instead of
            executing them.
        phases: run only these phases (default all); the others' results are stand-ins of their shapes. Each
            phase starts by evicting what it does not keep, so a phase's estimate does not depend on the others
            (tested), except under ``fast``, where everything is resident anyway.
        world_size, ulysses, cfg_parallel, fsdp: a ``torchrun --nproc-per-node world_size`` generation with
            ``generate``'s ``--ulysses``/``--cfg-parallel``/``--fsdp``, validated as ``generate`` validates
            them; the figures are then **rank 0's**: its code path runs here with a fake process group
            (:mod:`swift_model.planning.ranks`; FSDP2 is modelled there). ``memory=None`` is ``fast`` with ``fsdp``.

    Returns a :class:`PlanResult`.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    request = GenerationRequest(**settings) if request is None else request.replace(**settings)
    degrees, plan = _layout(memory, request, world_size, ulysses, cfg_parallel, fsdp)
    wanted = tuple(PHASES) if phases is None else tuple(phases)
    for p in wanted:
        if p not in PHASES:
            raise ValueError(f"phases must be among {PHASES}, got {p!r}")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    vae_dtype = parse_vae_dtype(vae_dtype) or default_vae_dtype(device)
    counters = Counters(device)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with contextlib.ExitStack() as ranks:
        pipe, shards, load_bytes = _fake_pipeline(spec, plan, device, dtype, vae_dtype, degrees, request.guided,
                                                  fake_mode, ranks)
        check_pipeline(pipe, pipe.parallel)
        # host bookkeeping (the image, the schedules, the CSG plan) on real tensors, before the fake mode
        run = pipe.prepare(_request_for(spec, request))
        replays = _replays(pipe, counters) if replay else []
        figures, timings, resident = _run_phases(pipe, run, counters, wanted, device, fake_mode, degrees["fsdp"],
                                                 shards)
    info = dict(**request.settings(), segments=run.csg.num_segments, stage2_kind=spec.stage2_kind,
                dtype=str(dtype).replace("torch.", ""), vae_dtype=str(vae_dtype).replace("torch.", ""),
                device=device, stage1=spec.stage1.name, stage2=spec.stage2.name, latent_frames=run.stage2_shape[1],
                replayed_calls=sum(r.hits for r in replays), executed_calls=sum(r.misses for r in replays),
                timings=timings, resident=resident, host_load_bytes=load_bytes)
    layout = {k: degrees[k] for k in ("world_size", "ulysses", "cfg_parallel", "fsdp")}
    return PlanResult(plan.profile, {p: figures[p] for p in PHASES if p in figures}, info, layout)


def measure_on_device(spec: ModelSpec, *, memory="balanced", frames: int = 33, width: int = 1280, height: int = 704,
                      dtype=torch.bfloat16, vae_dtype=None, **settings) -> int:
    """Run the generation of ``spec`` for real on the CUDA GPU with uninitialised (random) weights and return
    ``torch.cuda.max_memory_allocated`` over the run: the measurement :func:`plan_generation` estimates."""
    if not torch.cuda.is_available():
        raise RuntimeError("measure_on_device needs a CUDA GPU")
    with torch.random.fork_rng(devices=[]):
        pipe = SwiftI2VPipeline.from_spec(spec, device="cuda", memory=MemoryPlan.of(memory), dtype=dtype,
                                          vae_dtype=vae_dtype, materialize=_uninitialised_storage)
    request = _request_for(spec, GenerationRequest(frames=frames, width=width, height=height, **settings))
    torch.cuda.synchronize()
    result = pipe.generate(request=request, progress=False)
    return int(result.peak_memory_bytes)
