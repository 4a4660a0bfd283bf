"""Fused few-step flow-matching sampler ops."""

from .api import FlowStepResult, flow_step
from .schedule import FlowSchedule

__all__ = ["FlowSchedule", "FlowStepResult", "flow_step"]
