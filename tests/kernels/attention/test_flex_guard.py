"""FlexAttention that cannot blow up: one compiled graph per shape and a bounded number of shapes (never the eager
fallback that materialises every score), kernel options that fit each GPU's shared memory (capabilities simulated
here), a bounded eager path on the CPU, and FlexAttention traced inside a compiled training block (the GPU's
compiled path forced onto CPU inductor). Compared with our reference on non-trivial block tables: a trivial
``mask_mod`` can hide a BlockMask whose sparse metadata is ignored."""

from __future__ import annotations

import types

import pytest
import torch

import swift_kernels.attention.torch_backends as tb
from swift_kernels import frame_block_attention
from swift_kernels.attention.plan import AttentionPlan


def _random_plan(T: int, P: int, seed: int) -> AttentionPlan:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(T, T, generator=g) < 0.45) | torch.eye(T, dtype=torch.bool)
    mask[T - 1] = False  # a query block with no key at all: zeros
    return AttentionPlan(mask, P, "cpu")


@pytest.mark.parametrize("capability, smem, expect_defaults", [
    ((8, 0), None, True), ((9, 0), None, True), ((8, 6), None, False), ((8, 9), None, False),
    ((8, 9), 99 * 1024, False), ((12, 0), None, False), ((9, 0), 227 * 1024, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_options_fit_the_shared_memory(capability, smem, expect_defaults, dtype):
    opts = tb.flex_kernel_options(capability, smem, 128, dtype)
    budget = smem or tb.SHARED_MEMORY_OPTIN.get(capability, 99 * 1024)
    elt = 2 if dtype == torch.bfloat16 else 4
    default_need = tb.flex_shared_memory_fwd(*tb._FLEX_DEFAULT_FWD[:2], 128, tb._FLEX_DEFAULT_FWD[2], elt)
    assert (opts is None) == (default_need <= budget)  # PyTorch's tuned defaults exactly where they fit
    if dtype == torch.bfloat16:  # the production dtype: defaults on sm_80/sm_90, ours on the 99 KB GPUs
        assert (opts is None) == expect_defaults
    if opts is not None:
        need = tb.flex_shared_memory_fwd(opts["BLOCK_M"], opts["BLOCK_N"], 128, opts["num_stages"], elt)
        assert need <= budget, (capability, dtype, opts, need)
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"):
            assert 128 % opts[key] == 0  # tiles of the 128-token BlockMask blocks, forward and backward


def test_kernel_options_for_consumer_gpus_at_head_dim_128():
    """The case that fails to launch with the defaults: sm_86/sm_89 at head_dim 128 in bf16."""
    assert tb.flex_kernel_options((8, 9), None, 128, torch.bfloat16) == tb._FLEX_SMALL[0]
    assert tb.flex_kernel_options((9, 0), None, 128, torch.bfloat16) is None
    with pytest.raises(ValueError, match="does not fit the 16 KB of shared memory"):
        tb.flex_kernel_options((8, 6), 16 * 1024, 128, torch.float32)


def test_device_options_read_the_device(monkeypatch):
    """The options of a device come from its properties (a mocked sm_89 with 99 KB a block)."""
    props = types.SimpleNamespace(major=8, minor=9, shared_memory_per_block_optin=99 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    tb._device_kernel_options.cache_clear()
    try:
        assert tb._device_kernel_options(0, 128, torch.bfloat16) == tb._FLEX_SMALL[0]
    finally:
        tb._device_kernel_options.cache_clear()


def test_a_bounded_number_of_shapes(monkeypatch):
    """Past FLEX_MAX_SHAPES distinct shapes a new one is refused with a clear error (before torch.compile's
    recompile limit, past which FlexAttention would run eagerly); shapes seen before go on."""
    monkeypatch.setattr(tb, "FLEX_MAX_SHAPES", 2)
    monkeypatch.setattr(tb, "_flex_shapes", set())
    keys = [((1, n, 2, 64),) for n in (128, 256, 384)]
    tb._check_new_shape(keys[0])
    tb._check_new_shape(keys[1])
    tb._check_new_shape(keys[0])
    with pytest.raises(RuntimeError, match="compiled for 2 attention shapes .* attention backend 'triton'"):
        tb._check_new_shape(keys[2])
    tb._check_new_shape(keys[1])


def test_compiled_call_never_falls_back_to_eager(monkeypatch):
    """The compiled call runs with torch.compile's eager fallback turned into an error, and a recompile limit above
    our own shape bound."""
    import torch._dynamo

    seen = {}

    def fake_compiled(*args, **kwargs):
        seen.update(fail=torch._dynamo.config.fail_on_recompile_limit_hit,
                    limit=torch._dynamo.config.recompile_limit, options=kwargs["kernel_options"])
        return args[0]

    monkeypatch.setattr(tb, "COMPILED_ON_CPU", True)
    monkeypatch.setattr(tb, "_compiled_flex", lambda: fake_compiled)
    monkeypatch.setattr(tb, "_flex_shapes", set())
    plan = _random_plan(3, 8, 0)
    q = torch.randn(1, 24, 2, 16)
    out = tb.flex(q, q, q, plan, 0.25)
    assert torch.equal(out, q) and seen == dict(fail=True, limit=max(8, tb.FLEX_MAX_SHAPES + 8), options=None)
    assert torch._dynamo.config.fail_on_recompile_limit_hit is False  # only around our call


def test_eager_flex_is_bounded(monkeypatch):
    """Eager FlexAttention (the CPU) is refused where its scores would not fit, naming the size."""
    monkeypatch.setattr(tb, "FLEX_EAGER_MAX_SCORE_BYTES", 1000)
    plan = _random_plan(3, 8, 1)
    q = torch.randn(1, 24, 2, 16)
    with pytest.raises(ValueError, match=r"materialise .* GiB of scores \(24 x 24 tokens, 2 heads\)"):
        frame_block_attention(q, q, q, plan, backend="flex")


def _reference(q, k, v, plan):
    return frame_block_attention(q.double(), k.double(), v.double(), plan, backend="torch").float()


@pytest.mark.slow
def test_compiled_flex_on_cpu_equals_the_reference(monkeypatch):
    """The GPU's compiled path (CPU inductor here) on a random block table with partial tiles and an empty query
    block equals the fp64 reference everywhere; a second call of the same shape compiles nothing new."""
    import torch._dynamo.utils

    monkeypatch.setattr(tb, "COMPILED_ON_CPU", True)
    monkeypatch.setattr(tb, "_flex_shapes", set())
    torch._dynamo.reset()
    plan = _random_plan(6, 40, 2)  # 240 tokens: 128-token tiles straddle the 40-token blocks
    for seed in (3, 4):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, 240, 2, 32, generator=g) for _ in range(3))
        out = torch.full_like(q, float("nan"))
        out.copy_(frame_block_attention(q, k, v, plan, backend="flex"))
        torch.testing.assert_close(out, _reference(q, k, v, plan), rtol=1e-5, atol=1e-5)
        assert torch.equal(out[:, 200:], torch.zeros_like(out[:, 200:]))  # the query block with no key
        if seed == 3:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # reused, not recompiled
    assert len(tb._flex_shapes) == 1


@pytest.mark.slow
def test_flex_traces_inside_a_compiled_training_block(monkeypatch):
    """The training path: every block compiled (fullgraph, so any graph break fails) with FlexAttention inside,
    on a packed training layout (windows with their own anchor copies), equals the eager reference forward. The
    GPU's branch is forced onto CPU inductor; FlexAttention has no CPU backward, so the forward is compared."""
    from swift_model import WanDiT, WanDiTConfig
    from swift_model.training.packing import TrainingWindows, window_inputs

    monkeypatch.setattr(tb, "COMPILED_ON_CPU", True)
    monkeypatch.setattr(tb, "_flex_shapes", set())
    torch._dynamo.reset()
    C, H, W, T = 48, 8, 8, 7
    cfg = WanDiTConfig.preset("tiny-ti2v").widened_input(C)
    model = WanDiT(cfg).reset_parameters(torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(1)
    z, z_ref, noise = (torch.randn(1, C, T, H, W, generator=g) for _ in range(3))
    ctx = torch.randn(1, 12, cfg.text_dim, generator=g)
    layout = TrainingWindows(T, (H // 2) * (W // 2), 2, (1, 1), (2, 0, 1), shared_anchor=False).layout
    batch = window_inputs(z, z_ref, layout, torch.rand(1, 3, generator=g), noise)
    with torch.no_grad():
        want = model(batch.inputs, batch.timesteps, ctx, layout=layout, attention_backend="torch")
        for blk in model.blocks:
            blk.compile(fullgraph=True)
        got = model(batch.inputs, batch.timesteps, ctx, layout=layout, attention_backend="flex")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
