"""Loading Wan DiT checkpoints (loading layer): diffusers folders, original Wan folders and single files.

Formats understood:

- **diffusers** (``WanTransformer3DModel``): a folder with ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (or shards + ``*.safetensors.index.json``); a pipeline folder whose
  ``transformer/`` subfolder holds them is accepted too. The 40 ``blocks.{i}.attn2.norm_added_q.weight``
  tensors of the official Wan2.1-I2V-14B diffusers checkpoint, which no model uses, are skipped (as
  diffusers skips them) and counted in one log line.
- **original Wan** (``WanModel``): a folder with ``config.json`` (``dim``, ``num_heads``, ...) and safetensors
  shards, or a single ``.safetensors`` / ``.pth`` file, including single-file exports whose keys carry a
  ``model.diffusion_model.`` (or ``diffusion_model.``) prefix. Without a config the architecture is inferred
  from the tensor shapes (head dim 128, as every public Wan model).

Two steps, so that a caller can decide before any weight is read:

1. :func:`inspect_dit` reads the config and the files' headers only (names, shapes, dtypes; no tensor
   data) and checks them against the model the config describes: every problem a load would meet in the
   files' structure is found here. Its :class:`DiTCheckpoint` gives the config and a meta-device model.
2. :func:`load_dit` reads each tensor once through safetensors' memory map, straight onto the target device,
   widens the patch embedding when asked, merges any LoRA there and casts to the target dtype, so the peak
   is the model itself. It also backs :meth:`WanDiT.from_pretrained <swift_model.WanDiT.from_pretrained>`.
   With ``blocks_from_files=True`` it reads everything but the transformer blocks, which a
   :class:`~swift_model.loading.block_source.FileBlockSource` then reads from the files on each use.

Every error names the file, the ``stage`` label given by the caller (``"stage1"``/``"stage2"``;
``"checkpoint"`` otherwise) and the key or field (:class:`~swift_model.io.files.CheckpointError`). Tensors of an
integer or unknown dtype are refused, never cast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..nets.config import ConfigFieldError, WanDiTConfig
from ..nets.dit import WanDiT, keeps_fp32, register_pretrained_loader
from ..io.files import (DEFAULT_STAGE, WEIGHT_SUFFIXES, CheckpointError, CheckpointNotFoundError, TensorFiles,
                    read_json, weight_files)
from ..io.keys import (WAN_TO_DIFFUSERS, block_index, detect_format, diffusers_to_wan_name, format_keys,
                   is_legacy_unused_key, strip_export_prefix, to_diffusers_keys, to_wan_keys, wan_to_diffusers_name)
from .block_source import FileBlockSource, split_block_deltas
from .experts import check_one_dit
from .lora import LoraDeltas

__all__ = [
    "DiTCheckpoint", "WAN_TO_DIFFUSERS", "detect_format", "diffusers_to_wan_name", "infer_config", "inspect_dit",
    "iter_checkpoint", "load_dit", "load_state_dict", "read_dit_config", "save_dit", "to_diffusers_keys",
    "to_wan_keys", "wan_to_diffusers_name",
]

_log = logging.getLogger(__name__)

# dtypes a DiT weight may be stored in; anything else (integers, bool, fp8 without its scales) is refused
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class DiTCheckpoint:
    """What a DiT checkpoint holds, read from its config and headers only (:func:`inspect_dit`).

    Attributes:
        path: the path as given (a folder, a pipeline folder or a file).
        stage: the label errors carry.
        format: ``"diffusers"`` or ``"wan"`` (key naming).
        config: the architecture as stored (from ``config.json``, the ``config=`` given, or inferred).
        files: the weight files.
        config_file: the ``config.json`` read, if any.
        names: model (diffusers) parameter name -> key as stored.
        shapes / dtypes: per model parameter name, as stored.
        skipped: stored keys skipped because no Wan model uses them (diffusers' legacy ``norm_added_q``).
    """

    path: Path
    stage: str
    format: str
    config: WanDiTConfig
    files: tuple[Path, ...]
    config_file: Path | None
    names: dict[str, str] = field(repr=False)
    shapes: dict[str, tuple[int, ...]] = field(repr=False)
    dtypes: dict[str, torch.dtype] = field(repr=False)
    skipped: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes of the model's tensors as stored."""
        return sum(math.prod(s) * self.dtypes[n].itemsize for n, s in self.shapes.items())

    def model_config(self, extra_in_channels: int = 0) -> WanDiTConfig:
        """The config of the model a load with ``extra_in_channels`` builds (the Stage II "swift" widening)."""
        return self.config.widened_input(extra_in_channels) if extra_in_channels else self.config

    def meta_model(self, *, extra_in_channels: int = 0, dtype: torch.dtype | None = None, model_cls=None) -> WanDiT:
        """The model on the meta device (no memory, no data), in ``dtype`` with the fp32 parts kept fp32 as a
        load would make them: for planning memory and FLOPs without weights."""
        with torch.device("meta"):
            model = (model_cls or WanDiT)(self.model_config(extra_in_channels))
        if dtype is not None:
            model.to_dtype(dtype)
        return model.eval().requires_grad_(False)


# -------------------------------------------------------------------------------------------------------------
# finding and scanning the files (no tensor data)
# -------------------------------------------------------------------------------------------------------------


def _is_dit_config(cfg: dict) -> bool:
    return "num_attention_heads" in cfg or ("dim" in cfg and "num_heads" in cfg)


def _resolve(path, stage: str):
    """``(folder or file, weight files, config dict, config path, index weight map, index path)`` of a DiT
    checkpoint path (the last four may be ``None``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(os.fspath(path))
    if not p.exists():
        raise CheckpointNotFoundError("checkpoint path does not exist", file=p, stage=stage)
    if p.is_file():
        if p.suffix not in WEIGHT_SUFFIXES:
            raise CheckpointError(f"unknown checkpoint file type {p.suffix!r} (expected "
                                  f"{', '.join(WEIGHT_SUFFIXES)})", file=p, stage=stage)
        side = p.parent / "config.json"
        if side.is_file():
            cfg = read_json(side, stage=stage)
            if _is_dit_config(cfg):  # a sidecar config of another component is not ours
                return p, [p], cfg, side, None, None
        return p, [p], None, None, None, None
    if not (p / "config.json").exists():
        check_one_dit(p, stage=stage)  # a two-expert folder is never half-loaded as its transformer/ alone
    if not (p / "config.json").exists() and (p / "transformer" / "config.json").exists():
        p = p / "transformer"  # a diffusers pipeline folder
    cfg_path = p / "config.json"
    cfg = read_json(cfg_path, stage=stage) if cfg_path.exists() else None
    if cfg is not None and not _is_dit_config(cfg):
        raise CheckpointError(f"not a Wan DiT config (class {cfg.get('_class_name')!r})", file=cfg_path, stage=stage)
    files, index_map, index = weight_files(p, stage=stage)
    return p, files, cfg, (cfg_path if cfg is not None else None), index_map, index


@dataclass
class _Scan:
    root: Path
    files: list[Path]
    cfg_json: dict | None
    cfg_file: Path | None
    src: TensorFiles
    format: str
    names: dict[str, str]      # model name -> stored key
    unexpected: list[str]      # stored keys no name rule knows
    skipped: list[str]         # stored legacy keys no model uses


def _scan(path, stage: str, *, device=None, meta: bool = True) -> _Scan:
    root, files, cfg_json, cfg_file, index_map, index_file = _resolve(path, stage)
    src = TensorFiles(files, stage=stage, device=device, meta=meta)
    if index_map is not None:
        for k, shard in index_map.items():
            if k not in src or src.file_of(k).name != shard:
                raise CheckpointError(f"the index places it in {shard}, which does not hold it", file=index_file,
                                      stage=stage, key=k)
    strip, _others = strip_export_prefix(src.keys())
    # Keys outside "model.diffusion_model." in a combined single file are other components (VAE, text
    # encoder): not ours to load, so they are skipped rather than reported.
    try:
        fmt = detect_format(strip.values())
    except ValueError as exc:
        raise CheckpointError(str(exc), file=root, stage=stage) from None
    names, unexpected, skipped = {}, [], []
    for stored, k in strip.items():
        n = k if fmt == "diffusers" else wan_to_diffusers_name(k)
        if n is None:
            unexpected.append(stored)
        elif is_legacy_unused_key(n):
            skipped.append(stored)
        else:
            names[n] = stored
    return _Scan(root, files, cfg_json, cfg_file, src, fmt, names, unexpected, skipped)


def infer_config(shapes: dict[str, tuple[int, ...]]) -> WanDiTConfig:
    """A config from the shapes of a diffusers-named state dict (public Wan models use head dim 128)."""
    try:
        dim, in_ch, *patch = shapes["patch_embedding.weight"]
        layers = 1 + max(i for k in shapes if (i := block_index(k)) is not None)
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


def _config_for(scan: _Scan, shapes: dict[str, tuple[int, ...]], stage: str) -> WanDiTConfig:
    if scan.cfg_json is None:
        try:
            return infer_config(shapes)
        except ValueError as exc:
            raise CheckpointError(f"no config.json, and {exc}", file=scan.root, stage=stage) from None
    try:
        cfg = WanDiTConfig.from_dict(scan.cfg_json)
    except ConfigFieldError as exc:
        key = f"field {exc.field!r}" if exc.field else None
        raise CheckpointError(exc.problem, file=scan.cfg_file, stage=stage, key=key) from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(str(exc), file=scan.cfg_file, stage=stage) from None
    if "num_attention_heads" not in scan.cfg_json:
        # the original Wan config has no image_dim: Wan2.1 I2V (CLIP) and Wan2.2 I2V (no CLIP) share model_type
        img = shapes.get("condition_embedder.image_embedder.norm1.weight")
        cfg = cfg.replace(image_dim=None if img is None else img[0])
    return cfg


def _check_dtypes(scan: _Scan, stage: str) -> dict[str, torch.dtype]:
    dtypes = {}
    for n, stored in scan.names.items():
        dt = scan.src.dtype(stored)
        if dt not in FLOAT_DTYPES:
            raise CheckpointError(f"dtype {dt} is not a floating-point weight dtype (float16, bfloat16, float32, "
                                  "float64); refusing to convert it", file=scan.src.file_of(stored), stage=stage,
                                  key=stored)
        dtypes[n] = dt
    return dtypes


def _match(info: DiTCheckpoint, cfg: WanDiTConfig, unexpected=()) -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected or mis-shaped tensor of ``info``
    against the model ``cfg`` describes (a narrower patch embedding is fine when ``cfg`` widens it)."""
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in WanDiT(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(info.names))
    unexpected = sorted([*unexpected, *(info.names[n] for n in set(info.names) - set(expected))])
    bad_shapes = []
    for n in set(expected) & set(info.names):
        want, got = expected[n], info.shapes[n]
        if n == "patch_embedding.weight" and cfg.extra_in_channels and got[1] == want[1] - cfg.extra_in_channels \
                and got[:1] + got[2:] == want[:1] + want[2:]:
            continue  # widened at load time
        if want != got:
            bad_shapes.append(f"{info.names[n]}: checkpoint {list(got)} vs model {list(want)}")
    if missing or unexpected or bad_shapes:
        parts = [f"{info.format}-format checkpoint does not match the model ({cfg.name})"]
        if missing:
            parts.append(f"missing keys: {format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {format_keys(unexpected)}")
        if bad_shapes:
            parts.append(f"shape mismatches: {format_keys(bad_shapes)}")
        raise CheckpointError("; ".join(parts), file=info.path, stage=info.stage)


def inspect_dit(path, *, stage: str | None = None, config: WanDiTConfig | None = None) -> DiTCheckpoint:
    """Read a DiT checkpoint's config and headers only, and check them against the model they describe.

    Reads ``config.json``, an index if any, and the tensor names, shapes and dtypes (safetensors headers;
    ``.pth`` files are unpickled onto the meta device): no tensor data. Finds every problem a load would meet
    in the files' structure: unreadable or non-UTF-8 JSON, a config field of the wrong type, truncated files,
    missing shards, non-float dtypes, missing/unexpected keys, shape mismatches. Skips (and logs the count
    of) diffusers' legacy ``norm_added_q`` tensors.

    Args:
        path: a folder, a diffusers pipeline folder (``transformer/``) or a single weight file.
        stage: label for errors (``"stage1"``, ``"stage2"``; default ``"checkpoint"``).
        config: the architecture, for a checkpoint without a usable ``config.json`` (must fit the weights).

    Returns a :class:`DiTCheckpoint`; raises :class:`~swift_model.io.files.CheckpointError` (a ``ValueError``),
    ``CheckpointNotFoundError`` (a ``FileNotFoundError``) or ``TypeError``.
    """
    stage = stage or DEFAULT_STAGE
    if config is not None and not isinstance(config, WanDiTConfig):
        raise TypeError(f"config must be a WanDiTConfig, got {type(config).__name__}")
    scan = _scan(path, stage)
    dtypes = _check_dtypes(scan, stage)
    shapes = {n: scan.src.shape(k) for n, k in scan.names.items()}
    cfg = config if config is not None else _config_for(scan, shapes, stage)
    info = DiTCheckpoint(path=Path(os.fspath(path)), stage=stage, format=scan.format, config=cfg,
                         files=tuple(scan.files), config_file=scan.cfg_file, names=scan.names, shapes=shapes,
                         dtypes=dtypes, skipped=tuple(scan.skipped))
    _match(info, cfg, scan.unexpected)
    if scan.skipped:
        _log.info("%s: %s: skipped %d tensors that no Wan model uses (%s, as diffusers skips them)", stage,
                  info.path, len(scan.skipped), "blocks.{i}.attn2.norm_added_q")
    return info


def read_dit_config(path, *, stage: str | None = None, extra_in_channels: int = 0) -> WanDiTConfig:
    """The config of the model a checkpoint loads into (widened by ``extra_in_channels``), from its config
    and headers only (see :func:`inspect_dit`); build it on the meta device with ``WanDiT(config)`` under
    ``torch.device("meta")`` or :meth:`DiTCheckpoint.meta_model`."""
    return inspect_dit(path, stage=stage).model_config(extra_in_channels)


# -------------------------------------------------------------------------------------------------------------
# loading
# -------------------------------------------------------------------------------------------------------------


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_dit(
    path,
    *,
    device=None,
    dtype: torch.dtype | None = None,
    lora=None,
    lora_scale: float = 1.0,
    config: WanDiTConfig | None = None,
    extra_in_channels: int = 0,
    stage: str | None = None,
    model_cls=None,
    progress: bool = False,
    blocks_from_files: bool = False,
):
    """Build a :class:`~swift_model.WanDiT` from a checkpoint (see the module docstring for the formats).

    Args:
        path: a folder or a single file, or the :class:`DiTCheckpoint` of an earlier :func:`inspect_dit`
            (then the files are not inspected again, and its stage label is used unless ``stage`` is given).
        device: target device (default: CUDA if available, else CPU); tensors are read straight to it.
        dtype: parameter dtype (default bf16 on CUDA, fp32 on CPU); the timestep MLP, the modulation tables
            and the affine LayerNorms stay fp32.
        lora: a LoRA file path, a state dict, or a list of ``(path_or_state_dict, scale)`` pairs, merged into
            the weights at load time (see :mod:`swift_model.loading.lora`).
        lora_scale: the scale of ``lora`` (when a single one is given).
        config: the architecture, when the checkpoint has no usable ``config.json``; must match the weights.
        extra_in_channels: widen the input by this many channels (Stage II "swift" variant: 48 for
            ``z_ref``); the new patch-embedding input channels, after the checkpoint's, start at zero. The
            checkpoint is read once: decide the widening from :func:`inspect_dit`'s config, before loading.
        stage: label for errors (``"stage1"``, ``"stage2"``; default ``"checkpoint"``).
        model_cls: the class to build (default :class:`WanDiT`; :meth:`WanDiT.from_pretrained` passes its own).
        progress: show a progress bar over the tensors.
        blocks_from_files: read no tensor of the transformer blocks (``blocks.*``): everything else is loaded
            as above, while the block parameters stay on the meta device (in the target dtype, fp32 where
            kept fp32) and ``model.block_source`` is a :class:`~swift_model.loading.block_source.FileBlockSource`
            that reads a block from the files into given buffers and merges its LoRA deltas on the device,
            each time the block is used. The blocks then never occupy host memory of ours: what a pass over
            them reads lives in the files' memory-mapped pages, the OS page cache's to keep or drop. The LoRA
            is parsed and checked against the whole model now; its non-block deltas must all apply at load,
            and its block deltas are checked to name block parameters the files store (they apply when each
            block is finished).

    Raises:
        CheckpointNotFoundError (a FileNotFoundError): path or weight files missing.
        TypeError: path, dtype or config of the wrong type.
        CheckpointError (a ValueError): unreadable files, unknown format, non-float tensors, missing/unexpected
            keys (listed), shape mismatches (listed), a LoRA that does not fit; ValueError: a bad device.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    try:
        device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must name a torch device, got {device!r}") from exc
    dtype = dtype or _default_dtype(device)
    if isinstance(path, DiTCheckpoint):
        info = path if stage is None else dataclasses.replace(path, stage=stage)
        if config is not None and config != info.config:
            _match(info, config)
            info = dataclasses.replace(info, config=config)
    else:
        info = inspect_dit(path, stage=stage, config=config)
    stage = info.stage
    cfg = info.model_config(extra_in_channels)
    if extra_in_channels:
        _match(info, cfg)

    model_cls = model_cls or WanDiT
    with torch.device("meta"):
        model = model_cls(cfg)
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    deltas = LoraDeltas.build(lora, lora_scale, expected, device, stage=stage) if lora is not None else None
    src = TensorFiles(info.files, stage=stage, device=device)
    source = None
    if blocks_from_files:
        block_deltas = None
        if deltas is not None:
            deltas, block_deltas = split_block_deltas(deltas)
        # the same TensorFiles (opened with data) serves the blocks' mapped reads later
        source = FileBlockSource(src, info.names, cfg.num_layers, lora=block_deltas, stage=stage)
        expected = {n: s for n, s in expected.items() if block_index(n) is None}
    names = expected
    if progress:
        from tqdm.auto import tqdm

        names = tqdm(expected, desc=f"loading {stage}", unit="tensor")
    sd = {}
    for n in names:
        t = src.get(info.names[n])
        if n == "patch_embedding.weight" and t.shape[1] != expected[n][1]:
            pad = t.new_zeros(t.shape[0], expected[n][1] - t.shape[1], *t.shape[2:])
            t = torch.cat((t, pad), dim=1)  # the extra channels (z_ref) start switched off
        if deltas is not None:
            t = deltas.apply(n, t)
        sd[n] = t.to(torch.float32 if keeps_fp32(n) else dtype)
    if deltas is not None:
        deltas.check_all_used()
    if source is None:
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval().requires_grad_(False)
    missing, _unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if any(block_index(n) is None for n in missing):  # only the blocks may be left out
        raise CheckpointError(f"non-block parameters left unloaded: {format_keys(missing)}", file=info.path,
                              stage=stage)
    _cast_meta_blocks(model, dtype)
    model.block_source = source
    return model.eval().requires_grad_(False)


def _cast_meta_blocks(model, dtype: torch.dtype) -> None:
    """Give the (meta, unloaded) block parameters the dtypes a full load gives them."""
    for name, p in model.blocks.named_parameters(prefix="blocks"):
        target = torch.float32 if keeps_fp32(name) else dtype
        if p.dtype != target:
            p.data = p.data.to(target)


# The loader behind WanDiT.from_pretrained (see swift_model.nets.dit: the module layer does not import this one).
register_pretrained_loader(load_dit)


def load_state_dict(
    path, *, device=None, dtype: torch.dtype | None = None, config: WanDiTConfig | None = None,
    stage: str | None = None,
) -> tuple[dict[str, torch.Tensor], WanDiTConfig, str]:
    """Read a checkpoint into a diffusers-named state dict, without building a model.

    Returns ``(state_dict, config, format)``; tensors on ``device`` (default CPU) in ``dtype`` (default: as
    stored); ``config`` is returned as given, else read from ``config.json``, else inferred from the shapes.
    Keys the mapping does not know are kept under their stored names; diffusers' legacy ``norm_added_q``
    tensors are left out. Non-float tensors of the DiT are refused as by :func:`load_dit`.
    """
    stage = stage or DEFAULT_STAGE
    scan = _scan(path, stage, device=torch.device(device or "cpu"), meta=False)
    _check_dtypes(scan, stage)
    shapes = {n: scan.src.shape(k) for n, k in scan.names.items()}
    cfg = config if config is not None else _config_for(scan, shapes, stage)
    sd = {}
    for n, k in scan.names.items():
        t = scan.src.get(k)
        sd[n] = t.to(dtype) if dtype is not None else t
    for k in scan.unexpected:
        sd[k] = scan.src.get(k)
    return sd, cfg, scan.format


def iter_checkpoint(path, *, stage: str | None = None) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(diffusers name, shape) of each tensor of a checkpoint, without reading any data."""
    scan = _scan(path, stage or DEFAULT_STAGE)
    for n, k in scan.names.items():
        yield n, scan.src.shape(k)


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
