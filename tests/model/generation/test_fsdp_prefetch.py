"""FSDP2 inference overlaps each block's all-gather with the previous block's compute: the DiT is the FSDP root and
every block prefetches the next one (``fsdp_shard_blocks(prefetch=True)``, what ``generate --fsdp`` uses). On 2
gloo ranks (tests/spawn.py): the structure, the prefetch observed while a block runs, and the same output as the
unsharded model, with the cross-attention cache computed before the model's first forward."""

from __future__ import annotations

import copy

import pytest
import torch

import spawn
from helpers import layout_dit_inputs, random_init
from swift_kernels import CSGLayout
from swift_model import WanDiT, WanDiTConfig
from swift_model.nets.parallel import fsdp_shard_blocks

pytestmark = pytest.mark.distributed
RECORD: list = []
T, H, W = 5, 4, 6


def _case_prefetch(group):
    cfg = WanDiTConfig.preset("tiny-i2v", num_layers=3)
    model = random_init(WanDiT(cfg), 4).eval()
    layout = CSGLayout(T, (H // 2) * (W // 2), segment_blocks=2, neighbors=(1, 1), mode="window", segment=1)
    x, t, ctx, clip = layout_dit_inputs(cfg, layout, T, H, W, torch.Generator().manual_seed(5), per_token=True)
    sharded = fsdp_shard_blocks(copy.deepcopy(model), group, prefetch=True)

    from torch.distributed.fsdp import FSDPModule

    assert isinstance(sharded, FSDPModule)  # the root: one set of streams for every block's all-gather
    states = [blk._get_fsdp_state() for blk in sharded.blocks]
    assert sharded._get_fsdp_state()._is_root and not any(s._is_root for s in states)
    for state, following in zip(states, states[1:] + [None]):
        assert state._states_to_forward_prefetch == ([following] if following is not None else [])
    assert sharded._get_fsdp_state()._fsdp_param_group is None  # the root's own parameters stay whole

    # while block i runs, block i + 1 is already gathered or being gathered
    seen = []

    def during(i):
        def hook(module, args, output):
            if i + 1 < len(states):
                group_ = states[i + 1]._fsdp_param_group
                seen.append(group_._all_gather_result is not None or group_.is_unsharded)
        return hook

    handles = [blk.register_forward_hook(during(i)) for i, blk in enumerate(sharded.blocks)]
    with torch.no_grad():
        cache = sharded.precompute_context(ctx, clip)  # a block method before the model's first forward
        got_cached = sharded(x, t, layout=layout, context_cache=cache)
        got = sharded(x, t, ctx, clip, layout=layout)
        want = model(x, t, ctx, clip, layout=layout)
    for h in handles:
        h.remove()
    assert seen and all(seen), seen
    assert torch.equal(got, want) and torch.equal(got_cached, want)  # FSDP gathers the exact weights
    RECORD.append(f"prefetched {sum(seen)} all-gathers")


CASES = {"prefetch": _case_prefetch}


def test_fsdp_inference_prefetches_the_next_block(tmp_path):
    spawn.check(spawn.launch(__name__, 2, str(tmp_path)), "prefetch")
