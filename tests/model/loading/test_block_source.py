"""A DiT loaded with ``blocks_from_files=True``: no block tensor is read at load, the blocks' meta parameters
have the dtypes and shapes of a full load, and blocks read from the files on use (into poisoned buffers, LoRA
merged by ``finish``) equal a full load bit for bit, for every checkpoint layout."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from swift_model import CheckpointError, load_dit, save_dit
from swift_model.io.files import TensorFiles
from swift_model.io.keys import to_wan_keys
from swift_model.loading.block_source import FileBlockSource

from helpers import random_dit as _model

LAYOUTS = ("single", "sharded", "wan", "pth")
# (stored dtype, target dtype): the casts of a read are exact here, so a full load and a read agree in bits
DTYPES = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16))


def _saved(model, tmp_path, layout: str):
    """``model`` written in ``layout``; returns ``(path, config to pass or None)``."""
    folder = tmp_path / layout
    if layout == "single":
        return save_dit(model, folder), None
    if layout == "sharded":
        save_dit(model, folder, max_shard_bytes=8192)
        assert len(list(folder.glob("*.safetensors"))) > 3  # the blocks really are spread over shards
        return folder, None
    if layout == "wan":
        return save_dit(model, folder, format="wan"), None
    folder.mkdir()
    sd = {"model.diffusion_model." + k: v.contiguous() for k, v in to_wan_keys(model.state_dict()).items()}
    torch.save(sd, folder / "model.pth")
    return folder / "model.pth", model.config


def _lora(model, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA of fresh random tensors on block weights (factors), a block bias and a block modulation table
    (``diff_b`` / ``diff_m``, the latter fp32 in the model) and a non-block weight."""
    g = torch.Generator().manual_seed(seed)
    d, ffn = model.config.dim, model.config.ffn_dim
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float() * 0.3  # noqa: E731
    return {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": rnd(3, d),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": rnd(d, 3),
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(2.0),
        "diffusion_model.blocks.1.ffn.2.lora_down.weight": rnd(2, ffn),
        "diffusion_model.blocks.1.ffn.2.lora_up.weight": rnd(d, 2),
        "diffusion_model.blocks.1.cross_attn.o.diff_b": rnd(d),
        "diffusion_model.blocks.1.diff_m": rnd(1, 6, d),
        "diffusion_model.head.head.diff_b": rnd(model.config.out_channels * 4),
    }


def _filled(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The block tensors of a ``blocks_from_files`` model, each block read into fresh NaN-poisoned host
    buffers, copied to the "device" (a second CPU buffer) and finished there."""
    src = model.block_source
    out = {}
    for i in range(src.num_blocks):
        params = dict(model.blocks[i].named_parameters())
        host = [(n, torch.full(p.shape, float("nan"), dtype=p.dtype)) for n, p in params.items()]
        src.read(i, host)
        dev = [(n, torch.full_like(t, float("nan")).copy_(t)) for n, t in host]
        src.finish(i, dev)
        out.update({f"blocks.{i}.{n}": t for n, t in dev})
    return out


@pytest.mark.parametrize("stored,dtype", DTYPES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("with_lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_blocks_read_on_use_equal_a_full_load(tmp_path, monkeypatch, layout, with_lora, stored, dtype):
    seed = 100 + 10 * LAYOUTS.index(layout) + 2 * with_lora + DTYPES.index((stored, dtype))
    base = _model("tiny-i2v", seed=seed).to(stored)
    path, config = _saved(base, tmp_path, layout)
    lora = None
    if with_lora:
        save_file(_lora(base, seed + 1), str(tmp_path / "lora.safetensors"))
        lora = tmp_path / "lora.safetensors"
    full = load_dit(path, device="cpu", dtype=dtype, config=config, lora=lora, lora_scale=0.7)

    read_at_load = []  # the checkpoint's tensors read while loading (the LoRA file's are not counted)
    get, mapped = TensorFiles.get, TensorFiles.mapped

    def spy(read):
        def wrapped(self, k):
            if lora is None or self.files != [lora]:
                read_at_load.append(k)
            return read(self, k)
        return wrapped

    monkeypatch.setattr(TensorFiles, "get", spy(get))
    monkeypatch.setattr(TensorFiles, "mapped", spy(mapped))
    lazy = load_dit(path, device="cpu", dtype=dtype, config=config, lora=lora, lora_scale=0.7,
                    blocks_from_files=True)
    monkeypatch.undo()
    assert len(read_at_load) == len([k for k in full.state_dict() if not k.startswith("blocks.")])
    assert not [k for k in read_at_load if ".blocks." in f".{k}"]
    assert isinstance(lazy.block_source, FileBlockSource) and lazy.block_source.num_blocks == 2

    want, got = full.state_dict(), lazy.state_dict()
    assert set(want) == set(got)
    for k, p in got.items():  # the unread blocks: meta, in the full load's dtype and shape
        assert p.dtype == want[k].dtype and p.shape == want[k].shape, k
        assert p.is_meta == k.startswith("blocks."), k
    got.update(_filled(lazy, dtype))
    for k, v in want.items():
        assert not v.is_meta and torch.equal(got[k], v), k
    if with_lora:
        # the LoRA moved something in the blocks (the comparison can fail) and every block delta was applied
        plain = load_dit(path, device="cpu", dtype=dtype, config=config)
        for k in ("blocks.0.attn1.to_q.weight", "blocks.1.ffn.net.2.weight", "blocks.1.attn2.to_out.0.bias",
                  "blocks.1.scale_shift_table"):
            assert not torch.equal(want[k], plain.state_dict()[k]), k
        lazy.block_source.lora.check_all_used()


def test_stored_bytes_and_reading_errors(tmp_path):
    base = _model("tiny-t2v", seed=7)
    sd = base.state_dict()
    sd["blocks.1.attn1.to_q.weight"] = sd["blocks.1.attn1.to_q.weight"].to(torch.bfloat16)  # mixed stored dtypes
    base.load_state_dict(sd, assign=True)
    path = save_dit(base, tmp_path / "ckpt", max_shard_bytes=8192)
    lazy = load_dit(path, device="cpu", dtype=torch.bfloat16, blocks_from_files=True)
    src = lazy.block_source
    assert src.stored_bytes == sum(v.numel() * v.element_size() for k, v in sd.items() if k.startswith("blocks."))
    assert sorted(src.block_names(1)) == sorted(n for n, _ in base.blocks[1].named_parameters())
    q = torch.full((64, 64), float("nan"), dtype=torch.bfloat16)
    src.read(1, [("attn1.to_q.weight", q)])
    assert torch.equal(q, sd["blocks.1.attn1.to_q.weight"])
    with pytest.raises(ValueError, match=r"block 1 has no stored tensor 'attn1.to_qq.weight'"):
        src.read(1, [("attn1.to_qq.weight", q)])
    with pytest.raises(ValueError, match=r"buffer shape \[64\].*stored \[64, 64\]"):
        src.read(1, [("attn1.to_q.weight", torch.empty(64, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match="stays fp32"):
        src.read(0, [("scale_shift_table", torch.empty(1, 6, 64, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match=r"block index i must be an int in \[0, 2\)"):
        src.read(2, [])
    src.finish(0, [("attn1.to_q.weight", q)])  # no LoRA: a no-op
    assert torch.equal(q, sd["blocks.1.attn1.to_q.weight"])


def test_lora_that_targets_nothing_is_still_refused(tmp_path):
    base = _model("tiny-t2v", seed=9)
    path = save_dit(base, tmp_path / "ckpt")
    g = torch.Generator().manual_seed(10)
    down, up = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    alien = {"diffusion_model.blocks.0.self_attn.qq.lora_down.weight": down,
             "diffusion_model.blocks.0.self_attn.qq.lora_up.weight": up}
    with pytest.raises(CheckpointError, match=r"^stage1: .*no parameter of a Wan DiT"):
        load_dit(path, device="cpu", lora=alien, stage="stage1", blocks_from_files=True)
    past_the_end = {"diffusion_model.blocks.2.self_attn.q.lora_down.weight": down,
                    "diffusion_model.blocks.2.self_attn.q.lora_up.weight": up}
    with pytest.raises(CheckpointError, match="target no parameter of this model"):
        load_dit(path, device="cpu", lora=past_the_end, blocks_from_files=True)
