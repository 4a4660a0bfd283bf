"""LoRA merged at load time equals the unmerged low-rank forward, for the common key formats."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from swift_model import WanDiT, merge_lora, save_dit

from helpers import assert_close_to_scale
from helpers import dit_inputs as _inputs
from helpers import random_dit as _base


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
    assert_close_to_scale(a, b, rtol=atol)


def test_wan_keys_lightx2v_style_file(tmp_path):
    """Original-Wan keys with lora_down/lora_up/alpha plus diff/diff_b, merged by from_pretrained."""
    base = _base("tiny-i2v", seed=1)
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
    # a LoRA of which nothing applies to this model (only k_img, on a model without image tokens) is refused
    with pytest.raises(ValueError, match="target no parameter of this model"):
        merge_lora(copy.deepcopy(base), {"blocks.0.cross_attn.k_img.lora_down.weight": down,
                                         "blocks.0.cross_attn.k_img.lora_up.weight": up})
    # names of no Wan module at all, and integer factors, are refused naming the file and the key
    save_file({"diffusion_model.blocks.0.self_attn.qq.lora_down.weight": down,
               "diffusion_model.blocks.0.self_attn.qq.lora_up.weight": up}, str(tmp_path / "alien.safetensors"))
    with pytest.raises(ValueError, match=r"^stage1: .*alien\.safetensors: .*no parameter of a Wan DiT"):
        WanDiT.from_pretrained(_saved(base, tmp_path), device="cpu", lora=tmp_path / "alien.safetensors",
                               stage="stage1")
    with pytest.raises(ValueError, match=r"lora_up\.weight: dtype torch\.int64 .*refusing"):
        merge_lora(copy.deepcopy(base), {"blocks.0.self_attn.q.lora_down.weight": down,
                                         "blocks.0.self_attn.q.lora_up.weight": up.long()})


def _saved(model, tmp_path, name="ckpt", format="wan"):
    folder = tmp_path / name
    if not folder.exists():
        save_dit(model, folder, format=format)
    return folder


def _expected_merge(base: WanDiT, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base state dict with each named parameter plus its delta, in fp64 (the test's own arithmetic)."""
    sd = {k: v.double() for k, v in base.state_dict().items()}
    for name, delta in deltas.items():
        sd[name] = sd[name] + delta.double().reshape(sd[name].shape)
    return sd


def _assert_merged(merged: WanDiT, base: WanDiT, deltas: dict[str, torch.Tensor]):
    """Targeted weights equal ``W + delta`` to fp32 rounding; every other weight is bit-identical."""
    want = _expected_merge(base, deltas)
    got, orig = merged.state_dict(), base.state_dict()
    assert deltas and set(deltas) <= set(got)
    for k, v in got.items():
        if k in deltas:
            assert deltas[k].abs().max() > 1e-3  # the delta is not negligible (the check can fail)
            torch.testing.assert_close(v.double(), want[k], rtol=1e-6, atol=1e-6, msg=k)
        else:
            assert torch.equal(v, orig[k]), k


R, SCALE = 4, 0.8


def _pair(g, fout, fin, r=R):
    return torch.randn(r, fin, generator=g, dtype=torch.float64).float(), \
        torch.randn(fout, r, generator=g, dtype=torch.float64).float()


def _lora_files():
    """Each format people pass around for Wan, as ``(keys for (down, up, alpha) of a module, suffixes)``."""
    return {
        # LightX2V / Kijai: original Wan names, diffusion_model. prefix, lora_down/lora_up + alpha
        "lightx2v": lambda m: (f"diffusion_model.{m}.lora_down.weight", f"diffusion_model.{m}.lora_up.weight",
                               f"diffusion_model.{m}.alpha"),
        # ComfyUI-style exports with lora_A/lora_B under the same prefix
        "comfy_lora_A_B": lambda m: (f"diffusion_model.{m}.lora_A.weight", f"diffusion_model.{m}.lora_B.weight",
                                     f"diffusion_model.{m}.alpha"),
        # diffusers: transformer. prefix, diffusers module names
        "diffusers": lambda m: (f"transformer.{_diff(m)}.lora_A.weight", f"transformer.{_diff(m)}.lora_B.weight",
                                f"transformer.{_diff(m)}.alpha"),
        # PEFT: base_model.model. prefix and the .default adapter name
        "peft_default": lambda m: (f"base_model.model.{_diff(m)}.lora_A.default.weight",
                                   f"base_model.model.{_diff(m)}.lora_B.default.weight",
                                   f"base_model.model.{_diff(m)}.alpha"),
        # kohya: flattened module names
        "kohya_flat": lambda m: (f"lora_unet_{m.replace('.', '_')}.lora_down.weight",
                                 f"lora_unet_{m.replace('.', '_')}.lora_up.weight",
                                 f"lora_unet_{m.replace('.', '_')}.alpha"),
    }


def _diff(wan_module: str) -> str:
    from swift_model.io.keys import wan_to_diffusers_name

    return wan_to_diffusers_name(wan_module)


@pytest.mark.parametrize("fmt", sorted(_lora_files()))
def test_each_factor_format_merges_to_the_formula(tmp_path, fmt):
    """``W + scale * alpha / r * up @ down``, with and without alpha (absent alpha means alpha = r)."""
    base = _base("tiny-i2v", seed=11)
    cfg = base.config
    g = torch.Generator().manual_seed(12)
    names = _lora_files()[fmt]
    d = cfg.dim
    targets = {"blocks.0.self_attn.q": (d, d, 2.0), "blocks.1.cross_attn.k_img": (d, d, None),
               "blocks.1.ffn.0": (d, cfg.ffn_dim, 8.0), "text_embedding.0": (cfg.text_dim, d, None)}
    lora, deltas = {}, {}
    for mod, (fin, fout, alpha) in targets.items():
        down, up = _pair(g, fout, fin)
        kd, ku, ka = names(mod)
        lora[kd], lora[ku] = down, up
        if alpha is not None:
            lora[ka] = torch.tensor(alpha)
        a = R if alpha is None else alpha
        deltas[f"{_diff(mod)}.weight"] = SCALE * a / R * (up.double() @ down.double())
    save_file(lora, str(tmp_path / f"{fmt}.safetensors"))
    merged = WanDiT.from_pretrained(_saved(base, tmp_path), device="cpu", lora=tmp_path / f"{fmt}.safetensors",
                                    lora_scale=SCALE)
    _assert_merged(merged, base, deltas)
    # the same through merge_lora on a model in memory
    _assert_merged(merge_lora(copy.deepcopy(base), lora, scale=SCALE), base, deltas)


def test_full_weight_diff_bias_and_modulation_deltas(tmp_path):
    """``diff`` (weight or whole parameter), ``diff_b`` (bias) and ``diff_m`` (the modulation table:
    LightX2V's ``blocks.{i}.diff_m`` -> ``blocks.{i}.modulation``, ``head.diff_m`` -> ``head.modulation``)
    merge to ``W + scale * diff``."""
    base = _base("tiny-i2v", seed=13)
    g = torch.Generator().manual_seed(14)
    sd = base.state_dict()
    rnd = lambda name: torch.randn(sd[name].shape, generator=g, dtype=torch.float64).float() * 0.1  # noqa: E731
    files = {  # file key -> model parameter
        "diffusion_model.blocks.0.norm3.diff": "blocks.0.norm2.weight",            # Wan norm3 = diffusers norm2
        "diffusion_model.blocks.0.norm3.diff_b": "blocks.0.norm2.bias",
        "diffusion_model.blocks.1.self_attn.o.diff_b": "blocks.1.attn1.to_out.0.bias",
        "diffusion_model.time_projection.1.diff": "condition_embedder.time_proj.weight",
        "diffusion_model.blocks.0.diff_m": "blocks.0.scale_shift_table",
        "diffusion_model.blocks.1.diff_m": "blocks.1.scale_shift_table",
        "diffusion_model.head.diff_m": "scale_shift_table",
        "diffusion_model.blocks.1.cross_attn.norm_k_img.diff": "blocks.1.attn2.norm_added_k.weight",
        "diffusion_model.img_emb.proj.1.diff_b": "condition_embedder.image_embedder.ff.net.0.proj.bias",
    }
    lora = {k: rnd(p) for k, p in files.items()}
    save_file(lora, str(tmp_path / "diffs.safetensors"))
    merged = WanDiT.from_pretrained(_saved(base, tmp_path), device="cpu", lora=tmp_path / "diffs.safetensors",
                                    lora_scale=SCALE)
    _assert_merged(merged, base, {p: SCALE * lora[k].double() for k, p in files.items()})
    # several LoRAs at once: the deltas add
    both = WanDiT.from_pretrained(_saved(base, tmp_path), device="cpu",
                                  lora=[(tmp_path / "diffs.safetensors", 1.0), (lora, -0.25)])
    _assert_merged(both, base, {p: 0.75 * lora[k].double() for k, p in files.items()})


def test_wan21_i2v_lora_on_a_wan22_model_skips_image_keys_with_one_warning(tmp_path):
    """A Wan2.1 I2V LoRA carries k_img / v_img / norm_k_img (and img_emb) tensors; a Wan2.2 model (TI2V,
    no image tokens) has no such modules: they are skipped with ONE warning listing them, the rest merges."""
    from swift_model.loading.lora import LoraKeysSkippedWarning

    base = _base("tiny-ti2v", seed=15)
    d = base.config.dim
    g = torch.Generator().manual_seed(16)
    down, up = _pair(g, d, d)
    kdown, kup = _pair(g, d, d)
    lora = {"diffusion_model.blocks.0.cross_attn.q.lora_down.weight": down,
            "diffusion_model.blocks.0.cross_attn.q.lora_up.weight": up,
            "diffusion_model.blocks.0.cross_attn.q.alpha": torch.tensor(float(R))}
    image_keys = []
    for i in range(base.config.num_layers):
        for mod in ("k_img", "v_img"):
            for part, t in (("lora_down.weight", kdown), ("lora_up.weight", kup)):
                image_keys.append(f"diffusion_model.blocks.{i}.cross_attn.{mod}.{part}")
                lora[image_keys[-1]] = t.clone()
        image_keys.append(f"diffusion_model.blocks.{i}.cross_attn.norm_k_img.diff")
        lora[image_keys[-1]] = torch.randn(d, generator=g)
    image_keys.append("diffusion_model.img_emb.proj.1.diff_b")
    lora[image_keys[-1]] = torch.randn(d, generator=g)
    save_file(lora, str(tmp_path / "i2v_lora.safetensors"))
    with pytest.warns(LoraKeysSkippedWarning) as record:
        merged = WanDiT.from_pretrained(_saved(base, tmp_path), device="cpu", lora=tmp_path / "i2v_lora.safetensors",
                                        lora_scale=SCALE, stage="stage2")
    skipped = [w for w in record if issubclass(w.category, LoraKeysSkippedWarning)]
    assert len(skipped) == 1
    msg = str(skipped[0].message)
    assert msg.startswith("stage2: LoRA ") and "i2v_lora.safetensors" in msg and f"({len(image_keys)} keys)" in msg
    for k in image_keys[:3]:
        assert k in msg
    _assert_merged(merged, base, {"blocks.0.attn2.to_q.weight": SCALE * (up.double() @ down.double())})
