"""The memory of a Stage II training run per rank, estimated before any weight is read (``swift-i2v train``).

:func:`estimate_training_memory` adds up, per rank, what each way of running the trainer keeps on the device:

- **weights, gradients, optimiser state, EMA**: arithmetic on the parameter counts of the network's config
  (built on the meta device; no weight is read). Three modes:

  - ``fsdp`` (a process group, ``fsdp = true``; one GPU gets a one-rank group for bf16 compute): fp32 master
    weights, fp32 gradients, two fp32 AdamW moments and the fp32 EMA, each sharded over the world (16 bytes
    per parameter, 20 with EMA, divided by the world size); the parameters Wan keeps in fp32 outside the
    blocks stay whole; plus the compute-dtype copies FSDP gathers: the root's (kept for the whole step) and
    two blocks' (the one running and the one prefetched), and one block's fp32 gradients before their
    reduce-scatter;
  - ``single`` (no FSDP: fp32 on a CPU, ``fsdp = false``): everything whole, 16 bytes per parameter
    (+4 with EMA);
  - ``offload`` (``offload_optimizer = true``, one process): the compute-dtype weights on the device (2 bytes
    per bf16 parameter); master weights, gradient sums, AdamW moments and the EMA in host memory
    (:mod:`swift_model.training.offload`); gradients leave the device as they are made, so the device's
    gradients are those in flight, which the activation count already holds.

- **activations**: a callable ``activations(model_config, layout, latent_size, batch=, dtype=,
  checkpointing=)`` gives the peak bytes of one forward and backward of a micro-batch (the CLI passes
  :func:`swift_model.planning.training_step.training_activation_bytes`, which runs the DiT's own code on fake
  tensors at the real size). The micro-batch is ``batch_size`` sequences of the largest ``windows_per_clip``
  windows of a clip (all of them by default); with Ulysses each rank holds ``1/ulysses`` of every per-token
  tensor, so the count is divided by the degree (the all-to-all buffers are not counted).

Every figure is an **estimate**: the CUDA context, library workspaces and the caching allocator's fragmentation
are not counted (:data:`DEVICE_RESERVE` of the device is left for them when :func:`check_fits` compares).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..nets.config import WanDiTConfig
from ..nets.dit import WanDiT, keeps_fp32
from .config import TrainConfig
from .packing import TrainingWindows, count_segments

GIB = 2**30
# Share of the device's memory left to what the estimate does not count: the CUDA context, cuBLAS/cuDNN
# workspaces, the caching allocator's fragmentation.
DEVICE_RESERVE = 0.05
MODES = ("fsdp", "single", "offload")


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a network: ``total``; ``fp32`` (those Wan keeps in fp32 whatever the compute dtype);
    ``root`` and ``root_fp32`` (outside the blocks: all, and those kept in fp32); ``block`` (one block);
    ``shapes``: ``(numel, kept in fp32)`` of every parameter, in order."""

    total: int
    fp32: int
    root: int
    root_fp32: int
    block: int
    shapes: tuple = ()

    @classmethod
    def of(cls, config: WanDiTConfig) -> "ParameterCounts":
        """The counts of ``config``'s network (built on the meta device: no memory, no weights)."""
        with torch.device("meta"):
            model = WanDiT(config)
        total = fp32 = root = root_fp32 = 0
        shapes = []
        for name, p in model.named_parameters():
            n = p.numel()
            shapes.append((n, keeps_fp32(name)))
            total += n
            fp32 += n if keeps_fp32(name) else 0
            if not name.startswith("blocks."):
                root += n
                root_fp32 += n if keeps_fp32(name) else 0
        block = sum(p.numel() for p in model.blocks[0].parameters()) if len(model.blocks) else 0
        return cls(total, fp32, root, root_fp32, block, tuple(shapes))

    def compute_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the whole network in compute dtype ``dtype`` (the fp32-kept parameters at 4 bytes)."""
        return (self.total - self.fp32) * _size(dtype) + self.fp32 * 4

    def staging_bytes(self, dtype: torch.dtype) -> int:
        """Host bytes of the offloaded optimiser's staging chunks for compute dtype ``dtype``
        (:func:`swift_model.training.offload.staging_plan`)."""
        from .offload import staging_plan

        return sum(staging_plan([n * (4 if kept else _size(dtype)) for n, kept in self.shapes])[1])


def format_bytes(n: int) -> str:
    """``n`` bytes in GiB (one decimal), or MiB / KiB below a GiB / MiB."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TrainingMemory:
    """A training run's memory per rank (bytes; every figure an estimate). ``device`` parts: ``weights``,
    ``gradients``, ``optimizer``, ``ema``, ``activations``; ``host``: what the offloaded optimiser keeps in host
    memory (0 in the other modes). ``mode`` is one of :data:`MODES`; the rest says what was estimated."""

    mode: str
    weights: int
    gradients: int
    optimizer: int
    ema: int
    activations: int
    host: int
    world: int
    ulysses: int
    tokens: int
    batch: int
    dtype: str
    checkpointing: bool
    parameters: int

    @property
    def device_bytes(self) -> int:
        """The sum of the device parts (each part at its own peak: an upper bound of their sum at any time)."""
        return self.weights + self.gradients + self.optimizer + self.ema + self.activations

    def summary(self) -> str:
        """One line: the device total and its parts, the host part, and what was estimated."""
        g = format_bytes
        where = f"per rank of {self.world}" if self.world > 1 else "one process"
        host = f"; host {g(self.host)} (offloaded optimiser)" if self.mode == "offload" else ""
        n = self.parameters
        count = f"{n / 1e9:.2f}B" if n >= 10**8 else f"{n / 1e6:.2f}M"
        return (f"memory estimate ({where}, {self.mode}): device {g(self.device_bytes)} = weights "
                f"{g(self.weights)} + gradients {g(self.gradients)} + optimiser {g(self.optimizer)} + EMA "
                f"{g(self.ema)} + activations {g(self.activations)} ({self.batch} x {self.tokens:,} tokens, "
                f"{self.dtype}, activation checkpointing {'on' if self.checkpointing else 'off'}, "
                f"{count} parameters){host}")

    def to_json(self) -> dict:
        """The fields and ``device_bytes`` as a dict."""
        return {**dataclasses.asdict(self), "device_bytes": self.device_bytes}


def run_mode(config: TrainConfig, device_type: str, world: int) -> str:
    """The trainer's mode for ``config`` on ``device_type`` with ``world`` processes (see the module docstring)."""
    if config.offload_optimizer:
        return "offload"
    dtype = compute_dtype_of(config, device_type)
    sharded = config.fsdp and (world > 1 or dtype != torch.float32)
    return "fsdp" if sharded else "single"


def compute_dtype_of(config: TrainConfig, device_type: str) -> torch.dtype:
    """The matmul dtype: ``compute_dtype``, ``"auto"`` being bf16 on a GPU and fp32 on a CPU (as the trainer)."""
    if config.compute_dtype == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, config.compute_dtype)


def largest_windows(latent_shape, config: TrainConfig):
    """The packed layout of the largest micro-batch sequence ``config`` trains on ``latent_shape``
    ``(C, T, h, w)`` latents: ``windows_per_clip`` windows (0: all) chosen to hold the most tokens."""
    _, T, h, w = latent_shape
    P = (h // 2) * (w // 2)
    M, pair = config.segment_blocks, config.neighbor_pair
    n = count_segments(T, M)
    if n < 1:
        raise ValueError(f"the clips have {T} latent frames: no segment to train after the anchor")
    k = n if config.windows_per_clip <= 0 else min(config.windows_per_clip, n)
    size = {s: TrainingWindows(T, P, M, pair, (s,), config.shared_anchor).layout.num_tokens for s in range(n)}
    chosen = sorted(sorted(range(n), key=lambda s: (-size[s], s))[:k])
    return TrainingWindows(T, P, M, pair, tuple(chosen), config.shared_anchor).layout


def estimate_training_memory(config: TrainConfig, model_config: WanDiTConfig, latent_shape, *, world: int,
                             device_type: str, activations) -> TrainingMemory:
    """The per-rank memory of training ``model_config`` (widened already) with ``config`` on ``latent_shape``
    latents over ``world`` processes on ``device_type`` (``"cuda"`` or ``"cpu"``); ``activations`` measures a
    micro-batch (see the module docstring). Reads no weight."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if world == 1 and config.ulysses > 1:  # the trainer's own messages (Topology.current)
        raise ValueError(f"ulysses={config.ulysses} needs {config.ulysses} processes (torchrun --nproc-per-node)")
    if world % config.ulysses:
        raise ValueError(f"the world size ({world}) must be a multiple of ulysses ({config.ulysses})")
    if config.offload_optimizer and world > 1:
        raise ValueError(f"offload_optimizer runs in one process, not {world}: on several GPUs FSDP shards the "
                         "optimiser state instead")
    mode = run_mode(config, device_type, world)
    dtype = compute_dtype_of(config, device_type)
    counts = ParameterCounts.of(model_config)
    N, ema = counts.total, config.ema
    if mode == "offload":
        weights, gradients, optimizer, ema_bytes = counts.compute_bytes(dtype), 0, 0, 0
        # master weights, gradient sums, two moments (fp32), the EMA, one compute-dtype staging copy
        host = N * 4 * (4 + (1 if ema else 0)) + counts.staging_bytes(dtype)
    elif mode == "fsdp":
        sharded = N - counts.root_fp32  # the fp32 parameters outside the blocks stay whole on every rank
        per_rank = -(-sharded // world) + counts.root_fp32
        gathered = (counts.root - counts.root_fp32) * _size(dtype) + 2 * counts.block * _size(dtype)
        weights = per_rank * 4 + (gathered if dtype != torch.float32 or world > 1 else 0)
        gradients = per_rank * 4 + counts.block * 4
        optimizer, ema_bytes, host = 2 * per_rank * 4, per_rank * 4 if ema else 0, 0
    else:
        weights, gradients, optimizer, ema_bytes, host = N * 4, N * 4, 2 * N * 4, N * 4 if ema else 0, 0
    C, _, h, w = latent_shape
    layout = largest_windows(latent_shape, config)
    act = activations(model_config, layout, (h, w), batch=config.batch_size, dtype=dtype,
                      checkpointing=config.activation_checkpointing)
    act = -(-int(act) // config.ulysses)
    return TrainingMemory(mode=mode, weights=weights, gradients=gradients, optimizer=optimizer, ema=ema_bytes,
                          activations=act, host=host, world=world, ulysses=config.ulysses,
                          tokens=layout.num_tokens, batch=config.batch_size, dtype=str(dtype).replace("torch.", ""),
                          checkpointing=config.activation_checkpointing, parameters=N)


def fits_options(estimate: TrainingMemory, config: TrainConfig) -> list[str]:
    """What could bring the estimate down, for the refusal message (the flags of ``swift-i2v train``)."""
    options = []
    if estimate.mode == "offload":
        options.append("several GPUs under torchrun without --offload-optimizer (FSDP shards weights, gradients and "
                       "optimiser state; --ulysses N splits the activations)")
    else:
        if estimate.world == 1:
            options.append("--offload-optimizer (optimiser state and fp32 master weights in host memory)")
        options.append("more GPUs under torchrun (FSDP shards weights, gradients and optimiser state)")
        options.append("--ulysses N under torchrun (each rank holds 1/N of the activations)")
    if not config.activation_checkpointing:
        options.append("--activation-checkpointing")
    if config.windows_per_clip == 0 or config.windows_per_clip > 1:
        options.append("fewer --windows-per-clip")
    if config.batch_size > 1:
        options.append("a smaller --batch-size with more --grad-accum")
    if config.ema and estimate.mode != "offload":
        options.append("--no-ema")
    return options


def shortfall(need: int, memory: int) -> str | None:
    """``None`` when ``need`` bytes fit ``memory`` bytes less :data:`DEVICE_RESERVE`, else why not (one phrase,
    e.g. the reason a GPU test is skipped)."""
    usable = int(memory * (1 - DEVICE_RESERVE))
    if need <= usable:
        return None
    return (f"needs an estimated {format_bytes(need)}, the device has {format_bytes(memory)} "
            f"({format_bytes(usable)} after a {DEVICE_RESERVE:.0%} reserve)")


def check_fits(estimate: TrainingMemory, config: TrainConfig, device_memory: int, device_name: str,
               host_memory: int | None = None) -> None:
    """Raise ``ValueError`` (one line: the need, the device's memory, the options) when ``estimate`` does not fit
    ``device_memory`` bytes less :data:`DEVICE_RESERVE`, or (given ``host_memory``, the machine's RAM) when the
    offloaded optimiser's host part does not fit that."""
    g = format_bytes
    if host_memory is not None and estimate.host > host_memory:
        raise ValueError(f"--offload-optimizer needs an estimated {g(estimate.host)} of host memory (fp32 master "
                         f"weights, gradient sums, AdamW moments{', EMA' if config.ema else ''}, staging), but this "
                         f"machine has {g(host_memory)}; options: --no-ema, or several GPUs under torchrun without "
                         "--offload-optimizer")
    usable = int(device_memory * (1 - DEVICE_RESERVE))
    if estimate.device_bytes <= usable:
        return
    raise ValueError(f"training needs an estimated {g(estimate.device_bytes)} per rank on the device (weights "
                     f"{g(estimate.weights)}, gradients {g(estimate.gradients)}, optimiser {g(estimate.optimizer)}, "
                     f"EMA {g(estimate.ema)}, activations {g(estimate.activations)}), but {device_name} has "
                     f"{g(device_memory)} ({g(usable)} after a {DEVICE_RESERVE:.0%} reserve); options: "
                     f"{'; '.join(fits_options(estimate, config))}; or --device-memory GIB to check against "
                     "another size (0: no check)")


def host_memory_bytes() -> int | None:
    """The machine's physical memory in bytes where the OS reports it through ``os.sysconf`` (not on Windows),
    else ``None``."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None
