"""The optimiser in host memory: fp32 master weights, their gradients and AdamW's state on the host, the network
on the device in its compute dtype (``offload_optimizer = true``, ``swift-i2v train --offload-optimizer``).

What one GPU then holds is the compute-dtype weights (bf16: 2 bytes per parameter instead of the 16 of fp32
weights, fp32 gradients and two fp32 AdamW moments) and the activations; what the host holds is 16 bytes per
parameter (master weights, gradient sums, two moments), 4 more with EMA, and one compute-dtype staging copy
(:func:`staging_plan`: in chunks the page-locked allocator does not round up).

- **Gradients leave the device as they are made.** A hook on every device parameter
  (``register_post_accumulate_grad_hook``) copies its gradient, once autograd has finished it, into that
  parameter's staging buffer on the host (page-locked on a GPU, the copy asynchronous) and drops it, so the
  device never holds more than the gradients in flight. After each micro-batch's backward, :meth:`collect`
  waits for the copies and adds them in fp32 to the master gradients, which sum the micro-batches: the same
  precision as FSDP's fp32 reduction of bf16 gradients. Between optimiser steps the master gradients are
  ``None`` (so that a checkpoint's first save or load initialises AdamW's state as for any model).
- **The step runs on the host.** ``optimizer`` is a plain ``torch.optim.AdamW`` over the master parameters (so
  clipping, the EMA and checkpoints see an ordinary fp32 model and optimiser); :meth:`push` then copies the
  updated master weights, cast to the compute dtype on the host, back to the device parameters.

The master network is a whole :class:`~swift_model.nets.dit.WanDiT` in host memory: the checkpoint of an
offloaded run is that of an ordinary one (the same keys), and ``export`` reads it as any other.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..nets.dit import WanDiT, keeps_fp32


def device_copy(master: WanDiT, device: torch.device, dtype: torch.dtype) -> WanDiT:
    """A copy of ``master`` on ``device`` with its parameters in ``dtype`` (those Wan keeps in fp32 stay fp32),
    built without a second full-precision copy: the module is made on the meta device and each parameter is
    cast on the host and moved one at a time."""
    with torch.device("meta"):
        copy = WanDiT(master.config)
    masters = dict(master.named_parameters())
    for name, p in list(copy.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        module = copy.get_submodule(owner) if owner else copy
        target = torch.float32 if keeps_fp32(name) else dtype
        # copy=True: never the master's own storage, even for an fp32 copy on the CPU
        value = masters[name].detach().to(dtype=target, copy=True).to(device)
        setattr(module, leaf, nn.Parameter(value, requires_grad=masters[name].requires_grad))
    if any(True for _ in copy.buffers()):
        raise ValueError("device_copy copies parameters only; this network has buffers")
    copy.block_boundary = master.block_boundary
    copy.checkpoint_blocks = master.checkpoint_blocks
    copy.train(master.training)
    return copy


# Staging memory comes in chunks of a power-of-two size: PyTorch's caching host allocator rounds every
# page-locked allocation up to a power of two, so one buffer of the whole network (10 GB for the 5B in bf16)
# would take 16 GB, while chunks of exactly 2^28 bytes take what they hold plus the unfilled tail of each.
STAGING_CHUNK = 2**28
STAGING_ALIGN = 256


def staging_plan(sizes: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Where each of the buffers of ``sizes`` bytes lies in the staging chunks: ``([(chunk, offset)], [chunk
    bytes])``. Each buffer goes, at a :data:`STAGING_ALIGN`-aligned offset, into the first chunk with room left
    (first fit), or starts a new chunk: :data:`STAGING_CHUNK` bytes, or the next power of two above a larger
    buffer (so no chunk is rounded up by the allocator)."""
    places, chunks, used = [], [], []
    for n in sizes:
        if n < 0:
            raise ValueError(f"a staging buffer cannot have {n} bytes")
        c = next((i for i, (size, u) in enumerate(zip(chunks, used)) if u + n <= size), None)
        if c is None:
            chunks.append(max(STAGING_CHUNK, 1 << max(0, (n - 1).bit_length())))
            used.append(0)
            c = len(chunks) - 1
        places.append((c, used[c]))
        used[c] += -(-n // STAGING_ALIGN) * STAGING_ALIGN
    return places, chunks


def _staging(params: list, *, pin: bool) -> tuple[list[torch.Tensor], int]:
    """One host buffer per parameter, in its dtype, through which its gradients come down and its weights go
    up: views into :func:`staging_plan`'s chunks (page-locked when ``pin``). Returns the views and the bytes
    allocated."""
    sizes = [p.numel() * p.element_size() for p in params]
    places, chunk_bytes = staging_plan(sizes)
    chunks = [torch.empty(n, dtype=torch.uint8, pin_memory=pin) for n in chunk_bytes]
    views = [chunks[c][o: o + n].view(p.dtype).view(p.shape) for (c, o), n, p in zip(places, sizes, params)]
    return views, sum(chunk_bytes)


class HostOffload:
    """The bridge between a device network and its fp32 master copy in host memory (see the module docstring).

    Args:
        master: the fp32 network on the CPU (the weights the optimiser updates and checkpoints hold).
        model: its copy on the device (:func:`device_copy`), same parameter names.

    The optimiser is the caller's, over ``master``'s trainable parameters (AdamW in the trainer). Use:
    :meth:`zero_grad` before an optimiser step's micro-batches, :meth:`collect` after each backward,
    ``optimizer.step()`` on the host, then :meth:`push`.
    """

    def __init__(self, master: nn.Module, model: nn.Module) -> None:
        masters = dict(master.named_parameters())
        devices = dict(model.named_parameters())
        if masters.keys() != devices.keys():
            raise ValueError("the device model and the master model have different parameters")
        for name, p in masters.items():
            if p.device.type != "cpu" or p.dtype != torch.float32:
                raise ValueError(f"master parameter {name} must be fp32 on the CPU, got {p.dtype} on {p.device}")
        self.names = [n for n, p in masters.items() if p.requires_grad]
        self.master = [masters[n] for n in self.names]
        self.device = [devices[n] for n in self.names]
        self.on_host = all(p.device.type == "cpu" for p in self.device)
        self.staging, self.staging_bytes = _staging(self.device, pin=torch.cuda.is_available() and not self.on_host)
        self._pending: dict[int, None] = {}  # parameters whose gradient is on its way down, in order
        for i, p in enumerate(self.device):
            p.register_post_accumulate_grad_hook(self._make_hook(i))

    def _make_hook(self, i: int):
        def hook(p: torch.Tensor) -> None:
            if self.on_host:
                self._accumulate(i, p.grad)
            else:
                if i in self._pending:  # a second gradient before collect(): sum the first, then reuse its buffer
                    self.collect()
                # asynchronous: ordered after the kernels that made the gradient, on their stream; the
                # device memory is reused only by later work on that stream
                self.staging[i].copy_(p.grad, non_blocking=True)
                self._pending[i] = None
            p.grad = None
        return hook

    @torch.no_grad()
    def _accumulate(self, i: int, grad: torch.Tensor) -> None:
        m = self.master[i]
        if m.grad is None:
            m.grad = grad.to(torch.float32, copy=True)
        else:
            m.grad.add_(grad.to(torch.float32))

    def zero_grad(self) -> None:
        """Start an optimiser step's gradient sums: the master gradients are set to ``None`` (a parameter no
        micro-batch reaches keeps none, and AdamW skips it, as with plain autograd); the first gradient of each
        makes its sum."""
        for m in self.master:
            m.grad = None

    @torch.no_grad()
    def collect(self) -> None:
        """Add the gradients copied down since the last call to the master gradients (in fp32); call after
        every backward."""
        if self._pending:
            torch.cuda.synchronize()
        for i in self._pending:
            self._accumulate(i, self.staging[i])
        self._pending.clear()

    @torch.no_grad()
    def push(self) -> None:
        """Copy the master weights to the device parameters, rounded to their dtype on the host."""
        for m, p, s in zip(self.master, self.device, self.staging):
            if self.on_host:
                p.copy_(m)
                continue
            s.copy_(m)
            p.copy_(s, non_blocking=True)
        if not self.on_host:
            torch.cuda.synchronize()  # the staging buffers are rewritten by the next backward's gradients

    def host_bytes(self) -> int:
        """Host bytes this holds besides the master weights: the fp32 gradient sums (while a step's are alive)
        and the staging chunks."""
        return sum(m.numel() * 4 for m in self.master) + self.staging_bytes
