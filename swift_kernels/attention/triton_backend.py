"""Triton backend of frame-block-sparse attention: launch code for the kernels in ``triton_kernels.py``.

Implements the attention backend contract:

* ``forward(q, k, v, block_mask, block_tokens, scale) -> (out, lse)``
* ``backward(dout, q, k, v, out, lse, block_mask, block_tokens, scale) -> (dq, dk, dv)``
* ``SUPPORTED_HEAD_DIMS``, ``SUPPORTED_DTYPES``

Tile sizes are fixed per (head_dim, pass) rather than autotuned: the tile schedule depends on the tile
size, so an autotuner could not swap tiles without rebuilding the schedule, and autotuning under the CPU
interpreter (how CI runs these kernels) would be far too slow. ``forward``/``backward`` accept an explicit
``config`` so tests and benchmarks can try other tiles.

Head dims: powers of two from 16 to 128 (``tl.arange`` needs a power of two; larger head dims would spill
registers with these tiles). Others go to the PyTorch reference through the dispatcher.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from .._backend import triton_interpreting
from . import triton_kernels as _k
from .schedule import get_schedule

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """Tile sizes and launch parameters of the three passes.

    ``fwd_m``/``fwd_n``: query/key tile of the forward; ``dkdv_m``/``dkdv_n``: query/key tile of the dK/dV
    pass (the program owns a key tile of ``dkdv_n``); ``dq_m``/``dq_n``: the same for the dQ pass. Tiles
    are powers of two >= 16.
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
            value = getattr(self, field)
            if value < 16 or value & (value - 1):
                raise ValueError(f"config.{field} must be a power of two >= 16, got {value}")


# H100-oriented defaults, FlashAttention-2 shapes: 128-row query tiles in the forward and the dQ pass,
# 128-row key tiles in the dK/dV pass, with narrow (32) partner tiles in the backward to hold the register
# footprint down. Chosen from ptxas register/spill reports for sm_90a (no spills at head_dim 64; a few
# hundred bytes at 128, where 4 warps or wider tiles spill several times more), not yet from timings.
_GPU_CONFIG_16BIT = AttnConfig()
# fp32 inputs on a GPU are a correctness path (exact fp32 products): smaller tiles keep shared memory and
# registers in bounds.
_GPU_CONFIG_FP32 = AttnConfig(
    fwd_m=64, fwd_n=32, fwd_warps=4, fwd_stages=2,
    dkdv_m=32, dkdv_n=64, dkdv_warps=4, dkdv_stages=2,
    dq_m=64, dq_n=32, dq_warps=4, dq_stages=2,
)
# The interpreter runs each program in Python: fewer, larger tiles are faster there, and warps/stages
# mean nothing. 64-token tiles keep block borders inside tiles common in small tests.
_INTERPRETER_CONFIG = AttnConfig(fwd_m=64, fwd_n=64, dkdv_m=64, dkdv_n=64, dq_m=64, dq_n=64)


def default_config(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> AttnConfig:
    """The tile configuration used on ``device`` for inputs of ``head_dim`` and ``dtype`` when none is
    given (head_dim is accepted for per-head-dim tuning; one configuration serves 16..128 today)."""
    if device.type != "cuda" or triton_interpreting():
        return _INTERPRETER_CONFIG
    return _GPU_CONFIG_FP32 if dtype == torch.float32 else _GPU_CONFIG_16BIT


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products ("ieee"), so fp32 results match an fp32/fp64 reference tightly;
    # TF32 would cost ~1e-3 relative error. For fp16/bf16 the setting has no effect.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_qkv(q, k, v, block_mask, block_tokens, extra=()):
    """Cheap checks of what the kernels rely on (the public API validates more)."""
    for name, t in (("q", q), ("k", k), ("v", v)) + tuple(extra):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or t.shape != q.shape:
            raise ValueError(f"{name} must be [batch, tokens, heads, head_dim] of shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {t.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in head_dim, got strides {t.stride()}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q: the Triton backend supports dtypes {SUPPORTED_DTYPES}, got {q.dtype}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: the Triton backend supports head_dim in {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 2:
        raise TypeError("block_mask must be a bool [n_blocks, n_blocks] tensor")
    n_blocks = block_mask.shape[0]
    if block_mask.shape[1] != n_blocks or n_blocks * int(block_tokens) != q.shape[1]:
        raise ValueError(
            f"block_mask {tuple(block_mask.shape)} and block_tokens {block_tokens} do not match "
            f"{q.shape[1]} tokens"
        )


def _two_blocks(block_tokens: int, tile_a: int, tile_b: int) -> bool:
    """True when no tile can span more than two blocks (blocks at least as long as both tiles): the
    kernels then build element masks from four table entries instead of a per-element gather."""
    return int(block_tokens) >= max(tile_a, tile_b)


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def forward(q, k, v, block_mask, block_tokens, scale, *, config: AttnConfig | None = None):
    """Block-sparse attention forward. Returns ``(out [B, L, H, D] in q.dtype, lse fp32 [B, H, L])``.

    ``lse`` is the natural-log log-sum-exp of the scaled scores of each query row; a row with no allowed
    key gets ``out = 0`` and ``lse = -inf``.
    """
    _check_qkv(q, k, v, block_mask, block_tokens)
    batch, seq, heads, head_dim = q.shape
    cfg = config or default_config(head_dim, q.device, q.dtype)
    out = torch.empty((batch, seq, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    schedule = get_schedule(block_mask, block_tokens, seq, cfg.fwd_m, cfg.fwd_n, q.device)
    sched, table = schedule.by_query, schedule.mask_table
    grid = (sched.num_rows, batch * heads)
    _k.fwd_kernel[grid](
        q, k, v, out, lse, table, sched.indptr, sched.num_full, sched.indices,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        heads, seq, int(block_tokens), table.shape[0], float(scale) * _k.LOG2E_FLOAT,
        HEAD_DIM=head_dim, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, PRECISION=_precision(q.dtype),
        TWO_BLOCKS=_two_blocks(block_tokens, cfg.fwd_m, cfg.fwd_n),
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return out, lse


def backward(dout, q, k, v, out, lse, block_mask, block_tokens, scale, *, config: AttnConfig | None = None):
    """Block-sparse attention backward. Returns ``(dq, dk, dv)`` in the input dtype.

    ``out`` and ``lse`` are the forward's results; rows with ``lse = -inf`` (no allowed key) contribute
    nothing. Three launches: ``delta = rowsum(dout * out)``, then dK/dV per key tile (transposed schedule)
    and dQ per query tile (forward schedule), so no atomics are needed.
    """
    if isinstance(dout, torch.Tensor) and dout.dim() == 4 and dout.stride(-1) != 1:
        dout = dout.contiguous()
    _check_qkv(q, k, v, block_mask, block_tokens, extra=(("dout", dout), ("out", out)))
    batch, seq, heads, head_dim = q.shape
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (batch, heads, seq) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 [batch, heads, tokens] = {(batch, heads, seq)}")
    lse = lse.contiguous()
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    cfg = config or default_config(head_dim, q.device, q.dtype)
    dq = torch.empty((batch, seq, heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if dq.numel() == 0:
        return dq, dk, dv
    dq_schedule = get_schedule(block_mask, block_tokens, seq, cfg.dq_m, cfg.dq_n, q.device)
    table = dq_schedule.mask_table
    nb = table.shape[0]
    precision = _precision(q.dtype)
    qk_scale = float(scale) * _k.LOG2E_FLOAT

    delta = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    pre_m = 64
    _k.bwd_preprocess_kernel[(triton.cdiv(seq, pre_m), batch * heads)](
        out, dout, delta, *_strides(out), *_strides(dout), heads, seq, HEAD_DIM=head_dim, BLOCK_M=pre_m,
    )

    by_key = get_schedule(block_mask, block_tokens, seq, cfg.dkdv_m, cfg.dkdv_n, q.device).by_key
    _k.bwd_dkdv_kernel[(by_key.num_rows, batch * heads)](
        q, k, v, dout, dk, dv, lse, delta, table, by_key.indptr, by_key.num_full, by_key.indices,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
        heads, seq, int(block_tokens), nb, qk_scale, float(scale),
        HEAD_DIM=head_dim, BLOCK_M=cfg.dkdv_m, BLOCK_N=cfg.dkdv_n, PRECISION=precision,
        TWO_BLOCKS=_two_blocks(block_tokens, cfg.dkdv_m, cfg.dkdv_n),
        num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages,
    )

    by_query = dq_schedule.by_query
    _k.bwd_dq_kernel[(by_query.num_rows, batch * heads)](
        q, k, v, dout, dq, lse, delta, table, by_query.indptr, by_query.num_full, by_query.indices,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
        heads, seq, int(block_tokens), nb, qk_scale, float(scale),
        HEAD_DIM=head_dim, BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, PRECISION=precision,
        TWO_BLOCKS=_two_blocks(block_tokens, cfg.dq_m, cfg.dq_n),
        num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
    )
    return dq, dk, dv
