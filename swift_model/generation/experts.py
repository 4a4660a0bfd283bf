"""Which expert runs each Stage I step of a two-expert model (Wan2.2-I2V-A14B), and with which guidance.

The rule is diffusers' ``WanImageToVideoPipeline`` (0.42): the boundary timestep is
``boundary_ratio * num_train_timesteps`` (a Python float, 1000 training timesteps); a step whose timestep
``t >= boundary`` runs ``transformer`` (the high-noise expert) with ``guidance_scale``, a step below it runs
``transformer_2`` (the low-noise expert) with ``guidance_scale_2`` (``guidance_scale`` when not given). diffusers
compares its schedule's float32 timestep tensor with the Python float, which torch does in float32; so does
:func:`runs_high_noise_expert`, so a timestep within float32 rounding of the boundary goes where diffusers sends it.

With the 4-step schedule (shift 5: t = 1000, 937.5, 833.3, 625) and ratio 0.9 (boundary 900) the first two steps
run the high-noise expert and the last two the low-noise one; ratio 0 runs the high-noise expert throughout.
"""

from __future__ import annotations

import torch

from ..nets.spec import check_boundary_ratio

NUM_TRAIN_TIMESTEPS = 1000  # the Wan schedulers' num_train_timesteps

__all__ = ["NUM_TRAIN_TIMESTEPS", "boundary_timestep", "expert_plan", "runs_high_noise_expert"]


def boundary_timestep(boundary_ratio: float) -> float:
    """The timestep at which the low-noise expert takes over: ``boundary_ratio * 1000``, computed as diffusers
    computes it (a Python float product)."""
    return check_boundary_ratio(boundary_ratio) * NUM_TRAIN_TIMESTEPS


def runs_high_noise_expert(t: float, boundary_ratio: float | None) -> bool:
    """Whether the step at timestep ``t`` runs the high-noise expert (``transformer``): always without a ratio
    (one expert), else ``t >= boundary`` compared in float32, as diffusers compares its float32 timesteps."""
    if boundary_ratio is None:
        return True
    return bool(torch.tensor(float(t), dtype=torch.float32) >= boundary_timestep(boundary_ratio))


def expert_plan(schedule, boundary_ratio: float | None, guidance_scale: float | None,
                guidance_scale_2: float | None) -> list[tuple[int, float | None]]:
    """Per step of ``schedule`` (``(timestep, sigma, sigma_next)`` tuples): ``(expert, guidance)``, expert 0 the
    high-noise one (or the only one) and 1 the low-noise one, guidance the scale that step combines its two
    branches with (``None``: unguided). ``guidance_scale_2`` applies to the low-noise expert's steps and
    defaults to ``guidance_scale``, as diffusers' ``guidance_scale_2``; it needs two experts."""
    if boundary_ratio is None and guidance_scale_2 is not None:
        raise ValueError("guidance_scale_2 is the low-noise expert's guidance: it needs a two-expert Stage I "
                         "(e.g. Wan2.2-I2V-A14B); this Stage I has one DiT")
    g2 = guidance_scale if guidance_scale_2 is None else guidance_scale_2
    plan = []
    for t, _sigma, _next in schedule:
        high = runs_high_noise_expert(t, boundary_ratio)
        plan.append((0, guidance_scale) if high else (1, g2))
    return plan
