"""``SwiftI2VPipeline(..., compile=...)``: the pipeline's DiTs compiled regionally, and what a report says about it.

Each DiT's transformer blocks run one shared compiled block (:func:`swift_model.nets.dit.compiled.compile_blocks`);
everything else (the embeddings, the heads, the VAEs, the encoders, the sampler steps between DiT calls) stays
eager. Compilation happens during the first generation, on the first call of each shape, and is counted: a
report carries the seconds and graphs of this run's compilation (:func:`compile_report`).

All three memory profiles are accepted: a block's hooks run eagerly around its compiled body, so the ``24gb``
profile's block streamer (which re-points a block's parameters into a device slot in a forward pre-hook) and
FSDP's hooks run as they do eagerly, and parameters are inputs of the graph, not constants, so a graph compiled
for one block serves every block wherever its weights live. Under Ulysses sequence parallelism the two all-to-all
exchanges of a block are traced into its graph as collectives.
"""

from __future__ import annotations

import os
import shutil
from typing import Iterable

import torch

from ..nets.dit.compiled import COMPILE_BACKENDS, CompileStats, compile_blocks

DEFAULT_BACKEND = "inductor"


def compile_backend(option) -> str | None:
    """The torch.compile backend that ``SwiftI2VPipeline(compile=option)`` asks for: ``False``/``None`` -> ``None``
    (eager), ``True`` -> ``"inductor"``, or a backend name of :data:`COMPILE_BACKENDS` (``"aot_eager"`` traces
    without generating code: a quick check of the tracing). ``TypeError``/``ValueError`` naming ``compile``
    otherwise."""
    if option is None or option is False:
        return None
    if option is True:
        return DEFAULT_BACKEND
    if not isinstance(option, str):
        raise TypeError(f"compile must be a bool or a backend name {COMPILE_BACKENDS}, got {type(option).__name__}")
    if option not in COMPILE_BACKENDS:
        raise ValueError(f"compile must be a bool or one of {COMPILE_BACKENDS}, got {option!r}")
    return option


def check_compiler(backend: str | None, device) -> None:
    """Refuse, with one ``ValueError``, a compilation that cannot build its kernels here: inductor on a CPU writes
    C++ and needs a C++ compiler (``$CXX``, ``g++``, ``clang++`` or ``c++`` on ``PATH``). Checked when the pipeline
    is built, so the run does not fail minutes later inside the first DiT call."""
    if backend != "inductor" or torch.device(device).type != "cpu":
        return
    candidates = [os.environ.get("CXX"), "g++", "clang++", "c++"]
    if not any(c and shutil.which(c) for c in candidates):
        raise ValueError("compile: inductor on the CPU needs a C++ compiler and none was found ($CXX, g++, clang++, "
                         "c++); install one, or pass compile='aot_eager' to trace without generating code")


def compile_dits(dits: Iterable, backend: str | None, device="cpu") -> None:
    """Compile the blocks of every DiT of ``dits`` (``None`` entries skipped) with ``backend`` for a run on
    ``device`` (:func:`check_compiler` first); nothing when ``backend`` is ``None``."""
    if backend is None:
        return
    check_compiler(backend, device)
    for dit in dits:
        if dit is not None:
            compile_blocks(dit, backend=backend)


def _stats(dits: Iterable) -> list[CompileStats]:
    return [s for s in (getattr(d, "compile_stats", None) for d in dits if d is not None)
            if isinstance(s, CompileStats)]


def compile_totals(dits: Iterable) -> tuple[float, int]:
    """``(seconds, graphs)`` the compiled blocks of ``dits`` have spent compiling so far (zeros when eager)."""
    stats = _stats(dits)
    return sum(s.seconds for s in stats), sum(s.graphs for s in stats)


def compile_report(dits: Iterable, since: tuple[float, int] | None) -> dict | None:
    """What a generation's report says about compilation: ``None`` when no DiT of ``dits`` is compiled, else
    ``{"backend", "seconds", "graphs"}`` counted from ``since`` (:func:`compile_totals` at the run's start; a
    later run of the same shapes compiles nothing and reports zeros)."""
    dits = list(dits)
    stats = _stats(dits)
    if not stats:
        return None
    seconds, graphs = compile_totals(dits)
    s0, g0 = since if since is not None else (0.0, 0)
    return dict(backend=stats[0].backend, seconds=round(seconds - s0, 3), graphs=graphs - g0)
