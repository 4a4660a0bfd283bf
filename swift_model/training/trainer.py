"""``swift-i2v train``: the method's Stage II trained on packed CSG windows with ``torch.distributed``.

One optimiser step: every data-parallel rank takes ``grad_accum`` micro-batches of ``batch_size`` clips; a
micro-batch packs the same segments' windows of each of its clips into one sequence per clip
(:mod:`swift_model.training.packing`: each window with its own anchor copy, so the network sees exactly its
inference calls), draws one noise level per window and clip, noises only the windows' own blocks and takes
the flow-matching loss on those tokens. What a micro-batch holds depends only on ``(seed, global micro-batch
index)``, so any world size, and a run resumed from a checkpoint, sees the same data, windows and noise.

Distribution (the world is ``data-parallel x ulysses`` ranks; the ranks of one Ulysses group share a
micro-batch):

- FSDP2 per block and on the root (``fully_shard``), with fp32 master weights and, for bf16 compute, a
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32, cast_forward_inputs=False)`` (the fp32 RoPE table
  and modulation are not cast). The parameters Wan keeps in fp32 (modulation tables, cross-attention
  LayerNorm, timestep MLP) are left out of FSDP (``ignored_params``: replicated, never cast), and their
  gradients, like every gradient FSDP does not reduce, are all-reduced here.
- Ulysses sequence parallelism (:mod:`swift_model.nets.parallel`): every rank of a group computes the same loss
  on the gathered output and holds a partial sum of each gradient. FSDP *averages* gradients over the whole
  world, so the loss is scaled by the Ulysses degree before the backward: the result is the sum over the
  group and the mean over the data-parallel ranks.
- Activation checkpointing per block (``WanDiT.checkpoint_blocks`` with the unfused block boundary), optional
  ``torch.compile`` of each block, AdamW, optional EMA of the weights.
- ``offload_optimizer`` (one process, no FSDP): the fp32 master network, its gradient sums, AdamW and the EMA in
  host memory, the network on the device in the compute dtype (:mod:`swift_model.training.offload`); what a
  run needs per rank is estimated before it starts (:mod:`swift_model.training.memory`).

Checkpoints (``RUN_DIR/checkpoints/step-NNNNNNN``) are ``torch.distributed.checkpoint`` folders with the
model, the optimiser, the EMA, the data position and each rank's RNG state; a run started again on the same
``RUN_DIR`` resumes from the latest one and continues exactly as the uninterrupted run (bitwise on a CPU).
``RUN_DIR/log.jsonl`` gets one JSON line per logged step (loss, learning rate, gradient norm, throughput,
held-out loss), also sent to TensorBoard when it is installed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..nets.config import WanDiTConfig
from .dataset import PreparedData, atomic_write_json
from ..nets.dit import WanDiT, keeps_fp32
from .packing import PackedBatch, TrainingWindows, choose_segments, count_segments, flow_matching_loss, \
    sample_sigmas, window_inputs
from .config import EXECUTION_FIELDS, TrainConfig

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# Noise levels of the held-out loss: fixed, so evaluations at different steps compare like with like.
EVAL_SIGMAS = (0.2, 0.4, 0.6, 0.8, 0.95)


# -------------------------------------------------------------------------------------------------------------
# processes
# -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """How the world splits: ``dp`` data-parallel groups of ``sp`` (Ulysses) consecutive ranks.

    ``sp_group`` is this rank's Ulysses group (``None`` when ``sp == 1``); ``distributed`` says whether a
    process group is in use at all (FSDP and the gradient all-reduce need one).
    """

    rank: int = 0
    world: int = 1
    sp: int = 1
    sp_group: object = None
    distributed: bool = False

    @property
    def dp(self) -> int:
        """Data-parallel degree."""
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index (the ranks of one Ulysses group share it)."""
        return self.rank // self.sp

    @classmethod
    def current(cls, ulysses: int = 1) -> "Topology":
        """The topology of the initialised process group (one process when there is none). Creates the Ulysses
        groups (a collective call: every rank must call this)."""
        if not (dist.is_available() and dist.is_initialized()):
            if ulysses != 1:
                raise ValueError(f"ulysses={ulysses} needs {ulysses} processes (torchrun --nproc-per-node)")
            return cls()
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % ulysses:
            raise ValueError(f"the world size ({world}) must be a multiple of ulysses ({ulysses})")
        group = None
        for start in range(0, world, ulysses):  # every rank creates every group, in the same order
            g = dist.new_group(list(range(start, start + ulysses))) if ulysses > 1 else None
            if start <= rank < start + ulysses:
                group = g
        return cls(rank, world, ulysses, group, True)


def init_distributed(device: torch.device, *, single_rank: bool = False, backend: str | None = None) -> bool:
    """Initialise ``torch.distributed`` from the ``torchrun`` environment (``backend``, default NCCL on GPUs and
    gloo on CPUs); with ``single_rank``, a one-process group when not under ``torchrun`` (FSDP's mixed
    precision needs one). Returns whether a group is initialised."""
    if dist.is_initialized():
        return True
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # NCCL binds this rank's communicator to its own GPU at once (device_id), not to GPU 0 at first use
        bound = dict(device_id=device) if backend == "nccl" and device.index is not None else {}
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, **bound)
        return True
    if single_rank:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=COLLECTIVE_TIMEOUT)
        return True
    return False


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when a GPU is present, else the CPU."""
    if torch.cuda.is_available():
        d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(d)
        return d
    return torch.device("cpu")


# -------------------------------------------------------------------------------------------------------------
# the model
# -------------------------------------------------------------------------------------------------------------


def stage2_config(config: TrainConfig, latent_channels: int, text_dim: int) -> tuple[WanDiTConfig, int]:
    """``(model config, extra_in_channels)`` of the Stage II network a run trains on ``latent_channels``-channel
    latents: the tiny preset widened, or ``config.init``'s (headers only) widened when it is not yet.
    ``ValueError`` when the checkpoint is of the wrong kind for the data."""
    C = latent_channels
    if config.tiny:
        base = WanDiTConfig.preset("tiny-ti2v")
        source = "the --tiny Stage II"
    else:
        from ..loading.checkpoint import inspect_dit

        base = inspect_dit(config.init, stage="stage2").config
        source = f"--init {config.init}"
    if base.out_channels != C or base.in_channels not in (C, 2 * C):
        raise ValueError(f"{source} is not a Stage II checkpoint for {C}-channel latents: in/out channels "
                         f"{base.in_channels}/{base.out_channels}, expected {C}/{C} (a public Wan2.2-TI2V-5B class "
                         f"model, widened here) or {2 * C}/{C} (a swift Stage II)")
    if base.text_dim != text_dim:
        raise ValueError(f"{source} takes {base.text_dim}-wide text embeddings, the data has {text_dim}")
    extra = C if base.in_channels == C else 0
    return (base.widened_input(extra) if extra else base), extra


def build_model(config: TrainConfig, latent_channels: int, text_dim: int, device) -> WanDiT:
    """The Stage II network in fp32 on ``device`` (the master weights), in training form (unfused block
    boundary, activation checkpointing as configured). ``--init``'s extra input channels start at zero; the
    tiny model is drawn from ``config.seed`` (its extra channels zeroed as well, so both start as the base
    network and learn to read ``z_ref``)."""
    cfg, extra = stage2_config(config, latent_channels, text_dim)
    if config.tiny:
        with torch.device("cpu"):
            model = WanDiT(cfg)
        model.reset_parameters(torch.Generator().manual_seed(config.seed))
        with torch.no_grad():
            model.patch_embedding.weight[:, latent_channels:] = 0.0
        model = model.to(device)
    else:
        model = WanDiT.from_pretrained(config.init, device=device, dtype=torch.float32, extra_in_channels=extra,
                                       stage="stage2")
    model.train().requires_grad_(True)
    model.block_boundary = "unfused"
    model.checkpoint_blocks = config.activation_checkpointing
    return model


def compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The matmul dtype: bf16 on a GPU and fp32 on a CPU for ``"auto"``."""
    if config.compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.compute_dtype)


def shard_model(model: WanDiT, dtype: torch.dtype) -> WanDiT:
    """FSDP2 over the whole world: every block, then the root, with fp32 master weights; ``dtype`` compute and
    fp32 gradient reduction. The parameters Wan keeps in fp32 stay whole and fp32 (``keeps_fp32``)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..nets.parallel import fsdp_shard_blocks

    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    fsdp_shard_blocks(model, reshard_after_forward=True, mp_policy=policy, keep_whole=keeps_fp32)
    root_fp32 = {p for n, p in model.named_parameters(recurse=True) if keeps_fp32(n) and not n.startswith("blocks.")}
    mesh = DeviceMesh.from_group(dist.group.WORLD, device_type=model.device.type)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False, ignored_params=root_fp32 or None)
    return model


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_sharded(t) else t


# -------------------------------------------------------------------------------------------------------------
# evaluation
# -------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def held_out_loss(model, data: PreparedData, config: TrainConfig, *, sp_group=None, sigmas=EVAL_SIGMAS,
                  seed: int = 1234) -> float:
    """The flow-matching loss of ``model`` on every clip of ``data``: all windows of each clip packed, each
    noise level of ``sigmas`` in turn, the noise fixed by ``seed``; the mean over clips and levels (a number
    comparable across steps and runs)."""
    was_training = model.training
    model.eval()
    C, T, h, w = data.latent_shape
    segments = tuple(range(count_segments(T, config.segment_blocks)))
    layout = TrainingWindows(T, (h // 2) * (w // 2), config.segment_blocks, config.neighbor_pair, segments,
                             config.shared_anchor).layout
    total, n = 0.0, 0
    try:
        for i in range(len(data)):
            z, z_ref, ctx = data.load_clip(i, model.config.text_len)
            for j, sigma in enumerate(sigmas):
                g = torch.Generator().manual_seed(seed * 1_000_003 + i * 101 + j)
                noise = torch.randn(z.shape, generator=g)[None]
                s = torch.full((1, len(segments)), float(sigma))
                batch = window_inputs(z[None], z_ref[None], layout, s, noise).to(model_device(model))
                out = model(batch.inputs, batch.timesteps, ctx[None].to(model_device(model)), layout=batch.layout,
                            sp_group=sp_group)
                total += float(flow_matching_loss(out, batch))
                n += 1
    finally:
        model.train(was_training)
    return total / n


def model_device(model) -> torch.device:
    """Where the model computes (that of its output projection's local shard)."""
    return _local(model.proj_out.weight).device


# -------------------------------------------------------------------------------------------------------------
# the trainer
# -------------------------------------------------------------------------------------------------------------


class Trainer:
    """A Stage II training run on the prepared data ``data_dir``, writing into ``run_dir``.

    Construct it on every rank (after :func:`init_distributed` under ``torchrun``): it builds the model,
    shards it, and resumes from ``run_dir``'s latest checkpoint when there is one. :meth:`run` trains to
    ``config.steps``. ``topology`` overrides the one of the process group (tests build a one-process reference
    inside a distributed job with ``Topology()``).
    """

    def __init__(self, config: TrainConfig, data_dir, run_dir, *, device=None, topology: Topology | None = None,
                 progress: bool = True) -> None:
        self.config = config.check()
        self.data = PreparedData.open(data_dir)
        self.eval_data = PreparedData.open(config.eval_data) if config.eval_data else None
        self.run_dir = Path(os.fspath(run_dir))
        self.device = torch.device(device) if device is not None else default_device()
        self.topology = topology if topology is not None else Topology.current(config.ulysses)
        if self.topology.sp != config.ulysses:
            raise ValueError(f"ulysses={config.ulysses} but the topology has Ulysses degree {self.topology.sp}")
        self.progress = progress
        C, T, h, w = self.data.latent_shape
        if self.eval_data is not None and self.eval_data.latent_shape != self.data.latent_shape:
            raise ValueError(f"eval_data has latents {self.eval_data.latent_shape}, the training data "
                             f"{self.data.latent_shape}")
        if h % 2 or w % 2:
            raise ValueError(f"latent height and width must be even (patch 2), got {h}x{w}")
        self.num_segments = count_segments(T, config.segment_blocks)
        if self.num_segments < 1:
            raise ValueError(f"the clips have {T} latent frames: no segment to train after the anchor")
        self.block_tokens = (h // 2) * (w // 2)
        self.dtype = compute_dtype(config, self.device)
        self.offload = None
        if config.offload_optimizer:
            if self.topology.world > 1:
                raise ValueError(f"offload_optimizer runs in one process, not {self.topology.world}: on several "
                                 "GPUs FSDP shards the optimiser state instead")
            self._build_offloaded(C)
        else:
            self._build_on_device(C)
        if config.compile:
            for blk in self.model.blocks:
                blk.compile()
        # the parameters the optimiser steps: the model's, or with offload_optimizer the host master's
        self.params = [p for p in self.master.parameters() if p.requires_grad]
        self.names = [n for n, p in self.master.named_parameters() if p.requires_grad]
        # the host step of offload_optimizer runs PyTorch's fused CPU AdamW (one pass over each tensor: about ten
        # times the per-tensor loop's speed); elsewhere the per-tensor loop
        fused = {"fused": True} if self.offload is not None else {"foreach": False}
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                           eps=config.adam_eps, weight_decay=config.weight_decay, **fused)
        self.ema = [p.detach().clone() for p in self.params] if config.ema else None
        self.step = 0
        self._perms: dict[int, torch.Tensor] = {}
        self._writer = None
        self._resume_or_start()

    def _build_on_device(self, latent_channels: int) -> None:
        """The fp32 model on the device, sharded by FSDP2 when a process group is in use."""
        config = self.config
        sharded = self.topology.distributed and config.fsdp
        if self.dtype != torch.float32 and not sharded:
            raise ValueError(f"compute_dtype {self.dtype} with fp32 master weights needs FSDP (fsdp = true; one "
                             "process initialises a one-rank group for it) or offload_optimizer = true")
        self.model = build_model(config, latent_channels, self.data.text_dim, self.device)
        self.model_config = self.model.config
        if sharded:
            shard_model(self.model, self.dtype)
        self.master = self.model

    def _build_offloaded(self, latent_channels: int) -> None:
        """The fp32 master model in host memory and its compute-dtype copy on the device, joined by
        :class:`~swift_model.training.offload.HostOffload` (gradients down as made, weights up after a step)."""
        from .offload import HostOffload, device_copy

        self.master = build_model(self.config, latent_channels, self.data.text_dim, torch.device("cpu"))
        self.model_config = self.master.config
        self.model = device_copy(self.master, self.device, self.dtype)
        self.offload = HostOffload(self.master, self.model)

    # -- data -------------------------------------------------------------------------------------------

    def _clip_index(self, k: int) -> int:
        """The clip of global sample ``k``: epochs of a permutation drawn from ``(seed, epoch)``."""
        n = len(self.data)
        epoch = k // n
        perm = self._perms.get(epoch)
        if perm is None:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch + 1))
            self._perms = {epoch: perm}
        return int(perm[k % n])

    def micro_batch(self, step: int, micro: int) -> tuple[PackedBatch, torch.Tensor]:
        """Micro-batch ``micro`` of optimiser step ``step`` of this rank: ``(packed batch, prompt embeddings
        [B, L, D])``, on the CPU. Determined by ``(seed, global micro-batch index)`` alone."""
        cfg, top = self.config, self.topology
        g_index = (step * cfg.grad_accum + micro) * top.dp + top.dp_rank
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + g_index * 7_919 + 11) % (2**63 - 1))
        segments = choose_segments(self.num_segments, cfg.windows_per_clip, gen)
        B = cfg.batch_size
        sigmas = sample_sigmas((B, len(segments)), gen, sampling=cfg.timestep_sampling, shift=cfg.timestep_shift,
                               logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)
        noise = torch.randn((B, *self.data.latent_shape), generator=gen)
        clips = [self.data.load_clip(self._clip_index(g_index * B + b), self.model_config.text_len) for b in range(B)]
        z = torch.stack([c[0] for c in clips])
        z_ref = torch.stack([c[1] for c in clips])
        ctx = torch.stack([c[2] for c in clips])
        T = self.data.latent_shape[1]
        layout = TrainingWindows(T, self.block_tokens, cfg.segment_blocks, cfg.neighbor_pair, segments,
                                 cfg.shared_anchor).layout
        return window_inputs(z, z_ref, layout, sigmas, noise), ctx

    # -- one step ---------------------------------------------------------------------------------------

    def _backend(self) -> str | None:
        return None if self.config.attention_backend == "auto" else self.config.attention_backend

    def forward_backward(self, step: int) -> float:
        """The gradients of optimiser step ``step``, reduced over the ranks (every parameter's ``.grad``: FSDP's
        reduce-scatter for the sharded ones, an all-reduce here for the rest); returns the step's loss (the
        mean over micro-batches and data-parallel ranks)."""
        cfg, top = self.config, self.topology
        if self.offload is not None:
            self.offload.zero_grad()
        else:
            for p in self.params:
                p.grad = None
        total = torch.zeros((), dtype=torch.float64)
        for micro in range(cfg.grad_accum):
            batch, ctx = self.micro_batch(step, micro)
            batch = batch.to(self.device)
            out = self.model(batch.inputs, batch.timesteps, ctx.to(self.device), layout=batch.layout,
                             sp_group=top.sp_group, attention_backend=self._backend())
            loss = flow_matching_loss(out, batch)
            # FSDP averages over all ranks; the Ulysses ranks hold partial sums to be added, not averaged
            (loss * (top.sp / cfg.grad_accum)).backward()
            if self.offload is not None:
                self.offload.collect()
            total += loss.detach().double().cpu() / cfg.grad_accum
        self._reduce_replicated()
        if top.distributed and top.world > 1:
            t = total.to(self.device)
            dist.all_reduce(t)
            total = t.cpu() / top.world  # the Ulysses ranks of a group hold the same loss: a mean over dp
        return float(total)

    def _reduce_replicated(self) -> None:
        """All-reduce (mean over the world) the gradients FSDP does not reduce: the parameters kept whole."""
        top = self.topology
        if not top.distributed or top.world == 1:
            return
        grads = [p.grad for p in self.params if p.grad is not None and not _is_sharded(p.grad)]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= top.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def grad_norm(self) -> float:
        """The global L2 norm of the reduced gradients (sharded pieces summed over the ranks)."""
        where = self.params[0].device if self.params else self.device  # the host's, with offload_optimizer
        sharded = torch.zeros((), dtype=torch.float64, device=where)
        whole = torch.zeros((), dtype=torch.float64, device=where)
        for p in self.params:
            if p.grad is None:
                continue
            sq = _local(p.grad).double().square().sum()
            if _is_sharded(p.grad):
                sharded += sq
            else:
                whole += sq
        if self.topology.distributed and self.topology.world > 1:
            dist.all_reduce(sharded)
        return float((sharded + whole).sqrt())

    def optimizer_step(self, step: int) -> tuple[float, float]:
        """Clip, step AdamW at ``lr_at(step)``, update the EMA; returns ``(grad norm before clipping, lr)``."""
        cfg = self.config
        norm = self.grad_norm()
        if cfg.grad_clip > 0 and norm > cfg.grad_clip:
            scale = cfg.grad_clip / (norm + 1e-6)
            for p in self.params:
                if p.grad is not None:
                    _local(p.grad).mul_(scale)
        lr = cfg.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.offload is not None:
            self.offload.push()
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    _local(e).lerp_(_local(p), 1.0 - cfg.ema_decay)
        return norm, lr

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train from the current step to ``config.steps`` (checkpointing, logging, evaluating as configured);
        returns the last log record."""
        from tqdm.auto import tqdm

        cfg, top = self.config, self.topology
        rank0 = top.rank == 0
        last: dict = {}
        if self.step == 0 and cfg.eval_every and self.eval_data is not None and self.step < cfg.steps:
            last = self._log({"step": 0, "eval_loss": self._evaluate()})
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.progress and rank0))
        tokens = self.config.batch_size * self.config.grad_accum * top.dp * self._tokens_per_sample()
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                loss = self.forward_backward(self.step)
                norm, lr = self.optimizer_step(self.step)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds = time.perf_counter() - t0
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                record = None
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    clips = cfg.batch_size * cfg.grad_accum * top.dp
                    record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "seconds": seconds,
                              "clips_per_s": clips / seconds, "tokens_per_s": tokens / seconds}
                if cfg.eval_every and self.eval_data is not None and (
                        self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    record = dict(record or {"step": self.step, "loss": loss}, eval_loss=self._evaluate())
                if record is not None:
                    last = self._log(record)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            if self._writer:
                self._writer.flush()
        return last

    def _tokens_per_sample(self) -> int:
        T = self.data.latent_shape[1]
        n = self.num_segments if self.config.windows_per_clip <= 0 else min(self.config.windows_per_clip,
                                                                               self.num_segments)
        layout = TrainingWindows(T, self.block_tokens, self.config.segment_blocks, self.config.neighbor_pair,
                                 tuple(range(n)), self.config.shared_anchor).layout
        return layout.num_tokens

    def _evaluate(self) -> float:
        return held_out_loss(self.model, self.eval_data, self.config, sp_group=self.topology.sp_group)

    def _log(self, record: dict) -> dict:
        if self.topology.rank != 0:
            return record
        record = {**record, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    writer.add_scalar(f"train/{key}", value, record["step"])
        return record

    def _tensorboard(self):
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # TensorBoard is optional
                self._writer = False
                return None
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer or None

    # -- checkpoints ------------------------------------------------------------------------------------

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.master, self.optimizer)
        state = {"model": msd, "optim": osd,
                 "trainer": {"step": self.step, "seed": self.config.seed, "clips": len(self.data),
                             "clip_ids": zlib.crc32(",".join(c.id for c in self.data.clips).encode())}}
        if self.ema is not None:
            state["ema"] = dict(zip(self.names, self.ema))
        return state

    def _rng_key(self) -> str:
        return f"rank{self.topology.rank}"

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-NNNNNNN`` (every rank takes part) and keep the newest ``keep_checkpoints``."""
        import torch.distributed.checkpoint as dcp

        top = self.topology
        folder = self.run_dir / CHECKPOINTS / f"step-{self.step:07d}"
        tmp = folder.with_name(folder.name + ".tmp")
        if top.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        self._barrier()
        state = self._state()
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state["rng"] = {self._rng_key(): rng}
        with quiet_single_process_dcp():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not top.distributed)
        self._barrier()
        if top.rank == 0:
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            for old in checkpoint_steps(self.run_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(self.run_dir / CHECKPOINTS / f"step-{old:07d}")
        self._barrier()
        return folder

    def load_checkpoint(self, folder: Path) -> None:
        """Restore model, optimiser, EMA, step and RNG from a checkpoint folder (any world size)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        keys = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        if self.ema is not None and not any(k.startswith("ema.") for k in keys):
            raise ValueError(f"{folder} has no EMA weights, but ema = true")
        if self.ema is None:
            state.pop("ema", None)
        rng_key = f"rng.{self._rng_key()}.cpu"
        if rng_key in keys:
            state["rng"] = {self._rng_key(): {"cpu": torch.get_rng_state()}}
            if f"rng.{self._rng_key()}.cuda" in keys and self.device.type == "cuda":
                state["rng"][self._rng_key()]["cuda"] = torch.cuda.get_rng_state(self.device)
        with quiet_single_process_dcp():
            dcp.load(state, checkpoint_id=str(folder), no_dist=not self.topology.distributed)
        set_state_dict(self.master, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if self.offload is not None:
            self.offload.push()
        tr = state["trainer"]
        if tr["clips"] != len(self.data) or tr["clip_ids"] != zlib.crc32(",".join(c.id for c in self.data.clips).encode()):
            raise ValueError(f"the data changed since {folder} was written ({tr['clips']} clips then, {len(self.data)} "
                             "now): resuming would not continue the same data order")
        self.step = int(tr["step"])
        if "rng" in state:
            rng = state["rng"][self._rng_key()]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _barrier(self) -> None:
        if self.topology.distributed and self.topology.world > 1:
            dist.barrier()

    def _resume_or_start(self) -> None:
        top, cfg = self.topology, self.config
        run_file = self.run_dir / RUN_FILE
        wanted = {"config": cfg.to_dict(), "model": model_config_dict(self.model_config),
                  "data": os.path.abspath(self.data.root), "data_settings": self.data.settings,
                  "latent_shape": list(self.data.latent_shape)}
        steps = checkpoint_steps(self.run_dir)
        if run_file.is_file():
            old = json.loads(run_file.read_text())
            mine = {k: v for k, v in wanted["config"].items() if k not in EXECUTION_FIELDS}
            # fields added since that run was written read as their defaults
            theirs = {**{k: v for k, v in TrainConfig().to_dict().items() if k not in EXECUTION_FIELDS},
                      **{k: v for k, v in old.get("config", {}).items() if k not in EXECUTION_FIELDS}}
            if mine != theirs or old.get("model") != wanted["model"]:
                diff = ", ".join(f"{k} {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v)
                raise ValueError(f"{self.run_dir} holds a run with other settings ({diff or 'another model'}): use "
                                 "another --out, or the same settings to resume it")
        elif steps:
            raise ValueError(f"{self.run_dir} has checkpoints but no {RUN_FILE}")
        self._barrier()
        if top.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_file, {**wanted, "world_size": top.world, "ulysses": top.sp})
        self._barrier()
        if steps:
            self.load_checkpoint(self.run_dir / CHECKPOINTS / f"step-{steps[-1]:07d}")
            if top.rank == 0:
                _truncate_log(self.run_dir / LOG_FILE, self.step)
        elif top.rank == 0 and (self.run_dir / LOG_FILE).exists():
            (self.run_dir / LOG_FILE).unlink()  # a run that never checkpointed starts over
        self._barrier()


@contextlib.contextmanager
def quiet_single_process_dcp():
    """Silence DCP's warning that it runs in one process (intended here: one process reads any layout)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def _truncate_log(path: Path, step: int) -> None:
    """Drop the log records after ``step`` (written by a run that stopped before its next checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def checkpoint_steps(run_dir) -> list[int]:
    """The steps of the complete checkpoints of a run directory, oldest first."""
    folder = Path(os.fspath(run_dir)) / CHECKPOINTS
    if not folder.is_dir():
        return []
    steps = []
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
            steps.append(int(p.name[5:]))
    return sorted(steps)


def model_config_dict(cfg: WanDiTConfig) -> dict:
    """A JSON-serialisable form of a model config (:func:`model_config_from_dict` rebuilds it)."""
    import dataclasses

    d = dataclasses.asdict(cfg)
    d["patch_size"] = list(cfg.patch_size)
    return d


def model_config_from_dict(d: dict) -> WanDiTConfig:
    """The model config of :func:`model_config_dict`'s dict."""
    return WanDiTConfig(**{**d, "patch_size": tuple(d["patch_size"])})


@contextlib.contextmanager
def distributed_run(device: torch.device, single_rank: bool, backend: str | None = None):
    """Initialise the process group for a run (:func:`init_distributed`) and destroy it afterwards if this call
    created it."""
    from ..generation.failures import failure_of, watch_peers

    created = not dist.is_initialized() and init_distributed(device, single_rank=single_rank, backend=backend)
    failed = False
    try:
        with watch_peers():  # any rank's failure ends every rank, with one error line
            yield
    except BaseException as exc:
        failed = failure_of(exc) is not None
        raise
    finally:
        if created and not failed:  # after a rank failed, peers may be stuck in collectives: no teardown handshake
            dist.destroy_process_group()


def train(config: TrainConfig, data_dir, run_dir, *, device=None, progress: bool = True) -> dict:
    """Run (or resume) a training run on every rank; returns the last log record."""
    config.check()
    device = torch.device(device) if device is not None else default_device()
    needs_group = config.fsdp and not config.offload_optimizer and compute_dtype(config, device) != torch.float32
    with distributed_run(device, single_rank=needs_group):
        trainer = Trainer(config, data_dir, run_dir, device=device, progress=progress)
        return trainer.run()
