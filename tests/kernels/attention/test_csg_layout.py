"""CSGLayout: the three modes' masks and sequences against a plain re-statement of the rules, argument
validation, and the FlexAttention BlockMask conversion."""

from __future__ import annotations

import pickle
import random
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swift_kernels.attention.layout import ROLE_ANCHOR, ROLE_LEFT, ROLE_OWN, CSGLayout

from helpers import naive_role, naive_segments, naive_window

# ---------------------------------------------------------------------------------------------------
# The rules, written out element by element (deliberately naive: loops and membership tests).
# ---------------------------------------------------------------------------------------------------


def naive_layout(T, A, M, NL, NR, attends, mode, segment=None):
    """(block_ids, window tag per sequence block (None for anchors), roles, mask as nested lists)."""
    segs = naive_segments(T, A, M)
    if mode == "clip":
        ids = list(range(T))
        tags = []
        for b in ids:
            owner = None
            for s, (start, end) in enumerate(segs):
                if start <= b < end:
                    owner = s
            tags.append(owner)
        roles = [ROLE_ANCHOR if t is None else ROLE_OWN for t in tags]
        mask = []
        for qb in ids:
            row = []
            for kb in ids:
                if qb < A:
                    row.append(attends == "all" or kb < A)
                else:
                    s = tags[qb]
                    row.append(kb < A or kb in naive_window(T, A, M, NL, NR, s))
            mask.append(row)
        return ids, tags, roles, mask
    if mode == "window":
        win = naive_window(T, A, M, NL, NR, segment)
        ids = list(range(A)) + win
        tags = [None] * A + [segment] * len(win)
        roles = [ROLE_ANCHOR] * A + [naive_role(T, A, M, segment, b) for b in win]
        mask = [[True] * len(ids) for _ in ids]
        return ids, tags, roles, mask
    assert mode == "packed"
    ids = list(range(A))
    tags = [None] * A
    roles = [ROLE_ANCHOR] * A
    for s in range(len(segs)):
        for b in naive_window(T, A, M, NL, NR, s):
            ids.append(b)
            tags.append(s)
            roles.append(naive_role(T, A, M, s, b))
    mask = []
    for i in range(len(ids)):
        row = []
        for j in range(len(ids)):
            if tags[i] is None:
                row.append(attends == "all" or tags[j] is None)
            else:
                row.append(tags[j] is None or tags[j] == tags[i])
        mask.append(row)
    return ids, tags, roles, mask


def check_against_naive(T, A, M, NL, NR, attends, mode, segment=None, P=3):
    layout = CSGLayout(T, P, M, (NL, NR), anchor_blocks=A, anchor_attends=attends, mode=mode, segment=segment)
    ids, tags, roles, mask = naive_layout(T, A, M, NL, NR, attends, mode, segment)
    n = len(ids)
    segs = naive_segments(T, A, M)

    bm = layout.block_mask
    assert bm.dtype == torch.bool and bm.device.type == "cpu" and bm.shape == (n, n)
    assert bm.tolist() == mask
    assert layout.block_ids.dtype == torch.long and layout.block_ids.tolist() == ids
    assert layout.block_segments.tolist() == [-1 if t is None else t for t in tags]
    assert layout.block_roles.tolist() == roles
    assert layout.noisy_blocks.tolist() == [r == ROLE_OWN for r in roles]
    assert layout.num_seq_blocks == n
    assert layout.num_tokens == n * P
    assert layout.block_tokens == P
    assert layout.num_segments == len(segs)
    for s, (start, end) in enumerate(segs):
        assert layout.segment_range(s) == (start, end)
        assert layout.window_blocks(s) == naive_window(T, A, M, NL, NR, s)
    # Every clip block outside the anchors is generated exactly once per sequence in clip/packed mode.
    if mode in ("clip", "packed"):
        noisy_ids = sorted(layout.block_ids[layout.noisy_blocks].tolist())
        assert noisy_ids == list(range(A, T))
    # Every query block attends itself: no empty rows in any mode.
    assert bool(bm.diagonal().all())
    return layout


modes_st = st.sampled_from(["clip", "window", "packed"])


@settings(max_examples=250, deadline=None)
@given(
    T=st.integers(1, 13),
    A=st.integers(0, 3),
    M=st.integers(1, 15),
    NL=st.integers(0, 15),
    NR=st.integers(0, 15),
    attends=st.sampled_from(["all", "anchor"]),
    mode=modes_st,
    data=st.data(),
)
def test_modes_match_rules(T, A, M, NL, NR, attends, mode, data):
    A = min(A, T)
    nseg = len(naive_segments(T, A, M))
    if mode == "window":
        if nseg == 0:
            with pytest.raises(ValueError, match="segment"):
                CSGLayout(T, 3, M, (NL, NR), anchor_blocks=A, anchor_attends=attends, mode=mode, segment=0)
            return
        segment = data.draw(st.integers(0, nseg - 1))
    else:
        segment = None
    check_against_naive(T, A, M, NL, NR, attends, mode, segment)


EDGES = [
    # (T, A, M, NL, NR)
    (2, 1, 1, 0, 0),  # T = A + 1
    (2, 1, 5, 3, 3),  # T = A + 1, M >= T, neighbours past both ends
    (5, 1, 5, 0, 0),  # M >= T
    (5, 1, 4, 0, 0),  # M = T - A: one segment
    (21, 1, 2, 1, 0),  # the paper figure's whole clip
    (21, 1, 3, 1, 1),  # the paper text's whole clip
    (21, 1, 3, 30, 30),  # neighbours past either end: every window is the whole clip
    (10, 0, 3, 1, 2),  # no anchors
    (10, 3, 3, 2, 0),  # several anchors
    (8, 1, 3, 0, 0),  # last segment shorter (7 = 3 + 3 + 1)
]


@pytest.mark.parametrize("T,A,M,NL,NR", EDGES)
@pytest.mark.parametrize("attends", ["all", "anchor"])
def test_edges(T, A, M, NL, NR, attends):
    check_against_naive(T, A, M, NL, NR, attends, "clip")
    check_against_naive(T, A, M, NL, NR, attends, "packed")
    for s in range(len(naive_segments(T, A, M))):
        check_against_naive(T, A, M, NL, NR, attends, "window", s)


def test_known_clip_mask():
    # A hand-written table (T=6, A=1, M=2, N=(1,0)): segments [1,3), [3,5), [5,6).
    layout = CSGLayout(6, 4, 2, (1, 0))
    expected = [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 0],
        [1, 0, 1, 1, 1, 0],
        [1, 0, 0, 0, 1, 1],
    ]
    assert layout.block_mask.int().tolist() == expected
    packed = CSGLayout(6, 4, 2, (1, 0), mode="packed")
    assert packed.block_ids.tolist() == [0, 1, 2, 2, 3, 4, 4, 5]
    assert packed.noisy_blocks.tolist() == [False, True, True, False, True, True, False, True]
    window = CSGLayout(6, 4, 2, (1, 0), mode="window", segment=1)
    assert window.block_ids.tolist() == [0, 2, 3, 4]
    assert window.block_roles.tolist() == [ROLE_ANCHOR, ROLE_LEFT, ROLE_OWN, ROLE_OWN]
    assert window.window_blocks(1) == [2, 3, 4]


def test_no_segments_when_anchors_fill_the_clip():
    for mode in ("clip", "packed"):
        for attends in ("all", "anchor"):
            layout = CSGLayout(3, 5, 2, (1, 1), anchor_blocks=3, anchor_attends=attends, mode=mode)
            assert layout.num_segments == 0
            assert layout.block_ids.tolist() == [0, 1, 2]
            assert bool(layout.block_mask.all())
            assert not bool(layout.noisy_blocks.any())
    with pytest.raises(ValueError, match="segment"):
        CSGLayout(3, 5, 2, (1, 1), anchor_blocks=3, mode="window", segment=0)


def test_token_ids():
    layout = CSGLayout(7, 5, 2, (1, 1), mode="packed")
    P = 5
    tb = layout.token_block_ids()
    assert tb.tolist() == [i // P for i in range(layout.num_tokens)]
    tc = layout.token_clip_ids()
    ids = layout.block_ids.tolist()
    assert tc.tolist() == [ids[i // P] * P + i % P for i in range(layout.num_tokens)]


def test_immutable_hashable_and_fresh_tensors():
    a = CSGLayout(9, 4, 3, (1, 1))
    b = CSGLayout(9, 4, 3, [1, 1])
    c = CSGLayout(9, 4, 3, (1, 0))
    assert a == b and hash(a) == hash(b) and a != c
    assert len({a, b, c}) == 2
    with pytest.raises(AttributeError):
        a.block_tokens = 5
    with pytest.raises(AttributeError):
        a._mask = None
    m = a.block_mask
    m.fill_(False)
    assert bool(a.block_mask.diagonal().all())  # the layout's own table is untouched
    ids = a.block_ids
    ids.fill_(-1)
    assert a.block_ids.tolist() == list(range(9))
    assert pickle.loads(pickle.dumps(a)) == a
    r = repr(CSGLayout(9, 4, 3, (1, 1), mode="window", segment=2))
    assert "mode='window'" in r and "segment=2" in r and "num_blocks=9" in r


def test_defaults():
    layout = CSGLayout(5, 2, 2)
    assert layout.neighbors == (1, 0)
    assert layout.anchor_blocks == 1 and layout.anchor_attends == "all" and layout.mode == "clip"
    assert layout.segment is None


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(segment_blocks=0), ValueError, "segment_blocks"),
        (dict(segment_blocks=-2), ValueError, "segment_blocks"),
        (dict(num_blocks=0), ValueError, "num_blocks"),
        (dict(block_tokens=0), ValueError, "block_tokens"),
        (dict(neighbors=(-1, 0)), ValueError, "neighbors"),
        (dict(neighbors=(0, -1)), ValueError, "neighbors"),
        (dict(neighbors=(1, 1, 1)), ValueError, "neighbors"),
        (dict(neighbors=1), TypeError, "neighbors"),
        (dict(neighbors="ab"), TypeError, "neighbors"),
        (dict(neighbors=(1.0, 0)), TypeError, "neighbors"),
        (dict(anchor_blocks=9), ValueError, "anchor_blocks"),
        (dict(anchor_blocks=-1), ValueError, "anchor_blocks"),
        (dict(anchor_attends="none"), ValueError, "anchor_attends"),
        (dict(anchor_attends=1), TypeError, "anchor_attends"),
        (dict(mode="dense"), ValueError, "mode"),
        (dict(mode=None), TypeError, "mode"),
        (dict(mode="window"), ValueError, "segment"),
        (dict(mode="window", segment=4), ValueError, "segment"),
        (dict(mode="window", segment=-1), ValueError, "segment"),
        (dict(mode="window", segment=1.0), TypeError, "segment"),
        (dict(mode="clip", segment=0), ValueError, "segment"),
        (dict(mode="packed", segment=0), ValueError, "segment"),
        (dict(num_blocks=8.0), TypeError, "num_blocks"),
        (dict(num_blocks=True), TypeError, "num_blocks"),
        (dict(block_tokens="96"), TypeError, "block_tokens"),
        (dict(segment_blocks=2.5), TypeError, "segment_blocks"),
        (dict(anchor_blocks=None), TypeError, "anchor_blocks"),
    ],
)
def test_invalid_arguments(kwargs, exc, name):
    args = dict(num_blocks=8, block_tokens=3, segment_blocks=2, neighbors=(1, 0), anchor_blocks=1)
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        CSGLayout(**args)


def test_invalid_segment_queries():
    layout = CSGLayout(8, 3, 2)  # segments [1,3) [3,5) [5,7) [7,8)
    assert layout.num_segments == 4
    assert layout.segment_range(3) == (7, 8)
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="s must be"):
            layout.segment_range(bad)
        with pytest.raises(ValueError, match="s must be"):
            layout.window_blocks(bad)
    with pytest.raises(TypeError):
        layout.window_blocks(1.5)
    with pytest.raises(ValueError, match="batch"):
        layout.to_block_mask(batch=0)
    with pytest.raises(TypeError, match="heads"):
        layout.to_block_mask(heads=2.0)
    for bad in (0, (64, 0), (1, 2, 3)):
        with pytest.raises(ValueError, match="block_size"):
            layout.to_block_mask(block_size=bad)
    with pytest.raises(TypeError, match="block_size"):
        layout.tile_tables("128")


def test_numpy_ints_accepted():
    np = pytest.importorskip("numpy")
    layout = CSGLayout(np.int64(8), np.int32(3), np.int64(2), (np.int64(1), 0))
    assert layout == CSGLayout(8, 3, 2, (1, 0))


# ---------------------------------------------------------------------------------------------------
# FlexAttention
# ---------------------------------------------------------------------------------------------------


def expanded(layout):
    P = layout.block_tokens
    return layout.block_mask.repeat_interleave(P, 0).repeat_interleave(P, 1)


def tile_tables(layout, block_size):
    """(visited, full) bool [nq_tiles, nk_tiles] computed from the token-level table."""
    dense = expanded(layout)
    L = layout.num_tokens
    nt = -(-L // block_size)
    visited = torch.zeros(nt, nt, dtype=torch.bool)
    full = torch.zeros(nt, nt, dtype=torch.bool)
    for i in range(nt):
        for j in range(nt):
            sub = dense[i * block_size : (i + 1) * block_size, j * block_size : (j + 1) * block_size]
            visited[i, j] = bool(sub.any())
            full[i, j] = bool(sub.all()) and sub.shape == (block_size, block_size)
    return visited, full


LAYOUTS = [
    CSGLayout(7, 50, 2, (1, 0)),  # 350 tokens: block_tokens and the length are not multiples of 128
    CSGLayout(7, 50, 3, (1, 1), anchor_attends="anchor"),
    CSGLayout(6, 37, 2, (1, 1), mode="packed"),
    CSGLayout(8, 45, 2, (1, 1), mode="window", segment=1),
    CSGLayout(9, 20, 2, (2, 1), anchor_blocks=2, mode="packed", anchor_attends="anchor"),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
@pytest.mark.parametrize("block_size", [128, 32])
def test_to_block_mask_matches_table(layout, block_size):
    from torch.nn.attention.flex_attention import create_mask

    L = layout.num_tokens
    bm = layout.to_block_mask(block_size=block_size)
    assert tuple(bm.shape[-2:]) == (L, L)
    # Token level: the BlockMask's own mask_mod on every (query, key) pair equals the expanded table.
    tokens = create_mask(bm.mask_mod, 1, 1, L, L, "cpu")[0, 0]
    assert torch.equal(tokens, expanded(layout))
    # Tile level: visited tiles are exactly those touching an allowed pair, and tiles that FlexAttention
    # treats as full (no mask_mod) are wholly allowed.
    visited, full = tile_tables(layout, block_size)
    dense_tiles = bm.to_dense()[0, 0].bool()
    assert torch.equal(dense_tiles, visited)
    nt = visited.shape[0]
    flex_full = torch.zeros(nt, nt, dtype=torch.bool)
    if bm.full_kv_num_blocks is not None:
        for i in range(nt):
            for t in range(int(bm.full_kv_num_blocks[0, 0, i])):
                flex_full[i, int(bm.full_kv_indices[0, 0, i, t])] = True
    assert not bool((flex_full & ~visited).any())
    # Every tile FlexAttention skips the mask on must really be fully allowed (last tiles may be padded,
    # in which case the kernel masks the padding by length on its own).
    dense = expanded(layout)
    for i, j in flex_full.nonzero().tolist():
        assert bool(dense[i * block_size : (i + 1) * block_size, j * block_size : (j + 1) * block_size].all())


BLOCKMASK_FIELDS = (
    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
)


@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
@pytest.mark.parametrize("block_size", [128, 32, (64, 16)])
@pytest.mark.parametrize("batch,heads", [(None, None), (2, 3)])
def test_to_block_mask_equals_create_block_mask(layout, block_size, batch, heads):
    # to_block_mask builds the tile lists from the block table; create_block_mask from the token mask.
    from torch.nn.attention.flex_attention import create_block_mask

    L = layout.num_tokens
    ours = layout.to_block_mask(batch=batch, heads=heads, block_size=block_size)
    theirs = create_block_mask(layout.mask_mod(), batch, heads, L, L, device="cpu", BLOCK_SIZE=block_size)
    for field in BLOCKMASK_FIELDS:
        a, b = getattr(ours, field), getattr(theirs, field)
        assert a.shape == b.shape and torch.equal(a, b), field
    assert ours.seq_lengths == theirs.seq_lengths == (L, L)
    assert ours.BLOCK_SIZE == theirs.BLOCK_SIZE


def test_to_block_mask_batch_heads_and_random_layouts():
    rng = random.Random(1234)
    for _ in range(6):
        T = rng.randint(2, 9)
        A = rng.randint(0, 2)
        M = rng.randint(1, 4)
        mode = rng.choice(["clip", "packed"])
        layout = CSGLayout(T, rng.randint(5, 40), M, (rng.randint(0, 2), rng.randint(0, 2)),
                           anchor_blocks=min(A, T - 1), anchor_attends=rng.choice(["all", "anchor"]), mode=mode)
        bm = layout.to_block_mask(batch=2, heads=3)
        assert tuple(bm.shape) == (2, 3, layout.num_tokens, layout.num_tokens)
        L = layout.num_tokens
        from torch.nn.attention.flex_attention import create_mask

        tokens = create_mask(bm.mask_mod, 2, 3, L, L, "cpu")
        assert torch.equal(tokens, expanded(layout).expand(2, 3, L, L))


def dense_masked_attention(q, k, v, token_mask, scale):
    """[B, L, H, D] fp64 attention with a dense bool [L, L] mask."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~token_mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=repr)
def test_flex_attention_equals_dense_masked_softmax(layout):
    # Eager FlexAttention runs on the CPU (an unfused path that materializes the scores; fine at these sizes).
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(7)
    B, H, D = 2, 2, 16
    L = layout.num_tokens
    q, k, v = (torch.randn(B, L, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    scale = D**-0.5
    expected = dense_masked_attention(q, k, v, expanded(layout), scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out = flex_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=layout.to_block_mask(), scale=scale
        ).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_csg_attention_equals_flex_attention():
    # The kernel package's entry point and FlexAttention read the same layout the same way.
    from torch.nn.attention.flex_attention import flex_attention

    from swift_kernels import csg_attention

    layout = CSGLayout(6, 40, 2, (1, 1), mode="packed", anchor_attends="anchor")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    ours = csg_attention(q, k, v, layout, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=layout.to_block_mask())
    torch.testing.assert_close(ours, flex.transpose(1, 2), rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [CSGLayout(7, 150, 2, (1, 0)), CSGLayout(6, 130, 2, (1, 1), mode="packed")], ids=repr)
def test_compiled_flex_attention_gpu(layout, gpu_device):
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator(device=gpu_device).manual_seed(3)
    B, H, D = 1, 2, 64
    L = layout.num_tokens
    q, k, v = (torch.randn(B, L, H, D, generator=g, device=gpu_device, dtype=torch.float16) for _ in range(3))
    scale = D**-0.5
    flex = torch.compile(flex_attention)
    out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=layout.to_block_mask(device=gpu_device),
               scale=scale).transpose(1, 2)
    mask = expanded(layout).to(gpu_device)
    expected = dense_masked_attention(q.double(), k.double(), v.double(), mask, scale)
    # The same computation by PyTorch in fp16 (SDPA with a dense mask) sets the error allowance.
    low = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    ).transpose(1, 2)
    floor = (low.double() - expected).abs().max().item()
    err = (out.double() - expected).abs().max().item()
    assert err <= 2 * floor + 2e-3
