"""Public entry points of frame-block-sparse attention: validation, backend dispatch, autograd.

The forward and backward are registered as ``torch.library`` custom ops (``swift_kernels::fba_forward``
and ``swift_kernels::fba_backward``) with fake implementations, so ``torch.compile(fullgraph=True)``
traces through them, and the autograd formula is attached with ``register_autograd``.
"""

from __future__ import annotations

import importlib
import math
import operator

import torch

from .layout import CSGLayout
from .._backend import (
    BackendUnavailableError,
    backend_is_explicit,
    backend_unavailable_reason,
    extension,
    resolve_backend,
    warn_once,
)

_BACKEND_MODULES = {
    "torch": "swift_kernels.attention.reference",
    "triton": "swift_kernels.attention.triton_backend",
    "cuda": "swift_kernels.attention.cuda_backend",
}


def _backend_module(name: str):
    return importlib.import_module(_BACKEND_MODULES[name])


def _unsupported(module, head_dim: int, dtype: torch.dtype) -> tuple[type[Exception], str] | None:
    """Why ``module`` cannot run this head_dim/dtype, as (the error type to raise, the reason); None when it can."""
    dims = getattr(module, "SUPPORTED_HEAD_DIMS", None)
    if dims is not None and head_dim not in dims:
        return ValueError, f"head_dim {head_dim} (supported: {tuple(dims)})"
    dtypes = getattr(module, "SUPPORTED_DTYPES", None)
    if dtypes is not None and dtype not in dtypes:
        # a dtype the backend lacks is a TypeError, as in the other ops
        return TypeError, f"dtype {dtype} (supported: {tuple(dtypes)})"
    return None


def _choose_backend(backend: str | None, q: torch.Tensor) -> str:
    return _choose_backend_for(backend, q.device, q.shape[-1], q.dtype, q.numel() == 0)


# Under torch.compile the choice is made once, eagerly, while tracing (imports and environment lookups
# cannot be traced) and baked into the graph as a constant.
@torch.compiler.assume_constant_result
def _choose_backend_for(backend, device, head_dim, dtype, empty) -> str:
    """Resolve the backend, then make sure it can run this head_dim and dtype.

    An explicit request (argument or ``SWIFT_KERNELS_BACKEND``) that cannot be met raises; the automatic
    choice falls back along CUDA extension -> Triton -> reference with a one-time warning.
    """
    explicit = backend_is_explicit(backend)
    name = resolve_backend(backend, device, op="frame_block_attention")
    if empty:
        return "torch"  # nothing to launch; the reference handles empty batches
    order = ("cuda", "triton", "torch")
    for candidate in order[order.index(name) :]:
        if candidate != name and backend_unavailable_reason(candidate, device) is not None:
            continue
        try:
            module = _backend_module(candidate)
        except ImportError as exc:  # the backend needs something this install lacks
            if candidate == name and explicit:
                raise BackendUnavailableError(f"frame_block_attention: backend {candidate!r}: {exc}") from exc
            continue
        reason = _unsupported(module, head_dim, dtype)
        if reason is None:
            if candidate != name:
                warn_once(
                    f"fba-fallback-{name}-{head_dim}-{dtype}",
                    f"frame_block_attention: backend {name!r} does not support this input; using {candidate!r}",
                )
            return candidate
        if candidate == name and explicit:
            error, why = reason
            raise error(f"frame_block_attention: backend {name!r} does not support {why}")
    return "torch"


@torch.library.custom_op("swift_kernels::fba_forward", mutates_args=())
def _fba_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_tokens: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _backend_module(backend).forward(q, k, v, block_mask, block_tokens, scale)
    return out, lse


@_fba_forward.register_fake
def _fba_forward_fake(q, k, v, block_mask, block_tokens, scale, backend):
    batch, tokens, heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((batch, heads, tokens), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("swift_kernels::fba_backward", mutates_args=())
def _fba_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_mask: torch.Tensor,
    block_tokens: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "cuda" and not getattr(extension(), "HAS_BACKWARD", True):
        # An extension built with SWIFT_KERNELS_NO_BACKWARD=1 has forward kernels only; every backward
        # consumes the same (out, natural-log lse) contract, so another backend can take over.
        backend = "triton" if backend_unavailable_reason("triton", q.device) is None else "torch"
        warn_once("fba-no-cuda-backward", f"the CUDA extension has no backward kernels; using {backend!r}")
    dq, dk, dv = _backend_module(backend).backward(dout, q, k, v, out, lse, block_mask, block_tokens, scale)
    return dq, dk, dv


@_fba_backward.register_fake
def _fba_backward_fake(dout, q, k, v, out, lse, block_mask, block_tokens, scale, backend):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, block_mask, block_tokens, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, block_mask)
    ctx.block_tokens = block_tokens
    ctx.scale = scale
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, block_mask = ctx.saved_tensors
    dq, dk, dv = _fba_backward(
        dout.contiguous(), q, k, v, out, lse, block_mask, ctx.block_tokens, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None, None


_fba_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check_inputs(q, k, v, block_mask, block_tokens, softmax_scale) -> tuple[int, float]:
    """Validate the arguments of :func:`frame_block_attention`; returns (block_tokens, softmax scale)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if q.shape[-1] < 1:
        raise ValueError(f"q must have head_dim >= 1, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    # integer types other than int (NumPy's, from shapes) are accepted, as CSGLayout does
    if isinstance(block_tokens, (bool, torch.Tensor)) or not hasattr(block_tokens, "__index__"):
        raise TypeError(f"block_tokens must be an int, got {type(block_tokens).__name__}")
    block_tokens = operator.index(block_tokens)
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask must be a torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be a bool tensor, got {block_mask.dtype}")
    tokens = q.shape[1]
    if tokens % block_tokens:
        raise ValueError(f"tokens ({tokens}) must be a multiple of block_tokens ({block_tokens})")
    n_blocks = tokens // block_tokens
    if tuple(block_mask.shape) != (n_blocks, n_blocks):
        raise ValueError(
            f"block_mask must be [n_blocks, n_blocks] = [{n_blocks}, {n_blocks}] "
            f"(tokens {tokens} / block_tokens {block_tokens}), got {tuple(block_mask.shape)}"
        )
    if block_mask.device.type != "cpu" and block_mask.device != q.device:
        raise ValueError(f"block_mask must be on the CPU or on the device of q ({q.device}), got {block_mask.device}")
    if softmax_scale is None:
        return block_tokens, q.shape[-1] ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return block_tokens, float(softmax_scale)


def frame_block_attention(q, k, v, block_mask, block_tokens, softmax_scale=None, backend=None):
    """Self-attention where whole blocks of tokens attend whole blocks, as a block table says.

    Args:
        q, k, v: ``[batch, tokens, heads, head_dim]`` tensors of one shape, dtype and device, with
            ``tokens = n_blocks * block_tokens``.
        block_mask: bool ``[n_blocks, n_blocks]``; query token ``i`` may attend key token ``j`` iff
            ``block_mask[i // block_tokens, j // block_tokens]``. A query with no allowed key outputs zeros.
        block_tokens: tokens per block (one latent frame: 3,520 at 2K for the 5B DiT).
        softmax_scale: defaults to ``head_dim ** -0.5``.
        backend: ``None`` (the CUDA extension, then Triton, on a GPU; the PyTorch reference on a CPU;
            ``SWIFT_KERNELS_BACKEND`` overrides), or ``"torch"``, ``"triton"``, ``"cuda"``.

    Returns:
        The attention output, same shape and dtype as ``q``; differentiable with respect to q, k and v.

    Raises:
        TypeError: a non-tensor, a non-float q/k/v, a non-bool block_mask, a dtype the requested backend lacks.
        ValueError: mismatched shapes or devices, a bad block_tokens/softmax_scale, a head_dim the requested
            backend lacks. ``BackendUnavailableError``: the requested backend cannot run here.
    """
    block_tokens, scale = _check_inputs(q, k, v, block_mask, block_tokens, softmax_scale)
    name = _choose_backend(backend, q)
    # Kernels need a unit stride in head_dim; everything else is passed through as strides.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, _ = _fba_forward(q, k, v, block_mask, block_tokens, scale, name)
    return out


def csg_attention(q, k, v, layout, softmax_scale=None, backend=None):
    """Attention laid out by a :class:`~swift_kernels.CSGLayout` (window, packed windows or whole clip).

    Equal to ``frame_block_attention(q, k, v, layout.block_mask, layout.block_tokens, softmax_scale, backend)``.

    Args:
        q, k, v: ``[batch, layout.num_tokens, heads, head_dim]`` tensors of one shape, dtype and device.
        layout: the :class:`~swift_kernels.CSGLayout` of the sequence.
        softmax_scale, backend: as in :func:`frame_block_attention` (defaults ``head_dim ** -0.5`` and the
            automatic choice).

    Returns:
        The attention output, same shape and dtype as ``q``; differentiable with respect to q, k and v.
    """
    if not isinstance(layout, CSGLayout):
        raise TypeError(f"layout must be a CSGLayout, got {type(layout).__name__}")
    if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[1] != layout.num_tokens:
        raise ValueError(f"q has {q.shape[1]} tokens but the layout lays out {layout.num_tokens}")
    return frame_block_attention(q, k, v, layout.block_mask, layout.block_tokens, softmax_scale, backend)
