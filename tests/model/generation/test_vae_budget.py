"""The VAE passes' budgets from the memory profile: the tiles each profile gives the presets at 2K (bounded in the
clip's length, within the profile's goal), a profile without a goal, a goal too small for the weights."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from swift_model.generation import memory
from swift_model.generation.memory import MemoryPlan
from swift_model.generation.pipeline import SwiftI2VPipeline
from swift_model.generation.vae_budget import RESERVE, fit_vae_tiles, phase_resident_bytes
from swift_model.nets.vae_geometry import MAX_TENSOR_ELEMENTS, tiling_cost

GiB = 2**30


@pytest.fixture(scope="module")
def preset_pipe():
    """The presets' pipeline (Wan2.1-I2V-14B + Wan2.2-TI2V-5B) on fake tensors, as ``swift-i2v plan`` builds it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from swift_model.generation.request import GenerationRequest
    from swift_model.nets.spec import ModelSpec
    from swift_model.planning.planner import _fake_pipeline, _layout

    req = GenerationRequest(frames=81, width=2560, height=1408)
    degrees, plan = _layout("fast", req, 1, None, False, False)
    with contextlib.ExitStack() as ranks:
        pipe, _, _ = _fake_pipeline(ModelSpec.preset(), plan, "cuda", torch.bfloat16, torch.bfloat16, degrees, False,
                                    FakeTensorMode(allow_non_fake_inputs=True), ranks)
    return pipe


def _passes(pipe, frames: int, width: int = 2560, height: int = 1408) -> dict:
    """``{pass: (tile shape, tile count, computed area / frame area, tile working set in bytes, largest tensor's
    elements)}`` after the budgets of a ``frames x height x width`` clip are set."""
    s1 = pipe.vae1.latent_shape(frames, height // 4, width // 4)
    s2 = pipe.vae2.latent_shape(frames, height, width)
    fit_vae_tiles(pipe, s1, s2)
    out = {}
    for name, vae, kind, (h, w) in (("decode1", pipe.vae1, "decode", s1[2:]), ("encode2", pipe.vae2, "encode", s2[2:]),
                                    ("decode2", pipe.vae2, "decode", s2[2:])):
        tile = vae.tile_shape(kind, h, w)
        overlap = vae.tile_overlap if kind == "decode" else vae.encode_tile_overlap
        tiles = vae.spatial_tiles(h, w) if kind == "decode" else vae.encode_spatial_tiles(h, w)
        out[name] = (tile, len(tiles), tiling_cost(h, w, tile, overlap) / (h * w),
                     vae.work_bytes_per_pixel(kind) * tile[0] * tile[1],
                     vae.largest_elements_per_pixel(kind) * tile[0] * tile[1])
    return out


def test_preset_tiles_per_profile_fit_the_goal_and_do_not_depend_on_the_length(preset_pipe):
    """At 2560x1408 (estimates): the bridge's passes run on whole frames; only the 2K decode is tiled, with at
    most 11% of its work redundant under ``fast`` (three full-height tiles) and 5% under ``balanced`` and ``24gb`` (two tiles: a whole
    frame has tensors past 32-bit indexing); every pass's tile working set plus what its phase keeps resident
    fits the profile's goal less the reserve, no tensor is past 32-bit indexing, and 81 and 241 frames get the
    same decode tiles."""
    pipe = preset_pipe
    want_decode = {"fast": (3, 1.11), "balanced": (2, 1.06), "24gb": (2, 1.06)}
    for profile, (count, cost) in want_decode.items():
        pipe.memory = MemoryPlan(profile)
        goal = pipe.memory.settings.device_goal_gib * GiB * (1 - RESERVE)
        short, long = _passes(pipe, 81), _passes(pipe, 241)
        assert short["decode2"][1] == count and short["decode2"][2] <= cost, (profile, short)
        assert short["decode1"][1] == short["encode2"][1] == 1, (profile, short)  # whole frames
        assert long["decode2"][0] == short["decode2"][0], (profile, short, long)
        for name, phase in (("decode1", "bridge"), ("encode2", "bridge"), ("decode2", "decode")):
            assert phase_resident_bytes(pipe, phase) + short[name][3] <= goal, (profile, name)
            assert short[name][4] <= MAX_TENSOR_ELEMENTS, (profile, name)
    # a wider frame under balanced: the encode still on whole frames, every pass within the limits
    pipe.memory = MemoryPlan("balanced")
    wide = _passes(pipe, 81, width=3840)
    assert wide["encode2"][1] == 1 and wide["decode2"][2] <= 1.1, wide
    assert all(p[4] <= MAX_TENSOR_ELEMENTS for p in wide.values())
    assert phase_resident_bytes(pipe, "decode") + wide["decode2"][3] <= 57 * GiB


def test_profile_without_a_goal_keeps_fixed_tiles_and_a_small_goal_is_refused():
    pipe = SwiftI2VPipeline.tiny(device="cpu")
    vae = pipe.vae2
    assert fit_vae_tiles(pipe, (16, 3, 8, 12), (48, 3, 8, 12)).keys() == {"bridge", "decode"}
    assert vae.decode_budget > 0 and vae.tile_shape("decode", 40, 40) == (40, 40)  # the tiny VAE: whole frames
    settings = pipe.memory.settings
    try:
        memory.PROFILES[settings.name] = dataclasses.replace(settings, device_goal_gib=None)
        pipe.memory = MemoryPlan(settings.name)
        assert fit_vae_tiles(pipe, (16, 3, 8, 12), (48, 3, 8, 12)) == {}
        assert vae.decode_budget is None and vae.tile_shape("decode", 40, 40) == vae.tile_latent == 32
        memory.PROFILES[settings.name] = dataclasses.replace(settings, device_goal_gib=1e-6)
        pipe.memory = MemoryPlan(settings.name)
        with pytest.raises(ValueError, match="leave no room for the VAE"):
            fit_vae_tiles(pipe, (16, 3, 8, 12), (48, 3, 8, 12))
    finally:
        memory.PROFILES[settings.name] = settings
    with pytest.raises(ValueError, match="phase must be one of"):
        phase_resident_bytes(pipe, "upscale")
