"""Low-rank adapters (LoRA) and weight deltas merged into a Wan DiT's weights (loading layer).

Formats understood (keys may carry any export prefix of :data:`swift_model.io.keys.PREFIXES`:
``diffusion_model.`` (LightX2V, Kijai), ``model.diffusion_model.``, ``transformer.``, PEFT's
``base_model.model.``, kohya's ``lora_unet_`` / ``lora_transformer_``):

- **kohya-style factors**, original-Wan or diffusers module names (the LightX2V / CausVid step-distillation
  LoRAs): ``blocks.0.self_attn.q.lora_down.weight``, ``...lora_up.weight``, optional ``...alpha``;
- **diffusers / PEFT factors**: ``blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B.weight``, also with PEFT's
  ``.default`` adapter name (``lora_A.default.weight``), optional ``lora_B.bias`` (a bias delta); PEFT keeps
  alpha in ``adapter_config.json``, not in the file: pass it as ``alpha=``;
- **kohya flattened names**: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` (+ ``.alpha``);
- **full deltas**: ``<module>.diff`` (added to the weight, or to a whole parameter such as
  ``head.modulation``), ``<module>.diff_b`` (added to the bias) and ``<module>.diff_m`` (added to the
  module's ``modulation`` table: ``blocks.3.diff_m`` -> ``blocks.3.modulation``, diffusers'
  ``blocks.3.scale_shift_table``). The meaning of ``diff_m`` is LightX2V's: its LoRA format table
  ("Modulation Diff | diff_m | modulation weight difference values", docs/EN/source/deploy_guides/
  lora_deploy.md) and its merger (tools/extract/lora_merger.py, ``_find_source_key_from_diff`` replaces the
  ``.diff_m`` suffix by ``.modulation`` and adds ``strength * diff``), in github.com/ModelTC/LightX2V.

The merge is ``W + scale * (alpha / rank) * up @ down`` (rank = rows of ``down``; alpha defaults to the rank,
i.e. factor 1) and ``W + scale * diff``, computed in fp32 on the target device before the weight is cast.

Keys naming a Wan DiT module the model does not have (a Wan2.1 I2V LoRA's ``k_img``/``v_img``/``norm_k_img``
on a Wan2.2 model) are skipped with one :class:`LoraKeysSkippedWarning` listing them. Keys that name no Wan
module at all, factors that do not fit their weight, or a LoRA of which nothing applies raise
:class:`~swift_model.io.files.CheckpointError` naming the file, the stage and the keys.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from typing import Any

import torch

from ..io.files import CheckpointError, CheckpointNotFoundError, TensorFiles
from ..io.keys import format_keys, strip_prefixes, to_model_name, unflatten_module

# (suffix, role); longer suffixes first
_SUFFIXES = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_B.default.bias", "diff_b"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "diff_b"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff_m", "diff_m"),
    (".diff", "diff"),
)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STATE_DICT = "<state dict>"


class LoraKeysSkippedWarning(UserWarning):
    """A LoRA carries tensors for modules the model does not have; they were not merged."""


def read_lora(source, *, stage: str | None = None, meta: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a LoRA and a label for messages: ``(tensors, file path or "<state dict>")``.

    ``source``: a ``.safetensors`` / torch file path, or a dict passed through. ``meta``: shapes and dtypes
    only (no data read), for checks before loading.
    """
    if isinstance(source, dict):
        return source, _STATE_DICT
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a LoRA must be a path or a state dict, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError("LoRA file not found", file=path, stage=stage)
    src = TensorFiles([path], stage=stage, meta=meta)
    return {k: src.get(k) for k in src.keys()}, path


def load_lora(source, *, stage: str | None = None) -> dict[str, torch.Tensor]:
    """The raw tensors of a LoRA file (``.safetensors`` or a torch checkpoint), or a dict passed through."""
    return read_lora(source, stage=stage)[0]


def _split(key: str) -> tuple[str, str] | None:
    """``(module, role)`` of a LoRA key without its export prefix; ``None`` for an unknown suffix."""
    k = strip_prefixes(key)
    for suf, role in _SUFFIXES:
        if k.endswith(suf):
            return k[: -len(suf)], role
    return None


def _resolve(mod: str, modules: set[str]) -> tuple[str | None, bool]:
    """``(model name, known)`` of a LoRA module name in any naming. ``known`` says whether it is a Wan DiT
    module at all; the name is ``None`` when it is not, and may be absent from ``modules`` when it is."""
    if mod in modules:
        return mod, True
    named = to_model_name(mod)
    if named is None and "." not in mod:  # kohya's flattened names carry no dots
        dotted = unflatten_module(mod)
        named = None if dotted is None else to_model_name(dotted)
    return named, named is not None


def parse_lora(sd: dict[str, Any], params: dict[str, tuple[int, ...]], *, source: str = _STATE_DICT,
               stage: str | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group a LoRA state dict by the model module (or whole parameter) it targets.

    Returns ``({target: {role: tensor}}, skipped keys)`` with roles ``down``, ``up``, ``alpha``, ``diff``,
    ``diff_b``; ``diff_m`` deltas are returned as the ``diff`` of the modulation table they target. Skipped
    keys name Wan modules this model does not have. Raises :class:`CheckpointError` for keys of an unknown
    format, keys naming no Wan module, non-float tensors, unpaired factors.
    """
    modules = {n.rpartition(".")[0] for n in params} | set(params)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown_suffix, unknown_module, skipped = [], [], []

    def fail(problem: str, key: str | None = None):
        return CheckpointError(problem, file=source, stage=stage, key=key)

    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise fail("entry is not a tensor", key)
        split = _split(key)
        if split is None:
            if key.endswith(("dora_scale", "lora_magnitude_vector")) or ".lora_magnitude_vector." in key:
                raise fail("DoRA adapters are not supported", key)
            unknown_suffix.append(key)
            continue
        mod, role = split
        if role != "alpha" and t.dtype not in _FLOATS:
            raise fail(f"dtype {t.dtype} is not a floating-point dtype; refusing to convert it", key)
        if role == "diff_m":  # "<module>.diff_m" is the delta of "<module>.modulation" (see the module docstring)
            mod, role = (f"{mod}.modulation" if mod else "modulation"), "diff"
        target, known = _resolve(mod, modules)
        if not known:
            unknown_module.append(key)
            continue
        if target not in modules:
            skipped.append(key)
            continue
        if role in groups[target]:
            raise fail(f"a second {role!r} tensor for {target}", key)
        groups[target][role] = t
    if unknown_suffix:
        raise fail(f"LoRA keys of an unknown format: {format_keys(unknown_suffix)}")
    if unknown_module:
        raise fail(f"LoRA keys that target no parameter of a Wan DiT: {format_keys(unknown_module)}")
    for mod, g in groups.items():
        if ("down" in g) != ("up" in g):
            raise fail(f"LoRA for {mod} has {'lora_down/A' if 'down' in g else 'lora_up/B'} without its pair")
        if "alpha" in g and "down" not in g:
            raise fail(f"LoRA for {mod} has an alpha but no factors")
    if not groups:
        if skipped:
            raise fail(f"LoRA keys that target no parameter of this model: {format_keys(skipped)}")
        raise fail("the LoRA holds no tensors")
    return dict(groups), skipped


class LoraDeltas:
    """Per-parameter weight deltas of one or more LoRAs, applied while a checkpoint loads."""

    def __init__(self, params: dict[str, tuple[int, ...]], device: torch.device, stage: str | None = None) -> None:
        self.params = params
        self.device = device
        self.stage = stage
        self.entries: dict[str, list[tuple[str, dict[str, torch.Tensor], float]]] = defaultdict(list)
        self.used: set[str] = set()

    @classmethod
    def build(cls, lora, scale: float, params: dict[str, tuple[int, ...]], device, alpha: float | None = None, *,
              stage: str | None = None, meta: bool = False) -> "LoraDeltas":
        """``lora``: a path, a state dict, or a list of ``(path_or_dict, scale)`` pairs. ``meta``: read only
        the files' headers (checks shapes and names without reading data; nothing can be applied)."""
        out = cls(params, torch.device(device), stage)
        items = lora if isinstance(lora, (list, tuple)) else [(lora, scale)]
        for item in items:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise TypeError("lora must be a path, a state dict, or a list of (path_or_state_dict, scale) pairs")
            src, s = item
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise TypeError(f"lora scale must be a number, got {type(s).__name__}")
            sd, label = read_lora(src, stage=stage, meta=meta)
            groups, skipped = parse_lora(sd, params, source=label, stage=stage)
            if skipped:
                warnings.warn(f"{stage or 'checkpoint'}: LoRA {label}: skipped {len(skipped)} tensors for modules "
                              f"this model does not have: {format_keys(skipped)}", LoraKeysSkippedWarning,
                              stacklevel=3)
            for mod, g in groups.items():
                if alpha is not None and "alpha" not in g:
                    g = dict(g, alpha=torch.tensor(float(alpha)))
                out._add(mod, g, float(s), label)
        return out

    def _add(self, mod: str, g: dict[str, torch.Tensor], s: float, label: str) -> None:
        def fail(problem: str):
            return CheckpointError(problem, file=label, stage=self.stage, key=mod)

        if "down" in g or "diff" in g:
            wname = mod if mod in self.params else f"{mod}.weight"
            if wname not in self.params:
                raise fail("the LoRA targets a module with no weight in this model")
            want = self.params[wname]
            if "down" in g:
                down, up = g["down"], g["up"]
                if down.dim() < 2 or up.dim() < 2 or down.shape[0] != up.shape[1] or up.shape[0] != want[0] \
                        or down[0].numel() != _prod(want[1:]):
                    raise fail(f"LoRA factors do not fit the weight {list(want)}: "
                               f"down {list(down.shape)}, up {list(up.shape)}")
            if "diff" in g and tuple(g["diff"].shape) != want:
                raise fail(f"LoRA diff has shape {list(g['diff'].shape)}, the weight is {list(want)}")
            self.entries[wname].append(("weight", g, s))
        if "diff_b" in g:
            bname = f"{mod}.bias"
            if bname not in self.params or tuple(g["diff_b"].shape) != self.params[bname]:
                raise fail(f"LoRA bias delta of shape {list(g['diff_b'].shape)} does not fit the model")
            self.entries[bname].append(("bias", g, s))

    def apply(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """``w`` plus every delta aimed at parameter ``name`` (fp32 math; returns fp32 when changed)."""
        ents = self.entries.get(name)
        if not ents:
            return w
        self.used.add(name)
        out = w.to(self.device, torch.float32)
        for kind, g, s in ents:
            if kind == "bias":
                out = out + s * g["diff_b"].to(self.device, torch.float32)
                continue
            if "down" in g:
                down = g["down"].to(self.device, torch.float32).flatten(1)
                up = g["up"].to(self.device, torch.float32).flatten(1)
                rank = down.shape[0]
                alpha = float(g["alpha"]) if "alpha" in g else float(rank)
                out = out + (s * alpha / rank) * (up @ down).reshape(out.shape)
            if "diff" in g:
                out = out + s * g["diff"].to(self.device, torch.float32)
        return out

    def check_all_used(self) -> None:
        left = set(self.entries) - self.used
        if left:
            raise RuntimeError(f"LoRA deltas were never applied: {format_keys(left)}")


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def check_lora(lora, params: dict[str, tuple[int, ...]], *, stage: str | None = None) -> None:
    """Check, from the files' headers only, that ``lora`` (as for :func:`merge_lora`) parses and fits a model
    with parameters ``params`` (name -> shape); raises as loading would, reads no tensor data."""
    LoraDeltas.build(lora, 1.0, params, "meta", stage=stage, meta=True)


@torch.no_grad()
def merge_lora(model, lora, scale: float = 1.0, *, alpha: float | None = None, stage: str | None = None):
    """Merge ``lora`` (path, state dict, or list of ``(source, scale)``) into ``model``'s weights in place.

    The same merge as loading with ``WanDiT.from_pretrained(..., lora=..., lora_scale=...)``, for a model
    already in memory. ``alpha`` supplies the LoRA alpha when the file has none (PEFT adapters). Returns
    the model.
    """
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    deltas = LoraDeltas.build(lora, scale, params, next(model.parameters()).device, alpha=alpha, stage=stage)
    for n, p in model.named_parameters():
        if n in deltas.entries:
            p.copy_(deltas.apply(n, p).to(p.dtype))
    return model
