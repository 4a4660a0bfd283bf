"""Loading the original Wan checkpoint files (not diffusers folders): the Wan2.2 VAE, the UMT5 text encoder and
the CLIP image encoder, each with tiny random weights saved under the original key names.

The encoders are checked against small re-statements of Wan's own forward passes (``wan/modules/t5.py`` and
``wan/modules/clip.py``) run on the original-named weights, so a swapped or misread weight fails, not only a
missing one. The VAE is checked by a round trip through original names written here independently.
"""

import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from swift_model.nets.encoders import ImageEncoder, TextEncoder
from swift_model.nets.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, WanVAE


def _write_dit_config(folder):
    # An original Wan folder's top-level config.json is the DiT's: loaders must not take it for theirs.
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "WanModel", "model_type": "i2v", "dim": 64}, f)


# -- VAE ------------------------------------------------------------------------------------------------------


def _diffusers_to_wan22(state, n_enc_res, n_dec_res):
    """diffusers AutoencoderKLWan (residual) names -> Wan2.2 ``vae2_2.py`` names, written from the Wan layout."""
    res = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
           "conv_shortcut": "shortcut"}
    out = {}
    for k, v in state.items():
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)$", k)
        if m:
            part, d, i, j, mod, p = m.groups()
            out[f"{part}.{d}samples.{i}.{d}samples.{j}.{res[mod]}.{p}"] = v
            continue
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(down|up)sampler\.(.*)$", k)
        if m:
            part, d, i, _, rest = m.groups()
            j = n_enc_res if d == "down" else n_dec_res  # the resample module follows the residual blocks
            out[f"{part}.{d}samples.{i}.{d}samples.{j}.{rest}"] = v
            continue
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(\w+)\.(\w+)$", k)
        if m:
            part, kind, i, mod, p = m.groups()
            if kind == "resnets":
                out[f"{part}.middle.{2 * int(i)}.{res[mod]}.{p}"] = v
            else:
                out[f"{part}.middle.1.{mod}.{p}"] = v
            continue
        fixed = {"encoder.conv_in": "encoder.conv1", "decoder.conv_in": "decoder.conv1",
                 "encoder.norm_out": "encoder.head.0", "encoder.conv_out": "encoder.head.2",
                 "decoder.norm_out": "decoder.head.0", "decoder.conv_out": "decoder.head.2",
                 "quant_conv": "conv1", "post_quant_conv": "conv2"}
        mod, p = k.rsplit(".", 1)
        out[f"{fixed[mod]}.{p}"] = v
    return out


def test_wan22_vae_original_file_loads_and_decodes_identically(tmp_path):
    ref = WanVAE.tiny(48, seed=3)
    with torch.no_grad():  # random norms too, so that a swapped gamma would show
        for name, p in ref.model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if name.endswith("gamma") else 0.01))
    state = ref.model.state_dict()
    n_enc = 1 + max(int(re.search(r"resnets\.(\d+)", k).group(1)) for k in state if "encoder.down_blocks.0.resnets" in k)
    n_dec = 1 + max(int(re.search(r"resnets\.(\d+)", k).group(1)) for k in state if "decoder.up_blocks.0.resnets" in k)
    original = _diffusers_to_wan22(state, n_enc, n_dec)
    assert len(original) == len(state)
    assert not any(w in k for k in original for w in ("resnets", "_blocks", "sampler", "mid_block", "conv_in"))
    folder = tmp_path / "Wan2.2-TI2V-5B"
    folder.mkdir()
    _write_dit_config(str(folder))
    torch.save(original, folder / "Wan2.2_VAE.pth")
    arch = {k: v for k, v in ref.model.config.items() if not k.startswith("_") and k not in ("latents_mean", "latents_std")}
    for path in (str(folder / "Wan2.2_VAE.pth"), str(folder)):
        vae = WanVAE.from_pretrained(path, config=arch)
        # The file has no latent statistics: the public Wan2.2 constants are used.
        assert list(vae.model.config.latents_mean) == WAN22_LATENTS_MEAN
        assert list(vae.model.config.latents_std) == WAN22_LATENTS_STD
        got = vae.model.state_dict()
        assert set(got) == set(state)
        for k in state:
            assert torch.equal(got[k], state[k]), k
        z = torch.randn(1, 48, 2, 2, 3)
        torch.testing.assert_close(vae.model.decode(z).sample, ref.model.decode(z).sample, rtol=0, atol=0)
        video = torch.rand(1, 3, 5, 32, 48) * 2 - 1
        torch.testing.assert_close(vae.model.encode(video).latent_dist.mode(),
                                   ref.model.encode(video).latent_dist.mode(), rtol=0, atol=0)


def test_vae_constants_are_the_public_ones():
    from diffusers import AutoencoderKLWan
    import inspect

    sig = inspect.signature(AutoencoderKLWan.__init__).parameters
    assert list(sig["latents_mean"].default) == WAN21_LATENTS_MEAN
    assert list(sig["latents_std"].default) == pytest.approx(WAN21_LATENTS_STD)
    assert len(WAN22_LATENTS_MEAN) == len(WAN22_LATENTS_STD) == 48
    assert min(WAN22_LATENTS_STD) > 0.3
    # Spot values of Wan2.2's vae2_2.py / the Wan2.2-TI2V-5B-Diffusers vae config.
    assert (WAN22_LATENTS_MEAN[0], WAN22_LATENTS_MEAN[19], WAN22_LATENTS_MEAN[47]) == (-0.2289, 0.5109, -0.0667)
    assert (WAN22_LATENTS_STD[0], WAN22_LATENTS_STD[39], WAN22_LATENTS_STD[47]) == (0.4765, 1.6887, 0.7744)


def test_unreadable_vae_file_is_a_value_error(tmp_path):
    bad = tmp_path / "Wan2.2_VAE.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"^VAE: .*Wan2\.2_VAE\.pth: cannot read"):
        WanVAE.from_pretrained(str(bad))


# -- UMT5 -----------------------------------------------------------------------------------------------------

T5 = dict(vocab=40, dim=16, heads=4, dim_attn=16, ffn=24, layers=2, buckets=8)


def _random_wan_t5(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    c = T5
    sd = {"token_embedding.weight": r(c["vocab"], c["dim"]), "norm.weight": 1 + r(c["dim"]) * 0.2}
    for i in range(c["layers"]):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = 1 + r(c["dim"]) * 0.2
        sd[p + "norm2.weight"] = 1 + r(c["dim"]) * 0.2
        for n in "qkv":
            sd[p + f"attn.{n}.weight"] = r(c["dim_attn"], c["dim"])
        sd[p + "attn.o.weight"] = r(c["dim"], c["dim_attn"])
        sd[p + "ffn.gate.0.weight"] = r(c["ffn"], c["dim"])
        sd[p + "ffn.fc1.weight"] = r(c["ffn"], c["dim"])
        sd[p + "ffn.fc2.weight"] = r(c["dim"], c["ffn"])
        sd[p + "pos_embedding.embedding.weight"] = r(c["buckets"], c["heads"])
    return sd


def _wan_t5_reference(sd, ids, mask, heads, buckets, max_dist=128):
    """Wan's T5Encoder forward (``wan/modules/t5.py``) on original-named weights, fp64."""
    sd = {k: v.double() for k, v in sd.items()}
    B, L = ids.shape
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
    nb = buckets // 2
    bucket = (rel > 0).long() * nb
    r = rel.abs()
    exact = nb // 2
    large = exact + (torch.log(r.double() / exact) / math.log(max_dist / exact) * (nb - exact)).long()
    bucket = bucket + torch.where(r < exact, r, large.clamp(max=nb - 1))

    def norm(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))

    x = sd["token_embedding.weight"][ids]
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(n_layers):
        p = f"blocks.{i}."
        bias = sd[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)[None]
        h = norm(x, sd[p + "norm1.weight"])
        q, k, v = (F.linear(h, sd[p + f"attn.{n}.weight"]).view(B, L, heads, -1) for n in "qkv")
        a = torch.einsum("binc,bjnc->bnij", q, k) + bias  # T5: no 1/sqrt(d) scaling
        a = a.masked_fill(mask.view(B, 1, 1, L) == 0, torch.finfo(a.dtype).min).softmax(-1)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", a, v).reshape(B, L, -1), sd[p + "attn.o.weight"])
        h = norm(x, sd[p + "norm2.weight"])
        x = x + F.linear(F.linear(h, sd[p + "ffn.fc1.weight"]) * gelu(F.linear(h, sd[p + "ffn.gate.0.weight"])),
                         sd[p + "ffn.fc2.weight"])
    return norm(x, sd["norm.weight"])


def _save_word_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate("a cat on the red sofa".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def test_umt5_original_file_matches_wan_forward(tmp_path):
    sd = _random_wan_t5()
    folder = tmp_path / "Wan2.1-I2V-14B"
    (folder / "google" / "umt5-xxl").mkdir(parents=True)
    _write_dit_config(str(folder))
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, folder / "models_t5_umt5-xxl-enc-bf16.pth")
    _save_word_tokenizer(str(folder / "google" / "umt5-xxl"))
    sd = {k: v.to(torch.bfloat16).float() for k, v in sd.items()}  # what the bf16 file holds

    enc = TextEncoder.from_pretrained(str(folder), dtype=torch.float32)
    cfg = enc.model.config
    assert (cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.d_ff, cfg.vocab_size) == (16, 4, 2, 24, 40)
    L = 20  # beyond the 4 exact buckets, so the log-spaced relative buckets are exercised
    ids = torch.randint(0, T5["vocab"], (2, L))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, 13:] = 0
    with torch.no_grad():
        got = enc.model(ids, attention_mask=mask).last_hidden_state.double()
    want = _wan_t5_reference(sd, ids, mask, T5["heads"], T5["buckets"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The tokenizer came from google/umt5-xxl: a prompt encodes to [1, 512, dim], zero past the prompt.
    e = enc.encode("a cat on the red sofa")
    assert e.shape == (1, 512, 16)
    # (this word-level stand-in adds no end token: 6 words, 6 non-zero rows)
    assert e[0, :6].abs().sum(-1).gt(0).all() and e[0, 6:].abs().max() == 0


def test_umt5_original_needs_tokenizer_and_rejects_wrong_files(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    torch.save(_random_wan_t5(), folder / "models_t5_umt5-xxl-enc-bf16.pth")
    with pytest.raises(ValueError, match="tokenizer"):
        TextEncoder.from_pretrained(str(folder))
    (folder / "google" / "umt5-xxl").mkdir(parents=True)
    _save_word_tokenizer(str(folder / "google" / "umt5-xxl"))
    sd = _random_wan_t5()
    del sd["blocks.1.ffn.fc2.weight"]
    torch.save(sd, folder / "models_t5_umt5-xxl-enc-bf16.pth")
    with pytest.raises(ValueError, match="missing keys"):
        TextEncoder.from_pretrained(str(folder))


# -- CLIP -----------------------------------------------------------------------------------------------------

CLIP = dict(dim=32, heads=16, layers=3, mlp=64, patch=4, grid=3)


def _random_wan_clip(seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    c = CLIP
    d = c["dim"]
    sd = {"visual.patch_embedding.weight": r(d, 3, c["patch"], c["patch"]), "visual.cls_embedding": r(1, 1, d),
          "visual.pos_embedding": r(1, c["grid"] ** 2 + 1, d), "visual.pre_norm.weight": 1 + r(d),
          "visual.pre_norm.bias": r(d), "visual.post_norm.weight": 1 + r(d), "visual.post_norm.bias": r(d),
          "visual.head": r(d, 8), "log_scale": torch.tensor(2.0),
          "textual.token_embedding.weight": r(10, 8)}  # the text tower is not used
    for i in range(c["layers"]):
        p = f"visual.transformer.{i}."
        for n in ("norm1", "norm2"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + r(d), r(d)
        sd[p + "attn.to_qkv.weight"], sd[p + "attn.to_qkv.bias"] = r(3 * d, d), r(3 * d)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = r(d, d), r(d)
        sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"] = r(c["mlp"], d), r(c["mlp"])
        sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"] = r(d, c["mlp"]), r(d)
    return sd


def _wan_clip_reference(sd, x, heads):
    """Wan's ``VisionTransformer.forward(x, use_31_block=True)`` (all blocks but the last), fp64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    B = x.shape[0]
    p = sd["visual.patch_embedding.weight"]
    x = F.conv2d(x, p, stride=p.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.cls_embedding"].expand(B, -1, -1), x], 1) + sd["visual.pos_embedding"]
    d = x.shape[-1]
    ln = lambda t, n: F.layer_norm(t, (d,), sd[n + ".weight"], sd[n + ".bias"], 1e-5)  # noqa: E731
    x = ln(x, "visual.pre_norm")
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("visual.transformer."))
    for i in range(n_layers - 1):
        b = f"visual.transformer.{i}."
        S = x.shape[1]
        qkv = F.linear(ln(x, b + "norm1"), sd[b + "attn.to_qkv.weight"], sd[b + "attn.to_qkv.bias"])
        q, k, v = (t.transpose(1, 2) for t in qkv.view(B, S, 3, heads, d // heads).unbind(2))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, d)
        x = x + F.linear(o, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, b + "norm2"), sd[b + "mlp.0.weight"], sd[b + "mlp.0.bias"]))
        x = x + F.linear(h, sd[b + "mlp.2.weight"], sd[b + "mlp.2.bias"])
    return x


def test_clip_original_file_matches_wan_penultimate_block(tmp_path):
    sd = _random_wan_clip()
    folder = tmp_path / "Wan2.1-I2V-14B"
    folder.mkdir()
    _write_dit_config(str(folder))
    torch.save(sd, folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    enc = ImageEncoder.from_pretrained(str(folder), dtype=torch.float32)
    size = CLIP["patch"] * CLIP["grid"]
    assert enc.size == size and enc.dim == CLIP["dim"]
    assert enc.model.config.num_attention_heads == 16 and enc.model.config.hidden_act == "gelu"
    g = torch.Generator().manual_seed(2)  # inputs drawn apart from the weights' stream, the same every run
    pixels = torch.randn(2, 3, size, size, generator=g)
    with torch.no_grad():
        got = enc.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].double()
    want = _wan_clip_reference(sd, pixels, CLIP["heads"])
    # fp32 against fp64: the residual stream grows to |x| ~ 20 and every element's rounding error follows that
    # scale (LayerNorm, attention and MLP of two blocks add ~10 roundings of eps_32 = 1.2e-7 times it; measured
    # <= 1.0e-6 * max|x| over 300 random inputs), so a fixed atol of 1e-5 missed now and then (1.2e-5, 1.7e-5):
    # every element within 4e-6 of the output's scale.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=4e-6 * want.abs().max().item())
    # ImageEncoder.encode: [3, H, W] in [-1, 1] -> the penultimate block's tokens.
    tokens = enc.encode(torch.rand(3, 20, 28, generator=g) * 2 - 1)
    assert tokens.shape == (1, CLIP["grid"] ** 2 + 1, CLIP["dim"]) and torch.isfinite(tokens).all()


def test_clip_original_rejects_wrong_file(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    sd = _random_wan_clip()
    sd["visual.transformer.1.attn.proj.weight"] = sd["visual.transformer.1.attn.proj.weight"][:, :5]
    torch.save(sd, folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    with pytest.raises(ValueError, match="shape"):
        ImageEncoder.from_pretrained(str(folder))


def test_dit_config_of_an_original_folder_is_not_taken_for_an_encoder_or_vae(tmp_path):
    _write_dit_config(str(tmp_path))
    with pytest.raises(ValueError, match="no text encoder"):
        TextEncoder.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="no CLIP vision encoder"):
        ImageEncoder.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="no VAE found"):
        WanVAE.from_pretrained(str(tmp_path))


def _diffusers_to_wan21(state):
    """diffusers AutoencoderKLWan (Wan2.1) names -> Wan2.1 ``vae.py`` names (2 residual blocks per stage)."""
    res = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
           "conv_shortcut": "shortcut"}
    fixed = {"encoder.conv_in": "encoder.conv1", "decoder.conv_in": "decoder.conv1",
             "encoder.norm_out": "encoder.head.0", "encoder.conv_out": "encoder.head.2",
             "decoder.norm_out": "decoder.head.0", "decoder.conv_out": "decoder.head.2",
             "quant_conv": "conv1", "post_quant_conv": "conv2"}
    out = {}
    for k, v in state.items():
        mod, p = k.rsplit(".", 1)
        if (m := re.match(r"encoder\.down_blocks\.(\d+)\.(\w+)$", mod)) and m.group(2) in res:  # flat in both
            out[f"encoder.downsamples.{m.group(1)}.{res[m.group(2)]}.{p}"] = v
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)$", mod):
            out[f"encoder.downsamples.{m.group(1)}.{m.group(2)}.{p}"] = v
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", mod):
            out[f"decoder.upsamples.{4 * int(m.group(1)) + int(m.group(2))}.{res[m.group(3)]}.{p}"] = v
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", mod):
            out[f"decoder.upsamples.{4 * int(m.group(1)) + 3}.{m.group(2)}.{p}"] = v
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)$", mod):
            out[f"{m.group(1)}.middle.{2 * int(m.group(2))}.{res[m.group(3)]}.{p}"] = v
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+)$", mod):
            out[f"{m.group(1)}.middle.1.{m.group(2)}.{p}"] = v
        else:
            out[f"{fixed[mod]}.{p}"] = v
    return out


def test_wan21_vae_original_file_gets_wan21_constants(tmp_path):
    from diffusers import AutoencoderKLWan

    # The public stage widths (diffusers' Wan2.1 converter assumes where the channel changes fall), tiny base.
    arch = dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
    torch.manual_seed(5)
    ref = AutoencoderKLWan(**arch).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if name.endswith("gamma") else 0.01))
    original = _diffusers_to_wan21(ref.state_dict())
    assert len(original) == len(ref.state_dict())
    torch.save(original, tmp_path / "Wan2.1_VAE.pth")
    vae = WanVAE.from_pretrained(str(tmp_path), config=arch)
    assert list(vae.model.config.latents_mean) == WAN21_LATENTS_MEAN
    assert list(vae.model.config.latents_std) == WAN21_LATENTS_STD
    z = torch.randn(1, 16, 2, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(vae.model.decode(z).sample, ref.decode(z).sample, rtol=0, atol=0)
