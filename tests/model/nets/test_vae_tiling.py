"""The tiled VAE: tile-major bounded decode vs the old per-tile-cache decode, the tile API, encode tiling,
the VAE dtype, and the decode's device working set (which must not grow with the width)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from swift_model.nets.vae import WanVAE, parse_dtype
from swift_model.nets.vae_tiling import TileBlender, Tile, spans, spatial_tiles


def _old_ramp(n, lo, hi):
    w = torch.ones(n)
    if lo > 0:
        w[:lo] = torch.arange(1, lo + 1, dtype=torch.float32) / (lo + 1)
    if hi > 0:
        w[n - hi:] = torch.minimum(w[n - hi:], torch.arange(hi, 0, -1, dtype=torch.float32) / (hi + 1))
    return w


def _old_tiles(size, tile, overlap):
    if size <= tile:
        return [(0, size)]
    stride = tile - overlap
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return [(s, s + tile) for s in starts]


@torch.no_grad()
def old_decode(vae: WanVAE, z: torch.Tensor, chunk: int = 1) -> torch.Tensor:
    """FROZEN copy of the previous ``WanVAE.decode_stream`` (time-major, one live cache per spatial tile for the
    whole decode), concatenated on the CPU: the oracle the tile-major decode must reproduce."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    model = vae.model
    dev, dt = vae.device, vae.dtype
    B, _, T, h, w = z.shape
    ys, xs = _old_tiles(h, vae.tile_latent, vae.tile_overlap), _old_tiles(w, vae.tile_latent, vae.tile_overlap)
    sf = vae.spatial_factor
    caches = {(i, j): [None] * vae._num_dec_convs for i in range(len(ys)) for j in range(len(xs))}
    weights = {}
    for i, (y0, y1) in enumerate(ys):
        for j, (x0, x1) in enumerate(xs):
            oy0 = (ys[i - 1][1] - y0) * sf if i > 0 else 0
            oy1 = (y1 - ys[i + 1][0]) * sf if i + 1 < len(ys) else 0
            ox0 = (xs[j - 1][1] - x0) * sf if j > 0 else 0
            ox1 = (x1 - xs[j + 1][0]) * sf if j + 1 < len(xs) else 0
            weights[i, j] = (_old_ramp((y1 - y0) * sf, oy0, oy1)[:, None]
                             * _old_ramp((x1 - x0) * sf, ox0, ox1)[None, :]).to(dev)
    chunks = []
    for t0 in range(0, T, chunk):
        zc = vae.denormalize(z[:, :, t0:t0 + chunk].to(dev, torch.float32)).to(dt)
        out = wsum = None
        for i, (y0, y1) in enumerate(ys):
            for j, (x0, x1) in enumerate(xs):
                x = model.post_quant_conv(zc[:, :, :, y0:y1, x0:x1])
                pieces = []
                for f in range(x.shape[2]):
                    pieces.append(model.decoder(x[:, :, f:f + 1], feat_cache=caches[i, j], feat_idx=[0],
                                                first_chunk=(t0 + f == 0)))
                tile = torch.cat(pieces, 2)
                if vae.patch > 1:
                    tile = unpatchify(tile, patch_size=vae.patch)
                tile = tile.float().clamp_(-1, 1)
                if out is None:
                    out = torch.zeros(B, 3, tile.shape[2], h * sf, w * sf, device=dev)
                    wsum = torch.zeros(h * sf, w * sf, device=dev)
                out[:, :, :, y0 * sf:y1 * sf, x0 * sf:x1 * sf] += tile * weights[i, j]
                wsum[y0 * sf:y1 * sf, x0 * sf:x1 * sf] += weights[i, j]
        chunks.append((out / wsum).cpu())
    return torch.cat(chunks, 2)


def _old_uint8(video):
    return ((video[0].permute(1, 2, 3, 0) + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


# -- the decode against the frozen oracle -----------------------------------------------------------------

# vae16, vae48: the tiny VAEs (conftest.py)


# (latent h, latent w, tile, overlap): one tile, a 1x2 strip, 2x2 with sizes that are no multiple of the
# stride (the last tile moves back and overlaps more), and a 3x2 grid whose overlap exceeds half the tile.
SIZES = [(3, 3, 4, 2), (3, 6, 4, 2), (5, 7, 4, 1), (7, 5, 3, 2)]


@pytest.mark.parametrize("which", ["vae16", "vae48"])
@pytest.mark.parametrize("h,w,tile,overlap", SIZES)
def test_tile_major_decode_equals_old_decode(request, which, h, w, tile, overlap):
    base = request.getfixturevalue(which)
    vae = WanVAE(base.model, tile_latent=tile, tile_overlap=overlap)
    z = torch.randn(1, vae.z_dim, 2, h, w)
    ref = old_decode(vae, z)
    out = vae.decode(z)
    # The same decoder calls on the same tiles, blended in the same order: bit for bit.
    assert out.shape == ref.shape == (1, 3, 5, h * vae.spatial_factor, w * vae.spatial_factor)
    assert torch.equal(out, ref)
    if (h, w) == (5, 7):  # the other entry points, once per VAE
        assert torch.equal(vae.decode_uint8(z), _old_uint8(ref))
        chunks = list(vae.decode_stream(z))
        assert [c.shape[2] for c in chunks] == [1, 4]
        assert torch.equal(torch.cat(chunks, 2), ref)
        u8 = list(vae.decode_uint8_stream(z, chunk=2))
        assert len(u8) == 1 and torch.equal(u8[0], _old_uint8(ref))


def test_tile_major_decode_equals_old_decode_real_architecture():
    """A Wan2.2 decoder with the public architecture (dim_mult 1,2,4,4, two residual blocks, residual
    up-blocks, patch 2) at reduced widths, random weights; three latent frames over a 2x2 tiling."""
    from diffusers import AutoencoderKLWan

    from swift_model.nets.vae import WAN22_CONFIG

    cfg = dict(WAN22_CONFIG, base_dim=16, decoder_base_dim=16, latents_mean=torch.randn(48).tolist(),
               latents_std=(torch.rand(48) + 0.5).tolist())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        vae = WanVAE(AutoencoderKLWan(**cfg), tile_latent=4, tile_overlap=2)
    z = torch.randn(1, 48, 3, 5, 6)
    ref = old_decode(vae, z)
    assert torch.equal(vae.decode(z), ref)


def test_decode_batch_and_checks(vae16):
    vae = WanVAE(vae16.model, tile_latent=4, tile_overlap=2)
    z = torch.randn(2, 16, 2, 3, 6)
    assert torch.equal(vae.decode(z), old_decode(vae, z))
    with pytest.raises(ValueError, match="z must be"):
        vae.decode(torch.randn(1, 15, 2, 3, 6))
    with pytest.raises(ValueError, match="chunk"):
        next(vae.decode_stream(z, chunk=0))
    with pytest.raises(ValueError, match="not a tile"):
        next(vae.decode_tiles(z, vae.spatial_tiles(3, 9)))


# -- the tile API -----------------------------------------------------------------------------------------

def test_decode_tiles_any_split_and_order_equals_decode(vae48):
    """A parallel decode's shape: 'rank' r decodes tiles[r::3], the tiles reach the blender in any order."""
    vae = WanVAE(vae48.model, tile_latent=4, tile_overlap=2)
    z = torch.randn(1, 48, 2, 5, 7)
    full = vae.decode(z)
    tiles = vae.spatial_tiles(5, 7)
    assert len(tiles) == 6 and [t.index for t in tiles] == list(range(6))
    pieces = [p for r in range(3) for p in vae.decode_tiles(z, tiles[r::3])]
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(0)).tolist()
    blender = vae.decode_blender(tuple(z.shape))
    for k in order:
        assert not blender.complete
        blender.add(*pieces[k])
    assert blender.complete
    torch.testing.assert_close(blender.result(), full, rtol=0, atol=1e-6)  # addition order: fp32 rounding
    u8 = vae.decode_blender(tuple(z.shape), uint8=True)
    for k in order[::-1]:
        u8.add(*pieces[k])
    assert (u8.result()[0].int() - vae.decode_uint8(z).int()).abs().max() <= 1  # a rounding tie at most


def _field(b, c, f, hh, ww):
    """A smooth function of the output position, the same whichever tile computes it."""
    y = torch.arange(hh, dtype=torch.float32)[:, None]
    x = torch.arange(ww, dtype=torch.float32)[None, :]
    base = torch.sin(0.37 * y + 0.11 * x) + 0.01 * y - 0.02 * x
    k = torch.arange(b * c * f, dtype=torch.float32).view(b, c, f, 1, 1)
    return base * (1 + 0.1 * k)


@pytest.mark.parametrize("h,w,tile,overlap,scale", [(1, 1, 4, 0, 1), (9, 4, 4, 1, 2), (11, 13, 5, 3, 3),
                                                     (16, 10, 6, 2, 1)])
def test_blender_reproduces_a_consistent_field_and_finalises_rows(h, w, tile, overlap, scale):
    """When every tile returns the same values on its overlaps, the blend is those values (the weights sum to
    one after the division); bands turn final exactly when the last tile row covering them is added."""
    tiles = spatial_tiles(h, w, tile, overlap)
    field = _field(2, 3, 2, h * scale, w * scale)
    for uint8 in (False, True):
        bl = TileBlender(tiles, 2, 3, 2, scale=scale, uint8=uint8)
        for t in tiles:
            bl.add(t, field[..., t.y0 * scale:t.y1 * scale, t.x0 * scale:t.x1 * scale])
            rows_done = [r for r in bl.final_rows()]
            # Every final row is covered by no tile still to come (tiles arrive row-major).
            later = [u for u in tiles if u.index > t.index]
            for r0, r1 in rows_done:
                assert all(u.y1 * scale <= r0 or u.y0 * scale >= r1 for u in later)
            # And every row that no later tile covers is final (nothing waits longer than it must).
            final = torch.zeros(h * scale, dtype=torch.bool)
            for r0, r1 in rows_done:
                final[r0:r1] = True
            pending = torch.zeros(h * scale, dtype=torch.bool)
            for u in later:
                pending[u.y0 * scale:u.y1 * scale] = True
            assert torch.equal(final, ~pending)
        out = bl.result()
        if uint8:
            want = ((field.clamp(-1, 1).movedim(1, -1) + 1) * 127.5).round().to(torch.uint8)
            assert (out.int() - want.int()).abs().max() <= 1
        else:
            torch.testing.assert_close(out, field, rtol=0, atol=1e-5)


def test_blender_checks():
    tiles = spatial_tiles(6, 6, 4, 2)
    bl = TileBlender(tiles, 1, 3, 1)
    with pytest.raises(ValueError, match="must be"):
        bl.add(tiles[0], torch.zeros(1, 3, 1, 4, 5))
    bl.add(tiles[0], torch.zeros(1, 3, 1, 4, 4))
    with pytest.raises(ValueError, match="already added"):
        bl.add(tiles[0], torch.zeros(1, 3, 1, 4, 4))
    with pytest.raises(ValueError, match="not part"):
        bl.add(spatial_tiles(6, 6, 3, 1)[1], torch.zeros(1, 3, 1, 3, 3))
    with pytest.raises(RuntimeError, match="not been added"):
        bl.result()
    with pytest.raises(ValueError, match="overlap"):
        spatial_tiles(6, 6, 4, 4)
    assert spans(10, 4, 1) == [(0, 4), (3, 7), (6, 10)] and spans(3, 4, 1) == [(0, 3)]
    t = Tile(0, 0, 0, 0, 4, 0, 4, blend_top=1, blend_right=2)
    wt = t.weight(2)
    assert wt.shape == (8, 8) and wt[0, 0] == pytest.approx(1 / 3) and wt[4, -1] == pytest.approx(1 / 5)


# -- the decode's device working set ----------------------------------------------------------------------

class LiveDeviceBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages on one device type: a storage is counted when an op first
    returns it and uncounted when it is freed (a weakref callback); ``peak`` is the largest total seen."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                st = t.untyped_storage()
                if id(st) in self._refs:
                    continue
                n = st.nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                self._refs[id(st)] = weakref.ref(st, lambda _, k=id(st), n=n: self._freed(k, n))
        return out


def test_decode_device_working_set_does_not_grow_with_width_or_length():
    """The public Wan2.2 decoder architecture on a fake CUDA device (FakeTensorMode: shapes only, no GPU and
    no real memory): the peak of live device bytes during the tile-major decode is the same at twice the
    width, and at more frames, while the old per-tile-cache decode's peak grows with the tile count."""
    from diffusers import AutoencoderKLWan
    from torch._subclasses.fake_tensor import FakeTensorMode

    from swift_model.nets.vae import WAN22_CONFIG

    def peak(decode, vae, t, w):
        z = torch.randn(1, 48, t, 4, w, device="cuda")
        with LiveDeviceBytes("cuda") as tracker:
            decode(vae, z)
        return tracker.peak

    new = WanVAE.decode_uint8
    cfg = dict(WAN22_CONFIG, latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with torch.device("cuda"):
            # Tiles of 4 latent pixels without overlap keep the op count (the cost of fake tensors) small.
            vae = WanVAE(AutoencoderKLWan(**cfg), tile_latent=4, tile_overlap=0)
        assert len(vae.spatial_tiles(4, 4)) == 1 and len(vae.spatial_tiles(4, 8)) == 2
        narrow, wide = peak(new, vae, 2, 4), peak(new, vae, 2, 8)
        assert narrow > 0 and abs(wide / narrow - 1) < 0.10, (narrow, wide)
        # The caches are full from the third latent frame on; from there on the peak stays.
        short, long = peak(new, vae, 3, 4), peak(new, vae, 4, 4)
        assert abs(long / short - 1) < 0.10, (short, long)
        # The tracker does see a working set that grows: the old decode keeps one cache per tile.
        old1, old2 = peak(old_decode, vae, 2, 4), peak(old_decode, vae, 2, 8)
        assert old2 > 1.25 * old1, (old1, old2)


# -- encode tiling ----------------------------------------------------------------------------------------

def test_encode_tiling_threshold(vae16, vae48, monkeypatch):
    for vae in (vae16, vae48):
        assert not vae.encode_is_tiled(352, 640)  # the Stage I conditioning encode
        assert not vae.encode_is_tiled(720, 1280)  # the threshold itself
        assert vae.encode_is_tiled(1408, 2560)  # the bridge's 2K encode
    # The 640x352 encode is one pass over the whole frame (chunked in time only), and it computes exactly what the
    # library's own encode computes, for a clip of several chunks too (frame 0, then 4 at a time)
    calls = []
    real = vae16._encode_chunks
    monkeypatch.setattr(vae16, "_encode_chunks", lambda x: calls.append(tuple(x.shape)) or real(x))
    video = torch.rand(1, 3, 1, 352, 640) * 2 - 1
    z = vae16.encode(video)
    assert calls == [(1, 3, 1, 352, 640)] and z.shape == (1, 16, 1, 44, 80)
    for vae, frames in ((vae16, 1), (vae16, 9), (vae48, 9)):
        video = torch.rand(1, 3, frames, 64, 96) * 2 - 1
        want = vae.normalize(vae.model.encode(video.to(vae.dtype)).latent_dist.mode().float())
        assert torch.equal(vae.encode(video), want)


@torch.no_grad()
def _oracle_tiled_encode(vae: WanVAE, video: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """Written out independently: encode each pixel crop alone, weight its normalised latents by the
    product of linear ramps over the overlaps with its neighbours, sum, divide by the summed weights."""
    sf = vae.spatial_factor
    h, w = video.shape[3] // sf, video.shape[4] // sf
    ys, xs = _old_tiles(h, tile, overlap), _old_tiles(w, tile, overlap)
    acc, wsum = 0, torch.zeros(h, w)
    for i, (y0, y1) in enumerate(ys):
        for j, (x0, x1) in enumerate(xs):
            z = vae.model.encode(video[:, :, :, y0 * sf:y1 * sf, x0 * sf:x1 * sf]).latent_dist.mode()
            wy = _old_ramp(y1 - y0, ys[i - 1][1] - y0 if i else 0, y1 - ys[i + 1][0] if i + 1 < len(ys) else 0)
            wx = _old_ramp(x1 - x0, xs[j - 1][1] - x0 if j else 0, x1 - xs[j + 1][0] if j + 1 < len(xs) else 0)
            wt = wy[:, None] * wx[None, :]
            full = torch.zeros(*z.shape[:3], h, w)
            full[..., y0:y1, x0:x1] = vae.normalize(z.float()) * wt
            acc = acc + full
            wsum[y0:y1, x0:x1] += wt
    return acc / wsum


def test_tiled_encode_is_the_blend_of_tile_encodes_and_close_to_untiled(vae48):
    """Above the threshold the encode is the ramp-weighted blend of independent tile encodes (exact up to
    float32 rounding). It approximates the untiled encode: relative L2 error <= 0.2 here (measured 0.07).
    That tolerance is loose because the encoder's middle attention block sees the whole frame untiled and one
    tile when tiled, and a random-weight encoder has no locality; a wrong crop or blend gives ~1."""
    vae = WanVAE(vae48.model, encode_tile_latent=8, encode_tile_overlap=4, encode_tile_min_pixels=0)
    g = torch.Generator().manual_seed(3)
    coarse = torch.rand(1, 15, 3, 4, generator=g) * 2 - 1  # a smooth video, like an upsampled reference
    video = torch.nn.functional.interpolate(coarse, size=(96, 160), mode="bilinear").view(1, 3, 5, 96, 160)
    assert vae.encode_is_tiled(96, 160) and len(vae.encode_spatial_tiles(6, 10)) == 2
    tiled = vae.encode(video)
    torch.testing.assert_close(tiled, _oracle_tiled_encode(vae, video, 8, 4), rtol=0, atol=1e-5)
    vae.encode_tile_min_pixels = 96 * 160
    assert not vae.encode_is_tiled(96, 160)
    whole = vae.encode(video)
    rel = ((tiled - whole).norm() / whole.norm()).item()
    assert rel <= 0.2, rel
    # The tile API: any split of encode_tiles, blended in any order, gives the same latents.
    blender = vae.encode_blender(tuple(video.shape))
    pieces = list(vae.encode_tiles(video, blender.tiles[1:])) + list(vae.encode_tiles(video, blender.tiles[:1]))
    for tile, z in pieces:
        blender.add(tile, z)
    torch.testing.assert_close(blender.result(), tiled, rtol=0, atol=1e-6)


# -- the VAE dtype ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("z_dim", [16, 48])
def test_bf16_decode_error_is_bounded(z_dim):
    """bf16 keeps 8 significant bits: one ulp of the output range [-1, 1] near 1 is 2**-7. The same weights
    (drawn in float32, then cast) decode the same latents with a mean error under 1 ulp and a largest error
    under 16 ulps (measured 0.3-0.6 ulp mean and 3-8 ulps max on these VAEs). A dtype mistake (latents
    cast before the denormalisation, a cache kept in the wrong dtype, an un-clamped output) moves the output
    by the order of the signal itself (std 0.25-0.35, ~40 ulps)."""
    fp32 = WanVAE.tiny(z_dim, seed=0, tile_latent=4, tile_overlap=2)
    bf16 = WanVAE.tiny(z_dim, seed=0, tile_latent=4, tile_overlap=2, dtype="bf16")
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    z = torch.randn(1, z_dim, 2, 4, 6, generator=torch.Generator().manual_seed(1))
    a, b = fp32.decode(z), bf16.decode(z)
    assert b.dtype == torch.float32 and b.shape == a.shape
    ulp = 2.0 ** -7
    err = (a - b).abs()
    assert err.mean() < 1 * ulp and err.max() < 16 * ulp, (err.mean().item() / ulp, err.max().item() / ulp)
    assert a.std() > 20 * ulp  # the bound is small against the signal
    # Latents out of a bf16 encode are float32 too.
    assert bf16.encode(torch.rand(1, 3, 1, 2 * bf16.size_multiple, bf16.size_multiple)).dtype == torch.float32


def test_vae_dtype_choice(vae16):
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("fp32") is torch.float32 and parse_dtype(None) is None
    with pytest.raises(ValueError, match="VAE dtype"):
        WanVAE(vae16.model, dtype="fp16")
    from swift_model.cli.main import build_parser
    from swift_model.generation.pipeline import SwiftI2VPipeline
    from swift_model.nets.vae import default_dtype

    assert default_dtype("cpu") is torch.float32 and default_dtype("cuda") is torch.bfloat16
    args = build_parser().parse_args(["generate", "--image", "x.png", "--out", "y.mp4", "--vae-dtype", "bf16"])
    assert args.vae_dtype == "bf16"
    assert build_parser().parse_args(["generate", "--image", "x.png", "--out", "y.mp4"]).vae_dtype is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--image", "x.png", "--out", "y.mp4", "--vae-dtype", "fp16"])
    pipe = SwiftI2VPipeline.tiny(device="cpu", vae_dtype="bf16")
    assert pipe.vae1.dtype == pipe.vae2.dtype == torch.bfloat16
    assert SwiftI2VPipeline.tiny(device="cpu").vae2.dtype == torch.float32
