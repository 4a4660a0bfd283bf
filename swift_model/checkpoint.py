"""Loading Wan DiT checkpoints: diffusers folders, original Wan folders and single files.

Formats understood:

- **diffusers** (``WanTransformer3DModel``): a folder with ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (or shards + ``*.safetensors.index.json``); a pipeline folder whose
  ``transformer/`` subfolder holds them is accepted too.
- **original Wan** (``WanModel``): a folder with ``config.json`` (``dim``, ``num_heads``, ...) and safetensors
  shards, or a single ``.safetensors`` / ``.pth`` file, including single-file exports whose keys carry a
  ``model.diffusion_model.`` (or ``diffusion_model.``) prefix. Without a config the architecture is inferred
  from the tensor shapes (head dim 128, as every public Wan model).

The two key sets are mapped explicitly (:data:`WAN_TO_DIFFUSERS`, :func:`to_diffusers_keys`,
:func:`to_wan_keys`). Note the swapped norms: Wan's ``norm3`` (the affine LayerNorm before the
cross-attention) is diffusers' ``norm2``; Wan's ``norm2`` (before the FFN) has no parameters.

Tensors are read through safetensors' memory map one at a time, straight onto the target device, merged with
any LoRA there and cast to the target dtype, so peak memory is the model itself.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .config import WanDiTConfig

# Module-name rules, original Wan -> diffusers. "{i}" is a block index.
WAN_TO_DIFFUSERS: tuple[tuple[str, str], ...] = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    ("blocks.{i}.self_attn.q", "blocks.{i}.attn1.to_q"),
    ("blocks.{i}.self_attn.k", "blocks.{i}.attn1.to_k"),
    ("blocks.{i}.self_attn.v", "blocks.{i}.attn1.to_v"),
    ("blocks.{i}.self_attn.o", "blocks.{i}.attn1.to_out.0"),
    ("blocks.{i}.self_attn.norm_q", "blocks.{i}.attn1.norm_q"),
    ("blocks.{i}.self_attn.norm_k", "blocks.{i}.attn1.norm_k"),
    ("blocks.{i}.cross_attn.q", "blocks.{i}.attn2.to_q"),
    ("blocks.{i}.cross_attn.k", "blocks.{i}.attn2.to_k"),
    ("blocks.{i}.cross_attn.v", "blocks.{i}.attn2.to_v"),
    ("blocks.{i}.cross_attn.o", "blocks.{i}.attn2.to_out.0"),
    ("blocks.{i}.cross_attn.norm_q", "blocks.{i}.attn2.norm_q"),
    ("blocks.{i}.cross_attn.norm_k", "blocks.{i}.attn2.norm_k"),
    ("blocks.{i}.cross_attn.k_img", "blocks.{i}.attn2.add_k_proj"),
    ("blocks.{i}.cross_attn.v_img", "blocks.{i}.attn2.add_v_proj"),
    ("blocks.{i}.cross_attn.norm_k_img", "blocks.{i}.attn2.norm_added_k"),
    # the swap: Wan's norm3 (affine, before cross-attention) is diffusers' norm2
    ("blocks.{i}.norm3", "blocks.{i}.norm2"),
    ("blocks.{i}.ffn.0", "blocks.{i}.ffn.net.0.proj"),
    ("blocks.{i}.ffn.2", "blocks.{i}.ffn.net.2"),
)

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def _tables():
    top_w2d, top_d2w, blk_w2d, blk_d2w = {}, {}, {}, {}
    for w, d in WAN_TO_DIFFUSERS:
        if w.startswith("blocks.{i}."):
            blk_w2d[w[len("blocks.{i}."):]] = d[len("blocks.{i}."):]
            blk_d2w[d[len("blocks.{i}."):]] = w[len("blocks.{i}."):]
        else:
            top_w2d[w] = d
            top_d2w[d] = w
    return top_w2d, top_d2w, blk_w2d, blk_d2w


_TOP_W2D, _TOP_D2W, _BLK_W2D, _BLK_D2W = _tables()


def _map_module(name: str, top: dict, blk: dict) -> str | None:
    """Map a module path (no parameter suffix) through the rule tables; ``None`` when no rule matches."""
    m = _BLOCK.match(name)
    if m:
        rest = blk.get(m.group(2))
        return None if rest is None else f"blocks.{m.group(1)}.{rest}"
    if name in top:
        return top[name]
    return None


def _map_param(name: str, top: dict, blk: dict) -> str | None:
    # parameters without a ".weight"/".bias" suffix (modulation tables) map as whole names
    whole = _map_module(name, top, blk)
    if whole is not None:
        return whole
    mod, _, leaf = name.rpartition(".")
    if not mod:
        return None
    mapped = _map_module(mod, top, blk)
    return None if mapped is None else f"{mapped}.{leaf}"


def wan_to_diffusers_name(name: str) -> str | None:
    """The diffusers name of an original-Wan parameter (or module) name; ``None`` when unknown."""
    return _map_param(name, _TOP_W2D, _BLK_W2D)


def diffusers_to_wan_name(name: str) -> str | None:
    """The original-Wan name of a diffusers parameter (or module) name; ``None`` when unknown."""
    return _map_param(name, _TOP_D2W, _BLK_D2W)


def _rename_keys(state_dict: dict[str, Any], rename, target: str) -> dict[str, Any]:
    """``state_dict`` with every key renamed by ``rename``; keys it does not know raise one ValueError."""
    out, unknown = {}, []
    for k, v in state_dict.items():
        n = rename(k)
        if n is None:
            unknown.append(k)
        else:
            out[n] = v
    if unknown:
        raise ValueError(f"keys with no {target} name: {_fmt(unknown)}")
    return out


def to_diffusers_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict with original Wan keys renamed to diffusers' (= :class:`WanDiT`'s). Unknown keys raise."""
    return _rename_keys(state_dict, wan_to_diffusers_name, "diffusers")


def to_wan_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict with diffusers' (= :class:`WanDiT`'s) keys renamed to the original Wan ones. Unknown keys raise."""
    return _rename_keys(state_dict, diffusers_to_wan_name, "original-Wan")


def _fmt(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    s = ", ".join(keys[:limit])
    return f"[{s}{', ...' if len(keys) > limit else ''}] ({len(keys)} keys)"


# -------------------------------------------------------------------------------------------------------------
# reading files
# -------------------------------------------------------------------------------------------------------------

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "module.")


class _Source:
    """Tensors of one checkpoint spread over one or more files, read lazily (memory-mapped)."""

    def __init__(self, files: list[Path], device: torch.device) -> None:
        self.files = files
        self.device = device
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._torch: dict[Path, dict] = {}
        for f in files:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    # safetensors memory-maps the file and copies each tensor straight to the device
                    h = safe_open(str(f), framework="pt", device=_st_device(device))
                except Exception as exc:  # noqa: BLE001 - any parse failure is a bad checkpoint
                    raise ValueError(f"cannot read {f.name} as safetensors: {exc}") from exc
                self._handles[f] = h
                keys = list(h.keys())
            else:
                try:
                    sd = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
                except Exception as exc:  # noqa: BLE001
                    raise ValueError(f"cannot read {f.name} as a torch checkpoint: {exc}") from exc
                if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                    sd = sd["state_dict"]
                if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                    raise ValueError(f"{f.name} does not hold a flat dict of tensors")
                self._torch[f] = sd
                keys = list(sd)
            for k in keys:
                self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        f = self._where[key]
        if f in self._handles:
            return tuple(self._handles[f].get_slice(key).get_shape())
        return tuple(self._torch[f][key].shape)

    def get(self, key: str) -> torch.Tensor:
        f = self._where[key]
        if f in self._handles:
            return self._handles[f].get_tensor(key)
        return self._torch[f][key].to(self.device)


def _st_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return str(device)


def _weight_files(folder: Path) -> list[Path]:
    idx = sorted(folder.glob("*.safetensors.index.json"))
    if idx:
        with open(idx[0], encoding="utf-8") as f:
            wm = json.load(f).get("weight_map", {})
        files = sorted({folder / v for v in wm.values()})
        missing = [p.name for p in files if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{idx[0].name} names shards that are not in {folder}: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(p for ext in ("*.pth", "*.pt", "*.bin") for p in folder.glob(ext))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.pth, *.pt, *.bin) in {folder}")
    return files


def _resolve(path) -> tuple[list[Path], dict | None]:
    p = Path(os.fspath(path))
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {p}")
    if p.is_file():
        if p.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
            raise ValueError(f"unknown checkpoint file type {p.suffix!r} (expected .safetensors, .pth, .pt or .bin): {p}")
        cfg = None
        side = p.parent / "config.json"
        if side.exists():
            cfg = _read_json(side)
            if not _is_dit_config(cfg):
                cfg = None
        return [p], cfg
    cfg_path = p / "config.json"
    if not cfg_path.exists() and (p / "transformer" / "config.json").exists():
        p = p / "transformer"  # a diffusers pipeline folder
        cfg_path = p / "config.json"
    cfg = _read_json(cfg_path) if cfg_path.exists() else None
    if cfg is not None and not _is_dit_config(cfg):
        raise ValueError(f"{cfg_path} is not a Wan DiT config (class {cfg.get('_class_name')!r})")
    return _weight_files(p), cfg


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _is_dit_config(cfg: dict) -> bool:
    return "num_attention_heads" in cfg or ("dim" in cfg and "num_heads" in cfg)


def _strip_prefix(keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """Map stored key -> key without the export prefix; keys outside the DiT prefix are returned apart."""
    for pre in _PREFIXES:
        inside = [k for k in keys if k.startswith(pre)]
        if not inside:
            continue
        if pre == "model.diffusion_model." or len(inside) == len(keys):
            others = [k for k in keys if not k.startswith(pre)]
            return {k: k[len(pre):] for k in inside}, others
    return {k: k for k in keys}, []


def detect_format(keys) -> str:
    """``"diffusers"`` or ``"wan"`` from parameter names (without export prefix); raises on neither."""
    keys = list(keys)
    if any(k.startswith("condition_embedder.") or ".attn1." in k or k.startswith("proj_out.") for k in keys):
        return "diffusers"
    if any(k.startswith(("text_embedding.", "time_embedding.", "head.head")) or ".self_attn." in k for k in keys):
        return "wan"
    raise ValueError(
        "unknown checkpoint format: the keys are neither diffusers' WanTransformer3DModel nor the original Wan "
        f"WanModel's; first keys: {_fmt(keys, 8)}"
    )


def infer_config(shapes: dict[str, tuple[int, ...]]) -> WanDiTConfig:
    """A config from the shapes of a diffusers-named state dict (public Wan models use head dim 128)."""
    try:
        dim, in_ch, *patch = shapes["patch_embedding.weight"]
        layers = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK.match(k)))
        ffn = shapes["blocks.0.ffn.net.0.proj.weight"][0]
        out = shapes["proj_out.weight"][0] // math.prod(patch)
        text_dim = shapes["condition_embedder.text_embedder.linear_1.weight"][1]
        freq_dim = shapes["condition_embedder.time_embedder.linear_1.weight"][1]
    except (KeyError, ValueError) as exc:
        raise ValueError(f"cannot infer the architecture from the checkpoint (missing {exc}); pass config=") from exc
    if dim % 128:
        raise ValueError(f"cannot infer the head count of dim {dim} (not a multiple of 128); pass config=")
    img = shapes.get("condition_embedder.image_embedder.norm1.weight")
    kind = "i2v" if in_ch > out else ("ti2v" if in_ch == 48 else "t2v")
    return WanDiTConfig(
        dim=dim, num_layers=layers, num_heads=dim // 128, ffn_dim=ffn, in_channels=in_ch, out_channels=out,
        text_dim=text_dim, freq_dim=freq_dim, patch_size=tuple(patch), image_dim=None if img is None else img[0],
        cross_attn_norm="blocks.0.norm2.weight" in shapes, kind=kind, per_token_timestep=kind == "ti2v",
        name="inferred",
    )


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _open(path, device: torch.device) -> tuple[_Source, dict[str, str], str, dict | None]:
    files, cfg_json = _resolve(path)
    src = _Source(files, device)
    strip, others = _strip_prefix(src.keys())
    fmt = detect_format(strip.values())
    names: dict[str, str] = {}  # internal (diffusers) name -> stored key
    # Keys outside "model.diffusion_model." in a combined single file are other components (VAE, text
    # encoder): not ours to load, so they are skipped rather than reported.
    del others
    unexpected: list[str] = []
    for stored, k in strip.items():
        n = k if fmt == "diffusers" else wan_to_diffusers_name(k)
        if n is None:
            unexpected.append(stored)
        else:
            names[n] = stored
    names["__unexpected__"] = unexpected  # type: ignore[assignment]
    return src, names, fmt, cfg_json


def load_state_dict(
    path, *, device=None, dtype: torch.dtype | None = None, config: WanDiTConfig | None = None
) -> tuple[dict[str, torch.Tensor], WanDiTConfig, str]:
    """Read a checkpoint into a diffusers-named state dict.

    Returns ``(state_dict, config, format)``; tensors on ``device`` (default CPU) in ``dtype`` (default: as
    stored); ``config`` is returned as given, else read from ``config.json``, else inferred from the shapes.
    Keys the mapping does not know are kept under their stored names (a model load reports them).
    """
    device = torch.device(device or "cpu")
    src, names, fmt, cfg_json = _open(path, device)
    unexpected = names.pop("__unexpected__")
    shapes = {n: src.shape(k) for n, k in names.items()}
    cfg = config if config is not None else _config_for(cfg_json, shapes)
    sd = {}
    for n, k in names.items():
        t = src.get(k)
        sd[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    for k in unexpected:
        sd[k] = src.get(k)
    return sd, cfg, fmt


def _config_for(cfg_json: dict | None, shapes: dict[str, tuple[int, ...]]) -> WanDiTConfig:
    if cfg_json is None:
        return infer_config(shapes)
    cfg = WanDiTConfig.from_dict(cfg_json)
    img = shapes.get("condition_embedder.image_embedder.norm1.weight")
    if "num_attention_heads" not in cfg_json:
        # the original Wan config has no image_dim: Wan2.1 I2V (CLIP) and Wan2.2 I2V (no CLIP) share model_type
        cfg = cfg.replace(image_dim=None if img is None else img[0])
    return cfg


def load_dit(
    path,
    *,
    device=None,
    dtype: torch.dtype | None = None,
    lora=None,
    lora_scale: float = 1.0,
    config: WanDiTConfig | None = None,
    extra_in_channels: int = 0,
):
    """Build a :class:`~swift_model.WanDiT` from a checkpoint (see the module docstring for the formats).

    Args:
        path: a folder or a single file.
        device: target device (default: CUDA if available, else CPU); tensors are read straight to it.
        dtype: parameter dtype (default bf16 on CUDA, fp32 on CPU); the timestep MLP, the modulation tables
            and the affine LayerNorms stay fp32.
        lora: a LoRA file path, a state dict, or a list of ``(path_or_state_dict, scale)`` pairs, merged into
            the weights at load time (see :mod:`swift_model.lora`).
        lora_scale: the scale of ``lora`` (when a single one is given).
        config: the architecture, when the checkpoint has no usable ``config.json``; must match the weights.
        extra_in_channels: widen the input by this many channels (Stage II "swift" variant: 48 for
            ``z_ref``); the new patch-embedding input channels, after the checkpoint's, start at zero.

    Raises:
        FileNotFoundError: path or weight files missing.
        TypeError: path, dtype or config of the wrong type.
        ValueError: a bad device, unknown format, missing/unexpected keys (listed), shape mismatches (listed).
    """
    from .dit import WanDiT, keeps_fp32
    from .lora import LoraDeltas

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    try:
        device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must name a torch device, got {device!r}") from exc
    dtype = dtype or _default_dtype(device)
    src, names, fmt, cfg_json = _open(path, device)
    unexpected = list(names.pop("__unexpected__"))
    shapes = {n: src.shape(k) for n, k in names.items()}
    if config is not None:
        if not isinstance(config, WanDiTConfig):
            raise TypeError(f"config must be a WanDiTConfig, got {type(config).__name__}")
        cfg = config
    else:
        cfg = _config_for(cfg_json, shapes)
    if extra_in_channels:
        cfg = cfg.widened_input(extra_in_channels)

    with torch.device("meta"):
        model = WanDiT(cfg)
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(names))
    unexpected += sorted(names[n] for n in set(names) - set(expected))
    bad_shapes = []
    for n in set(expected) & set(names):
        want, got = expected[n], shapes[n]
        if n == "patch_embedding.weight" and cfg.extra_in_channels and got[1] == want[1] - cfg.extra_in_channels \
                and got[:1] + got[2:] == want[:1] + want[2:]:
            continue  # widened below
        if want != got:
            bad_shapes.append(f"{names[n]}: checkpoint {list(got)} vs model {list(want)}")
    if missing or unexpected or bad_shapes:
        parts = [f"checkpoint {os.fspath(path)!s} ({fmt} format) does not match the model ({cfg.name})"]
        if missing:
            parts.append(f"missing keys: {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt(unexpected)}")
        if bad_shapes:
            parts.append(f"shape mismatches: {_fmt(bad_shapes)}")
        raise ValueError("; ".join(parts))

    deltas = LoraDeltas.build(lora, lora_scale, expected, device) if lora is not None else None
    sd = {}
    for n in expected:
        t = src.get(names[n])
        if n == "patch_embedding.weight" and t.shape[1] != expected[n][1]:
            pad = t.new_zeros(t.shape[0], expected[n][1] - t.shape[1], *t.shape[2:])
            t = torch.cat((t, pad), dim=1)  # the extra channels (z_ref) start switched off
        if deltas is not None:
            t = deltas.apply(n, t)
        sd[n] = t.to(torch.float32 if keeps_fp32(n) else dtype)
    if deltas is not None:
        deltas.check_all_used()
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def save_dit(model, folder, *, format: str = "diffusers", max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as a checkpoint folder (``config.json`` + safetensors, sharded when
    ``max_shard_bytes`` is given) in diffusers' or the original Wan's key names."""
    from safetensors.torch import save_file

    if format not in ("diffusers", "wan"):
        raise ValueError(f"format must be 'diffusers' or 'wan', got {format!r}")
    folder = Path(os.fspath(folder))
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if format == "wan":
        sd = to_wan_keys(sd)
        cfg = model.config.to_wan()
        stem = "diffusion_pytorch_model"
    else:
        cfg = model.config.to_diffusers()
        stem = "diffusion_pytorch_model"
    with open(folder / "config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    if max_shard_bytes is None:
        save_file(sd, str(folder / f"{stem}.safetensors"))
        return folder
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        nb = v.numel() * v.element_size()
        if cur and size + nb > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nb
    shards.append(cur)
    wm = {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name))
        wm.update({k: name for k in shard})
    with open(folder / f"{stem}.safetensors.index.json", "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f, indent=2)
    return folder


def iter_checkpoint(path) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(diffusers name, shape) of each tensor of a checkpoint, without reading any data."""
    src, names, _, _ = _open(path, torch.device("cpu"))
    names.pop("__unexpected__")
    for n, k in names.items():
        yield n, src.shape(k)
