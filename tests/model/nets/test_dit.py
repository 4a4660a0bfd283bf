"""WanDiT: parity with diffusers' WanTransformer3DModel, CSG layouts, caches, validation, GPU bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import swift_model.nets.dit.blocks as dit_blocks
import swift_model.nets.dit.model as dit_model
from swift_kernels import CSGLayout
from swift_model import WanDiT, WanDiTConfig

diffusers = pytest.importorskip("diffusers")

from helpers import assert_close_to_scale as _close  # noqa: E402
from helpers import diffusers_model as _diffusers_model  # noqa: E402
from helpers import dit_inputs as _inputs  # noqa: E402
from helpers import random_init as _random_init  # noqa: E402


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-i2v", "tiny-ti2v"])
def test_parity_with_diffusers(preset):
    cfg = WanDiTConfig.preset(preset)
    ref = _diffusers_model(cfg, seed=hash(preset) % 1000)
    model = WanDiT(cfg).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x, t, ctx, clip = _inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, ctx, clip, return_dict=False)[0]
        got = model(x, t, ctx, clip)
    _close(got, want)
    # the timestep matters (catches a dropped modulation path)
    with torch.no_grad():
        other = model(x, t * 0.5, ctx, clip)
    assert (other - got).abs().max() > 1e-3


def test_ti2v_per_token_vs_per_frame_and_per_sample():
    cfg = WanDiTConfig.preset("tiny-ti2v")
    model = WanDiT(cfg).eval()
    _random_init(model, 3)
    x, _, ctx, _ = _inputs(cfg, B=2)
    Fr, P = x.shape[2], x.shape[3] * x.shape[4] // 4
    tf = torch.tensor([[0.0, 700.0, 700.0], [0.0, 250.0, 900.0]])
    with torch.no_grad():
        a = model(x, tf, ctx)  # [B, F]
        b = model(x, tf[:, :, None].expand(2, Fr, P).reshape(2, -1), ctx)  # [B, L]
        c = model(x, torch.tensor([700.0, 400.0]), ctx)  # per sample
        d = model(x, torch.tensor([[700.0], [400.0]]).expand(2, Fr * P), ctx)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    _close(c, d, rtol=1e-6)


@pytest.mark.parametrize("preset", ["tiny-ti2v", "tiny-i2v"])
def test_indexed_modulation_equals_expanded(preset, monkeypatch):
    """Per-token timesteps with few distinct values: the ops get [K, dim] tables + a row index, and the model
    gives the numbers (and gradients) of the expanded [B, L, dim] layout."""
    cfg = WanDiTConfig.preset(preset)
    model = WanDiT(cfg)
    _random_init(model, 6)
    x, _, ctx, clip = _inputs(cfg, B=2)
    Fr, P = x.shape[2], x.shape[3] * x.shape[4] // 4
    # three distinct values over both samples: a CSG-window-like pattern (0 on clean blocks)
    t = torch.tensor([[0.0, 750.0, 750.0], [0.0, 0.0, 500.0]])[:, :, None].expand(2, Fr, P).reshape(2, -1)

    seen = []
    real_ops = {name: getattr(dit_blocks, name) for name in ("adaln_modulate", "gated_residual")}

    def spy(name):
        def op(*args, **kw):
            mi = kw.get("mod_index")
            mods = [a for a in (*args[2:3], kw.get("shift"), kw.get("scale")) if isinstance(a, torch.Tensor)]
            if name == "adaln_modulate":
                mods = list(args[1:3])
            seen.append((None if mi is None else tuple(mi.shape), [tuple(m.shape) for m in mods]))
            return real_ops[name](*args, **kw)
        return op

    for name in real_ops:  # the blocks and the head call them
        for module in (dit_blocks, dit_model):
            monkeypatch.setattr(module, name, spy(name))
    outs, grads = [], []
    for indexed in (True, False):
        model.indexed_modulation = indexed
        model.zero_grad()
        seen.clear()
        out = model(x, t, ctx, clip)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if indexed:  # every modulation input was a [3, dim] table read through a [B, L] index
            assert seen and all(mi == (2, Fr * P) for mi, _ in seen)
            assert all(shape == (3, cfg.dim) for _, shapes in seen for shape in shapes)
        else:
            assert seen and all(mi is None for mi, _ in seen)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:  # every parameter, the modulation tables, time MLP and norm2 (a stride-0 table) included
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)
    for n in ("blocks.0.scale_shift_table", "condition_embedder.time_proj.weight", "blocks.1.norm2.weight"):
        assert grads[0][n].abs().max() > 0, n


def test_context_cache_and_text_padding():
    cfg = WanDiTConfig.preset("tiny-i2v")
    model = WanDiT(cfg).eval()
    _random_init(model, 4)
    x, t, ctx, clip = _inputs(cfg)
    short = ctx[:, :7]
    padded = torch.cat((short, torch.zeros(2, cfg.text_len - 7, cfg.text_dim)), dim=1)
    with torch.no_grad():
        cache = model.precompute_context(short, clip)
        a = model(x, t, short, clip)
        b = model(x, t, padded, clip)
        c = model(x, t, context_cache=cache)
        e = model(x, t, [s for s in short], clip)  # list form, as the original Wan takes it
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    torch.testing.assert_close(a, e, rtol=0, atol=0)


def _clip_and_model(preset="tiny-ti2v", T=6, H=4, W=4, seed=5):
    cfg = WanDiTConfig.preset(preset)
    model = WanDiT(cfg).eval()
    _random_init(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, cfg.in_channels, T, H, W, generator=g)
    ctx = torch.randn(1, 11, cfg.text_dim, generator=g)
    return cfg, model, x, ctx


def test_csg_window_equals_dense_forward_on_gathered_tokens():
    cfg, model, clip_lat, ctx = _clip_and_model(T=7)
    P = clip_lat.shape[3] * clip_lat.shape[4] // 4
    lay = CSGLayout(7, P, segment_blocks=2, neighbors=(1, 1), mode="window", segment=1)
    ids = lay.block_ids  # anchor 0, then the window's clip blocks
    assert ids.tolist() != list(range(len(ids)))  # positions really differ from 0..n-1
    win = clip_lat[:, :, ids]
    t = torch.zeros(1, len(ids))
    t[0, lay.noisy_blocks] = 750.0
    with torch.no_grad():
        got = model(win, t, ctx, layout=lay)
        want = model(win, t, ctx, frame_positions=ids)
        naive = model(win, t, ctx)  # positions 0..n-1: must differ
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (naive - got).abs().max() > 1e-4


def _masked_reference_attention(q, k, v, plan, block_tokens=None, softmax_scale=None, backend=None):
    """Dense SDPA with the block mask expanded to tokens (the reference for the CSG mask). The DiT passes the
    attention plan it built once per call; its block table is what the kernels read."""
    block_mask, block_tokens = plan.block_mask, plan.block_tokens
    tok = block_mask.to(q.device).repeat_interleave(block_tokens, 0).repeat_interleave(block_tokens, 1)
    o = F.scaled_dot_product_attention(q.transpose(1, 2).double(), k.transpose(1, 2).double(),
                                       v.transpose(1, 2).double(), attn_mask=tok)
    return o.transpose(1, 2).to(q.dtype)


def test_csg_clip_mode_differs_from_dense_only_through_mask(monkeypatch):
    cfg, model, x, ctx = _clip_and_model(T=6, seed=7)
    P = x.shape[3] * x.shape[4] // 4
    lay = CSGLayout(6, P, segment_blocks=2, neighbors=(1, 0), mode="clip")
    assert not lay.block_mask.all()
    t = torch.full((1, 6), 500.0)
    t[0, 0] = 0
    with torch.no_grad():
        got = model(x, t, ctx, layout=lay)
        dense = model(x, t, ctx)
        monkeypatch.setattr(dit_blocks, "frame_block_attention", _masked_reference_attention)
        want = model(x, t, ctx, layout=lay)
        want_dense = model(x, t, ctx)
    _close(got, want, rtol=1e-5)
    _close(dense, want_dense, rtol=1e-5)
    assert (got - dense).abs().max() > 1e-4  # the mask matters
    # packed windows: one call over every window's blocks, with the clip positions of each block
    pk = CSGLayout(6, P, segment_blocks=2, neighbors=(1, 0), mode="packed")
    xp = x[:, :, pk.block_ids]
    with torch.no_grad():
        got_p = model(xp, 500.0, ctx, layout=pk)
        monkeypatch.setattr(dit_blocks, "frame_block_attention", _masked_reference_attention)
        want_p = model(xp, 500.0, ctx, layout=pk)
    _close(got_p, want_p, rtol=1e-5)


def test_widened_input_and_backward():
    cfg = WanDiTConfig.preset("tiny-ti2v").widened_input(48)
    assert cfg.in_channels == 96 and cfg.out_channels == 48 and cfg.base_in_channels == 48
    model = WanDiT(cfg)
    _random_init(model, 8)
    x = torch.randn(1, 96, 2, 4, 4)
    ctx = torch.randn(1, 5, cfg.text_dim)
    out = model(x, torch.tensor([300.0]), ctx)
    assert out.shape == (1, 48, 2, 4, 4)
    out.square().mean().backward()
    for name in ("blocks.0.attn1.to_q.weight", "blocks.1.attn1.norm_k.weight", "patch_embedding.weight",
                 "blocks.0.scale_shift_table"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name


def test_presets_match_public_models():
    expect = {  # (dim, layers, heads, ffn, in, out, image_dim)
        "wan2.1-t2v-1.3b": (1536, 30, 12, 8960, 16, 16, None),
        "wan2.1-i2v-14b": (5120, 40, 40, 13824, 36, 16, 1280),
        "wan2.2-i2v-a14b": (5120, 40, 40, 13824, 36, 16, None),
        "wan2.2-ti2v-5b": (3072, 30, 24, 14336, 48, 48, None),
    }
    for name, (d, n, h, f, i, o, img) in expect.items():
        c = WanDiTConfig.preset(name)
        assert (c.dim, c.num_layers, c.num_heads, c.ffn_dim, c.in_channels, c.out_channels, c.image_dim) == (d, n, h, f, i, o, img)
        assert c.head_dim == 128 and c.text_dim == 4096 and c.text_len == 512 and c.freq_dim == 256
    with torch.device("meta"):
        n13 = sum(p.numel() for p in WanDiT(WanDiTConfig.preset("wan2.1-t2v-1.3b")).parameters())
        n5 = sum(p.numel() for p in WanDiT(WanDiTConfig.preset("wan2.2-ti2v-5b")).parameters())
    assert 1.3e9 < n13 < 1.5e9 and 4.9e9 < n5 < 5.1e9
    assert WanDiTConfig.preset("wan2.2-ti2v-5b").widened_input(48).in_channels == 96
    with pytest.raises(ValueError, match="unknown preset"):
        WanDiTConfig.preset("wan9")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        WanDiTConfig(dim=100, num_heads=3)


def test_bad_inputs():
    cfg = WanDiTConfig.preset("tiny-i2v")
    model = WanDiT(cfg).eval()
    x, t, ctx, clip = _inputs(cfg, B=1)
    with pytest.raises(ValueError, match="channels"):
        model(x[:, :16], t, ctx, clip)
    with pytest.raises(ValueError, match="clip_fea"):
        model(x, t, ctx)
    with pytest.raises(ValueError, match="timestep"):
        model(x, torch.zeros(1, 5), ctx, clip)
    with pytest.raises(ValueError, match="context"):
        model(x, t, ctx[..., :7], clip)
    with pytest.raises(ValueError, match="frame_positions"):
        model(x, t, ctx, clip, frame_positions=[0, 1])
    lay = CSGLayout(4, 6, segment_blocks=1, mode="clip")
    with pytest.raises(ValueError, match="layout"):
        model(x, t, ctx, clip, layout=lay)
    with pytest.raises(TypeError, match="latents must be a floating-point"):
        model(x.long(), t, ctx, clip)
    with pytest.raises(ValueError, match="latents must be"):
        model(x[0], t, ctx, clip)
    t2v = WanDiT(WanDiTConfig.preset("tiny-t2v"))
    with pytest.raises(ValueError, match="clip_fea"):
        t2v(torch.randn(1, 16, 1, 2, 2), t, ctx, clip)
    # non-numeric timesteps and positions are named TypeErrors, not torch's "new(): invalid data type"
    with pytest.raises(TypeError, match="timestep"):
        model(x, "500", ctx, clip)
    with pytest.raises(TypeError, match="frame_positions"):
        model(x, t, ctx, clip, frame_positions="ab")


def test_from_pretrained_checks_arguments(tmp_path):
    with pytest.raises(TypeError, match="path"):
        WanDiT.from_pretrained(5)
    with pytest.raises(TypeError, match="dtype"):
        WanDiT.from_pretrained(str(tmp_path), dtype="fp16")
    with pytest.raises(TypeError, match="dtype"):
        WanDiT.from_pretrained(str(tmp_path), dtype=torch.int8)
    with pytest.raises(ValueError, match="device"):
        WanDiT.from_pretrained(str(tmp_path), device="nowhere")
    with pytest.raises(FileNotFoundError):
        WanDiT.from_pretrained(str(tmp_path / "missing"))


@pytest.mark.gpu
def test_gpu_bf16_one_block_real_size(gpu_device):
    """5B preset, one block, random weights: bf16 on our kernels vs diffusers in fp32 (the truth)."""
    cfg = WanDiTConfig.preset("wan2.2-ti2v-5b", num_layers=1)
    ref = _diffusers_model(cfg, seed=11).to(gpu_device)
    model = WanDiT(cfg)
    model.load_state_dict(ref.state_dict())
    model = model.to(gpu_device).to_dtype(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 48, 3, 32, 48, generator=g).to(gpu_device)
    L = 3 * 16 * 24
    t = torch.full((1, L), 750.0, device=gpu_device)
    t[:, : L // 3] = 0
    ctx = torch.randn(1, 512, 4096, generator=g).to(gpu_device)
    with torch.no_grad():
        truth = ref(x, t, ctx, return_dict=False)[0].double()
        ref_bf16 = ref.to(torch.bfloat16)
        base = ref_bf16(x.bfloat16(), t, ctx.bfloat16(), return_dict=False)[0].double()
        got = model(x.bfloat16(), t, ctx.bfloat16()).double()
    err = (got - truth).abs().max().item()
    base_err = (base - truth).abs().max().item()
    assert torch.isfinite(got).all()
    assert err <= 2 * base_err + 1e-2 * truth.abs().max().item(), (err, base_err)
