"""The tile schedule against a brute-force token-level statement of which tile pairs matter."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swift_kernels.attention.schedule import allowed_pairs, build_schedule, get_schedule


def _truth(mask, block_tokens, tokens, tile_q, tile_k):
    """Per tile pair: visit = some allowed token pair; full = every token pair allowed and tiles in bounds."""
    tok_block = torch.arange(tokens) // block_tokens
    allowed = mask[tok_block[:, None], tok_block[None, :]]
    nq, nk = -(-tokens // tile_q), -(-tokens // tile_k)
    visit = torch.zeros(nq, nk, dtype=torch.bool)
    full = torch.zeros(nq, nk, dtype=torch.bool)
    for m in range(nq):
        for n in range(nk):
            tile = allowed[m * tile_q : (m + 1) * tile_q, n * tile_k : (n + 1) * tile_k]
            in_bounds = (m + 1) * tile_q <= tokens and (n + 1) * tile_k <= tokens
            visit[m, n] = bool(tile.any())
            full[m, n] = bool(tile.all()) and in_bounds
    return visit, full


def _rows(sched):
    """Decode the CSR into (set of full columns, set of partial columns) per row."""
    out = []
    for r in range(sched.num_rows):
        lo, hi = int(sched.indptr[r]), int(sched.indptr[r + 1])
        cols = sched.indices[lo:hi].tolist()
        nf = int(sched.num_full[r])
        assert cols[:nf] == sorted(cols[:nf]) and cols[nf:] == sorted(cols[nf:])
        out.append((set(cols[:nf]), set(cols[nf:])))
    return out


def _check(mask, block_tokens, tile_q, tile_k):
    tokens = mask.shape[0] * block_tokens
    sched = build_schedule(mask, block_tokens, tokens, tile_q, tile_k)
    visit, full = _truth(mask, block_tokens, tokens, tile_q, tile_k)
    for r, (f, p) in enumerate(_rows(sched.by_query)):
        assert f == set(torch.nonzero(visit[r] & full[r]).flatten().tolist())
        assert p == set(torch.nonzero(visit[r] & ~full[r]).flatten().tolist())
    for c, (f, p) in enumerate(_rows(sched.by_key)):
        assert f == set(torch.nonzero(visit[:, c] & full[:, c]).flatten().tolist())
        assert p == set(torch.nonzero(visit[:, c] & ~full[:, c]).flatten().tolist())
    assert sched.by_query.nnz == sched.by_key.nnz == int(visit.sum())
    assert sched.by_query.max_row_len == int(visit.sum(1).max())


@settings(max_examples=40, deadline=None)
@given(
    blocks=st.integers(1, 7),
    block_tokens=st.integers(1, 45),
    tile_q=st.sampled_from([8, 16, 32]),
    tile_k=st.sampled_from([8, 16, 32]),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_schedule_matches_token_level_truth(blocks, block_tokens, tile_q, tile_k, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(blocks, blocks, generator=gen) < density
    _check(mask, block_tokens, tile_q, tile_k)


def test_real_block_size_straddles_tiles():
    # 3,520 tokens per latent frame at 2K: block borders fall inside 128-token tiles.
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    _check(mask, 3520 // 40, 16, 8)  # scaled down: 88 tokens per block, same straddling pattern
    sched = build_schedule(mask, 3520, 3 * 3520, 128, 128)
    # Query tile 27 covers tokens 3456..3583: blocks 0 and 1, so its tiles over block 2 are partial.
    row = _rows(sched.by_query)[27]
    last_k_tile_of_block2 = (3 * 3520 - 1) // 128
    assert last_k_tile_of_block2 in row[1]


def test_get_schedule_caches_by_content():
    mask = torch.rand(5, 5) < 0.5
    a = get_schedule(mask, 10, 50, 16, 16, "cpu")
    b = get_schedule(mask.clone(), 10, 50, 16, 16, "cpu")
    assert a is b
    c = get_schedule(~mask, 10, 50, 16, 16, "cpu")
    assert c is not a
    # The kernels' int8 block table comes with the cached schedule: built once per mask, not per call.
    assert a.mask_table.dtype == torch.int8 and a.mask_table.is_contiguous()
    assert torch.equal(a.mask_table, mask.to(torch.int8))
    assert torch.equal(c.mask_table, (~mask).to(torch.int8))


def test_allowed_pairs_counts_token_pairs():
    mask = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    assert allowed_pairs(mask, 7) == 3 * 49


def test_allowed_pairs_rejects_bad_arguments():
    with pytest.raises(TypeError, match="block_mask"):
        allowed_pairs(torch.ones(2, 2, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="block_mask"):
        allowed_pairs([[True]], 4)
    with pytest.raises(TypeError, match="block_tokens"):
        allowed_pairs(torch.ones(2, 2, dtype=torch.bool), 4.0)
    with pytest.raises(ValueError, match="block_tokens"):
        allowed_pairs(torch.ones(2, 2, dtype=torch.bool), 0)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_extremes(density):
    mask = torch.full((4, 4), bool(density))
    sched = build_schedule(mask, 64, 256, 128, 64)
    if density == 0.0:
        assert sched.by_query.nnz == 0
    else:
        assert sched.by_query.nnz == 2 * 4 and int(sched.by_query.num_full.sum()) == 8
