"""The sparse-block tables against a brute-force token-level statement of which tile pairs matter."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swift_kernels.attention.schedule import allowed_pairs, ordered, tile_tables


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


def _rows(num, idx):
    """Decode FlexAttention's ordered encoding into the set of listed columns per row (ascending in each row)."""
    out = []
    for r in range(num.shape[0]):
        cols = idx[r, : int(num[r])].tolist()
        assert cols == sorted(cols)
        out.append(set(cols))
    return out


def _check(mask, block_tokens, tile_q, tile_k):
    tokens = mask.shape[0] * block_tokens
    partial, full = tile_tables(mask, block_tokens, tokens, tile_q, tile_k)
    visit, tfull = _truth(mask, block_tokens, tokens, tile_q, tile_k)
    assert torch.equal(full, visit & tfull)
    assert torch.equal(partial, visit & ~tfull)
    for table in (partial, full, partial.T, full.T):
        num, idx = ordered(table)
        assert num.dtype == idx.dtype == torch.int32 and idx.shape == table.shape
        for r, cols in enumerate(_rows(num, idx)):
            assert cols == set(torch.nonzero(table[r]).flatten().tolist())
        # every row is a permutation of the columns: listed ones first, then the others
        assert torch.equal(idx.sort(dim=-1).values, torch.arange(table.shape[1], dtype=torch.int32).expand_as(idx))


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
    partial, full = tile_tables(mask, 3520, 3 * 3520, 128, 128)
    # Query tile 27 covers tokens 3456..3583: blocks 0 and 1, so its tiles over block 2 are partial.
    last_k_tile_of_block2 = (3 * 3520 - 1) // 128
    assert partial[27, last_k_tile_of_block2] and not full[27, last_k_tile_of_block2]


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
    partial, full = tile_tables(mask, 64, 256, 128, 64)
    assert not partial.any()
    assert bool(full.all()) == bool(density) and int(full.sum()) == (8 if density else 0)
