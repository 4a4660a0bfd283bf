"""SwiftI2VPipeline: image + prompt -> high-resolution video by the two-stage SwiftI2V method.

A generation is one sequence of named phases (:data:`~swift_model.generation.memory.PHASES`), each a public
method that reads what the earlier phases left in a :class:`GenerationState` and adds its own result:

1. ``text_encoding`` (:meth:`SwiftI2VPipeline.encode_conditioning`): prompt embeddings (and CLIP image tokens);
2. ``stage1`` (:meth:`~SwiftI2VPipeline.run_stage1`, motion): a large I2V DiT samples the whole clip at a
   quarter of the output size per side;
3. ``bridge`` (:meth:`~SwiftI2VPipeline.run_bridge`): decode, bicubic upsample, frame 0 := full-resolution
   image, encode with the Stage II VAE (``z_ref``);
4. ``stage2`` (:meth:`~SwiftI2VPipeline.run_stage2`, detail): a small DiT generates the full-size latents
   segment by segment (CSG, :mod:`.csg`);
5. ``decode`` (:meth:`~SwiftI2VPipeline.run_decode`): the Stage II VAE, tile by tile (device memory: one tile's
   caches), blended on the host; the mp4 written atomically.

:meth:`SwiftI2VPipeline.generate` is the driver: it prepares the request (:meth:`~SwiftI2VPipeline.prepare`:
every check, the schedules, the CSG plan, before any model runs), then runs the phases in order and times them.
The planner (:mod:`swift_model.planning.planner`) runs the same phase methods on fake tensors, so the estimate
and the run are the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

import torch

from ..io.video import check_output_path, image_to_tensor, read_image, write_mp4
from ..nets import vae_parallel
from ..nets.encoders import ImageEncoder, TextEncoder, load_prompt_embeds
from ..nets.spec import STAGE2_KINDS, ModelSpec, check_boundary_ratio, check_experts, stage2_extra_channels
from ..nets.vae import WanVAE
from ..nets.vae import default_dtype as default_vae_dtype
from ..nets.vae import parse_dtype as parse_vae_dtype
from .bridge import hybrid_reference, reference_video
from .compiling import check_compiler, compile_backend, compile_dits, compile_report, compile_totals
from .csg import CSGPlan, flow_steps, flow_update, gaussian, run_csg
from .distributed import Parallelism, check_sizes
from .experts import expert_plan
from .memory import PHASES, MemoryPlan
from .request import GenerationRequest, check_size
from .residency import Residency
from .stage1 import stage1_conditioning, stage1_model_input
from .vae_budget import fit_vae_tiles
from .window_model import WindowGraphs, WindowModel, cuda_graphs_unavailable

__all__ = ["Conditioning", "GenerationResult", "GenerationState", "PreparedRun", "SwiftI2VPipeline"]

# The parts a pipeline can be built with (``parts=``): each DiT with what only its stage uses (Stage I: the text
# and CLIP encoders). Both VAEs are in every part: ``prepare`` checks sizes and works out latent shapes with both,
# Stage I encodes the image with the Stage I VAE and the bridge runs both. A pipeline of one part runs its phases
# only (one worker per stage, each holding one DiT: swift_model.batch.ray_pipeline).
PARTS = ("stage1", "stage2")
# phase -> the part it needs (the bridge needs the VAEs alone, which every part holds)
PHASE_PARTS = {"text_encoding": "stage1", "stage1": "stage1", "bridge": None, "stage2": "stage2", "decode": "stage2"}

# The key of each phase in GenerationResult.seconds (and --report).
SECONDS_KEYS = {"text_encoding": "encode_prompt", "stage1": "stage1", "bridge": "bridge", "stage2": "stage2",
                "decode": "decode"}


@dataclasses.dataclass
class GenerationResult:
    """What :meth:`SwiftI2VPipeline.generate` returns."""

    frames: torch.Tensor | None  # uint8 [F, H, W, 3] on the CPU (None when streamed to ``output``)
    output: str | None  # the mp4 written, if any
    latents: torch.Tensor  # Stage II latents [1, C, T, h, w]
    seconds: dict  # seconds per stage and "total"
    peak_memory_bytes: int  # peak device memory (CUDA) or peak process RSS (CPU)
    info: dict  # sizes, plan, settings

    def report(self) -> dict:
        """A JSON-serialisable summary."""
        return dict(output=self.output, seconds=self.seconds, peak_memory_bytes=self.peak_memory_bytes,
                    peak_memory_gib=self.peak_memory_bytes / 2**30, **self.info)


@dataclasses.dataclass
class PreparedRun:
    """A request made ready for one pipeline: checked against its models, with what every phase needs to know
    before it starts (host bookkeeping only: no device work). Made by :meth:`SwiftI2VPipeline.prepare`.

    Attributes:
        request: the :class:`GenerationRequest`.
        stage2_kind: the pipeline's Stage II kind.
        image_low, image_full: the input image at the Stage I size and at the output size, ``[3, h, w]`` in
            ``[-1, 1]`` on the CPU.
        stage1_shape, stage2_shape: ``(C, T, h, w)`` of the Stage I and Stage II latents.
        schedule1, schedule2: ``(timestep, sigma, sigma_next)`` of each stage's steps.
        csg: the Stage II :class:`~swift_model.generation.csg.CSGPlan`.
        output: the mp4 to write (checked), or ``None``.
        progress: show progress bars (rank 0 only). free_text_encoder: drop the text encoder once used.
    """

    request: GenerationRequest
    stage2_kind: str
    image_low: torch.Tensor
    image_full: torch.Tensor
    stage1_shape: tuple[int, int, int, int]
    stage2_shape: tuple[int, int, int, int]
    schedule1: list
    schedule2: list
    csg: CSGPlan
    output: str | None = None
    progress: bool = False
    free_text_encoder: bool = False


@dataclasses.dataclass
class Conditioning:
    """What the ``text_encoding`` phase hands to the stages: prompt embeddings ``[1, L, text_dim]`` (fp32), those
    of the negative prompt when guided, and CLIP image tokens for Stage I DiTs that take them."""

    context: torch.Tensor
    negative_context: torch.Tensor | None = None
    clip_fea: torch.Tensor | None = None


@dataclasses.dataclass
class GenerationState:
    """What the phases hand each other: each phase reads the earlier results it needs and adds its own (a result
    no later phase reads is dropped, so its memory is freed)."""

    conditioning: Conditioning | None = None
    stage1_latents: torch.Tensor | None = None  # [1, C1, T1, h1, w1]
    reference: torch.Tensor | None = None  # z_ref [1, C2, T2, h2, w2]
    stage2_latents: torch.Tensor | None = None  # [1, C2, T2, h2, w2]
    video: torch.Tensor | None = None  # uint8 [F, H, W, 3] (None when written to the mp4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss() -> int:
    """The process's peak resident memory so far (0 where the platform does not say: native Windows has no
    resource module). It includes pages of weight files read through memory maps, which the plan leaves out."""
    try:
        import resource
    except ImportError:  # pragma: no cover
        return 0
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib * (1 if sys.platform == "darwin" else 1024))


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _peak_rss()


def _tqdm(enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kw)


@contextlib.contextmanager
def _stage2_progress(run: PreparedRun):
    """A context yielding the CSG loop's progress callback: a bar over segments and one over their steps."""
    joint, n_steps = run.request.joint, len(run.schedule2)
    seg_bar = _tqdm(run.progress, total=1 if joint else run.csg.num_segments,
                    desc="stage II (joint)" if joint else "stage II", unit="segment")
    step_bar = _tqdm(run.progress, total=n_steps, desc="  steps", unit="step", leave=False)

    def on_progress(event, index, total):
        if event == "segment":
            if index > 0:
                seg_bar.update(1)
            step_bar.reset(total=n_steps)
        else:
            step_bar.update(1)

    try:
        yield on_progress
        seg_bar.update(1)
    finally:
        step_bar.close()
        seg_bar.close()


def _default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_parts(parts) -> tuple[str, ...]:
    """``parts`` as a tuple in :data:`PARTS` order; ``ValueError`` unless a non-empty subset of :data:`PARTS`."""
    if isinstance(parts, str):
        parts = (parts,)
    parts = tuple(parts)
    if not parts or any(p not in PARTS for p in parts):
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {parts!r}")
    return tuple(p for p in PARTS if p in parts)


class SwiftI2VPipeline:
    """The two-stage image-to-video pipeline.

    Args:
        stage1: the Stage I ``WanDiT`` (Wan2.1-I2V style, input ``2*z + 4`` channels: latents, mask and image
            latents; or Wan2.2-TI2V style, input ``z`` channels with the image latent as frame 0).
        stage2: the Stage II ``WanDiT`` (input ``2*z2`` channels for ``stage2_kind="swift"``: latents
            concatenated with ``z_ref``; ``z2`` channels for ``"refine"``).
            Either DiT may be ``None`` (not both): a pipeline of one part (:data:`PARTS`) runs that part's phases
            only (then the text and CLIP encoders belong with Stage I).
        vae1, vae2: the :class:`~swift_model.nets.vae.WanVAE` of each stage.
        text_encoder: a :class:`~swift_model.nets.encoders.TextEncoder` (optional when prompt embeddings are given).
        image_encoder: a CLIP :class:`~swift_model.nets.encoders.ImageEncoder` for Stage I DiTs with image tokens.
        stage2_kind: ``"swift"`` or ``"refine"``.
        device: where the models run (default: CUDA when available, else CPU).
        memory: the memory profile, ``"fast"``, ``"balanced"`` (default) or ``"24gb"``, or a
            :class:`~swift_model.generation.memory.MemoryPlan`: what each phase keeps on the device (see
            :mod:`swift_model.generation.memory`).
        random_weights: a flag carried into reports (the tiny demo models).
        stage1_2, boundary_ratio: a two-expert Stage I (Wan2.2-I2V-A14B): ``stage1`` is then its high-noise expert,
            ``stage1_2`` its low-noise expert, and each Stage I step runs the one diffusers runs
            (:mod:`swift_model.generation.experts`: ``stage1`` while ``t >= boundary_ratio * 1000``); both or
            neither. Under every memory profile but ``fast`` one expert is on the device at a time.
        compile: compile both DiTs regionally (one compiled block reused by every block, :mod:`.compiling`):
            ``True`` (inductor) or a torch.compile backend name; ``False`` (default) runs eagerly.
        cuda_graphs: capture the Stage II window call in CUDA graphs, once per window shape, and replay it for
            every window of every step (:mod:`.window_model`); ``ValueError`` where that cannot apply (not a CUDA
            device, the ``24gb`` profile's streamed blocks, several processes).

    Several processes (``torchrun``): :func:`swift_model.generation.distributed.distribute` sets ``parallel`` (a
    :class:`~swift_model.generation.distributed.Parallelism`); every rank then calls :meth:`generate` with the same
    arguments, and only rank 0 shows progress and writes the video.
    """

    parallel: Parallelism = Parallelism()  # one process; distribute() sets this pipeline's own

    # phase -> the method that runs it (every phase method takes (run, state))
    PHASE_METHODS = {"text_encoding": "encode_conditioning", "stage1": "run_stage1", "bridge": "run_bridge",
                     "stage2": "run_stage2", "decode": "run_decode"}

    def __init__(self, stage1, stage2, vae1: WanVAE, vae2: WanVAE, text_encoder: TextEncoder | None = None,
                 image_encoder: ImageEncoder | None = None, *, stage2_kind: str = "swift", device=None,
                 memory="balanced", random_weights: bool = False, compile=False, cuda_graphs: bool = False,
                 stage1_2=None, boundary_ratio: float | None = None) -> None:
        if stage2_kind not in STAGE2_KINDS:
            raise ValueError(f"stage2_kind must be one of {STAGE2_KINDS}, got {stage2_kind!r}")
        self.compile_backend = compile_backend(compile)
        if stage1 is None and stage2 is None:
            raise ValueError("a pipeline needs at least one of the DiTs (stage1, stage2)")
        if (stage1_2 is None) != (boundary_ratio is None) or (stage1_2 is not None and stage1 is None):
            raise ValueError("a two-expert Stage I needs stage1 (the high-noise expert), stage1_2 (the low-noise "
                             "expert) and boundary_ratio")
        self.stage1_2 = None if stage1_2 is None else stage1_2.eval()
        self.boundary_ratio = None if boundary_ratio is None else check_boundary_ratio(boundary_ratio)
        # a DiT given as None: a pipeline of one part (PARTS), whose phases of the other part refuse to run
        self.stage1 = None if stage1 is None else stage1.eval()
        self.stage2 = None if stage2 is None else stage2.eval()
        self.parts = tuple(p for p, dit in zip(PARTS, (self.stage1, self.stage2)) if dit is not None)
        self.vae1, self.vae2 = vae1, vae2
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.stage2_kind = stage2_kind
        self.device = torch.device(device) if device is not None else _default_device()
        self.memory = MemoryPlan.of(memory)
        for dit in self.dits().values():
            dit.inference_chunk_tokens = self.memory.token_chunk
        self.residency = Residency(self.memory, self.device)
        self.random_weights = random_weights
        self.cuda_graphs = False
        self.use_cuda_graphs(cuda_graphs)
        self._check_models()
        self.residency.place_initial(self.components())
        compile_dits(self.dits().values(), self.compile_backend, self.device)

    # -- construction ---------------------------------------------------------------------------------

    def use_cuda_graphs(self, enabled: bool = True) -> None:
        """Capture the Stage II window call in CUDA graphs from the next run on (``enabled``), or run it eagerly:
        the constructor's ``cuda_graphs``. ``ValueError`` (one line saying why) where it cannot apply."""
        if not isinstance(enabled, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {type(enabled).__name__}")
        why_not = cuda_graphs_unavailable(self.device, self.memory, self.parallel) if enabled else None
        if why_not is not None:
            raise ValueError(why_not)
        self.cuda_graphs = enabled

    def components(self) -> dict:
        """The modules the memory plan places, by component name (``None`` when absent)."""
        return dict(text_encoder=None if self.text_encoder is None else self.text_encoder.model,
                    image_encoder=None if self.image_encoder is None else self.image_encoder.model,
                    stage1=self.stage1, stage2=self.stage2, vae1=self.vae1.model, vae2=self.vae2.model,
                    stage1_2=self.stage1_2)

    def dits(self) -> dict:
        """The DiTs present, by component name: ``stage1``, ``stage2`` and a two-expert Stage I's ``stage1_2``."""
        dits = dict(stage1=self.stage1, stage2=self.stage2, stage1_2=self.stage1_2)
        return {name: dit for name, dit in dits.items() if dit is not None}

    def _check_models(self) -> None:
        z1, z2 = self.vae1.z_dim, self.vae2.z_dim
        c1 = None if self.stage1 is None else self.stage1.config
        if self.stage1_2 is not None:
            check_experts(c1, self.stage1_2.config)
        if c1 is not None and (c1.in_channels not in (z1, 2 * z1 + 4) or c1.out_channels != z1):
            raise ValueError(f"stage1 checkpoint of the wrong kind: a DiT with in/out channels {c1.in_channels}/{c1.out_channels} "
                             f"does not fit a {z1}-channel VAE (expected in {2 * z1 + 4} or {z1}, out {z1})")
        want = 2 * z2 if self.stage2_kind == "swift" else z2
        c2 = None if self.stage2 is None else self.stage2.config
        if c2 is not None and (c2.in_channels != want or c2.out_channels != z2):
            raise ValueError(f"stage2 checkpoint of the wrong kind for stage2_kind={self.stage2_kind!r}: in/out channels "
                             f"{c2.in_channels}/{c2.out_channels}, expected {want}/{z2} for a {z2}-channel VAE")

    @classmethod
    def from_spec(cls, spec: ModelSpec, *, seed: int = 0, device=None, memory="balanced", vae_dtype=None,
                  dtype=torch.float32, materialize=None, random_weights: bool = True,
                  parts=PARTS, compile=False) -> "SwiftI2VPipeline":
        """The pipeline of ``spec``'s models built by :meth:`ModelSpec.build <swift_model.nets.spec.ModelSpec.build>`
        (random weights from ``seed``, or meta modules given storage by ``materialize``). ``vae_dtype``:
        ``"bf16"``/``"fp32"`` (default: bf16 on a GPU, fp32 on the CPU). ``parts``: the parts to keep
        (:data:`PARTS`; the weights are those of the whole pipeline). ``compile``: as the class takes it."""
        parts = _check_parts(parts)
        dev = torch.device(device) if device is not None else _default_device()
        check_compiler(compile_backend(compile), dev)  # before the models are built
        vae_dtype = parse_vae_dtype(vae_dtype) or default_vae_dtype(dev)
        m = spec.build(seed=seed, dtype=dtype, vae_dtype=vae_dtype, materialize=materialize)
        # everything is built, then a part's models dropped: the seeded weights match the whole pipeline's
        s1 = "stage1" in parts
        return cls(m.stage1 if s1 else None, m.stage2 if "stage2" in parts else None, m.vae1, m.vae2,
                   m.text_encoder if s1 else None, m.image_encoder if s1 else None, stage2_kind=spec.stage2_kind,
                   stage1_2=m.stage1_2 if s1 else None, boundary_ratio=spec.boundary_ratio if s1 else None,
                   device=dev, memory=memory, random_weights=random_weights, compile=compile)

    @classmethod
    def tiny(cls, *, seed: int = 0, stage2_kind: str = "swift", device=None, memory="balanced",
             vae_dtype=None, parts=PARTS, compile=False) -> "SwiftI2VPipeline":
        """The whole pipeline on tiny random-weight models (:meth:`ModelSpec.tiny
        <swift_model.nets.spec.ModelSpec.tiny>`; for demos and tests, the output is noise-like). ``memory``: the
        memory profile (see the class); ``vae_dtype``: ``"bf16"``/``"fp32"`` (default: bf16 on a GPU, fp32 on the
        CPU); ``parts``: the parts to keep (:data:`PARTS`), with the whole pipeline's weights; ``compile``: as the
        class takes it."""
        return cls.from_spec(ModelSpec.tiny(stage2_kind), seed=seed, device=device, memory=memory, vae_dtype=vae_dtype,
                             parts=parts, compile=compile)

    @classmethod
    def from_pretrained(cls, stage1: str, stage2: str, *, stage1_lora: str | None = None, lora_scale: float = 1.0,
                        stage2_kind: str = "refine", text_encoder: str | None = None, load_text_encoder: bool = True,
                        device=None, dtype=None, memory="balanced", vae_dtype=None, stage1_lora_2: str | None = None,
                        parts=PARTS, compile=False) -> "SwiftI2VPipeline":
        """Load both stages from diffusers-format or original Wan folders.

        Args:
            stage1: Stage I folder (e.g. Wan2.1-I2V-14B): DiT, VAE, and, when present, text and image encoders; a
                Wan2.2-I2V-A14B folder loads both experts (diffusers: ``transformer/``, ``transformer_2/`` and the
                ``boundary_ratio`` of ``model_index.json``; original: ``high_noise_model/``, ``low_noise_model/``).
            stage2: Stage II folder (Wan2.2-TI2V-5B for ``"refine"``, SwiftI2V's own weights for ``"swift"``).
            stage1_lora: an optional LoRA (e.g. a 4-step distillation LoRA) merged into Stage I (into the
                high-noise expert of two).
            stage1_lora_2: the low-noise expert's LoRA of a two-expert Stage I (e.g. the low-noise half of
                LightX2V's 4-step pair); merged with ``lora_scale`` too.
            stage2_kind: ``"refine"`` (public 5B, training-free) or ``"swift"`` (widened input).
            text_encoder: folder of the UMT5 encoder + tokenizer (default: ``stage1``'s).
            load_text_encoder: False to run from precomputed prompt embeddings only.
            memory: the memory profile (see the class); it also decides where each model is loaded to, and what is
                not loaded at all: under ``24gb`` the Stage I blocks stay in their files (read on each use) and the
                encoders are read from theirs for the phase that runs them (see
                :class:`~swift_model.generation.memory.MemoryProfile`).
            vae_dtype: dtype of both VAEs, ``"bf16"``/``"fp32"`` (default: bf16 on a GPU, fp32 on the CPU).
            parts: the parts to load (:data:`PARTS`): ``("stage1",)`` reads the Stage I DiT, its encoders and the
                VAEs; ``("stage2",)`` the Stage II DiT and the VAEs (every header is checked either way).
            compile: as the class takes it (checked before any weight is read).
        """
        from ..loading.checkpoint import load_dit
        from ..loading.preflight import check_checkpoints

        compile_backend(compile)
        for name, p in (("stage1", stage1), ("stage2", stage2)):
            if not isinstance(p, (str, os.PathLike)) or not os.path.exists(p):
                raise ValueError(f"{name} checkpoint not found: {p}")
        parts = _check_parts(parts)
        load_text_encoder = load_text_encoder and "stage1" in parts
        plan = MemoryPlan.of(memory)
        # Every component is located, every config parsed and every weight header (names, shapes, dtypes, the
        # LoRA's keys) checked before the first weight is read: a broken file costs milliseconds, not a 14B load.
        checked = check_checkpoints(stage1, stage2, stage1_lora=stage1_lora, text_encoder=text_encoder,
                                    need_text_encoder=load_text_encoder, stage1_lora_2=stage1_lora_2)
        dev = torch.device(device) if device is not None else _default_device()
        check_compiler(compile_backend(compile), dev)  # before any weight is read
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        vae_dtype = parse_vae_dtype(vae_dtype) or default_vae_dtype(dev)

        def load_dev(component):
            return dev if plan.initial(component) == "device" else torch.device("cpu")

        s1 = s2 = image = None
        if "stage1" in parts:
            s1 = load_dit(checked.stage1, device=load_dev("stage1"), dtype=dtype, lora=stage1_lora,
                          lora_scale=lora_scale, stage="stage1", blocks_from_files=plan.blocks_from_files("stage1"))
        s1_2 = None
        if "stage1" in parts and checked.stage1_2 is not None:  # the low-noise expert, with its own LoRA or none
            s1_2 = load_dit(checked.stage1_2, device=load_dev("stage1_2"), dtype=dtype, lora=stage1_lora_2,
                            lora_scale=lora_scale, stage="stage1",
                            blocks_from_files=plan.blocks_from_files("stage1_2"))
        # A public checkpoint used as the method's network is widened (the extra channels start at zero),
        # decided from the headers so that the weights are read once.
        if "stage2" in parts:
            s2 = load_dit(checked.stage2, device=load_dev("stage2"), dtype=dtype,
                          extra_in_channels=stage2_extra_channels(checked.stage2.config, stage2_kind))
        vae1 = WanVAE.from_pretrained(stage1, device=load_dev("vae1"), dtype=vae_dtype)
        vae2 = WanVAE.from_pretrained(stage2, device=load_dev("vae2"), dtype=vae_dtype)
        text = None
        if load_text_encoder:
            text = TextEncoder.from_pretrained(text_encoder or stage1, device="cpu", dtype=dtype,
                                               deferred=plan.reads_on_use("text_encoder"))
        if s1 is not None and getattr(s1.config, "image_dim", None):
            image = ImageEncoder.from_pretrained(stage1, device="cpu", dtype=dtype,
                                                 deferred=plan.reads_on_use("image_encoder"))
        return cls(s1, s2, vae1, vae2, text, image, stage2_kind=stage2_kind, device=dev, memory=plan, stage1_2=s1_2,
                   boundary_ratio=checked.boundary_ratio if s1_2 is not None else None,
                   compile=compile)

    # -- requests -------------------------------------------------------------------------------------

    def phase(self, name: str):
        """A context in which the body runs as phase ``name`` of the memory plan (what the phase does not keep
        is evicted first, what it uses is brought to the device). ``ValueError`` when the phase needs a part
        (:data:`PHASE_PARTS`) this pipeline was built without."""
        part = PHASE_PARTS.get(name)
        if part is not None and part not in self.parts:
            raise ValueError(f"phase {name!r} needs the {part} DiT, which this pipeline was built without "
                             f"(parts={self.parts}); build it with parts including {part!r}")
        return self.residency.phase(name, self.components())

    def check_inputs(self, frames: int, width: int, height: int) -> None:
        """Raise when the pipeline cannot produce a ``frames`` x ``width`` x ``height`` video: ``TypeError`` for a
        non-int, ``ValueError`` for a value it cannot make (frames not ``4k + 1 >= 5``, sizes not multiples of
        what the VAEs need)."""
        check_size(frames, width, height, max(self.vae1.size_multiple * 4, self.vae2.size_multiple))

    def prepare(self, request: GenerationRequest, *, progress: bool = False,
                free_text_encoder: bool = False) -> PreparedRun:
        """Check ``request`` against this pipeline's models and work out what every phase needs before any model
        runs: the image at both sizes, the latent shapes, both schedules and the CSG plan. Raises
        ``TypeError``/``ValueError`` naming the argument (and reads the image file, if ``request.image`` is a
        path)."""
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"request must be a GenerationRequest, got {type(request).__name__}")
        r = request
        kind = r.stage2_kind or self.stage2_kind
        if kind != self.stage2_kind:
            raise ValueError(f"this pipeline's Stage II DiT is built for stage2_kind={self.stage2_kind!r}, got {kind!r}")
        self.check_inputs(r.frames, r.width, r.height)
        if self.cuda_graphs and self.parallel.distributed:
            raise ValueError(cuda_graphs_unavailable(self.device, self.memory, self.parallel))
        if self.stage1 is not None:  # the conditioning is made where Stage I runs (a Stage II part is handed it)
            self._check_conditioning_inputs(r)
        output = None if r.output is None else check_output_path(r.output)
        image = read_image(r.image) if isinstance(r.image, (str, os.PathLike)) else r.image
        if image is None:
            raise ValueError("image is required: a path or a PIL image")
        check_sizes(self, self.parallel, r)
        w1, h1 = r.width // 4, r.height // 4
        stage2_shape = self.vae2.latent_shape(r.frames, r.height, r.width)
        T, hh, ww = stage2_shape[1:]
        csg = CSGPlan(T, r.segment_blocks, r.neighbors, block_tokens=(hh // 2) * (ww // 2),
                      anchor_attends="anchor" if r.shared_anchor else "all")
        stage1_shape = self.vae1.latent_shape(r.frames, h1, w1)
        fit_vae_tiles(self, stage1_shape, stage2_shape)  # the VAE passes' tiles from the memory profile's budget
        return PreparedRun(
            request=r, stage2_kind=kind, image_low=image_to_tensor(image, w1, h1),
            image_full=image_to_tensor(image, r.width, r.height),
            stage1_shape=stage1_shape, stage2_shape=stage2_shape,
            schedule1=flow_steps(r.steps, r.shift),
            schedule2=flow_steps(r.steps, r.shift, start_sigma=r.start_sigma if kind == "refine" else 1.0),
            csg=csg, output=output, progress=progress and self.parallel.is_main,
            free_text_encoder=free_text_encoder)

    def _check_conditioning_inputs(self, r: GenerationRequest) -> None:
        """What the conditioning needs from the models: a text encoder or embeddings, a negative prompt when
        guided, CLIP image tokens for a Stage I DiT that takes them."""
        if r.prompt_embeds is None:
            if not isinstance(r.prompt, str):
                raise TypeError(f"prompt must be a string (or pass prompt_embeds), got {type(r.prompt).__name__}")
            if self.text_encoder is None:
                raise ValueError("no text encoder loaded: pass prompt_embeds (a tensor or a safetensors file)")
        if r.guided and r.negative_prompt_embeds is None and self.text_encoder is None:
            raise ValueError("guidance needs a negative prompt: load a text encoder or pass negative_prompt_embeds")
        if r.guidance_scale_2 is not None and self.stage1_2 is None:
            raise ValueError("guidance_scale_2 is the guidance of a two-expert Stage I's low-noise expert, and this "
                             "Stage I has one DiT: use guidance_scale")
        image_dim = getattr(self.stage1.config, "image_dim", None)
        if r.image_embeds is not None:
            e = r.image_embeds
            if not isinstance(e, torch.Tensor) or e.dim() != 3 or e.shape[-1] != image_dim:
                raise ValueError(f"image_embeds must be a [1, N, {image_dim}] tensor for this Stage I DiT, got "
                                 f"{getattr(e, 'shape', type(e).__name__)}")
        elif image_dim and self.image_encoder is None:
            raise ValueError("this Stage I DiT takes CLIP image tokens: load a CLIP image encoder or pass image_embeds")

    # -- generation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, image=None, prompt: str | None = None, *, request: GenerationRequest | None = None,
                 progress: bool = True, free_text_encoder: bool = False, **settings) -> GenerationResult:
        """Generate a video from ``image`` and a prompt.

        Args:
            image, prompt: the input image (a path or a PIL image) and the text prompt.
            request: a whole :class:`~swift_model.generation.request.GenerationRequest` instead (then ``image``,
                ``prompt`` and ``settings`` must not be given).
            progress: show progress bars. free_text_encoder: drop the text encoder after encoding.
            settings: any other field of :class:`~swift_model.generation.request.GenerationRequest`
                (``frames``, ``width``, ``height``, ``steps``, ``seed``, ``guidance_scale``, ``output``, ...).

        Returns:
            a :class:`GenerationResult`: the video as a uint8 ``[frames, height, width, 3]`` tensor (``None``
            when ``output`` is given), the output path, the Stage II latents, seconds per stage and peak memory.

        Raises ``TypeError``/``ValueError`` naming the argument for bad input, before any model runs.
        """
        if request is None:
            request = GenerationRequest(image=image, prompt=prompt, **settings)
        elif image is not None or prompt is not None or settings:
            raise TypeError("pass either request or image/prompt/settings, not both")
        run = self.prepare(request, progress=progress, free_text_encoder=free_text_encoder)
        dev = self.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        self.residency.h2d_bytes.clear()
        self.residency.mapped_bytes.clear()
        self._compile_mark = compile_totals(self.dits().values())  # this run's compilation is reported
        seconds: dict[str, float] = {}
        state = GenerationState()
        t_start = time.perf_counter()
        for name in PHASES:
            t0 = time.perf_counter()
            self.run_phase(name, run, state)
            _sync(dev)
            seconds[SECONDS_KEYS[name]] = time.perf_counter() - t0
        seconds["total"] = time.perf_counter() - t_start
        output = run.output if state.video is None and self.parallel.is_main else None
        return GenerationResult(state.video, output, state.stage2_latents.cpu(), seconds, _peak_memory(dev),
                                self.run_info(run))

    __call__ = generate

    # what one request of generate_many may fail with and leave the next ones able to run (out of memory is a
    # RuntimeError); anything else is a bug that stops the loop
    REQUEST_ERRORS = (ValueError, TypeError, OSError, RuntimeError, MemoryError)

    def generate_many(self, requests, *, progress: bool = True):
        """Run ``requests`` (an iterable of :class:`~swift_model.generation.request.GenerationRequest`) one after
        another with the models loaded once, yielding for each, in order, its :class:`GenerationResult` or the
        exception it failed with (:attr:`REQUEST_ERRORS`: a missing or unreadable image, a size the models cannot
        make, out of memory...), so one bad request does not stop the others. ``progress``: one bar over the
        requests (the per-stage bars stay off). The text encoder is kept for the next request.

        A generator: each request runs when the next item is asked for.
        """
        requests = list(requests) if not isinstance(requests, (list, tuple)) else requests
        bar = _tqdm(progress and self.parallel.is_main, total=len(requests), desc="videos", unit="video")
        try:
            for request in requests:
                try:
                    outcome = self.generate(request=request, progress=False)
                except self.REQUEST_ERRORS as exc:
                    if self.device.type == "cuda":  # an out-of-memory request leaves cached blocks behind
                        torch.cuda.empty_cache()
                    outcome = exc
                bar.update(1)
                yield outcome
        finally:
            bar.close()

    def run_info(self, run: PreparedRun) -> dict:
        """What a report says about ``run`` on this pipeline: the settings, sizes, plan and layout."""
        r = run.request
        return dict(**r.settings(), stage2_kind=run.stage2_kind, segments=run.csg.num_segments,
                    stage1_size=[r.width // 4, r.height // 4], latent_frames=run.stage2_shape[1],
                    max_window_tokens=run.csg.max_window_tokens, device=str(self.device),
                    random_weights=self.random_weights, memory=self.memory.profile,
                    h2d_bytes=dict(self.residency.h2d_bytes), mapped_bytes=dict(self.residency.mapped_bytes),
                    host_peak_rss_bytes=_peak_rss(), **self.parallel.report(),
                    compile=compile_report(self.dits().values(), getattr(self, "_compile_mark", None)))

    def run_phase(self, name: str, run: PreparedRun, state: GenerationState) -> None:
        """Run phase ``name`` (:data:`~swift_model.generation.memory.PHASES`) of ``run``: its method reads the
        earlier phases' results from ``state`` and adds its own."""
        if name not in self.PHASE_METHODS:
            raise ValueError(f"phase must be one of {PHASES}, got {name!r}")
        getattr(self, self.PHASE_METHODS[name])(run, state)

    # -- the phases -----------------------------------------------------------------------------------

    def encode_conditioning(self, run: PreparedRun, state: GenerationState) -> Conditioning:
        """Phase ``text_encoding``: the prompt's (and, when guided, the negative prompt's) embeddings and the CLIP
        image tokens Stage I takes, into ``state.conditioning``."""
        r = run.request
        with self.phase("text_encoding"):
            context = self._embeddings(r.prompt, r.prompt_embeds, "prompt")
            text_dim = self.stage1.config.text_dim
            if context.dim() != 3 or context.shape[-1] != text_dim:
                raise ValueError(f"prompt embeddings must be [1, L, {text_dim}], got {tuple(context.shape)}")
            negative = None
            if r.guided:
                negative = self._embeddings(r.negative_prompt, r.negative_prompt_embeds, "negative prompt")
                if negative.dim() != 3 or negative.shape[-1] != context.shape[-1]:
                    raise ValueError(f"negative prompt embeddings must be [1, L, {context.shape[-1]}], got "
                                     f"{tuple(negative.shape)}")
            if run.free_text_encoder:
                self.text_encoder = None
            clip_fea = r.image_embeds
            if clip_fea is None and self.image_encoder is not None:
                clip_fea = self.image_encoder.encode(run.image_low)
        state.conditioning = Conditioning(context, negative, clip_fea)
        return state.conditioning

    def _embeddings(self, prompt, embeds, what: str) -> torch.Tensor:
        """Embeddings of ``prompt`` by the text encoder, or ``embeds`` (a tensor or a safetensors path)."""
        if embeds is None:
            if self.text_encoder is None:  # prepare() checked it; the encoder may have been freed since
                raise ValueError(f"no text encoder loaded for the {what}: pass its embeddings")
            return self.text_encoder.encode(prompt)
        if isinstance(embeds, (str, os.PathLike)):
            return load_prompt_embeds(embeds)
        return embeds.float()

    def run_stage1(self, run: PreparedRun, state: GenerationState) -> torch.Tensor:
        """Phase ``stage1``: the whole clip at a quarter of the output size per side, sampled by the Stage I DiT
        from the image's conditioning, into ``state.stage1_latents`` ``[1, C, T, h, w]``."""
        r, cond = run.request, state.conditioning
        with self.phase("stage1"):
            dev, dit = self.device, self.stage1
            dtype = next(dit.parameters()).dtype
            # Wan2.2 TI2V: the image latent is clean frame 0 at timestep 0; Wan2.1 I2V: mask channels and the
            # latents of [image, black...] concatenated to the noisy latents (the same function prepares training
            # references, so Stage I is conditioned alike in both).
            ti2v, image_cond = stage1_conditioning(dit, self.vae1, run.image_low, r.frames, dev)
            if not ti2v:
                image_cond = image_cond.to(dtype)  # cast once, not per step
            clip = None if cond.clip_fea is None else cond.clip_fea.to(dev, dtype)
            x = gaussian((1, *run.stage1_shape), r.seed, 1, dev, torch.float32)
            numel = x.numel()
            steps = _tqdm(run.progress, iterable=run.schedule1, desc="stage I", unit="step")
            # each step's expert and guidance, as diffusers picks them (one expert: stage1 throughout)
            experts = expert_plan(run.schedule1, self.boundary_ratio, r.guidance_scale, r.guidance_scale_2)
            current = None
            for i, ((t, sigma, sigma_next), (k, scale)) in enumerate(zip(steps, experts)):
                if k != current:
                    # this step's expert onto the device (under every profile but fast the other one leaves
                    # first: the copy is counted in the phase's h2d_bytes), with its own prompt caches
                    name = ("stage1", "stage1_2")[k]
                    cache = neg_cache = None  # the previous expert's caches go before the next expert comes in
                    self.residency.switch(name, self.components())
                    dit = self.dits()[name]
                    cache, neg_cache = self._context_caches(dit, cond, clip, r.guided)
                    current = k
                inp, tt = stage1_model_input(x, ti2v, image_cond, t, dtype)
                v = self.parallel.velocities(
                    lambda c: dit(inp, tt, None, context_cache=c, sp_group=self.parallel.sp_group).float(),
                    cache, neg_cache, r.guided)
                g = {}
                if r.guided:
                    v, g = v[0], dict(v_uncond=v[1], guidance=scale)
                x = flow_update(x, v, sigma, sigma_next, mode=r.step_mode, seed=r.seed, offset=(i + 1) * numel, **g)
            if ti2v:
                x[:, :, :1] = image_cond
        state.stage1_latents = x
        return x

    def _context_caches(self, dit, cond: Conditioning, clip, guided: bool):
        """The DiT's cross-attention caches of the prompt and, when guided, of the negative prompt (the
        unconditional branch keeps the image conditioning and CLIP tokens and drops the prompt only)."""
        dev, dtype = self.device, next(dit.parameters()).dtype
        cache = dit.precompute_context(cond.context.to(dev, dtype), clip)
        neg = dit.precompute_context(cond.negative_context.to(dev, dtype), clip) if guided else None
        return cache, neg

    def run_bridge(self, run: PreparedRun, state: GenerationState) -> torch.Tensor:
        """Phase ``bridge``: the hybrid reference ``z_ref`` (Stage I decoded, upsampled, frame 0 the full-size
        image, encoded by the Stage II VAE) into ``state.reference``; the Stage I latents are dropped."""
        r, par = run.request, self.parallel
        with self.phase("bridge"):
            if par.distributed:  # the 2K encode's tiles over the ranks (bitwise the one-process encode)
                video = reference_video(state.stage1_latents, self.vae1, run.image_full, r.height, r.width)
                z_ref = vae_parallel.encode(self.vae2, video, par.group)
            else:
                z_ref = hybrid_reference(state.stage1_latents, self.vae1, self.vae2, run.image_full, r.height, r.width)
        state.stage1_latents = None
        state.reference = z_ref
        return z_ref

    def run_stage2(self, run: PreparedRun, state: GenerationState) -> torch.Tensor:
        """Phase ``stage2``: the full-size latents by CSG (:func:`~swift_model.generation.csg.run_csg`) into
        ``state.stage2_latents``; the reference is dropped."""
        r = run.request
        with self.phase("stage2"):
            dit = self.stage2
            dtype = next(dit.parameters()).dtype
            z_ref = state.reference.to(self.device)
            cache, neg_cache = self._context_caches(dit, state.conditioning, None, r.guided)
            model_fn = self._window_model(run, cache, neg_cache, z_ref.shape[1])
            with _stage2_progress(run) as on_progress:
                # seed + 1: Stage II draws its own Philox stream, independent of Stage I's.
                z2 = run_csg(model_fn, z_ref.float(), run.csg, run.schedule2, kind=run.stage2_kind,
                             start_sigma=r.start_sigma, seed=r.seed + 1, step_mode=r.step_mode, joint=r.joint,
                             progress=on_progress, fuse_ref=run.stage2_kind == "swift", input_dtype=dtype,
                             guidance=r.guidance_scale, host_inputs=True)
        state.reference = None
        state.stage2_latents = z2
        return z2

    def _window_model(self, run: PreparedRun, cache, neg_cache, channels: int) -> WindowModel:
        """The CSG loop's model (:class:`~swift_model.generation.window_model.WindowModel`): the Stage II DiT on one
        window (or the whole clip), both guidance branches when guided, the shared anchor's keys and values
        computed once per conditioning; prepared now for every window and step (the calls copy nothing from the
        host), and captured in CUDA graphs with ``cuda_graphs``."""
        r = run.request
        graphs = WindowGraphs(self.stage2, channels) if self.cuda_graphs else None
        shape = (1, channels, *run.stage2_shape[1:])
        return WindowModel(self.stage2, run.csg, run.schedule2, joint=r.joint, latent_shape=shape,
                           parallel=self.parallel, cond=cache, uncond=neg_cache if r.guided else None, graphs=graphs)

    def run_decode(self, run: PreparedRun, state: GenerationState) -> torch.Tensor | None:
        """Phase ``decode``: the Stage II latents decoded tile by tile and blended on the host, written to
        ``run.output`` (the frames stream into a temporary file renamed when complete) or kept as
        ``state.video`` (uint8 ``[F, H, W, 3]``). With several processes each rank decodes its share of the
        tiles and rank 0 alone blends and writes."""
        par, z2 = self.parallel, state.stage2_latents
        with self.phase("decode"):
            if par.distributed:
                # each rank decodes its share of the tiles; rank 0 blends them (bitwise the one-process decode)
                frames = vae_parallel.decode_uint8(self.vae2, z2[:1], par.group, progress=run.progress)
                chunks = None if frames is None else iter((frames,))
            else:
                # Tile-major decode (device: one tile's caches), blended to uint8 frames on the host.
                chunks = self.vae2.decode_uint8_stream(z2[:1], progress=run.progress)
            video = None
            if chunks is not None and run.output is not None:
                write_mp4(chunks, run.output, fps=run.request.fps)
            elif chunks is not None:
                video = torch.cat(list(chunks), 0)
        state.video = video
        return video
