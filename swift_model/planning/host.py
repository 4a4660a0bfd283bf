"""The host side of a plan (planning layer): what a pipeline loaded from checkpoint files holds in host memory.

The planner builds its models from a :class:`~swift_model.nets.spec.ModelSpec` on fake tensors, which have no
files. :func:`as_loaded` gives them what :meth:`SwiftI2VPipeline.from_pretrained
<swift_model.generation.pipeline.SwiftI2VPipeline.from_pretrained>` gives a pipeline under the plan's profile, so
that the same :class:`~swift_model.generation.residency.Residency` code then moves the same bytes:

- a DiT the profile streams from its files (:meth:`MemoryPlan.blocks_from_files
  <swift_model.generation.memory.MemoryPlan.blocks_from_files>`) gets a :class:`StandInBlockSource` and
  placeholder blocks (the real loader leaves its blocks in the files);
- an encoder the profile reads on use gets a stand-in ``weight_reader`` (fresh tensors of its weights' shapes on
  the device asked for) and starts dropped.

:func:`loaded_host_bytes` is the host memory the loader itself fills before the pipeline places anything.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..generation.memory import MemoryPlan
from ..nets.placeholders import drop_weights, is_placeholder

# The encoders: loaded into host memory by the loader under every profile that does not read them on use (the
# pipeline then places them), whatever the plan's initial placement says.
ENCODERS = ("text_encoder", "image_encoder")


class StandInBlockSource:
    """The planner's stand-in for a DiT's :class:`~swift_model.loading.block_source.FileBlockSource`: the same
    layout and byte counts, nothing read (the planner's tensors are fake)."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.num_blocks = len(blocks)
        # as stored: the model's own dtypes (a checkpoint stored wider maps more bytes, and holds the same)
        self.stored_bytes = sum(t.numel() * t.element_size() for t in blocks.parameters())

    def read(self, i: int, views) -> None:
        """Nothing to read: a fake tensor has no data."""

    def finish(self, i: int, views) -> None:
        """No LoRA in a plan."""


def _stand_in_reader(module: nn.Module):
    """A ``weight_reader`` for ``module``: its state dict as fresh tensors of the same shapes and dtypes on the
    device asked for (tied weights as one tensor), as a real reader returns them."""
    def read(device) -> dict[str, torch.Tensor]:
        made: dict[int, torch.Tensor] = {}
        state = {}
        for name, t in module.state_dict(keep_vars=True).items():
            if id(t) not in made:
                made[id(t)] = torch.empty(t.shape, dtype=t.dtype, device=device)
            state[name] = made[id(t)]
        return state

    return read


def as_loaded(components: dict[str, nn.Module | None], plan: MemoryPlan) -> None:
    """Give the planner's modules what the loader gives real ones under ``plan`` (see the module docstring)."""
    for name, m in components.items():
        if m is None:
            continue
        if plan.blocks_from_files(name):
            m.block_source = StandInBlockSource(m.blocks)
            drop_weights(m.blocks)  # the loader never reads them
        if plan.reads_on_use(name):
            m.weight_reader = _stand_in_reader(m)


def loaded_host_bytes(components: dict[str, nn.Module | None], plan: MemoryPlan) -> int:
    """Host bytes the loader fills before the pipeline is built: every component it reads to the CPU (those the
    plan keeps on the CPU initially, and the encoders, read to the CPU then placed), less what it leaves in the
    files (blocks read from files, encoders read on use). Weights read straight to the device count nothing."""
    total, seen = 0, set()
    for name, m in components.items():
        if m is None or plan.reads_on_use(name):
            continue
        if name not in ENCODERS and plan.initial(name) != "cpu":
            continue
        skip_blocks = plan.blocks_from_files(name)
        for pname, t in m.state_dict(keep_vars=True).items():
            if (skip_blocks and pname.startswith("blocks.")) or is_placeholder(t) or id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
