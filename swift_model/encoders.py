"""Conditioning encoders: the UMT5 text encoder (Wan's prompt embeddings), the CLIP vision encoder (Wan2.1
I2V image tokens), prompt embeddings precomputed into a safetensors file, and tiny random encoders for demos.

Real encoders load with transformers from a diffusers-format checkpoint folder (``text_encoder/`` +
``tokenizer/``, ``image_encoder/``) or from a folder holding the model's own ``config.json``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

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
    def from_pretrained(cls, path: str, *, device=None, dtype=torch.float32) -> "TextEncoder":
        """Load UMT5 (transformers ``UMT5EncoderModel``) and its tokenizer from a checkpoint folder."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        model_dir = _subfolder(path, "text_encoder")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ValueError(
                f"no transformers text encoder in {path} (expected text_encoder/config.json); "
                "pass precomputed prompt embeddings instead (--prompt-embeds FILE.safetensors)")
        model = UMT5EncoderModel.from_pretrained(model_dir, torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(_subfolder(path, "tokenizer"))
        return cls(model.to(device) if device is not None else model, tokenizer)

    @classmethod
    def tiny(cls, dim: int = 32, seed: int = 0) -> "TextEncoder":
        """A random 2-layer UMT5 encoder of width ``dim`` with a byte tokenizer (for demos and tests)."""
        from transformers import UMT5Config, UMT5EncoderModel

        cfg = UMT5Config(vocab_size=258, d_model=dim, d_kv=8, d_ff=2 * dim, num_layers=2, num_heads=max(1, dim // 8),
                         relative_attention_num_buckets=8, relative_attention_max_distance=32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UMT5EncoderModel(cfg)
        return cls(model, ByteTokenizer(258), max_length=TEXT_LEN)

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
    def from_pretrained(cls, path: str, *, device=None, dtype=torch.float32) -> "ImageEncoder":
        from transformers import CLIPVisionModel

        model_dir = _subfolder(path, "image_encoder")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ValueError(f"no CLIP vision encoder in {path} (expected image_encoder/config.json)")
        model = CLIPVisionModel.from_pretrained(model_dir, torch_dtype=dtype)
        return cls(model.to(device) if device is not None else model, int(model.config.image_size))

    @classmethod
    def tiny(cls, dim: int = 32, seed: int = 0) -> "ImageEncoder":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                               num_attention_heads=max(1, dim // 8), image_size=32, patch_size=8)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPVisionModel(cfg)
        return cls(model, 32)

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
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ValueError(f"prompt embeddings file not found: {path}")
    try:
        tensors = load_file(path)
    except Exception as exc:
        raise ValueError(f"cannot read prompt embeddings {path}: {exc}") from None
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
