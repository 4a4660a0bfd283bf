"""GenerationRequest: one checked, frozen object for what a video asks for; the pipeline prepares it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from swift_model.generation.request import MIN_SIZE_MULTIPLE, GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(frames=10), ValueError, "frames"),
        (dict(frames=9.0), TypeError, "frames"),
        (dict(width=100), ValueError, f"multiples of {MIN_SIZE_MULTIPLE}"),
        (dict(height=True), TypeError, "height"),
        (dict(steps=0), ValueError, "steps"),
        (dict(shift=0.0), ValueError, "shift"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(step_mode="ddim"), ValueError, "step_mode"),
        (dict(guidance_scale=-2.0), ValueError, "guidance_scale"),
        (dict(segment_blocks=0), ValueError, "segment_blocks"),
        (dict(neighbors="a,b"), ValueError, "neighbors"),
        (dict(start_sigma=0.0), ValueError, "start_sigma"),
        (dict(joint="yes"), TypeError, "joint"),
        (dict(shared_anchor=1), TypeError, "shared_anchor"),
        (dict(stage2_kind="other"), ValueError, "stage2_kind"),
        (dict(fps=2.5), TypeError, "fps"),
        (dict(prompt=5), TypeError, "prompt"),
        (dict(negative_prompt=None), TypeError, "negative_prompt"),
        (dict(prompt_embeds=torch.ones(1, 2, 3, dtype=torch.long)), TypeError, "prompt_embeds"),
        (dict(negative_prompt_embeds=[[0.0]]), TypeError, "negative_prompt_embeds"),
        (dict(output=3), TypeError, "output"),
    ],
)
def test_every_setting_is_checked_when_built(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        GenerationRequest(**kwargs)


def test_normalised_frozen_and_replaced_with_checks():
    r = GenerationRequest(frames=17, width=256, height=128, neighbors="2", guidance_scale=1.0)
    assert r.neighbors == (2, 2) and r.guidance_scale is None and not r.guided
    assert GenerationRequest(neighbors=1).neighbors == (1, 1)
    assert GenerationRequest(guidance_scale=3).guidance_scale == 3.0 and GenerationRequest(guidance_scale=3).guided
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.frames = 9
    r2 = r.replace(frames=9, neighbors=(1, 0))
    assert (r2.frames, r2.neighbors, r.frames) == (9, (1, 0), 17)
    with pytest.raises(ValueError, match="frames"):
        r.replace(frames=8)
    settings = r.settings()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["neighbors"] == [2, 2] and settings["frames"] == 17
    # the settings are the request's fields other than its inputs
    inputs = {"image", "prompt", "prompt_embeds", "negative_prompt", "negative_prompt_embeds", "image_embeds",
              "stage2_kind", "output", "fps"}
    assert set(settings) == {f.name for f in dataclasses.fields(GenerationRequest)} - inputs


def _image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_pipe():
    from swift_model.generation.pipeline import SwiftI2VPipeline

    return SwiftI2VPipeline.tiny(seed=0, device="cpu")


def test_prepare_knows_every_phase_s_bookkeeping(tiny_pipe):
    from swift_model.generation.csg import flow_steps

    r = GenerationRequest(image=_image(), prompt="a cat", frames=9, width=128, height=64, steps=3, joint=True)
    run = tiny_pipe.prepare(r)
    assert run.request is r and run.stage2_kind == "swift"
    assert tuple(run.image_low.shape) == (3, 16, 32) and tuple(run.image_full.shape) == (3, 64, 128)
    assert run.stage1_shape == tiny_pipe.vae1.latent_shape(9, 16, 32)
    assert run.stage2_shape == tiny_pipe.vae2.latent_shape(9, 64, 128)
    assert run.schedule1 == run.schedule2 == flow_steps(3, 5.0)  # "swift" starts at sigma 1
    assert run.csg.num_blocks == run.stage2_shape[1] and run.output is None and not run.progress


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(stage2_kind="refine"), ValueError, "stage2_kind"),
        (dict(width=96), ValueError, "multiples of"),
        (dict(prompt=None), TypeError, "prompt"),
        (dict(image=None), ValueError, "image"),
        (dict(output="/nonexistent-folder/v.mp4"), ValueError, "folder"),
        (dict(image_embeds=torch.zeros(1, 4, 3)), ValueError, "image_embeds"),
    ],
)
def test_prepare_checks_the_request_against_the_models(tiny_pipe, kwargs, exc, word):
    base = dict(image=_image(), prompt="a cat", frames=5, width=64, height=64)
    with pytest.raises(exc, match=word):
        tiny_pipe.prepare(GenerationRequest(**{**base, **kwargs}))


def test_generate_takes_a_request_or_its_fields(tiny_pipe):
    fields = dict(frames=5, width=64, height=64, seed=4, steps=2)
    a = tiny_pipe.generate(_image(), "a cat", progress=False, **fields)
    b = tiny_pipe.generate(request=GenerationRequest(image=_image(), prompt="a cat", **fields), progress=False)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
    assert a.info == b.info and a.info["seed"] == 4 and a.info["steps"] == 2
    with pytest.raises(TypeError, match="not both"):
        tiny_pipe.generate(_image(), request=GenerationRequest(image=_image(), prompt="a cat", **fields))
    with pytest.raises(TypeError, match="unexpected keyword"):
        tiny_pipe.generate(_image(), "a cat", frame=5)
