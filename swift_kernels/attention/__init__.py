"""Frame-block-sparse attention for Conditional Segment-wise Generation."""

from .api import csg_attention, frame_block_attention
from .layout import CSGLayout
from .plan import AttentionPlan, plan_attention
from .schedule import allowed_pairs

__all__ = ["AttentionPlan", "CSGLayout", "allowed_pairs", "csg_attention", "frame_block_attention", "plan_attention"]
