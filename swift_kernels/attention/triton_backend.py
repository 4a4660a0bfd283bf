"""Triton backend of frame-block-sparse attention: launch code for the kernels in ``triton_kernels.py``.

Backend contract (inputs validated by :mod:`swift_kernels.attention.api`; the plan's tables as
:class:`~swift_kernels.attention.plan.KernelTables`):

* ``forward(q, k, v, tables, scale) -> (out, lse)``
* ``backward(dout, q, k, v, out, lse, tables, scale) -> (dq, dk, dv)``
* ``unsupported(head_dim, dtype, device)``: why these inputs cannot run here, or None

Its record, :data:`TRITON`, is at the end. Importing this module needs no Triton: the kernels
(``triton_kernels.py``) are imported at the first launch.

Tile sizes are fixed per (head_dim, pass) rather than autotuned: every tile is a power-of-two part of the
plan's sparse block (:data:`~swift_kernels.attention.tiles.SPARSE_BLOCK`), and autotuning under the CPU
interpreter (how CI runs these kernels) would be far too slow. ``forward``/``backward`` accept an explicit
``config`` so tests and benchmarks can try other tiles.

Head dims: powers of two from 16 to 128 (``tl.arange`` needs a power of two; larger head dims would spill
registers with these tiles). Dtypes: fp16 and bf16 on a GPU; fp32 too in the CPU interpreter only. On a GPU
an fp32 kernel at head_dim 128 falls back to 32 registers with tens of kilobytes of spills per thread and
takes about 30 s to compile (measured with ptxas for sm_90), so fp32 attention there goes to PyTorch's
kernels instead (the dispatcher's automatic choice; an explicit ``backend="triton"`` raises).
"""

from __future__ import annotations

import dataclasses

import torch

from .._backend import triton_interpreting, triton_unavailable
from .._registry import AttentionBackend
from .plan import KernelTables
from .tiles import SPARSE_BLOCK, check_tile

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
GPU_DTYPES = (torch.float16, torch.bfloat16)
INTERPRETER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[type[Exception], str] | None:
    """Why the Triton kernels cannot take inputs of this head_dim and dtype on ``device`` (None when they can)."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return ValueError, f"head_dim {head_dim} (supported: {SUPPORTED_HEAD_DIMS})"
    dtypes = GPU_DTYPES if device.type == "cuda" and not triton_interpreting() else INTERPRETER_DTYPES
    if dtype not in dtypes:
        return TypeError, f"dtype {dtype} on {device.type} (supported: {dtypes})"
    return None


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """Tile sizes and launch parameters of the three passes.

    ``fwd_m``/``fwd_n``: query/key tile of the forward; ``dkdv_m``/``dkdv_n``: query/key tile of the dK/dV
    pass (the program owns a key tile of ``dkdv_n``); ``dq_m``/``dq_n``: the same for the dQ pass. Tiles
    are powers of two in ``[16, SPARSE_BLOCK]``.
    """

    fwd_m: int = 128
    fwd_n: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    dkdv_m: int = 32
    dkdv_n: int = 128
    dkdv_warps: int = 8
    dkdv_stages: int = 3
    dq_m: int = 128
    dq_n: int = 32
    dq_warps: int = 8
    dq_stages: int = 3

    def __post_init__(self):
        for field in ("fwd_m", "fwd_n", "dkdv_m", "dkdv_n", "dq_m", "dq_n"):
            check_tile(f"config.{field}", getattr(self, field))


# H100-oriented defaults, FlashAttention-2 shapes: 128-row query tiles in the forward and the dQ pass,
# 128-row key tiles in the dK/dV pass, with narrow (32) partner tiles in the backward to hold the register
# footprint down. Chosen from ptxas reports for sm_90, not yet from timings. At head_dim 64 nothing spills. At
# head_dim 128 every pass hits the 255-register cap and spills: stack frames of about 90-120 bytes per thread
# in the forward, 290 in dQ and 920-960 in dK/dV (cuobjdump, Triton 3.8 and 3.6; ptxas counted 1,256 bytes of
# dK/dV spill stores under Triton 3.6 with the previous schedule format). That is not "a few hundred" bytes:
# 960 bytes per thread is 240 KB of local memory per 256-thread dK/dV CTA, traffic through L1/L2 on every
# tile. 4 warps or wider tiles spill several times more. The ahead-of-time test (tests/aot_sm90.py) reports
# these for every production config and fails past its limits.
_GPU_CONFIG_16BIT = AttnConfig()
# The interpreter runs each program in Python: fewer, larger tiles are faster there, and warps/stages
# mean nothing. 64-token tiles keep block borders inside tiles common in small tests.
_INTERPRETER_CONFIG = AttnConfig(fwd_m=64, fwd_n=64, dkdv_m=64, dkdv_n=64, dq_m=64, dq_n=64)


def default_config(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> AttnConfig:
    """The tile configuration used on ``device`` for inputs of ``head_dim`` and ``dtype`` when none is
    given (head_dim and dtype are accepted for per-shape tuning; one configuration serves them today)."""
    if device.type != "cuda" or triton_interpreting():
        return _INTERPRETER_CONFIG
    return _GPU_CONFIG_16BIT


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs (interpreter only): exact fp32 products ("ieee"), so fp32 results match an fp32/fp64
    # reference tightly; TF32 would cost ~1e-3 relative error. For fp16/bf16 the setting has no effect.
    return "ieee" if dtype == torch.float32 else "tf32"


def _two_blocks(block_tokens: int, tile_a: int, tile_b: int) -> bool:
    """True when no tile can span more than two blocks (blocks at least as long as both tiles): the
    kernels then build element masks from four table entries instead of a per-element gather."""
    return int(block_tokens) >= max(tile_a, tile_b)


def _kernels():
    """The Triton kernels (imported at the first launch, with Triton)."""
    from . import triton_kernels

    return triton_kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _row_tables(t: KernelTables, transposed: bool):
    """The table row arguments of a kernel: (num, idx, full_num, full_idx, idx row stride)."""
    if transposed:
        return t.q_num, t.q_idx, t.full_q_num, t.full_q_idx, t.q_idx.stride(0)
    return t.kv_num, t.kv_idx, t.full_kv_num, t.full_kv_idx, t.kv_idx.stride(0)


def forward(q, k, v, tables: KernelTables, scale, *, config: AttnConfig | None = None):
    """Block-sparse attention forward. Returns ``(out [B, L, H, D] in q.dtype, lse fp32 [B, H, L])``.

    ``lse`` is the natural-log log-sum-exp of the scaled scores of each query row; a row with no allowed
    key gets ``out = 0`` and ``lse = -inf``.
    """
    batch, seq, heads, head_dim = q.shape
    cfg = config or default_config(head_dim, q.device, q.dtype)
    out = torch.empty((batch, seq, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    _k = _kernels()
    table, P = tables.mask_table, tables.block_tokens
    grid = (_cdiv(seq, cfg.fwd_m), batch * heads)
    _k.fwd_kernel[grid](
        q, k, v, out, lse, table, *_row_tables(tables, False),
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        heads, seq, int(P), table.shape[0], float(scale) * _k.LOG2E_FLOAT,
        HEAD_DIM=head_dim, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, SPARSE=SPARSE_BLOCK, PRECISION=_precision(q.dtype),
        TWO_BLOCKS=_two_blocks(P, cfg.fwd_m, cfg.fwd_n),
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return out, lse


def backward(dout, q, k, v, out, lse, tables: KernelTables, scale, *, config: AttnConfig | None = None):
    """Block-sparse attention backward. Returns ``(dq, dk, dv)`` in the input dtype.

    ``out`` and ``lse`` are the forward's results; rows with ``lse = -inf`` (no allowed key) contribute
    nothing. Three launches: ``delta = rowsum(dout * out)``, then dK/dV per key tile (the transposed tables)
    and dQ per query tile (the forward tables), so no atomics are needed.
    """
    batch, seq, heads, head_dim = q.shape
    lse = lse.contiguous()
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    cfg = config or default_config(head_dim, q.device, q.dtype)
    dq = torch.empty((batch, seq, heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if dq.numel() == 0:
        return dq, dk, dv
    _k = _kernels()
    table, P = tables.mask_table, tables.block_tokens
    nb = table.shape[0]
    precision = _precision(q.dtype)
    qk_scale = float(scale) * _k.LOG2E_FLOAT

    delta = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    pre_m = 64
    _k.bwd_preprocess_kernel[(_cdiv(seq, pre_m), batch * heads)](
        out, dout, delta, *_strides(out), *_strides(dout), heads, seq, HEAD_DIM=head_dim, BLOCK_M=pre_m,
    )

    _k.bwd_dkdv_kernel[(_cdiv(seq, cfg.dkdv_n), batch * heads)](
        q, k, v, dout, dk, dv, lse, delta, table, *_row_tables(tables, True),
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
        heads, seq, int(P), nb, qk_scale, float(scale),
        HEAD_DIM=head_dim, BLOCK_M=cfg.dkdv_m, BLOCK_N=cfg.dkdv_n, SPARSE=SPARSE_BLOCK, PRECISION=precision,
        TWO_BLOCKS=_two_blocks(P, cfg.dkdv_m, cfg.dkdv_n),
        num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages,
    )

    _k.bwd_dq_kernel[(_cdiv(seq, cfg.dq_m), batch * heads)](
        q, k, v, dout, dq, lse, delta, table, *_row_tables(tables, False),
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
        heads, seq, int(P), nb, qk_scale, float(scale),
        HEAD_DIM=head_dim, BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, SPARSE=SPARSE_BLOCK, PRECISION=precision,
        TWO_BLOCKS=_two_blocks(P, cfg.dq_m, cfg.dq_n),
        num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
    )
    return dq, dk, dv


TRITON = AttentionBackend(
    "triton", unavailable=triton_unavailable, unsupported=unsupported, forward=forward, backward=backward,
    custom=True, rank=1,
)
