"""The VAE passes' device budgets, from the memory profile (generation layer).

A VAE pass's tiles (:func:`~swift_model.nets.vae_geometry.fit_tiles`) are as large as its budget allows: a whole
frame where it fits, so that no latent pixel is computed twice. The budget of a pass is what the profile's
device goal (:attr:`~swift_model.generation.memory.MemoryProfile.device_goal_gib`) leaves beside what the pass's
phase keeps on the device:

- the weights of every component the memory plan places on the device in that phase (all of them under
  ``fast``; the two VAEs in the ``bridge`` under ``balanced`` and ``24gb``; the Stage II VAE in ``decode``),
  counted at their full size whatever a rank holds of them (so that every rank of a parallel pass computes the
  same tiles as one process);
- the clip's latents that the phase holds (both stages', float32, twice for the copies a phase makes);
- a reserve of :data:`RESERVE` of the goal for what the plan's estimate does not count (the caching
  allocator's fragmentation, library workspaces).

The passes: the ``bridge`` decodes the Stage I latents (``vae1``) and encodes the 2K reference (``vae2``), one
after the other; ``decode`` decodes the Stage II latents (``vae2``). Every figure is an **estimate**.
"""

from __future__ import annotations

import math

import torch

from .memory import PHASES

__all__ = ["RESERVE", "fit_vae_tiles", "phase_resident_bytes"]

GiB = 2**30
RESERVE = 0.05  # of the device goal: fragmentation and workspaces, which the plan's estimate leaves out


def _module_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers at their full shapes (a sharded parameter counts whole)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def phase_resident_bytes(pipe, phase: str) -> int:
    """The weights' bytes that ``pipe``'s memory plan keeps on the device during ``phase`` (every component not
    placed on the CPU, at its full size)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    return sum(_module_bytes(m) for name, m in pipe.components().items()
               if m is not None and pipe.memory.placement(phase, name) != "cpu")


def fit_vae_tiles(pipe, stage1_shape, stage2_shape) -> dict:
    """Set the tile budgets of ``pipe``'s VAE passes for a clip of these latent shapes ``(C, T, h, w)`` from its
    memory profile (:meth:`WanVAE.set_tile_budget <swift_model.nets.vae.WanVAE.set_tile_budget>`); a profile
    without a device goal keeps the VAEs' own tiles. Every rank of a parallel run computes the same budgets (the
    weights count at full size) and so the same tiles as one process: the blend does not depend on the ranks.

    Returns ``{"bridge": bytes, "decode": bytes}``: the budget of each phase's passes (empty without a goal).
    Raises ``ValueError`` when a phase's resident weights leave no budget under the goal.
    """
    goal = pipe.memory.settings.device_goal_gib
    if goal is None:
        pipe.vae1.set_tile_budget()
        pipe.vae2.set_tile_budget()
        return {}
    latents = 4 * (math.prod(stage1_shape) + 2 * math.prod(stage2_shape))  # float32
    budgets = {}
    for phase in ("bridge", "decode"):
        budget = int(goal * GiB * (1 - RESERVE)) - phase_resident_bytes(pipe, phase) - latents
        if budget <= 0:
            raise ValueError(f"memory profile {pipe.memory.profile!r}: the {phase} phase's resident weights "
                             f"({phase_resident_bytes(pipe, phase) / GiB:.1f} GiB) leave no room for the VAE "
                             f"under its {goal:g} GiB goal")
        budgets[phase] = budget
    # vae1 decodes in the bridge only (its 640x352 conditioning encode is never tiled); vae2 encodes in the
    # bridge and decodes in the decode phase
    # (one VAE serving both stages takes the smaller budget for its decodes)
    decode2 = budgets["decode"] if pipe.vae1 is not pipe.vae2 else min(budgets.values())
    pipe.vae1.set_tile_budget(decode=budgets["bridge"])
    pipe.vae2.set_tile_budget(decode=decode2, encode=budgets["bridge"])
    return budgets
