"""One rank of a several-process generation, on fake tensors: what ``swift-i2v plan --world-size N`` runs.

:func:`swift_model.planning.planner.plan_generation` estimates the device memory of **one rank (rank 0)** of a
``torchrun --nproc-per-node N`` generation by running that rank's own code path in the planning process:

- :func:`fake_process_group`: a process group of ``N`` ranks whose collectives move no data (PyTorch's
  ``"fake"`` backend with its ``FakeStore``), so :meth:`Parallelism.build
  <swift_model.generation.distributed.Parallelism.build>` makes the same Ulysses and CFG groups as a real run, and the
  DiT's all-to-alls (uneven splits included), the token gathers, the CFG velocity exchange and the parallel VAE
  tiles run as rank 0 runs them, allocating the buffers rank 0 allocates. One difference: the parallel VAE
  keeps its tile send/receive buffers where the backend communicates, the GPU under NCCL but the host under
  the fake backend, so one tile's output buffer is missing from the decode's estimate (small against its
  working set). The group is destroyed on leaving, so nothing of it reaches a later real run.
- :class:`ShardedBlocksModel`: FSDP2 on one rank, modelled. ``fully_shard`` on a CUDA mesh asks the CUDA
  driver for the current device and creates CUDA streams, which a machine without a GPU does not have, so the
  planner does not call it; it reproduces what FSDP2 keeps on each rank instead, with the same rules as
  :func:`~swift_model.nets.parallel.fsdp_shard_blocks`: each sharded block parameter's dim-0 chunk, padded as FSDP2
  pads it (``ceil(rows / N)`` rows), stays resident; the parameters left whole and the DiT's root stay whole on
  the device; a block's forward (and its ``context_kv``) first all-gathers the block (one flat buffer of ``N``
  padded shards, copied out into the unsharded parameters, then freed) and keeps its gathered weights until
  the next block has run (FSDP2 prefetches the next block's all-gather while a block computes: two gathered
  blocks at a time); the model's forward ends with none. Tested against ``fully_shard``'s own shards on a CPU
  mesh.

Everything here is for an **estimate**; the communication itself (time, NCCL's buffers) is not modelled.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from ..generation.residency import move_module, set_tensor_data
from ..nets.parallel import fsdp_ignored_params

__all__ = ["ShardedBlocksModel", "fake_process_group", "fsdp_shard_bytes"]


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0):
    """A process group of ``world_size`` ranks in this one process, seen as ``rank``; collectives move no data.

    Raises ``ValueError`` when a process group is already initialised (a plan models its ranks in one process:
    run it without torchrun). The group is destroyed when the block ends, also on an error.
    """
    if dist.is_initialized():
        raise ValueError("swift-i2v plan models the N ranks of --world-size in one process: run it without "
                         "torchrun (a process group is already initialised)")
    # importing it registers PyTorch's "fake" backend (its FakeProcessGroup); the store is a no-op
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shard_shape(p: torch.Tensor, world_size: int) -> tuple[int, ...]:
    """The shape of one rank's FSDP2 shard of ``p``: its dim-0 chunk padded to ``ceil(rows / N)`` rows (a
    0-dim parameter counts as one row)."""
    rows = p.shape[0] if p.dim() else 1
    return (-(-rows // world_size),) + tuple(p.shape[1:])


def fsdp_shard_bytes(block: torch.nn.Module, index: int, world_size: int) -> tuple[int, int]:
    """``(sharded, whole)``: the bytes of ``block``'s parameters each rank keeps under FSDP2 over ``world_size``
    ranks (each sharded parameter's padded dim-0 chunk) and the bytes of the parameters left whole (as
    :func:`~swift_model.nets.parallel.fsdp_shard_blocks` leaves them)."""
    ignored = fsdp_ignored_params(block, index)
    sharded = whole = 0
    for p in block.parameters():
        if p in ignored:
            whole += p.numel() * p.element_size()
        else:
            sharded += math.prod(_shard_shape(p, world_size)) * p.element_size()
    return sharded, whole


class ShardedBlocksModel:
    """FSDP2's per-rank memory for the blocks of a DiT on (fake) device tensors; see the module docstring.

    Args:
        dit: a ``WanDiT`` (fake tensors), anywhere; its root and the block parameters left whole are moved to
            ``device`` (as ``fsdp_shard_blocks(device=)`` moves them), the sharded ones are replaced by their
            resident shards.
        world_size: the ranks the blocks are sharded over.
        device: the rank's device.

    :attr:`shards` holds the resident shards (to count them from the start); :attr:`gathers` counts the
    all-gathers modelled.
    """

    def __init__(self, dit: torch.nn.Module, world_size: int, device) -> None:
        self.world_size = world_size
        self.device = torch.device(device)
        self.shards: list[torch.Tensor] = []
        self.gathers = 0
        self._alive: list[list[torch.Tensor]] = []  # the gathered blocks alive (at most two)
        self._params: list[list[torch.nn.Parameter]] = []
        self._stand_in: dict[torch.dtype, torch.Tensor] = {}
        move_module(dit, self.device)  # the root, the buffers and the parameters left whole: whole on the device
        for i, blk in enumerate(dit.blocks):
            ignored = fsdp_ignored_params(blk, i)
            sharded = [p for p in blk.parameters() if p not in ignored]
            for p in sharded:
                self.shards.append(torch.empty(_shard_shape(p, world_size), dtype=p.dtype, device=self.device))
            self._params.append(sharded)
            self._point_away(i)
            blk.register_forward_pre_hook(lambda module, args, i=i: self._gather(i))
            blk.register_forward_hook(lambda module, args, output, i=i: self._reshard(i))
            if hasattr(blk, "context_kv"):
                blk.context_kv = self._around(blk.context_kv, i)
        # the last block's gathered weights are freed when the model's forward ends
        dit.register_forward_hook(lambda *_: self._alive.clear())

    def _point_away(self, i: int) -> None:
        # between calls a sharded parameter is not on this rank: a stride-0 view of one shared element on the
        # device stands in (so the residency finds the block "there" and moves nothing)
        for p in self._params[i]:
            base = self._stand_in.get(p.dtype)
            if base is None:
                base = self._stand_in[p.dtype] = torch.empty(1, dtype=p.dtype, device=self.device)
            set_tensor_data(p, base.expand(p.shape))

    def _gather(self, i: int) -> None:
        params = self._params[i]
        if not params:
            return
        self.gathers += 1
        n = sum(math.prod(_shard_shape(p, self.world_size)) for p in params)
        # the all-gather output: N padded shards in one flat buffer, copied out into the unsharded parameters
        flat = torch.empty(n * self.world_size, dtype=params[0].dtype, device=self.device)
        unsharded = [torch.empty(p.shape, dtype=p.dtype, device=self.device) for p in params]
        del flat
        for p, u in zip(params, unsharded):
            set_tensor_data(p, u)
        self._alive.append(unsharded)

    def _reshard(self, i: int) -> None:
        self._point_away(i)
        # the block before this one is freed once this one has run: FSDP2 gathers the next block while one
        # computes, so two gathered blocks are alive at a time
        while len(self._alive) > 1:
            self._alive.pop(0)

    def _around(self, method, i: int):
        def call(*args, **kwargs):
            self._gather(i)
            try:
                return method(*args, **kwargs)
            finally:
                self._reshard(i)
        return call
