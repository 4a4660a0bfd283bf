"""Counting a run on fake tensors (planning layer): live device bytes, FLOPs, and the replay of repeated calls.

- :class:`~swift_model.nets.live_storage.LiveStorageTracker` (from the nets layer, which measures the VAE's
  passes with it): a dispatch mode that sees every storage created on one device type and, through a weakref
  finalizer, its release (sizes rounded up to the CUDA allocator's 512 bytes): the bytes alive at once and their
  peak.
- :class:`Counters`: that tracker, ``torch.utils.flop_counter.FlopCounterMode`` (our attention op counts
  allowed token pairs only) and the FLOPs of replayed calls.
- :class:`Replay`: a transformer block, the VAE encoder or decoder called again with inputs of the same shapes
  (and caches of the same shapes) runs the same operations on tensors of the same sizes, so its FLOPs, its
  transient peak above what was alive when it was called, and the shapes of what it returns and leaves in its
  caches are those of the first such call; only the first call per signature executes.
- :class:`GpuAttentionMode`: ``scaled_dot_product_attention`` on fake CUDA tensors as a GPU runs it (the fused
  kernels' allocations, not the math path's scores).

Everything counted here is an **estimate**: the caching allocator's fragmentation, the CUDA context, library
workspaces (cuBLAS, cuDNN) and the CPU side are not counted.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from ..nets.live_storage import LiveStorageTracker


def _signature(x):
    """What determines the work of a call: tensor shapes/dtypes/devices/strides, Python values, the identity of
    attention plans (their tables decide the attention FLOPs), recursively."""
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, str(x.device), tuple(x.stride()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_signature(v) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple(sorted((k, _signature(v)) for k, v in x.items())))
    if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device)):
        return x
    if type(x).__name__ == "AttentionPlan":
        # a dense plan's work is set by its size (every CSG window of one size runs the same dense attention);
        # a block-sparse plan's by its tables
        return ("dense", x.num_tokens, x.block_tokens, str(x.device)) if x.dense else ("plan", id(x))
    if dataclasses.is_dataclass(x):
        return (type(x).__name__, tuple(_signature(getattr(x, f.name)) for f in dataclasses.fields(x)))
    if hasattr(x, "__dict__"):
        return (type(x).__name__, tuple(sorted((k, _signature(v)) for k, v in vars(x).items())))
    return ("id", id(x))


def _empty_like_sig(sig):
    _, shape, dtype, device, stride = sig
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


def _template(value):
    """``value`` (a tensor, or a structure holding tensors) with each tensor replaced by its signature: what a
    replay needs to make a stand-in, without keeping the tensors alive."""
    leaves, spec = pytree.tree_flatten(value)
    return spec, [("T", _signature(t)) if isinstance(t, torch.Tensor) else ("V", t) for t in leaves]


def _from_template(template):
    spec, leaves = template
    return pytree.tree_unflatten([_empty_like_sig(v) if kind == "T" else v for kind, v in leaves], spec)


class Replay:
    """Wraps a module's ``forward`` so that a call whose :func:`_signature` was seen before is not executed but
    replayed: outputs (and what it leaves in list arguments: the VAE's causal caches, a block's recorded keys and
    values) are allocated with the recorded shapes, the recorded FLOPs are added and the recorded transient peak
    above the bytes alive at the call is reported to the tracker. Exact for calls whose operations depend only
    on what the signature holds (true of the transformer blocks and the VAE encoder/decoder). A record holds
    shapes, never the call's tensors, so nothing a call made outlives it through the record.

    The wrapper is the module instance's ``forward`` (the planner's own models, built for the plan);
    :meth:`remove` puts the module's own back."""

    def __init__(self, module: torch.nn.Module, counters: "Counters", records: dict | None = None) -> None:
        self.module, self.counters = module, counters
        self.inner = module.forward
        # modules of one architecture (a DiT's blocks) share their records: the key holds their weights' shapes
        self.records: dict = {} if records is None else records
        self.hits = self.misses = 0
        self._params = list(module.parameters())
        self._shapes = tuple((tuple(t.shape), t.dtype) for t in self._params)
        module.forward = self

    def remove(self) -> None:
        """Stop replaying: the module's own ``forward`` again."""
        if self.module.__dict__.get("forward") is self:
            del self.module.forward

    def __call__(self, *args, **kwargs):
        # the weights' shapes and dtypes are fixed once the pipeline is built; where they are moves with the plan
        devices = tuple(str(getattr(t, "fake_device", None) or t.device) for t in self._params)
        key = (type(self.module).__name__, self._shapes, devices, _signature((args, kwargs)))
        tracker, rec = self.counters.tracker, self.records.get(key)
        lists = [v for v in (*args, *kwargs.values()) if isinstance(v, list)]
        if rec is None:
            self.misses += 1
            before = [[_signature(e) for e in lst] for lst in lists]
            live0, flops0 = tracker.live_bytes, self.counters.flops()
            # the input storages are held while the call runs, so that their ids stay theirs; not those in list
            # arguments, which the call may replace and free as it goes (the VAE's causal caches: holding the old
            # ones would count a second set of caches in the call's peak)
            in_lists = {id(e) for lst in lists for e in lst if isinstance(e, torch.Tensor)}
            held = [(i, t.untyped_storage()) for i, t in enumerate(pytree.tree_leaves((args, kwargs)))
                    if isinstance(t, torch.Tensor) and id(t) not in in_lists]
            with tracker.section() as sec:
                out = self.inner(*args, **kwargs)
            leaves, spec = pytree.tree_flatten(out)

            def kind(t):
                if not isinstance(t, torch.Tensor):
                    return ("value", t)
                st = t.untyped_storage()
                same = [i for i, s in held if s is st]
                if same and tuple(t.shape) == tuple(pytree.tree_leaves((args, kwargs))[same[0]].shape):
                    return ("alias", same[0])  # returned (a same-shaped view of) an input: no new storage
                return ("new", _signature(t))

            outs = [kind(t) for t in leaves]
            del held
            changes = [[(i, _template(e)) for i, e in enumerate(lst) if i >= len(b) or _signature(e) != b[i]]
                       for lst, b in zip(lists, before)]
            self.records[key] = dict(peak=sec["peak"] - live0, flops=self.counters.flops() - flops0, outs=outs,
                                     spec=spec, changes=changes)
            return out
        self.hits += 1
        tracker.bump(tracker.live_bytes + rec["peak"])
        self.counters.extra_flops += rec["flops"]
        for lst, changes in zip(lists, rec["changes"]):
            for i, template in changes:
                e = _from_template(template)
                if i < len(lst):
                    lst[i] = e
                else:
                    lst.append(e)
        inputs = pytree.tree_leaves((args, kwargs))
        leaves = [inputs[v] if kind == "alias" else (_empty_like_sig(v) if kind == "new" else v)
                  for kind, v in rec["outs"]]
        return pytree.tree_unflatten(leaves, rec["spec"])


HOST_ROUND = 64  # PyTorch's CPU allocator aligns to 64 bytes; the page-locked buffers are registered exactly


class Counters:
    """The trackers (device, and host unless the device is the CPU) and the FLOP counter of one plan, plus the
    FLOPs of replayed calls."""

    def __init__(self, device_type: str) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self.tracker = LiveStorageTracker(device_type)
        # host memory: a CPU plan's device is the host; pageable allocations are 64-byte aligned (no 512 rounding)
        self.host = self.tracker if device_type == "cpu" else LiveStorageTracker("cpu", round_to=HOST_ROUND)
        self.flop_counter = FlopCounterMode(display=False)
        self.extra_flops = 0

    def flops(self) -> int:
        return int(self.flop_counter.get_total_flops()) + self.extra_flops


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The fused kernel a GPU runs for this call, on fake CUDA tensors; ``None`` where SDPA would not take a fused
    kernel (a mask, dropout, GQA, unequal head dims) or the tensors are not fake CUDA ones."""
    from torch._subclasses.fake_tensor import FakeTensor

    fused = (isinstance(query, FakeTensor) and query.device.type == "cuda" and attn_mask is None
             and dropout_p == 0.0 and not enable_gqa and query.dim() == 4
             and query.shape[-1] == key.shape[-1] == value.shape[-1])
    if not fused:
        return None
    if query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, False,
                                                                   scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, False, 0.0, is_causal,
                                                                   scale=scale)[0]


class GpuAttentionMode(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as a GPU runs it, for fake ``cuda`` tensors, while the mode is active.

    On fake tensors SDPA cannot ask the device which fused kernel it supports and falls back to the math path,
    which materialises the ``[B, H, Lq, Lk]`` fp32 scores (1.4 GiB per call for Stage I's cross-attention at
    81 frames): memory a GPU never allocates. A GPU runs FlashAttention (fp16/bf16, head dim <= 256) or the
    memory-efficient kernel (otherwise), each allocating the output and a log-sum-exp; under this mode the fake
    run calls the same aten kernels, whose meta functions give those allocations and which ``FlopCounterMode``
    counts. Every other call, and SDPA on anything but fake CUDA tensors, runs as it is.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            out = _fused_sdpa(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)
