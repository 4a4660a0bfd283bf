"""Choosing an implementation (backend) for an op.

Every public op takes ``backend=None | "torch" | "triton" | "cuda"``. ``None`` means: the value of the
environment variable ``SWIFT_KERNELS_BACKEND`` if it is set, otherwise the fastest available backend for
the tensors' device (CUDA extension, then Triton, on a GPU; the PyTorch reference on a CPU).

Under ``TRITON_INTERPRET=1`` Triton kernels run on CPU tensors, so ``"triton"`` is available on the CPU
then (that is how the CPU test suite checks the kernels); it is never chosen automatically there.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "SWIFT_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is asked for explicitly but cannot run here."""


def triton_interpreting() -> bool:
    """True when Triton kernels are being run by the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run tensors on ``device`` (``None`` when it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err is not None:
            return f"Triton is not importable ({err})"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return (
            f"Triton kernels need CUDA tensors (got device {device}); on a CPU they run only under "
            "TRITON_INTERPRET=1"
        )
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors (got device {device})"
        err = _extension_import_error()
        if err is not None:
            return f"the compiled extension swift_kernels._C is not available ({err})"
        return None
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def backend_is_explicit(backend: str | None) -> bool:
    """True when a backend was asked for, by the argument or by ``SWIFT_KERNELS_BACKEND``.

    An explicit request that cannot be met raises; only the automatic choice may fall back quietly.
    """
    return backend is not None or bool(os.environ.get(ENV_VAR))


def resolve_backend(
    backend: str | None,
    device: torch.device,
    *,
    supported: tuple[str, ...] = BACKENDS,
    op: str = "op",
) -> str:
    """Pick the backend that will run ``op`` on ``device``.

    ``supported`` lists the backends that implement this op. An explicit request (argument or
    environment variable) that cannot be honoured raises :class:`BackendUnavailableError`; the automatic
    choice always succeeds because the PyTorch reference runs everywhere.
    """
    explicit = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if explicit is not None:
        if not isinstance(explicit, str) or explicit not in BACKENDS:
            source = "backend" if backend is not None else ENV_VAR
            raise ValueError(f"{source} must be one of {BACKENDS} or None, got {explicit!r}")
        if explicit not in supported:
            raise BackendUnavailableError(f"{op} has no {explicit!r} implementation (it has {supported})")
        reason = backend_unavailable_reason(explicit, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {explicit!r} is unavailable: {reason}")
        return explicit
    if device.type == "cuda":
        for candidate in ("cuda", "triton"):
            if candidate in supported and backend_unavailable_reason(candidate, device) is None:
                return candidate
    return "torch"


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)
