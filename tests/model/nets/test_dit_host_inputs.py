"""Host-known DiT inputs: per-frame timesteps (:class:`FrameTimesteps`), frame positions as a tuple, an anchor
cache that skips its latents comparison. With them a forward reads no device data: the same bits as the tensor
forms, no ``torch.unique`` / ``.item()`` / ``torch.equal``, and it runs on fake CUDA tensors."""

from __future__ import annotations

import itertools
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from swift_kernels import CSGLayout, plan_attention, rope_table
from swift_kernels.attention.layout import ROLE_ANCHOR
from swift_model import WanDiT, WanDiTConfig
from swift_model.nets.dit import AnchorCache, FrameTimesteps
from swift_model.nets.dit.caches import starts_with_shared_anchor
from swift_model.nets.dit.sequence import frame_position_tuple

from helpers import dit_inputs as _inputs
from helpers import random_init as _random_init


class NoDeviceReads(TorchDispatchMode):
    """Fails on every op that reads tensor data to the host (or finds distinct values): ``torch.unique``,
    ``.item()``/``bool()``/``.tolist()`` of a tensor (``_local_scalar_dense``, ``is_nonzero``), ``torch.equal``.

    ``cpu_kernel_checks``: let the swift_kernels ops read CPU tensors. Their argument checks (e.g. the modulation
    index range) read values on the CPU only, where that is free, and are skipped on an accelerator; everything
    the model does itself still fails. Without it (on fake CUDA tensors) every read fails.
    """

    def __init__(self, cpu_kernel_checks: bool = False) -> None:
        super().__init__()
        self.cpu_kernel_checks = cpu_kernel_checks

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "unique" in name or name in ("_local_scalar_dense", "is_nonzero", "equal"):
            if not (self.cpu_kernel_checks and "unique" not in name and _kernel_check_on_cpu(args)):
                raise AssertionError(f"the forward read device data: {func}")
        return func(*args, **(kwargs or {}))


def _kernel_check_on_cpu(args) -> bool:
    """Whether a read is of CPU tensors and comes from swift_kernels (the innermost project frame)."""
    if any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
        return False
    for frame in reversed(traceback.extract_stack()):
        parts = Path(frame.filename).parts
        if "swift_kernels" in parts:
            return True
        if "swift_model" in parts:
            return False
    return False


def _model(preset, seed=3, **kw):
    model = WanDiT(WanDiTConfig.preset(preset, **kw)).eval()
    return _random_init(model, seed)


# -------------------------------------------------------------------------------------------------------------
# FrameTimesteps
# -------------------------------------------------------------------------------------------------------------

_FRAME_VALUES = {
    1: (500.0, 500.0, 500.0),
    2: (0.0, 937.5, 937.5),
    # 250.00000001 is 250.0 in float32: the host rounding collapses them as torch.unique does on the tensor
    3: (0.0, 250.0, 250.00000001, 900.0),
}


@pytest.mark.parametrize("indexed", [True, False])
@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("preset", ["tiny-ti2v", "tiny-i2v", "tiny-t2v"])
def test_frame_timesteps_equal_the_per_token_tensor_bitwise(preset, K, indexed):
    model = _model(preset, seed=11)
    model.indexed_modulation = indexed
    values = _FRAME_VALUES[K]
    x, _, ctx, clip = _inputs(model.config, B=2, Fr=len(values))
    P = x.shape[3] * x.shape[4] // 4
    ft = FrameTimesteps(values)
    assert len(ft.distinct()[0]) == K
    tokens = ft.token_timesteps(P, batch=2)
    assert tokens.shape == (2, len(values) * P) and tokens.dtype == torch.float32
    with torch.no_grad():
        want = model(x, tokens, ctx, clip)
        with NoDeviceReads(cpu_kernel_checks=True):
            got = model(x, ft, ctx, clip)
    assert torch.equal(got, want)
    # the test is not vacuous: the tensor form does read the tensor (torch.unique)
    with pytest.raises(AssertionError, match="device data"), torch.no_grad(), NoDeviceReads(cpu_kernel_checks=True):
        model(x, tokens, ctx, clip)


def test_frame_timesteps_modulation_layout():
    """K values: [K, dim] tables and a [B, L] row index as the tensor form has them; one value: per sample."""
    model = _model("tiny-ti2v")
    B, F_, P = 2, 3, 6
    for values, K in (((0.0, 700.0, 700.0), 2), ((700.0,) * 3, 1)):
        ft = FrameTimesteps(values)
        a = model._modulation(ft, B, F_, P, model.device)
        b = model._modulation(ft.token_timesteps(P, B), B, F_, P, model.device)
        assert torch.equal(a.e, b.e) and torch.equal(a.temb, b.temb)
        if K == 1:
            assert a.inv is None and b.inv is None and a.e.shape[0] == B
        else:
            assert torch.equal(a.inv, b.inv) and a.inv.is_contiguous() and a.e.shape[0] == K
            assert a.index.dtype == torch.int32 and torch.equal(a.index, b.index)


def test_frame_timesteps_values_and_tensor_form():
    ft = FrameTimesteps([0, np.float64(937.5), np.int64(3)])
    assert ft.values == (0.0, 937.5, 3.0) and all(type(v) is float for v in ft.values) and len(ft) == 3
    assert ft.distinct() == ((0.0, 3.0, 937.5), (0, 2, 1))
    # float32 rounding first (-0.0 is 0.0): values torch.unique would see as one are one
    close = FrameTimesteps((0.1, -0.0, 0.1 + 1e-12, 0.0))
    want = torch.unique(torch.tensor(close.values, dtype=torch.float32))
    values, rows = close.distinct()
    assert torch.equal(torch.tensor(values, dtype=torch.float32), want) and rows == (1, 0, 1, 0)
    assert FrameTimesteps.zeros(2) == FrameTimesteps((0.0, 0.0))
    t = ft.token_timesteps(4, batch=3)
    assert t.shape == (3, 12) and t.is_contiguous()
    assert torch.equal(t, torch.tensor([0.0, 937.5, 3.0]).repeat_interleave(4).expand(3, -1))
    with pytest.raises(TypeError, match="FrameTimesteps"):
        FrameTimesteps(("a",))
    with pytest.raises(TypeError, match="FrameTimesteps"):
        FrameTimesteps((True, 1.0))
    with pytest.raises(TypeError, match="FrameTimesteps"):
        FrameTimesteps(torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        FrameTimesteps((0.0, float("nan")))
    with pytest.raises(ValueError, match="finite"):
        FrameTimesteps((1e39,))
    with pytest.raises(ValueError, match="one value per latent frame"):
        FrameTimesteps(())
    model = _model("tiny-ti2v")
    x, _, ctx, _ = _inputs(model.config, B=1, Fr=3)
    with pytest.raises(ValueError, match="FrameTimesteps"):
        model(x, FrameTimesteps((0.0, 1.0)), ctx)


def test_frame_timesteps_token_timesteps_is_the_csg_windows():
    from swift_model.generation.csg import CSGPlan

    P = 4
    for win in CSGPlan(7, 2, (1, 1), block_tokens=P).windows:
        ft = FrameTimesteps(tuple(937.5 if noisy else 0.0 for noisy in win.noisy))
        assert torch.equal(ft.token_timesteps(P, batch=2), win.token_timesteps(937.5, P, batch=2))


# -------------------------------------------------------------------------------------------------------------
# frame positions
# -------------------------------------------------------------------------------------------------------------


def test_frame_positions_as_a_sequence_stay_on_the_host():
    model = _model("tiny-ti2v", seed=5)
    x, _, ctx, _ = _inputs(model.config, B=1, Fr=4)
    ft = FrameTimesteps((0.0, 500.0, 500.0, 0.0))
    with torch.no_grad():
        want = model(x, ft, ctx, frame_positions=torch.tensor([0, 5, 6, 7]))
        model._rope_cache.clear()
        with NoDeviceReads(cpu_kernel_checks=True):
            got = model(x, ft, ctx, frame_positions=(0, 5, 6, 7))
            again = model(x, ft, ctx, frame_positions=[0, 5, 6, 7])
    assert torch.equal(got, want) and torch.equal(again, want)
    assert [k[1] for k in model._rope_cache] == [(0, 5, 6, 7)]  # the tuple is the cache key
    assert frame_position_tuple(np.array([0, 5])) == (0, 5) and frame_position_tuple(range(2), 2) == (0, 1)
    assert frame_position_tuple([0, 1.5]) == (0, 1.5)
    with pytest.raises(TypeError, match="frame_positions"):
        frame_position_tuple(["a", 1])
    with pytest.raises(TypeError, match="frame_positions"):
        frame_position_tuple(3)
    with pytest.raises(ValueError, match="frame_positions must have 3"):
        frame_position_tuple((0, 1), 3)
    with pytest.raises(ValueError, match="finite"):
        model(x, ft, ctx, frame_positions=(0, 1, 2, float("inf")))


def test_rope_table_checks_a_sequence_on_the_host():
    with FakeTensorMode(), NoDeviceReads():
        table = rope_table((3, 2, 2), 12, frame_positions=(0, 5, 6), device="cuda")
    assert isinstance(table, FakeTensor) and table.shape == (12, 6, 2) and table.device.type == "cuda"
    assert torch.equal(rope_table((3, 2, 2), 12, frame_positions=(0, 5, 6)),
                       rope_table((3, 2, 2), 12, frame_positions=torch.tensor([0, 5, 6])))
    for bad in ([0.0, float("nan")], np.array([0.0, np.inf])):
        with pytest.raises(ValueError, match="finite"):
            rope_table((2, 2, 2), 8, frame_positions=bad)


# -------------------------------------------------------------------------------------------------------------
# the anchor cache
# -------------------------------------------------------------------------------------------------------------


def _anchor_window(T=7, P=4, seed=9, check_latents=True):
    """A tiny TI2V model, the shared-anchor window of segment 1 and its inputs."""
    model = _model("tiny-ti2v", seed=seed)
    lay = CSGLayout(T, P, 2, (1, 1), anchor_attends="anchor", mode="packed", segments=(1,))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, model.config.in_channels, lay.num_seq_blocks, 4, 4, generator=g)
    ctx = torch.randn(2, 9, model.config.text_dim, generator=g)
    positions = tuple(lay.block_ids.tolist())
    ft = FrameTimesteps(tuple(750.0 if noisy else 0.0 for noisy in lay.noisy_blocks.tolist()))
    with torch.no_grad():
        cache = model.precompute_context(ctx)
        anchor = model.precompute_anchor(x[:, :, :1], cache, positions[:1], check_latents=check_latents)
    return model, lay, x, ft, positions, cache, anchor


def test_anchor_cache_with_host_inputs_is_the_tensor_call():
    model, lay, x, ft, positions, cache, anchor = _anchor_window(check_latents=False)
    assert isinstance(anchor, AnchorCache) and not anchor.check_latents and anchor.positions == (0,)
    P = lay.block_tokens
    with torch.no_grad():
        want = model(x, ft.token_timesteps(P, 2), layout=lay, frame_positions=torch.tensor(positions),
                     context_cache=cache, anchor_cache=anchor)
        with NoDeviceReads(cpu_kernel_checks=True):
            got = model(x, ft, layout=lay, frame_positions=positions, context_cache=cache, anchor_cache=anchor)
            plan = plan_attention(lay)
            by_plan = model(x, ft, attention_plan=plan, frame_positions=positions, context_cache=cache,
                            anchor_cache=anchor)
        full = model(x, ft, layout=lay, frame_positions=positions, context_cache=cache)
    assert torch.equal(got, want) and torch.equal(by_plan, want)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5)  # the cache holds the anchor's own numbers


def test_anchor_cache_checks_latents_unless_its_builder_says_not():
    for check_latents in (True, False):
        model, lay, x, ft, positions, cache, anchor = _anchor_window(check_latents=check_latents)
        assert anchor.check_latents is check_latents
        other = x.clone()
        other[:, :, 0] += 1
        kw = dict(layout=lay, frame_positions=positions, context_cache=cache, anchor_cache=anchor)
        with torch.no_grad():
            if check_latents:  # the default: a different anchor input is refused
                with pytest.raises(ValueError, match="anchor blocks differ"):
                    model(other, ft, **kw)
            else:  # skipped: the caller guarantees the anchor input; the cache's output stands for it
                with NoDeviceReads(cpu_kernel_checks=True):
                    out = model(other, ft, **kw)
                assert torch.equal(out, model(x, ft, **kw))
        # everything else is still checked, with host inputs and with tensors
        dense = CSGLayout(7, lay.block_tokens, 2, (1, 1), mode="packed", segments=(1,))
        copies = CSGLayout(7, lay.block_tokens, 2, (1, 1), anchor_attends="anchor", mode="packed", segments=(0, 1),
                           anchor_copies=True)
        hot = FrameTimesteps((5.0,) + ft.values[1:])
        P = lay.block_tokens
        bad = [
            (dict(layout=dense), "attending only itself"),
            (dict(layout=None), "attending only itself"),
            (dict(frame_positions=(1,) + positions[1:]), "frame positions must be"),
            (dict(frame_positions=torch.tensor((1,) + positions[1:])), "frame positions must be"),
            (dict(timestep=hot), "timestep must be 0"),
            (dict(timestep=hot.token_timesteps(P, 2)), "timestep must be 0"),
            (dict(timestep=torch.zeros(2)), "per token or per frame"),
            (dict(context_cache=model.precompute_context(torch.zeros(1, 3, model.config.text_dim))),
             "another context_cache"),
            (dict(latents=torch.cat([x, x[:1]])), "anchor blocks differ"),  # shapes: checked on the host
            (dict(anchor_cache="cache"), "precompute_anchor"),
        ]
        for change, match in bad:
            call = dict(latents=x, timestep=ft, **kw)
            call.update(change)
            lat, t = call.pop("latents"), call.pop("timestep")
            with pytest.raises((ValueError, TypeError), match=match), torch.no_grad():
                model(lat, t, **call)
        with pytest.raises(ValueError, match="attending only itself"), torch.no_grad():
            model(torch.zeros(2, x.shape[1], copies.num_seq_blocks, 4, 4), FrameTimesteps.zeros(copies.num_seq_blocks),
                  layout=copies, context_cache=cache, anchor_cache=anchor)


def test_precompute_anchor_runs_at_timestep_zero_from_host_inputs():
    model, lay, x, ft, positions, cache, anchor = _anchor_window()
    kv: list = []
    with torch.no_grad():
        want = model(x[:, :, :1], torch.zeros(2, lay.block_tokens), frame_positions=torch.tensor([0]),
                     context_cache=cache, _record_kv=kv)
        with NoDeviceReads(cpu_kernel_checks=True):
            again = model.precompute_anchor(x[:, :, :1], cache, (0,), check_latents=False)
    assert torch.equal(anchor.output, want) and torch.equal(again.output, want)
    assert all(torch.equal(a, b) for pa, pb in zip(anchor.kv, kv) for a, b in zip(pa, pb))
    assert anchor.positions == again.positions == (0,)
    with pytest.raises(TypeError, match="check_latents"):
        model.precompute_anchor(x[:, :, :1], cache, check_latents=1)


def _roles_start_with_shared_anchor(layout, A):
    """The anchor-cache layout condition read from the layout's role table (the tensor the host check avoids)."""
    roles = layout.block_roles.tolist()
    return (layout.anchor_attends == "anchor" and roles[:A] == [ROLE_ANCHOR] * A and ROLE_ANCHOR not in roles[A:])


def test_host_layout_check_agrees_with_the_role_table():
    layouts = []
    for T, A, attends in itertools.product((3, 6), (0, 1, 2), ("all", "anchor")):
        layouts.append(CSGLayout(T, 2, 2, (1, 0), anchor_blocks=A, anchor_attends=attends, mode="clip"))
        layouts.append(CSGLayout(T, 2, 2, (1, 1), anchor_blocks=A, anchor_attends=attends, mode="window", segment=0))
        n = -(-(T - A) // 2)
        for copies in (False, True):
            for segments in (None, (0,), (n - 1,), (n - 1, 0)):
                if segments is not None and (n < 1 or len(set(segments)) != len(segments)):
                    continue
                layouts.append(CSGLayout(T, 2, 2, (1, 0), anchor_blocks=A, anchor_attends=attends, mode="packed",
                                         segments=segments, anchor_copies=copies))
    assert len(layouts) > 50
    for layout in layouts:
        for blocks in (0, 1, 2):
            assert starts_with_shared_anchor(layout, blocks) == _roles_start_with_shared_anchor(layout, blocks), \
                (layout, blocks)
    assert not starts_with_shared_anchor(None, 1)


# -------------------------------------------------------------------------------------------------------------
# fake tensors
# -------------------------------------------------------------------------------------------------------------


def _fake_parameters(model, device):
    """Every parameter of a meta-device model as an empty fake tensor on ``device`` (inside a FakeTensorMode)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                              requires_grad=False)
    return model


@pytest.mark.parametrize("shared_anchor", [False, True])
def test_csg_window_forward_runs_on_fake_cuda_tensors(shared_anchor):
    """With host-known inputs a CSG window runs under FakeTensorMode on fake CUDA tensors, reading nothing (no
    patching): the shape of a plan of the real pipeline's calls."""
    cfg = WanDiTConfig.preset("tiny-ti2v")
    with torch.device("meta"):
        model = WanDiT(cfg).eval()
    P = 4
    lay = CSGLayout(7, P, 2, (1, 1), anchor_attends="anchor" if shared_anchor else "all", mode="packed",
                    segments=(1,))
    positions = tuple(lay.block_ids.tolist())
    ft = FrameTimesteps(tuple(937.5 if noisy else 0.0 for noisy in lay.noisy_blocks.tolist()))
    n = lay.num_seq_blocks
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), NoDeviceReads():
        _fake_parameters(model, "cuda")
        x = torch.randn(1, cfg.in_channels, n, 4, 4, device="cuda")
        cache = model.precompute_context(torch.randn(1, 11, cfg.text_dim, device="cuda"))
        anchor = None
        if shared_anchor:
            anchor = model.precompute_anchor(x[:, :, :1], cache, positions[:1], check_latents=False)
        out = model(x, ft, layout=lay, frame_positions=positions, context_cache=cache, anchor_cache=anchor)
        plan = plan_attention(lay, device=model.device)
        again = model(x, ft, attention_plan=plan, frame_positions=positions, context_cache=cache,
                      anchor_cache=anchor)
    for o in (out, again):
        assert isinstance(o, FakeTensor) and o.shape == (1, cfg.out_channels, n, 4, 4) and o.device.type == "cuda"
