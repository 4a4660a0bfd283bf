"""Encoders loaded with ``deferred=True``: built on the meta device, their weights read from the checkpoint files by
``model.weight_reader(device)`` and put in with ``assign_weights`` (``drop_weights`` takes them out again).

Each layout (a transformers folder, Wan's original ``models_t5_*.pth`` / ``models_clip_*.pth``) is compared
with the eager load of the same folder: every state-dict tensor equal, the encodings equal. The weights are
fresh random ones each run; the text encoders get a real (word-level) tokenizer folder, so ``encode`` runs the
tokenizer the eager load uses.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from swift_model.io.files import CheckpointError, TensorFiles
from swift_model.nets import encoders
from swift_model.nets.encoders import ImageEncoder, TextEncoder
from swift_model.nets.placeholders import assign_weights, drop_weights, is_placeholder

WORDS = "a small red cat sits on the blue sofa near an open window".split()
PROMPT = "the red cat sits near a window"


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _save_tokenizer(folder) -> None:
    """A word-level tokenizer (ids below every test vocabulary) saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))


def _text_folder(root):
    """A diffusers-style folder: ``text_encoder/`` (a tiny random UMT5 saved by transformers) + ``tokenizer/``."""
    TextEncoder.tiny(dim=32, seed=_seed()).model.save_pretrained(str(root / "text_encoder"))
    _save_tokenizer(root / "tokenizer")
    return root


def _image_folder(root):
    ImageEncoder.tiny(dim=32, seed=_seed()).model.save_pretrained(str(root / "image_encoder"))
    return root


def _original_t5_state(vocab=40, dim=16, heads=4, inner=16, ffn=24, layers=2, buckets=8) -> dict:
    """Random weights under the key names of Wan's ``T5Encoder``."""
    sd = {"token_embedding.weight": torch.randn(vocab, dim), "norm.weight": 1 + 0.1 * torch.randn(dim)}
    for i in range(layers):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm2.weight"] = 1 + 0.1 * torch.randn(dim), 1 + 0.1 * torch.randn(dim)
        for n in "qkv":
            sd[b + f"attn.{n}.weight"] = 0.3 * torch.randn(inner, dim)
        sd[b + "attn.o.weight"] = 0.3 * torch.randn(dim, inner)
        sd[b + "ffn.gate.0.weight"] = 0.3 * torch.randn(ffn, dim)
        sd[b + "ffn.fc1.weight"] = 0.3 * torch.randn(ffn, dim)
        sd[b + "ffn.fc2.weight"] = 0.3 * torch.randn(dim, ffn)
        sd[b + "pos_embedding.embedding.weight"] = torch.randn(buckets, heads)
    return sd


def _original_clip_state(dim=32, layers=3, mlp=64, patch=4, grid=3) -> dict:
    """Random weights under the key names of Wan's ``XLMRobertaCLIP`` (a token of text tower, unused)."""
    r = lambda *s: 0.2 * torch.randn(*s)  # noqa: E731
    sd = {"visual.patch_embedding.weight": r(dim, 3, patch, patch), "visual.cls_embedding": r(1, 1, dim),
          "visual.pos_embedding": r(1, grid * grid + 1, dim), "visual.pre_norm.weight": 1 + r(dim),
          "visual.pre_norm.bias": r(dim), "visual.post_norm.weight": 1 + r(dim), "visual.post_norm.bias": r(dim),
          "visual.head": r(dim, 8), "log_scale": torch.tensor(2.0), "textual.token_embedding.weight": r(12, 8)}
    for i in range(layers):
        b = f"visual.transformer.{i}."
        for n, width in (("norm1", dim), ("norm2", dim), ("attn.to_qkv", 3 * dim), ("attn.proj", dim),
                         ("mlp.0", mlp), ("mlp.2", dim)):
            fan_in = mlp if n == "mlp.2" else dim
            sd[b + n + ".weight"] = 1 + r(dim) if n.startswith("norm") else r(width, fan_in)
            sd[b + n + ".bias"] = r(width)
    return sd


def _t5_original_folder(root, file_dtype=torch.bfloat16):
    root.mkdir(exist_ok=True)
    sd = {k: v.to(file_dtype) for k, v in _original_t5_state().items()}
    torch.save(sd, root / "models_t5_umt5-xxl-enc-bf16.pth")
    _save_tokenizer(root / "google" / "umt5-xxl")
    return root


def _clip_original_folder(root):
    root.mkdir(exist_ok=True)
    torch.save(_original_clip_state(), root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    return root


def _assert_state_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].device == v.device, k
        assert torch.equal(got[k], v), k


def _assert_all_meta(model) -> None:
    """No weight holds memory: meta (as built deferred) or placeholders (as dropped)."""
    assert all(is_placeholder(p) for p in model.parameters())
    assert all(is_placeholder(t) for t in model.state_dict().values())


def _image(size=20):
    return torch.rand(3, size, size + 6) * 2 - 1


def _load_pair(enc_cls, folder, dtype):
    return enc_cls.from_pretrained(str(folder), dtype=dtype), enc_cls.from_pretrained(str(folder), dtype=dtype,
                                                                                      deferred=True)


LAYOUTS = pytest.mark.parametrize("layout,dtype", [("transformers", torch.float32), ("original", torch.float32),
                                                   ("original", torch.bfloat16)])


def _deferred_pair(enc_cls, tmp_path, layout, dtype):
    """The eager and the deferred load of a fresh encoder folder of ``layout``; the deferred one holds nothing."""
    if enc_cls is TextEncoder:
        folder = _text_folder(tmp_path) if layout == "transformers" else _t5_original_folder(tmp_path / "wan")
    else:
        folder = _image_folder(tmp_path) if layout == "transformers" else _clip_original_folder(tmp_path / "wan")
    eager, lazy = _load_pair(enc_cls, folder, dtype)
    _assert_all_meta(lazy.model)
    return eager, lazy


@LAYOUTS
def test_deferred_text_encoder_reads_the_eager_weights(tmp_path, layout, dtype):
    eager, lazy = _deferred_pair(TextEncoder, tmp_path, layout, dtype)
    assert lazy.model.shared.weight is lazy.model.encoder.embed_tokens.weight  # tied as built
    assert type(lazy.tokenizer) is type(eager.tokenizer)

    state = lazy.model.weight_reader("cpu")
    _assert_state_equal(state, eager.model.state_dict())
    assert state["shared.weight"] is state["encoder.embed_tokens.weight"]  # one tensor, read once
    params = {n: id(p) for n, p in lazy.model.named_parameters()}
    assign_weights(lazy.model, state)
    assert {n: id(p) for n, p in lazy.model.named_parameters()} == params  # the Parameter objects are kept
    _assert_state_equal(lazy.model.state_dict(), eager.model.state_dict())
    m = lazy.model
    assert m.shared.weight is m.encoder.embed_tokens.weight
    assert m.shared.weight.untyped_storage().data_ptr() == state["shared.weight"].untyped_storage().data_ptr()
    want = eager.encode(PROMPT)
    assert torch.equal(lazy.encode(PROMPT), want)

    drop_weights(m)
    _assert_all_meta(m)
    assert {n: id(p) for n, p in m.named_parameters()} == params and m.shared.weight is m.encoder.embed_tokens.weight
    assign_weights(m, m.weight_reader(torch.device("cpu")))
    _assert_state_equal(m.state_dict(), eager.model.state_dict())
    assert torch.equal(lazy.encode(PROMPT), want)


@LAYOUTS
def test_deferred_image_encoder_reads_the_eager_weights(tmp_path, layout, dtype):
    eager, lazy = _deferred_pair(ImageEncoder, tmp_path, layout, dtype)
    assert lazy.size == eager.size and lazy.dim == eager.dim
    pos = lazy.model.embeddings.position_ids  # not in any file: made at build time on the CPU
    assert pos.device.type == "cpu" and torch.equal(pos, eager.model.embeddings.position_ids)

    state = lazy.model.weight_reader("cpu")
    _assert_state_equal(state, eager.model.state_dict())
    assert "embeddings.position_ids" not in state
    assign_weights(lazy.model, state)
    _assert_state_equal(lazy.model.state_dict(), eager.model.state_dict())
    image = _image(lazy.size)
    want = eager.encode(image)
    assert torch.equal(lazy.encode(image), want)

    drop_weights(lazy.model)
    _assert_all_meta(lazy.model)
    assert lazy.model.embeddings.position_ids is pos  # non-persistent buffers stay
    assign_weights(lazy.model, lazy.model.weight_reader("cpu"))
    assert torch.equal(lazy.encode(image), want)


def test_deferred_loads_read_no_data_and_readers_only_mapped_views(tmp_path, monkeypatch):
    """Building reads headers only (every TensorFiles opened meta, no read_tensors); a reader reads through
    ``TensorFiles.mapped`` (per-tensor views of the mapped files), never a whole-file ``get``."""
    text = _t5_original_folder(tmp_path / "wan")
    _clip_original_folder(text)
    image = _image_folder(tmp_path / "img")
    init = TensorFiles.__init__
    opened = []

    def meta_only(self, files, **kw):
        opened.append(kw.get("meta", False))
        init(self, files, **kw)

    monkeypatch.setattr(TensorFiles, "__init__", meta_only)
    monkeypatch.setattr(encoders, "read_tensors", lambda *a, **k: pytest.fail("read_tensors in a deferred load"))
    encs = [TextEncoder.from_pretrained(str(text), deferred=True),
            ImageEncoder.from_pretrained(str(text), deferred=True),
            ImageEncoder.from_pretrained(str(image), deferred=True)]
    assert opened and all(opened)

    monkeypatch.setattr(TensorFiles, "get", lambda self, key: pytest.fail(f"TensorFiles.get({key}) in a reader"))
    for enc in encs:
        assign_weights(enc.model, enc.model.weight_reader("cpu"))
        assert not any(p.is_meta for p in enc.model.parameters())


def test_transformers_image_folder_under_the_vision_model_prefix(tmp_path):
    """A CLIP vision folder saved with ``vision_model.*`` names (older transformers, the published Wan2.1 I2V
    ``image_encoder``) is read under the model's own names."""
    folder = _image_folder(tmp_path)
    path = folder / "image_encoder" / "model.safetensors"
    save_file({f"vision_model.{k}": v for k, v in load_file(str(path)).items()}, str(path))
    eager, lazy = _load_pair(ImageEncoder, folder, torch.float32)
    assign_weights(lazy.model, lazy.model.weight_reader("cpu"))
    _assert_state_equal(lazy.model.state_dict(), eager.model.state_dict())


def test_deferred_load_refuses_files_that_do_not_fit(tmp_path):
    folder = _text_folder(tmp_path / "t")
    cfg_path = folder / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "d_ff": cfg["d_ff"] + 4}))
    with pytest.raises(CheckpointError, match="model.safetensors.*shape"):
        TextEncoder.from_pretrained(str(folder), deferred=True)

    folder = _image_folder(tmp_path / "i")
    path = folder / "image_encoder" / "model.safetensors"
    state = load_file(str(path))
    del state["encoder.layers.1.mlp.fc2.bias"]
    save_file(state, str(path))
    with pytest.raises(ValueError, match="model.safetensors.*lack.*encoder.layers.1.mlp.fc2.bias"):
        ImageEncoder.from_pretrained(str(folder), deferred=True)

    folder = _clip_original_folder(tmp_path / "o")
    path = folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    sd = torch.load(path)
    sd["visual.transformer.1.attn.proj.weight"] = sd["visual.transformer.1.attn.proj.weight"][:, :5].clone()
    torch.save(sd, path)
    for deferred in (False, True):  # refused as the eager load refuses it, naming the file
        with pytest.raises(ValueError, match="models_clip_.*shape"):
            ImageEncoder.from_pretrained(str(folder), deferred=deferred)


def test_assign_weights_checks_before_changing_anything():
    model = TextEncoder.tiny(dim=16, seed=_seed()).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = {k: torch.randn_like(v) for k, v in before.items()}
    fresh["encoder.embed_tokens.weight"] = fresh["shared.weight"]
    bad = [({k: v for k, v in fresh.items() if k != "encoder.final_layer_norm.weight"}, "missing keys"),
           ({**fresh, "extra.weight": torch.zeros(1)}, "unexpected keys.*extra.weight"),
           ({**fresh, "encoder.final_layer_norm.weight": torch.zeros(3)}, "final_layer_norm.*shape"),
           ({**fresh, "encoder.embed_tokens.weight": fresh["shared.weight"].clone()}, "tied")]
    for state, match in bad:
        with pytest.raises(ValueError, match=match):
            assign_weights(model, state)
        _assert_state_equal(model.state_dict(), before)
    with pytest.raises(TypeError, match="shared.weight"):
        assign_weights(model, {**fresh, "shared.weight": 1.0, "encoder.embed_tokens.weight": 1.0})
    # the aliases state_dict() gives for a tied parameter are accepted as one tensor
    other = TextEncoder.tiny(dim=16, seed=_seed()).model
    assign_weights(model, other.state_dict())
    _assert_state_equal(model.state_dict(), other.state_dict())
    assert model.shared.weight is model.encoder.embed_tokens.weight


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deferred_image_encoder_read_onto_cuda(tmp_path):
    folder = _clip_original_folder(tmp_path / "wan")
    eager, lazy = _load_pair(ImageEncoder, folder, torch.float32)
    assign_weights(lazy.model, lazy.model.weight_reader(torch.device("cuda")))
    lazy.model.cuda()  # the position ids, which no file holds (the residency moves them so)
    eager.model.cuda()
    image = _image(lazy.size)
    assert torch.equal(lazy.encode(image), eager.encode(image))
    drop_weights(lazy.model)
    _assert_all_meta(lazy.model)
