"""LoRA merged at load time equals the unmerged low-rank forward, for the common key formats."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from swift_model import WanDiT, WanDiTConfig, merge_lora, save_dit

from test_dit import _inputs, _random_init


def _base(preset="tiny-i2v", seed=0):
    m = WanDiT(WanDiTConfig.preset(preset)).eval()
    _random_init(m, seed)
    return m


def _factors(g, out_f, in_f, r):
    return torch.randn(r, in_f, generator=g) * 0.3, torch.randn(out_f, r, generator=g) * 0.3


def _hooked(model: WanDiT, adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]]):
    """A copy of ``model`` whose Linear modules add ``s * (x @ down.T) @ up.T`` at run time (unmerged LoRA)."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    for name, (down, up, s) in adapters.items():
        mods[name].register_forward_hook(lambda mod, inp, out, d=down, u=up, s=s: out + s * (inp[0] @ d.T) @ u.T)
    return ref


def _check(merged, ref, cfg, atol=2e-5):
    x, t, ctx, clip = _inputs(cfg, B=1, seed=9)
    with torch.no_grad():
        a, b = merged(x, t, ctx, clip), ref(x, t, ctx, clip)
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= atol * scale + 1e-6


def test_wan_keys_lightx2v_style_file(tmp_path):
    """Original-Wan keys with lora_down/lora_up/alpha plus diff/diff_b, merged by from_pretrained."""
    base = _base(seed=1)
    cfg = base.config
    save_dit(base, tmp_path / "ckpt", format="wan")
    g = torch.Generator().manual_seed(2)
    r, d, scale = 4, cfg.dim, 0.7
    lora, adapters = {}, {}
    targets = {  # original module -> (model module, in, out)
        "blocks.0.self_attn.q": ("blocks.0.attn1.to_q", d, d),
        "blocks.1.self_attn.o": ("blocks.1.attn1.to_out.0", d, d),
        "blocks.0.cross_attn.k_img": ("blocks.0.attn2.add_k_proj", d, d),
        "blocks.1.ffn.0": ("blocks.1.ffn.net.0.proj", d, cfg.ffn_dim),
        "blocks.1.ffn.2": ("blocks.1.ffn.net.2", cfg.ffn_dim, d),
        "head.head": ("proj_out", d, cfg.out_channels * 4),
    }
    for i, (wan, (mod, fin, fout)) in enumerate(targets.items()):
        down, up = _factors(g, fout, fin, r)
        lora[f"diffusion_model.{wan}.lora_down.weight"] = down
        lora[f"diffusion_model.{wan}.lora_up.weight"] = up
        alpha = float(r) if i % 2 else 2.0  # some with alpha = rank (factor 1), some not
        lora[f"diffusion_model.{wan}.alpha"] = torch.tensor(alpha)
        adapters[mod] = (down, up, scale * alpha / r)
    diff_b = torch.randn(d, generator=g) * 0.1
    diff_nq = torch.randn(d, generator=g) * 0.1
    lora["diffusion_model.blocks.0.cross_attn.v.diff_b"] = diff_b
    lora["diffusion_model.blocks.1.self_attn.norm_q.diff"] = diff_nq
    save_file(lora, str(tmp_path / "lora.safetensors"))

    merged = WanDiT.from_pretrained(tmp_path / "ckpt", device="cpu", lora=tmp_path / "lora.safetensors", lora_scale=scale)
    ref = _hooked(base, adapters)
    with torch.no_grad():
        ref.blocks[0].attn2.to_v.bias += scale * diff_b
        ref.blocks[1].attn1.norm_q.weight += scale * diff_nq
    _check(merged, ref, cfg)
    # untouched weights are bit-identical
    assert torch.equal(merged.blocks[0].attn1.to_k.weight, base.blocks[0].attn1.to_k.weight)
    # scale 0 gives the base model back
    zero = WanDiT.from_pretrained(tmp_path / "ckpt", device="cpu", lora=tmp_path / "lora.safetensors", lora_scale=0.0)
    assert torch.equal(zero.blocks[0].attn1.to_q.weight, base.blocks[0].attn1.to_q.weight)


def test_peft_diffusers_keys_and_conv_in_memory():
    base = _base("tiny-ti2v", seed=3)
    cfg = base.config
    g = torch.Generator().manual_seed(4)
    r, d = 3, cfg.dim
    down, up = _factors(g, d, d, r)
    down2, up2 = _factors(g, d, d, r)
    sd = {
        "transformer.blocks.1.attn2.to_q.lora_A.weight": down,
        "transformer.blocks.1.attn2.to_q.lora_B.weight": up,
        "base_model.model.blocks.0.attn1.to_v.lora_A.default.weight": down2,
        "base_model.model.blocks.0.attn1.to_v.lora_B.default.weight": up2,
    }
    # a conv LoRA on the patch embedding: down [r, C, 1, 2, 2], up [dim, r, 1, 1, 1]
    cd = torch.randn(r, cfg.in_channels, 1, 2, 2, generator=g) * 0.2
    cu = torch.randn(d, r, 1, 1, 1, generator=g) * 0.2
    sd["transformer.patch_embedding.lora_A.weight"] = cd
    sd["transformer.patch_embedding.lora_B.weight"] = cu
    merged = merge_lora(copy.deepcopy(base), sd, scale=1.5, alpha=6.0)  # PEFT keeps alpha outside the file
    k = 1.5 * 6.0 / r
    ref = _hooked(base, {"blocks.1.attn2.to_q": (down, up, k), "blocks.0.attn1.to_v": (down2, up2, k)})
    conv_delta = k * (cu.flatten(1) @ cd.flatten(1)).reshape(base.patch_embedding.weight.shape)
    with torch.no_grad():
        ref.patch_embedding.weight += conv_delta  # a conv LoRA is linear in the weight: check against it
    _check(merged, ref, cfg)


def test_kohya_flat_names_and_several_loras(tmp_path):
    base = _base("tiny-t2v", seed=5)
    cfg = base.config
    g = torch.Generator().manual_seed(6)
    d, r = cfg.dim, 2
    a_down, a_up = _factors(g, d, d, r)
    b_down, b_up = _factors(g, d, d, r)
    one = {"lora_unet_blocks_0_cross_attn_o.lora_down.weight": a_down,
           "lora_unet_blocks_0_cross_attn_o.lora_up.weight": a_up,
           "lora_unet_blocks_0_cross_attn_o.alpha": torch.tensor(1.0)}
    two = {"lora_transformer_blocks_1_attn1_to_k.lora_down.weight": b_down,
           "lora_transformer_blocks_1_attn1_to_k.lora_up.weight": b_up}
    torch.save(two, tmp_path / "two.pt")
    merged = merge_lora(copy.deepcopy(base), [(one, 0.5), (tmp_path / "two.pt", 2.0)])
    ref = _hooked(base, {"blocks.0.attn2.to_out.0": (a_down, a_up, 0.5 * 1.0 / r),
                         "blocks.1.attn1.to_k": (b_down, b_up, 2.0)})
    _check(merged, ref, cfg)


def test_bad_loras(tmp_path):
    base = _base("tiny-t2v", seed=7)
    d = base.config.dim
    down, up = torch.randn(2, d), torch.randn(d, 2)
    with pytest.raises(ValueError, match=r"target no parameter.*blocks\.9\.self_attn\.q"):
        merge_lora(copy.deepcopy(base), {"diffusion_model.blocks.9.self_attn.q.lora_down.weight": down,
                                         "diffusion_model.blocks.9.self_attn.q.lora_up.weight": up})
    with pytest.raises(ValueError, match="without its pair"):
        merge_lora(copy.deepcopy(base), {"blocks.0.self_attn.q.lora_down.weight": down})
    with pytest.raises(ValueError, match="do not fit"):
        merge_lora(copy.deepcopy(base), {"blocks.0.self_attn.q.lora_down.weight": torch.randn(2, d + 1),
                                         "blocks.0.self_attn.q.lora_up.weight": up})
    with pytest.raises(ValueError, match="unknown format"):
        merge_lora(copy.deepcopy(base), {"blocks.0.self_attn.q.hada_w1_a": down})
    with pytest.raises(ValueError, match="DoRA"):
        merge_lora(copy.deepcopy(base), {"blocks.0.self_attn.q.dora_scale": down})
    with pytest.raises(FileNotFoundError):
        merge_lora(copy.deepcopy(base), tmp_path / "none.safetensors")
    # an I2V LoRA (k_img) on a model without image tokens is refused, not dropped
    with pytest.raises(ValueError, match="target no parameter"):
        merge_lora(copy.deepcopy(base), {"blocks.0.cross_attn.k_img.lora_down.weight": down,
                                         "blocks.0.cross_attn.k_img.lora_up.weight": up})
