"""A DiT's transformer blocks read from its weight files each time they are used (loading layer).

:func:`~swift_model.loading.checkpoint.load_dit` with ``blocks_from_files=True`` loads everything but the
blocks and attaches a :class:`FileBlockSource` as ``model.block_source``: the block weights never occupy host
memory of ours. Whoever streams the blocks to the compute device (the memory profiles that hold one or two
blocks at a time) asks the source, block by block, to

1. :meth:`FileBlockSource.read` the block's stored tensors into host staging buffers (the copy from the
   files' memory-mapped pages casts to the buffers' dtype; the pages are the OS page cache's, dropped by it
   under memory pressure), then, after copying the buffers to the device,
2. :meth:`FileBlockSource.finish` the block there: merge the block's LoRA deltas in place (fp32 math).

The result equals a full :func:`load_dit` bit for bit whenever the stored dtype converts exactly to the
target dtype (stored bf16 or fp32 into fp32 buffers, or stored bf16 into bf16 buffers). With a LoRA on
weights stored wider than the target (fp32 files, bf16 model) the merge here starts from the already rounded
weight, one rounding more than the one-cast merge of a full load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..io.files import DEFAULT_STAGE, TensorFiles
from ..io.keys import block_index, format_keys
from ..nets.dit import keeps_fp32
from .lora import LoraDeltas

__all__ = ["FileBlockSource", "split_block_deltas"]


def split_block_deltas(deltas: LoraDeltas) -> tuple[LoraDeltas, LoraDeltas]:
    """Split LoRA deltas into ``(the part for the non-block parameters, the part for blocks.*)``.

    Both parts share ``deltas``' parameter shapes, device and stage; each keeps its own record of the
    parameters it was applied to (so each part's ``check_all_used`` speaks for its own parameters only).
    """
    rest = LoraDeltas(deltas.params, deltas.device, deltas.stage)
    blocks = LoraDeltas(deltas.params, deltas.device, deltas.stage)
    for name, ents in deltas.entries.items():
        (blocks if block_index(name) is not None else rest).entries[name] = list(ents)
    return rest, blocks


class FileBlockSource:
    """The transformer blocks of a DiT, read from its weight files on use.

    Args:
        files: the checkpoint's files, opened with ``meta=False`` (:meth:`TensorFiles.mapped` needs data).
        names: model parameter name -> key as stored (``DiTCheckpoint.names``); only ``blocks.*`` names are
            kept.
        num_blocks: the model's block count; every block must have stored tensors.
        lora: the LoRA deltas of the block parameters (see :func:`split_block_deltas`), built for the compute
            device, or ``None``.
        stage: the label errors carry (default ``"checkpoint"``).

    Attributes:
        num_blocks: the block count.
        stored_bytes: bytes of all the blocks' tensors as stored (what one full pass over the blocks maps).

    Raises ValueError for files opened with ``meta=True``, a block with no stored tensor, or LoRA deltas
    aimed at a parameter that is not a block parameter of the files.
    """

    def __init__(self, files: TensorFiles, names: Mapping[str, str], num_blocks: int, *,
                 lora: LoraDeltas | None = None, stage: str | None = None) -> None:
        if not isinstance(files, TensorFiles):
            raise TypeError(f"files must be a TensorFiles, got {type(files).__name__}")
        self.stage = stage or files.stage or DEFAULT_STAGE
        if files.meta:
            raise ValueError(f"{self.stage}: files must be opened with meta=False to read block tensors")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"{self.stage}: num_blocks must be a non-negative int, got {num_blocks!r}")
        self.files = files
        self.num_blocks = num_blocks
        # model name -> stored key, for the block parameters only
        self._keys = {n: k for n, k in names.items() if block_index(n) is not None}
        present = {block_index(n) for n in self._keys}
        absent = [str(i) for i in range(num_blocks) if i not in present]
        beyond = [n for n in self._keys if block_index(n) >= num_blocks]
        if absent or beyond:
            raise ValueError(f"{self.stage}: names do not describe {num_blocks} blocks (blocks without tensors: "
                             f"{format_keys(absent)}; names past the last block: {format_keys(beyond)})")
        self.stored_bytes = sum(files.nbytes(k) for k in self._keys.values())
        if lora is not None:
            strays = set(lora.entries) - set(self._keys)
            if strays:
                raise ValueError(f"{self.stage}: block LoRA deltas aimed at no block parameter of the files: "
                                 f"{format_keys(strays)}")
        self.lora = lora if lora is not None and lora.entries else None

    def block_names(self, i: int) -> list[str]:
        """The names inside block ``i`` that the files store (``"attn1.to_q.weight"``, ...), in file order."""
        self._check_index(i)
        prefix = f"blocks.{i}."
        return [n[len(prefix):] for n in self._keys if n.startswith(prefix)]

    @torch.no_grad()
    def read(self, i: int, views: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Fill each ``(name inside block i, tensor)`` of ``views`` with block ``i``'s stored tensor.

        The tensors (host staging buffers) carry the model's shapes and target dtype (fp32 for the parameters
        :func:`keeps_fp32` keeps); the copy from the mapped file pages casts. No LoRA here (see
        :meth:`finish`). Raises ValueError for a name the files do not store for block ``i``, a shape that is
        not the stored one, or a non-fp32 tensor for a parameter kept in fp32.
        """
        for full, view in self._resolve(i, views, "read"):
            stored = self.files.mapped(self._keys[full])
            if tuple(view.shape) != tuple(stored.shape):
                # copy_ would broadcast a smaller stored tensor silently
                raise ValueError(f"{self.stage}: read: {full}: buffer shape {list(view.shape)}, stored "
                                 f"{list(stored.shape)} (key {self._keys[full]!r})")
            view.copy_(stored)

    @torch.no_grad()
    def finish(self, i: int, views: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Merge block ``i``'s LoRA deltas into ``views`` (the same names as :meth:`read`, now on the compute
        device) in place, on that device: fp32 math, cast back to each tensor's dtype. A no-op without a LoRA."""
        resolved = self._resolve(i, views, "finish")
        if self.lora is None:
            return
        for full, view in resolved:
            if full in self.lora.entries:
                # the merge runs where the block is (the GPU), whatever device the load built the deltas for:
                # the factors are copied there, the product is never made on the host
                self.lora.device = view.device
                view.copy_(self.lora.apply(full, view))

    def _check_index(self, i: int) -> None:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_blocks:
            raise ValueError(f"{self.stage}: block index i must be an int in [0, {self.num_blocks}), got {i!r}")

    def _resolve(self, i: int, views, what: str) -> list[tuple[str, torch.Tensor]]:
        """``(full model name, tensor)`` per view, checked against the stored block names and the fp32 rule."""
        self._check_index(i)
        out = []
        for name, view in views:
            full = f"blocks.{i}.{name}"
            if full not in self._keys:
                raise ValueError(f"{self.stage}: {what}: views: block {i} has no stored tensor {name!r}")
            if not isinstance(view, torch.Tensor):
                raise TypeError(f"{self.stage}: {what}: views: {full} must be a tensor, got {type(view).__name__}")
            if keeps_fp32(full) and view.dtype != torch.float32:
                raise ValueError(f"{self.stage}: {what}: views: {full} stays fp32 in the model, got {view.dtype}")
            out.append((full, view))
        return out
