"""Public fused DiT elementwise ops: ``adaln_modulate``, ``gated_residual``, ``qk_norm_rope``.

Each op validates its arguments, resolves the backend through the package's registry (``"torch"`` reference or ``"triton"``
kernel; no CUDA C++ kernel exists for these yet) and runs through a ``torch.library`` custom op, so that autograd
works on every backend (analytic fp32 backward formulas from :mod:`.reference`) and ``torch.compile``
traces the op as one node.

``adaln_modulate`` and ``gated_residual`` take their modulation per sample ``[B, 1, C]``, per token
``[B, L, C]``, or, with ``mod_index``, as tables of K rows plus a per-token row index (per-token timesteps
with few distinct values, as in a CSG window).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._backend import ADALN_MODULATE, GATED_RESIDUAL, QK_NORM_ROPE, choose_backend
from . import reference as ref

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The Triton kernels handle the GPU dtypes; float64 goes through the reference only.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, ndim: int | tuple[int, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in dims:
            raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")


def _check_same_device(ref_name: str, ref_t: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref_t.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref_t.device}")


def _check_modulation(name: str, m, x: torch.Tensor) -> None:
    """A modulation vector is per sample ``[B, 1, C]`` or per token ``[B, L, C]`` for ``x [B, L, C]``."""
    _check_tensor(name, m, 3)
    B, L, C = x.shape
    if m.shape[0] != B or m.shape[2] != C or m.shape[1] not in (1, L):
        raise ValueError(
            f"{name} must have shape [{B}, 1, {C}] (per sample) or [{B}, {L}, {C}] (per token), "
            f"got {tuple(m.shape)}"
        )
    if m.shape[-1] > 1 and m.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {m.stride()}")


def _check_table(name: str, t, x: torch.Tensor) -> None:
    """With ``mod_index``, a modulation input is a table ``[B, K, C]`` or ``[K, C]`` (shared by the batch)."""
    _check_tensor(name, t, (2, 3))
    B, L, C = x.shape
    if t.shape[-1] != C or (t.dim() == 3 and t.shape[0] != B) or t.shape[-2] == 0:
        raise ValueError(
            f"{name} must be a modulation table [{B}, K, {C}] or [K, {C}] (K >= 1) when mod_index is given, "
            f"got {tuple(t.shape)}"
        )
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}")


# Index dtypes the kernels read directly; other integer dtypes are converted (the index is [B, L]: cheap).
_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_mod_index(mod_index, x: torch.Tensor, tables: dict) -> torch.Tensor:
    """Validate ``mod_index`` against ``x`` and the tables; returns it as int32/int64.

    Range check (``0 <= mod_index < K``): done exactly for CPU tensors, where it is free. On an accelerator
    it would cost a device synchronisation per call (30 layers x 4 calls per DiT step), so it is skipped
    there: an out-of-range index is the caller's error and reads out of bounds. The indices built by
    ``torch.unique(..., return_inverse=True)`` (as ``swift_model`` does) are in range by construction.
    It is skipped as well while ``torch.compile`` traces (a data-dependent check would break the graph).
    """
    if not isinstance(mod_index, torch.Tensor):
        raise TypeError(f"mod_index must be an integer torch.Tensor [B, L] or [L], got {type(mod_index).__name__}")
    if mod_index.dtype == torch.bool or mod_index.is_floating_point() or mod_index.is_complex():
        raise TypeError(f"mod_index must be an integer tensor (int32/int64), got {mod_index.dtype}")
    B, L, _ = x.shape
    if tuple(mod_index.shape) not in ((B, L), (L,)):
        raise ValueError(f"mod_index must have shape [{B}, {L}] or [{L}] (one row index per token), got {tuple(mod_index.shape)}")
    if mod_index.device != x.device:
        raise ValueError(f"mod_index is on {mod_index.device} but x is on {x.device}")
    ks = {name: t.shape[-2] for name, t in tables.items() if t is not None}
    if len(set(ks.values())) > 1:
        raise ValueError(f"the modulation tables must have the same number of rows K, got {ks}")
    if mod_index.dtype not in _INDEX_DTYPES:
        mod_index = mod_index.to(torch.int64)
    if mod_index.device.type == "cpu" and not torch.compiler.is_compiling() and not _is_fake(mod_index):
        K = next(iter(ks.values()))
        lo, hi = int(mod_index.min()), int(mod_index.max())
        if lo < 0 or hi >= K:
            raise ValueError(f"mod_index values must lie in [0, {K}) (K = rows of the tables), got [{lo}, {hi}]")
    return mod_index


def _is_fake(t: torch.Tensor) -> bool:
    """A fake tensor (a memory planner's) has no values to check."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _check_x(name: str, x) -> None:
    _check_tensor(name, x, 3)
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {x.stride()}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def _check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be a floating dtype or None, got {out_dtype!r}")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a non-negative finite float, got {eps!r}")
    return float(eps)


_FAMILIES = {f.name: f for f in (ADALN_MODULATE, GATED_RESIDUAL, QK_NORM_ROPE)}


def _resolve(backend, device, op, *tensors, head_dim: int | None = None) -> str:
    """The backend of one call (the package's registry decides; these are the ops' limits per backend)."""

    def why_not(name):
        if name != "triton":
            return None
        if any(t is not None and t.dtype not in TRITON_DTYPES for t in tensors):
            return TypeError, f"float64 tensors (it takes {TRITON_DTYPES})"
        if head_dim is not None and head_dim & (head_dim - 1):
            return ValueError, f"head dim {head_dim} (it needs a power-of-two head dim)"
        return None

    return choose_backend(_FAMILIES[op], backend, device, why_not=why_not)


def _triton():
    from . import triton_kernels

    return triton_kernels


# ------------------------------------------------------------------------------------------------
# torch.library ops
# ------------------------------------------------------------------------------------------------


# ``mod_index`` (last, optional) switches the modulation inputs to tables read through a per-token row
# index; the output shapes do not depend on it, so the fake implementations only pass it through.


@torch.library.custom_op("swift_kernels::adaln_modulate", mutates_args=())
def _adaln_modulate_op(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    out_dtype: Optional[torch.dtype],
    backend: str,
    mod_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if backend == "triton":
        return _triton().adaln_modulate(x, shift, scale, eps, out_dtype, mod_index)
    return ref.adaln_modulate(x, shift, scale, eps, out_dtype, mod_index).contiguous()


@_adaln_modulate_op.register_fake
def _(x, shift, scale, eps, out_dtype, backend, mod_index=None):
    return torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)


def _adaln_setup(ctx, inputs, output):
    x, shift, scale, eps, _, _, mod_index = inputs
    ctx.save_for_backward(x, shift, scale, mod_index)
    ctx.eps = eps


def _adaln_backward(ctx, grad):
    x, shift, scale, mod_index = ctx.saved_tensors
    dx, dshift, dscale = ref.adaln_modulate_backward(grad, x, shift, scale, ctx.eps, mod_index)
    return dx, dshift, dscale, None, None, None, None


_adaln_modulate_op.register_autograd(_adaln_backward, setup_context=_adaln_setup)


@torch.library.custom_op("swift_kernels::gated_residual", mutates_args=())
def _gated_residual_op(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, backend: str, mod_index: Optional[torch.Tensor] = None
) -> torch.Tensor:
    if backend == "triton":
        return _triton().gated_residual(x, y, gate, mod_index=mod_index)
    return ref.gated_residual(x, y, gate, mod_index).contiguous()


@_gated_residual_op.register_fake
def _(x, y, gate, backend, mod_index=None):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _gr_setup(ctx, inputs, output):
    x, y, gate, _, mod_index = inputs
    ctx.save_for_backward(x, y, gate, mod_index)


def _gr_backward(ctx, grad):
    x, y, gate, mod_index = ctx.saved_tensors
    dx, dy, dgate = ref.gated_residual_backward(grad, x, y, gate, mod_index)
    return dx, dy, dgate, None, None


_gated_residual_op.register_autograd(_gr_backward, setup_context=_gr_setup)


@torch.library.custom_op("swift_kernels::gated_residual_adaln", mutates_args=())
def _gated_residual_adaln_op(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    out_dtype: Optional[torch.dtype],
    backend: str,
    mod_index: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _triton().gated_residual(x, y, gate, shift, scale, eps, out_dtype, mod_index)
    new_x, mod = ref.gated_residual_adaln(x, y, gate, shift, scale, eps, out_dtype, mod_index)
    return new_x.contiguous(), mod.contiguous()


@_gated_residual_adaln_op.register_fake
def _(x, y, gate, shift, scale, eps, out_dtype, backend, mod_index=None):
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device),
    )


def _gra_setup(ctx, inputs, output):
    x, y, gate, shift, scale, eps, _, _, mod_index = inputs
    new_x, _ = output
    ctx.save_for_backward(x, y, gate, shift, scale, new_x, mod_index)
    ctx.eps = eps


def _gra_backward(ctx, grad_new_x, grad_mod):
    x, y, gate, shift, scale, new_x, mod_index = ctx.saved_tensors
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = grad_new_x.to(ct) if grad_new_x is not None else torch.zeros(x.shape, dtype=ct, device=x.device)
    dshift = dscale = None
    if grad_mod is not None:
        # new_x feeds both outputs: the modulated branch adds its input gradient to new_x's gradient
        dnx, dshift, dscale = ref.adaln_modulate_backward(grad_mod, new_x.to(ct), shift, scale, ctx.eps, mod_index)
        g = g + dnx
    dx, dy, dgate = ref.gated_residual_backward(g, x, y, gate, mod_index)
    return dx, dy, dgate, dshift, dscale, None, None, None, None


_gated_residual_adaln_op.register_autograd(_gra_backward, setup_context=_gra_setup)


@torch.library.custom_op("swift_kernels::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    freqs: torch.Tensor,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _triton().qk_norm_rope(q, k, weight_q, weight_k, freqs, eps)
    return ref.qk_norm_rope(q, k, weight_q, weight_k, freqs, eps)


@_qk_norm_rope_op.register_fake
def _(q, k, weight_q, weight_k, freqs, eps, backend):
    return (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        torch.empty(k.shape, dtype=k.dtype, device=k.device),
    )


def _qk_setup(ctx, inputs, output):
    q, k, wq, wk, freqs, eps, _ = inputs
    ctx.save_for_backward(q, k, wq, wk, freqs)
    ctx.eps = eps


def _qk_backward(ctx, grad_q, grad_k):
    q, k, wq, wk, freqs = ctx.saved_tensors
    dq = dwq = dk = dwk = None
    if grad_q is not None:
        dq, dwq = ref.rms_norm_rope_backward(grad_q, q, wq, freqs, ctx.eps)
    if grad_k is not None:
        dk, dwk = ref.rms_norm_rope_backward(grad_k, k, wk, freqs, ctx.eps)
    return dq, dk, dwq, dwk, None, None, None


_qk_norm_rope_op.register_autograd(_qk_backward, setup_context=_qk_setup)


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------


def adaln_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    *,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
    mod_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm (no affine) + AdaLN modulation in one pass: ``LN(x) * (1 + scale) + shift``.

    Args:
        x: ``[B, L, C]`` activations (fp16/bf16/fp32; fp64 through the reference), last dim contiguous.
        shift, scale: ``[B, 1, C]`` (per sample) or ``[B, L, C]`` (per token, Wan2.2), any float dtype,
            last dim contiguous (strided views such as ``e.chunk(6, dim=1)`` are fine).
        eps: LayerNorm epsilon (default 1e-6).
        out_dtype: dtype of the result (the GEMM input dtype); default ``x.dtype``.
        backend: ``None`` (``SWIFT_KERNELS_BACKEND`` if set, else the Triton kernel on a GPU where it is verified
            (:mod:`swift_kernels.verified`) and the reference elsewhere; float64 goes to the reference) or
            ``"torch"`` / ``"triton"``. An explicit request (argument or environment) that cannot run raises:
            ``BackendUnavailableError``, or ``TypeError`` for float64 on Triton.
        mod_index: optional integer ``[B, L]`` or ``[L]`` (shared by the batch) row index. When given,
            ``shift`` and ``scale`` are *tables* ``[B, K, C]`` or ``[K, C]`` (same K) and token ``l`` of
            sample ``b`` uses row ``mod_index[b, l]``: the form of per-token timesteps that take only K
            distinct values (a CSG window: the step's t, and 0 on the clean blocks), which saves reading
            ``[B, L, C]`` fp32 modulation per token. Values must lie in ``[0, K)``; this is checked on CPU
            tensors only (on a GPU the check would synchronise the device; an out-of-range index there is
            undefined). Not differentiable (the tables are).

    Statistics and math are fp32 (the result is rounded once). Differentiable w.r.t. x, shift, scale
    (with ``mod_index``, the tables' gradients sum the tokens that read each row).
    Returns a contiguous ``[B, L, C]`` tensor.
    """
    _check_x("x", x)
    if mod_index is None:
        _check_modulation("shift", shift, x)
        _check_modulation("scale", scale, x)
    else:
        _check_table("shift", shift, x)
        _check_table("scale", scale, x)
    _check_same_device("x", x, shift=shift, scale=scale)
    if mod_index is not None:
        mod_index = _check_mod_index(mod_index, x, dict(shift=shift, scale=scale))
    _check_out_dtype(out_dtype)
    eps = _check_eps(eps)
    chosen = _resolve(backend, x.device, "adaln_modulate", x, shift, scale)
    return _adaln_modulate_op(x, shift, scale, eps, out_dtype, chosen, mod_index)


def gated_residual(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    *,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
    mod_index: torch.Tensor | None = None,
):
    """Gated residual ``x + gate * y`` (fp32 math, result in ``x.dtype``), optionally fused with AdaLN.

    Args:
        x: ``[B, L, C]`` residual stream; y: ``[B, L, C]`` branch output (any float dtype).
        gate: ``[B, 1, C]`` or ``[B, L, C]``.
        shift, scale: when both are given, the next block's modulation is computed in the same pass.
        eps, out_dtype, backend: as in :func:`adaln_modulate`.
        mod_index: as in :func:`adaln_modulate`: ``gate`` (and ``shift``/``scale`` when given) are then
            tables ``[B, K, C]`` or ``[K, C]`` with one K, read at row ``mod_index[b, l]`` by token ``(b, l)``.

    Returns ``new_x`` alone, or ``(new_x, adaln_modulate(new_x, shift, scale, eps, out_dtype=out_dtype))``
    when shift and scale are given; the modulation reads the *rounded* new_x, so the fused result equals
    the unfused sequence. Differentiable w.r.t. all tensor inputs.
    """
    _check_x("x", x)
    _check_tensor("y", y, 3)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.stride(-1) != 1 and y.shape[-1] > 1:
        raise ValueError(f"y must have a contiguous last dim (stride(-1) == 1), got strides {y.stride()}")
    check = _check_modulation if mod_index is None else _check_table
    check("gate", gate, x)
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale must be given together (or neither)")
    if shift is not None:
        check("shift", shift, x)
        check("scale", scale, x)
    _check_same_device("x", x, y=y, gate=gate, shift=shift, scale=scale)
    if mod_index is not None:
        mod_index = _check_mod_index(mod_index, x, dict(gate=gate, shift=shift, scale=scale))
    _check_out_dtype(out_dtype)
    eps = _check_eps(eps)
    if shift is None:
        if out_dtype is not None:
            raise ValueError("out_dtype applies to the fused modulation only; pass shift and scale too")
        chosen = _resolve(backend, x.device, "gated_residual", x, y, gate)
        return _gated_residual_op(x, y, gate, chosen, mod_index)
    chosen = _resolve(backend, x.device, "gated_residual", x, y, gate, shift, scale)
    return _gated_residual_adaln_op(x, y, gate, shift, scale, eps, out_dtype, chosen, mod_index)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    freqs: torch.Tensor,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of q and k over the whole hidden width ``H*D`` (across heads, as Wan), then 3D RoPE.

    Args:
        q, k: ``[B, L, H, D]``, same shape/dtype/device, last dim contiguous; other strides are free (a
            view of the ``[B, L, H*D]`` projection output is typical).
        weight_q, weight_k: RMSNorm weights ``[H*D]``.
        freqs: float32 (or float64) (cos, sin) table ``[L, D//2, 2]``, ``[1, L, D//2, 2]`` or
            ``[B, L, D//2, 2]`` (see :func:`swift_kernels.rope_table`); pairs are adjacent elements (2i, 2i+1).
        eps: RMSNorm epsilon (default 1e-6).
        backend: as in :func:`adaln_modulate`; the automatic choice also takes the reference for a head dim
            that is not a power of two, an explicit ``"triton"`` raises ``ValueError`` there.

    Math in fp32; the normalised value is rounded to the input dtype before the weight, as
    ``WanRMSNorm`` does. Returns ``(q_out, k_out)`` contiguous ``[B, L, H, D]`` in the input dtype.
    Differentiable w.r.t. q, k and the weights (not freqs). The Triton kernel needs D a power of two.
    """
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    B, L, H, D = q.shape
    if D % 2:
        raise ValueError(f"head dim of q must be even for RoPE pairs, got {D}")
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}")
    for name, w in (("weight_q", weight_q), ("weight_k", weight_k)):
        _check_tensor(name, w, 1)
        if w.shape[0] != H * D:
            raise ValueError(f"{name} must have shape [{H * D}] (H*D), got {tuple(w.shape)}")
    _check_tensor("freqs", freqs, (3, 4))
    if freqs.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"freqs must be float32 (cos, sin) pairs, got {freqs.dtype}")
    if tuple(freqs.shape[-3:]) != (L, D // 2, 2) or (freqs.dim() == 4 and freqs.shape[0] not in (1, B)):
        raise ValueError(f"freqs must have shape [{L}, {D // 2}, 2] or [{B}, {L}, {D // 2}, 2], got {tuple(freqs.shape)}")
    _check_same_device("q", q, k=k, weight_q=weight_q, weight_k=weight_k, freqs=freqs)
    eps = _check_eps(eps)
    chosen = _resolve(backend, q.device, "qk_norm_rope", q, k, weight_q, weight_k, head_dim=D)
    return _qk_norm_rope_op(q, k, weight_q, weight_k, freqs, eps, chosen)
