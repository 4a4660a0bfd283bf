"""Weights that are not in memory (nets layer): a module whose weights are read from its files on use keeps, in
their place, placeholders of the right shape and dtype that hold no memory.

A placeholder is a zero-stride view of a single zero on the CPU (:func:`placeholder`): it has the weight's shape
and dtype, so the module can be inspected, planned and moved like any other, and, unlike a meta tensor, a
parameter pointing at it can be pointed at real storage on any device (``param.data = tensor``), so the
``Parameter`` objects (and the hooks of their modules) stay the same across loads. Every placeholder of one dtype
shares that one element. Code that reads weights must never see one: the code that drops weights also guards the
module's use (:mod:`swift_model.generation.residency`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

_ZERO: dict[torch.dtype, torch.Tensor] = {}


def placeholder(shape, dtype: torch.dtype, like: torch.Tensor | None = None) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` that holds no memory (a zero-stride view of one zero on the CPU);
    ``like``: the tensor it stands for, whose fake mode (the planner's) the placeholder must share."""
    fake_mode = getattr(like, "fake_mode", None)
    if fake_mode is not None:
        with fake_mode:
            return torch.zeros((), dtype=dtype).expand(tuple(shape))
    zero = _ZERO.get(dtype)
    if zero is None:
        zero = _ZERO[dtype] = torch.zeros((), dtype=dtype)
    return zero.expand(tuple(shape))


def is_placeholder(t: torch.Tensor) -> bool:
    """Whether ``t`` is a :func:`placeholder` (or a meta tensor: neither holds data)."""
    if t.device.type == "meta":
        return True
    return t.dim() > 0 and t.numel() > 1 and all(s == 0 for s in t.stride())


def state_slots(module: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor, bool]]:
    """Every entry of ``module.state_dict()`` as ``key -> (owner module, attribute, tensor, is a parameter)``;
    a tied parameter appears under each of its names (as in the state dict), as the same object."""
    slots = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in mod._parameters.items():
            if p is not None:
                slots[prefix + attr] = (mod, attr, p, True)
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set:
                slots[prefix + attr] = (mod, attr, b, False)
    return slots


def _same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same tensor or views of the same memory with the same layout (what
    ``state_dict()`` gives for a tied parameter: one detached alias per name)."""
    if a is b:
        return True
    same_layout = a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    return same_layout and (a.is_meta or a.data_ptr() == b.data_ptr())


def _point(param: torch.Tensor, new: torch.Tensor) -> None:
    """Make ``param`` (the same Python object, so ties, references and hooks survive) hold ``new``'s memory."""
    if param.device.type == "meta":
        # no data can be set on a meta tensor's type (a module built on the meta device): swap the tensors
        torch.utils.swap_tensors(param, nn.Parameter(new, requires_grad=param.requires_grad))
        return
    param.data = new
    if hasattr(param, "fake_device"):  # a fake tensor (the planner) keeps its device in a field of its own
        param.fake_device = new.device


def assign_weights(module: nn.Module, state: dict) -> None:
    """Point every parameter and persistent buffer of ``module`` at the tensor ``state`` gives under its name.

    The Parameter objects are kept, so tied parameters stay tied: a parameter named twice (UMT5's
    ``shared.weight`` / ``encoder.embed_tokens.weight``) must be given the same tensor (or aliases of the same
    memory) under both names. Non-persistent buffers are left where they are (the caller moves them).

    Args:
        module: the module whose weights to set (e.g. an encoder built with ``deferred=True``).
        state: ``key -> tensor`` for exactly the keys of ``module.state_dict()``.

    Raises:
        ValueError: missing or unexpected keys, a shape that differs from the module's, or a tied parameter
            given two different tensors; the module is left unchanged.
        TypeError: a value that is not a tensor.
    """
    slots = state_slots(module)
    missing, unexpected = set(slots) - set(state), set(state) - set(slots)
    if missing or unexpected:
        raise ValueError(f"assign_weights: state does not match the module's state dict: missing keys "
                         f"{sorted(missing)[:4]}, unexpected keys {sorted(unexpected)[:4]}")
    params: dict[int, tuple[str, torch.Tensor]] = {}
    for key, (_, _, cur, is_param) in slots.items():
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"assign_weights: state[{key!r}] must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(cur.shape):
            raise ValueError(f"assign_weights: state[{key!r}] has shape {tuple(t.shape)}, the module's "
                             f"{tuple(cur.shape)}")
        if is_param:
            first = params.setdefault(id(cur), (key, t))
            if not _same_data(first[1], t):
                raise ValueError(f"assign_weights: {key} is tied to {first[0]} but state gives them different tensors")
    # everything checked: now change the module
    for key, (mod, attr, cur, is_param) in slots.items():
        if not is_param:
            mod._buffers[attr] = state[key]
        elif params[id(cur)][0] == key:  # a tied parameter once, under its first name
            _point(cur, state[key])


def drop_weights(module: nn.Module) -> None:
    """Point every parameter and persistent buffer of ``module`` at a :func:`placeholder` of its shape and dtype
    (their memory is released once nothing else holds it). The Parameter objects and their ties are kept;
    non-persistent buffers (computed, not stored: CLIP's position ids) stay as they are."""
    done: set[int] = set()
    for mod, attr, cur, is_param in state_slots(module).values():
        if not is_param:
            mod._buffers[attr] = placeholder(cur.shape, cur.dtype, like=cur)
        elif id(cur) not in done:
            done.add(id(cur))
            _point(cur, placeholder(cur.shape, cur.dtype, like=cur))
