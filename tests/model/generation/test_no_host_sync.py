"""The Stage II loop makes no host round trip: the pipeline's ``run_stage2`` on fake CUDA tensors under a dispatch
mode that fails on every read of device data (``.item()``, ``bool()``, ``torch.equal``, ``torch.unique``, a
device-to-host copy) anywhere in the loop, and on any host-to-device copy inside a DiT call (a pageable copy makes
the host wait for the device; what a call needs is put on the device when the plan is built).

Every mode of the loop runs: windows, ``joint``, the shared anchor, the ``swift`` and ``refine`` kinds, with and
without guidance, and the CUDA-graph path with its capture stubbed (no GPU here). The trap itself is tested: a
deliberate ``.item()``, device-to-host copy, ``torch.equal`` and host-to-device copy inside a call are caught."""

from __future__ import annotations

import contextlib

import pytest
import torch
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from swift_kernels import plan_attention
from swift_model.generation.csg import CSGPlan, flow_steps, run_csg
from swift_model.generation.pipeline import Conditioning, GenerationState, SwiftI2VPipeline
from swift_model.generation.request import GenerationRequest
from swift_model.generation.window_model import WindowGraphs
from swift_model.nets.dit import FrameTimesteps
from swift_model.nets.spec import ModelSpec
from swift_model.planning.planner import _fake_storage

# ops that read device data to the host (a synchronisation on a GPU), or whose output size depends on it
_READS = ("_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select")
# indexing ops whose boolean-mask form finds the mask's nonzero entries on the host
_INDEXING = ("index", "index_put", "index_put_", "_index_put_impl_")


class HostRoundTrip(AssertionError):
    """What :class:`NoHostRoundTrips` raises."""


def _device_of(t) -> str | None:
    return t.device.type if isinstance(t, torch.Tensor) else None


class NoHostRoundTrips(TorchDispatchMode):
    """Fails on every op that reads device data to the host: ``.item()``/``bool()``/``.tolist()``
    (``_local_scalar_dense``, ``is_nonzero``), ``torch.equal``, ``torch.unique``, ``nonzero``, indexing by a boolean
    mask and any copy from a CUDA tensor to the CPU; inside a DiT call (``calls > 0``), also on any copy from the
    CPU to CUDA.

    Outside the DiT calls host-to-device copies pass: the plan-time preparation, and the loop's per-segment index
    tensors and noise (which a GPU run sends from pinned memory without blocking). ``dit_calls`` counts the DiT
    calls watched.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.dit_calls = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops += 1
        if name in _READS or "unique" in name:
            raise HostRoundTrip(f"{func} reads device data")
        if name in _INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ()):
            raise HostRoundTrip(f"{func} with a boolean mask reads device data (its nonzero entries)")
        src = dst = None
        if name == "_to_copy" and "device" in kwargs:
            src, dst = _device_of(args[0]), torch.device(kwargs["device"]).type
        elif name == "copy_":
            src, dst = _device_of(args[1]), _device_of(args[0])
        if src == "cuda" and dst == "cpu":
            raise HostRoundTrip(f"{func} copies a CUDA tensor to the CPU")
        if src == "cpu" and dst == "cuda" and self.calls:
            raise HostRoundTrip(f"{func} copies a CPU tensor to CUDA inside a DiT call")
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def watching(self, dit):
        """Count ``dit``'s forward calls as DiT calls (strict about host-to-device copies inside them)."""
        forward = dit.forward

        def counted(*a, **kw):
            self.calls += 1
            self.dit_calls += 1
            try:
                return forward(*a, **kw)
            finally:
                self.calls -= 1

        dit.forward = counted
        try:
            yield self
        finally:
            del dit.forward  # the class's forward again


@pytest.fixture(scope="module")
def fake_pipes():
    """One fake mode and, per Stage II kind, the tiny pipeline on fake CUDA tensors (no data, no GPU)."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        pipes = {kind: SwiftI2VPipeline.from_spec(ModelSpec.tiny(kind), device="cuda", materialize=_fake_storage,
                                                  random_weights=False) for kind in ("swift", "refine")}
    return fake, pipes


def _stage2_on_fake_cuda(fake, pipe, *, graphs: bool = False, **settings):
    """``run_stage2`` of a tiny request on fake CUDA tensors under the trap; returns (latents, trap, model)."""
    cfg = pipe.stage1.config
    embeds = torch.zeros(1, cfg.text_len, cfg.text_dim)
    guided = settings.get("guidance_scale") is not None
    request = GenerationRequest(image=Image.new("RGB", (64, 64)), prompt_embeds=embeds, frames=17, width=64,
                                height=64, steps=2, negative_prompt_embeds=embeds if guided else None, **settings)
    run = pipe.prepare(request)  # host bookkeeping, before the fake mode
    made = {}
    window_model = pipe._window_model

    def keep(*a, **kw):  # the window model the run builds, with its graphs stubbed when asked
        model = made["model"] = window_model(*a, **kw)
        if graphs:
            model.graphs = made["graphs"] = WindowGraphs(pipe.stage2, model.channels, capture=_rerun_capture)
        return model

    state = GenerationState()
    trap = NoHostRoundTrips()
    with torch.no_grad(), fake:
        context = torch.zeros(1, cfg.text_len, cfg.text_dim, device="cuda")
        state.conditioning = Conditioning(context, torch.zeros_like(context) if guided else None, None)
        state.reference = torch.zeros(1, *run.stage2_shape, device="cuda")
        pipe._window_model = keep
        try:
            with trap, trap.watching(pipe.stage2):
                out = pipe.run_stage2(run, state)
        finally:
            del pipe._window_model
    return out, trap, made, run


def _rerun_capture(fn):
    """A stand-in for a CUDA graph capture: every replay runs ``fn`` again on the static buffers."""
    out = fn()
    return out, lambda: out.copy_(fn())


MODES = {
    "windows-swift": ("swift", {}),
    "windows-refine": ("refine", {}),
    "joint-swift": ("swift", dict(joint=True)),
    "joint-refine-guided": ("refine", dict(joint=True, guidance_scale=3.0)),
    "shared-anchor-swift": ("swift", dict(shared_anchor=True)),
    "shared-anchor-refine-guided": ("refine", dict(shared_anchor=True, guidance_scale=3.0)),
    "guided-swift-both-neighbours": ("swift", dict(guidance_scale=3.0, neighbors=(1, 1))),
}


# the fast suite runs three modes that between them cover windows, joint, the shared anchor, both kinds and
# guidance; the slow suite runs the rest
FAST_MODES = ("windows-swift", "joint-swift", "shared-anchor-refine-guided")


@pytest.mark.parametrize("mode", [m if m in FAST_MODES else pytest.param(m, marks=pytest.mark.slow)
                                  for m in sorted(MODES)])
def test_stage2_loop_has_no_host_round_trip(fake_pipes, mode):
    """Every mode of the Stage II loop runs to the end on fake CUDA tensors with no read of device data, no
    device-to-host copy, and no host-to-device copy inside any DiT call."""
    fake, pipes = fake_pipes
    kind, settings = MODES[mode]
    out, trap, made, run = _stage2_on_fake_cuda(fake, pipes[kind], **settings)
    assert isinstance(out, FakeTensor) and out.device.type == "cuda" and tuple(out.shape) == (1, *run.stage2_shape)
    # the trap saw every DiT call of the loop: one per unit, step and guidance branch, and a shared anchor's one
    # precompute per branch
    units = 1 if settings.get("joint") else run.csg.num_segments
    branches = 2 if settings.get("guidance_scale") else 1
    anchors = branches if settings.get("shared_anchor") else 0
    assert trap.dit_calls == units * len(run.schedule2) * branches + anchors


@pytest.mark.parametrize("settings", [
    pytest.param({}, id="windows", marks=pytest.mark.slow),
    pytest.param(dict(shared_anchor=True, guidance_scale=3.0), id="shared-anchor-guided"),
    pytest.param(dict(joint=True), id="joint", marks=pytest.mark.slow),
])
def test_stage2_loop_with_cuda_graphs_has_no_host_round_trip(fake_pipes, settings):
    """The CUDA-graph path (capture stubbed: a replay reruns the captured function on the static buffers) runs
    the loop under the same trap; a replay copies into the static buffers on the device only."""
    fake, pipes = fake_pipes
    out, trap, made, run = _stage2_on_fake_cuda(fake, pipes["swift"], graphs=True, **settings)
    assert tuple(out.shape) == (1, *run.stage2_shape)
    g = made["graphs"]
    branches = 2 if settings.get("guidance_scale") else 1
    shapes = 1 if settings.get("joint") else len({w.num_blocks for w in run.csg.windows})
    assert len(g.captured) == shapes * branches
    units = 1 if settings.get("joint") else run.csg.num_segments
    assert g.replays == units * len(run.schedule2) * branches


# -- the trap itself ------------------------------------------------------------------------------------------


def _loop_on_fake_cuda(model_fn):
    """``run_csg`` of a 5-block clip with ``model_fn`` on fake CUDA tensors under the trap."""
    plan, steps = CSGPlan(5, 2, (1, 0), block_tokens=4), flow_steps(2)  # the plan: host bookkeeping, made first
    with FakeTensorMode(allow_non_fake_inputs=True), NoHostRoundTrips():
        z_ref = torch.randn(1, 3, 5, 4, 4, device="cuda")
        return run_csg(model_fn, z_ref, plan, steps, host_inputs=True)


def test_the_loop_itself_runs_under_the_trap():
    """The loop with a model that reads nothing runs to the end (the trap does not fail on the loop itself)."""
    out = _loop_on_fake_cuda(lambda x, ref, tt, pos, layout: x * 0.5)
    assert isinstance(out, FakeTensor) and tuple(out.shape) == (1, 3, 5, 4, 4)


@pytest.mark.parametrize("read", ["item", "bool", "cpu", "equal", "unique", "nonzero", "mask-index", "mask-write"])
def test_the_trap_catches_a_deliberate_read(read):
    """A model that reads device data in any of these ways fails the loop with the trap's error."""
    reads = {
        "item": lambda x: x.sum().item(),
        "bool": lambda x: bool((x > 0).any()),
        "cpu": lambda x: x.cpu(),
        "equal": lambda x: torch.equal(x, x),
        "unique": lambda x: torch.unique(x),
        "nonzero": lambda x: torch.nonzero(x),
        "mask-index": lambda x: x[x > 0],
        "mask-write": lambda x: x.clone().__setitem__(x > 0, 0.0),
    }

    def model_fn(x, ref, tt, pos, layout):
        reads[read](x)
        return x

    with pytest.raises(HostRoundTrip):
        _loop_on_fake_cuda(model_fn)


def test_the_trap_catches_a_host_to_device_copy_inside_a_dit_call(fake_pipes):
    """Inside a DiT call a host-to-device copy fails: a call with timesteps never prepared copies their values."""
    fake, pipes = fake_pipes
    dit = pipes["swift"].stage2
    dense = torch.ones(1, 1, dtype=torch.bool)  # a real table: a plan reads it on the host
    with torch.no_grad(), fake:
        x = torch.zeros(1, dit.config.in_channels, 3, 4, 4, device="cuda")
        cache = dit.precompute_context(torch.zeros(1, 5, dit.config.text_dim, device="cuda"))
        plan = plan_attention(dense, 12, device=dit.device)  # 3 frames of 4 tokens
        steps = FrameTimesteps((0.0, 123.25, 123.25))
        trap = NoHostRoundTrips()
        with trap, trap.watching(dit), pytest.raises(HostRoundTrip, match="inside a DiT call"):
            dit(x, steps, None, attention_plan=plan, frame_positions=(0, 7, 8), context_cache=cache)
        # prepared ahead (what the window model does when the plan is built), the same call copies nothing
        dit.prepare_call(x.shape, (0, 7, 8), [steps])
        with trap, trap.watching(dit):
            out = dit(x, steps, None, attention_plan=plan, frame_positions=(0, 7, 8), context_cache=cache)
    assert trap.dit_calls == 2 and tuple(out.shape) == (1, dit.config.out_channels, 3, 4, 4)
