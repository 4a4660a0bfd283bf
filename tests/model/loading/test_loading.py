"""Loading real checkpoint layouts: diffusers' legacy tensors, broken files named by file and stage, refused
dtypes, config-only inspection, the widened Stage II load in one read, the checks of CLI arguments."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from swift_model import CheckpointError, CheckpointNotFoundError, WanDiT, WanDiTConfig, inspect_dit, load_dit, save_dit
from swift_model.io.files import TensorFiles
from swift_model.loading.preflight import check_checkpoints

from helpers import assert_close_to_scale as _close
from helpers import diffusers_model as _diffusers_model
from helpers import dit_inputs as _inputs
from helpers import random_dit as _model

diffusers = pytest.importorskip("diffusers")


def test_official_i2v_layout_with_legacy_norm_added_q_matches_diffusers(tmp_path, caplog, monkeypatch):
    """The published Wan2.1-I2V-14B diffusers folder: 40 blocks, sharded, plus one legacy
    ``blocks.{i}.attn2.norm_added_q.weight`` per block that no model uses. Loads, says so once, and computes
    what diffusers' own loader computes from the same files."""
    cfg = WanDiTConfig.preset("tiny-i2v", num_layers=40)
    ref = _diffusers_model(cfg, seed=91)
    folder = tmp_path / "transformer"
    ref.save_pretrained(folder, max_shard_size="200KB")
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    g = torch.Generator().manual_seed(5)
    for j, shard in enumerate(shards):  # spread the legacy tensors over the shards, as the index says
        tensors = load_file(str(folder / shard))
        for i in range(j, cfg.num_layers, len(shards)):
            key = f"blocks.{i}.attn2.norm_added_q.weight"
            tensors[key] = torch.randn(cfg.dim, generator=g)
            index["weight_map"][key] = shard
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    assert len(index["weight_map"]) == len(ref.state_dict()) + 40

    # diffusers' own loader skips them itself (`_keys_to_ignore_on_load_unexpected`). Its fp32-module rule
    # needs `accelerate`, which this package does not depend on; at fp32 the rule changes nothing.
    monkeypatch.setattr(diffusers.WanTransformer3DModel, "_keep_in_fp32_modules", None)
    theirs = diffusers.WanTransformer3DModel.from_pretrained(folder, low_cpu_mem_usage=False).eval()
    assert theirs.dtype == torch.float32
    with caplog.at_level(logging.INFO, logger="swift_model"):
        ours = WanDiT.from_pretrained(tmp_path, device="cpu", stage="stage1")  # via the pipeline folder
    said = [r.getMessage() for r in caplog.records if "norm_added_q" in r.getMessage()]
    assert len(said) == 1 and "skipped 40 tensors" in said[0] and "stage1" in said[0]
    x, t, ctx, clip = _inputs(cfg, B=1, Fr=2)
    with torch.no_grad():
        _close(ours(x, t, ctx, clip), theirs(x, t, ctx, clip, return_dict=False)[0])
    info = inspect_dit(tmp_path)
    assert len(info.skipped) == 40 and all("norm_added_q" in k for k in info.skipped)
    # a norm_added_q of another shape or place is not skipped silently: it is an unexpected key
    assert len(info.names) == len(ref.state_dict())


def _write(folder, tensors, config):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


def _raises(exc_type, fn, *, file, stage, key=None):
    with pytest.raises(exc_type) as err:
        fn()
    e = err.value
    assert isinstance(e, CheckpointError), repr(e)
    msg = str(e)
    assert e.stage == stage and msg.startswith(f"{stage}: ") and str(file) in msg, msg
    assert e.file == str(file), (e.file, file)
    if key is not None:
        assert key in msg, msg
    return msg


def test_broken_files_name_file_stage_and_key(tmp_path):
    m = _model("tiny-t2v", seed=71)
    save_dit(m, tmp_path / "ok", max_shard_bytes=40_000)
    ok = tmp_path / "ok"
    cfg = json.loads((ok / "config.json").read_text())
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}

    # config.json with non-UTF-8 bytes
    d = _write(tmp_path / "latin1", sd, None)
    (d / "config.json").write_bytes(json.dumps(dict(cfg, _note="caf\u00e9"), ensure_ascii=False).encode("latin-1"))
    msg = _raises(ValueError, lambda: WanDiT.from_pretrained(d, device="cpu", stage="stage1"),
                  file=d / "config.json", stage="stage1")
    assert "not UTF-8" in msg
    # config.json that is not JSON, and a JSON list
    d = _write(tmp_path / "garbage_cfg", sd, "{num_layers: 2,")
    assert "not valid JSON" in _raises(ValueError, lambda: inspect_dit(d, stage="stage2"), file=d / "config.json",
                                       stage="stage2")
    d = _write(tmp_path / "list_cfg", sd, "[1, 2]")
    assert "not an object" in _raises(ValueError, lambda: inspect_dit(d), file=d / "config.json", stage="checkpoint")
    # a config field of the wrong type (today's "invalid literal for int()")
    for field, bad in (("num_layers", "2x"), ("patch_size", [1, 2]), ("cross_attn_norm", "yes"), ("eps", None)):
        d = _write(tmp_path / f"field_{field}", sd, dict(cfg, **{field: bad}))
        msg = _raises(ValueError, lambda: WanDiT.from_pretrained(d, device="cpu", stage="stage2"),
                      file=d / "config.json", stage="stage2", key=f"field {field!r}")
        assert "invalid literal" not in msg
    # values of the right type that make no model
    d = _write(tmp_path / "heads", sd, dict(cfg, num_attention_heads=0))
    _raises(ValueError, lambda: inspect_dit(d, stage="stage1"), file=d / "config.json", stage="stage1")

    # a garbage index
    d = tmp_path / "bad_index"
    d.mkdir()
    for f in ok.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    index = d / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text("this is not json {")
    assert "not valid JSON" in _raises(ValueError, lambda: inspect_dit(d, stage="stage1"), file=index, stage="stage1")
    index.write_text(json.dumps({"metadata": {}}))
    _raises(ValueError, lambda: inspect_dit(d, stage="stage1"), file=index, stage="stage1", key="weight_map")
    index.write_text(json.dumps({"weight_map": {"proj_out.weight": "../elsewhere.safetensors"}}))
    _raises(ValueError, lambda: inspect_dit(d, stage="stage1"), file=index, stage="stage1", key="weight_map")
    # a shard named in the index but missing
    wm = json.loads((ok / index.name).read_text())
    index.write_text(json.dumps(wm))
    gone = sorted(set(wm["weight_map"].values()))[1]
    (d / gone).unlink()
    msg = _raises(FileNotFoundError, lambda: WanDiT.from_pretrained(d, device="cpu", stage="stage2"), file=index,
                  stage="stage2")
    assert gone in msg and isinstance(_caught(lambda: inspect_dit(d)), CheckpointNotFoundError)
    # an index that places a tensor in a shard that does not hold it
    (d / gone).write_bytes((ok / gone).read_bytes())
    moved = next(k for k, v in wm["weight_map"].items() if v != gone)
    index.write_text(json.dumps({"weight_map": dict(wm["weight_map"], **{moved: gone})}))
    _raises(ValueError, lambda: inspect_dit(d, stage="stage1"), file=index, stage="stage1", key=moved)
    # a truncated shard
    index.write_text(json.dumps(wm))
    data = (ok / gone).read_bytes()
    (d / gone).write_bytes(data[: len(data) // 2])
    msg = _raises(ValueError, lambda: WanDiT.from_pretrained(d, device="cpu", stage="stage1"), file=d / gone,
                  stage="stage1")
    assert "cannot read as a safetensors file" in msg
    # a .pth that is no checkpoint
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a pickle of tensors")
    _raises(ValueError, lambda: inspect_dit(junk, stage="stage2"), file=junk, stage="stage2")
    # a path that does not exist, a folder with no weights
    _raises(FileNotFoundError, lambda: inspect_dit(tmp_path / "nowhere", stage="stage1"), file=tmp_path / "nowhere",
            stage="stage1")
    (tmp_path / "empty").mkdir()
    _raises(FileNotFoundError, lambda: inspect_dit(tmp_path / "empty", stage="stage1"), file=tmp_path / "empty",
            stage="stage1")


def _caught(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


@pytest.mark.parametrize("bad", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float8_e4m3fn])
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_non_float_tensors_are_refused_not_cast(tmp_path, bad, fmt):
    m = _model("tiny-t2v", seed=81)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    key = "blocks.1.ffn.net.2.weight"
    sd[key] = (sd[key] * 100).to(bad)
    cfg = m.config.to_diffusers()
    if fmt == "safetensors":
        d = _write(tmp_path / "ck", sd, cfg)
        file = d / "diffusion_pytorch_model.safetensors"
    else:
        d = tmp_path / "ck"
        d.mkdir()
        torch.save(sd, d / "model.pth")
        (d / "config.json").write_text(json.dumps(cfg))
        file = d / "model.pth"
    for call in (lambda: WanDiT.from_pretrained(d, device="cpu", stage="stage2"),
                 lambda: inspect_dit(d, stage="stage2")):
        msg = _raises(ValueError, call, file=file, stage="stage2", key=key)
        assert "refusing" in msg and str(bad) in msg


def test_inspect_reads_headers_only_and_builds_the_meta_model(tmp_path, monkeypatch):
    m = _model("tiny-i2v", seed=12)
    save_dit(m, tmp_path / "st", max_shard_bytes=50_000)
    save_dit(m, tmp_path / "wan", format="wan")
    torch.save({"model.diffusion_model." + k: v for k, v in m.state_dict().items()}, tmp_path / "single.pth")

    def no_data(*a, **k):
        raise AssertionError("inspection read tensor data")

    monkeypatch.setattr(TensorFiles, "get", no_data)
    for path in (tmp_path / "st", tmp_path / "wan", tmp_path / "single.pth"):
        info = inspect_dit(path, stage="stage1", config=m.config if path.suffix == ".pth" else None)
        assert info.config.replace(name="x") == m.config.replace(name="x"), path
        assert info.shapes == {k: tuple(v.shape) for k, v in m.state_dict().items()}
        assert set(info.dtypes.values()) == {torch.float32}
        assert info.nbytes == sum(v.numel() * 4 for v in m.state_dict().values())
        meta = info.meta_model(dtype=torch.bfloat16)
        assert all(p.is_meta for p in meta.parameters())
        assert meta.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16 and meta.scale_shift_table.dtype == torch.float32
    assert info.format == "diffusers" and inspect_dit(tmp_path / "wan").format == "wan"
    wide = inspect_dit(tmp_path / "st").meta_model(extra_in_channels=20)
    assert wide.config.in_channels == m.config.in_channels + 20


def test_widened_stage2_is_decided_before_and_read_once(tmp_path, monkeypatch):
    """The caller learns from the headers that a public TI2V checkpoint (in == out) needs widening for the
    "swift" kind, then loads it once, each tensor read once."""
    base = _model("tiny-ti2v", seed=61)
    save_dit(base, tmp_path, format="wan", max_shard_bytes=30_000)
    opened, reads = [], []
    real_init, real_get = TensorFiles.__init__, TensorFiles.get

    def init(self, files, **kw):
        opened.append(kw.get("meta", False))
        real_init(self, files, **kw)

    def get(self, key):
        reads.append(key)
        return real_get(self, key)

    monkeypatch.setattr(TensorFiles, "__init__", init)
    monkeypatch.setattr(TensorFiles, "get", get)
    info = inspect_dit(tmp_path, stage="stage2")
    assert opened == [True] and reads == []
    extra = info.config.in_channels if info.config.in_channels == info.config.out_channels else 0
    wide = load_dit(info, device="cpu", extra_in_channels=extra)
    assert opened == [True, False]  # one read of the data, no second inspection
    assert sorted(reads) == sorted(info.names.values())  # every tensor read once
    assert wide.config.in_channels == 96 and wide.config.extra_in_channels == 48
    w = wide.patch_embedding.weight
    assert torch.equal(w[:, :48], base.patch_embedding.weight) and torch.count_nonzero(w[:, 48:]) == 0
    sd = base.state_dict()
    for k, v in wide.state_dict().items():
        if k != "patch_embedding.weight":
            assert torch.equal(v, sd[k]), k


def _fake_component_folder(folder, dit, *, text=True, image=False, vae=True):
    save_dit(dit, folder)
    if vae:
        (folder / "vae").mkdir()
        (folder / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": 16}))
    if text:
        (folder / "text_encoder").mkdir()
        (folder / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "umt5"}))
        (folder / "tokenizer").mkdir()
    if image:
        (folder / "image_encoder").mkdir()
        (folder / "image_encoder" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    return folder


def test_check_checkpoints_reads_no_weights(tmp_path, monkeypatch):
    s1 = _fake_component_folder(tmp_path / "s1", _model("tiny-i2v", seed=1), image=True)
    s2 = _fake_component_folder(tmp_path / "s2", _model("tiny-ti2v", seed=2), text=False)
    d = s1 / "text_encoder"
    lora = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(2, 64),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(64, 2)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    monkeypatch.setattr(TensorFiles, "__init__", _meta_only(TensorFiles.__init__))  # headers, never data
    ok = check_checkpoints(s1, s2, stage1_lora=tmp_path / "lora.safetensors")
    assert ok.stage1.config.kind == "i2v" and ok.stage2.config.kind == "ti2v"
    assert ok.vae1 == ("diffusers", str(s1 / "vae")) and ok.text_encoder[0] == "transformers"
    assert ok.image_encoder == ("transformers", str(s1 / "image_encoder"))
    assert check_checkpoints(s1, s2, need_text_encoder=False).text_encoder is None
    # a LoRA that does not fit Stage I, a missing VAE, a missing text encoder, a broken config
    save_file({k: v[:, :10].contiguous() if "down" in k else v for k, v in lora.items()}, str(tmp_path / "bad.safetensors"))
    msg = _raises(ValueError, lambda: check_checkpoints(s1, s2, stage1_lora=tmp_path / "bad.safetensors"),
                  file=tmp_path / "bad.safetensors", stage="stage1")
    assert "do not fit" in msg
    _raises(FileNotFoundError, lambda: check_checkpoints(s1, s2, stage1_lora=tmp_path / "none.safetensors"),
            file=tmp_path / "none.safetensors", stage="stage1")
    (s2 / "vae" / "config.json").unlink()
    assert "VAE" in _raises(ValueError, lambda: check_checkpoints(s1, s2), file=s2, stage="stage2")
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _raises(ValueError, lambda: check_checkpoints(s1, None), file=s1, stage="stage1")
    (s1 / "config.json").write_bytes(b"\xff\xfe{}")
    _raises(ValueError, lambda: check_checkpoints(s1, None), file=s1 / "config.json", stage="stage1")


def _meta_only(real_init):
    def init(self, files, **kw):
        assert kw.get("meta"), "a weight file was opened for reading data"
        real_init(self, files, **kw)
    return init


def test_from_pretrained_checks_every_component_before_reading_a_weight(tmp_path, monkeypatch):
    """The pipeline runs the preflight first: a Stage II folder without a VAE, a text encoder of the wrong kind
    or a LoRA that does not fit fails, naming stage and file, before the 14B-sized Stage I is read."""
    from swift_model.generation.pipeline import SwiftI2VPipeline

    s1 = _fake_component_folder(tmp_path / "s1", _model("tiny-i2v", seed=3), image=True)
    s2 = _fake_component_folder(tmp_path / "s2", _model("tiny-ti2v", seed=4), text=False, vae=False)
    monkeypatch.setattr(TensorFiles, "__init__", _meta_only(TensorFiles.__init__))  # headers, never data
    load = lambda **kw: SwiftI2VPipeline.from_pretrained(s1, s2, device="cpu", **kw)  # noqa: E731
    assert "VAE" in _raises(ValueError, load, file=s2, stage="stage2")
    (s2 / "vae").mkdir()
    (s2 / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": 48}))
    (s1 / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _raises(ValueError, load, file=s1, stage="stage1")
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(2, 10),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(64, 2)},
              str(tmp_path / "bad.safetensors"))
    _raises(ValueError, lambda: load(load_text_encoder=False, stage1_lora=str(tmp_path / "bad.safetensors")),
            file=tmp_path / "bad.safetensors", stage="stage1")
    # with every check passed, the weights are read (and the meta-only guard trips on the first one)
    with pytest.raises(AssertionError, match="weight file was opened"):
        load(load_text_encoder=False)
