"""The few-step flow-matching schedule (shifted sigmas, as in Wan / SwiftI2V)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch


class FlowSchedule:
    """Few-step flow-matching schedule with timestep shift.

    ``FlowSchedule(timesteps=(1000, 750, 500, 250), shift=5.0)``: for each model timestep ``t``,
    ``s = t/1000`` and ``sigma = shift*s / (1 + (shift-1)*s)`` (1.0, 0.9375, 0.8333, 0.625 by default).

    Attributes (1-D float64 tensors, one entry per step):
        sigmas: the noise level of each step's input.
        timesteps: the timestep the model is conditioned on, ``1000 * sigma``.
        next_sigmas: the sigma after each step (0 after the last step).

    ``len(schedule)`` is the number of steps; iterating yields ``(timestep, sigma, sigma_next)`` as
    Python floats, ready for :func:`swift_kernels.sampler.flow_step`.
    """

    def __init__(self, timesteps: Sequence[float] = (1000, 750, 500, 250), shift: float = 5.0):
        if isinstance(timesteps, (str, bytes)):
            raise TypeError(f"timesteps must be a sequence of numbers, got {type(timesteps).__name__}")
        try:
            ts = [float(t) for t in timesteps]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"timesteps must be a sequence of numbers, got {timesteps!r}") from exc
        if not ts:
            raise ValueError("timesteps must not be empty")
        if any(not (0.0 < t <= 1000.0) for t in ts):
            raise ValueError(f"timesteps must lie in (0, 1000], got {ts}")
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"timesteps must be strictly decreasing, got {ts}")
        if isinstance(shift, bool) or not isinstance(shift, (int, float)):
            raise TypeError(f"shift must be a number, got {type(shift).__name__}")
        if not 0 < shift < math.inf:
            raise ValueError(f"shift must be positive and finite, got {shift!r}")
        self.shift = float(shift)
        s = torch.tensor(ts, dtype=torch.float64) / 1000.0
        self.sigmas = self.shift * s / (1.0 + (self.shift - 1.0) * s)
        self.timesteps = 1000.0 * self.sigmas
        self.next_sigmas = torch.cat((self.sigmas[1:], torch.zeros(1, dtype=torch.float64)))

    def __len__(self) -> int:
        return int(self.sigmas.numel())

    def __iter__(self) -> Iterator[tuple[float, float, float]]:
        for t, s, n in zip(self.timesteps.tolist(), self.sigmas.tolist(), self.next_sigmas.tolist()):
            yield t, s, n

    def __repr__(self) -> str:
        return f"FlowSchedule(sigmas={[round(s, 4) for s in self.sigmas.tolist()]}, shift={self.shift})"
