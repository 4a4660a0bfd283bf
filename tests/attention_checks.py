"""Shared checks of attention results against DESIGN.md's tolerance rule (imported by the attention tests).

A low-precision kernel passes when its max error against an fp32 (or fp64) reference is at most twice the
error of the same computation done by PyTorch in that precision, plus a rounding floor of one unit in the
last place of the largest reference value. PyTorch's own computation is SDPA in the input dtype (flash, cuDNN
or memory-efficient on a GPU: fp32 accumulation, like our kernels), run through ``backend="sdpa"``, which also
gives rows with no allowed key zeros instead of NaN.
"""

from __future__ import annotations

import math

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def floor(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """One ulp of the largest value of ``truth`` in ``dtype``: the rounding of the result itself."""
    return torch.finfo(dtype).eps * truth.abs().max().item()


def bound(truth: torch.Tensor, lowp_baseline: torch.Tensor, dtype: torch.dtype) -> float:
    """DESIGN.md's rule: 2x PyTorch's own low-precision error plus the rounding floor."""
    return 2 * max_err(lowp_baseline, truth) + floor(truth, dtype)


def check_rule(name: str, got: torch.Tensor, truth: torch.Tensor, lowp_baseline: torch.Tensor, dtype) -> None:
    err, tol = max_err(got, truth), bound(truth, lowp_baseline, dtype)
    assert math.isfinite(err), f"{name}: non-finite values"
    assert err <= tol, f"{name}: error {err:.3e} > bound {tol:.3e} (2 x PyTorch's {max_err(lowp_baseline, truth):.3e} + floor)"


def sdpa_baseline(q, k, v, dout, plan, scale):
    """PyTorch's SDPA in the inputs' dtype on the plan's mask: ``(out, dq, dk, dv)`` (``dout=None``: out only)."""
    from swift_kernels import frame_block_attention

    leaves = [t.detach().clone().requires_grad_(dout is not None) for t in (q, k, v)]
    out = frame_block_attention(*leaves, plan, softmax_scale=scale, backend="sdpa")
    if dout is None:
        return (out.detach(),)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout))
