"""CUDA graphs of the Stage II window call (``SwiftI2VPipeline(..., cuda_graphs=True)``, ``--cuda-graphs``).

On a CPU: the refusals (one clear line where graphs cannot apply), and the capture bookkeeping with the capture
stubbed by a function that reruns the captured call on its static buffers at every replay: one capture per
signature (window shape, timestep structure, conditioning), a replay for every call, and the loop's result bitwise
the eager loop's (a static buffer not refilled per window, e.g. the RoPE table of another window's positions,
would change it). On a GPU (skipped here): the replayed graphs against the eager run."""

from __future__ import annotations

import types

import pytest
import torch

from swift_model.cli.main import main
from swift_model.generation.csg import CSGPlan, flow_steps, run_csg
from swift_model.generation.distributed import Parallelism
from swift_model.generation.memory import MemoryPlan
from swift_model.generation.pipeline import SwiftI2VPipeline
from swift_model.generation.window_model import WindowGraphs, WindowModel, cuda_graphs_unavailable

from helpers import assert_close_to_scale


class RerunCapture:
    """A stand-in for a CUDA graph capture: runs the function once (the capture) and again at every replay, on
    the same static buffers, into the same output; counts the captures."""

    def __init__(self) -> None:
        self.captures = 0

    def __call__(self, fn):
        self.captures += 1
        out = fn()
        return out, lambda: out.copy_(fn())


# -- refusals --------------------------------------------------------------------------------------------------


def test_cuda_graphs_refused_on_a_cpu_pipeline(tiny_pipe):
    p = tiny_pipe
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device; this pipeline runs on cpu"):
        SwiftI2VPipeline(p.stage1, p.stage2, p.vae1, p.vae2, device="cpu", cuda_graphs=True)
    with pytest.raises(TypeError, match="cuda_graphs must be a bool"):
        SwiftI2VPipeline(p.stage1, p.stage2, p.vae1, p.vae2, device="cpu", cuda_graphs="yes")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        p.use_cuda_graphs()
    assert p.cuda_graphs is False
    p.use_cuda_graphs(False)  # turning them off always works


def test_cuda_graphs_refusal_reasons():
    """Each case that cannot be captured says why, in one line; a CUDA pipeline under fast or balanced can."""
    cuda = torch.device("cuda")
    streamed = cuda_graphs_unavailable(cuda, MemoryPlan.of("24gb"))
    assert "24gb" in streamed and "fast or balanced" in streamed
    ranks = cuda_graphs_unavailable(cuda, MemoryPlan.of("balanced"), types.SimpleNamespace(distributed=True))
    assert "one process" in ranks
    one = cuda_graphs_unavailable(cuda, MemoryPlan.of("fast"), Parallelism())
    if torch.cuda.is_available():
        assert one is None
    else:
        assert one == "cuda_graphs needs a CUDA GPU, and none is available"
    for why in (streamed, ranks, one):
        assert why is None or "\n" not in why


def test_cli_cuda_graphs_on_the_cpu_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "o.mp4"
    assert main(["demo", "--cuda-graphs", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: cuda_graphs needs a CUDA device; this pipeline runs on cpu"
    assert "Traceback" not in "\n".join(err) and not out.exists()


# -- bookkeeping (capture stubbed) -----------------------------------------------------------------------------


def _loop(dit, plan, z_ref, steps, graphs, *, joint=False, guided=False, kind="swift", seed=5):
    """``run_csg`` with the window model (eager, or with ``graphs``) as the pipeline calls it."""
    g = torch.Generator().manual_seed(seed)
    cond = dit.precompute_context(torch.randn(1, 7, dit.config.text_dim, generator=g))
    uncond = dit.precompute_context(torch.randn(1, 7, dit.config.text_dim, generator=g)) if guided else None
    model = WindowModel(dit, plan, steps, joint=joint, latent_shape=tuple(z_ref.shape), parallel=Parallelism(),
                        cond=cond, uncond=uncond, graphs=graphs)
    return run_csg(model, z_ref, plan, steps, kind=kind, seed=11, joint=joint, fuse_ref=kind == "swift",
                   guidance=2.5 if guided else None, host_inputs=True, start_sigma=0.6)


CASES = {
    # 6 blocks, M = 2, N = (1, 0): windows (0,1,2) noisy (F,T,T), (0,2,3,4) (F,F,T,T), (0,4,5) (F,F,T): two
    # shapes, three signatures (the last window's 3 blocks share their timesteps differently)
    "windows-guided-shared-anchor": dict(neighbors=(1, 0), anchor="anchor", joint=False, guided=True),
    "windows-both-neighbours": dict(neighbors=(1, 1), anchor="all", joint=False, guided=False),
    "joint": dict(neighbors=(1, 0), anchor="all", joint=True, guided=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_graph_replays_give_the_eager_loop(tiny_pipe, case):
    c = CASES[case]
    dit = tiny_pipe.stage2
    plan = CSGPlan(6, 2, c["neighbors"], block_tokens=4, anchor_attends=c["anchor"])
    steps = flow_steps(2)
    z_ref = torch.randn(1, 48, 6, 4, 4, generator=torch.Generator().manual_seed(3))
    eager = _loop(dit, plan, z_ref, steps, None, joint=c["joint"], guided=c["guided"])
    capture = RerunCapture()
    graphs = WindowGraphs(dit, 48, capture=capture)
    replayed = _loop(dit, plan, z_ref, steps, graphs, joint=c["joint"], guided=c["guided"])
    assert torch.isfinite(eager).all() and not torch.equal(eager, z_ref)
    assert torch.equal(replayed, eager)
    branches = 2 if c["guided"] else 1
    if c["joint"]:
        signatures, calls = 1, len(steps)
    else:
        signatures = len({(w.num_blocks, w.frame_timesteps(1.0).distinct()[1]) for w in plan.windows})
        calls = plan.num_segments * len(steps)
    assert capture.captures == len(graphs.captured) == len(set(graphs.captured)) == signatures * branches
    assert graphs.replays == calls * branches


def test_a_graph_is_captured_once_per_shape_and_reused_by_the_next_run_of_that_shape(tiny_pipe):
    """Windows of one shape share their graph across steps and segments: a clip of 11 blocks (four windows of
    4 blocks at other clip positions after the first of 3) captures two graphs and replays them 10 times, and
    gives the eager result (each window's RoPE table, input and timesteps copied into the static buffers)."""
    dit = tiny_pipe.stage2
    plan = CSGPlan(11, 2, (1, 0), block_tokens=4)
    steps = flow_steps(2)
    z_ref = torch.randn(1, 48, 11, 4, 4, generator=torch.Generator().manual_seed(8))
    capture = RerunCapture()
    graphs = WindowGraphs(dit, 48, capture=capture)
    assert torch.equal(_loop(dit, plan, z_ref, steps, graphs), _loop(dit, plan, z_ref, steps, None))
    shapes = [key[0] for key in graphs.captured]
    assert shapes == [(1, 96, 3, 4, 4), (1, 96, 4, 4, 4)] and capture.captures == 2
    assert graphs.replays == plan.num_segments * len(steps) == 10


# -- on a GPU ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("settings", [{}, dict(shared_anchor=True, guidance_scale=3.0)],
                         ids=["windows", "shared-anchor-guided"])
def test_cuda_graph_replay_equals_eager_on_gpu(gpu_device, settings):
    """The tiny pipeline's Stage II on the GPU with the window call replayed from CUDA graphs equals the eager
    run to fp32 rounding (the same kernels; inside a capture cuBLAS may choose another algorithm), and the
    graphs were captured once per signature."""
    from PIL import Image

    results, made, request = {}, {}, None
    for graphs in (False, True):
        pipe = SwiftI2VPipeline.tiny(seed=0, device=gpu_device)
        pipe.use_cuda_graphs(graphs)
        if request is None:
            cfg = pipe.stage1.config
            request = dict(image=Image.new("RGB", (128, 64), (90, 140, 200)),
                           prompt_embeds=torch.randn(1, cfg.text_len, cfg.text_dim),
                           negative_prompt_embeds=torch.randn(1, cfg.text_len, cfg.text_dim), frames=21, width=128,
                           height=64, steps=2, **settings)
        window_model = pipe._window_model

        def keep(*a, **kw):
            model = made[graphs] = window_model(*a, **kw)
            return model

        pipe._window_model = keep
        results[graphs] = pipe.generate(progress=False, **request).latents
    assert made[True].graphs is not None and made[False].graphs is None
    g = made[True].graphs
    assert 1 <= len(g.captured) <= 2 * (2 if "guidance_scale" in settings else 1)
    assert g.replays > len(g.captured)
    assert_close_to_scale(results[True], results[False], rtol=1e-5)
