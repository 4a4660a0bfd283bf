"""The Stage II window call: the DiT on one CSG window (or the whole clip), made ready when the plan is built, and
optionally captured in CUDA graphs.

:class:`WindowModel` is the model :func:`~swift_model.generation.csg.run_csg` calls (``host_inputs=True``). When
it is built, before the loop, everything a call would otherwise copy from the host is put on the device: each
window's attention plan (and its FlexAttention mask on a GPU), its RoPE table, the device form of every step's
per-frame timesteps (``WanDiT.prepare_call``). A call then reads no device data and copies nothing from the host:
no host round trip inside a DiT call, which is what lets a GPU run the loop without waiting for the host, and
what lets a call be captured in a CUDA graph.

:class:`WindowGraphs` (``SwiftI2VPipeline(..., cuda_graphs=True)``) captures the window call once per *signature*
(input shape, the distinct-timestep structure, the attention table, the conditioning and the anchor cache) and
replays it for every window of every step with that signature: the window's input, its RoPE table and the
step's timestep values are copied into the graph's static buffers on the device, the graph is replayed, and its
static output is copied out. With the paper's settings (``M = 2``, ``N = (1, 0)``) a clip has two window shapes
(the first window lacks a left neighbour), so two captures serve every call (four with guidance, one per
conditioning). :func:`cuda_graphs_unavailable` says why a run cannot be captured.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.utils._python_dispatch import _disable_current_modes

from swift_kernels import AttentionPlan, plan_attention

from ..nets.dit import AnchorCache, DeviceFrameTimesteps, FrameTimesteps
from ..nets.dit.conditioning import frame_timestep_tensors
from .csg import CSGPlan

# the block table of dense attention (a real CPU tensor made at import: a fake run's plans read it on the host)
_DENSE_TABLE = torch.ones(1, 1, dtype=torch.bool)

# capture(fn) -> (static output, replay): runs ``fn`` as a CUDA graph capture would and returns what replays it
Capture = Callable[[Callable[[], torch.Tensor]], "tuple[torch.Tensor, Callable[[], None]]"]


def cuda_graphs_unavailable(device: torch.device, memory, parallel=None) -> str | None:
    """Why the Stage II window call of a pipeline on ``device`` with memory plan ``memory`` (and ``parallel``, a
    :class:`~swift_model.generation.distributed.Parallelism`) cannot be captured in CUDA graphs; ``None`` when
    it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"cuda_graphs needs a CUDA device; this pipeline runs on {device.type}"
    if memory.placement("stage2", "stage2") == "stream":
        return (f"cuda_graphs cannot capture the {memory.profile} profile's Stage II DiT, whose blocks are copied in "
                "from host memory while it runs; use the fast or balanced memory profile")
    if parallel is not None and parallel.distributed:
        return ("cuda_graphs runs in one process: the window call of several ranks (Ulysses, CFG parallel, FSDP) "
                "exchanges data between them, which is not captured")
    if not torch.cuda.is_available():
        return "cuda_graphs needs a CUDA GPU, and none is available"
    return None


def cuda_capture(warmup: int = 2) -> Capture:
    """The capture of a CUDA graph: ``warmup`` eager runs on a side stream (lazy initialisations, compiled
    kernels, the caches a call fills happen there, outside the capture), then one capture into a memory pool
    shared by every graph of the returned function (the graphs run one at a time, and their outputs are copied
    out before the next replay)."""
    pool = torch.cuda.graph_pool_handle()

    def capture(fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        return out, graph.replay

    return capture


@dataclasses.dataclass
class _Graph:
    """One captured window call: its static buffers, its output and its replay, and every tensor it reads that
    nothing else keeps alive (a freed tensor's memory would be reused under the graph)."""

    inp: torch.Tensor
    values: torch.Tensor
    rope: torch.Tensor
    out: torch.Tensor
    replay: Callable[[], None]
    keep: tuple


class WindowGraphs:
    """The window calls of one Stage II run captured in CUDA graphs, one per call signature, and replayed.

    Args:
        dit: the Stage II ``WanDiT`` (one process: no ``sp_group``).
        channels: output channels the loop reads (``[:, :channels]`` of the DiT's output, as fp32).
        capture: how a graph is captured (default :func:`cuda_capture`); a test passes one that runs ``fn``
            again on every replay, to check the bookkeeping without a GPU.

    Attributes:
        captured: the signatures captured, in order (one capture per signature).
        replays: calls served by a replay.
    """

    def __init__(self, dit, channels: int, *, capture: Capture | None = None) -> None:
        self.dit, self.channels = dit, channels
        self._capture = capture if capture is not None else cuda_capture()
        self._graphs: dict[tuple, _Graph] = {}
        self._tables: dict[int, tuple] = {}  # id(plan) -> what of its table a graph depends on
        self.captured: list[tuple] = []
        self.replays = 0

    def signature(self, inp: torch.Tensor, timesteps: FrameTimesteps, positions: tuple, plan: AttentionPlan,
                  context, anchor: AnchorCache | None) -> tuple:
        """What a captured call depends on beyond its static buffers: the input's shape and dtype, which frames
        share a timestep and which of the distinct values are 0 (the host checks' view), the attention table,
        the conditioning and the anchor cache (by identity; the graph reads their tensors) with the anchors'
        positions. Everything else a window changes (its input, RoPE table, timestep values) is copied in."""
        values, rows = timesteps.distinct()
        table = self._tables.get(id(plan))
        if table is None:
            # dense plans of one size are interchangeable; a sparse one is its table
            mask = None
            if not plan.dense:
                with _disable_current_modes():  # the plan's host table, read as such in a fake run too
                    mask = plan.block_mask.numpy().tobytes()
            table = self._tables[id(plan)] = (plan.num_tokens, plan.block_tokens, plan.dense, mask)
        anchor_key = None if anchor is None else (id(anchor), positions[:anchor.blocks])
        return (tuple(inp.shape), inp.dtype, rows, tuple(v == 0.0 for v in values), table, id(context), anchor_key)

    def __call__(self, inp: torch.Tensor, timesteps: FrameTimesteps, positions: tuple, plan: AttentionPlan,
                 context, anchor: AnchorCache | None) -> torch.Tensor:
        """The window call's fp32 velocity ``[B, channels, n, H, W]``, by a replay of its signature's graph
        (captured on the first call of that signature)."""
        key = self.signature(inp, timesteps, positions, plan, context, anchor)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture_call(inp, timesteps, positions, plan, context, anchor)
            self.captured.append(key)
        dit = self.dit
        B, P = inp.shape[0], plan.block_tokens
        # device-to-device copies into the static buffers: the prepared tensors of this window and step
        values = frame_timestep_tensors(timesteps, B, P, dit.device, dit.host_input_cache)[0]
        rope = dit.prepare_call(inp.shape, positions)
        graph.inp.copy_(inp)
        graph.values.copy_(values)
        graph.rope.copy_(rope)
        graph.replay()
        self.replays += 1
        return graph.out.clone()  # the next replay of this graph (or of one sharing its pool) overwrites it

    def _capture_call(self, inp, timesteps, positions, plan, context, anchor) -> _Graph:
        dit, channels = self.dit, self.channels
        values, index = frame_timestep_tensors(timesteps, inp.shape[0], plan.block_tokens, dit.device,
                                               dit.host_input_cache)
        static_inp, static_values = inp.clone(), values.clone()
        static_rope = dit.prepare_call(inp.shape, positions).clone()
        steps = DeviceFrameTimesteps(timesteps, static_values)

        def call():
            # only static buffers and objects the signature pins down: what a replay recomputes
            out = dit(static_inp, steps, None, attention_plan=plan, frame_positions=positions,
                      rope_table=static_rope, context_cache=context, anchor_cache=anchor)
            return out[:, :channels].float()

        out, replay = self._capture(call)
        return _Graph(static_inp, static_values, static_rope, out, replay, keep=(plan, context, anchor, index))


class WindowModel:
    """The Stage II DiT as :func:`~swift_model.generation.csg.run_csg`'s ``model_fn`` (``host_inputs=True``):
    one window (or the whole clip, ``joint``), both guidance branches when guided, the shared anchor's keys and
    values computed once per conditioning; prepared for every window and step of ``plan`` and ``steps`` when
    built, so the calls copy nothing from the host.

    Args:
        dit: the Stage II ``WanDiT``. plan: the :class:`~swift_model.generation.csg.CSGPlan`.
        steps: ``(timestep, sigma, sigma_next)`` of the loop's steps. joint: the loop runs the whole clip.
        latent_shape: ``(B, C, T, H, W)`` of ``z_ref``. parallel: the pipeline's
            :class:`~swift_model.generation.distributed.Parallelism`.
        cond, uncond: the context caches of the prompt and (guided) of the negative prompt.
        graphs: a :class:`WindowGraphs` to capture and replay the calls (``None``: eager calls).
    """

    def __init__(self, dit, plan: CSGPlan, steps, *, joint: bool, latent_shape, parallel, cond, uncond=None,
                 graphs: WindowGraphs | None = None) -> None:
        self.dit, self.plan, self.parallel = dit, plan, parallel
        self.cond, self.uncond, self.graphs = cond, uncond, graphs
        self.dtype = next(dit.parameters()).dtype
        self.channels = latent_shape[1]
        self.sp = parallel.sp_group
        self.anchors: dict[int, AnchorCache] = {}  # per conditioning, computed on its first call
        self.attention: dict = {}  # layout -> its plan on the device
        self._prepare(list(steps), joint, latent_shape)

    def _prepare(self, steps, joint: bool, latent_shape) -> None:
        """Everything the calls copy from the host, on the device now: the plans, the RoPE tables, the timesteps."""
        B, _, T, H, W = latent_shape
        dit, plan, device = self.dit, self.plan, self.dit.device
        C = dit.config.in_channels
        if joint:
            units = [(plan.clip_layout, tuple(range(T)), tuple(b >= plan.anchor_blocks for b in range(T)))]
        else:
            units = [(w.layout, w.blocks, w.noisy) for w in plan.windows]
        for layout, blocks, noisy in units:
            attention = self.attention[layout] = plan_attention(layout, device=device)
            if not attention.dense and device.type == "cuda":
                attention.to_block_mask()  # FlexAttention's mask (a GPU's block-sparse fallback), built now
            timesteps = [FrameTimesteps(tuple(float(t) if n else 0.0 for n in noisy)) for t, _, _ in steps]
            dit.prepare_call((B, C, len(blocks), H, W), blocks, timesteps)
        self.anchor_attention = None
        if self._shared_anchor:  # the anchor's precompute: dense over its own blocks
            A = plan.anchor_blocks
            self.anchor_attention = plan_attention(_DENSE_TABLE, A * plan.block_tokens, device=device)
            dit.prepare_call((B, C, A, H, W), tuple(range(A)), [FrameTimesteps.zeros(A)])

    @property
    def _shared_anchor(self) -> bool:
        # the anchor's cache is for unsplit sequences
        return self.plan.anchor_attends == "anchor" and self.sp is None

    def _anchor(self, inp: torch.Tensor, positions: tuple, context) -> AnchorCache | None:
        if not self._shared_anchor:
            return None
        anchor = self.anchors.get(id(context))
        if anchor is None:
            # the CSG loop never writes the anchor block: every window's anchor input is the one cached, so the
            # calls need not compare it (no device data read per call)
            A = self.plan.anchor_blocks
            anchor = self.anchors[id(context)] = self.dit.precompute_anchor(
                inp[:, :, :A], context, positions[:A], check_latents=False, attention_plan=self.anchor_attention)
        return anchor

    def _call(self, inp: torch.Tensor, timesteps: FrameTimesteps, positions: tuple, layout, context) -> torch.Tensor:
        attention = self.attention.get(layout)
        if attention is None:  # a layout the plan did not hold (a caller's own): planned on first use
            attention = self.attention[layout] = plan_attention(layout, device=self.dit.device)
        anchor = self._anchor(inp, positions, context)
        if self.graphs is not None:
            return self.graphs(inp, timesteps, positions, attention, context, anchor)
        return self.dit(inp, timesteps, None, attention_plan=attention, frame_positions=positions,
                        context_cache=context, anchor_cache=anchor, sp_group=self.sp)[:, :self.channels].float()

    def __call__(self, inp: torch.Tensor, ref, timesteps: FrameTimesteps, positions: tuple, layout):
        """``model_fn(inp, ref, timesteps, positions, layout)`` of :func:`~swift_model.generation.csg.run_csg`:
        ``inp`` is the model input (``"swift"``: ``cat([state, z_ref window])`` written by the sampler step,
        ``ref`` ``None``; ``"refine"``: the state); the fp32 velocity, or ``(v_cond, v_uncond)`` when guided."""
        inp = inp.to(self.dtype)
        return self.parallel.velocities(lambda c: self._call(inp, timesteps, positions, layout, c), self.cond,
                                        self.uncond, self.uncond is not None)
