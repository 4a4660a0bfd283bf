"""Frame-block-sparse attention: our backends side by side with PyTorch SDPA, FlexAttention and
FlashAttention, forward and forward+backward, on the layouts SwiftI2V runs.

Cases (on a GPU: 24 heads, head_dim 128, blocks of 3,520 tokens, bf16, a 21-block clip; on a CPU the same
layouts, smaller: 2 heads, head_dim 64, blocks of 96 tokens, fp32, a 9-block clip):

* ``window``: one segment's window, anchor + 1 left neighbour + 2 own blocks = 4 blocks (14,080 tokens at
  2K), dense: the paper's inference call.
* ``clip``: the whole clip once, each segment seeing the anchor and its window (M=2, N=(1,0) and M=3,
  N=(1,1)).
* ``packed``: the anchor then every segment's window one after another (same two settings).

Rivals compute the same output rows from the same inputs:

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` once per group of query blocks that share
  one mask row (in ``clip`` mode: a segment's own blocks; in ``packed`` mode: a window), against that
  group's allowed keys gathered into one contiguous tensor (anchors + window), outputs concatenated.
  Gathering is part of its time, as it would be in a real pipeline.
* ``flex``: FlexAttention with the plan's ``BlockMask`` (the tables our kernels read; ``torch.compile``d on a
  GPU; eager on a CPU, where it is an unfused reference, so CPU ratios to it are not meaningful).
* ``flash``: ``flash_attn.flash_attn_func`` per group like ``sdpa``, when ``flash_attn`` imports.

FLOPs count only allowed pairs (forward ``4*H*D*pairs``, forward+backward 3.5x that), for every
implementation, so TFLOP/s are *effective* rates comparable across implementations.
"""

from __future__ import annotations

import functools
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

from swift_kernels import BackendUnavailableError, CSGLayout, csg_attention, plan_attention
from swift_kernels._backend import backend_unavailable_reason

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"

if ON_GPU:
    BATCH, HEADS, HEAD_DIM, BLOCK_TOKENS, CLIP_BLOCKS, DTYPE = 1, 24, 128, 3520, 21, torch.bfloat16
else:
    BATCH, HEADS, HEAD_DIM, BLOCK_TOKENS, CLIP_BLOCKS, DTYPE = 1, 2, 64, 96, 9, torch.float32


def _layouts() -> dict[str, CSGLayout]:
    T, P = CLIP_BLOCKS, BLOCK_TOKENS
    return {
        # Segment 1 = clip blocks [3, 5); its window adds block 2: anchor + 3 blocks = 4 blocks.
        "window-M2-N1,0": CSGLayout(T, P, 2, (1, 0), mode="window", segment=1),
        "clip-M2-N1,0": CSGLayout(T, P, 2, (1, 0), mode="clip"),
        "clip-M3-N1,1": CSGLayout(T, P, 3, (1, 1), mode="clip"),
        "packed-M2-N1,0": CSGLayout(T, P, 2, (1, 0), mode="packed"),
        "packed-M3-N1,1": CSGLayout(T, P, 3, (1, 1), mode="packed"),
    }


LAYOUTS = _layouts()
PASSES = ("fwd", "fwd+bwd")
RIVALS = ("sdpa", "flex", "flash")
OURS = ("torch", "triton", "cuda")

# Rivals first, then ours, inside each (case, pass): the implementations of one comparison run back to back.
PARAMS = [
    pytest.param(case, pass_, impl, id=f"{case}-{pass_}-{impl}")
    for case in LAYOUTS
    for pass_ in PASSES
    for impl in RIVALS + OURS
]


# ---------------------------------------------------------------------------------------------------
# Rivals
# ---------------------------------------------------------------------------------------------------


def _ranges(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of True in ``flags``."""
    runs, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


@functools.lru_cache(maxsize=None)
def query_groups(layout: CSGLayout) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
    """Token ranges ``((q0, q1), [(k0, k1), ...])``: consecutive query blocks with the same mask row, and
    the key ranges that row allows. Together the groups cover every query row once."""
    mask = layout.block_mask.tolist()
    P = layout.block_tokens
    groups = []
    i = 0
    while i < len(mask):
        j = i + 1
        while j < len(mask) and mask[j] == mask[i]:
            j += 1
        keys = [(a * P, b * P) for a, b in _ranges(mask[i])]
        groups.append(((i * P, j * P), keys))
        i = j
    return groups


def _gather(x: torch.Tensor, ranges: list[tuple[int, int]], dim: int) -> torch.Tensor:
    parts = [x.narrow(dim, a, b - a) for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def sdpa_attention(q, k, v, layout: CSGLayout, scale: float) -> torch.Tensor:
    """The layout's attention as one SDPA call per query group on gathered keys ([B, L, H, D] in and out)."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D] views, last dim contiguous
    outs = []
    for (q0, q1), keys in query_groups(layout):
        o = F.scaled_dot_product_attention(qh[:, :, q0:q1], _gather(kh, keys, 2), _gather(vh, keys, 2), scale=scale)
        outs.append(o.transpose(1, 2))
    return outs[0].contiguous() if len(outs) == 1 else torch.cat(outs, dim=1)


def flash_attention(q, k, v, layout: CSGLayout, scale: float) -> torch.Tensor:
    """The layout's attention as one FlashAttention call per query group on gathered keys."""
    from flash_attn import flash_attn_func

    outs = []
    for (q0, q1), keys in query_groups(layout):
        outs.append(flash_attn_func(q[:, q0:q1], _gather(k, keys, 1), _gather(v, keys, 1), softmax_scale=scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


@functools.lru_cache(maxsize=None)
def _flex_function():
    from torch.nn.attention.flex_attention import flex_attention

    if not ON_GPU:
        return flex_attention
    # Every (layout, pass) is its own graph: raise dynamo's recompile limit so that no case silently falls
    # back to the unfused eager path, and compile static shapes (the fastest kernels for a fixed length).
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return torch.compile(flex_attention, dynamic=False)


def make_flex(layout: CSGLayout, scale: float):
    block_mask = plan_attention(layout, device=DEVICE).to_block_mask()  # the tables our kernels read
    flex = _flex_function()

    def run(q, k, v):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex on CPU warns that it is unfused
            o = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale)
        return o.transpose(1, 2)

    return run


def _flash_unavailable() -> str | None:
    if not ON_GPU:
        return "FlashAttention needs a GPU"
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:
        return f"flash_attn is not importable ({type(exc).__name__}: {exc})"
    if DTYPE not in (torch.float16, torch.bfloat16):
        return "FlashAttention needs fp16/bf16"
    return None


def implementation(impl: str, layout: CSGLayout, scale: float, grad: bool):
    """``fn(q, k, v) -> out`` for ``impl``, or ``pytest.skip`` with the reason it cannot run here."""
    if impl == "sdpa":
        return lambda q, k, v: sdpa_attention(q, k, v, layout, scale)
    if impl == "flex":
        if grad and not ON_GPU:
            pytest.skip("FlexAttention has no backward on a CPU (torch raises NotImplementedError)")
        return make_flex(layout, scale)
    if impl == "flash":
        reason = _flash_unavailable()
        if reason:
            pytest.skip(reason)
        return lambda q, k, v: flash_attention(q, k, v, layout, scale)
    if impl == "triton" and not ON_GPU:
        pytest.skip("Triton on a CPU runs only in the interpreter, whose timings mean nothing")
    reason = backend_unavailable_reason(impl, DEVICE)
    if reason:
        pytest.skip(f"backend {impl!r} unavailable: {reason}")
    plan = plan_attention(layout, device=DEVICE)  # built once, as a DiT builds it once per window shape
    return lambda q, k, v: csg_attention(q, k, v, plan, softmax_scale=scale, backend=impl)


# ---------------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------------


def _inputs(layout: CSGLayout, grad: bool, seed: int):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (BATCH, layout.num_tokens, HEADS, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=g, device=DEVICE, dtype=DTYPE).requires_grad_(grad) for _ in range(3))
    dout = torch.randn(shape, generator=g, device=DEVICE, dtype=DTYPE) if grad else None
    return q, k, v, dout


def _tolerance() -> float:
    return 3e-2 if DTYPE in (torch.float16, torch.bfloat16) else 1e-4


@pytest.mark.parametrize("case,pass_,impl", PARAMS)
def test_attention(benchmark, record, timer, case, pass_, impl):
    layout = LAYOUTS[case]
    scale = HEAD_DIM**-0.5
    grad = pass_ == "fwd+bwd"
    fn = implementation(impl, layout, scale, grad)
    q, k, v, dout = _inputs(layout, grad, seed=zlib.crc32(f"{case} {pass_}".encode()))

    # Same rows as the others: check the output against SDPA on the gathered windows before timing. This
    # is also the first (compiling) call, made in the grad mode of the timed calls so that a compiled rival
    # builds the graph it is timed with.
    try:
        with torch.set_grad_enabled(grad):
            out = fn(q, k, v).detach()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    if impl != "sdpa":
        with torch.no_grad():
            expected = sdpa_attention(q.float(), k.float(), v.float(), layout, scale)
        err = (out.float() - expected).abs().max().item()
        assert err <= _tolerance(), f"{impl} disagrees with SDPA on {case}: max error {err}"
    del out

    if grad:

        def run():
            o = fn(q, k, v)
            return torch.autograd.grad(o, (q, k, v), dout)

    else:

        def run():
            with torch.no_grad():
                return fn(q, k, v)

    benchmark.group = f"{case} {pass_}"
    if ON_GPU and impl == "torch":
        # The fp32 block-by-block reference is a correctness baseline, not a contender: at clip size one
        # fwd+bwd takes around a second, so 3 timed rounds (not 10) keep the attention phase inside its budget.
        timer(benchmark, run, rounds=3, warmup_rounds=1)
    else:
        timer(benchmark, run)

    pairs = BATCH * plan_attention(layout, device=DEVICE).allowed_pairs
    flops = 4.0 * HEADS * HEAD_DIM * pairs * (3.5 if grad else 1.0)
    record(
        benchmark,
        flops=flops,
        role="rival" if impl in RIVALS else "ours",
        impl=impl,
        case=case,
        **{"pass": pass_},
        layout=repr(layout),
        shape=[BATCH, layout.num_tokens, HEADS, HEAD_DIM],
        dtype=str(DTYPE).replace("torch.", ""),
        allowed_pairs=pairs,
        density=pairs / (BATCH * layout.num_tokens**2),
        flex_mode=("compiled" if ON_GPU else "eager") if impl == "flex" else None,
    )


def test_gemm_peak(benchmark, record, timer):
    """A square matmul (8192^3 bf16 on a GPU, 512^3 fp32 on a CPU): the practical peak that attention
    results are expressed against (``share_of_gemm_peak``)."""
    n, dtype = (8192, torch.bfloat16) if ON_GPU else (512, torch.float32)
    g = torch.Generator(device=DEVICE).manual_seed(11)
    a = torch.randn(n, n, generator=g, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, generator=g, device=DEVICE, dtype=dtype)
    c = torch.empty(n, n, device=DEVICE, dtype=dtype)
    benchmark.group = "gemm peak"
    timer(benchmark, lambda: torch.matmul(a, b, out=c), rounds=20 if ON_GPU else 5)
    record(benchmark, flops=2.0 * n**3, role="gemm", impl="matmul", shape=[n, n, n], dtype=str(dtype).replace("torch.", ""))
