"""Fused DiT elementwise ops (AdaLN modulation, gated residual, q/k RMSNorm + 3D RoPE)."""

from .api import adaln_modulate, gated_residual, qk_norm_rope
from .rope import rope_split, rope_table

__all__ = ["adaln_modulate", "gated_residual", "qk_norm_rope", "rope_split", "rope_table"]
