"""Regional compilation of the DiT (``compile_blocks``, ``SwiftI2VPipeline(..., compile=...)``, ``--compile``).

What is checked:

- one compiled block serves every block: a forward of N blocks compiles two graphs (the first block has no pending
  residual of a previous block, the others have one), whatever N;
- our custom ops are traced as ops (nodes ``swift_kernels::...`` of the graph), with no graph break (Dynamo's
  graph-break counter stays empty, and ``fullgraph=True`` would raise on one);
- the compiled DiT equals the eager one: bitwise with ``aot_eager`` (the traced graph run by the same kernels), to
  fp32 rounding with inductor (generated C++ kernels that reorder the elementwise arithmetic);
- the whole pipeline compiled equals it eager (frames before the codec), under ``balanced``, ``fast`` and ``24gb``
  (whose block streamer runs in the blocks' eager hooks), in one process and on 2 Ulysses ranks (gloo);
- the report carries this run's compile seconds and graphs; bad options fail with the argument's name.

Compiling with inductor on a 2-core machine takes 10-30 s per pair of graphs: those tests are ``slow``; the fast
ones use ``aot_eager``, which traces exactly as inductor does (Dynamo, then AOT autograd) and skips code generation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import spawn
from helpers import assert_frames_match, random_dit, random_image
from swift_kernels import CSGLayout, plan_attention
from swift_model.nets.dit import FrameTimesteps
from swift_model.nets.dit.compiled import (check_compile_options, compile_blocks, is_compiled,
                                           uncompile_blocks)

ROOT = Path(__file__).resolve().parents[3]
# a tiny clip: Stage I 3 latent frames of 2 tokens, Stage II windows of 2-3 latent frames of 8 tokens
SIZE = dict(frames=9, width=128, height=64, segment_blocks=1, neighbors=(1, 1), progress=False)
# inductor's C++ kernels reassociate the fp32 elementwise chains: fp32 rounding, relative to the largest magnitude
INDUCTOR_RTOL = 2e-5


def _dynamo_counters():
    from torch._dynamo.utils import counters

    return counters


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts from an empty Dynamo cache and counters (the graph counts below are per test)."""
    import torch._dynamo

    torch._dynamo.reset()
    _dynamo_counters().clear()
    yield
    torch._dynamo.reset()
    _dynamo_counters().clear()


def _window_call(model, seed: int, *, backend_attention: str | None = None, mode: str = "window"):
    """``(kwargs, latents, timestep)`` of one call of ``model`` on a CSG layout of 5 latent frames of 4 tokens with
    host-known timesteps and positions (the Stage II path), on fresh random inputs."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    layout = CSGLayout(5, 4, 1, neighbors=(1, 1), mode=mode, segment=1) if mode == "window" else \
        CSGLayout(5, 4, 2, neighbors=(1, 0), mode=mode)
    F_ = layout.num_seq_blocks
    x = torch.randn(2, cfg.in_channels, F_, 4, 4, generator=g)
    t = float(torch.rand((), generator=g)) * 1000
    noisy = set(int(b) for b in torch.as_tensor(layout.noisy_blocks).flatten())
    ft = FrameTimesteps(tuple(t if b in noisy else 0.0 for b in range(F_)))
    ctx = torch.randn(2, 9, cfg.text_dim, generator=g)
    kw = dict(attention_plan=plan_attention(layout, device="cpu"), frame_positions=tuple(range(F_)),
              context=ctx, attention_backend=backend_attention)
    return kw, x, ft


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


# -------------------------------------------------------------------------------------------------------------
# the compiled DiT forward
# -------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_one_compiled_block_serves_every_block_and_equals_eager():
    """aot_eager: a 4-block DiT compiles 2 graphs (the first block, then one for the 3 others), no graph break,
    and the output is bitwise the eager one; a second call with fresh inputs compiles nothing."""
    model = random_dit("tiny-ti2v", seed=3, num_layers=4)
    kw, x, ft = _window_call(model, seed=11)
    want = model(x, ft, **kw)
    stats = compile_blocks(model, backend="aot_eager")
    assert is_compiled(model) and model.compile_stats is stats
    got = model(x, ft, **kw)
    assert torch.equal(got, want), _relative(got, want)
    assert stats.graphs == 2 and stats.seconds > 0, stats
    counters = _dynamo_counters()
    assert dict(counters["graph_break"]) == {}
    kw2, x2, ft2 = _window_call(model, seed=12)
    got2 = model(x2, ft2, **kw2)
    assert stats.graphs == 2, "a call of the same shapes recompiled"
    uncompile_blocks(model)
    assert not is_compiled(model)
    assert torch.equal(got2, model(x2, ft2, **kw2))


@torch.no_grad()
def test_custom_ops_are_traced_as_ops():
    """The graph of a compiled block holds our custom ops as single nodes (the fused DiT ops and, on a block-sparse
    layout with our attention op, ``fba_forward``), and nothing of their insides."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = random_dit("tiny-ti2v", seed=4, num_layers=3)
    kw, x, ft = _window_call(model, seed=13, backend_attention="torch", mode="clip")
    want = model(x, ft, **kw)
    compile_blocks(model, backend=capture)
    got = model(x, ft, **kw)
    assert torch.equal(got, want)
    assert len(graphs) == 2  # the first block, then one graph for the two others
    ours = []
    for gm in graphs:
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        ours.append([t for t in targets if "swift_kernels" in t])
        # one attention call and one q/k norm + RoPE per block, each a single node
        assert targets.count("swift_kernels.fba_forward.default") == 1, targets
        assert targets.count("swift_kernels.qk_norm_rope.default") == 1, targets
        # the residual + LayerNorm passes (after the self-attention, after the cross-attention)
        assert targets.count("swift_kernels.gated_residual_adaln.default") >= 2, targets
    # the first block starts with its own AdaLN; the others finish the previous block's residual in that pass
    assert "swift_kernels.adaln_modulate.default" in ours[0]
    assert "swift_kernels.adaln_modulate.default" not in ours[1]
    assert ours[1].count("swift_kernels.gated_residual_adaln.default") == ours[0].count(
        "swift_kernels.gated_residual_adaln.default") + 1
    assert dict(_dynamo_counters()["graph_break"]) == {}


def test_a_graph_break_is_seen():
    """The checks above would see a break: a function that breaks its graph raises under fullgraph and is counted
    by Dynamo's graph-break counter otherwise (what the tests read)."""
    import torch._dynamo

    def broken(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1

    x = torch.randn(3)
    torch.compile(broken, backend="eager")(x)
    assert sum(_dynamo_counters()["graph_break"].values()) >= 1
    with pytest.raises(Exception, match="graph_break|graph break"):
        torch.compile(broken, backend="eager", fullgraph=True)(torch.randn(4, 2))


def test_bad_options_name_the_argument():
    from swift_model.generation.compiling import compile_backend
    from swift_model.generation.pipeline import SwiftI2VPipeline

    with pytest.raises(ValueError, match="compile backend"):
        check_compile_options("cudagraphs-please", None)
    with pytest.raises(TypeError, match="compile backend"):
        check_compile_options(3, None)
    with pytest.raises(ValueError, match="needs the inductor backend"):
        check_compile_options("aot_eager", "max-autotune")
    with pytest.raises(TypeError, match="dit must hold"):
        compile_blocks(torch.nn.Linear(2, 2))
    assert compile_backend(False) is None and compile_backend(None) is None
    assert compile_backend(True) == "inductor" and compile_backend("aot_eager") == "aot_eager"
    with pytest.raises(ValueError, match="compile must be"):
        compile_backend("fastest")
    with pytest.raises(TypeError, match="compile must be"):
        compile_backend(1)
    with pytest.raises(ValueError, match="compile must be"):
        SwiftI2VPipeline.tiny(compile="fastest", device="cpu")


def test_cli_takes_compile_on_generate_and_demo():
    from swift_model.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo", "--compile"]).compile is True
    assert parser.parse_args(["demo"]).compile is False
    assert parser.parse_args(["generate", "--image", "a.png", "--out", "o.mp4", "--compile"]).compile is True


def test_inductor_without_a_cpp_compiler_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    """CPU inductor writes C++: with no compiler on PATH, the pipeline refuses when built (ValueError naming
    compile) and ``demo --compile`` prints one error line, no traceback; the GPU path and aot_eager are not
    refused."""
    from swift_model.cli.main import main
    from swift_model.generation.compiling import check_compiler

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler, whatever the machine has
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ValueError, match="compile: inductor on the CPU needs a C\\+\\+ compiler"):
        check_compiler("inductor", "cpu")
    check_compiler("inductor", "cuda")
    check_compiler("aot_eager", "cpu")
    status = main(["demo", "--compile", "--quiet", "--out", str(tmp_path / "d.mp4"), "--frames", "5",
                   "--width", "128", "--height", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("error: compile: inductor on the CPU needs a C++ compiler"), err
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "d.mp4").exists()


# -------------------------------------------------------------------------------------------------------------
# the pipeline
# -------------------------------------------------------------------------------------------------------------


def _generate(pipe, **kw):
    return pipe.generate(random_image(5), "a cat", seed=2, **SIZE, **kw)


def test_compiled_pipeline_equals_eager():
    """``balanced``, Dynamo's ``eager`` backend (the fast suite's cheapest compile: the same capture, no AOT pass;
    the slow tests run aot_eager and inductor): the compiled pipeline makes the eager video (latents bitwise, the
    same frames); the report carries this run's compilation (Stage I and Stage II, two graphs each), and a second
    run none."""
    from swift_model.generation.pipeline import SwiftI2VPipeline

    eager = _generate(SwiftI2VPipeline.tiny(seed=0, device="cpu"))
    assert eager.info["compile"] is None
    pipe = SwiftI2VPipeline.tiny(seed=0, device="cpu", compile="eager")
    got = _generate(pipe)
    assert torch.equal(got.latents, eager.latents)
    assert_frames_match(got.frames, eager.frames)
    report = got.report()["compile"]
    assert report == dict(backend="eager", seconds=report["seconds"], graphs=4) and report["seconds"] > 0
    again = _generate(pipe)
    assert again.info["compile"] == dict(backend="eager", seconds=0, graphs=0)
    assert torch.equal(again.latents, eager.latents)
    assert dict(_dynamo_counters()["graph_break"]) == {}


@pytest.mark.slow
def test_compiled_pipeline_under_every_profile():
    """aot_eager, in one process: ``fast``, ``balanced`` and ``24gb`` (whose block streamer re-points the blocks'
    weights in their eager pre-hooks) compiled each make the eager video bitwise. Each profile compiles its own 4
    graphs (the profiles set different token chunks, a constant of the block's code); a second ``balanced``
    pipeline, other DiT objects with the same shapes, reuses the first one's graphs. 50 s here, with the machine
    shared by other jobs."""
    from swift_model.generation.pipeline import SwiftI2VPipeline

    eager = _generate(SwiftI2VPipeline.tiny(seed=0, device="cpu"))
    graphs = []
    for memory in ("fast", "balanced", "24gb", "balanced"):
        pipe = SwiftI2VPipeline.tiny(seed=0, device="cpu", memory=memory, compile="aot_eager")
        got = _generate(pipe)
        assert torch.equal(got.latents, eager.latents), memory
        assert_frames_match(got.frames, eager.frames, f"{memory} frames")
        graphs.append(got.info["compile"]["graphs"])
        if memory == "24gb":
            assert pipe.residency.streamers["stage2"].loads > 0  # the blocks really streamed
    assert graphs == [4, 4, 4, 0], graphs
    assert dict(_dynamo_counters()["graph_break"]) == {}


@pytest.mark.slow
@torch.no_grad()
def test_inductor_dit_equals_eager():
    """CPU inductor: the compiled DiT forward equals eager to fp32 rounding, 2 graphs for 4 blocks, no break.
    (24 s here, compiling 2 graphs, with the machine shared by other jobs.)"""
    model = random_dit("tiny-ti2v", seed=5, num_layers=4)
    kw, x, ft = _window_call(model, seed=14)
    want = model(x, ft, **kw)
    stats = compile_blocks(model)
    got = model(x, ft, **kw)
    assert _relative(got, want) <= INDUCTOR_RTOL
    assert stats.graphs == 2 and stats.backend == "inductor"
    assert dict(_dynamo_counters()["graph_break"]) == {}


def _demo(tmp_path: Path, name: str, *extra: str) -> tuple[np.ndarray, dict, str]:
    """``swift-i2v demo`` in a subprocess with ``TORCH_LOGS=graph_breaks``: (the frames handed to the encoder, the
    report, stderr)."""
    frames, report = tmp_path / f"{name}.npy", tmp_path / f"{name}.json"
    env = dict(os.environ, TORCH_LOGS="graph_breaks", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tests" / "spawn.py"), str(frames), "demo", "--quiet", "--frames", "9",
           "--width", "128", "--height", "64", "--out", str(tmp_path / f"{name}.mp4"), "--report", str(report),
           *extra]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(frames), json.loads(report.read_text()), proc.stderr


@pytest.mark.slow
def test_demo_compile_prints_no_graph_break(tmp_path):
    """``TORCH_LOGS=graph_breaks swift-i2v demo --compile`` (CPU inductor) logs no graph break and makes the eager
    demo's frames (before the codec: fp32 rounding moves at most one level of a few values). 65 s here (two demos
    in subprocesses, the compiled one compiling 4 graphs), with the machine shared by other jobs."""
    eager, eager_report, _ = _demo(tmp_path, "eager")
    got, report, stderr = _demo(tmp_path, "compiled", "--compile")
    assert "graph break" not in stderr.lower(), stderr[-3000:]
    assert eager_report["compile"] is None
    assert report["compile"]["backend"] == "inductor" and report["compile"]["graphs"] >= 4
    assert report["compile"]["seconds"] > 0
    assert_frames_match(torch.from_numpy(got), torch.from_numpy(eager), "demo --compile frames")


# -------------------------------------------------------------------------------------------------------------
# 2 ranks (Ulysses on gloo): the cases every rank runs (tests/spawn.py)
# -------------------------------------------------------------------------------------------------------------
# Sequence parallel against one process: fp32 rounding (a rank's attention runs H/W heads; see test_parallel.py).
SP_RTOL = 1e-5


def _case_dit_ulysses(backend: str):
    @torch.no_grad()
    def case(group):
        import torch._dynamo

        torch._dynamo.reset()
        model = random_dit("tiny-ti2v", seed=6, num_layers=3)
        kw, x, ft = _window_call(model, seed=15)
        want = model(x, ft, **kw)  # one process, eager
        stats = compile_blocks(model, backend=backend)
        got = model(x, ft, sp_group=group, **kw)
        err = _relative(got, want)
        assert err <= SP_RTOL + (INDUCTOR_RTOL if backend == "inductor" else 0), err
        assert stats.graphs == 2, stats
        assert dict(_dynamo_counters()["graph_break"]) == {}
    return case


def _case_pipeline_ulysses(group):
    """The tiny pipeline compiled (aot_eager) over 2 Ulysses ranks against one eager process."""
    import torch._dynamo
    import torch.distributed as dist

    from swift_model.generation.distributed import Parallelism, distribute
    from swift_model.generation.pipeline import SwiftI2VPipeline

    torch._dynamo.reset()
    want = _generate(SwiftI2VPipeline.tiny(seed=0, device="cpu"))
    pipe = SwiftI2VPipeline.tiny(seed=0, device="cpu", compile="aot_eager")
    distribute(pipe, Parallelism.build())
    got = _generate(pipe)
    err = _relative(got.latents, want.latents)
    assert err <= SP_RTOL, err
    assert got.info["world_size"] == dist.get_world_size() and got.info["compile"]["graphs"] >= 4
    if dist.get_rank() == 0:
        assert_frames_match(got.frames, want.frames, "ulysses compiled frames")
    assert dict(_dynamo_counters()["graph_break"]) == {}


CASES = {
    "dit-aot-eager": _case_dit_ulysses("aot_eager"),
    "pipeline-aot-eager": _case_pipeline_ulysses,
    "dit-inductor": _case_dit_ulysses("inductor"),
}


# Inductor compiles on both ranks at once, on two cores: the three cases took 130 s here with the machine shared
# by other jobs, close to spawn's default deadline, so this launch has a longer one.
DEADLINE_S = 400


@pytest.fixture(scope="module")
def two_ranks(request, tmp_path_factory):
    """The verdicts of 2 ranks that ran :data:`CASES` (spawned once for the module)."""
    return spawn.launch(request.module.__name__, 2, str(tmp_path_factory.mktemp("compile-world2")),
                        deadline_s=DEADLINE_S)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_under_ulysses(two_ranks, case):
    """2 ranks on gloo (Ulysses over both): the compiled DiT and pipeline against one eager process."""
    spawn.check(two_ranks, case)
