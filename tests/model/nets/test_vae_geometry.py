"""VAE tiles from a device budget: the cheapest tiling that fits (against a brute-force search), the working-set
estimate per latent pixel (against the planner's tracker on fake CUDA tensors), the whole-frame pass against
the library's plain decode, the tiled pass against the whole-frame one, and the geometry the memory profiles
give the presets at 2K (estimates)."""

from __future__ import annotations

import pytest
import torch

from swift_model.nets.vae import WAN22_CONFIG, WanVAE, public_config
from swift_model.nets.vae_geometry import fit_tiles, tiling_cost
from swift_model.nets.vae_tiling import spatial_tiles

GiB = 2**30


# -- the geometry -------------------------------------------------------------------------------------------

def _brute_force(h, w, overlap, max_pixels, max_side=None):
    """Every rectangular tile the tiling accepts, the cheapest fitting one's computed area (summed from the tiles
    themselves) and the tile count, or None."""
    best = None
    for th in range(1, h + 1):
        for tw in range(1, w + 1):
            if th * tw > max_pixels or (max_side and max(th, tw) > max_side):
                continue
            if (th < h and overlap >= th) or (tw < w and overlap >= tw):
                continue  # a split side must be longer than the overlap
            tiles = spatial_tiles(h, w, (th, tw), overlap)
            covered = torch.zeros(h, w, dtype=torch.bool)
            for t in tiles:
                covered[t.y0:t.y1, t.x0:t.x1] = True
            assert covered.all()
            cost = (sum(t.height * t.width for t in tiles), len(tiles))
            best = cost if best is None or cost < best else best
    return best


def test_fit_tiles_is_the_cheapest_tiling_that_fits():
    """Fresh random sizes, overlaps and budgets: the chosen tiles fit and no fitting tiling computes less."""
    g = torch.Generator().manual_seed(21)
    for _ in range(40):
        h, w = (int(v) for v in torch.randint(1, 19, (2,), generator=g))
        overlap = int(torch.randint(0, 4, (1,), generator=g))
        max_pixels = int(torch.randint(1, h * w + 4, (1,), generator=g))
        max_side = int(torch.randint(2, 20, (1,), generator=g)) if bool(torch.rand(1, generator=g) < 0.3) else None
        want = _brute_force(h, w, overlap, max_pixels, max_side)
        if want is None:
            with pytest.raises(ValueError, match="max_pixels"):
                fit_tiles(h, w, overlap=overlap, max_pixels=max_pixels, max_side=max_side)
            continue
        th, tw = fit_tiles(h, w, overlap=overlap, max_pixels=max_pixels, max_side=max_side)
        tiles = spatial_tiles(h, w, (th, tw), overlap)
        assert all(t.height * t.width <= max_pixels for t in tiles), (h, w, overlap, max_pixels, th, tw)
        assert max_side is None or max(th, tw) <= max_side
        got = (sum(t.height * t.width for t in tiles), len(tiles))
        assert got == want and tiling_cost(h, w, (th, tw), overlap) == got[0], (h, w, overlap, max_pixels, got, want)


def test_fit_tiles_whole_frame_when_it_fits_and_checks():
    assert fit_tiles(88, 160, overlap=8, max_pixels=88 * 160) == (88, 160)
    # one pixel short of the frame: the cheapest split of the 2K latent is two full-height columns
    assert fit_tiles(88, 160, overlap=8, max_pixels=88 * 160 - 1) == (88, 84)
    th, tw = fit_tiles(88, 160, overlap=8, max_pixels=5200)
    assert (th, tw) == (88, 59) and tiling_cost(88, 160, (th, tw), 8) == 3 * 88 * 59
    for bad in (dict(max_pixels=0), dict(max_pixels=1.5), dict(overlap=-1), dict(max_side=0)):
        kw = {**dict(overlap=2, max_pixels=100), **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            fit_tiles(10, 10, **kw)
    with pytest.raises(ValueError, match="budget is too small"):
        fit_tiles(10, 10, overlap=3, max_pixels=15)  # a split side must exceed the overlap: 4x4 at least


# -- the working-set estimate -------------------------------------------------------------------------------

def _reduced_wan22(seed: int = 5) -> WanVAE:
    """The public Wan2.2 VAE architecture (dim_mult 1,2,4,4, two residual blocks, residual blocks, patch 2) at
    reduced widths, random weights and latent statistics."""
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(seed)
    cfg = dict(WAN22_CONFIG, base_dim=16, decoder_base_dim=16, latents_mean=torch.randn(48, generator=g).tolist(),
               latents_std=(torch.rand(48, generator=g) + 0.5).tolist())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanVAE(AutoencoderKLWan(**cfg))


@pytest.mark.parametrize("kind", ["decode", "encode"])
@pytest.mark.parametrize("arch", ["reduced", "public"])
def test_work_estimate_matches_the_planner_at_another_tile_size(kind, arch):
    """The estimate (an 8x8 tile on the meta device) times a 12x20 tile's area is that tile's working set as the
    planner's tracker counts it on fake CUDA tensors (never under by more than 1%, at most 10% over: measured
    1% over for the public decoder, 8% for the reduced one, whose small tensors weigh more at 8x8): the working
    set is proportional to the area. The Wan2.2 architecture at reduced widths, and the public one."""
    from diffusers import AutoencoderKLWan
    from torch._subclasses.fake_tensor import FakeTensorMode

    from swift_model.generation.residency import move_module
    from swift_model.planning.planner import _fake_storage
    from swift_model.planning.tracker import GpuAttentionMode, LiveStorageTracker

    cfg = public_config(48) if arch == "public" else dict(public_config(48), base_dim=16, decoder_base_dim=16)
    with torch.device("meta"):
        model = AutoencoderKLWan(**cfg)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        _fake_storage(model, torch.bfloat16)
        vae = WanVAE(model, dtype="bf16")
        move_module(vae.model, torch.device("cuda"))
    per_pixel = vae.work_bytes_per_pixel(kind)
    h, w, T = 12, 20, 3
    tracker = LiveStorageTracker("cuda")
    with fake, tracker, GpuAttentionMode():
        if kind == "decode":
            z = torch.zeros(1, 48, T, h, w, device="cuda")
            live0 = tracker.live_bytes
            with tracker.section() as sec:
                for _ in vae.decode_tiles(z, [spatial_tiles(h, w, (h, w), 0)[0]]):
                    pass
        else:
            video = torch.zeros(1, 3, vae.num_frames(T), h * 16, w * 16)  # on the host, as the bridge's
            live0 = tracker.live_bytes
            with tracker.section() as sec:
                vae.model.encode(video.to(dtype=torch.bfloat16))
    measured = sec["peak"] - live0
    assert 0.99 * measured <= per_pixel * h * w <= 1.10 * measured, (per_pixel * h * w / GiB, measured / GiB)


# -- whole frames and tiles against each other --------------------------------------------------------------

@pytest.mark.parametrize("which", ["vae16", "vae48", "reduced-wan22"])
def test_whole_frame_decode_equals_the_plain_decode(request, which):
    """With a budget that holds the frame, the decode is one tile: the library's own untiled decode (one causal
    pass over whole frames), within float32 rounding; the streamed uint8 frames are those of the float decode."""
    base = _reduced_wan22() if which == "reduced-wan22" else request.getfixturevalue(which)
    vae = WanVAE(base.model)
    vae.set_tile_budget(decode=GiB)
    h, w = (3, 4) if which == "reduced-wan22" else (5, 7)
    assert vae.tile_shape("decode", h, w) == (h, w) and len(vae.spatial_tiles(h, w)) == 1
    z = torch.randn(1, vae.z_dim, 3, h, w)
    plain = vae.model.decode(vae.denormalize(z)).sample
    got = vae.decode(z)
    assert got.shape == plain.shape == (1, 3, 9, h * vae.spatial_factor, w * vae.spatial_factor)
    torch.testing.assert_close(got, plain, rtol=0, atol=2e-6)
    want8 = ((got[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    chunks = list(vae.decode_uint8_stream(z, chunk=2))
    assert [c.shape[0] for c in chunks] == [5, 4]
    assert torch.equal(torch.cat(chunks), want8) and torch.equal(vae.decode_uint8(z), want8)


@pytest.mark.parametrize("which", ["vae16", "vae48", "reduced-wan22"])
def test_budget_tiled_decode_is_close_to_the_whole_frame_decode(request, which):
    """Half the frame's budget splits an 8x16 latent into three blended 8x8 tiles (overlap 4). Against the
    whole-frame decode of a smooth latent (spatially correlated, as a clip's latents are) the relative L2 error
    is <= 0.6 (measured 0.26-0.47). The bound is loose because these random-weight decoders have no locality
    (their middle attention block sees the whole frame untiled and one tile tiled); it still tells a right blend
    from a wrong one: the same output mirrored left to right is at least 1.5x as far (measured 0.92-1.36)."""
    base = _reduced_wan22() if which == "reduced-wan22" else request.getfixturevalue(which)
    vae = WanVAE(base.model, tile_overlap=4)
    h, w = 8, 16
    coarse = torch.randn(1, 2 * vae.z_dim, 2, 4, generator=torch.Generator().manual_seed(4))
    z = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").view(1, vae.z_dim, 2, h, w)
    per_pixel = vae.work_bytes_per_pixel("decode")
    vae.set_tile_budget(decode=int(per_pixel * h * w))
    assert len(vae.spatial_tiles(h, w)) == 1
    whole = vae.decode(z)
    vae.set_tile_budget(decode=int(per_pixel * h * w / 2))
    tiles = vae.spatial_tiles(h, w)
    assert [(t.height, t.width) for t in tiles] == [(8, 8)] * 3
    tiled = vae.decode(z)

    def rel(a):
        return ((a - whole).norm() / whole.norm()).item()

    misplaced = torch.flip(tiled, (-1,))  # the tiles put back mirrored (and each one mirrored)
    assert rel(tiled) <= 0.6 and 1.5 * rel(tiled) <= rel(misplaced), (rel(tiled), rel(misplaced))
    assert whole.std() > 0.05  # the bound is small against the signal


def test_budgeted_encode_is_whole_frame_when_it_fits(vae48):
    """The bridge's encode under a budget that holds the frame is the library's untiled encode."""
    vae = WanVAE(vae48.model, encode_tile_min_pixels=0, encode_tile_overlap=1)
    video = torch.rand(1, 3, 5, 64, 96, generator=torch.Generator().manual_seed(6)) * 2 - 1
    vae.set_tile_budget(encode=GiB)
    assert not vae.encode_is_tiled(64, 96)
    torch.testing.assert_close(vae.encode(video), vae.normalize(vae.model.encode(video).latent_dist.mode()),
                               rtol=0, atol=0)
    vae.set_tile_budget(encode=int(vae.work_bytes_per_pixel("encode") * 12))  # 12 of the 4x6 latent's pixels
    assert vae.encode_is_tiled(64, 96)
    with pytest.raises(ValueError, match="decode must be an int"):
        vae.set_tile_budget(decode=1.5)
    with pytest.raises(ValueError, match="holds no tile"):
        vae.set_tile_budget(decode=1)
        vae.spatial_tiles(4, 6)


def test_no_tile_passes_32_bit_indexing():
    """The public Wan2.2 decoder in bf16 with a budget of a terabyte: a 1280x704 frame (44x80 latents) is one
    tile, a 2560x1408 one (88x160) is not (its top stage's padded input would have 2.8e9 elements): two
    full-height tiles, each below 2**31 elements in its largest tensor."""
    from diffusers import AutoencoderKLWan

    from swift_model.nets.vae_geometry import MAX_TENSOR_ELEMENTS

    with torch.device("meta"):
        vae = WanVAE(AutoencoderKLWan(**public_config(48)), dtype="bf16")
    vae.set_tile_budget(decode=2**40)
    largest = vae.largest_elements_per_pixel("decode")
    assert vae.tile_shape("decode", 44, 80) == (44, 80)
    assert largest * 88 * 160 > MAX_TENSOR_ELEMENTS
    th, tw = vae.tile_shape("decode", 88, 160)
    assert (th, tw) == (88, 84) and largest * th * tw <= MAX_TENSOR_ELEMENTS
