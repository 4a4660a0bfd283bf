"""Conditioning encoders: the UMT5 text encoder (Wan's prompt embeddings), the CLIP vision encoder (Wan2.1
I2V image tokens), prompt embeddings precomputed into a safetensors file, and tiny random encoders for demos.

Real encoders load with transformers from a diffusers-format checkpoint folder (``text_encoder/`` +
``tokenizer/``, ``image_encoder/``) or from a folder holding the model's own ``config.json``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..io.files import CheckpointError, TensorFiles, read_json, read_tensors, weight_files
from ..io.keys import format_keys
from .placeholders import state_slots

TEXT_LEN = 512  # Wan pads every prompt to 512 tokens (zeros past the prompt's length)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ByteTokenizer:
    """A tokenizer for the tiny random text encoder: UTF-8 bytes + 1 (0 is padding), then an end token."""

    def __init__(self, vocab_size: int = 258) -> None:
        self.vocab_size = vocab_size

    def __call__(self, texts, max_length: int):
        rows = [[b % (self.vocab_size - 2) + 1 for b in t.encode("utf-8")][: max_length - 1] + [self.vocab_size - 1]
                for t in texts]
        ids = torch.zeros(len(rows), max_length, dtype=torch.long)
        mask = torch.zeros(len(rows), max_length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask


def _subfolder(path: str, name: str) -> str:
    sub = os.path.join(path, name)
    return sub if os.path.isdir(sub) else path


# -- original Wan checkpoints ------------------------------------------------------------------------
# An original Wan folder holds the encoders as plain state dicts of Wan's own modules:
# ``models_t5_umt5-xxl-enc-bf16.pth`` (``wan/modules/t5.py``: ``T5Encoder``) with its tokenizer folder
# ``google/umt5-xxl``, and for Wan2.1 I2V ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``
# (``wan/modules/clip.py``: ``XLMRobertaCLIP``, of which only the ``visual`` tower is used). They are renamed
# to transformers' ``UMT5EncoderModel`` and ``CLIPVisionModel``, which compute the same functions.

T5_ORIGINAL_PREFIX = "models_t5_"
CLIP_ORIGINAL_PREFIX = "models_clip_"
T5_TOKENIZER_DIR = os.path.join("google", "umt5-xxl")
CLIP_NUM_HEADS = 16  # ViT-H/14 of Wan's CLIP (not recoverable from the weights' shapes)

# The public encoders' architectures (where no folder holds their configs, e.g. a plan from presets):
# UMT5-XXL's encoder (Wan's text encoder) and the ViT-H/14 vision tower of Wan2.1 I2V's CLIP.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)


def tiny_umt5_config(dim: int = 32) -> dict:
    """``UMT5Config`` arguments of the tiny random 2-layer text encoder of width ``dim`` (a byte vocabulary)."""
    return dict(vocab_size=258, d_model=dim, d_kv=8, d_ff=2 * dim, num_layers=2, num_heads=max(1, dim // 8),
                relative_attention_num_buckets=8, relative_attention_max_distance=32)


def tiny_clip_config(dim: int = 32) -> dict:
    """``CLIPVisionConfig`` arguments of the tiny random 2-layer image encoder of width ``dim``."""
    return dict(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2, num_attention_heads=max(1, dim // 8),
                image_size=32, patch_size=8)


def find_original_file(path: str, prefix: str) -> str | None:
    """The original Wan checkpoint file in folder ``path`` whose name starts with ``prefix`` (or None)."""
    if not os.path.isdir(path):
        return None
    hits = [f for f in sorted(os.listdir(path)) if f.startswith(prefix) and f.endswith((".pth", ".safetensors"))]
    return os.path.join(path, hits[0]) if hits else None


def _config_model_type(folder: str) -> str | None:
    """``model_type`` of a transformers ``config.json`` in ``folder`` (None when absent or not one: an
    original Wan folder's config.json is its DiT's)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    model_type = read_json(path).get("model_type")  # an unreadable config.json raises, naming the file
    return model_type if isinstance(model_type, str) else None


def locate_text_encoder(path: str) -> tuple[str, str, str]:
    """Where the UMT5 encoder of checkpoint folder ``path`` is, without reading weights:
    ``(layout, model path, tokenizer folder)``, layout ``"transformers"`` (a ``text_encoder/`` folder or the
    model's own folder) or ``"original"`` (``models_t5_*.pth`` + ``google/umt5-xxl``)."""
    original = None if os.path.isdir(os.path.join(path, "text_encoder")) else find_original_file(path, T5_ORIGINAL_PREFIX)
    if original is not None:
        tok_dir = next((d for d in (os.path.join(path, T5_TOKENIZER_DIR), os.path.join(path, "tokenizer"))
                        if os.path.isdir(d)), None)
        if tok_dir is None:
            raise ValueError(f"{original} found but no tokenizer folder {os.path.join(path, T5_TOKENIZER_DIR)}")
        return "original", original, tok_dir
    model_dir = _subfolder(path, "text_encoder")
    if _config_model_type(model_dir) not in ("umt5", "t5", "mt5"):
        raise ValueError(
            f"no text encoder in {path} (expected text_encoder/config.json or models_t5_umt5-xxl-enc-bf16.pth); "
            "pass precomputed prompt embeddings instead (--prompt-embeds FILE.safetensors)")
    return "transformers", model_dir, _subfolder(path, "tokenizer")


def locate_image_encoder(path: str) -> tuple[str, str]:
    """Where the CLIP vision encoder of checkpoint folder ``path`` is, without reading weights:
    ``("transformers", folder)`` or ``("original", models_clip_*.pth)``."""
    original = None if os.path.isdir(os.path.join(path, "image_encoder")) else find_original_file(path, CLIP_ORIGINAL_PREFIX)
    if original is not None:
        return "original", original
    model_dir = _subfolder(path, "image_encoder")
    if _config_model_type(model_dir) not in ("clip", "clip_vision_model"):
        raise ValueError(f"no CLIP vision encoder in {path} (expected image_encoder/config.json or "
                         "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth)")
    return "transformers", model_dir


def _load_into(model_cls, config, state: dict, dtype, what: str):
    """Build ``model_cls(config)`` without random init (meta device) and assign ``state`` strictly."""
    with torch.device("meta"):
        model = model_cls(config)
    own = model.state_dict()
    # transformers may nest the weights under a sub-module name; follow the model's own key names.
    prefix = ""
    first = next(iter(state))
    if first not in own:
        prefix = next((k[: -len(first)] for k in own if k.endswith("." + first)), "")
    cast: dict[int, torch.Tensor] = {}  # tied weights (UMT5's shared embedding) stay one tensor
    state = {prefix + k: cast.setdefault(id(v), v.to(dtype)) for k, v in state.items()}
    _check_state(own, state, what)
    model.load_state_dict(state, strict=True, assign=True)
    _fill_position_ids(model)
    return model


def _check_state(own: dict, state: dict, what: str) -> None:
    """``ValueError`` unless ``state`` has exactly the keys of the model's state dict ``own``, with its shapes."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"not a {what} checkpoint: missing keys {missing[:4]}, unexpected keys {unexpected[:4]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"not a {what} checkpoint: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")


def _fill_position_ids(model, device=None) -> None:
    """Create the non-persistent buffers still on the meta device (CLIP's position ids: ``arange``, not in any
    checkpoint) on ``device`` (the CPU by default)."""
    for mod in model.modules():
        for attr in list(mod._non_persistent_buffers_set):
            buf = mod._buffers.get(attr)
            if buf is not None and buf.is_meta:
                ids = torch.arange(buf.shape[-1], device=device).expand(buf.shape).clone()
                mod.register_buffer(attr, ids, persistent=False)


def umt5_config_from_original(state: dict):
    """transformers ``UMT5Config`` of an original Wan ``T5Encoder`` state dict (sizes read from the shapes;
    UMT5's fixed choices: gated tanh-GELU feed-forward, relative-position max distance 128, eps 1e-6)."""
    from transformers import UMT5Config

    if "token_embedding.weight" not in state or "blocks.0.pos_embedding.embedding.weight" not in state:
        raise ValueError("not an original Wan UMT5 encoder checkpoint (no token_embedding / blocks.0.pos_embedding)")
    vocab, dim = state["token_embedding.weight"].shape
    buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    return UMT5Config(vocab_size=vocab, d_model=dim, d_kv=state["blocks.0.attn.q.weight"].shape[0] // heads,
                      d_ff=state["blocks.0.ffn.fc1.weight"].shape[0], num_layers=layers, num_heads=heads,
                      relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
                      tie_word_embeddings=False)


def convert_umt5_original(state: dict) -> dict:
    """Rename an original Wan ``T5Encoder`` state dict to transformers ``UMT5EncoderModel`` keys.

    Wan's feed-forward is ``fc2(fc1(x) * gelu(gate(x)))`` and transformers' ``wo(wi_1(x) * gelu(wi_0(x)))``;
    every block has its own relative-position table (UMT5, unlike T5, does not share it).
    """
    out = {}
    names = {"norm1.weight": "layer.0.layer_norm.weight", "attn.q.weight": "layer.0.SelfAttention.q.weight",
             "attn.k.weight": "layer.0.SelfAttention.k.weight", "attn.v.weight": "layer.0.SelfAttention.v.weight",
             "attn.o.weight": "layer.0.SelfAttention.o.weight",
             "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
             "norm2.weight": "layer.1.layer_norm.weight", "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
             "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight", "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight"}
    for key, value in state.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            out[f"encoder.block.{i}.{names.get(rest, rest)}"] = value
        else:
            out[key] = value  # unknown: left for the strict load to reject
    return out


def clip_vision_config_from_original(state: dict, num_heads: int = CLIP_NUM_HEADS):
    """transformers ``CLIPVisionConfig`` of the ``visual`` tower of an original Wan CLIP state dict (sizes from
    the shapes; exact GELU, LayerNorm eps 1e-5 as in Wan's ``clip_xlm_roberta_vit_h_14``)."""
    from transformers import CLIPVisionConfig

    if "visual.patch_embedding.weight" not in state or "visual.pos_embedding" not in state:
        raise ValueError("not an original Wan CLIP checkpoint (no visual.patch_embedding / visual.pos_embedding)")
    dim, _, patch, _ = state["visual.patch_embedding.weight"].shape
    grid = int(round((state["visual.pos_embedding"].shape[1] - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("visual.transformer."))
    return CLIPVisionConfig(hidden_size=dim, intermediate_size=state["visual.transformer.0.mlp.0.weight"].shape[0],
                            num_hidden_layers=layers, num_attention_heads=num_heads, image_size=grid * patch,
                            patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-5)


def convert_clip_vision_original(state: dict) -> dict:
    """Rename the ``visual.*`` keys of an original Wan CLIP state dict to transformers ``CLIPVisionModel`` keys
    (the text tower, the logit scale and the projection head are dropped: Wan uses the penultimate block's
    hidden states only). The packed ``to_qkv`` projection (rows ordered q, k, v) is split in three."""
    out = {}
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
             "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
    for key, value in state.items():
        if not key.startswith("visual.") or key == "visual.head":
            continue
        rest = key[len("visual."):]
        if rest == "cls_embedding":
            out["embeddings.class_embedding"] = value.reshape(-1)
        elif rest == "pos_embedding":
            out["embeddings.position_embedding.weight"] = value.reshape(value.shape[-2], value.shape[-1])
        elif rest == "patch_embedding.weight":
            out["embeddings.patch_embedding.weight"] = value
        elif rest.startswith("pre_norm."):
            out["pre_layrnorm." + rest.split(".", 1)[1]] = value
        elif rest.startswith("post_norm."):
            out["post_layernorm." + rest.split(".", 1)[1]] = value
        elif rest.startswith("transformer."):
            _, i, sub = rest.split(".", 2)
            mod, _, kind = sub.rpartition(".")
            if mod == "attn.to_qkv":
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, 0)):
                    out[f"encoder.layers.{i}.self_attn.{name}.{kind}"] = part
            else:
                out[f"encoder.layers.{i}.{names.get(mod, mod)}.{kind}"] = value
        else:
            out[rest] = value
    return out


# -- deferred weights ----------------------------------------------------------------------------------------
# An encoder loaded with ``deferred=True`` is built on the meta device (no memory) and carries a
# ``weight_reader(device)`` that reads its state dict from the checkpoint files straight onto ``device``, tensor by
# tensor from the files' mapped pages, when a phase needs it;
# :func:`~swift_model.nets.placeholders.assign_weights` puts such a state in and
# :func:`~swift_model.nets.placeholders.drop_weights` drops it again afterwards.


def _to_target(t: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on ``device``, floating-point tensors in ``dtype`` (one copy or cast, straight from ``t``)."""
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)


def _build_meta(model_cls, config, dtype: torch.dtype, device=None):
    """``model_cls(config)`` on the meta device (no memory, no random init), its weights in ``dtype``, with the
    non-persistent buffers created on ``device`` (the CPU by default)."""
    with torch.device("meta"):
        model = model_cls(config)
    model.to(dtype)
    _fill_position_ids(model, device)
    return model


def _tie_groups(model) -> list[list[str]]:
    """The state-dict keys of ``model`` grouped by tensor: one group per parameter or buffer, a tied parameter's
    names together (in state-dict order)."""
    groups: dict[int, list[str]] = {}
    for key, (_, _, cur, _) in state_slots(model).items():
        groups.setdefault(id(cur), []).append(key)
    return list(groups.values())


def _read_groups(groups: list[list[str]], sources: list, get, device, dtype: torch.dtype) -> dict:
    """``key -> tensor`` for every key of ``groups``: group ``i`` read once as ``get(sources[i])`` (a mapped view),
    copied onto ``device`` in ``dtype``; groups with the very same source share the copy."""
    # id(view) -> (view, copy): the view is held so that its id cannot be reused by another view in this call
    read: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    out = {}
    for keys, src in zip(groups, sources):
        view = get(src)
        if id(view) not in read:
            read[id(view)] = (view, _to_target(view, device, dtype))
        for k in keys:
            out[k] = read[id(view)][1]
    return out


def _deferred_original(model_cls, path: str, stage: str, config_of, convert, dtype, device, what: str):
    """An encoder of an original Wan file built on the meta device with a ``weight_reader``: the config comes from
    the file's structure (shapes only: a meta-device unpickling or the safetensors header) and the renaming is
    checked from it as the eager load checks it."""
    heads = TensorFiles([path], stage=stage, meta=True)
    structure = {k: heads.get(k) for k in heads.keys()}  # meta tensors: shapes and dtypes, no data
    config = config_of(structure)
    model = _build_meta(model_cls, config, dtype, device)
    _check_state(model.state_dict(), convert(structure), what)
    groups = _tie_groups(model)

    def weight_reader(device) -> dict:
        """The encoder's state dict read from its file onto ``device``, tensor by tensor from the mapped file."""
        files = TensorFiles([path], stage=stage)
        views = convert({k: files.mapped(k) for k in files.keys()})  # renamed views (the q/k/v split too)
        return _read_groups(groups, [g[0] for g in groups], views.__getitem__, device, dtype)

    model.weight_reader = weight_reader
    return model


def _key_mapping(own: list[str], stored: set[str]):
    """How the model's keys are named in the files: as they are, under a prefix the files add (a transformers-4
    ``CLIPVisionModel`` stores ``vision_model.*``), or without the model's first name part; the one naming most
    of ``own`` in ``stored``."""
    maps = [lambda k: k, lambda k: k.split(".", 1)[-1]]
    for probe in own[:1]:
        for p in {s[: -len(probe)] for s in stored if s.endswith("." + probe)}:
            maps.append(lambda k, p=p: p + k)
    return max(maps, key=lambda f: sum(f(k) in stored for k in own))


def _deferred_transformers(model_cls, folder: str, stage: str, dtype, device, what: str):
    """An encoder of a transformers model folder built on the meta device from its ``config.json`` with a
    ``weight_reader``. The files' headers must hold every weight with the model's shape (extra tensors, e.g. the
    text tower of a whole CLIP, are ignored, as transformers ignores them)."""
    config = model_cls.config_class.from_pretrained(folder)
    model = _build_meta(model_cls, config, dtype, device)
    paths, _, _ = weight_files(folder, stage=stage)
    heads = TensorFiles(paths, stage=stage, meta=True)
    own = model.state_dict()
    groups = _tie_groups(model)
    name = _key_mapping(list(own), set(heads.keys()))
    sources, missing = [], []
    for keys in groups:
        src = next((name(k) for k in keys if name(k) in heads), None)
        if src is None:
            missing.extend(keys)
            continue
        if heads.shape(src) != tuple(own[keys[0]].shape):
            raise CheckpointError(f"not a {what} checkpoint: shape {heads.shape(src)}, the config gives "
                                  f"{tuple(own[keys[0]].shape)}", file=heads.file_of(src), stage=stage, key=src)
        sources.append(src)
    if missing:
        raise ValueError(f"not a {what} checkpoint: {', '.join(p.name for p in heads.files)} in {folder} lack "
                         f"{format_keys(missing)}")

    def weight_reader(device) -> dict:
        """The encoder's state dict read from its files onto ``device``, tensor by tensor from the mapped files."""
        files = TensorFiles(paths, stage=stage)
        return _read_groups(groups, sources, files.mapped, device, dtype)

    model.weight_reader = weight_reader
    return model


class TextEncoder:
    """UMT5 encoder + tokenizer producing Wan prompt embeddings ``[1, 512, dim]`` (zeros past the prompt)."""

    def __init__(self, model, tokenizer, max_length: int = TEXT_LEN) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @classmethod
    def from_pretrained(cls, path: str, *, device=None, dtype=torch.float32, deferred: bool = False) -> "TextEncoder":
        """Load UMT5 (transformers ``UMT5EncoderModel``) and its tokenizer from a checkpoint folder: diffusers
        (``text_encoder/`` + ``tokenizer/``), a transformers model folder, or an original Wan folder
        (``models_t5_umt5-xxl-enc-bf16.pth`` + the tokenizer folder ``google/umt5-xxl``).

        Args:
            path: the checkpoint folder.
            device: where the weights go (``deferred``: ignored, the weights stay on the meta device).
            dtype: the weights' dtype (``deferred``: the dtype the reader gives them).
            deferred: build the model on the meta device and read nothing: ``model.weight_reader(device)``
                then reads its state dict from the files onto ``device`` (see :func:`~swift_model.nets.placeholders.assign_weights`). The files
                are checked against the config from their headers now.
        """
        from transformers import AutoTokenizer, UMT5EncoderModel

        layout, model_path, tok_dir = locate_text_encoder(path)
        if deferred:
            what = f"UMT5 encoder ({model_path})"
            if layout == "original":
                model = _deferred_original(UMT5EncoderModel, model_path, "text encoder", umt5_config_from_original,
                                           convert_umt5_original, dtype, device, what)
            else:
                model = _deferred_transformers(UMT5EncoderModel, model_path, "text encoder", dtype, device, what)
            return cls(model, AutoTokenizer.from_pretrained(tok_dir))
        if layout == "original":
            state = read_tensors(model_path, stage="text encoder")
            model = _load_into(UMT5EncoderModel, umt5_config_from_original(state), convert_umt5_original(state),
                               dtype, f"UMT5 encoder ({model_path})")
            del state
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            return cls(model.to(device) if device is not None else model, tokenizer)
        model = UMT5EncoderModel.from_pretrained(model_path, torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        return cls(model.to(device) if device is not None else model, tokenizer)

    @classmethod
    def tiny(cls, dim: int = 32, seed: int = 0) -> "TextEncoder":
        """A random 2-layer UMT5 encoder of width ``dim`` with a byte tokenizer (for demos and tests)."""
        from transformers import UMT5Config, UMT5EncoderModel

        cfg = UMT5Config(**tiny_umt5_config(dim))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UMT5EncoderModel(cfg)
        return cls(model, ByteTokenizer(cfg.vocab_size), max_length=TEXT_LEN)

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """float32 ``[1, 512, dim]`` embeddings of ``prompt`` (padding positions are zero, as in Wan)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if isinstance(self.tokenizer, ByteTokenizer):
            ids, mask = self.tokenizer([prompt], self.max_length)
        else:
            tok = self.tokenizer([prompt], padding="max_length", max_length=self.max_length, truncation=True,
                                 add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
            ids, mask = tok.input_ids, tok.attention_mask
        dev = next(self.model.parameters()).device
        hidden = self.model(ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state.float()
        return hidden * mask.to(dev)[..., None].float()


class ImageEncoder:
    """CLIP vision encoder (Wan2.1 I2V): the penultimate layer's hidden states of the 224x224 image."""

    def __init__(self, model, size: int = 224) -> None:
        self.model = model.eval().requires_grad_(False)
        self.size = size

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @classmethod
    def from_pretrained(cls, path: str, *, device=None, dtype=torch.float32, deferred: bool = False) -> "ImageEncoder":
        """Load the CLIP vision tower from a diffusers folder (``image_encoder/``), a transformers model folder,
        or an original Wan2.1 I2V folder (``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``).

        ``deferred``: as in :meth:`TextEncoder.from_pretrained` (meta-device weights and a
        ``model.weight_reader``); the position ids, which no file holds, are created on ``device`` (the CPU by
        default) and move with the module (the residency moves them to the device with the weights).
        """
        from transformers import CLIPVisionModel

        layout, model_path = locate_image_encoder(path)
        if deferred:
            what = f"CLIP vision ({model_path})"
            if layout == "original":
                model = _deferred_original(CLIPVisionModel, model_path, "image encoder",
                                           clip_vision_config_from_original, convert_clip_vision_original,
                                           dtype, device, what)
            else:
                model = _deferred_transformers(CLIPVisionModel, model_path, "image encoder", dtype, device, what)
            return cls(model, int(model.config.image_size))
        if layout == "original":
            state = read_tensors(model_path, stage="image encoder")
            config = clip_vision_config_from_original(state)
            model = _load_into(CLIPVisionModel, config, convert_clip_vision_original(state), dtype,
                               f"CLIP vision ({model_path})")
            del state
            return cls(model.to(device) if device is not None else model, int(config.image_size))
        model = CLIPVisionModel.from_pretrained(model_path, torch_dtype=dtype)
        return cls(model.to(device) if device is not None else model, int(model.config.image_size))

    @classmethod
    def tiny(cls, dim: int = 32, seed: int = 0) -> "ImageEncoder":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(**tiny_clip_config(dim))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPVisionModel(cfg)
        return cls(model, int(cfg.image_size))

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` ``[3, H, W]`` in ``[-1, 1]`` -> float32 ``[1, tokens, dim]``."""
        dev = next(self.model.parameters()).device
        dt = next(self.model.parameters()).dtype
        x = (image[None].float() + 1) / 2
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(dev, dt)
        out = self.model(pixel_values=x, output_hidden_states=True)
        return out.hidden_states[-2].float()


def load_prompt_embeds(path: str, key: str = "prompt_embeds") -> torch.Tensor:
    """Prompt embeddings ``[1, L, dim]`` from a safetensors file (tensor ``prompt_embeds``, ``[L, dim]`` or
    ``[1, L, dim]``), padded with zeros to 512 tokens."""
    if not os.path.isfile(path):
        raise ValueError(f"prompt embeddings file not found: {path}")
    try:
        tensors = read_tensors(path, stage="prompt embeddings")
    except CheckpointError as exc:
        raise ValueError(f"cannot read prompt embeddings {path}: {exc.problem}") from None
    if key not in tensors:
        raise ValueError(f"{path} has no tensor {key!r} (has {sorted(tensors)})")
    emb = tensors[key].float()
    if emb.dim() == 2:
        emb = emb[None]
    if emb.dim() != 3 or emb.shape[0] != 1:
        raise ValueError(f"{key} in {path} must be [L, dim] or [1, L, dim], got {tuple(emb.shape)}")
    if emb.shape[1] < TEXT_LEN:
        emb = F.pad(emb, (0, 0, 0, TEXT_LEN - emb.shape[1]))
    return emb


def save_prompt_embeds(path: str, embeds: torch.Tensor) -> None:
    """Write ``embeds`` as the ``prompt_embeds`` tensor of a safetensors file (see :func:`load_prompt_embeds`)."""
    from safetensors.torch import save_file

    save_file({"prompt_embeds": embeds.detach().float().cpu().contiguous()}, path)
