"""PyTorch references of the fused DiT elementwise ops (the truth the kernels are tested against).

All math is done in float32 (or in the dtype of the inputs when that is wider, e.g. float64 in tests);
results are cast once at the end. The rounding points follow the Wan block where its numbers depend on them:
``qk_norm_rope`` rounds the RMS-normalised activations to the input dtype before the weight, as
``WanRMSNorm`` does (``self._norm(x.float()).type_as(x) * self.weight``).
"""

from __future__ import annotations

import torch


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # float32 math unless a caller hands us float64 (the tests' high-precision references).
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def layer_norm_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and reciprocal standard deviation over the last dim (biased variance), in the compute dtype."""
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).square().mean(dim=-1, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def gather_rows(table: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Per-token rows of a modulation table: ``out[b, l] = table[b, index[b, l]]``.

    ``table`` is ``[B, K, C]`` or ``[K, C]`` (shared by the batch), ``index`` ``[B, L]`` or ``[L]``
    (shared by the batch). Returns ``[B, L, C]`` or ``[1, L, C]`` (both shared), which broadcasts against
    ``x [B, L, C]``. With ``index=None`` the table is returned as is (the per-sample / per-token layouts).
    """
    if index is None:
        return table
    idx = index.long()
    if table.dim() == 2:
        out = table[idx]  # [B, L, C] or [L, C]
        return out if idx.dim() == 2 else out.unsqueeze(0)
    if idx.dim() == 1:
        return table[:, idx]
    return torch.gather(table, 1, idx[:, :, None].expand(-1, -1, table.shape[-1]))


def scatter_rows(g: torch.Tensor, index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`gather_rows`: sum the per-token gradients ``g [B, L, C]`` into ``table``'s shape.

    Tokens that read the same row add up (``index_add_``); the result is in ``g.dtype``.
    """
    B, L, C = g.shape
    idx = index.long().expand(B, L)
    if table.dim() == 2:
        out = torch.zeros(table.shape, dtype=g.dtype, device=g.device)
        return out.index_add_(0, idx.reshape(-1), g.reshape(-1, C))
    K = table.shape[1]
    flat = idx + torch.arange(B, device=idx.device)[:, None] * K  # row of the [B*K, C] view
    out = torch.zeros((B * K, C), dtype=g.dtype, device=g.device)
    return out.index_add_(0, flat.reshape(-1), g.reshape(-1, C)).reshape(B, K, C)


def adaln_modulate(x, shift, scale, eps=1e-6, out_dtype=None, mod_index=None):
    """``LayerNorm(x) * (1 + scale) + shift`` with no affine LayerNorm, fp32 statistics and math.

    With ``mod_index``, ``shift``/``scale`` are tables and token ``l`` of sample ``b`` reads row
    ``mod_index[b, l]`` (see :func:`gather_rows`).
    """
    ct = _compute_dtype(x, shift, scale)
    shift, scale = gather_rows(shift, mod_index), gather_rows(scale, mod_index)
    xf = x.to(ct)
    mean, rstd = layer_norm_stats(xf, eps)
    y = (xf - mean) * rstd * (1 + scale.to(ct)) + shift.to(ct)
    return y.to(out_dtype or x.dtype)


def gated_residual(x, y, gate, mod_index=None):
    """``x + gate * y`` in fp32, rounded to ``x.dtype`` (``gate`` a table read through ``mod_index`` if given)."""
    ct = _compute_dtype(x, y, gate)
    gate = gather_rows(gate, mod_index)
    return (x.to(ct) + gate.to(ct) * y.to(ct)).to(x.dtype)


def gated_residual_adaln(x, y, gate, shift, scale, eps=1e-6, out_dtype=None, mod_index=None):
    """``new_x = gated_residual(x, y, gate)`` and ``adaln_modulate(new_x, shift, scale)`` of the rounded new_x."""
    new_x = gated_residual(x, y, gate, mod_index)
    return new_x, adaln_modulate(new_x, shift, scale, eps, out_dtype, mod_index)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of ``x [B, L, H, D]`` by the (cos, sin) table ``freqs``.

    ``freqs`` is ``[L, D//2, 2]`` or ``[B, L, D//2, 2]``. Returns the compute dtype (no cast).
    """
    ct = _compute_dtype(x, freqs)
    B, L, H, D = x.shape
    f = freqs.to(ct)
    if f.dim() == 3:
        f = f.unsqueeze(0)
    cos = f[..., 0].unsqueeze(2)  # [B or 1, L, 1, D//2]
    sin = f[..., 1].unsqueeze(2)
    xr = x.to(ct).reshape(B, L, H, D // 2, 2)
    a, b = xr[..., 0], xr[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).reshape(B, L, H, D)


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Wan's RMSNorm over the whole hidden width ``H*D`` of ``x [B, L, H, D]``; returns compute dtype.

    The normalised value is rounded to ``x.dtype`` before the weight is applied, as ``WanRMSNorm`` does.
    """
    ct = _compute_dtype(x, weight)
    B, L, H, D = x.shape
    xf = x.to(ct)
    rstd = torch.rsqrt(xf.square().mean(dim=(-2, -1), keepdim=True) + eps)
    n = (xf * rstd).to(x.dtype).to(ct)
    return n * weight.to(ct).reshape(H, D)


def qk_norm_rope(q, k, weight_q, weight_k, freqs, eps=1e-6):
    """RMSNorm (across heads) then RoPE of q and k; results contiguous in the input dtype."""
    qo = apply_rope(rms_norm_heads(q, weight_q, eps), freqs).to(q.dtype).contiguous()
    ko = apply_rope(rms_norm_heads(k, weight_k, eps), freqs).to(k.dtype).contiguous()
    return qo, ko


# ---------------------------------------------------------------------------------------------------
# Backward formulas (analytic, fp32). Used by the autograd registration of every backend: the ops are
# memory-bound elementwise passes, so the backward's cost is dominated by the GEMMs around it anyway.
# Rounding steps in the forward are treated as the identity (straight-through).
# ---------------------------------------------------------------------------------------------------


def _sum_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the dims where ``like`` is broadcast (size 1), keeping the shape of ``like``."""
    dims = [i for i, (a, b) in enumerate(zip(t.shape, like.shape)) if b == 1 and a != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _reduce_to(t: torch.Tensor, like: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Per-token gradient ``t [B, L, C]`` -> gradient of ``like`` (broadcast sum, or scatter-add by index)."""
    return _sum_to(t, like) if index is None else scatter_rows(t, index, like)


def adaln_modulate_backward(grad, x, shift, scale, eps, mod_index=None):
    """Gradients ``(dx, dshift, dscale)`` of :func:`adaln_modulate` (tables' gradients with ``mod_index``)."""
    ct = _compute_dtype(x, shift, scale)
    g = grad.to(ct)
    xf = x.to(ct)
    mean, rstd = layer_norm_stats(xf, eps)
    n = (xf - mean) * rstd
    dshift = _reduce_to(g, shift, mod_index)
    dscale = _reduce_to(g * n, scale, mod_index)
    dn = g * (1 + gather_rows(scale, mod_index).to(ct))
    dx = rstd * (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True))
    return dx.to(x.dtype), dshift.to(shift.dtype), dscale.to(scale.dtype)


def gated_residual_backward(grad_new_x, x, y, gate, mod_index=None):
    """Gradients ``(dx, dy, dgate)`` of :func:`gated_residual` (the table's gradient with ``mod_index``)."""
    ct = _compute_dtype(x, y, gate)
    g = grad_new_x.to(ct)
    dy = g * gather_rows(gate, mod_index).to(ct)
    dgate = _reduce_to(g * y.to(ct), gate, mod_index)
    return g.to(x.dtype), dy.to(y.dtype), dgate.to(gate.dtype)


def _rope_inverse(g: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    # The rotation is orthogonal: its adjoint is the rotation by the opposite angle.
    f = freqs.to(g.dtype)
    f = torch.stack((f[..., 0], -f[..., 1]), dim=-1)
    return apply_rope(g, f)


def rms_norm_rope_backward(grad, x, weight, freqs, eps):
    """Gradients ``(dx, dweight)`` of one half (q or k) of :func:`qk_norm_rope`."""
    ct = _compute_dtype(x, weight)
    B, L, H, D = x.shape
    du = _rope_inverse(grad.to(ct), freqs)  # gradient w.r.t. the normalised, weighted activations
    xf = x.to(ct)
    rstd = torch.rsqrt(xf.square().mean(dim=(-2, -1), keepdim=True) + eps)
    n = xf * rstd
    w = weight.to(ct).reshape(H, D)
    dweight = (du * n).sum(dim=(0, 1)).reshape(weight.shape)
    dn = du * w
    dx = rstd * (dn - n * (dn * n).mean(dim=(-2, -1), keepdim=True))
    return dx.to(x.dtype), dweight.to(weight.dtype)
