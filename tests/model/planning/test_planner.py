"""The memory and FLOP estimate (``swift-i2v plan``): the shortcuts against full runs, the tiny estimate against a
real CPU run counted by the same tracker, the budgets and bounds of the issue at 2560x1408 (presets), the JSON."""

import json

import numpy as np
import pytest
import torch

from swift_model.generation.memory import PHASES
from swift_model.nets.spec import ModelSpec
from swift_model.planning.planner import plan_generation
from swift_model.planning.tracker import LiveStorageTracker

from helpers import preset_plans

GiB = 2**30
SMALL = dict(frames=25, width=128, height=64)  # 7 latent frames: 3 CSG windows, a streamed decode


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.mark.slow  # every block and VAE call executed: about 4 s on a 2-core machine
@pytest.mark.parametrize("memory", ["balanced", "24gb"])
def test_replay_equals_the_full_run(memory):
    """Replaying repeated block/VAE calls gives the FLOPs and host-to-device bytes of executing everything
    exactly, and its peaks or up to 10% more (a replayed VAE call is charged the transient peak of its first
    call above what was alive then)."""
    short = plan_generation(ModelSpec.tiny(), memory=memory, **SMALL)
    full = plan_generation(ModelSpec.tiny(), memory=memory, replay=False, **SMALL)
    assert short.info["replayed_calls"] > 0
    assert short.flops == full.flops
    for name in PHASES:
        s, f = short.phases[name], full.phases[name]
        assert s["flops"] == f["flops"] and s["h2d_bytes"] == f["h2d_bytes"], name
        assert f["peak_bytes"] <= s["peak_bytes"] <= 1.1 * f["peak_bytes"], (name, s, f)


def test_a_phase_alone_estimates_as_in_the_whole_run():
    """A phase planned alone (the others' results as stand-ins) has the whole run's FLOPs and transfers, and its
    peak up to what earlier phases leave on the device in small caches (the DiTs' RoPE tables, attention plans)."""
    whole = plan_generation(ModelSpec.tiny(), memory="balanced", **SMALL)
    for name in ("stage2", "decode"):
        alone = plan_generation(ModelSpec.tiny(), memory="balanced", phases=(name,), **SMALL)
        a, w = alone.phases[name], whole.phases[name]
        assert list(alone.phases) == [name] and a["flops"] == w["flops"] and a["h2d_bytes"] == w["h2d_bytes"]
        assert abs(w["peak_bytes"] - a["peak_bytes"]) <= 512 * 1024, (a, w)


@pytest.mark.parametrize("token_chunk", [None, 20])
def test_plan_and_run_are_the_same_phases(tmp_path, token_chunk, monkeypatch):
    """The plan cannot drift from the run: the tiny models planned on the CPU (fake tensors) and generated for real
    on the CPU, both counted by the same live-storage tracker and FLOP counter, run the same phase methods in the
    same order with the same FLOPs and host-to-device bytes per phase, and every phase's peak within 5% (the run
    writes an mp4). With a small ``token_chunk`` both DiTs run their chunked inference path."""
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    from swift_model.generation.memory import MemoryPlan
    from swift_model.generation.pipeline import SwiftI2VPipeline
    from swift_model.nets.dit import WanBlock

    chunked, called = [], []
    real_chunked = WanBlock._forward_chunked
    monkeypatch.setattr(WanBlock, "_forward_chunked",
                        lambda self, *a, **k: chunked.append(self.num_heads) or real_chunked(self, *a, **k))
    real_run_phase = SwiftI2VPipeline.run_phase
    monkeypatch.setattr(SwiftI2VPipeline, "run_phase",
                        lambda self, name, *a: called.append(name) or real_run_phase(self, name, *a))

    plan = MemoryPlan("fast", token_chunk=token_chunk)
    est = plan_generation(ModelSpec.tiny(), memory=plan, device="cpu", **SMALL)
    planned, called[:] = list(called), []
    pipe = SwiftI2VPipeline.tiny(seed=0, device="cpu", memory=plan)
    assert pipe.stage1.inference_chunk_tokens == pipe.stage2.inference_chunk_tokens == plan.token_chunk
    tracker, flops = LiveStorageTracker("cpu"), FlopCounterMode(display=False)
    measured = {}
    real_phase = pipe.residency.phase

    def phase(name, components):
        import contextlib

        @contextlib.contextmanager
        def run():
            f0 = flops.get_total_flops()
            with tracker.section() as sec, real_phase(name, components):
                yield name
            measured[name] = dict(peak_bytes=sec["peak"], flops=flops.get_total_flops() - f0,
                                  h2d_bytes=pipe.residency.h2d_bytes.get(name, 0))
        return run()

    pipe.residency.phase = phase
    tracker.track(*[t for m in pipe.components().values() if m is not None for t in (*m.parameters(), *m.buffers())])
    image = Image.fromarray((np.random.default_rng(0).random((64, 128, 3)) * 255).astype(np.uint8))
    with tracker, flops:
        pipe.generate(image, "a fox", progress=False, output=str(tmp_path / "o.mp4"), **SMALL)
    assert planned == called == list(PHASES)
    for name in PHASES:
        e, m = est.phases[name], measured[name]
        assert e["flops"] == m["flops"] > 0 and e["h2d_bytes"] == m["h2d_bytes"], (name, e, m)
        assert abs(m["peak_bytes"] - e["peak_bytes"]) <= 0.05 * m["peak_bytes"], (name, measured, est.phases)
    assert bool(chunked) == (token_chunk is not None)


def test_the_planner_patches_nothing_and_reaches_into_nothing_private():
    """Planning replaces no torch function and no method of the pipeline's modules (its seams are its own modes
    and the forward of its own model instances), and its code reads no private attribute of another object."""
    import ast
    import pathlib

    import torch.nn.functional as F

    import swift_model.planning as planning
    from swift_model.nets.dit import WanDiT

    before = (torch.unique, F.scaled_dot_product_attention, WanDiT.forward, WanDiT.precompute_anchor)
    seen = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append((torch.unique, F.scaled_dot_product_attention) == before[:2])
            return func(*args, **(kwargs or {}))

    with Watch():
        plan_generation(ModelSpec.tiny(), memory="balanced", frames=9, width=64, height=64)
    assert seen and all(seen)  # the torch functions were never replaced while the plan ran
    assert (torch.unique, F.scaled_dot_product_attention, WanDiT.forward, WanDiT.precompute_anchor) == before
    for path in pathlib.Path(planning.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                # self's own state, or torch's modules and ops (FakeTensorMode lives in torch._subclasses)
                assert isinstance(base, ast.Name) and base.id in ("self", "torch"), (path.name, node.lineno, node.attr)
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert not any(a.name.startswith("_") for a in node.names), (path.name, node.lineno)


def test_plan_json_schema(capsys):
    from swift_model.cli import main

    assert main(["plan", "--tiny", "--json", "--frames", "9", "--width", "128", "--height", "64",
                 "--memory", "24gb"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"profile", "phases", "peak_bytes", "flops", "world_size", "parallel", "host_peak_bytes",
                        "host_load_bytes"}
    assert out["profile"] == "24gb" and out["world_size"] == 1
    assert out["parallel"] == {"ulysses": 1, "cfg_parallel": False, "fsdp": False, "world_size": 1,
                               "ulysses_degree": 1, "cfg_degree": 1, "data_parallel_degree": 1}
    assert list(out["phases"]) == list(PHASES)
    for p in out["phases"].values():
        assert set(p) == {"peak_bytes", "flops", "h2d_bytes", "host_peak_bytes", "mapped_bytes"}
        assert all(type(v) is int and v >= 0 for v in p.values())
    assert out["peak_bytes"] == max(p["peak_bytes"] for p in out["phases"].values()) > 0
    assert out["flops"] == sum(p["flops"] for p in out["phases"].values()) > 0
    assert out["host_peak_bytes"] == max(out["host_load_bytes"], *(p["host_peak_bytes"] for p in out["phases"].values()))
    assert out["host_peak_bytes"] > 0
    assert main(["plan", "--tiny", "--frames", "10"]) == 2
    assert "frames" in capsys.readouterr().err


# -- the targets at 2560x1408, Wan2.1-I2V-14B + Wan2.2-TI2V-5B presets (estimates) --------------------

# Every real-size plan the tests below read, keyed (memory, settings): computed once, two at a time, the
# longest clips first (so that the two workers finish together).
PLANS_2K = [(memory, (("frames", frames),)) for frames in (241, 161, 81) for memory in ("balanced", "24gb")]
PLANS_2K += [("balanced", (("phases", ("decode",)), ("width", width))) for width in (3840, 2560)]
PLANS_2K += [("fast", (("frames", 81),))]


@pytest.fixture(scope="module")
def plans2k():
    plans = preset_plans(PLANS_2K)

    def get(memory, **settings):
        return plans[memory, tuple(sorted(settings.items()))]

    return get


@pytest.mark.slow  # a plan of the real-size models at 2560x1408
def test_balanced_fits_60_gib_and_never_holds_both_dits(plans2k):
    plan = plans2k("balanced", frames=81)
    assert plan.peak_bytes <= 60 * GiB, {k: v["peak_bytes"] / GiB for k, v in plan.phases.items()}
    # the plan's own residency: no phase keeps both DiTs on the device
    for phase, resident in plan.info["resident"].items():
        assert not {"stage1", "stage2"} <= set(resident), phase


@pytest.mark.slow  # a plan of the real-size models at 2560x1408
def test_24gb_fits_22_gib_and_a_32_gb_machine(plans2k):
    """Issue 19's goal (estimates): a 24 GB card in a 32 GB machine, at 2560x1408x81 with the 14B + 5B: device
    <= 22 GiB and host <= 24 GiB (the Stage I blocks read from their files each use, mapped: not resident)."""
    plan = plans2k("24gb", frames=81)
    assert plan.peak_bytes <= 22 * GiB, {k: v["peak_bytes"] / GiB for k, v in plan.phases.items()}
    assert plan.host_peak_bytes <= 24 * GiB, {k: v["host_peak_bytes"] / GiB for k, v in plan.phases.items()}
    # the Stage I DiT (26.6 GiB in bf16) is never in host memory: its passes read it through the files' maps
    stage1 = plan.phases["stage1"]
    assert stage1["mapped_bytes"] >= 4 * 16.1e9 * 2 and stage1["host_peak_bytes"] < 16 * GiB


@pytest.mark.slow  # six plans of the real-size models at 2560x1408
@pytest.mark.parametrize("memory", ["balanced", "24gb"])
def test_whole_run_peak_is_bounded_by_the_window_not_the_clip(plans2k, memory):
    """CSG's promise: the whole run's device peak is the same at 81, 161 and 241 frames (within 10%); Stage II and
    the decode grow by the clip's latents only (window- and tile-bound working sets). Stage I holds the whole 360P clip (18480 to 53680
    tokens): its blocks run their per-token work in chunks (the profile's ``token_chunk``), so it grows by a
    few stream-sized tensors, not by the FFN's width, and stays below the budget the weights set."""
    plans = {frames: plans2k(memory, frames=frames) for frames in (81, 161, 241)}
    peaks = {f: p.peak_bytes / GiB for f, p in plans.items()}
    assert max(peaks.values()) < 1.1 * min(peaks.values()), peaks
    # Stage II and the decode: what grows is the clip's latent state alone (the latents, z_ref and the sampler's
    # state of every latent frame: 2.7 MB per latent frame and tensor in fp32 at 2560x1408), a few such tensors,
    # while a window's and a tile's working sets stay the same
    latent_frame = 48 * (1408 // 16) * (2560 // 16) * 4
    frames = {f: p.info["latent_frames"] for f, p in plans.items()}
    for phase in ("stage2", "decode"):
        per = {f: p.phases[phase]["peak_bytes"] for f, p in plans.items()}
        for f in (161, 241):
            grown = per[f] - per[81]
            assert 0 <= grown <= 4 * latent_frame * (frames[f] - frames[81]), (phase, f, grown / GiB)


@pytest.mark.slow  # two plans of the real-size decode
def test_decode_tiles_fill_the_budget_at_any_width(plans2k):
    """The decode's tiles are as large as the balanced profile's 60 GiB goal and 32-bit indexing allow, so its
    peak stays under the goal at any width and its redundant work is small: at 2560x1408x81 two tiles, 5% over
    the frame's own 5.40 PFLOP (counted on fake tensors)."""
    a = plans2k("balanced", phases=("decode",), width=2560)
    b = plans2k("balanced", phases=("decode",), width=3840)
    pa, pb = a.phases["decode"]["peak_bytes"], b.phases["decode"]["peak_bytes"]
    assert pa <= 60 * GiB and pb <= 60 * GiB, (pa / GiB, pb / GiB)
    assert a.phases["decode"]["flops"] <= 1.06 * 5.403e15, a.phases["decode"]["flops"]


@pytest.mark.slow  # the plans of the real-size models at 2560x1408 (shared with the tests above)
def test_vae_passes_do_no_redundant_work(plans2k):
    """Issue 21's targets (estimates): at 2560x1408x81 the whole run plans <= 18.5 PFLOP under fast and
    balanced (the method's own work is 17.13) and <= 23.1 under 24gb, with the memory goals kept (fast within
    its 72 GiB goal, an 80 GB card; balanced <= 60 GiB; 24gb <= 22 GiB) and the decode's peak bounded in the
    clip's length (81 and 241 frames within 10%)."""
    for memory, pflop, gib in (("fast", 18.5, 72), ("balanced", 18.5, 60), ("24gb", 23.1, 22)):
        plan = plans2k(memory, frames=81)
        assert plan.flops <= pflop * 1e15, (memory, plan.flops / 1e15)
        assert plan.peak_bytes <= gib * GiB, (memory, plan.peak_bytes / GiB)
    for memory in ("balanced", "24gb"):
        short, long = (plans2k(memory, frames=f).phases["decode"]["peak_bytes"] for f in (81, 241))
        assert short <= long < 1.1 * short, (memory, short / GiB, long / GiB)


@pytest.mark.gpu
def test_gpu_peak_within_15_percent_of_the_estimate():
    """1280x704x33 with random weights (the presets' architectures), balanced: the measured
    ``torch.cuda.max_memory_allocated`` of each phase's run against the estimate."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from swift_model.planning.planner import measure_on_device

    est = plan_generation(ModelSpec.preset(), memory="balanced", frames=33, width=1280, height=704)
    measured = measure_on_device(ModelSpec.preset(), memory="balanced", frames=33, width=1280, height=704)
    assert abs(measured - est.peak_bytes) <= 0.15 * est.peak_bytes, (measured / GiB, est.peak_bytes / GiB)
