"""Cases of the whole tiny pipeline on several ranks, run by ``test_parallel.py``'s spawned ranks (one spawn per
world size for the whole distributed set).

Every rank computes the one-process reference itself (the same pipeline with the default, single-process
:class:`~swift_model.generation.distributed.Parallelism`), then the same generation split over the ranks, and compares.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os

import numpy as np
import torch
import torch.distributed as dist

# a clip whose every DiT call has at least 4 tokens (Stage I: 3 latent frames of 2 tokens; Stage II: windows
# of 2 or 3 latent frames of 8 tokens), so 4 Ulysses ranks each get some
SIZE = dict(frames=9, width=128, height=64, segment_blocks=1, neighbors=(1, 1), progress=False)
FP32_RTOL = 1e-5

_PIPE = {}


def _pipe(fsdp: bool = False):
    """The tiny pipeline of this rank (built once per process: the first build imports diffusers). ``fsdp``: with
    generate --fsdp's memory plan (the DiTs built in host memory, for distribute() to shard onto the device)."""
    if fsdp not in _PIPE:
        from swift_model.generation.distributed import memory_plan
        from swift_model.generation.pipeline import SwiftI2VPipeline

        # fast: what --fsdp needs
        pipe = SwiftI2VPipeline.tiny(seed=0, device="cpu", memory=memory_plan("fast" if not fsdp else None, fsdp))
        # Stage II VAE tiles small enough that the 128 x 64 clip (a latent of 4 x 8) has 3 of them, encode
        # tiled too: the bridge's encode and the final decode really split over the ranks
        vae = pipe.vae2
        vae.tile_latent = vae.encode_tile_latent = 4
        vae.tile_overlap = vae.encode_tile_overlap = 1
        vae.encode_tile_min_pixels = 0
        assert len(vae.spatial_tiles(4, 8)) == 3 and vae.encode_is_tiled(SIZE["height"], SIZE["width"])
        _PIPE[fsdp] = pipe
    return copy.deepcopy(_PIPE[fsdp])  # distribute() shards and sets attributes: every case its own copy


def _image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8))


def _generate(pipe, **kw):
    return pipe.generate(_image(), "a cat", seed=2, **SIZE, **kw)


def _reference(**kw):
    """The one-process generation: computed by rank 0 alone (the ranks share two cores), its latents sent to
    every rank. Returns ``(result on rank 0 else None, latents)``."""
    result = _generate(_pipe(), **kw) if dist.get_rank() == 0 else None
    box = [None if result is None else result.latents]
    dist.broadcast_object_list(box, src=0)
    if result is not None:
        assert result.info["world_size"] == 1 and result.frames is not None
    return result, box[0]


def pipeline_cases(check) -> dict:
    """``name -> case(group)``; ``check(got, want, rtol, what)`` asserts and records (test_parallel's)."""
    from swift_model.generation.distributed import Parallelism, distribute

    def compare(got, want, what: str) -> None:
        result, latents = want
        check(got.latents, latents, FP32_RTOL, f"{what} latents")
        rank = dist.get_rank()
        if rank == 0:  # rank 0 alone decodes the frames
            diff = (got.frames.int() - result.frames.int()).abs()
            assert diff.max() <= 1 and diff.float().mean() < 1e-3, f"{what}: frames differ by up to {diff.max()}"
        else:
            assert got.frames is None and got.output is None, f"{what}: rank {rank} returned frames"
        assert got.info["world_size"] == dist.get_world_size()

    def split(joint: bool):
        def case(group):
            want = _reference(joint=joint)
            pipe = _pipe()
            par = Parallelism.build()  # Ulysses over every rank: the default
            assert par.ulysses == dist.get_world_size() and not par.cfg_parallel
            distribute(pipe, par)
            compare(_generate(pipe, joint=joint), want, "joint" if joint else "sequential")
        return case

    def cfg_parallel(group):
        W = dist.get_world_size()
        fsdp = W == 4  # FSDP over every rank, under CFG halves of Ulysses pairs (each composition once)
        # with the shared anchor too: one process reuses the anchor's keys and values, the ranks recompute them
        want = _reference(guidance_scale=3.0, shared_anchor=True)
        pipe = _pipe(fsdp)
        assert pipe.memory.sharded_dits == fsdp and pipe.memory.initial("stage1") == ("cpu" if fsdp else "device")
        par = Parallelism.build(cfg_parallel=True, guidance=True, fsdp=fsdp)
        assert par.ulysses == W // 2 and par.branch == int(dist.get_rank() >= W // 2)
        distribute(pipe, par)
        compare(_generate(pipe, guidance_scale=3.0, shared_anchor=True), want, f"cfg-parallel fsdp={fsdp}")
        # the exchange itself: each half computes its own branch only, every rank gets both, bitwise
        calls = []

        def call(c):
            calls.append(c)
            return torch.full((2, 3), float(c))

        v, vu = par.velocities(call, 1.0, -1.0, True)
        assert calls == [-1.0 if par.branch else 1.0], calls
        assert torch.equal(v, torch.full((2, 3), 1.0)) and torch.equal(vu, torch.full((2, 3), -1.0))

    def cli_errors(group):
        """Under a torchrun-like environment: a bad --ulysses fails on every rank with exit status 2 and one
        message (rank 0's); an input only one rank cannot read stops every rank with the same message."""
        from swift_model.cli import main

        W, rank = dist.get_world_size(), dist.get_rank()
        out_dir = os.environ["SPAWN_OUT_DIR"]
        img = os.path.join(out_dir, "in.png")
        if rank == 0:
            _image().save(img)
        dist.barrier()
        base = ["generate", "--tiny", "--prompt", "p", "--out", os.path.join(out_dir, "x.mp4"), "--frames", "9",
                "--width", "128", "--height", "64", "--quiet"]
        env = {"RANK": str(rank), "WORLD_SIZE": str(W), "LOCAL_RANK": str(rank)}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            for extra, needle in ((["--image", img, "--ulysses", "3"], f"--ulysses 3 must divide the {W} ranks"),
                                  (["--image", img, "--cfg-parallel"], "--cfg-parallel"),
                                  (["--image", img if rank == 0 else img + ".missing"], "rank 1: ")):
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    status = main(base + extra)
                lines = err.getvalue().strip().splitlines()
                errors = [line for line in lines if line.startswith("error: ")]
                assert status == 2, f"{extra}: exit status {status}"
                if rank == 0:  # may also print the tiny models' notice
                    assert len(errors) == 1 and needle in errors[0], lines
                else:
                    assert lines == [], f"rank {rank} printed {lines}"
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        assert not os.path.exists(os.path.join(out_dir, "x.mp4"))

    def vae_tiles(group):
        """The 2K VAE passes over the ranks, on a tiny VAE with tiles small enough to give 6 tiles: the decode
        (uint8 and float) on rank 0 and the tiled encode on every rank are bitwise the one-process ones."""
        from swift_model.nets import vae_parallel
        from swift_model.nets.vae import WanVAE

        rank = dist.get_rank()
        vae = WanVAE.tiny(48, seed=1, tile_latent=3, tile_overlap=1, encode_tile_min_pixels=0,
                          encode_tile_latent=3, encode_tile_overlap=1)
        g = torch.Generator().manual_seed(5)
        z = torch.randn(1, 48, 2, 4, 7, generator=g)  # 2 x 3 tiles of up to 3 x 3: uneven shares at 4 ranks
        assert len(vae.spatial_tiles(4, 7)) == 6
        got8 = vae_parallel.decode_uint8(vae, z, group)
        got = vae_parallel.decode(vae, z, group)
        if rank == 0:  # the one-process references, computed once
            check(got8, vae.decode_uint8(z), 0, "VAE decode uint8")
            check(got, vae.decode(z), 0, "VAE decode float")
        else:
            assert got8 is None and got is None
        video = torch.rand(1, 3, 5, 64, 96, generator=g) * 2 - 1  # a latent of 4 x 6: 6 tiles again
        assert vae.encode_is_tiled(64, 96)
        got = vae_parallel.encode(vae, video, group)
        want = [vae.encode(video) if rank == 0 else None]
        dist.broadcast_object_list(want, src=0)
        check(got, want[0], 0, "VAE encode")

    return {
        "pipeline-sequential": split(False),
        "pipeline-joint": split(True),
        "pipeline-cfg-parallel": cfg_parallel,
        "cli-errors": cli_errors,
        "vae-tiles": vae_tiles,
    }
