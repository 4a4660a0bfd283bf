"""``swift-i2v plan --world-size N`` (the estimate of rank 0 of a torchrun generation), ``plan --shared-anchor``,
and the ``--fsdp`` load into host memory.

Every figure here is an estimate on fake tensors; the tests check it against byte counts computed from the
configs and against FSDP2's own shards."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist

from swift_model.nets.spec import ModelSpec
from swift_model.planning.planner import plan_generation

SMALL = dict(frames=25, width=128, height=64)  # 7 latent frames: 3 CSG windows of up to 4 latent frames
ROUND = 512  # the CUDA allocator's rounding, as the planner counts

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _plan(spec=None, phases=("stage1", "stage2"), **kw):
    result = plan_generation(spec or ModelSpec.tiny(), phases=phases, **SMALL, **kw)
    assert not dist.is_initialized()  # the fake process group is gone
    return result


def _peaks(spec=None, phases=("stage1", "stage2"), **kw) -> dict:
    return {k: v["peak_bytes"] for k, v in _plan(spec, phases, **kw).phases.items()}


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ROUND) * ROUND


def _with_layers(spec, **layers):
    return dataclasses.replace(spec, **{k: dataclasses.replace(getattr(spec, k), num_layers=n)
                                        for k, n in layers.items()})


def test_ulysses_rank_peaks_are_below_one_process():
    """Each of 2 Ulysses ranks holds half of every DiT call's tokens: its Stage I and Stage II peaks are below
    the one-process ones (same weights, smaller activations). The Stage I DiT here takes the first frame's
    latent as its condition (as Wan2.2's TI2V): with the I2V kind, the Stage I peak of the tiny models is the
    Stage I VAE's encode of the conditioning clip (the image and zeros), which every rank runs whole, not a
    DiT call. 81 frames, so that Stage I's 672 tokens outnumber the 512 text tokens."""
    from swift_model.nets.config import WanDiTConfig

    spec = dataclasses.replace(ModelSpec.tiny(), image_encoder=None,
                               stage1=WanDiTConfig.preset("tiny-t2v", kind="ti2v", per_token_timestep=True))
    size = dict(frames=81, width=512, height=256)
    one, two = ({k: v["peak_bytes"] for k, v in plan_generation(spec, phases=("stage1", "stage2"), world_size=w,
                                                                 **size).phases.items()} for w in (1, 2))
    for phase in ("stage1", "stage2"):
        assert two[phase] < one[phase], (phase, one, two)


@pytest.mark.slow  # several plans of one rank: over 3 s on a 2-core machine
def test_replay_equals_the_full_run_per_rank():
    """The planner's replay of repeated block calls stays exact on a rank of 4 with FSDP (the gather hooks run
    around replayed calls) and Ulysses: the same FLOPs, peaks at or up to 10% above the full run's."""
    short = _plan(world_size=4, fsdp=True)
    full = _plan(world_size=4, fsdp=True, replay=False)
    assert short.info["replayed_calls"] > 0
    for name in ("stage1", "stage2"):
        s, f = short.phases[name], full.phases[name]
        assert s["flops"] == f["flops"] and f["peak_bytes"] <= s["peak_bytes"] <= 1.1 * f["peak_bytes"], name


def test_fsdp_shards_match_fully_shard():
    """The planner's model of FSDP2 keeps, per rank, the bytes ``fully_shard`` itself keeps (each parameter's
    padded dim-0 chunk; run here on a CPU mesh of a fake process group), at 3 ranks (padding) and 4."""
    from torch.distributed.tensor import DTensor

    from swift_model.nets.config import WanDiTConfig
    from swift_model.nets.dit import WanDiT
    from swift_model.nets.parallel import fsdp_shard_blocks
    from swift_model.planning.ranks import fake_process_group, fsdp_shard_bytes

    for world in (3, 4):
        model = WanDiT(WanDiTConfig.preset("tiny-ti2v"))
        model.to_dtype(torch.bfloat16)
        want = [fsdp_shard_bytes(blk, i, world) for i, blk in enumerate(model.blocks)]
        with fake_process_group(world):
            fsdp_shard_blocks(model, device="cpu")
            for i, blk in enumerate(model.blocks):
                sharded = sum(p._local_tensor.untyped_storage().nbytes() for p in blk.parameters()
                              if isinstance(p, DTensor))
                whole = sum(p.numel() * p.element_size() for p in blk.parameters() if not isinstance(p, DTensor))
                assert (sharded, whole) == want[i], (world, i)
        assert not dist.is_initialized()


def test_fsdp_rank_holds_a_quarter_of_the_block_weights():
    """At 4 ranks with --fsdp, rank 0 keeps a quarter of each DiT's sharded block weights: the text-encoding
    phase (both DiTs resident, neither running) costs the one-process ``fast`` estimate minus exactly the
    three quarters computed from the parameters (allocator rounding included); the DiT phases stay below it."""
    from swift_model.nets.dit import WanDiT
    from swift_model.nets.parallel import fsdp_ignored_params

    spec = ModelSpec.tiny()
    one = _peaks(spec, phases=("text_encoding", "stage1", "stage2"), memory="fast")
    four = _peaks(spec, phases=("text_encoding", "stage1", "stage2"), world_size=4, fsdp=True)
    with torch.device("meta"):
        s1, s2 = WanDiT(spec.stage1), WanDiT(spec.stage2)
    saved = full = quarter = 0
    dtypes = set()
    for dit in (s1, s2):
        dit.to_dtype(torch.bfloat16)
        for i, blk in enumerate(dit.blocks):
            ignored = fsdp_ignored_params(blk, i)
            for p in blk.parameters():
                if p in ignored:
                    continue
                nbytes = p.numel() * p.element_size()
                shard = -(-p.shape[0] // 4) * (p.numel() // p.shape[0]) * p.element_size()
                full += nbytes
                quarter += shard
                saved += _rounded(nbytes) - _rounded(shard)
                dtypes.add(p.dtype)
    assert quarter == full // 4  # the tiny models' rows divide by 4: no padding
    # one stand-in element per DiT and dtype marks the sharded parameters as on the device
    assert one["text_encoding"] - four["text_encoding"] == saved - ROUND * 2 * len(dtypes)
    for phase in ("stage1", "stage2"):
        assert four[phase] < one[phase], (phase, one, four)


@pytest.mark.slow  # several plans of one rank: over 3 s on a 2-core machine
def test_cfg_parallel_rank_runs_one_branch():
    """With --cfg-parallel each rank runs one guidance branch: its per-rank activations are the unguided
    one-process ones. The per-rank peak is the unguided peak plus the negative prompt's cached keys/values
    (every rank computes both caches; bytes from the configs, checked as the difference between two depths)
    plus the velocity exchange (depth-independent, a few velocity-sized buffers); its FLOPs about half the
    guided one-process FLOPs."""
    spec = ModelSpec.tiny()
    extra, flops = {}, {}
    for layers in (2, 6):
        s = _with_layers(spec, stage1=layers, stage2=layers)
        unguided = _plan(s)
        rank = _plan(s, world_size=2, cfg_parallel=True, guidance_scale=3.0)
        extra[layers] = {p: rank.phases[p]["peak_bytes"] - unguided.phases[p]["peak_bytes"] for p in rank.phases}
        flops[layers] = rank.phases["stage2"]["flops"]
    c1, c2 = spec.stage1, spec.stage2
    per_layer = {"stage1": 2 * _rounded((c1.text_len + c1.image_len) * c1.dim * 2),  # k, v of text and image
                 "stage2": 2 * _rounded(c2.text_len * c2.dim * 2)}
    for phase, bytes_per_layer in per_layer.items():
        assert extra[6][phase] - extra[2][phase] == 4 * bytes_per_layer, (phase, extra)
        rest = extra[2][phase] - 2 * bytes_per_layer  # the exchange of the two branches' velocities
        assert 0 <= rest <= 256 * 1024, (phase, rest)
    guided = _plan(_with_layers(spec, stage1=2, stage2=2), phases=("stage2",), guidance_scale=3.0)
    assert 0.45 < flops[2] / guided.phases["stage2"]["flops"] < 0.6, (flops, guided.phases)


@pytest.mark.slow  # several plans of one rank: over 3 s on a 2-core machine
def test_shared_anchor_keeps_its_keys_and_values_resident():
    """plan --shared-anchor: the Stage II estimate holds the anchor's cached keys and values (two
    ``[anchor tokens, dim]`` tensors per block) for the whole phase. The windows then skip the anchor's
    tokens (smaller, block-sparse calls), a saving that does not depend on the depth, so the cache is checked
    as the growth with the depth: 4 more blocks add exactly 4 blocks' keys and values to the difference."""
    spec = ModelSpec.tiny("refine")
    size = dict(frames=25, width=256, height=128)
    diff, after = {}, {}
    for layers in (2, 6):
        s = _with_layers(spec, stage2=layers)
        phases = ("stage2",) if layers == 2 else ("stage2", "decode")
        with_anchor, without = (plan_generation(s, phases=phases, shared_anchor=a, **size).phases
                                for a in (True, False))
        diff[layers] = with_anchor["stage2"]["peak_bytes"] - without["stage2"]["peak_bytes"]
        if "decode" in phases:
            after[layers] = with_anchor["decode"]["peak_bytes"] - without["decode"]["peak_bytes"]
    c = spec.stage2
    anchor_tokens = (size["height"] // 16 // c.patch_size[1]) * (size["width"] // 16 // c.patch_size[2])
    kv_per_block = 2 * _rounded(anchor_tokens * c.dim * 2)  # bf16
    assert diff[6] - diff[2] == 4 * kv_per_block, (diff, kv_per_block)
    # and they are gone after Stage II: the decode does not hold them (6 blocks' worth would be 6 * kv)
    assert 0 <= after[6] < kv_per_block, (after, kv_per_block)


def test_plan_leaves_no_process_group(monkeypatch):
    """The fake process group of a plan is destroyed afterwards, also when the plan fails inside it."""
    from swift_model.generation import distributed

    def broken(**kw):
        assert dist.is_initialized() and dist.get_world_size() == 2
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(distributed.Parallelism, "build", staticmethod(broken))
    with pytest.raises(RuntimeError, match="broken on purpose"):
        plan_generation(ModelSpec.tiny(), phases=("stage2",), world_size=2, **SMALL)
    assert not dist.is_initialized()


def _errors(capsys, argv):
    from swift_model.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("world,flags", [(1, ["--ulysses", "2"]), (4, ["--ulysses", "3"]),
                                         (3, ["--cfg-parallel", "--guidance", "3"]), (4, ["--cfg-parallel"]),
                                         (1, ["--fsdp"])])
def test_bad_degrees_give_generate_s_error(tmp_path, capsys, monkeypatch, world, flags):
    """plan --world-size N with a layout generate refuses under torchrun with N ranks: the same one-line error,
    before anything is built (generate's is checked before any process group is joined)."""
    size = ["--frames", "9", "--width", "128", "--height", "64"]
    planned = _errors(capsys, ["plan", "--tiny", "--world-size", str(world)] + size + flags)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", str(world))):
        monkeypatch.setenv(key, value)
    generated = _errors(capsys, ["generate", "--tiny", "--image", str(tmp_path / "none.png"), "--prompt", "p",
                                 "--out", str(tmp_path / "o.mp4"), "--device", "cpu"] + size + flags)
    assert planned == generated
    assert not dist.is_initialized()


def test_plan_checks_heads_and_fsdp_memory_as_generate(capsys):
    from swift_model.nets.dit import WanDiT
    from swift_model.generation.distributed import check_fsdp_memory, check_heads_of

    size = ["--frames", "9", "--width", "128", "--height", "64"]
    err = _errors(capsys, ["plan", "--tiny", "--world-size", "3"] + size)  # 3 Ulysses ranks, 4 heads
    with torch.device("meta"):
        s1, s2 = WanDiT(ModelSpec.tiny().stage1), WanDiT(ModelSpec.tiny().stage2)
    with pytest.raises(ValueError) as want:
        check_heads_of({"Stage I": s1, "Stage II": s2}, 3)
    assert err == f"error: {want.value}"
    err = _errors(capsys, ["plan", "--tiny", "--world-size", "2", "--fsdp", "--memory", "balanced"] + size)
    with pytest.raises(ValueError) as want:
        check_fsdp_memory(True, "balanced")
    assert err == f"error: {want.value}"


@pytest.mark.slow  # several plans of one rank: over 3 s on a 2-core machine
def test_plan_json_and_table_name_the_layout(capsys):
    from swift_model.cli import main

    size = ["--frames", "9", "--width", "128", "--height", "64"]
    assert main(["plan", "--tiny", "--json", "--world-size", "4", "--fsdp", "--guidance", "3", "--cfg-parallel"]
                + size) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world_size"] == 4 and out["parallel"] == {
        "world_size": 4, "ulysses_degree": 2, "cfg_degree": 2, "data_parallel_degree": 1, "fsdp": True,
        "ulysses": 2, "cfg_parallel": True}
    assert out["profile"] == "fast"  # --fsdp's default, as generate
    assert main(["plan", "--tiny", "--world-size", "2"] + size) == 0
    table = capsys.readouterr().out
    assert "ESTIMATE of one rank" in table and "rank 0 of 2" in table and "rank GiB" in table


def test_fsdp_loads_the_dits_into_host_memory(tmp_path, monkeypatch):
    """generate --fsdp (memory_plan(None, fsdp=True)): the loader is asked for host memory for both DiTs, and
    the pipeline leaves them there for distribute() to shard onto the device; without --fsdp, ``fast`` loads
    them onto the device. The device here is ``meta`` (no GPU needed to tell the two apart); the weights
    themselves are read on the CPU."""
    from swift_model.loading import checkpoint
    from swift_model.loading.checkpoint import save_dit
    from swift_model.nets.config import WanDiTConfig
    from swift_model.generation.distributed import memory_plan
    from swift_model.nets.dit import WanDiT
    from swift_model.generation.pipeline import SwiftI2VPipeline
    from swift_model.nets.vae import WanVAE

    for name, seed in (("s1", 1), ("s2", 2)):
        torch.manual_seed(seed)
        save_dit(WanDiT(WanDiTConfig.preset("tiny-ti2v", num_layers=2)), tmp_path / name)
        WanVAE.tiny(48, seed=seed).model.save_pretrained(tmp_path / name / "vae")
    asked = []
    real = checkpoint.load_dit

    def load_dit(*args, device=None, **kw):
        asked.append(torch.device(device).type)
        return real(*args, device="cpu", **kw).to(device)

    monkeypatch.setattr(checkpoint, "load_dit", load_dit)
    for fsdp, where in ((False, "meta"), (True, "cpu")):
        asked.clear()
        pipe = SwiftI2VPipeline.from_pretrained(tmp_path / "s1", tmp_path / "s2", load_text_encoder=False,
                                                device="meta", memory=memory_plan(None if fsdp else "fast", fsdp))
        assert asked == [where, where] and pipe.memory.profile == "fast"
        for dit in (pipe.stage1, pipe.stage2):
            assert {p.device.type for p in dit.parameters()} == {where}
        assert {p.device.type for p in pipe.vae2.model.parameters()} == {"meta"}  # the rest as fast places it
