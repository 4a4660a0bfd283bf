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
from swift_model.nets import dit as dit_module
from swift_model.nets import parallel
from swift_model.nets.parallel import check_heads, shard_sizes, token_range
from _parallel_pipeline import pipeline_cases
from _spawn import launch
from _spawn import problems as spawn_problems
from helpers import random_init as _random_init

ROOT = Path(__file__).resolve().parents[3]
WORLD_SIZES = (2, 4)
COLLECTIVE_TIMEOUT_S = 30  # a rank waiting longer for its peers raises (init_process_group timeout)
LAUNCH_DEADLINE_S = 150  # the whole spawn of one world size; then the children are killed
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


def _mismatch(got: torch.Tensor, want: torch.Tensor, rtol: float) -> str | None:
    """Why ``got`` is not ``want`` to ``rtol`` of ``want``'s largest magnitude (``rtol=0``: bitwise), or None."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} vs {tuple(want.shape)} {want.dtype}"
    if not torch.isfinite(want).all():
        return "the reference is not finite"
    if rtol == 0:
        return None if torch.equal(got, want) else f"not bitwise equal (max error {(got - want).abs().max().item():.3e})"
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    return None if err <= rtol * scale else f"max error {err:.3e} > {rtol} x scale {scale:.3e}"


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
    F_ = T_CLIP if layout is None else layout.num_seq_blocks
    g = torch.Generator().manual_seed(seed + 1)
    B = 2
    x = torch.randn(B, cfg.in_channels, F_, HL, width, generator=g)
    if cfg.per_token_timestep:  # per token: clean conditioning blocks at t = 0, the noisy ones at the step's t
        t = torch.zeros(B, F_)
        noisy = layout.noisy_blocks if layout is not None else torch.arange(1, F_)
        t[:, noisy] = torch.rand(B, 1, generator=g) * 1000
        t = t[:, :, None].expand(B, F_, P).reshape(B, -1)
    else:
        t = torch.rand(B, generator=g) * 1000
    ctx = torch.randn(B, 9, cfg.text_dim, generator=g)
    clip = torch.randn(B, cfg.image_len, cfg.image_dim, generator=g) if cfg.image_dim else None
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
# the launcher (tests/_spawn.py)
# -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """world size -> the verdicts of every rank (the ranks are spawned once per world size, on first use)."""
    runs = {}

    def get(world_size: int) -> dict:
        if world_size not in runs:
            runs[world_size] = launch(__name__, world_size, str(tmp_path_factory.mktemp(f"world{world_size}")),
                                      deadline_s=LAUNCH_DEADLINE_S, timeout_s=COLLECTIVE_TIMEOUT_S)
        return runs[world_size]

    return get


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_distributed(spawned, world_size, case):
    problems = spawn_problems(spawned(world_size), case)
    assert not problems, "\n".join(problems)


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


def _png(path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_parallel_flags_in_one_process(tmp_path, capsys):
    from swift_model.cli import main

    base = ["generate", "--tiny", "--image", _png(tmp_path / "in.png"), "--prompt", "p", "--out",
            str(tmp_path / "o.mp4"), "--quiet"]
    for extra, needle in ((["--ulysses", "2"], "--ulysses 2 needs several processes"),
                          (["--cfg-parallel", "--guidance", "3"], "--cfg-parallel needs several processes"),
                          (["--cfg-parallel"], "needs --guidance")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "o.mp4").exists()


TORCHRUN_TIMEOUT_S = 240  # two fresh processes importing torch and diffusers on a loaded two-core machine


def test_torchrun_generate_equals_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m swift_model.cli generate --tiny`` writes the frames one process writes;
    only rank 0 prints the summary and writes the report, which records the degrees."""
    from swift_model.cli import main
    from swift_model.io.video import read_mp4

    args = ["generate", "--tiny", "--image", _png(tmp_path / "in.png"), "--prompt", "a dog", "--frames", "9",
            "--width", "128", "--height", "64", "--segment-blocks", "1", "--neighbors", "1,1", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "one.mp4")]) == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "swift_model.cli"] + args + ["--out", str(tmp_path / "two.mp4"),
                                                               "--report", str(tmp_path / "two.json")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: ") == 1, proc.stdout  # the summary, from rank 0 alone
    one, two = read_mp4(str(tmp_path / "one.mp4")), read_mp4(str(tmp_path / "two.mp4"))
    assert one.shape == two.shape == (9, 64, 128, 3)
    diff = np.abs(one.astype(np.int16) - two.astype(np.int16))
    # the same frames (the sequential windows are dense: bitwise here); at most an fp32 rounding's worth
    assert diff.max() <= 1 and diff.mean() < 1e-3, f"frames differ by up to {diff.max()}"
    report = json.loads((tmp_path / "two.json").read_text())
    assert (report["world_size"], report["ulysses"], report["cfg_parallel"], report["fsdp"]) == (2, 2, False, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "one.mp4", "two.json", "two.mp4"]


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
