"""A memory and FLOP estimate of a generation that needs no GPU (pipeline layer): ``swift-i2v plan``.

:func:`plan_generation` builds the pipeline's models at their real size on fake tensors
(``torch._subclasses.FakeTensorMode``: shapes, dtypes and devices, no data), on a fake ``cuda`` device, and
runs the phases of :meth:`SwiftI2VPipeline.generate <swift_model.generation.pipeline.SwiftI2VPipeline.generate>` through
the same code: the same :class:`~swift_model.generation.memory.Residency` moves the weights as the
:class:`~swift_model.generation.memory.MemoryPlan` says (so the estimate and the run keep the same things resident),
the same Stage I loop, bridge, CSG loop and VAE decoder. Per phase it reports:

- ``peak_bytes``: the most device bytes alive at once (weights, activations, caches), counted by
  :class:`LiveStorageTracker`, a dispatch mode that sees every storage created on the device and, through a
  weakref finalizer, its release (sizes rounded up to the CUDA allocator's 512 bytes);
- ``flops``: ``torch.utils.flop_counter.FlopCounterMode``'s count (our attention op counts allowed token pairs
  only);
- ``h2d_bytes``: bytes copied to the device: weights brought in by the plan, blocks streamed by ``24gb``.

Repetition is not re-run: a transformer block, the VAE encoder or decoder called again with inputs of the same
shapes (and caches of the same shapes) runs the same operations on tensors of the same sizes, so its FLOPs,
its transient peak above what was alive when it was called, and the shapes of what it returns and leaves in its
caches are those of the first such call (:class:`_Replay`); only the first call per signature executes. The
shortcut is tested against full runs.

Everything here is an **estimate**: the caching allocator's fragmentation, the CUDA context, library
workspaces (cuBLAS, cuDNN) and the CPU side are not counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
import weakref

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..nets.config import WanDiTConfig
from ..generation.csg import CSGPlan, flow_steps
from ..generation.memory import PHASES, MemoryPlan
from ..generation.pipeline import SwiftI2VPipeline, check_request
from ..nets.vae import default_dtype as default_vae_dtype
from ..nets.vae import parse_dtype as parse_vae_dtype

ALLOCATOR_ROUND = 512  # the CUDA caching allocator rounds every block up to 512 bytes

# The public encoders' architectures (for --stage1-preset, where no folder holds their configs):
# UMT5-XXL's encoder (Wan's text encoder) and the ViT-H/14 vision tower of Wan2.1 I2V's CLIP.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)


# -------------------------------------------------------------------------------------------------------------
# counting
# -------------------------------------------------------------------------------------------------------------


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of the storages alive on one device type, and their peak.

    Every tensor an operation returns is looked at; a storage seen for the first time on ``device_type`` is
    added (its size rounded up to :data:`ALLOCATOR_ROUND`) and a ``weakref.finalize`` on it subtracts it when
    the storage is freed. Works on real and fake tensors alike. :meth:`track` adds tensors created before the
    mode was entered (weights).
    """

    def __init__(self, device_type: str = "cuda") -> None:
        super().__init__()
        self.device_type = device_type
        self.live_bytes = 0
        self.peak_bytes = 0
        self.ops = 0
        self._live: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, *tensors: torch.Tensor) -> None:
        """Count the storages of ``tensors`` (those on the tracked device type, once each)."""
        for t in tensors:
            # a fake tensor's device without a dispatch
            if (getattr(t, "fake_device", None) or t.device).type != self.device_type:
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in self._live:
                continue
            n = -(-st.nbytes() // ALLOCATOR_ROUND) * ALLOCATOR_ROUND
            self._live[key] = n
            self.live_bytes += n
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def bump(self, bytes_alive: int) -> None:
        """Record that ``bytes_alive`` bytes were alive at some moment (a replayed call's transient peak)."""
        self.peak_bytes = max(self.peak_bytes, bytes_alive)

    @contextlib.contextmanager
    def section(self):
        """Measure the peak of the body alone; yields a dict that gets ``peak`` when the body ends."""
        saved = self.peak_bytes
        self.peak_bytes = self.live_bytes
        result = {}
        try:
            yield result
        finally:
            result["peak"] = self.peak_bytes
            self.peak_bytes = max(saved, self.peak_bytes)


def _signature(x):
    """What determines the work of a call: tensor shapes/dtypes/devices/strides, Python values, the identity of
    attention plans (their tables decide the attention FLOPs), recursively."""
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, str(x.device), tuple(x.stride()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_signature(v) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple(sorted((k, _signature(v)) for k, v in x.items())))
    if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device)):
        return x
    if type(x).__name__ == "AttentionPlan":
        # a dense plan's work is set by its size (every CSG window of one size runs the same dense attention);
        # a block-sparse plan's by its tables
        return ("dense", x.num_tokens, x.block_tokens, str(x.device)) if x.dense else ("plan", id(x))
    if dataclasses.is_dataclass(x):
        return (type(x).__name__, tuple(_signature(getattr(x, f.name)) for f in dataclasses.fields(x)))
    if hasattr(x, "__dict__"):
        return (type(x).__name__, tuple(sorted((k, _signature(v)) for k, v in vars(x).items())))
    return ("id", id(x))


def _empty_like_sig(sig):
    _, shape, dtype, device, stride = sig
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


class _Replay:
    """Wraps a module's ``forward`` so that a call whose :func:`_signature` was seen before is not executed but
    replayed: outputs (and the tensors it leaves in list arguments, the VAE's causal caches) are allocated
    with the recorded shapes, the recorded FLOPs are added and the recorded transient peak above the bytes alive
    at the call is reported to the tracker. Exact for calls whose operations depend only on what the signature
    holds (true of the transformer blocks and the VAE encoder/decoder)."""

    def __init__(self, module: torch.nn.Module, planner: "_Counters", records: dict | None = None) -> None:
        self.module, self.planner = module, planner
        self.inner = module.forward
        # modules of one architecture (a DiT's blocks) share their records: the key holds their weights' shapes
        self.records: dict = {} if records is None else records
        self.hits = self.misses = 0
        module.forward = self

    def __call__(self, *args, **kwargs):
        weights = tuple((tuple(t.shape), t.dtype, str(getattr(t, "fake_device", None) or t.device))
                        for t in self.module.parameters())
        key = (type(self.module).__name__, weights, _signature((args, kwargs)))
        tracker, rec = self.planner.tracker, self.records.get(key)
        lists = [v for v in (*args, *kwargs.values()) if isinstance(v, list)]
        if rec is None:
            self.misses += 1
            before = [[_signature(e) for e in lst] for lst in lists]
            live0, flops0 = tracker.live_bytes, self.planner.flops()
            # the input storages are held while the call runs, so that their ids stay theirs
            held = [(i, t.untyped_storage()) for i, t in enumerate(pytree.tree_leaves((args, kwargs)))
                    if isinstance(t, torch.Tensor)]
            with tracker.section() as sec:
                out = self.inner(*args, **kwargs)
            leaves, spec = pytree.tree_flatten(out)

            def kind(t):
                if not isinstance(t, torch.Tensor):
                    return ("value", t)
                st = t.untyped_storage()
                same = [i for i, s in held if s is st]
                if same and tuple(t.shape) == tuple(pytree.tree_leaves((args, kwargs))[same[0]].shape):
                    return ("alias", same[0])  # returned (a same-shaped view of) an input: no new storage
                return ("new", _signature(t))

            outs = [kind(t) for t in leaves]
            del held
            changes = [[(i, _signature(e), None if isinstance(e, torch.Tensor) else e)
                        for i, e in enumerate(lst) if i >= len(b) or _signature(e) != b[i]]
                       for lst, b in zip(lists, before)]
            self.records[key] = dict(peak=sec["peak"] - live0, flops=self.planner.flops() - flops0, outs=outs,
                                     spec=spec, changes=changes)
            return out
        self.hits += 1
        tracker.bump(tracker.live_bytes + rec["peak"])
        self.planner.extra_flops += rec["flops"]
        for lst, changes in zip(lists, rec["changes"]):
            for i, sig, value in changes:
                e = _empty_like_sig(sig) if isinstance(sig, tuple) and sig and sig[0] == "T" else value
                if i < len(lst):
                    lst[i] = e
                else:
                    lst.append(e)
        inputs = pytree.tree_leaves((args, kwargs))
        leaves = [inputs[v] if kind == "alias" else (_empty_like_sig(v) if kind == "new" else v)
                  for kind, v in rec["outs"]]
        return pytree.tree_unflatten(leaves, rec["spec"])


class _Counters:
    """The tracker and the FLOP counter of one plan, plus the FLOPs of replayed calls."""

    def __init__(self, device_type: str) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self.tracker = LiveStorageTracker(device_type)
        self.flop_counter = FlopCounterMode(display=False)
        self.extra_flops = 0

    def flops(self) -> int:
        return int(self.flop_counter.get_total_flops()) + self.extra_flops


# -------------------------------------------------------------------------------------------------------------
# the models, at their real size, without weights
# -------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture of every model of a generation (no weights).

    ``stage1`` / ``stage2``: the DiT configs as the pipeline builds them (Stage II widened for ``"swift"``);
    ``vae1`` / ``vae2``: ``AutoencoderKLWan`` arguments; ``text_encoder``: ``UMT5Config`` arguments or ``None``
    (prompt embeddings given); ``image_encoder``: ``CLIPVisionConfig`` arguments or ``None``.
    """

    stage1: WanDiTConfig
    stage2: WanDiTConfig
    vae1: dict
    vae2: dict
    text_encoder: dict | None
    image_encoder: dict | None
    stage2_kind: str


def _public_vae(z_dim: int) -> dict:
    from ..nets.vae import (WAN21_CONFIG, WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WAN22_CONFIG, WAN22_LATENTS_MEAN,
                      WAN22_LATENTS_STD)

    if z_dim == 16:
        return dict(WAN21_CONFIG, latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD)
    if z_dim == 48:
        return dict(WAN22_CONFIG, latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD)
    raise ValueError(f"no public Wan VAE has {z_dim} latent channels (16: Wan2.1, 48: Wan2.2)")


def _stage2_config(cfg: WanDiTConfig, kind: str) -> WanDiTConfig:
    # as from_pretrained: a public (unwidened) checkpoint used for the "swift" kind is widened
    if kind == "swift" and cfg.in_channels == cfg.out_channels:
        return cfg.widened_input(cfg.in_channels)
    return cfg


def tiny_spec(stage2_kind: str = "swift") -> ModelSpec:
    """The architectures of :meth:`SwiftI2VPipeline.tiny <swift_model.generation.pipeline.SwiftI2VPipeline.tiny>`."""
    from ..nets.vae import _tiny_config

    c1, c2 = WanDiTConfig.preset("tiny-i2v"), WanDiTConfig.preset("tiny-ti2v")
    if stage2_kind == "swift":
        c2 = c2.widened_input(extra_in_channels=c2.in_channels)
    text = dict(vocab_size=258, d_model=c1.text_dim, d_kv=8, d_ff=2 * c1.text_dim, num_layers=2,
                num_heads=max(1, c1.text_dim // 8), relative_attention_num_buckets=8, relative_attention_max_distance=32)
    image = dict(hidden_size=c1.image_dim, intermediate_size=2 * c1.image_dim, num_hidden_layers=2,
                 num_attention_heads=max(1, c1.image_dim // 8), image_size=32, patch_size=8)
    return ModelSpec(c1, c2, _tiny_config(16), _tiny_config(48), text, image, stage2_kind)


def preset_spec(stage1: str = "wan2.1-i2v-14b", stage2: str = "wan2.2-ti2v-5b", *, stage2_kind: str = "refine",
                text_encoder: bool = True) -> ModelSpec:
    """The architectures of built-in presets (``WanDiTConfig.preset`` names) with the public VAEs and encoders."""
    c1, c2 = WanDiTConfig.preset(stage1), WanDiTConfig.preset(stage2)
    return ModelSpec(c1, _stage2_config(c2, stage2_kind), _public_vae(c1.out_channels), _public_vae(c2.out_channels),
                     dict(UMT5_XXL) if text_encoder else None, dict(CLIP_VIT_H) if c1.image_dim else None, stage2_kind)


def checkpoint_spec(stage1, stage2, *, stage2_kind: str = "refine", text_encoder=None,
                    load_text_encoder: bool = True) -> ModelSpec:
    """The architectures in checkpoint folders, from their configs and headers only (no weight is read). The
    components are found as ``generate`` finds them (:func:`~swift_model.loading.preflight.check_checkpoints`: the same
    errors, naming stage and file)."""
    from ..io.files import read_json
    from ..loading.preflight import check_checkpoints

    found = check_checkpoints(stage1, stage2, text_encoder=text_encoder, need_text_encoder=load_text_encoder)
    c1 = found.stage1.config
    c2 = _stage2_config(found.stage2.config, stage2_kind)

    def fields(where):
        # a diffusers/transformers folder's config.json without its "_" bookkeeping fields, or None
        cfg_file = os.path.join(where, "config.json")
        if not os.path.isfile(cfg_file):
            return None
        return {k: v for k, v in read_json(cfg_file).items() if not k.startswith("_")}

    def vae(located, z_dim):
        layout, where = located
        return fields(where) if layout == "diffusers" else _public_vae(z_dim)

    def hf_config(located, defaults):
        layout, model_path = located[:2]
        cfg = fields(model_path) if layout != "original" else None
        return dict(defaults) if cfg is None else cfg

    text = hf_config(found.text_encoder, UMT5_XXL) if found.text_encoder is not None else None
    image = hf_config(found.image_encoder, CLIP_VIT_H) if found.image_encoder is not None else None
    return ModelSpec(c1, c2, vae(found.vae1, c1.out_channels), vae(found.vae2, c2.out_channels), text, image,
                     stage2_kind)


def _meta_models(spec: ModelSpec):
    """The networks of ``spec`` on the meta device (no storage): both DiTs, both VAEs' diffusers models, and
    the text and image encoders' transformers models (``None`` where ``spec`` has none)."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from ..nets.dit import WanDiT

    with torch.device("meta"):
        s1, s2 = WanDiT(spec.stage1), WanDiT(spec.stage2)
        v1, v2 = AutoencoderKLWan(**spec.vae1), AutoencoderKLWan(**spec.vae2)
        text = UMT5EncoderModel(UMT5Config(**spec.text_encoder)) if spec.text_encoder else None
        image = CLIPVisionModel(CLIPVisionConfig(**spec.image_encoder)) if spec.image_encoder else None
    return s1, s2, v1, v2, text, image


def _meta_pipeline(spec: ModelSpec, device, plan: MemoryPlan, dtype, vae_dtype) -> SwiftI2VPipeline:
    """The pipeline of ``spec`` with every weight a fake CPU tensor (call inside the fake mode)."""
    from ..nets.encoders import ByteTokenizer, ImageEncoder, TextEncoder
    from ..nets.vae import WanVAE

    def fake(module, dt=None):
        # a fake CPU tensor for every meta parameter and buffer (to_empty would try to swap the tensors)
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    target = dt if dt is not None and p.is_floating_point() else p.dtype
                    mod._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=target, device="cpu"),
                                                               requires_grad=False)
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="cpu")
        return module

    s1, s2, v1, v2, text, image = _meta_models(spec)
    for dit in (s1, s2):
        dit.to_dtype(dtype)
        fake(dit).eval()
    vae1, vae2 = WanVAE(fake(v1, vae_dtype)), WanVAE(fake(v2, vae_dtype))
    te = TextEncoder(fake(text, dtype), ByteTokenizer(int(text.config.vocab_size))) if text is not None else None
    ie = ImageEncoder(fake(image, dtype), int(image.config.image_size)) if image is not None else None
    return SwiftI2VPipeline(s1, s2, vae1, vae2, te, ie, stage2_kind=spec.stage2_kind, device=device, memory=plan)


# -------------------------------------------------------------------------------------------------------------
# the plan
# -------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PlanResult:
    """What :func:`plan_generation` estimates (every number is an estimate)."""

    profile: str
    phases: dict  # phase -> {"peak_bytes", "flops", "h2d_bytes"}
    info: dict
    # the layout of the ranks; with several, every figure is rank 0's (see plan_ranks)
    parallel: dict = dataclasses.field(default_factory=lambda: dict(world_size=1, ulysses=1, cfg_parallel=False,
                                                                    fsdp=False))

    @property
    def peak_bytes(self) -> int:
        return max(p["peak_bytes"] for p in self.phases.values())

    @property
    def flops(self) -> int:
        return sum(p["flops"] for p in self.phases.values())

    def to_json(self) -> dict:
        """``{"profile", "phases": {name: {"peak_bytes", "flops", "h2d_bytes"}}, "peak_bytes", "flops",
        "world_size", "parallel": {"ulysses", "cfg_parallel", "fsdp"}}`` (figures per rank: rank 0's)."""
        par = self.parallel
        return dict(profile=self.profile, phases={k: dict(v) for k, v in self.phases.items()},
                    peak_bytes=self.peak_bytes, flops=self.flops, world_size=par["world_size"],
                    parallel=dict(ulysses=par["ulysses"], cfg_parallel=par["cfg_parallel"], fsdp=par["fsdp"]))


def _unique_two(orig):
    """``torch.unique`` for the fake run: the pipeline's per-token timesteps hold two values (0 on the
    conditioning tokens, the step's on the noisy ones), which a fake tensor cannot tell."""

    @functools.wraps(orig)
    def unique(t, *args, return_inverse=False, **kwargs):
        from torch._subclasses.fake_tensor import FakeTensor

        if not isinstance(t, FakeTensor):
            return orig(t, *args, return_inverse=return_inverse, **kwargs)
        values = torch.empty(2, dtype=t.dtype, device=t.device)
        if return_inverse:
            return values, torch.empty(t.shape, dtype=torch.long, device=t.device)
        return values

    return unique


@contextlib.contextmanager
def _own_plan_cache():
    """Plans built on fake tensors must not stay in swift_kernels' plan cache (a later real run on the same
    device would find their fake tables): the cache is set aside for the plan and restored afterwards."""
    from swift_kernels.attention import plan as plans

    with plans._lock:
        saved, saved_ids = dict(plans._cache), dict(plans.PLANS_BY_ID)
        plans._cache.clear()
        plans.PLANS_BY_ID.clear()
    try:
        yield
    finally:
        with plans._lock:
            plans._cache.clear()
            plans._cache.update(saved)
            plans.PLANS_BY_ID.clear()
            plans.PLANS_BY_ID.update(saved_ids)


def _fused_sdpa(orig):
    """``F.scaled_dot_product_attention`` as a GPU runs it, for a fake ``cuda`` run.

    On fake tensors SDPA cannot ask the device which fused kernel it supports and falls back to the math path,
    which materialises the ``[B, H, Lq, Lk]`` fp32 scores (1.4 GiB per call for Stage I's cross-attention at
    81 frames): memory a GPU never allocates. A GPU runs FlashAttention (fp16/bf16, head dim <= 256) or the
    memory-efficient kernel (otherwise), each allocating the output and a log-sum-exp; the fake run calls the
    same aten kernels, whose meta functions give those allocations and which FlopCounterMode counts.
    """

    @functools.wraps(orig)
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        from torch._subclasses.fake_tensor import FakeTensor

        fused = (isinstance(query, FakeTensor) and query.device.type == "cuda" and attn_mask is None
                 and dropout_p == 0.0 and not enable_gqa and query.dim() == 4
                 and query.shape[-1] == key.shape[-1] == value.shape[-1])
        if not fused:
            return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        if query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, False,
                                                                       scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, False, 0.0,
                                                                       is_causal, scale=scale)[0]

    return sdpa


def _encode_text(text, spec: ModelSpec) -> torch.Tensor:
    """What ``TextEncoder.encode`` computes, from token ids (the token values do not change the estimate)."""
    if text is None:
        return torch.zeros(1, spec.stage1.text_len, spec.stage1.text_dim)
    dev = next(text.model.parameters()).device
    ids = torch.zeros(1, text.max_length, dtype=torch.long, device=dev)
    mask = torch.ones(1, text.max_length, dtype=torch.long, device=dev)
    hidden = text.model(ids, attention_mask=mask).last_hidden_state.float()
    return hidden * mask[..., None].float()


def _rope_any_positions(dit, grid, positions, device):
    # RoPE positions are data (a fake tensor's values are unknown); the table's size does not depend on them
    return type(dit)._rope(dit, grid, None, device)


def _anchor_any_positions(dit, latents, context_cache, frame_positions=None):
    # the shared anchor's cache records its positions as numbers (data of a fake tensor): the first ones stand
    # in; what the cache holds (per-block keys and values, the anchor's output) does not depend on them.
    # Its blocks run unreplayed: each call appends to a longer list of keys/values (no two calls alike), and a
    # replay record would keep the (k, v) it saw alive after the phase, unlike the run.
    replayed = [(b, b.__dict__["forward"]) for b in dit.blocks if isinstance(b.__dict__.get("forward"), _Replay)]
    for b, r in replayed:
        b.forward = r.inner
    try:
        return type(dit).precompute_anchor(dit, latents, context_cache, list(range(latents.shape[2])))
    finally:
        for b, r in replayed:
            b.forward = r


def _anchor_cache_unchecked(cache, layout, latents, timestep, positions, context_cache, sp_group, P) -> int:
    # the real run checks that a call's anchor blocks, positions and timesteps are the cache's: data that fake
    # tensors do not have; the anchor's token count is all the call needs
    return cache.blocks * P


@torch.no_grad()
def plan_generation(spec: ModelSpec, *, memory=None, frames: int = 81, width: int = 2560,
                    height: int = 1408, steps: int = 4, shift: float = 5.0, segment_blocks: int = 2,
                    neighbors=(1, 0), joint: bool = False, start_sigma: float = 0.6, guidance_scale=None,
                    device: str = "cuda", dtype=None, vae_dtype=None,
                    replay: bool = True, phases=None, world_size: int = 1, ulysses: int | None = None,
                    cfg_parallel: bool = False, fsdp: bool = False, shared_anchor: bool = False) -> PlanResult:
    """Estimate the device memory, FLOPs and host-to-device bytes of each phase of a generation.

    Args:
        spec: the models (:func:`preset_spec`, :func:`checkpoint_spec`, :func:`tiny_spec`).
        memory: the memory profile or :class:`~swift_model.generation.memory.MemoryPlan`.
        frames, width, height, steps, shift, segment_blocks, neighbors, joint, start_sigma, guidance_scale:
            as :meth:`SwiftI2VPipeline.generate <swift_model.generation.pipeline.SwiftI2VPipeline.generate>`.
        device: the device type to estimate (``"cuda"``; ``"cpu"`` to compare with a real CPU run).
        dtype: the DiTs' and encoders' dtype (default bf16 on ``cuda``, fp32 on ``cpu``, as ``from_pretrained``);
            vae_dtype: the VAEs' (``"bf16"``/``"fp32"`` or a dtype; default as ``generate``: bf16 on ``cuda``,
            fp32 on ``cpu``).
        replay: replay repeated block / VAE calls (:class:`_Replay`) instead of executing them.
        phases: run only these phases (default all); the others' results are stand-ins of their shapes. Each
            phase starts by evicting what it does not keep, so a phase's estimate does not depend on the others
            (tested), except under ``fast``, where everything is resident anyway.
        world_size, ulysses, cfg_parallel, fsdp: a ``torchrun --nproc-per-node world_size`` generation with
            ``generate``'s ``--ulysses``/``--cfg-parallel``/``--fsdp``, validated as ``generate`` validates
            them; the figures are then **rank 0's**: its code path runs here with a fake process group
            (:mod:`swift_model.planning.ranks`; FSDP2 is modelled there). ``memory=None`` is ``fast`` with ``fsdp``.
        shared_anchor: as ``generate(shared_anchor=True)``: the Stage II windows' anchor attends only itself and
            its per-block keys and values are cached (resident during ``stage2``).

    Returns a :class:`PlanResult`.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..nets import vae_parallel
    from ..generation.bridge import hybrid_reference, reference_video
    from ..generation.distributed import Parallelism, check_pipeline, check_sizes, memory_plan, resolve_degrees
    from .ranks import ShardedBlocksModel, fake_process_group

    guidance = None if guidance_scale in (None, 1.0) else float(guidance_scale)
    # the layout, checked as generate checks it (the same functions, the same messages)
    degrees = resolve_degrees(world_size, ulysses=ulysses, cfg_parallel=cfg_parallel, fsdp=fsdp,
                              guidance=guidance is not None)
    if isinstance(memory, MemoryPlan):
        plan = memory
        if fsdp and not plan.sharded_dits:
            plan = memory_plan(plan.profile, fsdp=True)
    else:
        plan = memory_plan(memory, fsdp=fsdp)
    if not isinstance(shared_anchor, bool):
        raise TypeError(f"shared_anchor must be a bool, got {type(shared_anchor).__name__}")
    neighbors = check_request(frames, width, height, segment_blocks=segment_blocks, neighbors=neighbors)
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    vae_dtype = parse_vae_dtype(vae_dtype) or default_vae_dtype(device)
    # host-side bookkeeping is computed on real tensors, before the fake mode
    sched = flow_steps(steps, shift)
    sched2 = flow_steps(steps, shift, start_sigma=start_sigma if spec.stage2_kind == "refine" else 1.0)
    w1, h1 = width // 4, height // 4
    counters = _Counters(device)
    tracker = counters.tracker
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    wanted = tuple(PHASES) if phases is None else tuple(phases)
    for p in wanted:
        if p not in PHASES:
            raise ValueError(f"phases must be among {PHASES}, got {p!r}")
    phases: dict[str, dict] = {}
    timings: dict[str, tuple] = {}
    resident: dict[str, list] = {}
    replays = []
    saved_unique, saved_sdpa = torch.unique, torch.nn.functional.scaled_dot_product_attention
    torch.unique = _unique_two(saved_unique)
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa(saved_sdpa)
    own_cache = _own_plan_cache()
    own_cache.__enter__()
    ranks = contextlib.ExitStack()
    try:
        with fake_mode:
            pipe = _meta_pipeline(spec, "cpu" if device == "cpu" else device, plan, dtype, vae_dtype)
        pipe.check_inputs(frames, width, height)
        layout = Parallelism(world_size=degrees["world_size"], ulysses=degrees["ulysses"],
                             cfg_parallel=degrees["cfg_parallel"], fsdp=degrees["fsdp"])
        check_pipeline(pipe, layout)
        check_sizes(pipe, layout, frames, width, height, segment_blocks, neighbors, joint)
        C2, T2, hh, ww = pipe.vae2.latent_shape(frames, height, width)
        csg = CSGPlan(T2, segment_blocks, neighbors, block_tokens=(hh // 2) * (ww // 2),
                      anchor_attends="anchor" if shared_anchor else "all")
        shards = []
        if degrees["world_size"] > 1:
            # rank 0 of the layout: the same groups as a real run, collectives that move no data
            ranks.enter_context(fake_process_group(degrees["world_size"]))
            pipe.parallel = Parallelism.build(ulysses=degrees["ulysses"], cfg_parallel=degrees["cfg_parallel"],
                                              fsdp=degrees["fsdp"], guidance=guidance is not None)
            if degrees["fsdp"]:
                with fake_mode:
                    for dit in (pipe.stage1, pipe.stage2):
                        shards += ShardedBlocksModel(dit, degrees["world_size"], pipe.device).shards
        par = pipe.parallel
        for dit in (pipe.stage1, pipe.stage2):
            dit._rope = functools.partial(_rope_any_positions, dit)
            dit.precompute_anchor = functools.partial(_anchor_any_positions, dit)
            dit._check_anchor_cache = _anchor_cache_unchecked
        if replay:
            for dit in (pipe.stage1, pipe.stage2):
                shared: dict = {}
                replays += [_Replay(b, counters, shared) for b in dit.blocks]
            for vae in (pipe.vae1, pipe.vae2):
                replays += [_Replay(vae.model.decoder, counters), _Replay(vae.model.encoder, counters)]
        # the weights already on the device (all of them under "fast", placed when the pipeline is built; on a
        # CPU plan, every weight, as a real CPU run has them) count from the start
        tracker.track(*[t for m in pipe._components().values() if m is not None
                        for t in (*m.parameters(), *m.buffers())], *shards)
        img_low, img_full = torch.zeros(3, h1, w1), torch.zeros(3, height, width)

        def phase(name):
            @contextlib.contextmanager
            def run():
                if name not in wanted:
                    yield False
                    return
                flops0 = counters.flops()
                ops0, t0 = tracker.ops, time.perf_counter()
                # the phase's count starts once the previous phase's weights have left, as on the device
                pipe.residency.evict(name, pipe._components())
                with tracker.section() as sec, pipe._phase(name):
                    resident[name] = [c for c, m in pipe._components().items() if m is not None and any(
                        (getattr(t, "fake_device", None) or t.device).type == device for t in m.parameters())]
                    yield True
                timings[name] = (tracker.ops - ops0, round(time.perf_counter() - t0, 2))
                phases[name] = dict(peak_bytes=int(sec["peak"]), flops=int(counters.flops() - flops0),
                                    h2d_bytes=int(pipe.residency.h2d_bytes.get(name, 0)))
            return run()

        with fake_mode, tracker, counters.flop_counter:
            if device != "cpu":
                # the sharded DiTs are where the sharding put them (as after distribute() in a real run)
                pipe.residency.place_initial({c: m for c, m in pipe._components().items()
                                              if not (degrees["fsdp"] and c in ("stage1", "stage2"))})
            pipe.residency.h2d_bytes.clear()
            C1, T1, hl, wl = pipe.vae1.latent_shape(frames, h1, w1)
            with phase("text_encoding") as run:
                # without the phase: stand-ins where the encoders would have left their results
                where = {c: pipe.device if plan.placement("text_encoding", c) == "device" else torch.device("cpu")
                         for c in ("text_encoder", "image_encoder")}
                text = pipe.text_encoder
                if run:
                    context = _encode_text(text, spec)
                    neg_context = _encode_text(text, spec) if guidance is not None else None
                else:
                    context = torch.zeros(1, spec.stage1.text_len, spec.stage1.text_dim,
                                          device=where["text_encoder"] if text is not None else "cpu")
                    neg_context = torch.zeros_like(context) if guidance is not None else None
                clip_fea = None
                if pipe.image_encoder is not None and run:
                    clip_fea = pipe.image_encoder.encode(img_low)
                elif spec.stage1.image_dim:
                    dev = where["image_encoder"] if pipe.image_encoder is not None else "cpu"
                    clip_fea = torch.zeros(1, spec.stage1.image_len, spec.stage1.image_dim, device=dev)
            with phase("stage1") as run:
                z1 = torch.zeros(1, C1, T1, hl, wl, device=pipe.device) if not run else pipe._stage1(img_low, context, clip_fea, frames, h1, w1, sched, 0, "renoise", False,
                                  neg_context, guidance)
            with phase("bridge") as run:
                if not run:
                    z_ref = torch.zeros(1, C2, T2, hh, ww, device=pipe.device)
                elif par.distributed:  # as generate: the encode's tiles over the ranks
                    z_ref = vae_parallel.encode(pipe.vae2, reference_video(z1, pipe.vae1, img_full, height, width),
                                                par.group)
                else:
                    z_ref = hybrid_reference(z1, pipe.vae1, pipe.vae2, img_full, height, width)
            del z1
            with phase("stage2") as run:
                z2 = torch.zeros(1, C2, T2, hh, ww, device=pipe.device) if not run else pipe._stage2(z_ref.to(pipe.device), context, csg, sched2, spec.stage2_kind, joint, start_sigma,
                                  0, "renoise", False, neg_context, guidance)
            del z_ref
            with phase("decode") as run:
                # what generate runs: the tile-major decode to uint8 frames on the host (each tile's repeated
                # decoder calls are replayed, so the whole clip is cheap to walk through)
                if run and par.distributed:  # as generate: this rank's share of the tiles
                    vae_parallel.decode_uint8(pipe.vae2, z2[:1], par.group)
                for c in (pipe.vae2.decode_uint8_stream(z2[:1]) if run and not par.distributed else ()):
                    del c
        # the context is computed inside text_encoding; a stand-in of another phase is not counted there
    finally:
        ranks.close()
        torch.unique = saved_unique
        torch.nn.functional.scaled_dot_product_attention = saved_sdpa
        own_cache.__exit__(None, None, None)
    info = dict(frames=frames, width=width, height=height, steps=steps, segment_blocks=segment_blocks,
                neighbors=list(neighbors), segments=csg.num_segments, stage2_kind=spec.stage2_kind,
                dtype=str(dtype).replace("torch.", ""), vae_dtype=str(vae_dtype).replace("torch.", ""),
                device=device, stage1=spec.stage1.name, stage2=spec.stage2.name,
                latent_frames=T2, replayed_calls=sum(r.hits for r in replays),
                executed_calls=sum(r.misses for r in replays), timings=timings,
                misses=sum(r.misses for r in replays), resident=resident, shared_anchor=shared_anchor)
    layout = {k: degrees[k] for k in ("world_size", "ulysses", "cfg_parallel", "fsdp")}
    return PlanResult(plan.profile, {p: phases[p] for p in PHASES if p in phases}, info, layout)


def measure_on_device(spec: ModelSpec, *, memory="balanced", frames: int = 33, width: int = 1280, height: int = 704,
                      dtype=torch.bfloat16, vae_dtype=None, **generate_kw) -> int:
    """Run the generation of ``spec`` for real on the CUDA GPU with uninitialised (random) weights and return
    ``torch.cuda.max_memory_allocated`` over the run: the measurement :func:`plan_generation` estimates."""
    from PIL import Image

    from ..nets.encoders import TextEncoder

    if not torch.cuda.is_available():
        raise RuntimeError("measure_on_device needs a CUDA GPU")
    vae_dtype = parse_vae_dtype(vae_dtype) or default_vae_dtype("cuda")
    with torch.random.fork_rng(devices=[]):
        pipe = _real_pipeline(spec, MemoryPlan.of(memory), dtype, vae_dtype)
    image = Image.new("RGB", (width, height), (120, 90, 60))
    kw = dict(frames=frames, width=width, height=height, progress=False)
    kw.update(generate_kw)
    if not isinstance(pipe.text_encoder, TextEncoder):
        kw["prompt_embeds"] = torch.zeros(1, spec.stage1.text_len, spec.stage1.text_dim)
    torch.cuda.synchronize()
    result = pipe.generate(image, None if "prompt_embeds" in kw else "a prompt", **kw)
    return int(result.peak_memory_bytes)


def _real_pipeline(spec: ModelSpec, plan: MemoryPlan, dtype, vae_dtype) -> SwiftI2VPipeline:
    """The pipeline of ``spec`` with uninitialised weights on the CPU (real tensors)."""
    from ..nets.encoders import ByteTokenizer, ImageEncoder, TextEncoder
    from ..nets.vae import WanVAE

    def real(module, dt=None):
        module.to_empty(device="cpu")
        if dt is not None:
            module.to(dt)
        for name, b in module.named_buffers():
            b.zero_()
        return module.eval().requires_grad_(False)

    s1, s2, v1, v2, text, image = _meta_models(spec)
    for dit in (s1, s2):
        dit.to_dtype(dtype)
        real(dit)
        with torch.no_grad():
            for p in dit.parameters():
                p.normal_(0, 0.02)
    vae1, vae2 = WanVAE(real(v1, vae_dtype)), WanVAE(real(v2, vae_dtype))
    te = TextEncoder(real(text, dtype), ByteTokenizer(int(text.config.vocab_size))) if text is not None else None
    ie = ImageEncoder(real(image, dtype), int(image.config.image_size)) if image is not None else None
    return SwiftI2VPipeline(s1, s2, vae1, vae2, te, ie, stage2_kind=spec.stage2_kind, device="cuda", memory=plan)
