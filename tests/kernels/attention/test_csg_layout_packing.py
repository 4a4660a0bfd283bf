"""CSGLayout's packed-training extension: ``segments=`` (pack a subset of windows) and ``anchor_copies=True``
(each window with its own anchor copy), against a plain re-statement of the rules, and the property training
rests on: every window of a packed sequence is exactly the dense window of inference."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swift_kernels import CSGLayout, csg_attention
from swift_kernels.attention.layout import ROLE_ANCHOR, ROLE_OWN
from helpers import naive_role, naive_segments, naive_window


def naive_packed(T, A, M, NL, NR, attends, segments, copies):
    """(block_ids, segment tag per block (None: shared anchor), roles, mask) of a packed sequence."""
    ids, tags, roles, window = [], [], [], []  # window: index of the window a block belongs to (None: shared)
    if not copies or not segments:
        ids += list(range(A))
        tags += [None] * A
        roles += [ROLE_ANCHOR] * A
        window += [None] * A
    for w, s in enumerate(segments):
        if copies:
            ids += list(range(A))
            tags += [s] * A
            roles += [ROLE_ANCHOR] * A
            window += [w] * A
        for b in naive_window(T, A, M, NL, NR, s):
            ids.append(b)
            tags.append(s)
            roles.append(naive_role(T, A, M, s, b))
            window.append(w)
    mask = []
    for i in range(len(ids)):
        row = []
        for j in range(len(ids)):
            if window[i] is None:  # a shared anchor
                row.append(attends == "all" or window[j] is None)
            elif roles[i] == ROLE_ANCHOR:  # an anchor copy: within its window
                row.append(window[j] == window[i] and (attends == "all" or roles[j] == ROLE_ANCHOR))
            else:
                row.append(window[j] is None or window[j] == window[i])
        mask.append(row)
    return ids, tags, roles, mask


@settings(max_examples=200, deadline=None)
@given(T=st.integers(2, 12), A=st.integers(0, 2), M=st.integers(1, 5), NL=st.integers(0, 4), NR=st.integers(0, 4),
       attends=st.sampled_from(["all", "anchor"]), copies=st.booleans(), data=st.data())
def test_packed_subsets_and_copies_match_rules(T, A, M, NL, NR, attends, copies, data):
    A = min(A, T - 1)
    nseg = len(naive_segments(T, A, M))
    segments = data.draw(st.lists(st.integers(0, nseg - 1), min_size=1, max_size=nseg, unique=True))
    layout = CSGLayout(T, 3, M, (NL, NR), anchor_blocks=A, anchor_attends=attends, mode="packed",
                       segments=segments, anchor_copies=copies)
    ids, tags, roles, mask = naive_packed(T, A, M, NL, NR, attends, segments, copies)
    assert layout.block_ids.tolist() == ids
    assert layout.block_segments.tolist() == [-1 if t is None else t for t in tags]
    assert layout.block_roles.tolist() == roles
    assert layout.block_mask.tolist() == mask
    assert layout.segments == tuple(segments) and layout.anchor_copies == copies
    # the noisy blocks are exactly the packed segments' own blocks, each once
    own = sorted(layout.block_ids[layout.noisy_blocks].tolist())
    assert own == sorted(b for s in segments for b in range(*layout.segment_range(s)))
    assert bool(layout.block_mask.diagonal().all())


@pytest.mark.parametrize("T,M,NL,NR", [(21, 2, 1, 0), (21, 3, 1, 1), (8, 3, 0, 0), (6, 1, 2, 3)])
def test_each_window_with_an_anchor_copy_is_the_dense_window(T, M, NL, NR):
    """With anchor copies, the sequence is the dense window calls side by side: the same blocks, roles and a
    dense mask inside each window, nothing across windows."""
    full = CSGLayout(T, 5, M, (NL, NR), mode="packed", anchor_copies=True)
    ids, roles, mask = full.block_ids, full.block_roles, full.block_mask
    first = 0
    for s in range(full.num_segments):
        window = CSGLayout(T, 5, M, (NL, NR), mode="window", segment=s)
        n = window.num_seq_blocks
        assert torch.equal(ids[first:first + n], window.block_ids)
        assert torch.equal(roles[first:first + n], window.block_roles)
        assert bool(mask[first:first + n, first:first + n].all())
        assert not bool(mask[first:first + n, :first].any()) and not bool(mask[first:first + n, first + n:].any())
        first += n
    assert first == full.num_seq_blocks


def test_shared_anchor_attending_itself_is_the_masked_window():
    """A shared anchor that attends only itself: each window's rows equal ``segments=(s,)`` of the same kind
    (the layout inference uses with ``CSGPlan(anchor_attends="anchor")``)."""
    T, M, N = 9, 2, (1, 1)
    packed = CSGLayout(T, 4, M, N, anchor_attends="anchor", mode="packed")
    mask, ids = packed.block_mask, packed.block_ids
    segs = packed.block_segments
    for s in range(packed.num_segments):
        single = CSGLayout(T, 4, M, N, anchor_attends="anchor", mode="packed", segments=(s,))
        rows = torch.cat([torch.tensor([0]), torch.nonzero(segs == s).flatten()])
        assert torch.equal(ids[rows], single.block_ids)
        assert torch.equal(mask[rows][:, rows], single.block_mask)
        assert not bool(single.block_mask[0, 1:].any()) and bool(single.block_mask[1:].all())


def test_csg_attention_of_packed_copies_equals_each_dense_window():
    """The attention itself (torch reference, fp64): each packed window's output is its dense window's."""
    T, P, M, N = 8, 3, 2, (1, 1)
    layout = CSGLayout(T, P, M, N, mode="packed", segments=(2, 0), anchor_copies=True)
    g = torch.Generator().manual_seed(0)
    clip = [torch.randn(2, T * P, 2, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    idx = layout.token_clip_ids()
    out = csg_attention(*(t[:, idx] for t in clip), layout)
    first = 0
    for s in (2, 0):
        window = CSGLayout(T, P, M, N, mode="window", segment=s)
        w_idx = window.token_clip_ids()
        want = csg_attention(*(t[:, w_idx] for t in clip), window)
        got = out[:, first:first + window.num_tokens]
        assert torch.allclose(got, want, rtol=0, atol=1e-12), (s, (got - want).abs().max())
        first += window.num_tokens


def test_defaults_spelled_out_and_identity():
    a = CSGLayout(9, 4, 2, (1, 0), mode="packed")
    b = CSGLayout(9, 4, 2, (1, 0), mode="packed", segments=range(4))
    assert a == b and hash(a) == hash(b) and a.segments == (0, 1, 2, 3)
    c = CSGLayout(9, 4, 2, (1, 0), mode="packed", segments=(3, 1))
    d = CSGLayout(9, 4, 2, (1, 0), mode="packed", segments=(1, 3))
    e = CSGLayout(9, 4, 2, (1, 0), mode="packed", anchor_copies=True)
    assert len({a, c, d, e}) == 4
    for layout in (c, e):
        assert pickle.loads(pickle.dumps(layout)) == layout
    assert "segments=(3, 1)" in repr(c) and "anchor_copies=True" in repr(e)
    assert CSGLayout(9, 4, 2, mode="window", segment=2).segments == (2,)
    # anchors filling the clip: no segment, the anchors alone even with copies
    only = CSGLayout(3, 4, 2, anchor_blocks=3, mode="packed", anchor_copies=True)
    assert only.block_ids.tolist() == [0, 1, 2] and bool(only.block_mask.all())


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(mode="clip", segments=(0,)), ValueError, "segments"),
    (dict(mode="window", segment=0, anchor_copies=True), ValueError, "anchor_copies"),
    (dict(mode="packed", segments=()), ValueError, "at least one"),
    (dict(mode="packed", segments=(1, 1)), ValueError, "distinct"),
    (dict(mode="packed", segments=(4,)), ValueError, r"\[0, 4\)"),
    (dict(mode="packed", segments=(-1,)), ValueError, r"\[0, 4\)"),
    (dict(mode="packed", segments=(1.0,)), TypeError, "segments"),
    (dict(mode="packed", segments="01"), TypeError, "segments"),
    (dict(mode="packed", segments=3), TypeError, "segments"),
    (dict(mode="packed", anchor_copies=1), TypeError, "anchor_copies"),
])
def test_invalid_packing_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        CSGLayout(9, 3, 2, (1, 0), **kwargs)


def test_noisy_blocks_of_a_subset():
    layout = CSGLayout(9, 3, 2, (1, 0), mode="packed", segments=(3, 1), anchor_copies=True)
    assert layout.block_ids.tolist() == [0, 6, 7, 8, 0, 2, 3, 4]
    assert layout.block_ids[layout.noisy_blocks].tolist() == [7, 8, 3, 4]
    assert layout.block_roles[layout.block_ids == 0].tolist() == [ROLE_ANCHOR, ROLE_ANCHOR]
    assert (layout.block_roles == ROLE_OWN).sum() == 4
