"""Layer 5, the estimate of a generation on fake tensors (``planner``; one rank of several: ``ranks``)."""
