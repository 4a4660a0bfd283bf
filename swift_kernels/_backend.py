"""Choosing an implementation (backend) for an op: one registry for attention, the sampler and the DiT ops.

Every public op takes ``backend=None`` or a name. The names are those registered in
:mod:`swift_kernels._registry`, one record per attention backend (the fused ops have ``"torch"`` and ``"triton"``):

``"torch"``   the PyTorch reference (any device, any float dtype)
``"triton"``  our Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``)
``"cuda"``    our CUDA C++ extension ``swift_kernels._C`` (attention only)
``"sdpa"``    ``torch.nn.functional.scaled_dot_product_attention`` (attention only)
``"flex"``    FlexAttention with the plan's ``BlockMask`` (attention only)

An explicit request (the argument, else the environment variable ``SWIFT_KERNELS_BACKEND``) always runs what it
names, or raises: :class:`BackendUnavailableError` when the backend cannot run here, ``TypeError`` /
``ValueError`` when it cannot take these inputs.

The automatic choice (``backend=None``) is safe first:

1. a preference the op states for these inputs, when it can run (dense attention: ``"sdpa"``);
2. on a GPU, one of our kernels only where it has passed its GPU checks on this compute capability and torch
   version (:mod:`swift_kernels.verified`), or anywhere with ``SWIFT_KERNELS_UNVERIFIED=1``; the CUDA extension
   only on a GPU whose architecture it was compiled for;
3. otherwise the op's GPU fallback (block-sparse attention: ``"flex"``; the fused ops: ``"torch"``);
4. on a CPU (and for fake tensors without a CUDA driver), the reference.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
import warnings
from typing import Callable

import torch

from . import _registry

BACKENDS = _registry.names()  # the registered attention backends' names; the dispatch reads the registry itself
ENV_VAR = "SWIFT_KERNELS_BACKEND"
UNVERIFIED_ENV = "SWIFT_KERNELS_UNVERIFIED"


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is asked for explicitly but cannot run here."""


@dataclasses.dataclass(frozen=True)
class OpFamily:
    """How an op's backend is chosen.

    ``name``: the op (the verified table's ``op``); ``backends``: every implementation it has; ``custom``: our
    GPU kernels among them, in order of preference; ``gpu_fallback``: the automatic choice on a GPU where
    none of ``custom`` is verified.
    """

    name: str
    backends: tuple[str, ...]
    custom: tuple[str, ...]
    gpu_fallback: str


class RegisteredOp:
    """An op whose backends are the registered attention backends (:mod:`swift_kernels._registry`): an
    :class:`OpFamily` whose fields are read from the records at every call, so a backend registered later counts."""

    def __init__(self, name: str):
        self.name = name

    @property
    def backends(self) -> tuple[str, ...]:
        return _registry.names()

    @property
    def custom(self) -> tuple[str, ...]:
        return _registry.custom()

    @property
    def gpu_fallback(self) -> str:
        return _registry.gpu_fallback()


# Attention's backends are the registered records; the fused ops list theirs.
ATTENTION = RegisteredOp("frame_block_attention")
FLOW_STEP = OpFamily("flow_step", ("torch", "triton"), ("triton",), "torch")
ADALN_MODULATE = OpFamily("adaln_modulate", ("torch", "triton"), ("triton",), "torch")
GATED_RESIDUAL = OpFamily("gated_residual", ("torch", "triton"), ("triton",), "torch")
QK_NORM_ROPE = OpFamily("qk_norm_rope", ("torch", "triton"), ("triton",), "torch")

# why_not(backend) -> None when the backend can take these inputs, else (the exception type to raise, why).
WhyNot = Callable[[str], "tuple[type[Exception], str] | None"]


def triton_interpreting() -> bool:
    """True when Triton kernels are being run by the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unverified_allowed() -> bool:
    """True when ``SWIFT_KERNELS_UNVERIFIED=1`` lets the automatic choice take kernels not verified on this GPU."""
    return os.environ.get(UNVERIFIED_ENV, "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def _extension_import_error() -> str | None:
    try:
        importlib.import_module("swift_kernels._C")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def extension_available() -> bool:
    """True when the compiled CUDA extension ``swift_kernels._C`` was built and imports."""
    return _extension_import_error() is None


def extension():
    """The compiled extension module; raises :class:`BackendUnavailableError` when it is missing."""
    err = _extension_import_error()
    if err is not None:
        raise BackendUnavailableError(
            "backend='cuda' needs the compiled extension swift_kernels._C, which is not available "
            f"({err}). Reinstall with a CUDA toolkit and a CUDA build of torch: "
            "pip install --no-build-isolation ."
        )
    return importlib.import_module("swift_kernels._C")


def gpu_present() -> bool:
    """True when a CUDA device can actually run kernels (False for fake CUDA tensors on a CPU machine)."""
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, or None when there is no such device to ask."""
    if device.type != "cuda" or not gpu_present():
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


_ARCH = re.compile(r"^(sm|compute)_(\d+)(\d)([af]?)$")


def arch_serves(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code compiled for ``arch`` runs on a device of ``capability``.

    ``sm_XY`` (a cubin) runs on the devices of major X and minor >= Y; ``sm_XYa`` only on exactly X.Y;
    ``sm_XYf`` on major X, minor >= Y (its family); ``compute_XY`` (PTX, compiled by the driver at load
    time) on every device of capability >= X.Y (``compute_XYa`` only on X.Y).
    """
    m = _ARCH.match(arch)
    if m is None:
        return False
    kind, major, minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if suffix == "a":
        return capability == (major, minor)
    if kind == "compute":
        return capability >= (major, minor)
    return capability[0] == major and capability[1] >= minor


def extension_archs() -> tuple[str, ...]:
    """The architectures the compiled extension carries (``_C.CUDA_ARCHS``; empty when unknown or missing)."""
    if _extension_import_error() is not None:
        return ()
    return tuple(getattr(extension(), "CUDA_ARCHS", ()))


def triton_unavailable(device: torch.device) -> str | None:
    """Why our Triton kernels cannot run tensors on ``device`` (``None`` when they can)."""
    err = _triton_import_error()
    if err is not None:
        return f"Triton is not importable ({err})"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
        return None
    return (
        f"Triton kernels need CUDA tensors (got device {device}); on a CPU they run only under "
        "TRITON_INTERPRET=1"
    )


def extension_unavailable(device: torch.device) -> str | None:
    """Why the CUDA extension cannot run tensors on ``device`` (``None`` when it can): it must import, carry this
    package's tile sizes and have been compiled for the device's architecture."""
    if device.type != "cuda":
        return f"the CUDA extension needs CUDA tensors (got device {device})"
    err = _extension_import_error()
    if err is not None:
        return f"the compiled extension swift_kernels._C is not available ({err})"
    cap = device_capability(device)
    if cap is None:
        return "no CUDA device to run the extension on"
    from .attention.tiles import CUDA_CONSTANTS

    if dict(getattr(extension(), "TILES", {})) != CUDA_CONSTANTS:
        return "swift_kernels._C was built from other sources (its tile sizes differ from this package's): rebuild it"
    archs = extension_archs()
    if not any(arch_serves(a, cap) for a in archs):
        return (
            f"swift_kernels._C was compiled for {', '.join(archs) or 'unknown architectures'}, which cannot run "
            f"on this compute capability {cap[0]}.{cap[1]} device; rebuild with SWIFT_KERNELS_CUDA_ARCHS="
            f"'{cap[0]}.{cap[1]}'"
        )
    return None


def _check_name(name, source: str) -> None:
    if not isinstance(name, str) or name not in _registry.names():
        raise ValueError(f"{source} must be one of {_registry.names()} or None, got {name!r}")


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run tensors on ``device`` (``None`` when it can); its record says."""
    _check_name(backend, "backend")
    return _registry.get(backend).unavailable(device)


def is_verified_here(op: str, backend: str, device: torch.device) -> bool:
    """True when ``op``'s ``backend`` kernel is verified for ``device``'s architecture and this torch."""
    cap = device_capability(device)
    if cap is None:
        return False
    from .verified import is_verified

    return is_verified(op, backend, cap)


def choose_backend(
    family: OpFamily | RegisteredOp,
    backend: str | None,
    device: torch.device,
    *,
    why_not: WhyNot | None = None,
    prefer: str | None = None,
) -> str:
    """The backend that runs ``family``'s op on ``device`` (see the module docstring for the rules).

    ``why_not(name)`` states the op's limits per backend for these inputs (dtype, head dim): ``None`` when it
    can take them, else ``(exception type, reason)``. ``prefer`` is the op's automatic first choice for these
    inputs, taken when it can run.
    """
    why_not = why_not or (lambda name: None)
    explicit = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if explicit is not None:
        _check_name(explicit, "backend" if backend is not None else ENV_VAR)
        if explicit not in family.backends:
            raise BackendUnavailableError(f"{family.name} has no {explicit!r} implementation (it has {family.backends})")
        reason = backend_unavailable_reason(explicit, device)
        if reason is not None:
            raise BackendUnavailableError(f"{family.name}: backend {explicit!r} is unavailable: {reason}")
        limit = why_not(explicit)
        if limit is not None:
            error, why = limit
            raise error(f"{family.name}: backend {explicit!r} does not support {why}")
        return explicit

    def can_run(name: str) -> bool:
        return backend_unavailable_reason(name, device) is None and why_not(name) is None

    if prefer is not None and can_run(prefer):
        return prefer
    if device.type == "cuda" and gpu_present():
        for name in family.custom:
            if can_run(name) and (unverified_allowed() or is_verified_here(family.name, name, device)):
                return name
        if can_run(family.gpu_fallback):
            return family.gpu_fallback
    return "torch"


def constant_under_compile(fn):
    """``torch.compiler.assume_constant_result(fn)``, without importing ``torch._dynamo`` (about a second) when the
    package is imported: that decorator only sets this attribute, which dynamo reads while tracing (torch marks
    its own functions the same way; tests/test_dispatch.py checks that the decorator still does just this)."""
    fn._dynamo_marked_constant = True
    return fn


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)
