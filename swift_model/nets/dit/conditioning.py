"""The DiT's conditioning: the embedders, the timestep modulation, and the host-known per-frame timesteps.

- the embedders of the timestep, the text and the CLIP image tokens (``condition_embedder.*``);
- :func:`sinusoidal_embedding`, Wan's timestep embedding;
- :class:`Modulation`: the timestep-dependent AdaLN modulation in the layout the fused ops read;
- :class:`FrameTimesteps`: one timestep per latent frame as Python floats, so the modulation is built without
  reading device data (no ``torch.unique``, no device-to-host copy);
- :class:`DeviceFrameTimesteps`: per-frame timesteps whose structure (which frames share a value) is known on
  the host and whose values live in a device tensor: a CUDA graph's static input, refilled on the device per step;
- :func:`timestep_modulation`: a call's ``timestep`` argument (tensor, number or one of the two above) turned into
  its :class:`Modulation`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import WanDiTConfig
from .layers import _FeedForward, _LayerNorm

# The largest finite float32: a timestep beyond it would round to infinity.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class _TimeEmbedder(nn.Module):
    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)


class _TextEmbedder(nn.Module):
    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class _ImageEmbedder(nn.Module):
    def __init__(self, image_dim: int, dim: int) -> None:
        super().__init__()
        self.norm1 = _LayerNorm(image_dim)
        self.ff = _FeedForward(image_dim, image_dim, dim_out=dim, approximate="none")
        self.norm2 = _LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.ff(self.norm1(x)))


class _ConditionEmbedder(nn.Module):
    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        self.time_embedder = _TimeEmbedder(cfg.freq_dim, cfg.dim)
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_embedder = _TextEmbedder(cfg.text_dim, cfg.dim)
        self.image_embedder = _ImageEmbedder(cfg.image_dim, cfg.dim) if cfg.image_dim is not None else None
        self.freq_dim, self.dim = cfg.freq_dim, cfg.dim

    def time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(temb [N, dim], e [N, 6, dim])`` of the timesteps ``t [N]``, in fp32."""
        s = sinusoidal_embedding(t, self.freq_dim)
        temb = _linear32(self.time_embedder.linear_2, F.silu(_linear32(self.time_embedder.linear_1, s)))
        e = _linear32(self.time_proj, F.silu(temb)).unflatten(1, (6, self.dim))
        return temb, e



def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding ``[cos(t*w), sin(t*w)]``, ``w_i = 10000^(-i/(dim/2))``, computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = t.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat((torch.cos(ang), torch.sin(ang)), dim=1).float()


def _linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight.float(), None if layer.bias is None else layer.bias.float())


class Modulation:
    """Timestep-dependent modulation in the layout the fused ops read.

    ``e`` is the projected embedding ``[K, 6, dim]`` of the K distinct timestep values (per token) or
    ``[B, 6, dim]`` (per sample); ``temb`` ``[K or B, dim]``; ``inv`` ``[B, L]`` maps tokens to values.

    Three layouts: per sample (``inv is None``: ``[B, 1, dim]`` vectors); per token *indexed* (the default
    for per-token timesteps: ``[K, dim]`` tables plus :attr:`index`, passed to the ops as ``mod_index``,
    so a block reads K rows and one index per token instead of six ``[B, L, dim]`` fp32 tensors); per token
    *expanded* (``indexed=False``: ``[B, L, dim]`` gathers, the reference layout the tests compare with).
    """

    def __init__(self, temb: torch.Tensor, e: torch.Tensor, inv: torch.Tensor | None, indexed: bool = True) -> None:
        self.temb, self.e, self.inv = temb, e, inv
        self.indexed = inv is not None and indexed
        # int32 halves the index bytes the kernels read; the index is [B, L], converted once per forward
        self.index = inv.to(torch.int32) if self.indexed else None
        self.batch = inv.shape[0] if inv is not None else e.shape[0]

    def _layout(self, m: torch.Tensor) -> torch.Tensor:
        # m: [K or B, dim] -> [B, 1, dim] (per sample), [K, dim] (indexed table) or [B, L, dim] (expanded)
        if self.inv is None:
            return m[:, None, :]
        return m if self.indexed else m[self.inv]

    def get(self, table: torch.Tensor, j: int) -> torch.Tensor:
        """``table[0, j] + e[:, j]`` laid out for the fused ops (fp32)."""
        return self._layout(table[0, j].float() + self.e[:, j])

    def shard(self, start: int, end: int) -> "Modulation":
        """The modulation of tokens ``start:end`` only (a sequence-parallel rank's shard): the per-token
        index is sliced, the tables (of every distinct timestep of the whole sequence) are shared."""
        if self.inv is None:
            return self
        return Modulation(self.temb, self.e, self.inv[:, start:end].contiguous(), indexed=self.indexed)

    def head(self, table: torch.Tensor, j: int) -> torch.Tensor:
        """The head's shift (j=0) / scale (j=1): ``table[0, j] + temb``."""
        return self._layout(table[0, j].float() + self.temb)

    def const(self, v: torch.Tensor) -> torch.Tensor:
        """A timestep-independent vector ``v [dim]`` in the layout of :meth:`get` (a stride-0 view, no copy):
        in one fused call every modulation input must share the layout (tables of the same K)."""
        v = v.float()
        if self.indexed:
            return v.expand(self.e.shape[0], v.shape[0])
        return v.expand(self.batch, 1, v.shape[0])


@dataclass(frozen=True)
class FrameTimesteps:
    """One diffusion timestep per latent frame of a call's sequence, known on the host.

    ``WanDiT.forward(latents, FrameTimesteps(values), ...)`` is the per-token timestep ``[B, F*P]`` in which every
    token of latent frame ``f`` carries ``values[f]`` (the same for every sample of the batch), e.g.
    ``FrameTimesteps((0.0, 937.5, 937.5))`` for a CSG window of a clean anchor and two noisy blocks. The forward
    gives the same bits as with that tensor, but builds its modulation from these Python numbers: the distinct
    values and each frame's row are found on the host, so no device data is read (no ``torch.unique``, no
    synchronisation on a GPU) and the call can run on fake tensors.

    Attributes:
        values: one timestep per latent frame (frames after patching), Python floats; ints and NumPy numbers are
            converted. Each must be finite in float32.
    """

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        values = self.values
        if isinstance(values, (str, bytes, torch.Tensor)) or not hasattr(values, "__iter__"):
            raise TypeError(f"FrameTimesteps takes a sequence of numbers (one per latent frame), "
                            f"got {type(values).__name__}")
        floats = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"FrameTimesteps holds numbers, got {type(v).__name__}")
            v = float(v)
            if not (math.isfinite(v) and abs(v) <= _FLOAT32_MAX):
                raise ValueError(f"FrameTimesteps values must be finite in float32, got {v}")
            floats.append(v)
        if not floats:
            raise ValueError("FrameTimesteps needs one value per latent frame, got none")
        object.__setattr__(self, "values", tuple(floats))

    @classmethod
    def zeros(cls, frames: int) -> "FrameTimesteps":
        """Timestep 0 on ``frames`` latent frames (clean frames: an anchor)."""
        return cls((0.0,) * frames)

    def __len__(self) -> int:
        return len(self.values)

    def distinct(self) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """``(values, rows)``: the distinct timesteps in ascending order and, for each frame, the row of its value.

        Each value is rounded to float32 first, so values equal in float32 are one value, as ``torch.unique`` of
        the float32 per-token tensor has them (-0.0 is 0.0).
        """
        rounded = [float(np.float32(v)) + 0.0 for v in self.values]
        values = tuple(sorted(set(rounded)))
        row = {v: i for i, v in enumerate(values)}
        return values, tuple(row[v] for v in rounded)

    def token_timesteps(self, block_tokens: int, batch: int = 1, device=None) -> torch.Tensor:
        """float32 ``[batch, frames * block_tokens]``: each frame's timestep on its ``block_tokens`` tokens, the
        per-token tensor form of these timesteps (what ``forward`` takes when the values are not known on the
        host)."""
        per_frame = torch.tensor(self.values, dtype=torch.float32, device=device)
        return per_frame.repeat_interleave(block_tokens)[None, :].expand(batch, -1).contiguous()


@dataclass(frozen=True, eq=False)
class DeviceFrameTimesteps:
    """Per-frame timesteps with the structure of ``frames`` and their distinct values read from a device tensor.

    ``frames`` (host) says how many latent frames there are, which frames share a value (its
    :meth:`FrameTimesteps.distinct` rows) and what the host checks see (e.g. a clean anchor at 0); ``values`` is a
    float32 ``[K]`` tensor on the call's device holding the K distinct values in the order of those rows. The
    modulation reads ``values`` on the device, so a call captured in a CUDA graph can be replayed with another
    step's timesteps copied into ``values`` (a device-to-device copy, no host round trip). The caller keeps
    ``values`` consistent with the structure: its row ``i`` is the value of every frame of row ``i``.
    """

    frames: FrameTimesteps
    values: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.frames, FrameTimesteps):
            raise TypeError(f"DeviceFrameTimesteps.frames must be a FrameTimesteps, got {type(self.frames).__name__}")
        distinct = len(self.frames.distinct()[0])
        v = self.values
        if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or tuple(v.shape) != (distinct,):
            raise ValueError(f"DeviceFrameTimesteps.values must be a float32 tensor [{distinct}] (one per distinct "
                             f"timestep of frames), got {getattr(v, 'dtype', type(v).__name__)} "
                             f"{tuple(getattr(v, 'shape', ()))}")

    def __len__(self) -> int:
        return len(self.frames)


TimeEmbedding = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def timestep_modulation(timestep, batch: int, frames: int, block_tokens: int, device, time: TimeEmbedding,
                        indexed: bool = True, host_cache: dict | None = None) -> Modulation:
    """The :class:`Modulation` of a call's ``timestep`` (see ``WanDiT.forward``).

    Args:
        timestep: a number, a tensor ``[B]`` (per sample), ``[B, L]`` (per token) or ``[B, F]`` (per latent
            frame), or a :class:`FrameTimesteps` (per frame, known on the host).
        batch, frames, block_tokens: ``B``, latent frames ``F`` and tokens per frame ``P`` (``L = F * P``).
        device: where the modulation lives.
        time: the timestep embedding ``t [N] -> (temb [N, dim], e [N, 6, dim])`` (``WanDiT._time``).
        indexed: per-token timesteps as ``[K, dim]`` tables plus a row index (True) or expanded per token.
        host_cache: where the device copies of host-known inputs (the distinct values, the row index) are kept
            between calls, keyed by those host values: a call whose inputs were seen before (or prepared ahead,
            ``WanDiT.prepare_call``) copies nothing from the host. ``None``: copied on every call.

    Per-token timesteps take few distinct values (0 on conditioning tokens, the step's t elsewhere): each value is
    embedded once. With a tensor the values are found by ``torch.unique`` (reading the tensor); with
    :class:`FrameTimesteps` on the host; with :class:`DeviceFrameTimesteps` the structure on the host and the
    values on the device. One value everywhere takes the cheaper per-sample layout.
    """
    if isinstance(timestep, (FrameTimesteps, DeviceFrameTimesteps)):
        return _frame_modulation(timestep, batch, frames, block_tokens, device, time, indexed, host_cache)
    L = frames * block_tokens
    try:
        t = torch.as_tensor(timestep, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}") from exc
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"timestep must be a float or integer tensor, got {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.dim() == 1:
        if t.shape[0] == 1:
            t = t.expand(batch)
        if t.shape[0] != batch:
            raise ValueError(f"timestep [B] must have B={batch} entries, got {tuple(t.shape)}")
        temb, e = time(t)
        return Modulation(temb, e, None)
    if t.dim() != 2 or t.shape[0] not in (1, batch) or t.shape[1] not in (L, frames):
        raise ValueError(f"timestep must be [B], [B, L] (L={L} tokens) or [B, F] (F={frames} frames), "
                         f"got {tuple(t.shape)}")
    if t.shape[1] != L:  # per frame -> per token
        t = t[:, :, None].expand(t.shape[0], frames, block_tokens).reshape(t.shape[0], L)
    t = t.expand(batch, L)
    uniq, inv = torch.unique(t, return_inverse=True)
    temb, e = time(uniq)
    if uniq.numel() == 1:
        return Modulation(temb.expand(batch, -1), e.expand(batch, -1, -1), None)
    return Modulation(temb, e, inv, indexed=indexed)


def _frame_modulation(timestep, batch: int, frames: int, block_tokens: int, device, time: TimeEmbedding,
                      indexed: bool, host_cache: dict | None) -> Modulation:
    """:func:`timestep_modulation` of per-frame timesteps with a host-known structure: the same numbers as the
    per-token tensor :meth:`FrameTimesteps.token_timesteps`, without reading any device data."""
    if len(timestep) != frames:
        raise ValueError(f"timestep ({type(timestep).__name__}) has {len(timestep)} values, the latents have "
                         f"{frames} latent frames (one value per frame)")
    if isinstance(timestep, DeviceFrameTimesteps):
        if timestep.values.device != torch.device(device):
            raise ValueError(f"DeviceFrameTimesteps.values live on {timestep.values.device}, the model on {device}")
        values, index = timestep.values, frame_timestep_tensors(timestep.frames, batch, block_tokens, device,
                                                                host_cache)[1]
    else:
        values, index = frame_timestep_tensors(timestep, batch, block_tokens, device, host_cache)
    temb, e = time(values)
    if index is None:
        return Modulation(temb.expand(batch, -1), e.expand(batch, -1, -1), None)
    return Modulation(temb, e, index, indexed=indexed)


def frame_timestep_tensors(timestep: FrameTimesteps, batch: int, block_tokens: int, device,
                           host_cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The device tensors a call with host-known per-frame timesteps reads: the distinct values (float32 ``[K]``)
    and each token's row among them (int64 ``[batch, frames * block_tokens]``; ``None`` when ``K == 1``).

    Both are copies of host numbers (a host-to-device copy each, which waits for the device); with ``host_cache``
    they are made once per distinct input and reused, so calls in a loop copy nothing once prepared.
    """
    values, rows = timestep.distinct()
    key = ("frame_timesteps", values, rows, batch, block_tokens, str(device))
    if host_cache is not None and key in host_cache:
        return host_cache[key]
    t = torch.tensor(values, dtype=torch.float32, device=device)
    index = None
    if len(values) > 1:
        # each frame's row over the frame's tokens, from the F rows copied to the device
        frame_rows = torch.tensor(rows, dtype=torch.int64, device=device)
        inv = frame_rows[:, None].expand(len(rows), block_tokens).reshape(1, len(rows) * block_tokens)
        index = inv.expand(batch, -1).contiguous()
    if host_cache is not None:
        if len(host_cache) > 256:  # bounded: a long-lived model sees many schedules
            host_cache.clear()
        host_cache[key] = (t, index)
    return t, index
