"""Frame-block-sparse attention for Conditional Segment-wise Generation."""

from .api import csg_attention, frame_block_attention
from .layout import CSGLayout
from .schedule import allowed_pairs

__all__ = ["CSGLayout", "allowed_pairs", "csg_attention", "frame_block_attention"]
