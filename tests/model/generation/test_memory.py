"""The memory plan: profiles, eviction between phases, the streamed-block offload (CPU), the CLI's early checks."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from swift_model.nets.config import WanDiTConfig
from swift_model.nets.dit import WanDiT
from swift_model.generation.memory import COMPONENTS, PHASES, USES, MemoryPlan
from swift_model.generation.residency import BlockStreamer
from swift_model.generation.pipeline import SwiftI2VPipeline

from helpers import random_image


def test_profiles_as_the_issue_defines_them():
    fast, bal, small = MemoryPlan("fast"), MemoryPlan("balanced"), MemoryPlan("24gb")
    for phase in PHASES:
        for comp in COMPONENTS:
            assert fast.placement(phase, comp) == "device"
            used = comp in USES[phase]
            assert bal.placement(phase, comp) == ("device" if used else "cpu")
            want = "cpu" if not used else ("stream" if comp in ("stage1", "stage1_2", "stage2") else "device")
            assert small.placement(phase, comp) == want
        # balanced and 24gb never hold both DiTs on the device in one phase
        for plan in (bal, small):
            assert [plan.placement(phase, d) for d in ("stage1", "stage2")].count("cpu") >= 1
    # 24gb keeps host memory small: Stage I's blocks stay in its files, the encoders are read for their phase
    for comp in COMPONENTS:
        assert small.blocks_from_files(comp) == (comp in ("stage1", "stage1_2"))
        assert small.reads_on_use(comp) == (comp in ("text_encoder", "image_encoder"))
        assert not (fast.blocks_from_files(comp) or bal.blocks_from_files(comp))
        assert not (fast.reads_on_use(comp) or bal.reads_on_use(comp))
    assert MemoryPlan.of(None).profile == "balanced" and MemoryPlan.of(small) is small
    with pytest.raises(ValueError, match="memory must be one of"):
        MemoryPlan("32gb")
    with pytest.raises(TypeError, match="memory"):
        MemoryPlan.of(3)


@pytest.fixture
def extra_profile():
    """A profile added to the registry for one test (removed afterwards)."""
    from swift_model.generation import memory

    prof = memory.MemoryProfile("48gb", "as balanced, with the DiT blocks streamed", everything_resident=False,
                                stream_dits=True, text_encoder_on_cpu=False, token_chunk=8192)
    memory.PROFILES[prof.name] = prof
    yield prof
    del memory.PROFILES[prof.name]


def test_profiles_are_data_that_the_cli_and_the_plan_read(extra_profile):
    """A profile is one record: registering one makes it a --memory choice of generate and plan, with its summary
    in the help, and MemoryPlan places the components by its fields alone."""
    from swift_model.cli.main import build_parser
    from swift_model.generation.memory import PROFILES

    plan = MemoryPlan("48gb")
    assert plan.token_chunk == 8192 and plan.settings is extra_profile
    assert plan.placement("stage2", "stage2") == "stream" and plan.placement("text_encoding", "text_encoder") == "device"
    assert plan.placement("stage1", "stage2") == "cpu" and plan.initial("vae1") == "cpu"
    parser = build_parser()
    for command in ("generate", "plan"):
        sub = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(command))
        memory = next(a for a in sub._actions if a.dest == "memory")
        assert tuple(memory.choices) == tuple(PROFILES) and "48gb" in memory.choices
        assert all(p.summary in memory.help for p in PROFILES.values())
    with pytest.raises(ValueError, match="sharded DiTs .* must be fast, got '48gb'"):
        MemoryPlan("48gb", sharded_dits=True)


def _dit(seed=0, layers=5):
    torch.manual_seed(seed)
    return WanDiT(WanDiTConfig.preset("tiny-ti2v", num_layers=layers)).eval()


def test_block_streamer_equals_resident_and_counts_blocks():
    """Streaming the blocks gives the resident model's bits, and never more than the planned number of blocks
    (counted independently: blocks whose weights are not in their host buffer when any block runs)."""
    dit = _dit()
    x = torch.randn(1, 48, 3, 4, 6)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 7, 32)
    with torch.no_grad():
        ref = dit(x, t, ctx)
        ref_cache = dit(x, t, None, context_cache=dit.precompute_context(ctx))
    for slots in (1, 2, 3):
        stream_dit = _dit()
        s = BlockStreamer(stream_dit.blocks, "cpu", slots=slots).resume()
        hosts = [h.data_ptr() for h in s._host]
        sizes = [h.numel() for h in s._host]
        seen = []

        def count(_m, _a):
            n = 0
            for blk, base, size in zip(stream_dit.blocks, hosts, sizes):
                ptrs = [p.data_ptr() for p in blk.parameters()]
                if not all(base <= q < base + size for q in ptrs):
                    n += 1
            seen.append(n)

        hooks = [b.register_forward_pre_hook(count) for b in stream_dit.blocks]
        with torch.no_grad():
            out = stream_dit(x, t, ctx)
            out_cache = stream_dit(x, t, None, context_cache=stream_dit.precompute_context(ctx))
        for h in hooks:
            h.remove()
        assert torch.equal(out, ref) and torch.equal(out_cache, ref_cache)
        assert max(seen) <= slots and s.max_resident == min(slots, 5) and max(seen) >= 1
        # 3 passes over 5 blocks (forward, context, forward): every use misses when slots < blocks
        assert s.loads == (15 if slots < 5 else 5)
        assert s.h2d_bytes == sum(s.block_bytes[i] for i in range(5)) * (3 if slots < 5 else 1)
        s.close()
        assert all(p.device.type == "cpu" for p in stream_dit.parameters())
        with torch.no_grad():  # closed: the plain model again
            assert torch.equal(stream_dit(x, t, ctx), ref)


@pytest.fixture(scope="module")
def image():
    return random_image(0, height=128, width=256)


def test_24gb_pipeline_equals_resident_pipeline(image):
    """The 24gb path (blocks streamed) gives the latents of the resident path, bit for
    bit on the CPU, with at most the planned number of blocks resident."""
    kw = dict(frames=5, width=128, height=64, progress=False)
    fast = SwiftI2VPipeline.tiny(seed=0, device="cpu", memory="fast").generate(image, "a fox", **kw)
    small_pipe = SwiftI2VPipeline.tiny(seed=0, device="cpu", memory=MemoryPlan("24gb", stream_blocks=1))
    small = small_pipe.generate(image, "a fox", **kw)
    assert torch.equal(fast.latents, small.latents)
    assert small.info["memory"] == "24gb"
    for name in ("stage1", "stage2"):
        s = small_pipe.residency.streamers[name]
        assert s.max_resident == 1 and not s.active and s.resident == 0
        assert small.info["h2d_bytes"][name] > 0
    assert small_pipe.stage1.blocks[0].attn1.to_q.weight.device.type == "cpu"


class _Spy(torch.nn.Module):
    """A stand-in component that records the phases it was on the device in."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_residency_evicts_before_the_phase(monkeypatch):
    """What a phase does not use leaves the device before the phase's own weights arrive (balanced)."""
    from swift_model.generation import residency

    res = residency.Residency(MemoryPlan("balanced"), "cpu")
    comps = {c: _Spy() for c in COMPONENTS}
    order = []
    real_move = residency.move_module

    def move(m, device, skip=None):
        name = next(k for k, v in comps.items() if v is m or (hasattr(v, "blocks") and v.blocks is m))
        order.append((name, torch.device(device).type))
        return real_move(m, device, skip)

    monkeypatch.setattr(residency, "move_module", move)
    with res.phase("stage2", comps):
        pass
    evicted = [i for i, (n, d) in enumerate(order) if n != "stage2"]
    brought = [i for i, (n, d) in enumerate(order) if n == "stage2"]
    assert max(evicted) < min(brought)
    assert {n for n, _ in order if n != "stage2"} == set(COMPONENTS) - {"stage2"}


@pytest.mark.parametrize("extra, needle", [
    (["--frames", "10"], "frames"),
    (["--width", "100"], "width"),
    (["--neighbors", "1,x"], "neighbors"),
    (["--neighbors=-1,0"], "neighbors"),
    (["--segment-blocks", "0"], "segment_blocks"),
])
def test_cli_bad_request_fails_before_any_checkpoint_is_opened(tmp_path, capsys, monkeypatch, extra, needle):
    """A bad --frames / size / --neighbors is refused before a checkpoint file is opened: the checkpoint folders
    hold files that fail to open, and every way of opening a file is watched."""
    import builtins

    import safetensors

    from swift_model.cli import main

    for d in ("s1", "s2"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_bytes(b"\xff\xfe not json")
        (tmp_path / d / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    opened = []
    real_open = builtins.open

    def watch(path, *a, **kw):
        if str(tmp_path / "s") in str(path):
            opened.append(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", watch)
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: opened.append(a) or (_ for _ in ()).throw(OSError))
    img = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(img)
    args = ["generate", "--image", str(img), "--prompt", "p", "--out", str(tmp_path / "o.mp4"),
            "--stage1", str(tmp_path / "s1"), "--stage2", str(tmp_path / "s2")] + extra
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1]
    assert opened == []


def test_swift_kind_reads_the_stage2_checkpoint_once(tmp_path, monkeypatch):
    """from_pretrained widens a public Stage II checkpoint for the "swift" kind from its headers: its weights
    are read once (one data read of the file), and the model is placed as the memory plan says."""
    from swift_model.io import files
    from swift_model.loading.checkpoint import save_dit
    from swift_model.nets.vae import WanVAE

    for name, seed in (("s1", 1), ("s2", 2)):
        save_dit(_dit(seed, layers=2), tmp_path / name)
        WanVAE.tiny(48, seed=seed).model.save_pretrained(tmp_path / name / "vae")
    reads = []
    real_init = files.TensorFiles.__init__

    def init(self, paths, **kw):
        reads.append((tuple(Path(p).parent.name for p in paths), bool(kw.get("meta"))))
        real_init(self, paths, **kw)

    monkeypatch.setattr(files.TensorFiles, "__init__", init)
    pipe = SwiftI2VPipeline.from_pretrained(tmp_path / "s1", tmp_path / "s2", stage2_kind="swift",
                                            load_text_encoder=False, device="cpu", memory="24gb")
    data_reads = [folders for folders, meta in reads if not meta]
    assert data_reads.count(("s2",)) == 1 and data_reads.count(("s1",)) == 1
    assert pipe.stage2.config.in_channels == 96 and pipe.memory.profile == "24gb"
