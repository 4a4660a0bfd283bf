"""Block layouts of Conditional Segment-wise Generation (CSG) attention.

A clip has ``T = num_blocks`` blocks (latent frames) of ``block_tokens`` tokens each. Blocks ``[0, A)``
are the *anchors* (``A = anchor_blocks``: the clean input image). The other blocks ``[A, T)`` are split
into *segments* of ``M = segment_blocks`` blocks: segment ``s`` covers ``[A + s*M, min(A + (s+1)*M, T))``
(the last one may be shorter). The *window* of segment ``s`` is its own blocks plus up to ``NL`` blocks
before and ``NR`` blocks after it, clipped to ``[A, T)``::

    window(s) = [max(A, start_s - NL), min(T, end_s + NR))

:class:`CSGLayout` turns these rules into the sequence of blocks that the attention sees and the boolean
``block_mask[i, j]`` (query block ``i`` may attend key block ``j``) for three modes:

``"clip"``
    The sequence is the clip's ``T`` blocks once each (all segments denoised jointly). A query block of
    segment ``s`` attends the anchors and ``window(s)``. An anchor query block attends every block
    (``anchor_attends="all"``) or only the anchors (``"anchor"``).
``"window"``
    One segment (``segment=s``): the sequence is the anchors followed by ``window(s)`` in clip order, and
    the mask is dense (all True). This is the paper's inference call.
``"packed"``
    The anchors followed by every segment's window, one after another (so a clip block may appear in
    several windows). A block of window ``s`` attends the anchors and the blocks of window ``s``; anchors
    attend as ``anchor_attends`` says (``"all"``: every block of the sequence). ``segments=(s, ...)`` packs
    only those segments' windows, in that order. With ``anchor_copies=True`` there is no shared anchor: each
    window carries its own copy of the anchors, ``[anchors, window(s)]`` per window, and nothing attends
    across windows, so each window of the sequence sees exactly what the dense ``"window"`` call of its
    segment sees (the training layout that reproduces inference). A shared anchor with
    ``anchor_attends="anchor"`` reproduces ``mode="packed", segments=(s,), anchor_attends="anchor"`` for
    each window (an anchor that never reads the windows), not the dense window.

When ``A == T`` there are no segments: ``"clip"`` and ``"packed"`` then lay out the anchors alone (a
dense anchor-only mask), and ``"window"`` raises because there is no segment to pick.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from .schedule import ordered, tile_tables

MODES = ("clip", "window", "packed")
ANCHOR_ATTENDS = ("all", "anchor")

# Roles of the blocks of the sequence (see CSGLayout.block_roles).
ROLE_ANCHOR = 0
ROLE_LEFT = 1
ROLE_OWN = 2
ROLE_RIGHT = 3


def _as_int(value: Any, name: str) -> int:
    """``value`` as a Python int; bools, floats and other non-integers raise TypeError naming ``name``."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


class CSGLayout:
    """The attention layout of one CSG call: which blocks the sequence holds and who attends whom.

    Args:
        num_blocks: ``T``, blocks (latent frames) in the clip, ``>= 1``.
        block_tokens: tokens per block, ``>= 1``.
        segment_blocks: ``M``, blocks per segment, ``>= 1``.
        neighbors: ``(NL, NR)``, the clean neighbour blocks a segment sees before and after itself
            (each ``>= 0``; windows are clipped to ``[A, T)``, so values past either end are allowed).
        anchor_blocks: ``A``, leading anchor blocks, ``0 <= A <= T``.
        anchor_attends: ``"all"`` (anchor queries attend every block) or ``"anchor"`` (only anchors).
            Unused in ``"window"`` mode, whose mask is dense.
        mode: ``"clip"``, ``"window"`` or ``"packed"`` (see the module docstring).
        segment: the segment index, required in ``"window"`` mode (``0 <= segment < num_segments``)
            and rejected in the other modes.
        segments: ``"packed"`` mode only: the segments whose windows the sequence packs, in sequence order
            (distinct, each in ``[0, num_segments)``, at least one); default every segment in order.
        anchor_copies: ``"packed"`` mode only: each window carries its own copy of the anchor blocks instead
            of sharing one anchor at the front (see the module docstring).

    The object is immutable and hashable (equal parameters give equal, same-hash layouts). Tensor
    properties return fresh CPU tensors, so mutating one does not change the layout.
    """

    __slots__ = (
        "_num_blocks",
        "_block_tokens",
        "_segment_blocks",
        "_neighbors",
        "_anchor_blocks",
        "_anchor_attends",
        "_mode",
        "_segment",
        "_segments",
        "_anchor_copies",
        "_mask",
        "_ids",
        "_seg",
        "_roles",
    )

    def __init__(
        self,
        num_blocks: int,
        block_tokens: int,
        segment_blocks: int,
        neighbors: tuple[int, int] = (1, 0),
        anchor_blocks: int = 1,
        anchor_attends: str = "all",
        mode: str = "clip",
        segment: int | None = None,
        segments=None,
        anchor_copies: bool = False,
    ) -> None:
        T = _as_int(num_blocks, "num_blocks")
        P = _as_int(block_tokens, "block_tokens")
        M = _as_int(segment_blocks, "segment_blocks")
        A = _as_int(anchor_blocks, "anchor_blocks")
        if T < 1:
            raise ValueError(f"num_blocks must be >= 1, got {T}")
        if P < 1:
            raise ValueError(f"block_tokens must be >= 1, got {P}")
        if M < 1:
            raise ValueError(f"segment_blocks must be >= 1, got {M}")
        if A < 0:
            raise ValueError(f"anchor_blocks must be >= 0, got {A}")
        if A > T:
            raise ValueError(f"anchor_blocks must be <= num_blocks ({T}), got {A}")
        if isinstance(neighbors, (str, bytes)) or not hasattr(neighbors, "__len__") or not hasattr(neighbors, "__iter__"):
            raise TypeError(f"neighbors must be a pair (left, right) of ints, got {type(neighbors).__name__}")
        if len(neighbors) != 2:
            raise ValueError(f"neighbors must be a pair (left, right), got {len(neighbors)} values")
        NL = _as_int(neighbors[0], "neighbors[0] (left)")
        NR = _as_int(neighbors[1], "neighbors[1] (right)")
        if NL < 0 or NR < 0:
            raise ValueError(f"neighbors must be >= 0, got ({NL}, {NR})")
        if not isinstance(anchor_attends, str):
            raise TypeError(f"anchor_attends must be a str, got {type(anchor_attends).__name__}")
        if anchor_attends not in ANCHOR_ATTENDS:
            raise ValueError(f"anchor_attends must be one of {ANCHOR_ATTENDS}, got {anchor_attends!r}")
        if not isinstance(mode, str):
            raise TypeError(f"mode must be a str, got {type(mode).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        num_segments = -(-(T - A) // M)
        if mode == "window":
            if segment is None:
                raise ValueError("segment is required with mode='window'")
            seg = _as_int(segment, "segment")
            if not 0 <= seg < num_segments:
                raise ValueError(f"segment must be in [0, {num_segments}) for this layout, got {seg}")
        else:
            if segment is not None:
                raise ValueError(f"segment is only used with mode='window', got segment={segment!r} with mode={mode!r}")
            seg = None
        if not isinstance(anchor_copies, bool):
            raise TypeError(f"anchor_copies must be a bool, got {type(anchor_copies).__name__}")
        if mode != "packed" and (segments is not None or anchor_copies):
            raise ValueError(f"segments and anchor_copies are only used with mode='packed', got mode={mode!r}")
        if segments is not None:
            if isinstance(segments, (str, bytes)) or not hasattr(segments, "__iter__"):
                raise TypeError(f"segments must be a sequence of ints, got {type(segments).__name__}")
            segments = tuple(_as_int(v, "segments[]") for v in segments)
            if not segments:
                raise ValueError("segments must name at least one segment")
            if len(set(segments)) != len(segments):
                raise ValueError(f"segments must be distinct, got {segments}")
            bad = [v for v in segments if not 0 <= v < num_segments]
            if bad:
                raise ValueError(f"segments must be in [0, {num_segments}) for this layout, got {bad}")
            if segments == tuple(range(num_segments)):
                segments = None  # the default, spelled out: one layout, one key

        set_ = object.__setattr__
        set_(self, "_num_blocks", T)
        set_(self, "_block_tokens", P)
        set_(self, "_segment_blocks", M)
        set_(self, "_neighbors", (NL, NR))
        set_(self, "_anchor_blocks", A)
        set_(self, "_anchor_attends", anchor_attends)
        set_(self, "_mode", mode)
        set_(self, "_segment", seg)
        set_(self, "_segments", segments)
        set_(self, "_anchor_copies", anchor_copies)
        mask, ids, segs, roles = self._build()
        set_(self, "_mask", mask)
        set_(self, "_ids", ids)
        set_(self, "_seg", segs)
        set_(self, "_roles", roles)

    # -- immutability -------------------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("CSGLayout is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("CSGLayout is immutable")

    def _key(self) -> tuple:
        return (
            self._num_blocks,
            self._block_tokens,
            self._segment_blocks,
            self._neighbors,
            self._anchor_blocks,
            self._anchor_attends,
            self._mode,
            self._segment,
            self._segments,
            self._anchor_copies,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CSGLayout):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(("CSGLayout",) + self._key())

    def __reduce__(self):
        # Pickle by parameters (the tensors are rebuilt), which also keeps copies immutable.
        T, P, M, nb, A, aa, mode, seg, segs, copies = self._key()
        return (CSGLayout, (T, P, M, nb, A, aa, mode, seg, segs, copies))

    def __repr__(self) -> str:
        seg = f", segment={self._segment}" if self._segment is not None else ""
        if self._segments is not None:
            seg += f", segments={self._segments}"
        if self._anchor_copies:
            seg += ", anchor_copies=True"
        return (
            f"CSGLayout(num_blocks={self._num_blocks}, block_tokens={self._block_tokens}, "
            f"segment_blocks={self._segment_blocks}, neighbors={self._neighbors}, "
            f"anchor_blocks={self._anchor_blocks}, anchor_attends={self._anchor_attends!r}, "
            f"mode={self._mode!r}{seg})"
        )

    # -- parameters ---------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """``T``: blocks in the clip (not in the sequence; see :attr:`num_seq_blocks`)."""
        return self._num_blocks

    @property
    def block_tokens(self) -> int:
        """Tokens per block."""
        return self._block_tokens

    @property
    def segment_blocks(self) -> int:
        """``M``: blocks per segment (the last segment may be shorter)."""
        return self._segment_blocks

    @property
    def neighbors(self) -> tuple[int, int]:
        """``(NL, NR)``: neighbour blocks before and after each segment."""
        return self._neighbors

    @property
    def anchor_blocks(self) -> int:
        """``A``: the leading anchor blocks ``[0, A)``."""
        return self._anchor_blocks

    @property
    def anchor_attends(self) -> str:
        """``"all"`` or ``"anchor"``: what anchor query blocks attend."""
        return self._anchor_attends

    @property
    def mode(self) -> str:
        """``"clip"``, ``"window"`` or ``"packed"``."""
        return self._mode

    @property
    def segment(self) -> int | None:
        """The segment of a ``"window"`` layout (``None`` in the other modes)."""
        return self._segment

    @property
    def segments(self) -> tuple[int, ...]:
        """The segments whose windows the sequence holds, in sequence order (every segment in ``"clip"`` and
        ``"packed"`` mode unless ``segments=`` chose some; the one segment in ``"window"`` mode)."""
        if self._mode == "window":
            return (self._segment,)
        return self._segments if self._segments is not None else tuple(range(self.num_segments))

    @property
    def anchor_copies(self) -> bool:
        """Whether each packed window carries its own copy of the anchors (``"packed"`` mode only)."""
        return self._anchor_copies

    # -- segments of the clip -----------------------------------------------------------------------

    @property
    def num_segments(self) -> int:
        """Segments of the clip: ``ceil((T - A) / M)`` (0 when ``A == T``)."""
        return -(-(self._num_blocks - self._anchor_blocks) // self._segment_blocks)

    def _check_segment(self, s: Any) -> int:
        s = _as_int(s, "s")
        if not 0 <= s < self.num_segments:
            raise ValueError(f"s must be in [0, {self.num_segments}), got {s}")
        return s

    def segment_range(self, s: int) -> tuple[int, int]:
        """Clip blocks ``[start, end)`` of segment ``s``'s own (noisy) blocks."""
        s = self._check_segment(s)
        A, M, T = self._anchor_blocks, self._segment_blocks, self._num_blocks
        return A + s * M, min(A + (s + 1) * M, T)

    def window_range(self, s: int) -> tuple[int, int]:
        """Clip blocks ``[lo, hi)`` of segment ``s``'s window, anchors excluded (neighbours included)."""
        start, end = self.segment_range(s)
        NL, NR = self._neighbors
        return max(self._anchor_blocks, start - NL), min(self._num_blocks, end + NR)

    def window_blocks(self, s: int) -> list[int]:
        """Clip block indices of segment ``s``'s window in clip order: left neighbours, own blocks, right
        neighbours. The anchors are *not* included (every window also sees ``range(anchor_blocks)``)."""
        lo, hi = self.window_range(s)
        return list(range(lo, hi))

    # -- the sequence -------------------------------------------------------------------------------

    def _build(self):
        """(block_mask, block_ids, block_segments, block_roles) of the sequence this mode lays out."""
        T, A = self._num_blocks, self._anchor_blocks
        anchors_only = self._anchor_attends == "anchor"
        ids: list[int] = list(range(A))
        segs: list[int] = [-1] * A
        roles: list[int] = [ROLE_ANCHOR] * A

        def window_parts(s: int):
            start, end = self.segment_range(s)
            lo, hi = self.window_range(s)
            for b in range(lo, hi):
                role = ROLE_LEFT if b < start else (ROLE_OWN if b < end else ROLE_RIGHT)
                yield b, role

        if self._mode == "clip":
            for s in range(self.num_segments):
                start, end = self.segment_range(s)
                ids.extend(range(start, end))
                segs.extend([s] * (end - start))
                roles.extend([ROLE_OWN] * (end - start))
            mask = torch.zeros(T, T, dtype=torch.bool)
            mask[:A, :] = True
            if anchors_only:
                mask[:A, A:] = False
            for s in range(self.num_segments):
                start, end = self.segment_range(s)
                lo, hi = self.window_range(s)
                mask[start:end, :A] = True
                mask[start:end, lo:hi] = True
        elif self._mode == "window":
            s = self._segment
            for b, role in window_parts(s):
                ids.append(b)
                segs.append(s)
                roles.append(role)
            n = len(ids)
            mask = torch.ones(n, n, dtype=torch.bool)
        else:  # packed
            spans = []
            # no shared anchor: each window starts with its own copy (with no segment, the anchors alone)
            copies = self._anchor_copies and self.num_segments > 0
            if copies:
                ids, segs, roles = [], [], []
            for s in self.segments:
                first = len(ids)
                if copies:
                    ids.extend(range(A))
                    segs.extend([s] * A)
                    roles.extend([ROLE_ANCHOR] * A)
                for b, role in window_parts(s):
                    ids.append(b)
                    segs.append(s)
                    roles.append(role)
                spans.append((first, len(ids)))
            n = len(ids)
            mask = torch.zeros(n, n, dtype=torch.bool)
            if copies:
                # block diagonal: each window is the dense window call of its segment (anchor rows as
                # anchor_attends says, within the window)
                for first, last in spans:
                    mask[first:last, first:last] = True
                    if anchors_only:
                        mask[first:first + A, first + A:last] = False
            else:
                mask[:A, :] = True
                if anchors_only:
                    mask[:A, A:] = False
                for first, last in spans:
                    mask[first:last, :A] = True
                    mask[first:last, first:last] = True
        return (
            mask,
            torch.tensor(ids, dtype=torch.long),
            torch.tensor(segs, dtype=torch.long),
            torch.tensor(roles, dtype=torch.long),
        )

    @property
    def num_seq_blocks(self) -> int:
        """Blocks in the sequence this mode lays out (``T`` in ``"clip"`` mode)."""
        return int(self._ids.numel())

    @property
    def num_tokens(self) -> int:
        """Tokens in the sequence: ``num_seq_blocks * block_tokens``."""
        return self.num_seq_blocks * self._block_tokens

    @property
    def block_mask(self) -> torch.Tensor:
        """bool ``[n, n]`` on the CPU (``n = num_seq_blocks``): query block ``i`` may attend key block ``j``."""
        return self._mask.clone()

    @property
    def block_ids(self) -> torch.Tensor:
        """long ``[n]``: for each block of the sequence, the clip block it holds (gather index into the clip)."""
        return self._ids.clone()

    @property
    def block_segments(self) -> torch.Tensor:
        """long ``[n]``: for each block of the sequence, the segment whose window it belongs to (``-1`` for
        the shared anchors; an anchor copy of ``anchor_copies`` belongs to its window). In ``"clip"`` mode it
        is the segment that owns the block."""
        return self._seg.clone()

    @property
    def block_roles(self) -> torch.Tensor:
        """long ``[n]``: role of each block of the sequence in its window: ``ROLE_ANCHOR`` (0),
        ``ROLE_LEFT`` (1, a clean left neighbour), ``ROLE_OWN`` (2, a noisy block being generated),
        ``ROLE_RIGHT`` (3, a clean right neighbour). In ``"clip"`` mode every non-anchor block is own."""
        return self._roles.clone()

    @property
    def noisy_blocks(self) -> torch.Tensor:
        """bool ``[n]``: True where the block of the sequence is one its window generates (noisy, carries the
        timestep); False for the clean conditioning blocks (anchors, neighbours, which carry timestep 0).
        In ``"packed"`` mode each clip block is noisy in exactly one window (its own segment's), and only the
        clip blocks of the packed ``segments`` are noisy."""
        return self._roles == ROLE_OWN

    def token_block_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """long ``[num_tokens]``: for each token of the sequence, its block of the sequence (``i // block_tokens``)."""
        n = self.num_seq_blocks
        return torch.arange(n, device=device).repeat_interleave(self._block_tokens)

    def token_clip_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """long ``[num_tokens]``: for each token of the sequence, the clip token it holds (a gather index into
        the clip's ``T * block_tokens`` tokens, same token order inside a block)."""
        P = self._block_tokens
        ids = self._ids.to(device)
        return (ids[:, None] * P + torch.arange(P, device=device)[None, :]).reshape(-1)

    # -- FlexAttention ------------------------------------------------------------------------------

    def mask_mod(self, device: torch.device | str = "cpu"):
        """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` with the semantics of :attr:`block_mask`
        (looks the block table up at ``q_idx // block_tokens``, ``kv_idx // block_tokens``)."""
        return block_mask_mod(self._mask.to(device), self._block_tokens)

    def tile_tables(self, block_size: int | tuple[int, int] = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """bool ``(partial, full)`` tables ``[q_tiles, kv_tiles]`` of tiles of ``block_size`` tokens.

        A tile pair is *full* when every (query, key) token pair under it is allowed and both tiles lie
        wholly inside the sequence; it is *partial* when it holds some allowed pair but is not full. These
        are exactly the tables ``create_block_mask`` derives from the token-level mask, computed here from
        the block table without ever forming the ``num_tokens x num_tokens`` mask
        (:func:`swift_kernels.attention.schedule.tile_tables`, which attention plans use too).
        """
        bq, bk = _block_size_pair(block_size)
        return tile_tables(self._mask, self._block_tokens, self.num_tokens, bq, bk)

    def to_block_mask(
        self,
        batch: int | None = None,
        heads: int | None = None,
        device: torch.device | str = "cpu",
        block_size: int | tuple[int, int] = 128,
    ):
        """This layout as a FlexAttention ``BlockMask`` over ``num_tokens`` queries and keys.

        Equal to ``create_block_mask(self.mask_mod(device), batch, heads, num_tokens, num_tokens,
        device=device, BLOCK_SIZE=block_size)`` (same partial/full tile lists, same mask_mod), but built from
        the block table, so it costs no ``num_tokens**2`` memory (a 21-block clip at 2K has 73,920 tokens).
        ``batch``/``heads`` of ``None`` give size-1 dimensions that broadcast over every batch element / head.
        ``block_size`` is FlexAttention's sparse block size; ``block_tokens`` need not be a multiple of it.
        (An :class:`~swift_kernels.AttentionPlan` of this layout holds the same tables, once, on its device.)
        """
        B = 1 if batch is None else _as_int(batch, "batch")
        H = 1 if heads is None else _as_int(heads, "heads")
        if B < 1:
            raise ValueError(f"batch must be >= 1 or None, got {batch}")
        if H < 1:
            raise ValueError(f"heads must be >= 1 or None, got {heads}")
        bq, bk = _block_size_pair(block_size)
        return flex_block_mask(self._mask, self._block_tokens, bq, bk, device, batch=B, heads=H)


def _block_size_pair(block_size) -> tuple[int, int]:
    """``block_size`` (an int or a pair ``(q, kv)``) as two ints ``>= 1``."""
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(f"block_size must be an int or a pair (q, kv), got {block_size!r}")
        bq, bk = block_size
    else:
        bq, bk = block_size, block_size
    bq = _as_int(bq, "block_size")
    bk = _as_int(bk, "block_size")
    if bq < 1 or bk < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    return bq, bk


def block_mask_mod(table: torch.Tensor, block_tokens: int):
    """A FlexAttention ``mask_mod`` reading the bool block table ``table`` (on the attention's device)."""
    P = block_tokens
    last = table.shape[0] - 1

    def csg_mask_mod(b, h, q_idx, kv_idx):
        # Clamped so that the padded indices of a kernel's last tile stay inside the table; those
        # tokens do not exist and the kernel masks them on its own.
        qb = torch.clamp(q_idx // P, max=last)
        kb = torch.clamp(kv_idx // P, max=last)
        return table[qb, kb]

    return csg_mask_mod


def flex_block_mask(block_mask: torch.Tensor, block_tokens: int, block_q: int, block_kv: int, device,
                    *, batch: int = 1, heads: int = 1):
    """A FlexAttention ``BlockMask`` of a bool block table, built from the table (no ``L x L`` mask).

    Its partial/full lists are :func:`~swift_kernels.attention.schedule.tile_tables` in FlexAttention's
    ordered encoding, broadcast to ``[batch, heads, ...]``; the transposed (``q_*``) lists are computed by
    ``BlockMask.from_kv_blocks`` from those, as ``create_block_mask`` does.
    """
    from torch.nn.attention.flex_attention import BlockMask

    mask = block_mask.detach().to("cpu", torch.bool)
    L = mask.shape[0] * block_tokens
    partial, full = tile_tables(mask, block_tokens, L, block_q, block_kv)

    def on_device(table):
        num, idx = ordered(table)
        return (num.to(device).expand(batch, heads, -1).contiguous(),
                idx.to(device).expand(batch, heads, -1, -1).contiguous())

    kv_num, kv_idx = on_device(partial)
    full_num, full_idx = on_device(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(block_q, block_kv),
        mask_mod=block_mask_mod(mask.to(device), block_tokens), seq_lengths=(L, L),
    )
