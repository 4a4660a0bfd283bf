"""The per-block WanDiT: both block boundaries, with and without activation checkpointing, are bitwise equal to
the forward the model had before blocks became modules (frozen below as the oracle), outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swift_kernels import CSGLayout, frame_block_attention
from swift_kernels.dit_ops import adaln_modulate, gated_residual, qk_norm_rope
from swift_model import WanDiT, WanDiTConfig
from swift_model.nets.dit import ContextCache

from helpers import layout_dit_inputs
from helpers import random_init as _random_init


# -------------------------------------------------------------------------------------------------------------
# The oracle: WanDiT.forward as it was before the per-block refactor (every block's cross-attention K/V in the
# root, each FFN residual fused with the next block's AdaLN reading the next block's table), copied verbatim
# except that `self` is the model argument and the argument validation is left out. It reads the same module's
# parameters. Do not "fix" it: it is the reference the refactor must reproduce bit for bit.
# -------------------------------------------------------------------------------------------------------------


def _frozen_context_kv(self, context, clip_fea, batch):
    cfg = self.config
    H, D = cfg.num_heads, cfg.head_dim
    ctx = self._embed_text(context, batch)
    img = None
    if cfg.image_dim is not None:
        img = self.condition_embedder.image_embedder(clip_fea.to(self.device, self.dtype))
    kv = []
    for blk in self.blocks:
        a = blk.attn2
        k = a.norm_k(a.to_k(ctx)).unflatten(-1, (H, D))
        v = a.to_v(ctx).unflatten(-1, (H, D))
        ki = vi = None
        if img is not None:
            ki = a.norm_added_k(a.add_k_proj(img)).unflatten(-1, (H, D))
            vi = a.add_v_proj(img).unflatten(-1, (H, D))
        kv.append((k, v, ki, vi))
    return ContextCache(kv=kv, batch=ctx.shape[0], dtype=self.dtype, device=self.device)


def frozen_forward(self, latents, timestep, context=None, clip_fea=None, *, layout=None, context_cache=None):
    cfg = self.config
    B, C, Fr, Hl, Wl = latents.shape
    pt, ph, pw = cfg.patch_size
    Fp, Hp, Wp = Fr // pt, Hl // ph, Wl // pw
    P = Hp * Wp
    L = Fp * P
    H, D = cfg.num_heads, cfg.head_dim
    device, dtype = self.device, self.dtype
    if layout is not None:
        mask, btok = layout.block_mask, P
        pos = torch.as_tensor(layout.block_ids).flatten().cpu()
    else:
        mask, btok = torch.ones(1, 1, dtype=torch.bool), L
        pos = None
    freqs = self._rope((Fp, Hp, Wp), pos, device)

    # -- conditioning
    if context_cache is None:
        context_cache = _frozen_context_kv(self, context, clip_fea, B)
    mod = self._modulation(timestep, B, Fp, P, device)

    # -- patch embedding: [B, C, F, H, W] -> [B, L, dim]
    x = self.patch_embedding(latents.to(dtype)).flatten(2).transpose(1, 2).contiguous()

    eps = cfg.eps
    mi = mod.index  # None unless the modulation comes as tables + a per-token row index
    ones = mod.const(torch.ones(cfg.dim, device=device))
    blocks = list(self.blocks)
    xm = adaln_modulate(x, mod.get(blocks[0].scale_shift_table, 0), mod.get(blocks[0].scale_shift_table, 1), eps,
                        mod_index=mi)
    for i, blk in enumerate(blocks):
        table = blk.scale_shift_table
        # self-attention
        a1 = blk.attn1
        q = a1.to_q(xm).view(B, L, H, D)
        k = a1.to_k(xm).view(B, L, H, D)
        v = a1.to_v(xm).view(B, L, H, D)
        q, k = qk_norm_rope(q, k, a1.norm_q.weight, a1.norm_k.weight, freqs, eps)
        o = frame_block_attention(q, k, v, mask, btok, backend=None)
        y = a1.to_out[0](o.reshape(B, L, cfg.dim))
        gate = mod.get(table, 2)
        if blk.norm2 is not None:
            # LN(x)*w + b written as an AdaLN with scale = w - 1, shift = b, fused into the residual pass.
            w = mod.const(blk.norm2.weight.float() - 1.0)
            b = mod.const(blk.norm2.bias)
            x, xn = gated_residual(x, y, gate, shift=b, scale=w, eps=blk.norm2.eps, mod_index=mi)
        else:
            x = gated_residual(x, y, gate, mod_index=mi)
            xn = x
        # cross-attention
        a2 = blk.attn2
        kc, vc, ki, vi = context_cache.kv[i]
        q = a2.norm_q(a2.to_q(xn)).view(B, L, H, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, kc.transpose(1, 2).expand(B, -1, -1, -1),
                                           vc.transpose(1, 2).expand(B, -1, -1, -1))
        if ki is not None:
            o = o + F.scaled_dot_product_attention(q, ki.transpose(1, 2).expand(B, -1, -1, -1),
                                                   vi.transpose(1, 2).expand(B, -1, -1, -1))
        y = a2.to_out[0](o.transpose(1, 2).reshape(B, L, cfg.dim))
        x, xm = gated_residual(x, y, ones, shift=mod.get(table, 3), scale=mod.get(table, 4), eps=eps, mod_index=mi)
        # feed-forward; its residual is fused with the next block's (or the head's) AdaLN
        y = blk.ffn(xm)
        if i + 1 < len(blocks):
            nt = blocks[i + 1].scale_shift_table
            x, xm = gated_residual(x, y, mod.get(table, 5), shift=mod.get(nt, 0), scale=mod.get(nt, 1), eps=eps,
                                   mod_index=mi)
        else:
            x, xm = gated_residual(x, y, mod.get(table, 5), shift=mod.head(self.scale_shift_table, 0),
                                   scale=mod.head(self.scale_shift_table, 1), eps=eps, mod_index=mi)
    out = self.proj_out(xm)
    # unpatchify: features are ordered (pt, ph, pw, c)
    out = out.view(B, Fp, Hp, Wp, pt, ph, pw, cfg.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, cfg.out_channels, Fr, Hl, Wl).to(latents.dtype)


# -------------------------------------------------------------------------------------------------------------
# cases
# -------------------------------------------------------------------------------------------------------------


T_CLIP, HL, WL = 6, 4, 6  # a clip of 6 latent frames of 2x3 = 6 tokens
P = (HL // 2) * (WL // 2)


def _case(preset: str, layout_kind: str, seed: int):
    """(model, latents, timestep, context, clip_fea, layout) with fresh random values."""
    cfg = WanDiTConfig.preset(preset, num_layers=3)
    model = WanDiT(cfg)
    _random_init(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    layout = None
    if layout_kind == "window":
        layout = CSGLayout(T_CLIP, P, segment_blocks=2, neighbors=(1, 1), mode="window", segment=1)
    elif layout_kind == "clip":
        layout = CSGLayout(T_CLIP, P, segment_blocks=2, neighbors=(1, 0), mode="clip")
    elif layout_kind == "packed":
        layout = CSGLayout(T_CLIP, P, segment_blocks=2, neighbors=(1, 0), mode="packed")
    x, t, ctx, clip = layout_dit_inputs(cfg, layout, T_CLIP, HL, WL, g)  # timesteps per frame
    return model, x, t, ctx, clip, layout


def _run(forward, model, x, t, ctx, clip, layout, weight):
    """Output and the gradients w.r.t. the inputs and every parameter of ``(out * weight).sum()``."""
    model.zero_grad(set_to_none=True)
    inputs = [x.clone().requires_grad_(), ctx.clone().requires_grad_()]
    if clip is not None:
        inputs.append(clip.clone().requires_grad_())
    out = forward(inputs[0], t, inputs[1], inputs[2] if clip is not None else None, layout=layout)
    (out * weight).sum().backward()
    grads = {f"input{i}": a.grad for i, a in enumerate(inputs)}
    grads.update({n: p.grad for n, p in model.named_parameters()})
    return out.detach(), grads


def _assert_bitwise(got, want, what):
    out_g, grads_g = got
    out_w, grads_w = want
    assert torch.isfinite(out_w).all()
    assert torch.equal(out_g, out_w), f"{what}: output differs by {(out_g - out_w).abs().max().item():.3e}"
    assert grads_g.keys() == grads_w.keys()
    for name, gw in grads_w.items():
        gg = grads_g[name]
        assert gw is not None and gg is not None, f"{what}: no gradient for {name}"
        assert torch.equal(gg, gw), f"{what}: gradient of {name} differs by {(gg - gw).abs().max().item():.3e}"


@pytest.mark.parametrize("preset,layout_kind", [
    ("tiny-ti2v", "dense"), ("tiny-ti2v", "window"), ("tiny-ti2v", "clip"), ("tiny-ti2v", "packed"),
    ("tiny-i2v", "dense"), ("tiny-i2v", "window"), ("tiny-i2v", "clip"), ("tiny-i2v", "packed"),
])
def test_block_boundaries_bitwise_equal_to_frozen_forward(preset, layout_kind):
    model, x, t, ctx, clip, layout = _case(preset, layout_kind, seed=hash((preset, layout_kind)) % 1000)
    weight = torch.randn(1, model.config.out_channels, *x.shape[2:], generator=torch.Generator().manual_seed(7))
    want = _run(lambda *a, **k: frozen_forward(model, *a, **k), model, x, t, ctx, clip, layout, weight)
    assert max(g.abs().max().item() for g in want[1].values()) > 0
    for boundary in ("fused", "unfused"):
        for ckpt in (False, True):
            model.block_boundary, model.checkpoint_blocks = boundary, ckpt
            got = _run(model, model, x, t, ctx, clip, layout, weight)
            _assert_bitwise(got, want, f"{preset}/{layout_kind}/{boundary}/checkpoint={ckpt}")


def test_expanded_modulation_and_context_cache_bitwise():
    """The expanded per-token modulation layout, and K/V from a ContextCache, through both boundaries."""
    model, x, t, ctx, clip, layout = _case("tiny-ti2v", "window", seed=21)
    model.indexed_modulation = False
    weight = torch.randn(1, model.config.out_channels, *x.shape[2:], generator=torch.Generator().manual_seed(8))
    want = _run(lambda *a, **k: frozen_forward(model, *a, **k), model, x, t, ctx, clip, layout, weight)
    for boundary in ("fused", "unfused"):
        model.block_boundary, model.checkpoint_blocks = boundary, boundary == "unfused"
        _assert_bitwise(_run(model, model, x, t, ctx, clip, layout, weight), want, f"expanded/{boundary}")

    model, x, t, ctx, clip, layout = _case("tiny-i2v", "clip", seed=22)
    with torch.no_grad():
        frozen_cache = _frozen_context_kv(model, ctx, clip, x.shape[0])
        cache = model.precompute_context(ctx, clip)
        for (a, b) in zip(frozen_cache.kv, cache.kv):
            assert all(torch.equal(u, w) for u, w in zip(a, b))
        want = frozen_forward(model, x, t, layout=layout, context_cache=frozen_cache)
        for boundary in ("fused", "unfused"):
            model.block_boundary = boundary
            assert torch.equal(model(x, t, layout=layout, context_cache=cache), want)


class _ParameterSpy(torch.overrides.TorchFunctionMode):
    """Records every parameter that reaches a torch function (a matmul, an index, a cast...)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in (*args, *kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, torch.nn.Parameter):
                    self.seen.add(id(t))
        return func(*args, **kwargs)


@pytest.mark.parametrize("boundary", ["fused", "unfused", "chunked"])
def test_blocks_read_only_their_own_parameters(boundary):
    """Every parameter a block's forward touches is one of its own (what per-block FSDP2 and streaming need), at
    either boundary (forward and backward) and in the chunked inference path."""
    model, x, t, ctx, clip, layout = _case("tiny-i2v", "window", seed=23)
    chunked = boundary == "chunked"
    model.block_boundary = "fused" if chunked else boundary
    model.inference_chunk_tokens = 7
    spies = []

    def pre(module, args, kwargs):
        spies.append((module, _ParameterSpy()))
        spies[-1][1].__enter__()

    def post(module, args, kwargs, out):
        spies[-1][1].__exit__(None, None, None)

    hooks = [h for blk in model.blocks for h in (blk.register_forward_pre_hook(pre, with_kwargs=True),
                                                  blk.register_forward_hook(post, with_kwargs=True))]
    if chunked:
        with torch.no_grad():
            model(x, t, ctx, clip, layout=layout)
    else:
        model(x, t, ctx, clip, layout=layout).sum().backward()
    for h in hooks:
        h.remove()
    assert len(spies) == len(model.blocks) == 3
    for blk, spy in spies:
        own = {id(p) for p in blk.parameters()}
        assert spy.seen and spy.seen <= own, "a block read parameters that are not its own"
        assert id(blk.scale_shift_table) in spy.seen and id(blk.attn2.to_k.weight) in spy.seen


@pytest.mark.parametrize("layout_kind", ["dense", "window", "clip"])
def test_one_attention_plan_per_forward_shared_by_every_block(layout_kind):
    """The DiT looks its attention plan up once per call (not once per block), and a plan passed in by the
    caller (built once per window shape) is used as is: no lookup, the same bits, the layout's RoPE positions."""
    import swift_kernels.attention.plan as plan_mod

    model, x, t, ctx, clip, layout = _case("tiny-ti2v", layout_kind, seed=31)
    lookups = []
    real = plan_mod.plan_attention

    def counting(*args, **kw):
        lookups.append(args[0])
        return real(*args, **kw)

    import swift_model.nets.dit.sequence as dit_mod  # where the DiT looks the plan up

    with torch.no_grad():
        dit_mod.plan_attention = counting
        try:
            by_layout = model(x, t, ctx, layout=layout)
            assert len(lookups) == 1 and len(model.blocks) == 3  # once per call, not per block
            plan = real(layout, device=x.device) if layout is not None else real(
                torch.ones(1, 1, dtype=torch.bool), x.shape[2] * P, device=x.device)
            lookups.clear()
            by_plan = model(x, t, ctx, attention_plan=plan)
            assert lookups == []
        finally:
            dit_mod.plan_attention = real
    assert torch.equal(by_plan, by_layout), "a caller-built plan must give the same bits"
    with pytest.raises(ValueError, match="attention_plan"):
        model(x, t, ctx, attention_plan=plan, layout=layout or CSGLayout(T_CLIP, P, 2, mode="clip"))


def test_bad_block_boundary():
    model, x, t, ctx, clip, layout = _case("tiny-ti2v", "dense", seed=24)
    model.block_boundary = "half"
    with pytest.raises(ValueError, match="block_boundary"):
        model(x, t, ctx)


@pytest.mark.gpu
@pytest.mark.parametrize("layout_kind", ["dense", "window"])
def test_gpu_bf16_block_boundaries(gpu_device, layout_kind):
    """On the GPU kernels (Triton DiT ops) in bf16: the outputs of both boundaries, with and without
    checkpointing, are the frozen forward's bits (the fused residual+AdaLN kernel and the two separate kernels
    must agree, since the fused one normalises the rounded new x). Gradients are compared to rounding only:
    the modulation tables' gradients are summed with atomics on the GPU (index_add_), in no fixed order."""
    model, x, t, ctx, clip, layout = _case("tiny-ti2v", layout_kind, seed=31)
    model = model.to(gpu_device).to_dtype(torch.bfloat16)
    x, t, ctx = x.to(gpu_device), t.to(gpu_device), ctx.to(gpu_device)
    weight = torch.randn(1, model.config.out_channels, *x.shape[2:], device=gpu_device)
    want = _run(lambda *a, **k: frozen_forward(model, *a, **k), model, x, t, ctx, None, layout, weight)
    for boundary in ("fused", "unfused"):
        for ckpt in (False, True):
            model.block_boundary, model.checkpoint_blocks = boundary, ckpt
            out, grads = _run(model, model, x, t, ctx, None, layout, weight)
            assert torch.equal(out, want[0]), f"{boundary}/checkpoint={ckpt}: output differs"
            for name, g in want[1].items():
                err = (grads[name].float() - g.float()).abs().max().item()
                assert err <= 1e-2 * g.float().abs().max().item() + 1e-6, (boundary, ckpt, name, err)


# -------------------------------------------------------------------------------------------------------------
# inference in token chunks
# -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,layout_kind", [
    ("tiny-ti2v", "dense"), ("tiny-ti2v", "window"), ("tiny-ti2v", "packed"),
    ("tiny-i2v", "dense"), ("tiny-i2v", "clip"),
])
@pytest.mark.parametrize("chunk", [1, 5, 12])
def test_chunked_inference_equals_frozen_forward(preset, layout_kind, chunk):
    """Chunks that split frames and batch rows anywhere (1 token, 5, two frames' worth) give the frozen forward's
    numbers, from either boundary, with the per-token (indexed) modulation and per-sample timesteps. In fp64:
    the matmuls on row slices round differently from whole ones (~1e-5 in fp32), so fp64 makes the check sharp."""
    model, x, t, ctx, clip, layout = _case(preset, layout_kind, seed=hash((preset, layout_kind, chunk)) % 1000)
    model, x, ctx = model.double(), x.double(), ctx.double()
    clip = clip.double() if clip is not None else None
    with torch.no_grad():
        want = frozen_forward(model, x, t, ctx, clip, layout=layout)
        model.inference_chunk_tokens = chunk
        for boundary in ("fused", "unfused"):
            model.block_boundary = boundary
            out = torch.full_like(want, float("nan"))
            out.copy_(model(x, t, ctx, clip, layout=layout))
            torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{preset}/{layout_kind}/chunk={chunk}/{boundary}: {m}")


def test_chunked_inference_runs_only_without_grad_and_on_long_sequences(monkeypatch):
    """Chunking is an inference path: with grad enabled (training) or when the sequence fits in one chunk, the
    block runs its ordinary forward; a bad chunk size is a ValueError naming the attribute."""
    from swift_model.nets.dit import WanBlock

    model, x, t, ctx, clip, layout = _case("tiny-ti2v", "window", seed=41)
    calls = []
    real = WanBlock._forward_chunked
    monkeypatch.setattr(WanBlock, "_forward_chunked", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    L = layout.num_seq_blocks * P
    model.inference_chunk_tokens = L
    with torch.no_grad():
        model(x, t, ctx, layout=layout)
    assert calls == []
    model.inference_chunk_tokens = L - 1
    model(x, t, ctx, layout=layout)  # grad enabled
    assert calls == []
    with torch.no_grad():
        model(x, t, ctx, layout=layout)
    assert len(calls) == len(model.blocks)
    for bad in (0, -3, 2.5, True):
        model.inference_chunk_tokens = bad
        with pytest.raises(ValueError, match="inference_chunk_tokens"), torch.no_grad():
            model(x, t, ctx, layout=layout)
