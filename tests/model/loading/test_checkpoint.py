"""Checkpoint loading: diffusers and original-Wan folders and single files, key mapping, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from swift_model import WanDiT, WanDiTConfig, load_state_dict, save_dit, to_diffusers_keys, to_wan_keys
from swift_model.loading.checkpoint import detect_format, infer_config

from helpers import assert_close_to_scale as _close
from helpers import diffusers_model as _diffusers_model
from helpers import dit_inputs as _inputs
from helpers import random_dit as _model
from helpers import random_init as _random_init

diffusers = pytest.importorskip("diffusers")


def _assert_same_params(a: WanDiT, b: WanDiT):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


def test_key_mapping_both_ways_and_norm_swap():
    sd = _model("tiny-i2v").state_dict()
    wan = to_wan_keys(sd)
    assert "blocks.0.norm3.weight" in wan and "blocks.0.norm3.bias" in wan
    assert not any(k.startswith("blocks.0.norm2") for k in wan)  # Wan's norm2 (FFN) has no parameters
    assert torch.equal(wan["blocks.1.norm3.weight"], sd["blocks.1.norm2.weight"])
    for k in ("blocks.0.cross_attn.k_img.weight", "blocks.0.cross_attn.norm_k_img.weight", "img_emb.proj.4.bias",
              "head.modulation", "blocks.1.modulation", "time_projection.1.weight", "text_embedding.2.bias",
              "blocks.0.ffn.0.weight", "blocks.0.self_attn.o.bias", "head.head.weight"):
        assert k in wan, k
    back = to_diffusers_keys(wan)
    assert back.keys() == sd.keys()
    # independent check: diffusers' own converter of original Wan checkpoints gives the same names/tensors
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    theirs = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in wan.items()})
    assert set(theirs) == set(sd)
    for k in sd:
        assert torch.equal(theirs[k], sd[k]), k
    with pytest.raises(ValueError, match="no diffusers name"):
        to_diffusers_keys({"blocks.0.self_attn.zz.weight": torch.zeros(1)})


@pytest.mark.parametrize("shard", [None, 40_000])
def test_diffusers_folder_matches_diffusers_model(tmp_path, shard):
    cfg = WanDiTConfig.preset("tiny-ti2v")
    ref = _diffusers_model(cfg, seed=21)
    if shard is None:
        ref.save_pretrained(tmp_path / "transformer")  # diffusers' own writer; load via the pipeline folder
        path = tmp_path
    else:
        m = WanDiT(cfg)
        m.load_state_dict(ref.state_dict())
        save_dit(m, tmp_path / "sharded", max_shard_bytes=shard)
        assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
        path = tmp_path / "sharded"
    model = WanDiT.from_pretrained(path, device="cpu")
    assert model.dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())
    x, t, ctx, clip = _inputs(model.config)
    with torch.no_grad():
        _close(model(x, t, ctx, clip), ref(x, t, ctx, clip, return_dict=False)[0])


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-i2v", "tiny-ti2v"])
def test_wan_folder_round_trip_parity(tmp_path, preset):
    """Save under the original Wan key names and config, load: outputs equal diffusers' on the same weights."""
    cfg = WanDiTConfig.preset(preset)
    ref = _diffusers_model(cfg, seed=31)
    m = WanDiT(cfg)
    m.load_state_dict(ref.state_dict())
    save_dit(m, tmp_path, format="wan", max_shard_bytes=60_000)
    wan_cfg = json.loads((tmp_path / "config.json").read_text())
    assert wan_cfg["dim"] == cfg.dim and "num_attention_heads" not in wan_cfg
    loaded = WanDiT.from_pretrained(tmp_path, device="cpu")
    assert loaded.config.image_dim == cfg.image_dim and loaded.config.in_channels == cfg.in_channels
    _assert_same_params(m, loaded)
    x, t, ctx, clip = _inputs(cfg)
    with torch.no_grad():
        _close(loaded(x, t, ctx, clip), ref(x, t, ctx, clip, return_dict=False)[0])


def test_single_file_with_prefix_and_inferred_config(tmp_path):
    # head dim 128, as in every public model, so the architecture can be inferred from shapes alone
    cfg = WanDiTConfig(dim=256, num_layers=2, num_heads=2, ffn_dim=64, in_channels=36, out_channels=16,
                       text_dim=24, image_dim=20, kind="i2v")
    m = WanDiT(cfg).eval()
    _random_init(m, 41)
    sd = {"model.diffusion_model." + k: v.contiguous() for k, v in to_wan_keys(m.state_dict()).items()}
    sd["first_stage_model.decoder.w"] = torch.randn(3)  # other components of a combined single file are ignored
    f = tmp_path / "wan_single.safetensors"
    save_file(sd, str(f))
    loaded = WanDiT.from_pretrained(f, device="cpu")
    c = loaded.config
    assert (c.dim, c.num_layers, c.num_heads, c.ffn_dim, c.in_channels, c.out_channels, c.image_dim, c.text_dim) == \
        (256, 2, 2, 64, 36, 16, 20, 24)
    _assert_same_params(m, loaded)
    # a torch .pth file with the diffusion_model. prefix and an explicit config
    small = _model("tiny-t2v", seed=42)
    torch.save({"diffusion_model." + k: v for k, v in to_wan_keys(small.state_dict()).items()}, tmp_path / "m.pth")
    again = WanDiT.from_pretrained(tmp_path / "m.pth", device="cpu", config=small.config)
    _assert_same_params(small, again)
    sd2, cfg2, fmt = load_state_dict(tmp_path / "m.pth", dtype=torch.float64, config=small.config)
    assert fmt == "wan" and cfg2 is small.config and sd2["proj_out.weight"].dtype == torch.float64 and set(sd2) == set(small.state_dict())


def test_low_precision_load_keeps_fp32_parts(tmp_path):
    m = _model("tiny-i2v", seed=51)
    save_dit(m, tmp_path)
    lp = WanDiT.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    p = dict(lp.named_parameters())
    assert p["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    for k in ("blocks.0.scale_shift_table", "scale_shift_table", "condition_embedder.time_embedder.linear_1.weight",
              "condition_embedder.time_proj.bias", "blocks.1.norm2.weight"):
        assert p[k].dtype == torch.float32, k
    x, t, ctx, clip = _inputs(m.config, B=1)
    with torch.no_grad():
        out = lp(x.bfloat16(), t, ctx, clip)
        ref = m(x, t, ctx, clip)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_widened_input_from_public_checkpoint(tmp_path):
    base = _model("tiny-ti2v", seed=61)
    save_dit(base, tmp_path, format="wan")
    wide = WanDiT.from_pretrained(tmp_path, device="cpu", extra_in_channels=48)
    assert wide.config.in_channels == 96 and wide.config.extra_in_channels == 48
    w = wide.patch_embedding.weight
    assert torch.equal(w[:, :48], base.patch_embedding.weight) and torch.count_nonzero(w[:, 48:]) == 0
    x, t, ctx, _ = _inputs(base.config, B=1)
    zref = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(wide(torch.cat((x, zref), 1), t, ctx), base(x, t, ctx), rtol=0, atol=0)


def test_bad_checkpoints(tmp_path):
    m = _model("tiny-t2v", seed=71)
    save_dit(m, tmp_path / "ok")
    sd = load_file(str(tmp_path / "ok" / "diffusion_pytorch_model.safetensors"))
    cfg_text = (tmp_path / "ok" / "config.json").read_text()

    def write(name, tensors, config=cfg_text):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "diffusion_pytorch_model.safetensors"))
        if config is not None:
            (d / "config.json").write_text(config)
        return d

    missing = {k: v for k, v in sd.items() if k != "blocks.1.attn2.to_v.bias"}
    with pytest.raises(ValueError, match=r"missing keys: \[blocks\.1\.attn2\.to_v\.bias\]"):
        WanDiT.from_pretrained(write("missing", missing), device="cpu")
    extra = dict(sd, **{"blocks.0.attn1.to_zz.weight": torch.randn(2, 2)})
    with pytest.raises(ValueError, match=r"unexpected keys: \[blocks\.0\.attn1\.to_zz\.weight\]"):
        WanDiT.from_pretrained(write("extra", extra), device="cpu")
    shapes = dict(sd, **{"blocks.0.ffn.net.2.weight": torch.randn(64, 100)})
    with pytest.raises(ValueError, match=r"shape mismatches: \[blocks\.0\.ffn\.net\.2\.weight: checkpoint \[64, 100\]"):
        WanDiT.from_pretrained(write("shapes", shapes), device="cpu")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        WanDiT.from_pretrained(write("alien", {"encoder.layer.0.w": torch.randn(2)}, None), device="cpu")
    with pytest.raises(ValueError, match="not a Wan DiT config"):
        WanDiT.from_pretrained(write("vae", sd, json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": 16})), device="cpu")
    with pytest.raises(FileNotFoundError):
        WanDiT.from_pretrained(tmp_path / "nowhere", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        WanDiT.from_pretrained(tmp_path / "empty", device="cpu")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="cannot read"):
        WanDiT.from_pretrained(tmp_path / "junk.safetensors", device="cpu")
    # a checkpoint of another size than the config given
    with pytest.raises(ValueError, match="shape mismatches"):
        WanDiT.from_pretrained(tmp_path / "ok", device="cpu", config=WanDiTConfig.preset("tiny-t2v", ffn_dim=96))
    assert detect_format(["blocks.0.self_attn.q.weight"]) == "wan"
    with pytest.raises(ValueError, match="pass config="):
        infer_config({"patch_embedding.weight": (64, 16, 1, 2, 2)})


def test_configs_of_the_public_checkpoints():
    """config.json contents as published (diffusers Wan2.1-I2V-14B, original Wan2.2-TI2V-5B and Wan2.1-T2V-1.3B)."""
    i2v = WanDiTConfig.from_dict({
        "_class_name": "WanTransformer3DModel", "added_kv_proj_dim": 5120, "attention_head_dim": 128,
        "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256, "image_dim": 1280,
        "in_channels": 36, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16, "patch_size": [1, 2, 2],
        "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096})
    assert i2v == WanDiTConfig.preset("wan2.1-i2v-14b")
    ti2v = WanDiTConfig.from_dict({
        "_class_name": "WanModel", "dim": 3072, "eps": 1e-06, "ffn_dim": 14336, "freq_dim": 256, "in_dim": 48,
        "model_type": "ti2v", "num_heads": 24, "num_layers": 30, "out_dim": 48, "text_len": 512})
    assert ti2v == WanDiTConfig.preset("wan2.2-ti2v-5b")
    t2v = WanDiTConfig.from_dict({
        "_class_name": "WanModel", "dim": 1536, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16,
        "model_type": "t2v", "num_heads": 12, "num_layers": 30, "out_dim": 16, "text_len": 512})
    assert t2v == WanDiTConfig.preset("wan2.1-t2v-1.3b")
    for cfg in (i2v, ti2v, t2v):  # and back
        assert WanDiTConfig.from_dict(cfg.to_diffusers()).replace(kind=cfg.kind) == cfg.replace(per_token_timestep=cfg.kind == "ti2v")
    with pytest.raises(ValueError, match="neither"):
        WanDiTConfig.from_dict({"hidden_size": 3})
