"""Attention plans: a block table turned once into the tables every backend reads, on the attention's device.

A plan is built once per (layout or block table, block_tokens, device) and then passed to every attention
call of that shape (a DiT passes one plan to all its layers): a call with a plan does no host work beyond
reading a few Python attributes, no device-to-host copy and no hashing, so a window step can be captured
in a CUDA graph.

The tables are FlexAttention's ``BlockMask`` tensors over sparse blocks of
:data:`~swift_kernels.attention.tiles.SPARSE_BLOCK` tokens (partial and full lists, forward and transposed),
so FlexAttention and our Triton and CUDA kernels read the very same tensors; see
:mod:`swift_kernels.attention.schedule` for what partial and full mean.
"""

from __future__ import annotations

import collections
import itertools
import operator
import threading
from typing import NamedTuple

import torch

from .._backend import constant_under_compile
from .layout import CSGLayout, block_mask_mod, flex_block_mask
from .schedule import allowed_pairs as _allowed_pairs
from .tiles import SPARSE_BLOCK

_CACHE_SIZE = 32  # plans kept by plan_attention; a 2K clip plan holds about 6 MB of tables
_cache: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()
_stats = {"builds": 0, "hits": 0}
_ids = itertools.count(1)  # plan ids (next() on a count is atomic: ids stay unique across threads)
# The cached plans by id: compiled graphs look their plan up here (see plan_id_of_layout).
PLANS_BY_ID: dict[int, "AttentionPlan"] = {}


class KernelTables(NamedTuple):
    """What the kernels read, as the custom ops pass it: the int8 block table and the 2-D table views.

    ``kv_*`` rows are query sparse blocks (the forward and dQ passes), ``q_*`` rows are key sparse blocks
    (the dK/dV pass); ``num[r]`` entries of ``idx[r]`` are valid. All int32 and contiguous except
    ``mask_table`` (int8 ``[n, n]``, 1 = allowed).
    """

    mask_table: torch.Tensor
    block_tokens: int
    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    full_kv_num: torch.Tensor
    full_kv_idx: torch.Tensor
    q_num: torch.Tensor
    q_idx: torch.Tensor
    full_q_num: torch.Tensor
    full_q_idx: torch.Tensor


def normalize_device(device) -> torch.device:
    """``device`` as a torch.device with an index for CUDA (``"cuda"`` means the current device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def _fake_mode():
    """The active FakeTensorMode, if any (a memory planner runs real sizes on fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    for mode in reversed(_get_current_dispatch_mode_stack()):
        if isinstance(mode, FakeTensorMode):
            return mode
    return None


def _host_work():
    """A context for the plan's host-side work: real CPU tensors and no dispatch mode, so neither a
    FakeTensorMode (a memory planner) nor a FlopCounterMode sees the small table computations."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


class AttentionPlan:
    """Everything frame-block-sparse attention needs to know about one sequence layout, on one device.

    Build with :func:`plan_attention` (cached: equal layouts or tables on one device give the same plan), or
    directly (``AttentionPlan(block_mask, block_tokens, device)``, uncached). Pass it where a block table or a
    layout is accepted: ``frame_block_attention(q, k, v, plan)`` and ``csg_attention(q, k, v, plan)``.

    Args:
        block_mask: bool ``[n, n]``: query block ``i`` may attend key block ``j`` (any device; copied once).
        block_tokens: tokens per block, ``>= 1``.
        device: where the tables live: the device of the attention's q, k, v.
        layout: the :class:`~swift_kernels.CSGLayout` the table comes from, if any (kept for reference).

    The object is immutable; its tensors must not be modified.
    """

    __slots__ = ("_id", "_mask", "_block_tokens", "_device", "_layout", "_pairs", "_dense", "_tables", "_flex",
                 "_flex_lock")

    def __init__(self, block_mask: torch.Tensor, block_tokens: int, device="cpu", *, layout: CSGLayout | None = None):
        block_tokens = check_table(block_mask, block_tokens)
        device = normalize_device(device)
        fake = _fake_mode()
        with _host_work():
            mask = block_mask.detach().to("cpu", torch.bool).clone().contiguous()
            n = mask.shape[0]
            L = n * block_tokens
            bm = flex_block_mask(mask, block_tokens, SPARSE_BLOCK, SPARSE_BLOCK, "cpu")
            host = [t[0, 0].contiguous() for t in (
                bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices)]
            table = mask.to(torch.int8)
            pairs = _allowed_pairs(mask, block_tokens)
            dense = bool(mask.all()) and n > 0
        if fake is not None:  # fake tables for a fake run: shapes are all it needs
            on_device = [fake.from_tensor(t).to(device) for t in (table, *host)]
        else:
            on_device = [t.to(device) for t in (table, *host)]
        set_ = object.__setattr__
        set_(self, "_id", next(_ids))
        with _lock:
            _stats["builds"] += 1
        set_(self, "_mask", mask)
        set_(self, "_block_tokens", block_tokens)
        set_(self, "_device", device)
        set_(self, "_layout", layout)
        set_(self, "_pairs", pairs)
        set_(self, "_dense", dense)
        set_(self, "_tables", KernelTables(on_device[0], block_tokens, *on_device[1:]))
        set_(self, "_flex", None)
        set_(self, "_flex_lock", threading.Lock())
        assert L == self.num_tokens

    def __setattr__(self, name, value):
        raise AttributeError("AttentionPlan is immutable")

    def __repr__(self) -> str:
        what = f"layout={self._layout!r}" if self._layout is not None else f"num_blocks={self.num_blocks}"
        return (f"AttentionPlan({what}, block_tokens={self._block_tokens}, device='{self._device}', "
                f"dense={self._dense}, allowed_pairs={self._pairs})")

    @property
    def block_mask(self) -> torch.Tensor:
        """bool ``[n, n]`` on the CPU (a fresh copy)."""
        return self._mask.clone()

    @property
    def block_tokens(self) -> int:
        """Tokens per block."""
        return self._block_tokens

    @property
    def num_blocks(self) -> int:
        """Blocks in the sequence (``n``)."""
        return int(self._mask.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens in the sequence: ``num_blocks * block_tokens``."""
        return self.num_blocks * self._block_tokens

    @property
    def device(self) -> torch.device:
        """The device the tables live on (q, k, v must be there)."""
        return self._device

    @property
    def layout(self) -> CSGLayout | None:
        """The layout the plan was built from, or None for a raw block table."""
        return self._layout

    @property
    def block_size(self) -> int:
        """Tokens per sparse block of the tables (queries and keys)."""
        return SPARSE_BLOCK

    @property
    def allowed_pairs(self) -> int:
        """(query token, key token) pairs the table allows, per batch element and head: forward FLOPs are
        ``4 * batch * heads * head_dim * allowed_pairs``, backward 2.5 times that."""
        return self._pairs

    @property
    def dense(self) -> bool:
        """True when every pair is allowed (a CSG window, Stage I): dense attention kernels serve it."""
        return self._dense

    @property
    def tables(self) -> KernelTables:
        """The device tables the kernels read (views of :meth:`to_block_mask`'s tensors)."""
        return self._tables

    def to_block_mask(self):
        """The plan as a FlexAttention ``BlockMask`` (built on first use, then kept): the same tensors as
        :attr:`tables`, broadcast over batch and heads (size-1 dimensions)."""
        if self._flex is None:
            if torch.compiler.is_compiling():  # traced into the graph (a lock cannot be); kept by the eager calls
                return self._build_block_mask()
            with self._flex_lock:
                if self._flex is None:
                    object.__setattr__(self, "_flex", self._build_block_mask())
        return self._flex

    def _build_block_mask(self):
        from torch.nn.attention.flex_attention import BlockMask

        t = self._tables
        four = lambda x: x[None, None]  # noqa: E731 -- [1, 1, ...] views of the same storage
        bm = BlockMask.from_kv_blocks(
            four(t.kv_num), four(t.kv_idx), four(t.full_kv_num), four(t.full_kv_idx),
            BLOCK_SIZE=(SPARSE_BLOCK, SPARSE_BLOCK),
            mask_mod=block_mask_mod(self._mask.to(self._device), self._block_tokens),
            seq_lengths=(self.num_tokens, self.num_tokens),
        )
        # The transposed lists are ours too (from_kv_blocks derived equal ones).
        bm.q_num_blocks, bm.q_indices = four(t.q_num), four(t.q_idx)
        bm.full_q_num_blocks, bm.full_q_indices = four(t.full_q_num), four(t.full_q_idx)
        return bm


def check_table(block_mask, block_tokens) -> int:
    """Validate a block table and its block_tokens; returns block_tokens as an int."""
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask must be a torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be a bool tensor, got {block_mask.dtype}")
    if block_mask.dim() != 2 or block_mask.shape[0] != block_mask.shape[1]:
        raise ValueError(f"block_mask must be a square [n_blocks, n_blocks] table, got shape {tuple(block_mask.shape)}")
    # integer types other than int (NumPy's, from shapes) are accepted, as CSGLayout does
    if isinstance(block_tokens, (bool, torch.Tensor)) or not hasattr(block_tokens, "__index__"):
        raise TypeError(f"block_tokens must be an int, got {type(block_tokens).__name__}")
    block_tokens = operator.index(block_tokens)
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    return block_tokens


def plan_attention(layout_or_mask, block_tokens: int | None = None, *, device=None) -> AttentionPlan:
    """The :class:`AttentionPlan` of a layout or block table on ``device``, built on first use and then reused.

    Args:
        layout_or_mask: a :class:`~swift_kernels.CSGLayout`, or a bool block table ``[n, n]``.
        block_tokens: tokens per block; required with a block table, optional (must match) with a layout.
        device: the device of the attention's tensors (default: the CPU for a layout, the table's device
            for a table).

    Equal layouts (or tables with equal contents) on one device return the same plan object. Looking a
    table up hashes its contents (a device-to-host copy when it lives on a GPU); build the plan once and
    pass it to the attention calls to avoid even that.
    """
    if isinstance(layout_or_mask, AttentionPlan):
        raise TypeError("plan_attention takes a CSGLayout or a block table, got an AttentionPlan (use it directly)")
    if isinstance(layout_or_mask, CSGLayout):
        layout = layout_or_mask
        if block_tokens is not None and block_tokens != layout.block_tokens:
            raise ValueError(f"block_tokens ({block_tokens}) differs from the layout's ({layout.block_tokens})")
        device = normalize_device("cpu" if device is None else device)
        key = ("layout", layout, device)
        block_tokens = layout.block_tokens
        mask = None  # read from the layout only when a plan is built: a cache hit does no tensor work
    else:
        block_tokens = check_table(layout_or_mask, block_tokens)
        layout = None
        device = normalize_device(layout_or_mask.device if device is None else device)
        with _host_work():
            mask = layout_or_mask.detach().to("cpu", torch.bool).contiguous()
            key = ("table", mask.shape[0], mask.numpy().tobytes(), block_tokens, device)
    def table():
        if mask is not None:
            return mask
        with _host_work():
            return layout.block_mask

    if _fake_mode() is not None:
        # Fake tables belong to one fake mode: build them for this run, keep nothing.
        return AttentionPlan(table(), block_tokens, device, layout=layout)
    with _lock:
        plan = _cache.get(key)
        if plan is not None:
            _cache.move_to_end(key)
            _stats["hits"] += 1
            return plan
    plan = AttentionPlan(table(), block_tokens, device, layout=layout)
    with _lock:
        plan = _cache.setdefault(key, plan)
        PLANS_BY_ID[plan._id] = plan
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            PLANS_BY_ID.pop(_cache.popitem(last=False)[1]._id, None)
    return plan


# torch.compile runs this eagerly while tracing and bakes the id into the graph as a constant (a plan built
# during tracing would otherwise be traced); the graph then reads the plan from PLANS_BY_ID.
@constant_under_compile
def plan_id_of_layout(layout_key: tuple, device: torch.device) -> int:
    """The id of the cached plan of the layout with parameters ``layout_key`` (``CSGLayout._key()``) on ``device``."""
    return plan_attention(CSGLayout(*layout_key), device=device)._id


def plan_cache_info() -> dict:
    """``{"builds": plans built so far, "hits": cache hits of plan_attention, "size": plans cached}``."""
    with _lock:
        return dict(_stats, size=len(_cache))
