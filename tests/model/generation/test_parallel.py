"""Sequence parallelism (Ulysses) and FSDP2 on torch.distributed, on CPU processes with gloo.

Processes are spawned once per world size (2 and 4): a module-scoped launcher starts the ranks, each runs every
case below in the same order and writes its verdicts to a file; each pytest test reads the verdict of its case.
Every rank computes the single-process reference itself (same seeds, same inputs), so a case compares the
distributed result with one process on every rank. ``init_process_group`` has a timeout and the launcher a join
deadline after which the children are killed: a mismatch fails, it never hangs.

Exactness (relative to the reference's largest magnitude):

- FSDP2 against the same run unsharded: bitwise (the gathered weights are the exact weights).
- Sequence parallel against one process, forward: fp32 rounding (1e-5; seen up to 2e-6), and fp64 attention to
  1e-12 (seen up to 1e-15). Everything per token is bitwise (each rank's rows go through the same kernels), but
  a rank attends H/W heads instead of H: the reference attention multiplies the few-token query chunks of each
  block with one batched matmul over (batch, heads), and on the CPU the BLAS kernel chosen for such tiny
  matrices, hence the rounding, depends on the batch count. Where the chunks are larger (dense attention here)
  the results are bitwise.
- Gradients under sequence parallelism are partial sums summed over the ranks, in another order: checked on an
  fp64 model (1e-6: the norms round to fp32 inside, as Wan's do), since in fp32 one process's own gradients are
  only good to ~3e-4 on this tiny model.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from swift_kernels import CSGLayout, csg_attention
from swift_model import WanDiT, WanDiTConfig
from swift_model.nets.dit import model as dit_module  # where the DiT looks token_range up
from swift_model.nets import parallel
from swift_model.nets.parallel import check_heads, shard_sizes, token_range
import spawn
from helpers import mismatch as _mismatch
from helpers import assert_frames_match, layout_dit_inputs, pipeline_cases, recorded_video_frames, write_png
from helpers import random_init as _random_init

ROOT = Path(__file__).resolve().parents[3]
WORLD_SIZES = (2, 4)
# Tolerances, relative to the reference's largest magnitude (see the module docstring for why not bitwise).
FP64_RTOL = 1e-12
FP32_RTOL = 1e-5
# fp64 DiT gradients: the norms still round to fp32 inside (as Wan's do), so partial sums added in another
# order differ at fp32 precision, far below any real error
GRAD_RTOL = 1e-6


# -------------------------------------------------------------------------------------------------------------
# single-process checks of the shard arithmetic
# -------------------------------------------------------------------------------------------------------------


def test_shard_sizes_and_ranges():
    assert shard_sizes(21, 4) == [6, 5, 5, 5]
    assert shard_sizes(8, 2) == [4, 4]
    for L in (1, 5, 21, 3520):
        for W in (1, 2, 3, 4, 8):
            if L < W:
                with pytest.raises(ValueError, match=f"{L} tokens cannot be split over {W} ranks"):
                    shard_sizes(L, W)
                continue
            sizes = shard_sizes(L, W)
            assert sum(sizes) == L and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
            ranges = [token_range(L, W, r) for r in range(W)]
            assert ranges[0][0] == 0 and ranges[-1][1] == L
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            # the split of torch.tensor_split
            assert [len(c) for c in torch.arange(L).tensor_split(W)] == sizes
    with pytest.raises(ValueError, match="rank"):
        token_range(8, 2, 2)
    with pytest.raises(TypeError, match="num_tokens"):
        shard_sizes(8.0, 2)


def test_head_count_must_divide():
    check_heads(24, 4)
    with pytest.raises(ValueError, match="6 heads cannot be split over 4 ranks"):
        check_heads(6, 4)


# -------------------------------------------------------------------------------------------------------------
# the cases run by every rank
# -------------------------------------------------------------------------------------------------------------


RECORD: list[str] = []  # the largest relative errors seen, reported in the verdicts


def _check(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    why = _mismatch(got, want, rtol)
    assert why is None, f"{what}: {why}"
    rel = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300)).item()
    RECORD.append(f"{what}: {'bitwise' if torch.equal(got, want) else f'rel {rel:.1e}'}")


# -- Ulysses attention against one process: csg_attention in the three modes, fp64, forward and backward


def _case_attention(mode: str):
    def case(group):
        W, r = dist.get_world_size(group), dist.get_rank(group)
        P, T = 5, 7  # 5 tokens per block: shard boundaries cut through blocks
        layout = CSGLayout(T, P, segment_blocks=2, neighbors=(1, 1), mode=mode, segment=1 if mode == "window" else None)
        L, B, H, D = layout.num_tokens, 2, 4, 8
        g = torch.Generator().manual_seed(11)
        q, k, v, dout = (torch.randn(B, L, H, D, generator=g, dtype=torch.float64) for _ in range(4))
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        want = csg_attention(*full, layout)
        want.backward(dout)
        sizes = shard_sizes(L, W)
        start, end = token_range(L, W, r)
        local = [t[:, start:end].clone().requires_grad_() for t in (q, k, v)]
        got = parallel.ulysses_attention(*local, lambda q, k, v: csg_attention(q, k, v, layout), sizes, group)
        got.backward(dout[:, start:end])
        _check(got.detach(), want.detach()[:, start:end], FP64_RTOL, f"{mode} forward")
        for name, a, b in zip("qkv", local, full):
            _check(a.grad, b.grad[:, start:end], FP64_RTOL, f"{mode} d{name}")
    return case


def _case_shard_and_gather(group):
    """shard_tokens then gather_tokens (sizes exchanged) give back the tensor; the gradient of the gathered
    tensor lands, summed over ranks, exactly once on every element."""
    x = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(4), dtype=torch.float64)  # tokens on dim 2
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    xr = x.clone().requires_grad_()
    local = parallel.shard_tokens(xr, group, dim=2)
    assert local.shape[2] == shard_sizes(11, dist.get_world_size(group))[dist.get_rank(group)]
    full = parallel.gather_tokens(local, group, dim=2)
    _check(full.detach(), x, 0, "round trip")
    (full * w).sum().backward()
    dist.all_reduce(xr.grad, group=group)
    _check(xr.grad, w, 0, "gradient")


# -- the tiny WanDiT forward in the three layouts (and dense) against one process

HL, WL = 2, 6  # 1 x 3 = 3 tokens per latent frame: odd lengths, uneven shards
T_CLIP = 7


def _dit_case(preset: str, layout_kind: str, seed: int = 0, layers: int = 2, width: int = WL):
    cfg = WanDiTConfig.preset(preset, num_layers=layers)
    model = _random_init(WanDiT(cfg), seed).eval()
    P = (HL // 2) * (width // 2)
    layout = None
    if layout_kind != "dense":
        layout = CSGLayout(T_CLIP, P, segment_blocks=2, neighbors=(1, 1), mode=layout_kind,
                           segment=1 if layout_kind == "window" else None)
    # per token: the shards split the timesteps with the tokens
    x, t, ctx, clip = layout_dit_inputs(cfg, layout, T_CLIP, HL, width, torch.Generator().manual_seed(seed + 1),
                                        per_token=True)
    return model, dict(latents=x, timestep=t, context=ctx, clip_fea=clip, layout=layout)


def _same_on_every_rank(t: torch.Tensor, group) -> None:
    every = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, t.contiguous(), group=group)
    assert all(torch.equal(e, every[0]) for e in every), "ranks returned different outputs"


def _case_dit(preset: str, layout_kind: str, cached: bool = False):
    def case(group):
        model, kw = _dit_case(preset, layout_kind, seed=3)
        with torch.no_grad():
            want = model(**kw)
            if cached:  # K/V precomputed once, as the pipeline reuses them across steps and segments
                kw["context_cache"] = model.precompute_context(kw.pop("context"), kw.pop("clip_fea"))
            got = model(**kw, sp_group=group)
        _check(got, want, FP32_RTOL, f"{preset}/{layout_kind}")
        _same_on_every_rank(got, group)
    return case


def _case_dit_halves(group):
    """Two sequence-parallel groups side by side (ranks {0..W/2-1} and the rest), each on its own inputs: the
    rank inside the group, not the global rank, picks the shard."""
    W = dist.get_world_size()
    halves = [dist.new_group(list(range(0, W // 2))), dist.new_group(list(range(W // 2, W)))]
    half = dist.get_rank() // (W // 2)
    model, kw = _dit_case("tiny-ti2v", "clip", seed=10 + half)
    with torch.no_grad():
        want = model(**kw)
        got = model(**kw, sp_group=halves[half])
    _check(got, want, FP32_RTOL, f"half {half}")


def _case_dit_grad(boundary: str, checkpointing: bool):
    def case(group):
        # in fp64, so that the only difference, the order of the partial sums, stays far below any real error
        # (in fp32 the gradients of one process are themselves only good to ~3e-4 relative on this tiny model)
        model, kw = _dit_case("tiny-ti2v", "window", seed=5)
        model.double().train()
        kw = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
        model.block_boundary, model.checkpoint_blocks = boundary, checkpointing
        weight = torch.randn(kw["latents"][:, :48].shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        grads = []
        for sp in (None, group):
            model.zero_grad(set_to_none=True)
            x = kw["latents"].clone().requires_grad_()
            ctx = kw["context"].clone().requires_grad_()
            out = model(x, kw["timestep"], ctx, layout=kw["layout"], sp_group=sp)
            (out * weight).sum().backward()  # every rank: the same loss on the same gathered output
            g = {"latents": x.grad, "context": ctx.grad, **{n: p.grad for n, p in model.named_parameters()}}
            if sp is not None:  # each rank holds its tokens' share of every gradient: sum them
                for t in g.values():
                    dist.all_reduce(t, group=group)
            grads.append(g)
        for name in grads[0]:
            _check(grads[1][name], grads[0][name], GRAD_RTOL, f"gradient of {name}")
    return case


def _case_heads_not_divisible(group):
    W = dist.get_world_size(group)
    _, kw = _dit_case("tiny-ti2v", "dense")
    model = WanDiT(WanDiTConfig.preset("tiny-ti2v", dim=48, num_heads=3, num_layers=1))  # 3 heads: W = 2 or 4 fails
    try:
        model(**kw, sp_group=group)
    except ValueError as exc:
        assert f"3 heads cannot be split over {W} ranks" in str(exc), str(exc)
    else:
        raise AssertionError("no ValueError for 3 heads over %d ranks" % W)


def _case_wrong_shard_order(group):
    """Ranks 0 and 1 swap their token shards (equal sizes, so every exchange still fits): the result is wrong,
    and the comparison the other cases use says so."""
    model, kw = _dit_case("tiny-ti2v", "window", seed=7, width=4)  # 5 blocks of 2 tokens
    real = dit_module.token_range
    L, W = kw["timestep"].shape[1], dist.get_world_size(group)
    assert shard_sizes(L, W)[0] == shard_sizes(L, W)[1]

    def swapped(L, W, r):
        return real(L, W, {0: 1, 1: 0}.get(r, r))

    with torch.no_grad():
        want = model(**kw)
        dit_module.token_range = swapped
        try:
            got = model(**kw, sp_group=group)
        finally:
            dit_module.token_range = real
    assert _mismatch(got, want, FP32_RTOL) is not None, "swapped shards were not detected"
    assert _mismatch(got, want, 1e-2) is not None, "swapped shards were not detected"


# -- FSDP2


def _case_fsdp_inference(dtype: torch.dtype, with_sp: bool):
    def case(group):
        model, kw = _dit_case("tiny-i2v", "window", seed=8, layers=3)
        model.to_dtype(dtype)
        sharded = parallel.fsdp_shard_blocks(copy.deepcopy(model), group)
        W = dist.get_world_size(group)
        from torch.distributed.tensor import DTensor

        for blk, ref in zip(sharded.blocks, model.blocks):
            for (name, p), q in zip(blk.named_parameters(), ref.parameters()):
                if q.dtype == dtype:  # really sharded: this rank holds about 1/W of it
                    assert isinstance(p, DTensor) and p.to_local().numel() <= -(-q.shape[0] // W) * q[0].numel(), name
                else:  # a parameter kept in fp32 stays whole and fp32
                    assert not isinstance(p, DTensor) and p.dtype == torch.float32 and torch.equal(p, q), name
        if dtype != torch.float32:
            assert any(p.dtype == torch.float32 for p in sharded.blocks[0].parameters())
        sp = group if with_sp else None
        with torch.no_grad():
            single = model(**kw)
            want = model(**kw, sp_group=sp)  # FSDP gathers the exact weights: the same bits as without it
            got = sharded(**kw, sp_group=sp)
            cache = sharded.precompute_context(kw["context"], kw["clip_fea"])  # K/V through the FSDP forward method
            got_cached = sharded(kw["latents"], kw["timestep"], layout=kw["layout"], context_cache=cache, sp_group=sp)
        _check(got, want, 0, f"fsdp {dtype} sp={with_sp}")
        _check(got_cached, want, 0, f"fsdp {dtype} sp={with_sp} cached")
        _check(got.float(), single.float(), FP32_RTOL if dtype == torch.float32 else 2e-2, f"fsdp {dtype} sp={with_sp} vs one process")
    return case


def _case_fsdp_training(group):
    """FSDP2 per block with the unfused boundary and checkpointing (the training configuration): every rank
    on the same batch, so the averaged gradients are the single-process ones."""
    model, kw = _dit_case("tiny-ti2v", "packed", seed=9)
    model.train()
    model.block_boundary, model.checkpoint_blocks = "unfused", True
    sharded = parallel.fsdp_shard_blocks(copy.deepcopy(model), group)
    weight = torch.randn(kw["latents"][:, :48].shape, generator=torch.Generator().manual_seed(6))
    for m in (model, sharded):
        (m(**kw) * weight).sum().backward()
    for (name, p), q in zip(sharded.named_parameters(), model.parameters()):
        # FSDP's hooks reorder the backward, so gradients summed from several blocks (the root's) are added
        # in another order: fp32 rounding, not bitwise
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        _check(g, q.grad, FP32_RTOL, f"gradient of {name}")


CASES = {
    **{f"attention-{m}": _case_attention(m) for m in ("window", "clip", "packed")},
    "shard-and-gather": _case_shard_and_gather,
    **{f"dit-ti2v-{k}": _case_dit("tiny-ti2v", k) for k in ("dense", "window", "clip", "packed")},
    **{f"dit-i2v-{k}": _case_dit("tiny-i2v", k) for k in ("window", "clip", "packed")},
    "dit-i2v-cached": _case_dit("tiny-i2v", "window", cached=True),
    "dit-halves": _case_dit_halves,
    "grad-fused": _case_dit_grad("fused", False),
    "grad-unfused-checkpoint": _case_dit_grad("unfused", True),
    "heads-not-divisible": _case_heads_not_divisible,
    "wrong-shard-order": _case_wrong_shard_order,
    "fsdp-fp32": _case_fsdp_inference(torch.float32, False),
    "fsdp-bf16-sp": _case_fsdp_inference(torch.bfloat16, True),
    "fsdp-training": _case_fsdp_training,
    **pipeline_cases(_check),  # the tiny two-stage pipeline, CFG parallel, the CLI's errors
}


# -------------------------------------------------------------------------------------------------------------
# the launcher (the spawned fixture of conftest.py, tests/spawn.py)
# -------------------------------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_distributed(spawned, world_size, case):
    spawn.check(spawned(world_size), case)


# -------------------------------------------------------------------------------------------------------------
# the command line: degrees, one process, torchrun
# -------------------------------------------------------------------------------------------------------------


def test_degrees():
    from swift_model.generation.distributed import resolve_degrees

    assert resolve_degrees(1) == {"world_size": 1, "ulysses": 1, "cfg_parallel": False, "fsdp": False, "replicas": 1}
    assert resolve_degrees(8)["ulysses"] == 8
    assert resolve_degrees(8, cfg_parallel=True, guidance=True)["ulysses"] == 4
    d = resolve_degrees(8, ulysses=2, cfg_parallel=True, fsdp=True, guidance=True)
    assert (d["ulysses"], d["replicas"], d["fsdp"]) == (2, 2, True)
    for kw, needle in ((dict(world_size=4, ulysses=3), "--ulysses 3 must divide the 4 ranks"),
                       (dict(world_size=8, ulysses=8, cfg_parallel=True, guidance=True), "of each CFG half"),
                       (dict(world_size=3, cfg_parallel=True, guidance=True), "even number of processes"),
                       (dict(world_size=4, cfg_parallel=True), "needs --guidance"),
                       (dict(world_size=1, ulysses=2), "--ulysses 2 needs several processes"),
                       (dict(world_size=1, fsdp=True), "--fsdp needs several processes"),
                       (dict(world_size=2, ulysses=0), "--ulysses must be >= 1")):
        with pytest.raises(ValueError, match=needle):
            resolve_degrees(**kw)


def test_parallel_flags_in_one_process(tmp_path, capsys):
    from swift_model.cli import main

    base = ["generate", "--tiny", "--image", write_png(tmp_path / "in.png"), "--prompt", "p", "--out",
            str(tmp_path / "o.mp4"), "--quiet"]
    for extra, needle in ((["--ulysses", "2"], "--ulysses 2 needs several processes"),
                          (["--cfg-parallel", "--guidance", "3"], "--cfg-parallel needs several processes"),
                          (["--cfg-parallel"], "needs --guidance")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "o.mp4").exists()


TORCHRUN_TIMEOUT_S = 240  # two fresh processes importing torch and diffusers on a loaded two-core machine


@pytest.mark.distributed
def test_torchrun_generate_equals_one_process(tmp_path):
    """``torchrun --nproc-per-node 2`` running the command line (``generate --tiny``) writes the frames one process
    writes; only rank 0 prints the summary and writes the report, which records the degrees.

    The frames are compared before the lossy codec (both sides record what they hand to the encoder, the ranks
    through ``tests/spawn.py``, which runs ``swift_model.cli.main``), to fp32 rounding (at most 1 level): the
    ranks' attention splits the heads, which may round differently from one process on some CPUs, and H.264 can
    turn a 1-level difference into several levels after decoding. Both sides run one torch thread (this process
    by conftest.py, the ranks by ``OMP_NUM_THREADS=1``), so the comparison does not depend on the environment.
    Where the frames are equal, so are the decoded videos (the same encoder on the same input)."""
    from swift_model.cli import main
    from swift_model.io.video import read_mp4

    run = tmp_path / "run"
    run.mkdir()
    args = ["generate", "--tiny", "--image", write_png(run / "in.png"), "--prompt", "a dog", "--frames", "9",
            "--width", "128", "--height", "64", "--segment-blocks", "1", "--neighbors", "1,1", "--quiet"]
    assert torch.get_num_threads() == 1  # conftest.py, as the ranks run
    with recorded_video_frames() as videos:
        assert main(args + ["--out", str(run / "one.mp4")]) == 0
    (one_frames,) = videos
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           spawn.__file__, str(tmp_path / "two.npy")] + args
                          + ["--out", str(run / "two.mp4"), "--report", str(run / "two.json")],
                          env=env, cwd=run, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: ") == 1, proc.stdout  # the summary, from rank 0 alone
    two_frames = np.load(tmp_path / "two.npy")
    assert one_frames.shape == (9, 64, 128, 3)
    assert_frames_match(two_frames, one_frames)
    one, two = read_mp4(str(run / "one.mp4")), read_mp4(str(run / "two.mp4"))
    assert one.shape == two.shape == one_frames.shape
    if np.array_equal(one_frames, two_frames):
        assert np.array_equal(one, two), "the same frames encoded to different videos"
    report = json.loads((run / "two.json").read_text())
    degrees = ("world_size", "ulysses_degree", "cfg_degree", "data_parallel_degree", "fsdp")
    assert tuple(report[k] for k in degrees) == (2, 2, 1, 1, False)
    assert sorted(p.name for p in run.iterdir()) == ["in.png", "one.mp4", "two.json", "two.mp4"]


def test_fsdp_needs_the_fast_memory_profile():
    """--fsdp keeps each rank's shards resident in every phase: a profile that moves whole models per phase is
    refused with a message naming the flags; fast is accepted."""
    import types

    from swift_model.generation.distributed import check_pipeline
    from swift_model.generation.pipeline import SwiftI2VPipeline

    par = types.SimpleNamespace(ulysses=1, fsdp=True)
    with pytest.raises(ValueError, match="--fsdp.*--memory fast.*--memory balanced"):
        check_pipeline(SwiftI2VPipeline.tiny(seed=0, device="cpu"), par)
    check_pipeline(SwiftI2VPipeline.tiny(seed=0, device="cpu", memory="fast"), par)
