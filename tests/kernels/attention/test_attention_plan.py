"""Attention plans: built once per layout and device, FlexAttention's tables, no host work per call, FLOPs."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swift_kernels import AttentionPlan, CSGLayout, csg_attention, frame_block_attention, plan_attention
from swift_kernels.attention import api, plan as plan_mod, tiles
from swift_kernels.attention.layout import block_mask_mod
from swift_kernels.attention.schedule import allowed_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _flex_tables(bm):
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
             "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
    return [getattr(bm, n)[0, 0] for n in names]


def _valid(num, idx):
    """The listed entries of an ordered table (entries past num are undefined in FlexAttention's encoding)."""
    return [idx[r, : int(num[r])].tolist() for r in range(num.shape[0])]


def _assert_same_tables(ours, theirs):
    for i in range(0, 8, 2):
        assert torch.equal(ours[i], theirs[i]), i
        assert _valid(ours[i], ours[i + 1]) == _valid(theirs[i], theirs[i + 1]), i + 1


@settings(max_examples=25, deadline=None)
@given(blocks=st.integers(1, 6), block_tokens=st.integers(1, 300), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_plan_tables_equal_create_block_mask(blocks, block_tokens, density, seed):
    """A plan's tables are exactly those FlexAttention's create_block_mask derives from the token-level mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask = torch.rand(blocks, blocks, generator=torch.Generator().manual_seed(seed)) < density
    plan = AttentionPlan(mask, block_tokens)
    L = plan.num_tokens
    theirs = create_block_mask(block_mask_mod(mask, block_tokens), None, None, L, L, device="cpu",
                               BLOCK_SIZE=tiles.SPARSE_BLOCK)
    t = plan.tables
    ours = [t.kv_num, t.kv_idx, t.full_kv_num, t.full_kv_idx, t.q_num, t.q_idx, t.full_q_num, t.full_q_idx]
    _assert_same_tables(ours, _flex_tables(theirs))
    # ... and the plan's own BlockMask shares them.
    _assert_same_tables(ours, _flex_tables(plan.to_block_mask()))
    assert torch.equal(t.mask_table, mask.to(torch.int8))
    assert plan.allowed_pairs == allowed_pairs(mask, block_tokens)
    assert plan.dense == bool(mask.all())


def test_plan_built_once_per_layout_and_device():
    layout = CSGLayout(9, 40, 2, (1, 0), mode="clip")
    before = plan_mod.plan_cache_info()
    a = plan_attention(layout)
    b = plan_attention(CSGLayout(9, 40, 2, (1, 0), mode="clip"))  # an equal layout
    c = plan_attention(layout, device="cpu")
    assert a is b is c
    assert plan_mod.plan_cache_info()["builds"] == before["builds"] + 1
    # A raw table with the same contents: one more plan (keyed by content), then found again.
    m = plan_attention(layout.block_mask, 40)
    assert m is plan_attention(layout.block_mask.clone(), 40) and m is not a
    assert plan_mod.plan_cache_info()["builds"] == before["builds"] + 2
    assert plan_attention(~layout.block_mask, 40) is not m
    assert a.layout == layout and m.layout is None


def test_call_with_a_plan_does_no_lookup_and_no_rebuild(monkeypatch):
    """With a plan, frame_block_attention and csg_attention neither build nor look up (hash) anything."""
    layout = CSGLayout(5, 24, 2, (1, 0), mode="clip")
    plan = plan_attention(layout)
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 8) for _ in range(3))
    want = frame_block_attention(q, k, v, plan, backend="torch")

    def forbidden(*args, **kwargs):
        raise AssertionError("a call with a plan looked a plan up or built one")

    monkeypatch.setattr(api, "plan_attention", forbidden)
    monkeypatch.setattr(plan_mod, "plan_attention", forbidden)
    monkeypatch.setattr(plan_mod.AttentionPlan, "__init__", forbidden)
    before = plan_mod.plan_cache_info()
    for _ in range(3):
        assert torch.equal(frame_block_attention(q, k, v, plan, backend="torch"), want)
        assert torch.equal(csg_attention(q, k, v, plan, backend="torch"), want)
    assert plan_mod.plan_cache_info() == before


def test_plan_checks():
    plan = plan_attention(CSGLayout(3, 8, 1, mode="clip"))
    q = torch.randn(1, 16, 1, 8)
    with pytest.raises(ValueError, match="tokens"):
        frame_block_attention(q, q, q, plan)
    q = torch.randn(1, 24, 1, 8)
    with pytest.raises(ValueError, match="block_tokens"):
        frame_block_attention(q, q, q, plan, 12)
    with pytest.raises(TypeError, match="block_tokens"):
        frame_block_attention(q, q, q, plan.block_mask)
    with pytest.raises(AttributeError):
        plan.foo = 1
    with pytest.raises(TypeError, match="AttentionPlan"):
        plan_attention(plan)
    with pytest.raises(ValueError, match="block_tokens"):
        plan_attention(plan.layout, 7)
    with pytest.raises(TypeError, match="block_mask"):
        AttentionPlan(torch.ones(2, 2), 4)
    with pytest.raises(ValueError, match="square"):
        AttentionPlan(torch.ones(2, 3, dtype=torch.bool), 4)
    assert "dense=False" in repr(plan) and plan.block_size == tiles.SPARSE_BLOCK
    # the plan's block table is a copy: mutating it changes nothing
    m = plan.block_mask
    m.fill_(False)
    assert plan.block_mask.any()


@pytest.mark.gpu
def test_plan_call_does_no_device_sync(gpu_device):
    """On a GPU a call with a plan synchronises nothing (no device-to-host copy), for every backend that runs
    here; the first call of each warms up (compiles) outside the check."""
    from swift_kernels._backend import backend_unavailable_reason

    layout = CSGLayout(5, 200, 2, (1, 0), mode="clip")
    plan = plan_attention(layout, device=gpu_device)
    assert plan_attention(layout, device="cuda") is plan
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 64, device=gpu_device, dtype=torch.bfloat16) for _ in range(3))
    for backend in ("triton", "cuda", "flex", "sdpa", None):
        if backend is not None and backend_unavailable_reason(backend, gpu_device) is not None:
            continue
        csg_attention(q, k, v, plan, backend=backend)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            csg_attention(q, k, v, plan, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_flop_counter_counts_allowed_pairs():
    """FlopCounterMode counts our op as 4 * B * H * D * allowed_pairs forward and 2.5x that backward."""
    from torch.utils.flop_counter import FlopCounterMode

    layout = CSGLayout(7, 20, 2, (1, 0), mode="clip")
    plan = plan_attention(layout)
    B, H, D = 2, 3, 8
    q, k, v = (torch.randn(B, layout.num_tokens, H, D, requires_grad=True) for _ in range(3))
    fwd = 4 * B * H * D * plan.allowed_pairs
    with FlopCounterMode(display=False) as counter:
        out = csg_attention(q, k, v, plan, backend="torch")
    assert counter.get_total_flops() == fwd
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() == int(2.5 * fwd)


def test_fake_cuda_tensors_plan_and_count_without_a_gpu():
    """A memory/FLOP planner runs real sizes on fake CUDA tensors on a CPU machine: the plan is built (fake
    tables), the automatic choice takes our op (dense or not), and the FLOPs are the allowed pairs'."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only path of fake CUDA tensors")
    for layout in (CSGLayout(21, 3520, 2, (1, 0), mode="clip"), CSGLayout(21, 3520, 2, (1, 0), mode="window", segment=3)):
        with FakeTensorMode(), FlopCounterMode(display=False) as counter:
            q = torch.empty(1, layout.num_tokens, 24, 128, device="cuda", dtype=torch.bfloat16)
            out = csg_attention(q, q, q, layout)
            assert out.shape == q.shape and out.device.type == "cuda"
        pairs = allowed_pairs(layout.block_mask, layout.block_tokens)
        assert counter.get_total_flops() == 4 * 24 * 128 * pairs


def test_cuda_header_is_generated_from_tiles():
    """csrc/attention/fba_tiles.h equals the text tiles.py generates (one source of tile sizes)."""
    with open(os.path.join(ROOT, "csrc", "attention", "fba_tiles.h"), encoding="utf-8") as f:
        assert f.read() == tiles.cuda_header(), "regenerate csrc/attention/fba_tiles.h from tiles.cuda_header()"
    for name in ("fwd_m", "fwd_n", "dkdv_m", "dkdv_n", "dq_m", "dq_n"):
        from swift_kernels.attention.triton_backend import _GPU_CONFIG_16BIT

        assert tiles.SPARSE_BLOCK % getattr(_GPU_CONFIG_16BIT, name) == 0
