"""The attention backends, registered in one place: one record (:class:`AttentionBackend`) per backend.

Each record sits beside its implementation (``attention/torch_backends.py``, ``triton_backend.py``,
``cuda_backend.py``); the lines at the end of this module register where it lives. A record is imported the
first time it is needed, so importing the package loads no backend module (nor Triton, nor the extension).
Adding a backend: write its module with its record, add one :func:`register` line here.

The dispatch (:mod:`swift_kernels._backend`, :mod:`swift_kernels.attention.api`) reads only the records: the
valid ``backend=`` names, which can run on a device, which take given inputs, which are our GPU kernels (then
the automatic choice needs :mod:`swift_kernels.verified`), what runs dense plans and what is the GPU fallback.
The fused ops (sampler, DiT ops) share the names ``"torch"`` and ``"triton"`` and the records' availability.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import torch

REFERENCE = "torch"  # every op's reference: the last automatic choice, and what runs an empty batch


def runs_anywhere(device: torch.device) -> str | None:
    """The availability of a backend that runs on every device (PyTorch's own ops)."""
    return None


def takes_anything(head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """The input limits of a backend that takes every head_dim and float dtype."""
    return None


def backward_built() -> None:
    """Why a backend's build lacks its backward: ``None``, nothing (every backend but a partial build)."""
    return None


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionBackend:
    """One attention backend.

    ``unavailable(device)``: why it cannot run tensors on ``device`` (``None`` when it can);
    ``unsupported(head_dim, dtype, device)``: ``None`` when it takes such inputs, else ``(exception type, why)``.

    ``forward``/``backward``: our op's contract, ``forward(q, k, v, tables, scale) -> (out, lse)`` and
    ``backward(dout, q, k, v, out, lse, tables, scale) -> (dq, dk, dv)`` (tables: the plan's
    :class:`~swift_kernels.attention.plan.KernelTables`; ``lse`` natural-log, so any backward serves any forward).
    ``differentiable``: instead, ``forward(q, k, v, plan, scale) -> out`` is PyTorch's own differentiable op,
    called directly (no backward; empty batches are its own business). ``backward_missing()``: why this build
    has no backward (``None`` when it has one); the reference's backward then runs, with a warning.

    ``custom``: one of our GPU kernels: the automatic choice takes it only where verified
    (:mod:`swift_kernels.verified`), higher ``rank`` first. ``dense_first``: the automatic first choice for
    dense plans. ``gpu_fallback``: the automatic choice on a GPU where none of ours is verified.
    ``variant(device)``: the forward to run there, this backend's name or a key of ``variants`` (named
    ``"<name>-<variant>"``: other forwards, such as the Hopper ``"cuda-sm90"``, sharing this backward).
    """

    name: str
    unavailable: Callable[[torch.device], str | None] = runs_anywhere
    unsupported: Callable[[int, torch.dtype, torch.device], tuple[type[Exception], str] | None] = takes_anything
    forward: Callable[..., Any] | None = None
    backward: Callable[..., Any] | None = None
    differentiable: bool = False
    backward_missing: Callable[[], str | None] = backward_built
    custom: bool = False
    rank: int = 0
    dense_first: bool = False
    gpu_fallback: bool = False
    variant: Callable[[torch.device], str] | None = None
    variants: Mapping[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.name or "-" in self.name:
            raise ValueError(f"a backend name is a non-empty word without '-', got {self.name!r}")
        if self.forward is None:
            raise ValueError(f"backend {self.name!r} has no forward")
        if not self.differentiable and self.backward is None:
            raise ValueError(f"backend {self.name!r} needs a backward (or differentiable=True)")
        for key in self.variants:
            if not key.startswith(self.name + "-"):
                raise ValueError(f"backend {self.name!r}: a variant is named '{self.name}-...', got {key!r}")

    def forward_of(self, run_name: str) -> Callable[..., Any]:
        """The forward that ``run_name`` (this backend's name or one of its variants) names."""
        return self.forward if run_name == self.name else self.variants[run_name]


# name -> its record, or where it lives ("module:ATTRIBUTE", imported on first use); in registration order.
_REGISTERED: dict[str, AttentionBackend | str] = {}


def register(name: str, record: AttentionBackend | str) -> None:
    """Register backend ``name``: its record, or the place of it (``"package.module:ATTRIBUTE"``)."""
    if name in _REGISTERED:
        raise ValueError(f"attention backend {name!r} is registered already")
    if isinstance(record, AttentionBackend) and record.name != name:
        raise ValueError(f"the record of {name!r} is named {record.name!r}")
    _REGISTERED[name] = record


def unregister(name: str) -> None:
    """Remove backend ``name`` (for tests registering a backend of their own)."""
    del _REGISTERED[name]


def names() -> tuple[str, ...]:
    """The registered backends' names, in registration order (the valid ``backend=`` strings)."""
    return tuple(_REGISTERED)


def get(name: str) -> AttentionBackend:
    """The record of backend ``name``, or of the backend whose variant ``name`` is (``"cuda-sm90"``: cuda's)."""
    base = name.split("-", 1)[0]
    record = _REGISTERED[base]
    if isinstance(record, str):
        module, _, attribute = record.partition(":")
        record = getattr(importlib.import_module(module), attribute)
        if record.name != base:
            raise ValueError(f"{_REGISTERED[base]} is the record of {record.name!r}, registered as {base!r}")
        _REGISTERED[base] = record
    if name != base and name not in record.variants:
        raise KeyError(f"backend {base!r} has no variant {name!r}")
    return record


def records() -> tuple[AttentionBackend, ...]:
    """Every registered record, in registration order (imports their modules)."""
    return tuple(get(name) for name in names())


def custom() -> tuple[str, ...]:
    """Our GPU kernels, in the order the automatic choice tries them (higher rank first)."""
    ours = [r for r in records() if r.custom]
    return tuple(r.name for r in sorted(ours, key=lambda r: -r.rank))


def dense_first() -> str | None:
    """The automatic first choice for dense plans (``None`` when no backend says so)."""
    return next((r.name for r in records() if r.dense_first), None)


def gpu_fallback() -> str:
    """The automatic choice on a GPU where none of our kernels is verified (the reference when none says so)."""
    return next((r.name for r in records() if r.gpu_fallback), REFERENCE)


register("torch", "swift_kernels.attention.torch_backends:TORCH")
register("triton", "swift_kernels.attention.triton_backend:TRITON")
register("cuda", "swift_kernels.attention.cuda_backend:CUDA")
register("sdpa", "swift_kernels.attention.torch_backends:SDPA")
register("flex", "swift_kernels.attention.torch_backends:FLEX")
