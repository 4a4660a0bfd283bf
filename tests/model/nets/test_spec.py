"""ModelSpec: the architectures of a generation, defined once (tiny, presets) and built with seeded weights or on
the meta device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from swift_model import WanDiT, WanDiTConfig
from swift_model.nets.encoders import CLIP_VIT_H, UMT5_XXL, ImageEncoder, TextEncoder
from swift_model.nets.spec import ModelSpec, stage2_config, stage2_extra_channels
from swift_model.nets.vae import WanVAE, public_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_build_is_the_tiny_models_of_each_module():
    """The tiny spec's models are the ones each module's ``tiny`` draws (one definition of the tiny models: the
    demo, the tests and the planner build the same architectures with the same weights)."""
    spec = ModelSpec.tiny()
    m = spec.build(seed=5)
    assert _same_weights(m.vae1.model, WanVAE.tiny(16, seed=5).model)
    assert _same_weights(m.vae2.model, WanVAE.tiny(48, seed=6).model)
    assert _same_weights(m.text_encoder.model, TextEncoder.tiny(dim=spec.stage1.text_dim, seed=5).model)
    assert _same_weights(m.image_encoder.model, ImageEncoder.tiny(dim=spec.stage1.image_dim, seed=5).model)
    with torch.random.fork_rng(devices=[]):  # the DiTs are drawn one after the other from the seed
        torch.manual_seed(5)
        s1, s2 = WanDiT(spec.stage1), WanDiT(spec.stage2)
    assert _same_weights(m.stage1, s1) and _same_weights(m.stage2, s2)
    # a different seed, different weights
    assert not _same_weights(ModelSpec.tiny().build(seed=6).stage1, m.stage1)


def test_stage2_kinds_widen_only_a_public_checkpoint_for_swift():
    c = WanDiTConfig.preset("wan2.2-ti2v-5b")
    assert stage2_extra_channels(c, "swift") == c.in_channels and stage2_extra_channels(c, "refine") == 0
    wide = stage2_config(c, "swift")
    assert wide.in_channels == 2 * c.in_channels and stage2_config(wide, "swift") == wide
    assert stage2_config(c, "refine") == c
    assert ModelSpec.tiny("swift").stage2.in_channels == 2 * ModelSpec.tiny("refine").stage2.in_channels
    with pytest.raises(ValueError, match="stage2_kind"):
        stage2_extra_channels(c, "other")


def test_presets_name_the_public_models():
    spec = ModelSpec.preset()
    assert spec.stage1 == WanDiTConfig.preset("wan2.1-i2v-14b") and spec.stage2 == WanDiTConfig.preset("wan2.2-ti2v-5b")
    assert spec.vae1 == public_config(16) and spec.vae2 == public_config(48)
    assert spec.text_encoder == UMT5_XXL and spec.image_encoder == CLIP_VIT_H
    assert ModelSpec.preset(text_encoder=False).text_encoder is None
    assert ModelSpec.preset("wan2.2-ti2v-5b").image_encoder is None  # no CLIP tokens in TI2V
    with pytest.raises(ValueError, match="latent channels"):
        public_config(32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.stage2_kind = "swift"


def test_meta_build_hands_every_module_to_materialize():
    """On the meta device nothing is allocated: ``materialize`` gives each module its storage, with the dtype the
    run asks for (the DiTs keep their fp32 parameters)."""
    seen = []

    def materialize(module, dtype):
        assert all(t.is_meta for t in (*module.parameters(), *module.buffers()))
        seen.append((type(module).__name__, dtype))
        module.to_empty(device="cpu")
        return module if dtype is None else module.to(dtype)

    m = ModelSpec.tiny().build(dtype=torch.bfloat16, vae_dtype=torch.float32, materialize=materialize)
    assert [name for name, _ in seen] == ["WanDiT", "WanDiT", "AutoencoderKLWan", "AutoencoderKLWan",
                                          "UMT5EncoderModel", "CLIPVisionModel"]
    assert [dt for _, dt in seen] == [None, None, torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    assert m.stage1.dtype == torch.bfloat16 and m.stage1.condition_embedder.time_proj.weight.dtype == torch.float32
    assert m.stage2.config.in_channels == 2 * m.stage2.config.out_channels
