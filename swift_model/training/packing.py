"""Training sequences of Stage II: CSG windows of a clip, noised and packed as inference sees them.

Inference (:func:`swift_model.generation.csg.run_csg`) generates segment ``s`` of a clip by DiT calls on its *window*:
the anchor block (the input image's latent, read from ``z_ref``), up to ``NL`` clean left neighbours (blocks
already generated), the segment's noisy blocks at the step's timestep, up to ``NR`` right neighbours (not yet
generated, so still ``z_ref``); the reference ``z_ref`` of every block rides along in the extra input
channels, and each block keeps its clip index as RoPE frame position.

A training sequence reproduces exactly those calls, for several segments of a clip in one sequence:

- the layout is ``CSGLayout(mode="packed", segments=..., anchor_copies=True)``: each window carries its own
  copy of the anchor and attends only itself, so every window of the sequence sees the same tokens, RoPE
  positions and timesteps as the dense window call of :class:`~swift_model.generation.csg.CSGPlan` (tested to fp32
  rounding). ``shared_anchor=True`` packs one anchor that attends only itself (``anchor_attends="anchor"``),
  which reproduces the inference variant ``CSGPlan(anchor_attends="anchor")`` instead (a departure from
  the paper; it lets inference reuse the anchor's keys and values);
- the state channels hold what inference's buffer holds: the anchor and right neighbours from ``z_ref``,
  the left neighbours clean from the ground truth ``z`` (teacher forcing: at inference they are the blocks
  just generated), and the window's own blocks ``(1 - sigma) z + sigma * eps`` with one ``sigma`` per window;
- noisy tokens carry the timestep ``1000 * sigma``, conditioning tokens 0;
- the flow-matching target of a noisy block is ``eps - z`` (the sampler's ``x0 = x - sigma * v``), and the
  loss reads the prediction of the noisy blocks only.

Everything here is bookkeeping on tensors; :mod:`swift_model.training.trainer` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swift_kernels import CSGLayout
from swift_kernels.attention.layout import ROLE_LEFT, ROLE_OWN

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")


@dataclass(frozen=True)
class TrainingWindows:
    """Which windows of a clip of ``num_blocks`` latent frames a training sequence packs, and how.

    Attributes:
        num_blocks: ``T``, latent frames of the clip (block 0 is the anchor).
        block_tokens: DiT tokens per latent frame.
        segment_blocks: ``M``, noisy blocks per segment.
        neighbors: ``(NL, NR)``.
        segments: the packed segments, in sequence order.
        shared_anchor: one anchor for all windows that attends only itself (else a copy per window).
    """

    num_blocks: int
    block_tokens: int
    segment_blocks: int
    neighbors: tuple[int, int]
    segments: tuple[int, ...]
    shared_anchor: bool = False

    @property
    def layout(self) -> CSGLayout:
        """The packed attention layout of the sequence."""
        return CSGLayout(self.num_blocks, self.block_tokens, self.segment_blocks, self.neighbors, anchor_blocks=1,
                         anchor_attends="anchor" if self.shared_anchor else "all", mode="packed",
                         segments=self.segments, anchor_copies=not self.shared_anchor)


def count_segments(num_blocks: int, segment_blocks: int) -> int:
    """Segments of a clip of ``num_blocks`` latent frames with one anchor block: ``ceil((T - 1) / M)``."""
    return -(-(num_blocks - 1) // segment_blocks)


def choose_segments(num_segments: int, count: int, generator: torch.Generator) -> tuple[int, ...]:
    """``count`` distinct segments drawn uniformly (``count <= 0`` or ``>= num_segments``: all of them), in clip
    order."""
    if count <= 0 or count >= num_segments:
        return tuple(range(num_segments))
    pick = torch.randperm(num_segments, generator=generator)[:count]
    return tuple(sorted(int(s) for s in pick))


def shift_sigma(sigma0: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching timestep shift ``shift * s / (1 + (shift - 1) * s)`` (as the sampler's schedule)."""
    return shift * sigma0 / (1.0 + (shift - 1.0) * sigma0)


def sample_sigmas(shape, generator: torch.Generator, *, sampling: str = "logit_normal", shift: float = 1.0,
                  logit_mean: float = 0.0, logit_std: float = 1.0, low: float = 1e-3, high: float = 1.0) -> torch.Tensor:
    """float32 noise levels ``sigma`` in ``[low, high]`` of ``shape``: ``sigmoid(N(logit_mean, logit_std))``
    (``"logit_normal"``, as in SD3) or ``U(0, 1)`` (``"uniform"``), then shifted by ``shift`` (1: none)."""
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLINGS}, got {sampling!r}")
    if sampling == "logit_normal":
        u = torch.randn(shape, generator=generator) * logit_std + logit_mean
        s0 = torch.sigmoid(u)
    else:
        s0 = torch.rand(shape, generator=generator)
    return shift_sigma(s0, shift).clamp_(low, high).float()


@dataclass
class PackedBatch:
    """One training sequence per sample: what the DiT gets and what its loss compares against.

    Attributes:
        inputs: ``[B, 2C, n, h, w]``: the state channels, then the ``z_ref`` channels, per block of the sequence.
        timesteps: float32 ``[B, n * P]``: ``1000 * sigma`` on the noisy tokens, 0 elsewhere.
        layout: the attention layout (its ``block_ids`` are the RoPE frame positions).
        frame_positions: long ``[n]``: clip index of each block of the sequence.
        noisy: long ``[k]``: the blocks of the sequence that carry noise (and the loss).
        target: ``[B, C, k, h, w]``: the velocity ``eps - z`` of those blocks.
        sigmas: float32 ``[B, num_windows]``.
    """

    inputs: torch.Tensor
    timesteps: torch.Tensor
    layout: CSGLayout
    frame_positions: torch.Tensor
    noisy: torch.Tensor
    target: torch.Tensor
    sigmas: torch.Tensor

    def to(self, device, dtype=None) -> "PackedBatch":
        """The batch on ``device`` (inputs also cast to ``dtype`` when given; timesteps and target stay fp32)."""
        return PackedBatch(self.inputs.to(device, dtype), self.timesteps.to(device), self.layout,
                           self.frame_positions.to(device), self.noisy.to(device), self.target.to(device),
                           self.sigmas.to(device))

    @property
    def num_tokens(self) -> int:
        """Tokens of each sample's sequence."""
        return self.layout.num_tokens


def window_inputs(z: torch.Tensor, z_ref: torch.Tensor, layout: CSGLayout, sigmas: torch.Tensor,
                  noise: torch.Tensor) -> PackedBatch:
    """The model input, timesteps and target of the sequence ``layout`` lays out over a clip.

    Works for every layout that holds one anchor block and whole windows: a dense ``"window"`` layout (the
    inference call; ``sigmas`` ``[B, 1]``) and ``"packed"`` layouts (``sigmas`` ``[B, len(layout.segments)]``,
    one per window in ``layout.segments`` order).

    Args:
        z: ``[B, C, T, h, w]`` the clip's ground-truth Stage II latents.
        z_ref: ``[B, C, T, h, w]`` its reference latents.
        layout: a :class:`~swift_kernels.CSGLayout` of the clip (``num_blocks == T``, one anchor block).
        sigmas: ``[B, W]`` noise level of each window.
        noise: ``[B, C, T, h, w]`` Gaussian noise per clip block (a block is noisy in one window only, so one
            draw per clip block gives every window, packed or alone, the same noise).
    """
    if z.dim() != 5 or z.shape != z_ref.shape or z.shape != noise.shape:
        raise ValueError(f"z, z_ref and noise must be [B, C, T, h, w] of one shape, got {tuple(z.shape)}, "
                         f"{tuple(z_ref.shape)}, {tuple(noise.shape)}")
    B, C, T, h, w = z.shape
    if layout.num_blocks != T or layout.anchor_blocks != 1:
        raise ValueError(f"layout must lay out the clip's {T} latent frames with one anchor block, got {layout!r}")
    if layout.mode == "clip":
        raise ValueError("window_inputs needs a 'window' or 'packed' layout (clip mode has no per-window blocks)")
    segments = layout.segments
    if sigmas.shape != (B, len(segments)):
        raise ValueError(f"sigmas must be [B, {len(segments)}] (one per window), got {tuple(sigmas.shape)}")
    ids = layout.block_ids.to(z.device)
    roles = layout.block_roles.to(z.device)
    window = torch.tensor([segments.index(s) if s >= 0 else -1 for s in layout.block_segments.tolist()],
                          device=z.device)
    sigmas = sigmas.to(device=z.device, dtype=torch.float32)
    noisy = torch.nonzero(roles == ROLE_OWN).flatten()
    # the state: anchors and right neighbours as inference's buffer holds them before the segment runs
    # (z_ref), left neighbours finished (ground truth), own blocks noised to their window's sigma
    zs, refs = z.float().index_select(2, ids), z_ref.float().index_select(2, ids)
    clean = torch.where((roles == ROLE_LEFT)[None, None, :, None, None], zs, refs)
    sig = sigmas.index_select(1, window.clamp(min=0))  # [B, n]; only read on noisy blocks
    s5 = sig[:, None, :, None, None]
    noised = (1.0 - s5) * zs + s5 * noise.float().index_select(2, ids)
    state = torch.where((roles == ROLE_OWN)[None, None, :, None, None], noised, clean)
    per_block = torch.where(roles == ROLE_OWN, sig * 1000.0, torch.zeros_like(sig))
    timesteps = per_block.repeat_interleave(layout.block_tokens, dim=1).contiguous()
    own_ids = ids.index_select(0, noisy)
    target = noise.float().index_select(2, own_ids) - z.float().index_select(2, own_ids)
    return PackedBatch(torch.cat([state, refs], 1).contiguous(), timesteps, layout, ids.clone(), noisy,
                       target.contiguous(), sigmas)


def flow_matching_loss(prediction: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Mean squared error of the predicted velocity on the noisy blocks only (fp32); the conditioning blocks'
    outputs do not enter it (their gradient is exactly zero)."""
    C = batch.target.shape[1]
    pred = prediction[:, :C].index_select(2, batch.noisy).float()
    return (pred - batch.target).square().mean()


def window_spans(layout: CSGLayout) -> list[tuple[int, int, int]]:
    """``(segment, first, last)``: the blocks ``[first, last)`` of the sequence of each packed window (with a
    shared anchor, the window's own blocks only; with anchor copies, its copy included)."""
    segs = layout.block_segments.tolist()
    spans = []
    i = 0
    while i < len(segs):
        j = i
        while j < len(segs) and segs[j] == segs[i]:
            j += 1
        if segs[i] >= 0:
            spans.append((segs[i], i, j))
        i = j
    return spans
