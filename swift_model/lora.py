"""Low-rank adapters (LoRA) merged into a Wan DiT's weights at load time.

Formats understood (keys may carry a ``diffusion_model.``, ``model.diffusion_model.``, ``transformer.`` or
``base_model.model.`` prefix):

- **original-Wan keys, kohya-style factors** (the lightx2v / CausVid step-distillation LoRAs people use with
  Wan): ``blocks.0.self_attn.q.lora_down.weight``, ``...lora_up.weight``, optional ``...alpha``; full deltas
  ``...diff`` (weight) and ``...diff_b`` (bias), e.g. for norms and the time projection.
- **diffusers / PEFT**: ``blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B.weight`` (also ``lora_A.default.weight``
  and original-Wan module names with ``lora_A``/``lora_B``), optional ``lora_B.bias``; ``alpha`` from an
  ``.alpha`` key when present (PEFT keeps it in ``adapter_config.json``: pass it as ``alpha=``).
- **kohya flattened names**: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` (+ ``.alpha``).

The merge is ``W += scale * (alpha / rank) * up @ down`` (rank = rows of ``down``; alpha defaults to the rank,
i.e. factor 1), computed in fp32 on the target device before the weight is cast. A key that names no
parameter of the model raises (so a 14B LoRA is not silently dropped on a 5B model).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .checkpoint import _fmt, wan_to_diffusers_name

_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_",
             "lora_transformer_", "unet.")

# (suffix, role); longer suffixes first
_SUFFIXES = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "diff_b"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)


def load_lora(source) -> dict[str, torch.Tensor]:
    """The raw tensors of a LoRA file (``.safetensors`` or a torch checkpoint), or a dict passed through."""
    if isinstance(source, dict):
        return source
    p = Path(os.fspath(source))
    if not p.is_file():
        raise FileNotFoundError(f"LoRA file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot read LoRA {p.name} as safetensors: {exc}") from exc
    try:
        sd = torch.load(str(p), map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read LoRA {p.name}: {exc}") from exc
    if not isinstance(sd, dict):
        raise ValueError(f"LoRA {p.name} does not hold a dict of tensors")
    return sd


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for pre in _PREFIXES:
            if key.startswith(pre):
                key, changed = key[len(pre):], True
    return key


class _Resolver:
    """Maps a LoRA module name (diffusers, original Wan or kohya-flattened) to a model parameter prefix."""

    def __init__(self, params: dict[str, tuple[int, ...]]) -> None:
        self.params = params
        self.modules = {n.rpartition(".")[0] for n in params} | set(params)
        self.flat: dict[str, str] = {}
        for m in self.modules:
            self.flat[m.replace(".", "_")] = m
        # original-Wan names of every module, flattened too
        for m in list(self.modules):
            w = _diffusers_to_wan(m)
            if w is not None:
                self.flat.setdefault(w.replace(".", "_"), m)

    def __call__(self, name: str) -> str | None:
        if name in self.modules:
            return name
        d = wan_to_diffusers_name(name)
        if d is not None and d in self.modules:
            return d
        return self.flat.get(name)


def _diffusers_to_wan(name: str) -> str | None:
    from .checkpoint import diffusers_to_wan_name

    return diffusers_to_wan_name(name)


def parse_lora(sd: dict[str, Any], params: dict[str, tuple[int, ...]]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a LoRA state dict by the model module it targets: ``{module: {role: tensor}}`` with roles
    ``down``, ``up``, ``alpha``, ``diff``, ``diff_b``. Unknown keys or modules raise ``ValueError``."""
    resolve = _Resolver(params)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown_suffix, unknown_module = [], []
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"LoRA entry {key!r} is not a tensor")
        k = _strip(key)
        for suf, role in _SUFFIXES:
            if k.endswith(suf):
                mod = k[: -len(suf)]
                break
        else:
            if k.endswith("dora_scale"):
                raise ValueError(f"DoRA adapters are not supported (key {key!r})")
            unknown_suffix.append(key)
            continue
        target = resolve(mod)
        if target is None:
            unknown_module.append(key)
            continue
        if role in groups[target]:
            raise ValueError(f"LoRA has two {role!r} tensors for {target} (last: {key!r})")
        groups[target][role] = t
    if unknown_suffix:
        raise ValueError(f"LoRA keys of an unknown format: {_fmt(unknown_suffix)}")
    if unknown_module:
        raise ValueError(f"LoRA keys that target no parameter of this model: {_fmt(unknown_module)}")
    for mod, g in groups.items():
        if ("down" in g) != ("up" in g):
            raise ValueError(f"LoRA for {mod} has {'lora_down/A' if 'down' in g else 'lora_up/B'} without its pair")
        if "alpha" in g and "down" not in g:
            raise ValueError(f"LoRA for {mod} has an alpha but no factors")
    return dict(groups)


class LoraDeltas:
    """Per-parameter weight deltas of one or more LoRAs, applied while a checkpoint loads."""

    def __init__(self, params: dict[str, tuple[int, ...]], device: torch.device) -> None:
        self.params = params
        self.device = device
        self.entries: dict[str, list[tuple[str, dict[str, torch.Tensor], float]]] = defaultdict(list)
        self.used: set[str] = set()

    @classmethod
    def build(cls, lora, scale: float, params: dict[str, tuple[int, ...]], device, alpha: float | None = None) -> "LoraDeltas":
        """``lora``: a path, a state dict, or a list of ``(path_or_dict, scale)`` pairs."""
        out = cls(params, torch.device(device))
        items = lora if isinstance(lora, (list, tuple)) else [(lora, scale)]
        for item in items:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise TypeError("lora must be a path, a state dict, or a list of (path_or_state_dict, scale) pairs")
            src, s = item
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise TypeError(f"lora scale must be a number, got {type(s).__name__}")
            for mod, g in parse_lora(load_lora(src), params).items():
                if alpha is not None and "alpha" not in g:
                    g = dict(g, alpha=torch.tensor(float(alpha)))
                out._add(mod, g, float(s))
        return out

    def _add(self, mod: str, g: dict[str, torch.Tensor], s: float) -> None:
        if "down" in g or "diff" in g:
            wname = mod if mod in self.params else f"{mod}.weight"
            if wname not in self.params:
                raise ValueError(f"LoRA targets {mod}, which has no weight in this model")
            if "down" in g:
                down, up = g["down"], g["up"]
                want = self.params[wname]
                if down.shape[0] != up.shape[1] or up.shape[0] != want[0] or down[0].numel() != math_prod(want[1:]):
                    raise ValueError(
                        f"LoRA factors for {mod} do not fit its weight {list(want)}: "
                        f"down {list(down.shape)}, up {list(up.shape)}"
                    )
            if "diff" in g and tuple(g["diff"].shape) != self.params[wname]:
                raise ValueError(f"LoRA diff for {mod} has shape {list(g['diff'].shape)}, weight is {list(self.params[wname])}")
            self.entries[wname].append(("weight", g, s))
        if "diff_b" in g:
            bname = f"{mod}.bias"
            if bname not in self.params or tuple(g["diff_b"].shape) != self.params[bname]:
                raise ValueError(f"LoRA bias delta for {mod} does not fit the model")
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
            raise RuntimeError(f"LoRA deltas were never applied: {_fmt(left)}")


def math_prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@torch.no_grad()
def merge_lora(model, lora, scale: float = 1.0, *, alpha: float | None = None):
    """Merge ``lora`` (path, state dict, or list of ``(source, scale)``) into ``model``'s weights in place.

    The same merge as loading with ``WanDiT.from_pretrained(..., lora=..., lora_scale=...)``, for a model
    already in memory. ``alpha`` supplies the LoRA alpha when the file has none (PEFT adapters). Returns
    the model.
    """
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    deltas = LoraDeltas.build(lora, scale, params, next(model.parameters()).device, alpha=alpha)
    for n, p in model.named_parameters():
        if n in deltas.entries:
            p.copy_(deltas.apply(n, p).to(p.dtype))
    return model
