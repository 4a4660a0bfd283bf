"""SwiftI2VPipeline: image + prompt -> high-resolution video by the two-stage SwiftI2V method.

1. Stage I (motion): a large I2V DiT samples the whole clip at a quarter of the output size per side.
2. Bridge: decode, bicubic upsample, frame 0 := full-resolution image, encode with the Stage II VAE (``z_ref``).
3. Stage II (detail): a small DiT generates the full-size latents segment by segment (CSG, :mod:`.csg`).
4. Decode with the Stage II VAE, tile by tile (device memory: one tile's caches), blended on the host; write
   the mp4 atomically.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time

import torch

from ..nets import vae_parallel
from .bridge import hybrid_reference, reference_video
from .csg import CSGPlan, STAGE2_KINDS, flow_steps, flow_update, gaussian, parse_neighbors, run_csg
from .distributed import Parallelism, check_sizes
from ..nets.encoders import ImageEncoder, TextEncoder, load_prompt_embeds
from .memory import MemoryPlan, Residency
from .stage1 import stage1_conditioning, stage1_model_input
from ..nets.vae import WanVAE
from ..nets.vae import default_dtype as default_vae_dtype
from ..nets.vae import parse_dtype as parse_vae_dtype
from ..io.video import image_to_tensor, read_image, write_mp4


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib * (1 if sys.platform == "darwin" else 1024))


# The smallest size multiple of any Wan pipeline: a Wan2.1 (8x) Stage I VAE under a 2x2 patch at a quarter of
# the output size per side (a Wan2.2 Stage I VAE needs 128; the pipeline checks the exact value).
MIN_SIZE_MULTIPLE = 64


def check_request(frames, width, height, *, segment_blocks=2, neighbors=(1, 0),
                  size_multiple: int = MIN_SIZE_MULTIPLE) -> tuple[int, int]:
    """Check what a generation request can be checked for without any model: ``frames`` (``4k + 1 >= 5``),
    ``width``/``height`` (positive multiples of ``size_multiple``), ``segment_blocks`` (an int >= 1) and
    ``neighbors`` (see :func:`~swift_model.generation.csg.parse_neighbors`). Returns the parsed ``neighbors``; raises
    ``TypeError``/``ValueError`` naming the argument. The command line calls it before opening any checkpoint.
    """
    for name, v in (("frames", frames), ("width", width), ("height", height), ("segment_blocks", segment_blocks)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if frames < 5 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4k+1 and at least 5 (e.g. 81), got {frames}")
    m = size_multiple
    if width < m or height < m or width % m or height % m:
        raise ValueError(f"width and height must be positive multiples of {m} (Stage I runs at a quarter per "
                         f"side), got {width}x{height}")
    if segment_blocks < 1:
        raise ValueError(f"segment_blocks must be >= 1, got {segment_blocks}")
    return parse_neighbors(neighbors)


def _tqdm(enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kw)


class SwiftI2VPipeline:
    """The two-stage image-to-video pipeline.

    Args:
        stage1: the Stage I ``WanDiT`` (Wan2.1-I2V style, input ``2*z + 4`` channels: latents, mask and image
            latents; or Wan2.2-TI2V style, input ``z`` channels with the image latent as frame 0).
        stage2: the Stage II ``WanDiT`` (input ``2*z2`` channels for ``stage2_kind="swift"``: latents
            concatenated with ``z_ref``; ``z2`` channels for ``"refine"``).
        vae1, vae2: the :class:`~swift_model.nets.vae.WanVAE` of each stage.
        text_encoder: a :class:`~swift_model.nets.encoders.TextEncoder` (optional when prompt embeddings are given).
        image_encoder: a CLIP :class:`~swift_model.nets.encoders.ImageEncoder` for Stage I DiTs with image tokens.
        stage2_kind: ``"swift"`` or ``"refine"``.
        device: where the models run (default: CUDA when available, else CPU).
        memory: the memory profile, ``"fast"``, ``"balanced"`` (default) or ``"24gb"``, or a
            :class:`~swift_model.generation.memory.MemoryPlan`: what each phase keeps on the device (see
            :mod:`swift_model.generation.memory`).
        random_weights: a flag carried into reports (the tiny demo models).

    Several processes (``torchrun``): :func:`swift_model.generation.distributed.distribute` sets ``parallel`` (a
    :class:`~swift_model.generation.distributed.Parallelism`); every rank then calls :meth:`generate` with the same
    arguments, and only rank 0 shows progress and writes the video.
    """

    parallel: Parallelism = Parallelism()  # one process; distribute() sets this pipeline's own

    def __init__(self, stage1, stage2, vae1: WanVAE, vae2: WanVAE, text_encoder: TextEncoder | None = None,
                 image_encoder: ImageEncoder | None = None, *, stage2_kind: str = "swift", device=None,
                 memory="balanced", random_weights: bool = False) -> None:
        if stage2_kind not in STAGE2_KINDS:
            raise ValueError(f"stage2_kind must be one of {STAGE2_KINDS}, got {stage2_kind!r}")
        self.stage1, self.stage2 = stage1.eval(), stage2.eval()
        self.vae1, self.vae2 = vae1, vae2
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.stage2_kind = stage2_kind
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.memory = MemoryPlan.of(memory)
        for dit in (self.stage1, self.stage2):
            dit.inference_chunk_tokens = self.memory.token_chunk
        self.residency = Residency(self.memory, self.device)
        self.random_weights = random_weights
        self._check_models()
        self.residency.place_initial(self._components())

    # -- construction ---------------------------------------------------------------------------------

    def _components(self) -> dict:
        """The modules the memory plan places, by component name (``None`` when absent)."""
        return dict(text_encoder=None if self.text_encoder is None else self.text_encoder.model,
                    image_encoder=None if self.image_encoder is None else self.image_encoder.model,
                    stage1=self.stage1, stage2=self.stage2, vae1=self.vae1.model, vae2=self.vae2.model)

    def _check_models(self) -> None:
        c1, c2 = self.stage1.config, self.stage2.config
        z1, z2 = self.vae1.z_dim, self.vae2.z_dim
        if c1.in_channels not in (z1, 2 * z1 + 4) or c1.out_channels != z1:
            raise ValueError(f"stage1 checkpoint of the wrong kind: a DiT with in/out channels {c1.in_channels}/{c1.out_channels} "
                             f"does not fit a {z1}-channel VAE (expected in {2 * z1 + 4} or {z1}, out {z1})")
        want = 2 * z2 if self.stage2_kind == "swift" else z2
        if c2.in_channels != want or c2.out_channels != z2:
            raise ValueError(f"stage2 checkpoint of the wrong kind for stage2_kind={self.stage2_kind!r}: in/out channels "
                             f"{c2.in_channels}/{c2.out_channels}, expected {want}/{z2} for a {z2}-channel VAE")

    @classmethod
    def tiny(cls, *, seed: int = 0, stage2_kind: str = "swift", device=None, memory="balanced",
             vae_dtype=None) -> "SwiftI2VPipeline":
        """The whole pipeline on tiny random-weight models (for demos and tests; the output is noise-like).
        ``memory``: the memory profile (see the class); ``vae_dtype``: ``"bf16"``/``"fp32"`` (default: bf16 on a
        GPU, fp32 on the CPU)."""
        from ..nets.config import WanDiTConfig
        from ..nets.dit import WanDiT

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            c1 = WanDiTConfig.preset("tiny-i2v")
            c2 = WanDiTConfig.preset("tiny-ti2v")
            if stage2_kind == "swift":
                c2 = c2.widened_input(extra_in_channels=c2.in_channels)
            stage1, stage2 = WanDiT(c1), WanDiT(c2)
        vae_dtype = parse_vae_dtype(vae_dtype) or default_vae_dtype(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        vae1 = WanVAE.tiny(16, seed=seed, dtype=vae_dtype)
        vae2 = WanVAE.tiny(48, seed=seed + 1, dtype=vae_dtype)
        text = TextEncoder.tiny(dim=c1.text_dim, seed=seed)
        if c2.text_dim != c1.text_dim:
            raise ValueError("tiny presets must share the text width")
        image_dim = getattr(c1, "image_dim", None)
        image = ImageEncoder.tiny(dim=image_dim, seed=seed) if image_dim else None
        return cls(stage1, stage2, vae1, vae2, text, image, stage2_kind=stage2_kind, device=device, memory=memory,
                   random_weights=True)

    @classmethod
    def from_pretrained(cls, stage1: str, stage2: str, *, stage1_lora: str | None = None, lora_scale: float = 1.0,
                        stage2_kind: str = "refine", text_encoder: str | None = None, load_text_encoder: bool = True,
                        device=None, dtype=None, memory="balanced", vae_dtype=None) -> "SwiftI2VPipeline":
        """Load both stages from diffusers-format or original Wan folders.

        Args:
            stage1: Stage I folder (e.g. Wan2.1-I2V-14B): DiT, VAE, and, when present, text and image encoders.
            stage2: Stage II folder (Wan2.2-TI2V-5B for ``"refine"``, SwiftI2V's own weights for ``"swift"``).
            stage1_lora: an optional LoRA (e.g. a 4-step distillation LoRA) merged into Stage I.
            stage2_kind: ``"refine"`` (public 5B, training-free) or ``"swift"`` (widened input).
            text_encoder: folder of the UMT5 encoder + tokenizer (default: ``stage1``'s).
            load_text_encoder: False to run from precomputed prompt embeddings only.
            memory: the memory profile (see the class); it also decides where each model is loaded to.
            vae_dtype: dtype of both VAEs, ``"bf16"``/``"fp32"`` (default: bf16 on a GPU, fp32 on the CPU).
        """
        from ..loading.checkpoint import load_dit
        from ..loading.preflight import check_checkpoints

        for name, p in (("stage1", stage1), ("stage2", stage2)):
            if not isinstance(p, (str, os.PathLike)) or not os.path.exists(p):
                raise ValueError(f"{name} checkpoint not found: {p}")
        plan = MemoryPlan.of(memory)
        # Every component is located, every config parsed and every weight header (names, shapes, dtypes, the
        # LoRA's keys) checked before the first weight is read: a broken file costs milliseconds, not a 14B load.
        checked = check_checkpoints(stage1, stage2, stage1_lora=stage1_lora, text_encoder=text_encoder,
                                    need_text_encoder=load_text_encoder)
        dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        vae_dtype = parse_vae_dtype(vae_dtype) or default_vae_dtype(dev)

        def load_dev(component):
            return dev if plan.initial(component) == "device" else torch.device("cpu")

        s1 = load_dit(checked.stage1, device=load_dev("stage1"), dtype=dtype, lora=stage1_lora,
                      lora_scale=lora_scale, stage="stage1")
        info2 = checked.stage2
        # A public checkpoint used as the method's network: widen the input (the extra channels start at
        # zero), decided from the headers so that the weights are read once.
        extra = info2.config.in_channels if stage2_kind == "swift" and info2.config.in_channels == info2.config.out_channels else 0
        s2 = load_dit(info2, device=load_dev("stage2"), dtype=dtype, extra_in_channels=extra)
        vae1 = WanVAE.from_pretrained(stage1, device=load_dev("vae1"), dtype=vae_dtype)
        vae2 = WanVAE.from_pretrained(stage2, device=load_dev("vae2"), dtype=vae_dtype)
        text = None
        if load_text_encoder:
            text = TextEncoder.from_pretrained(text_encoder or stage1, device="cpu", dtype=dtype)
        image = None
        if getattr(s1.config, "image_dim", None):
            image = ImageEncoder.from_pretrained(stage1, device="cpu", dtype=dtype)
        return cls(s1, s2, vae1, vae2, text, image, stage2_kind=stage2_kind, device=dev, memory=plan)

    # -- helpers --------------------------------------------------------------------------------------

    def _phase(self, name: str):
        """The body runs as phase ``name`` of the memory plan (what it does not keep is evicted first)."""
        return self.residency.phase(name, self._components())

    def check_inputs(self, frames: int, width: int, height: int) -> None:
        """Raise when the pipeline cannot produce a ``frames`` x ``width`` x ``height`` video: ``TypeError`` for a
        non-int, ``ValueError`` for a value it cannot make (frames not ``4k + 1 >= 5``, sizes not multiples of
        what the VAEs need)."""
        check_request(frames, width, height, size_multiple=max(self.vae1.size_multiple * 4, self.vae2.size_multiple))

    # -- generation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, image, prompt: str | None = None, *, prompt_embeds=None, frames: int = 81, width: int = 2560,
                 height: int = 1408, steps: int = 4, shift: float = 5.0, segment_blocks: int = 2, neighbors=(1, 0),
                 stage2_kind: str | None = None, joint: bool = False, start_sigma: float = 0.6, seed: int = 0,
                 step_mode: str = "renoise", output: str | None = None, fps: int = 16,
                 progress: bool = True, free_text_encoder: bool = False, guidance_scale: float | None = None,
                 negative_prompt: str = "", negative_prompt_embeds=None, image_embeds=None,
                 shared_anchor: bool = False) -> GenerationResult:
        """Generate a video from ``image`` and a prompt.

        Args:
            image: a path or a PIL image (resized and centre-cropped to the output aspect).
            prompt: the text prompt (needs the text encoder; ignored when ``prompt_embeds`` is given).
            prompt_embeds: a float ``[1, L, text_dim]`` tensor or a safetensors path (tensor ``"prompt_embeds"``),
                in place of the text encoder.
            frames: output frames, ``4k + 1`` and ``>= 5`` (default 81).
            width, height: output size in pixels (default 2560 x 1408); multiples of what both VAEs need
                (:meth:`check_inputs` says). Stage I runs at a quarter of each side.
            steps: sampling steps per stage (default 4); shift: flow-matching timestep shift (default 5.0).
            segment_blocks: ``M``, latent frames per CSG segment (default 2); neighbors: ``(NL, NR)`` or
                ``"NL,NR"``, clean neighbour latent frames each segment sees (default ``(1, 0)``).
            stage2_kind: ``None`` (the pipeline's own) or the same kind it was built for.
            joint: denoise all segments at once (clip-mode attention) instead of one window at a time.
            start_sigma: the noise level each segment starts from, in ``(0, 1]`` (``"refine"`` kind only;
                default 0.6).
            seed: a non-negative int; the same seed gives the same video. step_mode: ``"renoise"`` or ``"euler"``.
            output: write the mp4 there (decoded frames stream into a temporary file, renamed when complete).
            fps: frame rate of the mp4, an int ``>= 1`` (default 16).
            progress: show progress bars. free_text_encoder: drop the text encoder after encoding.
            guidance_scale: classifier-free guidance in both stages (``None`` or 1.0: off, the default; the
                4-step models are distilled without it); the unconditional branch uses ``negative_prompt``
                (empty by default) or ``negative_prompt_embeds``, and costs a second DiT call per step.
            image_embeds: CLIP image tokens ``[1, N, image_dim]`` for a Stage I DiT that takes them, in place of
                the CLIP image encoder.
            shared_anchor: the anchor (the input image's latent frame) attends only itself in every Stage II
                window (``CSGPlan(anchor_attends="anchor")``), for Stage II networks trained that way
                (``swift-i2v train --shared-anchor``). A departure from the paper, whose windows are dense;
                off by default. The anchor's keys and values are then computed once per conditioning and
                reused by every window and step (:meth:`~swift_model.nets.dit.WanDiT.precompute_anchor`).

        Returns:
            a :class:`GenerationResult`: the video as a uint8 ``[frames, height, width, 3]`` tensor (``None``
            when ``output`` is given), the output path, the Stage II latents, seconds per stage and peak memory.

        Raises ``TypeError``/``ValueError`` naming the argument for bad input, before any model runs.
        """
        kind = stage2_kind or self.stage2_kind
        if kind != self.stage2_kind:
            raise ValueError(f"this pipeline's Stage II DiT is built for stage2_kind={self.stage2_kind!r}, got {kind!r}")
        self.check_inputs(frames, width, height)
        neighbors = parse_neighbors(neighbors)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if guidance_scale is not None:
            if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not guidance_scale > 0:
                raise ValueError(f"guidance_scale must be a positive float or None, got {guidance_scale!r}")
            guidance_scale = None if float(guidance_scale) == 1.0 else float(guidance_scale)
        if not isinstance(shared_anchor, bool):
            raise TypeError(f"shared_anchor must be a bool, got {type(shared_anchor).__name__}")
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        if prompt_embeds is None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string (or pass prompt_embeds), got {type(prompt).__name__}")
        for name, emb in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if emb is not None and not isinstance(emb, (str, os.PathLike)):
                if not isinstance(emb, torch.Tensor) or not emb.is_floating_point():
                    raise TypeError(f"{name} must be a float tensor or a safetensors path, got "
                                    f"{getattr(emb, 'dtype', type(emb).__name__)}")
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps must be an int, got {type(steps).__name__}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        # checked for every kind, so a bad value is not silently ignored by the "swift" kind
        if isinstance(start_sigma, bool) or not isinstance(start_sigma, (int, float)) or not 0 < start_sigma <= 1:
            raise ValueError(f"start_sigma must be a number in (0, 1], got {start_sigma!r}")
        if isinstance(fps, bool) or not isinstance(fps, int):
            raise TypeError(f"fps must be an int, got {type(fps).__name__}")
        if fps < 1:
            raise ValueError(f"fps must be >= 1, got {fps}")
        if output is not None:
            from ..io.video import check_output_path

            output = check_output_path(output)
        if isinstance(image, (str, os.PathLike)):
            image = read_image(image)
        par = self.parallel
        check_sizes(self, par, frames, width, height, segment_blocks, neighbors, joint)
        progress = progress and par.is_main
        dev = self.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        seconds: dict[str, float] = {}
        self.residency.h2d_bytes.clear()
        t_start = time.perf_counter()
        w1, h1 = width // 4, height // 4
        img_full = image_to_tensor(image, width, height)
        img_low = image_to_tensor(image, w1, h1)

        # -- conditioning --
        t0 = time.perf_counter()
        with self._phase("text_encoding"):
            if prompt_embeds is None:
                if self.text_encoder is None:
                    raise ValueError("no text encoder loaded: pass prompt_embeds (a tensor or a safetensors file)")
                context = self.text_encoder.encode(prompt)
            elif isinstance(prompt_embeds, (str, os.PathLike)):
                context = load_prompt_embeds(prompt_embeds)
            else:
                context = prompt_embeds.float()
            if context.dim() != 3 or context.shape[-1] != self.stage1.config.text_dim:
                raise ValueError(f"prompt embeddings must be [1, L, {self.stage1.config.text_dim}], got {tuple(context.shape)}")
            neg_context = None
            if guidance_scale is not None:
                if negative_prompt_embeds is not None:
                    neg_context = (load_prompt_embeds(negative_prompt_embeds)
                                   if isinstance(negative_prompt_embeds, (str, os.PathLike)) else negative_prompt_embeds.float())
                elif self.text_encoder is not None:
                    neg_context = self.text_encoder.encode(negative_prompt)
                else:
                    raise ValueError("guidance needs a negative prompt: load a text encoder or pass negative_prompt_embeds")
                if neg_context.dim() != 3 or neg_context.shape[-1] != context.shape[-1]:
                    raise ValueError(f"negative prompt embeddings must be [1, L, {context.shape[-1]}], got {tuple(neg_context.shape)}")
            if free_text_encoder:
                self.text_encoder = None
            clip_fea = None
            image_dim = getattr(self.stage1.config, "image_dim", None)
            if image_embeds is not None:
                if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3 or image_embeds.shape[-1] != image_dim:
                    raise ValueError(f"image_embeds must be a [1, N, {image_dim}] tensor for this Stage I DiT, got "
                                     f"{getattr(image_embeds, 'shape', type(image_embeds).__name__)}")
                clip_fea = image_embeds
            elif self.image_encoder is not None:
                clip_fea = self.image_encoder.encode(img_low)
            elif image_dim:
                raise ValueError("this Stage I DiT takes CLIP image tokens: load a CLIP image encoder or pass image_embeds")
        seconds["encode_prompt"] = time.perf_counter() - t0

        # -- Stage I --
        t0 = time.perf_counter()
        sched = flow_steps(steps, shift)
        with self._phase("stage1"):
            z1 = self._stage1(img_low, context, clip_fea, frames, h1, w1, sched, seed, step_mode, progress,
                              neg_context, guidance_scale)
            _sync(dev)
        seconds["stage1"] = time.perf_counter() - t0

        # -- bridge --
        t0 = time.perf_counter()
        with self._phase("bridge"):
            if par.distributed:  # the 2K encode's tiles over the ranks (bitwise the one-process encode)
                z_ref = vae_parallel.encode(self.vae2, reference_video(z1, self.vae1, img_full, height, width),
                                            par.group)
            else:
                z_ref = hybrid_reference(z1, self.vae1, self.vae2, img_full, height, width)
            _sync(dev)
        seconds["bridge"] = time.perf_counter() - t0

        # -- Stage II --
        t0 = time.perf_counter()
        T, hh, ww = z_ref.shape[2:]
        plan = CSGPlan(T, segment_blocks, neighbors, block_tokens=(hh // 2) * (ww // 2),
                       anchor_attends="anchor" if shared_anchor else "all")
        sched2 = flow_steps(steps, shift, start_sigma=start_sigma if kind == "refine" else 1.0)
        with self._phase("stage2"):
            z2 = self._stage2(z_ref.to(dev), context, plan, sched2, kind, joint, start_sigma, seed, step_mode, progress,
                              neg_context, guidance_scale)
            _sync(dev)
        seconds["stage2"] = time.perf_counter() - t0

        # -- decode + write --
        t0 = time.perf_counter()
        with self._phase("decode"):
            if par.distributed:
                # each rank decodes its share of the tiles; rank 0 blends them (bitwise the one-process decode)
                frames_ = vae_parallel.decode_uint8(self.vae2, z2[:1], par.group, progress=progress)
                chunks = None if frames_ is None else iter((frames_,))
            else:
                # Tile-major decode (device: one tile's caches), blended to uint8 frames on the host.
                chunks = self.vae2.decode_uint8_stream(z2[:1], progress=progress)
            if chunks is None:
                video = output = None  # rank 0 alone writes the video
            elif output is not None:
                write_mp4(chunks, output, fps=fps)
                video = None
            else:
                video = torch.cat(list(chunks), 0)
            _sync(dev)
        seconds["decode"] = time.perf_counter() - t0
        seconds["total"] = time.perf_counter() - t_start
        info = dict(frames=frames, width=width, height=height, steps=steps, seed=seed, stage2_kind=kind, joint=joint,
                    segment_blocks=segment_blocks, neighbors=list(neighbors), segments=plan.num_segments,
                    stage1_size=[w1, h1], latent_frames=T, max_window_tokens=plan.max_window_tokens,
                    guidance_scale=guidance_scale, shared_anchor=shared_anchor, device=str(dev),
                    random_weights=self.random_weights, memory=self.memory.profile,
                    h2d_bytes=dict(self.residency.h2d_bytes), **par.report())
        return GenerationResult(video, output, z2.cpu(), seconds, _peak_memory(dev), info)

    __call__ = generate

    # -- stages ---------------------------------------------------------------------------------------

    def _stage1(self, img_low, context, clip_fea, frames, h1, w1, sched, seed, step_mode, progress,
                neg_context=None, guidance=None):
        dev = self.device
        dit = self.stage1
        dtype = next(dit.parameters()).dtype
        vae = self.vae1
        C, T, h, w = vae.latent_shape(frames, h1, w1)
        # Wan2.2 TI2V: the image latent is clean frame 0 at timestep 0; Wan2.1 I2V: mask channels and the
        # latents of [image, black...] concatenated to the noisy latents (the same function prepares training
        # references, so Stage I is conditioned alike in both).
        ti2v, cond = stage1_conditioning(dit, vae, img_low, frames, dev)
        if not ti2v:
            cond = cond.to(dtype)  # cast once, not per step
        clip = None if clip_fea is None else clip_fea.to(dev, dtype)
        cache = dit.precompute_context(context.to(dev, dtype), clip)
        # The unconditional branch keeps the image conditioning (and CLIP tokens) and drops the prompt only.
        neg_cache = dit.precompute_context(neg_context.to(dev, dtype), clip) if guidance is not None else None
        x = gaussian((1, C, T, h, w), seed, 1, dev, torch.float32)
        numel = x.numel()
        for i, (t, sigma, sigma_next) in enumerate(_tqdm(progress, iterable=sched, desc="stage I", unit="step")):
            inp, tt = stage1_model_input(x, ti2v, cond, t, dtype)
            v = self.parallel.velocities(
                lambda c: dit(inp, tt, None, context_cache=c, sp_group=self.parallel.sp_group).float(),
                cache, neg_cache, guidance is not None)
            g = {}
            if guidance is not None:
                v, g = v[0], dict(v_uncond=v[1], guidance=guidance)
            x = flow_update(x, v, sigma, sigma_next, mode=step_mode, seed=seed, offset=(i + 1) * numel, **g)
        if ti2v:
            x[:, :, :1] = cond
        return x

    def _stage2(self, z_ref, context, plan, sched, kind, joint, start_sigma, seed, step_mode, progress,
                neg_context=None, guidance=None):
        dev = self.device
        dit = self.stage2
        dtype = next(dit.parameters()).dtype
        C = z_ref.shape[1]
        cache = dit.precompute_context(context.to(dev, dtype), None)
        neg_cache = dit.precompute_context(neg_context.to(dev, dtype), None) if guidance is not None else None

        anchors = {}  # shared anchor: its keys and values per conditioning, computed on the first call
        sp = self.parallel.sp_group

        def call(inp, tt, positions, layout, ctx):
            anchor = None
            if plan.anchor_attends == "anchor" and sp is None:  # the anchor's cache is for unsplit sequences
                anchor = anchors.get(id(ctx))
                if anchor is None:
                    A = plan.anchor_blocks
                    anchor = anchors[id(ctx)] = dit.precompute_anchor(inp[:, :, :A], ctx, positions[:A])
            return dit(inp, tt, None, layout=layout, frame_positions=positions, context_cache=ctx,
                       anchor_cache=anchor, sp_group=sp)[:, :C].float()

        def model_fn(inp, ref, tt, positions, layout):
            # "swift": inp is the model input cat([state, z_ref window]) already in the DiT's dtype, written
            # by the sampler step itself (run_csg(fuse_ref=True)); "refine": inp is the state.
            inp = inp.to(dtype)
            return self.parallel.velocities(lambda c: call(inp, tt, positions, layout, c), cache, neg_cache,
                                            guidance is not None)

        n_units = 1 if joint else plan.num_segments
        seg_bar = _tqdm(progress, total=n_units, desc="stage II (joint)" if joint else "stage II", unit="segment")
        step_bar = _tqdm(progress, total=len(sched), desc="  steps", unit="step", leave=False)

        def on_progress(event, index, total):
            if event == "segment":
                if index > 0:
                    seg_bar.update(1)
                step_bar.reset(total=len(sched))
            else:
                step_bar.update(1)

        try:
            # seed + 1: Stage II draws its own Philox stream, independent of Stage I's.
            out = run_csg(model_fn, z_ref.float(), plan, sched, kind=kind, start_sigma=start_sigma, seed=seed + 1,
                          step_mode=step_mode, joint=joint, progress=on_progress, fuse_ref=kind == "swift",
                          input_dtype=dtype, guidance=guidance)
            seg_bar.update(1)
        finally:
            step_bar.close()
            seg_bar.close()
        return out
