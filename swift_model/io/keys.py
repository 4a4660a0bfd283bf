"""Key naming of Wan DiT checkpoints and LoRAs: the first layer of ``swift_model`` (imports nothing from it).

:class:`~swift_model.WanDiT` uses diffusers' ``WanTransformer3DModel`` parameter names. This module knows
the other names the same tensors are published under, and nothing else (no files, no tensors' contents):

- the original Wan ``WanModel`` names, mapped both ways by explicit rules (:data:`WAN_TO_DIFFUSERS`).
  Note the swapped norms: Wan's ``norm3`` (the affine LayerNorm before the cross-attention) is diffusers'
  ``norm2``; Wan's ``norm2`` (before the FFN) has no parameters;
- the export prefixes that single-file exports and LoRA files put in front of those names
  (:data:`PREFIXES`, the one list used for checkpoints and LoRAs alike);
- kohya's flattened LoRA module names (``lora_unet_blocks_0_self_attn_q``), turned back into dotted names
  without needing the model (:func:`unflatten_module`);
- the legacy tensors that published checkpoints carry but no model uses (:func:`is_legacy_unused_key`).
"""

from __future__ import annotations

import re

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

# Prefixes that exports put in front of the model's names, longest first. Checkpoints: single-file exports
# (ComfyUI/SD-style "model.diffusion_model.", LightX2V/Kijai "diffusion_model."), a pipeline's
# "transformer.", DDP's "module.". LoRAs: the same, plus PEFT's "base_model.model." and kohya's
# flattened "lora_unet_" / "lora_transformer_" (which are followed by an underscore-joined module path).
PREFIXES: tuple[str, ...] = (
    "base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "module.",
    "unet.", "lora_unet_", "lora_transformer_",
)

# diffusers' WanTransformer3DModel declares `_keys_to_ignore_on_load_unexpected = ["norm_added_q"]`
# (diffusers/models/transformers/transformer_wan.py): the official Wan2.1-I2V-14B diffusers checkpoint
# carries one `blocks.{i}.attn2.norm_added_q.weight` per block (40 tensors) that the model never uses.
_LEGACY_UNUSED = re.compile(r"^blocks\.\d+\.attn2\.norm_added_q\.(weight|bias)$")

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
_FLAT_BLOCK = re.compile(r"^blocks_(\d+)_(.*)$")


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
# kohya flattening ("." -> "_") of every module name either naming knows, back to the dotted name
_FLAT_TOP = {n.replace(".", "_"): n for n in (*_TOP_W2D, *_TOP_D2W)}
_FLAT_BLK = {n.replace(".", "_"): n for n in (*_BLK_W2D, *_BLK_D2W)}


def _map_module(name: str, top: dict, blk: dict) -> str | None:
    """Map a module path (no parameter suffix) through the rule tables; ``None`` when no rule matches."""
    m = _BLOCK.match(name)
    if m:
        rest = blk.get(m.group(2))
        return None if rest is None else f"blocks.{m.group(1)}.{rest}"
    return top.get(name)


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


def to_model_name(name: str) -> str | None:
    """The diffusers (= :class:`~swift_model.WanDiT`) name of a module or parameter named in either naming;
    ``None`` when neither knows it. A name the model may lack (``k_img`` of a text-only model, a block past
    its depth) still maps: whether the model has it is the caller's question."""
    if diffusers_to_wan_name(name) is not None:
        return name
    return wan_to_diffusers_name(name)


def unflatten_module(flat: str) -> str | None:
    """The dotted module name of a kohya-flattened one (``blocks_0_self_attn_q`` -> ``blocks.0.self_attn.q``),
    in whichever naming it was written; ``None`` when it is no known module's."""
    m = _FLAT_BLOCK.match(flat)
    if m:
        rest = _FLAT_BLK.get(m.group(2))
        return None if rest is None else f"blocks.{m.group(1)}.{rest}"
    return _FLAT_TOP.get(flat)


def _rename_keys(state_dict: dict, rename, target: str) -> dict:
    """``state_dict`` with every key renamed by ``rename``; keys it does not know raise one ValueError."""
    out, unknown = {}, []
    for k, v in state_dict.items():
        n = rename(k)
        if n is None:
            unknown.append(k)
        else:
            out[n] = v
    if unknown:
        raise ValueError(f"keys with no {target} name: {format_keys(unknown)}")
    return out


def to_diffusers_keys(state_dict: dict) -> dict:
    """A state dict with original Wan keys renamed to diffusers' (= :class:`WanDiT`'s). Unknown keys raise."""
    return _rename_keys(state_dict, wan_to_diffusers_name, "diffusers")


def to_wan_keys(state_dict: dict) -> dict:
    """A state dict with diffusers' (= :class:`WanDiT`'s) keys renamed to the original Wan ones. Unknown keys raise."""
    return _rename_keys(state_dict, diffusers_to_wan_name, "original-Wan")


def strip_prefixes(key: str) -> str:
    """``key`` without any export prefix of :data:`PREFIXES` (repeatedly: ``base_model.model.transformer.x``
    -> ``x``). For LoRA keys, where each key is read on its own."""
    changed = True
    while changed:
        changed = False
        for pre in PREFIXES:
            if key.startswith(pre) and len(key) > len(pre):
                key, changed = key[len(pre):], True
    return key


def strip_export_prefix(keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """For a checkpoint's keys: ``{stored key: key without the export prefix}`` and the keys outside it.

    A prefix is removed only when every key carries it, except ``model.diffusion_model.``: a combined single
    file (ComfyUI style) holds the VAE and text encoder beside the DiT, and those other keys are returned
    apart (they are other components, not ours to load).
    """
    for pre in PREFIXES:
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
        f"WanModel's; first keys: {format_keys(keys, 8)}"
    )


def is_legacy_unused_key(name: str) -> bool:
    """Whether ``name`` (diffusers naming, no prefix) is a tensor that published checkpoints carry but no Wan
    model uses (diffusers' ``norm_added_q``); loaders skip these and say how many they skipped."""
    return _LEGACY_UNUSED.match(name) is not None


def block_index(name: str) -> int | None:
    """The block number of a ``blocks.{i}.`` name, else ``None``."""
    m = _BLOCK.match(name)
    return None if m is None else int(m.group(1))


def format_keys(keys, limit: int = 20) -> str:
    """A short printable list of ``keys`` (sorted, at most ``limit`` shown) with their count."""
    keys = sorted(keys)
    s = ", ".join(keys[:limit])
    return f"[{s}{', ...' if len(keys) > limit else ''}] ({len(keys)} keys)"
