"""The pipeline pieces: VAE wrapper, bridge, video I/O, and the tiny end-to-end pipeline on CPU."""

import copy
import os
import stat

import pytest
import torch

from swift_model.generation.bridge import reference_video
from swift_model.nets.vae import WanVAE
from swift_model.io.video import read_image, read_mp4, write_mp4

from helpers import random_image as _image  # 48 x 80


# vae16, vae48: the tiny VAEs (conftest.py)


def test_vae_stream_decode_equals_diffusers(vae16, vae48):
    for vae in (vae16, vae48):
        m = vae.size_multiple
        video = torch.rand(1, 3, 5, m, 2 * m) * 2 - 1
        z = vae.encode(video)
        assert z.shape == (1, vae.z_dim, 2, m // vae.spatial_factor, 2 * m // vae.spatial_factor)
        ref = vae.model.decode(vae.denormalize(z)).sample
        out = vae.decode(z)
        assert out.shape == (1, 3, 5, m, 2 * m)
        # The streaming decoder is the library's causal decoder, frame by frame (fp32 rounding only).
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        frames = vae.decode_uint8(z)
        assert frames.shape == (5, m, 2 * m, 3) and frames.dtype == torch.uint8


def test_vae_tiled_decode_blends_tiles(vae16):
    # With overlapping tiles every output pixel is a convex blend of the tiles covering it: a tiling whose
    # tiles are wide enough to see the whole latent reproduces the untiled decode exactly.
    z = torch.randn(1, 16, 2, 4, 8)
    whole = vae16.decode(z)
    tiled = WanVAE(vae16.model, tile_latent=8, tile_overlap=4).decode(z)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)
    small = WanVAE(vae16.model, tile_latent=4, tile_overlap=2).decode(z)
    assert small.shape == whole.shape and torch.isfinite(small).all()


def _encoder_inputs(vae, video):
    """Encode ``video`` with ``vae`` and return the latents and every tensor the encoder network received."""
    seen = []
    handle = vae.model.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        z = vae.encode(video)
    finally:
        handle.remove()
    return z, seen


@pytest.mark.parametrize("z_dim,dtype", [(16, torch.float32), (48, torch.float64)])
def test_vae_encode_moves_chunks_not_the_clip(z_dim, dtype):
    """The encoder network only ever receives chunks of the clip (a tile of 1 or 4 frames) in the VAE's own
    dtype and device, each moved there on its own; the latents are those of the whole clip moved first."""
    vae = WanVAE(WanVAE.tiny(z_dim, seed=2).model.to(dtype), tile_latent=4, tile_overlap=2)
    m = vae.size_multiple
    g = torch.Generator().manual_seed(6)
    video = torch.rand(1, 3, 9, 2 * m, 3 * m, generator=g) * 2 - 1  # fp32, small: encoded untiled
    assert not vae.encode_is_tiled(video.shape[3], video.shape[4])
    z, seen = _encoder_inputs(vae, video)
    assert len(seen) == 3  # the library's temporal chunks of 1, 4 and 4 frames
    for chunk in seen:
        assert chunk.dtype == dtype and chunk.device == vae.device
        assert chunk.shape[2] in (1, 4) and chunk.numel() * 2 <= video.numel()
    want = vae.normalize(vae.model.encode(video.to(vae.device, dtype)).latent_dist.mode().float())
    assert torch.equal(z, want)


def test_vae_tiled_encode_moves_chunks_of_tiles():
    """A tiled encode (a video above the tiling threshold) hands the encoder chunks of one tile's crop, each
    moved on its own (the tiling itself is checked against the untiled encode in test_vae_tiling.py)."""
    vae = WanVAE(WanVAE.tiny(16, seed=2).model, tile_latent=4, tile_overlap=2, encode_tile_min_pixels=0,
                 encode_tile_latent=4, encode_tile_overlap=2)
    m = vae.size_multiple
    g = torch.Generator().manual_seed(7)
    video = torch.rand(1, 3, 5, 2 * m, 3 * m, generator=g) * 2 - 1
    assert vae.encode_is_tiled(video.shape[3], video.shape[4])
    z, seen = _encoder_inputs(vae, video)
    tiles = vae.encode_spatial_tiles(video.shape[3] // vae.spatial_factor, video.shape[4] // vae.spatial_factor)
    assert len(seen) == 2 * len(tiles) > 2  # the temporal chunks (1 and 4 frames) of each tile
    for chunk in seen:  # a few frames of one tile's crop, never the whole frame
        assert chunk.shape[2] in (1, 4) and chunk.shape[3] * chunk.shape[4] < video.shape[3] * video.shape[4]
    assert z.shape == (1, vae.z_dim, 2, 2 * m // vae.spatial_factor, 3 * m // vae.spatial_factor)


def test_vae_encoder_hook_moves_each_chunk():
    """The encoder's pre-hook puts a chunk on the encoder's device and dtype, and passes a chunk that is already
    there through untouched (no copy)."""
    from swift_model.nets.vae import _chunk_to_device

    net = torch.nn.Linear(3, 3).to(torch.float64)
    chunk = torch.rand(2, 3)
    (moved,), kw = _chunk_to_device(net, (chunk,), {"feat_idx": [0]})
    assert moved.dtype == torch.float64 and torch.equal(moved, chunk.double()) and kw == {"feat_idx": [0]}
    ready = chunk.double()
    assert _chunk_to_device(net, (ready,), {})[0][0] is ready


@pytest.mark.gpu
def test_vae_encode_of_a_cpu_clip_keeps_the_clip_off_the_gpu(gpu_device):
    """A clip on the CPU encoded by a VAE on the GPU: the same latents as the clip moved first, and the GPU
    never holds the clip (peak memory below the clip's own bytes, which moving it would take)."""
    vae = WanVAE(WanVAE.tiny(48, seed=2).model.to(gpu_device), tile_latent=4, tile_overlap=2)
    video = torch.rand(1, 3, 33, 512, 512) * 2 - 1
    want = vae.encode(video.to(gpu_device))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(gpu_device)
    base = torch.cuda.memory_allocated(gpu_device)
    z = vae.encode(video)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated(gpu_device) - base < video.numel() * 4
    torch.testing.assert_close(z, want, rtol=0, atol=0)


def test_vae_normalisation_roundtrip():
    vae = WanVAE.tiny(16)
    vae._mean = torch.randn_like(vae._mean)
    vae._std = torch.rand_like(vae._std) + 0.5
    z = torch.randn(1, 16, 2, 3, 3)
    torch.testing.assert_close(vae.denormalize(vae.normalize(z)), z)


def test_vae_size_checks(vae16, vae48):
    with pytest.raises(ValueError, match="4k\\+1"):
        vae16.check_size(80, 64, 64)
    with pytest.raises(ValueError, match="multiples of 16"):
        vae16.check_size(81, 64, 72)
    with pytest.raises(ValueError, match="multiples of 32"):
        vae48.check_size(81, 48, 64)
    assert vae48.latent_shape(81, 1408, 2560) == (48, 21, 88, 160)
    assert vae16.latent_shape(81, 352, 640) == (16, 21, 44, 80)


def test_bridge_frame0_is_full_res_image(vae16):
    # Stage I at a quarter per side; frame 0 of the reference video is the full-resolution image exactly
    # (the other frames are the upsampled Stage I decode).
    z1 = torch.randn(1, 16, 2, 2, 4)  # 5 frames of 16x32
    image = torch.rand(3, 64, 128) * 2 - 1
    video = reference_video(z1, vae16, image, 64, 128)
    assert video.shape == (1, 3, 5, 64, 128)
    assert torch.equal(video[0, :, 0], image)
    low = vae16.decode(z1)
    up = torch.nn.functional.interpolate(low[0, :, 1:].permute(1, 0, 2, 3), size=(64, 128), mode="bicubic",
                                         align_corners=False).clamp(-1, 1).permute(1, 0, 2, 3)
    torch.testing.assert_close(video[0, :, 1:], up)


def test_bridge_shapes_2k():
    # Shapes of the 2K bridge from the latent shapes (no 2K decode on CPU).
    vae1, vae2 = WanVAE.tiny(16), WanVAE.tiny(48)
    assert vae1.latent_shape(81, 352, 640)[1:] == (21, 44, 80)
    assert vae2.latent_shape(81, 1408, 2560) == (48, 21, 88, 160)
    with pytest.raises(ValueError, match="image"):
        reference_video(torch.randn(1, 16, 1, 2, 2), vae1, torch.rand(3, 32, 32), 64, 64)


def test_write_mp4_atomic(tmp_path):
    frames = torch.randint(0, 256, (5, 32, 48, 3), dtype=torch.uint8)
    out = tmp_path / "a.mp4"
    write_mp4([frames[:2], frames[2:]], str(out))
    back = read_mp4(str(out))
    assert back.shape == (5, 32, 48, 3)

    def broken():
        yield frames[:2]
        raise RuntimeError("boom")

    bad = tmp_path / "b.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        write_mp4(broken(), str(bad))
    assert not bad.exists()
    assert sorted(os.listdir(tmp_path)) == ["a.mp4"]  # no temporary file left behind
    with pytest.raises(ValueError, match="folder does not exist"):
        write_mp4([frames], str(tmp_path / "missing" / "c.mp4"))
    with pytest.raises(ValueError, match="mp4"):
        write_mp4([frames], str(tmp_path / "c.avi"))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_write_mp4_mode_follows_the_umask(tmp_path, umask, mode):
    frames = torch.randint(0, 256, (1, 16, 16, 3), dtype=torch.uint8)
    out = tmp_path / "v.mp4"
    out.write_bytes(b"an older file of mode 0600")
    out.chmod(0o600)
    old = os.umask(umask)
    try:
        write_mp4([frames], str(out))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == mode
    assert read_mp4(str(out)).shape == (1, 16, 16, 3) and os.listdir(tmp_path) == ["v.mp4"]


def test_read_image_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_image(str(tmp_path / "nope.png"))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        read_image(str(junk))


# -- the tiny pipeline end to end --------------------------------------------------------------------------

SMALL = dict(frames=5, width=64, height=64, progress=False)
# tiny_pipe: the tiny pipeline (conftest.py)


def test_tiny_pipeline_shapes_and_seeds(tiny_pipe):
    img = _image(0)
    a = tiny_pipe.generate(img, "a cat", seed=1, **SMALL)
    assert a.frames.shape == (5, 64, 64, 3) and a.frames.dtype == torch.uint8
    assert a.latents.shape == (1, 48, 2, 4, 4)
    assert set(a.seconds) >= {"stage1", "bridge", "stage2", "decode", "total"}
    b = tiny_pipe.generate(img, "a cat", seed=1, **SMALL)
    c = tiny_pipe.generate(img, "a cat", seed=2, **SMALL)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
    assert not torch.equal(a.latents, c.latents)


def test_tiny_pipeline_joint_and_neighbors(tiny_pipe):
    img = _image(1)
    j = tiny_pipe.generate(img, "x", joint=True, frames=9, width=64, height=64, progress=False)
    s = tiny_pipe.generate(img, "x", segment_blocks=1, neighbors=(1, 1), frames=9, width=64, height=64,
                           progress=False)
    assert j.latents.shape == s.latents.shape == (1, 48, 3, 4, 4)
    assert j.info["segments"] == 1 and s.info["segments"] == 2  # T=3: one segment of M=2; two of M=1


def test_pipeline_rejects_wrong_kind_and_sizes(tiny_pipe):
    from swift_model.generation.pipeline import SwiftI2VPipeline

    with pytest.raises(ValueError, match="stage2 checkpoint of the wrong kind"):
        SwiftI2VPipeline(tiny_pipe.stage1, tiny_pipe.stage2, tiny_pipe.vae1, tiny_pipe.vae2, stage2_kind="refine")
    with pytest.raises(ValueError, match="stage1 checkpoint of the wrong kind"):
        SwiftI2VPipeline(tiny_pipe.stage2, tiny_pipe.stage2, tiny_pipe.vae1, tiny_pipe.vae2)
    with pytest.raises(ValueError, match="4k\\+1"):
        tiny_pipe.check_inputs(8, 64, 64)
    with pytest.raises(ValueError, match="multiples of 64"):
        tiny_pipe.check_inputs(5, 96, 64)


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(fps=0), ValueError, "fps"),
        (dict(steps=0), ValueError, "steps"),
        (dict(start_sigma=5.0), ValueError, "start_sigma"),
        (dict(fps=2.5), TypeError, "fps"),
        (dict(prompt=5), TypeError, "prompt"),
        (dict(negative_prompt=None), TypeError, "negative_prompt"),
        (dict(prompt_embeds=[[0.0]]), TypeError, "prompt_embeds"),
        (dict(prompt_embeds=torch.ones(1, 3, 32, dtype=torch.long)), TypeError, "prompt_embeds"),
        (dict(guidance_scale=2.0, negative_prompt_embeds=[[0.0]]), TypeError, "negative_prompt_embeds"),
        (dict(shared_anchor="yes"), TypeError, "shared_anchor"),
    ],
)
def test_generate_rejects_bad_arguments_before_running(tiny_pipe, kwargs, exc, word):
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(exc, match=word):
        tiny_pipe.generate(_image(0), **kwargs, **SMALL)


def test_tiny_pipeline_guidance(tiny_pipe):
    img = _image(2)
    base = tiny_pipe.generate(img, "a cat", seed=1, **SMALL)
    one = tiny_pipe.generate(img, "a cat", seed=1, guidance_scale=1.0, negative_prompt="blur", **SMALL)
    assert torch.equal(base.latents, one.latents)  # guidance 1 is exactly no guidance
    g = tiny_pipe.generate(img, "a cat", seed=1, guidance_scale=4.0, **SMALL)
    g_neg = tiny_pipe.generate(img, "a cat", seed=1, guidance_scale=4.0, negative_prompt="blur", **SMALL)
    assert not torch.allclose(g.latents, base.latents)
    assert not torch.allclose(g.latents, g_neg.latents)  # the negative prompt matters
    assert g.info["guidance_scale"] == 4.0 and base.info["guidance_scale"] is None
    with pytest.raises(ValueError, match="guidance_scale"):
        tiny_pipe.generate(img, "a cat", guidance_scale=-2.0, **SMALL)
    emb = torch.randn(1, 8, tiny_pipe.stage1.config.text_dim)
    no_text = _copy_without_text(tiny_pipe)
    with pytest.raises(ValueError, match="negative"):
        no_text.generate(img, prompt_embeds=emb, guidance_scale=3.0, **SMALL)
    r = no_text.generate(img, prompt_embeds=emb, guidance_scale=3.0, negative_prompt_embeds=torch.zeros_like(emb), **SMALL)
    assert torch.isfinite(r.latents).all()


def test_tiny_pipeline_shared_anchor(tiny_pipe, monkeypatch):
    """``shared_anchor=True`` runs every Stage II window with the layout a shared-anchor training sequence
    gives that window (the anchor attending only itself; the packed forward equals this window forward,
    tests/model/training/test_training.py), the result differs from the default; ``False`` is the default."""
    from swift_model.training.packing import TrainingWindows

    img = _image(4)
    # 3 latent frames: the anchor and 2 segments of 1 block, 2 steps each
    size = dict(frames=9, width=64, height=64, steps=2, segment_blocks=1, progress=False)
    base = tiny_pipe.generate(img, "a cat", seed=1, **size)
    off = tiny_pipe.generate(img, "a cat", seed=1, shared_anchor=False, **size)
    assert torch.equal(base.latents, off.latents) and base.info["shared_anchor"] is False
    calls = []
    forward = tiny_pipe.stage2.forward

    def spy(*args, **kwargs):
        # the window's layout, given as is or as the attention plan built from it once per window
        plan = kwargs.get("attention_plan")
        calls.append((kwargs.get("layout") or (plan.layout if plan is not None else None), kwargs.get("anchor_cache")))
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_pipe.stage2, "forward", spy)
    on = tiny_pipe.generate(img, "a cat", seed=1, shared_anchor=True, **size)
    T, h, w = on.latents.shape[2:]
    P = (h // 2) * (w // 2)
    want = [TrainingWindows(T, P, 1, (1, 0), (s,), shared_anchor=True).layout for s in range(2)]
    windows = [c for c in calls if c[0] is not None]
    assert len(calls) - len(windows) == 1  # the anchor's keys and values: computed once (precompute_anchor)
    assert len(windows) == 2 * 2  # two windows, two steps each, all reusing them
    assert all(lay == want[k // 2] and anchor is windows[0][1] is not None for k, (lay, anchor) in enumerate(windows))
    assert on.info["shared_anchor"] is True and torch.isfinite(on.latents).all()

    def no_cache(*args, **kwargs):  # the same windows, the anchor run in every call
        kwargs.pop("anchor_cache", None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_pipe.stage2, "forward", no_cache)
    uncached = tiny_pipe.generate(img, "a cat", seed=1, shared_anchor=True, **size)
    monkeypatch.setattr(tiny_pipe.stage2, "forward", spy)
    calls.clear()
    guided = tiny_pipe.generate(img, "a cat", seed=1, shared_anchor=True, guidance_scale=3.0, **size)
    monkeypatch.undo()
    assert sum(lay is None for lay, _ in calls) == 2  # one anchor cache per conditioning (prompt, negative)
    assert torch.isfinite(guided.latents).all() and not torch.allclose(guided.latents, on.latents)
    torch.testing.assert_close(on.latents, uncached.latents, rtol=1e-5, atol=1e-5 * uncached.latents.abs().max().item())
    assert torch.equal(on.latents[:, :, 0], base.latents[:, :, 0])  # the anchor itself is z_ref in both
    assert not torch.allclose(on.latents[:, :, 1:], base.latents[:, :, 1:], rtol=1e-3, atol=1e-3)


def _copy_without_text(pipe):
    import copy

    p = copy.copy(pipe)
    p.text_encoder = None
    return p


def test_tiny_pipeline_image_embeds(tiny_pipe):
    img = _image(3)
    dim = tiny_pipe.stage1.config.image_dim
    clip = torch.randn(1, 5, dim)
    a = tiny_pipe.generate(img, "x", seed=0, image_embeds=clip, **SMALL)
    b = tiny_pipe.generate(img, "x", seed=0, image_embeds=clip * -1, **SMALL)
    assert not torch.equal(a.latents, b.latents)  # the image tokens reach Stage I
    with pytest.raises(ValueError, match="image_embeds"):
        tiny_pipe.generate(img, "x", image_embeds=torch.randn(1, 5, dim + 1), **SMALL)
    p = _copy_without_text(tiny_pipe)
    p.text_encoder, p.image_encoder = tiny_pipe.text_encoder, None
    with pytest.raises(ValueError, match="CLIP image tokens"):
        p.generate(img, "x", **SMALL)


@pytest.mark.parametrize("stage1", ["i2v", "ti2v"])
def test_stage1_is_the_transition_from_pure_noise(tiny_pipe, stage1):
    """The pipeline's Stage I and the stage-transition references of training share one conditioning
    (:func:`swift_model.generation.stage1.stage1_conditioning`): Stage I sampled from pure noise is, bit for bit, the
    transition of any clip with that first frame from sigma 1 (Wan2.1 I2V and Wan2.2 TI2V conditioning)."""
    import dataclasses

    from swift_model import WanDiT, WanDiTConfig
    from swift_model.generation.csg import flow_steps
    from swift_model.generation.pipeline import Conditioning, GenerationState
    from swift_model.generation.request import GenerationRequest
    from swift_model.training.transition import transition_latents

    dit = tiny_pipe.stage1
    if stage1 == "ti2v":
        cfg = dataclasses.replace(WanDiTConfig.preset("tiny-ti2v"), in_channels=16, out_channels=16)
        dit = WanDiT(cfg).reset_parameters(torch.Generator().manual_seed(3)).eval()
    pipe = copy.copy(tiny_pipe)
    pipe.stage1 = dit
    g = torch.Generator().manual_seed(5)
    clip = torch.rand(3, 9, 16, 16, generator=g) * 2 - 1
    ctx = torch.randn(1, 8, 32, generator=g)
    fea = tiny_pipe.image_encoder.encode(clip[:, 0]) if stage1 == "i2v" else None
    request = GenerationRequest(image=_image(0), prompt_embeds=ctx, frames=9, width=64, height=64, steps=2, seed=7)
    run = dataclasses.replace(pipe.prepare(request), image_low=clip[:, 0])  # the clip's first frame, as is
    assert run.schedule1 == flow_steps(2, 5.0)
    got = pipe.run_stage1(run, GenerationState(conditioning=Conditioning(ctx, None, fea)))
    want = transition_latents(dit, tiny_pipe.vae1, clip, ctx, sigma=1.0, steps=2, seed=7, clip_fea=fea)
    assert torch.equal(got, want)
    if stage1 == "ti2v":  # the image latent stays frame 0
        assert torch.equal(got[:, :, :1], tiny_pipe.vae1.encode(clip[None, :, :1]))
