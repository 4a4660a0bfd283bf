"""Regional compilation of a :class:`~swift_model.nets.dit.model.WanDiT`: one compiled block for every block.

The DiT is a stack of identical :class:`~swift_model.nets.dit.blocks.WanBlock` s, so compiling the whole network
would trace 30 or 40 copies of the same code; compiling each block's ``forward`` instead traces one block, and
every other block of the same shapes reuses that graph. Dynamo keeps its compiled graphs on the code object of
``WanBlock.forward`` and (parameters being graph inputs, not constants) guards on the shapes, dtypes and devices
of the block's tensors, not on which block it is: the first call of a shape compiles, the other blocks hit the
cache. A forward call has two block variants (the first block has no pending residual of a previous block, the
others have one), so a call shape costs two graphs, whatever the depth.

Only ``forward`` is compiled, not the module's ``__call__``: a module's hooks run eagerly around the compiled
body. That is what lets a streamed DiT (the ``24gb`` profile's block streamer re-points a block's parameters into
a device slot in a forward pre-hook) and FSDP's per-block hooks work unchanged.

Our custom ops (``swift_kernels::fba_forward``, the fused DiT ops, the sampler step) are ``torch.library`` custom
ops with fake implementations: the compiler traces each as one opaque node of the graph and runs whichever kernel
the op dispatches to, with no graph break around it. :func:`compile_blocks` compiles with ``fullgraph=True``, so
a graph break would raise instead of silently splitting the block.

The time spent compiling is counted (:class:`CompileStats`): a block call during which Dynamo produced a new
graph counts as compile time in whole (the one run of the block it includes is small beside the compilation).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import torch
import torch.nn as nn

from .blocks import WanBlock

# torch.compile backends this module accepts: "inductor" (generated kernels; the default), "aot_eager" (the traced
# graph run by the eager kernels: a check of the tracing without code generation) and "eager" (Dynamo only).
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")

# Dynamo keeps at most `recompile_limit` graphs per code object before it falls back to eager for good. Every
# block of every DiT shares the one code object of WanBlock.forward, and a generation has several call shapes
# (Stage I, the Stage II windows, a shared anchor's precompute, each at two block variants): the default of 8 would
# silently run most of a generation eagerly. Each distinct shape still compiles only once.
MIN_RECOMPILE_LIMIT = 64


@dataclasses.dataclass
class CompileStats:
    """What the compiled blocks of one DiT have cost so far.

    Attributes:
        backend: the torch.compile backend (a name, or a backend function). mode: its mode (``None``: the
            default).
        seconds: wall-clock seconds of the block calls that compiled a graph.
        graphs: the graphs those calls produced.
    """

    backend: Any
    mode: str | None
    seconds: float = 0.0
    graphs: int = 0

    def as_dict(self) -> dict:
        """A JSON-serialisable copy."""
        return dataclasses.asdict(self)


def _graph_count() -> int:
    """Graphs Dynamo has compiled so far in this process (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@functools.lru_cache(maxsize=None)
def _compiled_forward(backend, mode: str | None):
    """``WanBlock.forward`` compiled once per (backend, mode) for the whole process: one function object, so every
    block and every DiT share the same Dynamo cache entry of the block's code."""
    return torch.compile(WanBlock.forward, backend=backend, mode=mode, fullgraph=True, dynamic=False)


class _TimedBlockForward:
    """A block's ``forward``: the shared compiled function, timed when a call compiles (see :class:`CompileStats`)."""

    def __init__(self, block: WanBlock, compiled, stats: CompileStats) -> None:
        self.block, self.compiled, self.stats = block, compiled, stats

    def __call__(self, *args, **kwargs):
        before = _graph_count()
        t0 = time.perf_counter()
        out = self.compiled(self.block, *args, **kwargs)
        new = _graph_count() - before
        if new > 0:  # (a counter reset elsewhere makes it negative: not ours)
            self.stats.seconds += time.perf_counter() - t0
            self.stats.graphs += new
        return out


def check_compile_options(backend, mode) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument unless ``backend`` and ``mode`` are accepted."""
    if callable(backend):  # a torch.compile backend function (gm, example_inputs) -> callable
        if mode is not None:
            raise ValueError(f"compile mode {mode!r} needs the inductor backend, got a backend function")
        return
    if not isinstance(backend, str):
        raise TypeError(f"compile backend must be a name of {COMPILE_BACKENDS} or a backend function, "
                        f"got {type(backend).__name__}")
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend must be one of {COMPILE_BACKENDS}, got {backend!r}")
    if mode is not None and not isinstance(mode, str):
        raise TypeError(f"compile mode must be a string or None, got {type(mode).__name__}")
    if mode is not None and backend != "inductor":
        raise ValueError(f"compile mode {mode!r} needs the inductor backend, got backend {backend!r}")


def compile_blocks(dit: nn.Module, *, backend="inductor", mode: str | None = None) -> CompileStats:
    """Compile the transformer blocks of ``dit`` regionally: each block's ``forward`` becomes one shared compiled
    function (see the module docstring); the embedding, the head and the caches' precomputation stay eager.

    Args:
        dit: a :class:`~swift_model.nets.dit.model.WanDiT` (anything with a ``blocks`` list of
            :class:`~swift_model.nets.dit.blocks.WanBlock`).
        backend: ``"inductor"`` (default), ``"aot_eager"`` or ``"eager"`` (:data:`COMPILE_BACKENDS`), or a
            torch.compile backend function (the tests capture the traced graphs with one).
        mode: an inductor mode (``"max-autotune"``, ``"reduce-overhead"``, ...) or ``None``.

    Returns:
        the :class:`CompileStats` the blocks update (also ``dit.compile_stats``). Compiling an already compiled DiT
        with the same options returns its stats; with other options it is recompiled.

    Compilation itself happens on the first call of each shape. Calls that differ only in which block runs reuse
    the graph.
    """
    check_compile_options(backend, mode)
    blocks = getattr(dit, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not all(isinstance(b, WanBlock) for b in blocks):
        raise TypeError(f"dit must hold its transformer blocks as a ModuleList of WanBlock, got {type(dit).__name__}")
    stats = getattr(dit, "compile_stats", None)
    if isinstance(stats, CompileStats) and (stats.backend, stats.mode) == (backend, mode):
        return stats
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, MIN_RECOMPILE_LIMIT)
    stats = CompileStats(backend, mode)
    compiled = _compiled_forward(backend, mode)
    for blk in blocks:
        # an instance attribute shadows WanBlock.forward; nn.Module.__call__ runs the hooks, then this
        blk.forward = _TimedBlockForward(blk, compiled, stats)
    dit.compile_stats = stats
    return stats


def uncompile_blocks(dit: nn.Module) -> None:
    """Undo :func:`compile_blocks`: the blocks run ``WanBlock.forward`` eagerly again (the compiled graphs stay in
    Dynamo's cache for another compiled DiT)."""
    for blk in getattr(dit, "blocks", ()):
        if isinstance(blk.__dict__.get("forward"), _TimedBlockForward):
            del blk.forward
    if "compile_stats" in dit.__dict__:
        del dit.compile_stats


def is_compiled(dit: nn.Module) -> bool:
    """Whether ``dit``'s blocks run compiled (:func:`compile_blocks`)."""
    return isinstance(getattr(dit, "compile_stats", None), CompileStats)
