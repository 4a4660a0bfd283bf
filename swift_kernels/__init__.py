"""swift_kernels: GPU kernels for 2K image-to-video by Conditional Segment-wise Generation (SwiftI2V).

Every op has a plain PyTorch reference, a Triton kernel and, where it pays, a CUDA C++ kernel in the
compiled extension ``swift_kernels._C``. Importing this package never requires the extension. Attention takes
an :class:`AttentionPlan` (``plan_attention(layout, device=...)``, built once per layout shape); the automatic
backend choice uses our kernels only where they are verified on the GPU at hand (:mod:`swift_kernels.verified`).
"""

from ._backend import BackendUnavailableError, extension_available
from .attention import AttentionPlan, CSGLayout, allowed_pairs, csg_attention, frame_block_attention, plan_attention
from .dit_ops import adaln_modulate, gated_residual, qk_norm_rope, rope_table
from .sampler import FlowSchedule, FlowStepResult, flow_step

__version__ = "0.1.0"

__all__ = [
    "AttentionPlan",
    "BackendUnavailableError",
    "CSGLayout",
    "FlowSchedule",
    "FlowStepResult",
    "adaln_modulate",
    "allowed_pairs",
    "csg_attention",
    "extension_available",
    "flow_step",
    "frame_block_attention",
    "gated_residual",
    "plan_attention",
    "qk_norm_rope",
    "rope_table",
]
