"""Wan's 3D rotary position table.

A token at patch position (f, h, w) of a grid of ``F x Hh x Ww`` patches (tokens ordered f, h, w
row-major) rotates the pairs (2i, 2i+1) of each head. The head dim ``d`` is split over time, height and
width into parts of ``d - 4*(d//6)``, ``2*(d//6)`` and ``2*(d//6)`` dims (44/42/42 for d = 128, as in
Wan); a part of ``n`` dims has ``n/2`` pairs with angles ``pos * theta ** (-2j/n)``, j = 0..n/2-1. The
table is computed in float64 and stored as float32 (cos, sin).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch


def _as_int(value, name: str) -> int:
    """``value`` as an int (NumPy and other integer types too); bools, floats, strings raise TypeError."""
    if isinstance(value, (bool, torch.Tensor)):
        raise TypeError(f"{name} must hold ints, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must hold ints, got {type(value).__name__}") from None


def _host_values(values) -> list[float]:
    """The numbers of a (possibly nested) Python sequence or NumPy array, flattened, as floats."""
    if hasattr(values, "tolist"):  # NumPy arrays and scalars
        values = values.tolist()
    if not isinstance(values, Sequence):
        return [float(values)]
    return [v for item in values for v in _host_values(item)]


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Dims of the (t, h, w) parts of a head of ``head_dim`` dims."""
    part = 2 * (head_dim // 6)
    return head_dim - 2 * part, part, part


def _angles(pos: torch.Tensor, n: int, theta: float) -> torch.Tensor:
    # [len(pos), n/2] angles in float64
    inv = 1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64), torch.arange(0, n, 2, dtype=torch.float64) / n)
    return pos.to(torch.float64)[:, None] * inv[None, :]


def rope_table(
    grid: Sequence[int],
    head_dim: int,
    *,
    frame_positions: Sequence[float] | torch.Tensor | None = None,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The (cos, sin) RoPE table of a ``grid = (F, Hh, Ww)`` of patches: float32 ``[F*Hh*Ww, head_dim//2, 2]``.

    Args:
        grid: three positive ints, the patch grid (frames, height, width); tokens are ordered f, h, w.
        head_dim: the (even, ``>= 6``) head dim the table rotates.
        frame_positions: the temporal position of each of the F frames (finite numbers); default ``0..F-1``.
            CSG windows pass the clip positions of their blocks (e.g. anchor 0, then 5, 6, 7, 8), so a
            window sees the same relative positions as the whole clip would. A Python sequence is checked on
            the host (the table can then be built under a ``FakeTensorMode``); a tensor is read for the
            check (a synchronisation when it lives on a GPU).
        theta: the RoPE base (default 10000, as Wan).
        device: where to put the table (default: the CPU).

    Returns the float32 table on ``device``; pairs of a head are (2i, 2i+1), ``[..., 0]`` is cos.
    """
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) and not isinstance(grid, torch.Size):
        raise TypeError(f"grid must be a sequence (frames, height, width) of ints, got {type(grid).__name__}")
    if len(grid) != 3:
        raise ValueError(f"grid must be (frames, height, width) in patches, got {tuple(grid)}")
    F, Hh, Ww = (_as_int(g, "grid") for g in grid)
    if min(F, Hh, Ww) < 1:
        raise ValueError(f"grid sizes must be positive, got {tuple(grid)}")
    head_dim = _as_int(head_dim, "head_dim")
    if head_dim < 6 or head_dim % 2:
        raise ValueError(f"head_dim must be an even int >= 6, got {head_dim!r}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise TypeError(f"theta must be a float, got {type(theta).__name__}")
    if not 0 < theta < math.inf:
        raise ValueError(f"theta must be positive and finite, got {theta}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must name a torch device, got {device!r}") from exc
    if frame_positions is None:
        tpos = torch.arange(F, dtype=torch.float64)
    else:
        try:
            tpos = torch.as_tensor(frame_positions, dtype=torch.float64).flatten().cpu()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"frame_positions must be numbers (one per frame), got {frame_positions!r}") from exc
        if tpos.numel() != F:
            raise ValueError(f"frame_positions must have {F} entries (one per frame), got {tpos.numel()}")
        if isinstance(frame_positions, torch.Tensor):  # reads the tensor (a synchronisation for a GPU tensor)
            if not torch.isfinite(tpos).all():
                raise ValueError(f"frame_positions must be finite, got {tpos.tolist()}")
        else:  # checked on the host: no tensor is read, so the table can be built on fake tensors too
            values = _host_values(frame_positions)
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"frame_positions must be finite, got {values}")
    nt, nh, nw = rope_split(head_dim)
    at = _angles(tpos, nt, theta)  # [F, nt/2]
    ah = _angles(torch.arange(Hh), nh, theta)  # [Hh, nh/2]
    aw = _angles(torch.arange(Ww), nw, theta)  # [Ww, nw/2]
    ang = torch.cat(
        (
            at[:, None, None, :].expand(F, Hh, Ww, -1),
            ah[None, :, None, :].expand(F, Hh, Ww, -1),
            aw[None, None, :, :].expand(F, Hh, Ww, -1),
        ),
        dim=-1,
    ).reshape(F * Hh * Ww, head_dim // 2)
    table = torch.stack((torch.cos(ang), torch.sin(ang)), dim=-1).to(torch.float32)
    return table.to(device) if device is not None else table
