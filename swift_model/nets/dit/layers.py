"""The small modules of the DiT (names follow diffusers' ``WanTransformer3DModel``) and which parameters stay fp32.

- :class:`_RMSNorm`, :class:`_LayerNorm`: Wan's norms (computed in fp32, result in the input dtype);
- :class:`_Proj`, :class:`_FeedForward`: the GELU MLP of a block and of the image embedder;
- :class:`_Attention`: the projections and q/k norms of one attention (the attention itself is in the block);
- :data:`FP32_PARAM_PATTERNS`, :func:`keeps_fp32`: the parameters kept in fp32 whatever the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Parameters kept in fp32 whatever the model dtype (diffusers' _keep_in_fp32_modules and the original's fp32
# autocast regions): the timestep MLP, the modulation tables and the affine LayerNorms.
FP32_PARAM_PATTERNS = ("condition_embedder.time_embedder.", "condition_embedder.time_proj.", "scale_shift_table",
                       ".norm2.", "image_embedder.norm1.", "image_embedder.norm2.")


def keeps_fp32(name: str) -> bool:
    """Whether the parameter ``name`` stays fp32 when the model is cast to a low precision."""
    return any(p in name for p in FP32_PARAM_PATTERNS) or name.startswith("scale_shift_table")


class _RMSNorm(nn.Module):
    """Wan's RMSNorm across the whole width: ``norm(x.float()).type_as(x) * weight``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        n = (xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)).type_as(x)
        return n * self.weight.to(x.dtype)


class _LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, result in the input dtype (diffusers' FP32LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class _Proj(nn.Module):
    """``Linear`` followed by GELU (diffusers' ``GELU`` activation module, holding ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class _FeedForward(nn.Module):
    """``net.0.proj`` -> GELU -> ``net.2`` (index 1 is diffusers' dropout slot)."""

    def __init__(self, dim: int, inner: int, dim_out: int | None = None, approximate: str = "tanh") -> None:
        super().__init__()
        self.net = nn.ModuleList([_Proj(dim, inner, approximate), nn.Identity(), nn.Linear(inner, dim_out or dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class _Attention(nn.Module):
    """Projections and q/k norms of one attention (self or cross); the attention itself is in the block."""

    def __init__(self, dim: int, eps: float, added_kv_dim: int | None = None) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = _RMSNorm(dim, eps)
        self.norm_k = _RMSNorm(dim, eps)
        if added_kv_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_dim, dim)
            self.norm_added_k = _RMSNorm(dim, eps)
        else:
            self.add_k_proj = self.add_v_proj = self.norm_added_k = None
