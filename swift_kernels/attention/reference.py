"""PyTorch reference for frame-block-sparse attention: the truth the kernels are checked against.

Plain and readable, and able to run long sequences on a CPU: it works one query block at a time (split
further into chunks of at most ``QUERY_CHUNK`` tokens) against the key blocks that block may see, so no
``L x L`` matrix is ever formed. Math is in fp32 (fp64 for fp64 inputs).

This module is also the ``"torch"`` backend (its record, ``TORCH``, is in :mod:`.torch_backends`): it follows
the backend contract (``forward`` returns the output and the log-sum-exp; ``backward`` returns dq, dk, dv).
"""

from __future__ import annotations

import torch

SUPPORTED_HEAD_DIMS = None  # any head_dim
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Queries per chunk: bounds the score matrix to QUERY_CHUNK x (allowed keys) per (batch, head).
QUERY_CHUNK = 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _allowed_key_index(mask_row: torch.Tensor, block_tokens: int, device: torch.device) -> torch.Tensor | None:
    """Token indices of every key block a query block may attend, or None if there is none."""
    blocks = torch.nonzero(mask_row, as_tuple=True)[0]
    if blocks.numel() == 0:
        return None
    tokens = blocks[:, None] * block_tokens + torch.arange(block_tokens)
    return tokens.reshape(-1).to(device)


def _query_chunks(block: int, block_tokens: int):
    start, end = block * block_tokens, (block + 1) * block_tokens
    for lo in range(start, end, QUERY_CHUNK):
        yield lo, min(lo + QUERY_CHUNK, end)


def forward(q, k, v, block_mask, block_tokens, scale):
    """Reference forward: returns ``(out [B, L, H, D] in q.dtype, lse fp32 [B, H, L])``."""
    batch, tokens, heads, _ = q.shape
    ct = _compute_dtype(q.dtype)
    mask = block_mask.detach().to("cpu", torch.bool)
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((batch, heads, tokens), float("-inf"), dtype=torch.float32, device=q.device)
    for qb in range(mask.shape[0]):
        key_index = _allowed_key_index(mask[qb], block_tokens, q.device)
        if key_index is None:
            continue  # no allowed key: the rows stay zero with lse = -inf
        kk = k.index_select(1, key_index).to(ct).transpose(1, 2)  # [B, H, Lk, D]
        vv = v.index_select(1, key_index).to(ct).transpose(1, 2)
        for lo, hi in _query_chunks(qb, block_tokens):
            qq = q[:, lo:hi].to(ct).transpose(1, 2)  # [B, H, Lq, D]
            scores = (qq @ kk.transpose(-1, -2)) * scale
            row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            probs = torch.exp(scores - row_lse)
            out[:, lo:hi] = (probs @ vv).transpose(1, 2).to(q.dtype)
            lse[:, :, lo:hi] = row_lse.squeeze(-1).to(torch.float32)
    return out, lse


def backward(dout, q, k, v, out, lse, block_mask, block_tokens, scale):
    """Reference backward: returns ``(dq, dk, dv)`` in the input dtype.

    The softmax is recomputed exactly from q and k (``lse`` is accepted for the contract but not needed),
    and ``delta = rowsum(dout * out)`` uses the given output, as the kernels do.
    """
    ct = _compute_dtype(q.dtype)
    mask = block_mask.detach().to("cpu", torch.bool)
    # Accumulate in [B, H, L, D] so index_add_ works on one token dimension.
    dq = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=ct, device=q.device)
    dk = torch.zeros_like(dq)
    dv = torch.zeros_like(dq)
    delta = (dout.to(ct) * out.to(ct)).sum(-1).transpose(1, 2)  # [B, H, L]
    for qb in range(mask.shape[0]):
        key_index = _allowed_key_index(mask[qb], block_tokens, q.device)
        if key_index is None:
            continue
        kk = k.index_select(1, key_index).to(ct).transpose(1, 2)
        vv = v.index_select(1, key_index).to(ct).transpose(1, 2)
        for lo, hi in _query_chunks(qb, block_tokens):
            qq = q[:, lo:hi].to(ct).transpose(1, 2)
            do = dout[:, lo:hi].to(ct).transpose(1, 2)
            probs = torch.softmax((qq @ kk.transpose(-1, -2)) * scale, dim=-1)
            dv.index_add_(2, key_index, probs.transpose(-1, -2) @ do)
            dprobs = do @ vv.transpose(-1, -2)
            dscores = probs * (dprobs - delta[:, :, lo:hi, None]) * scale
            dq[:, :, lo:hi] += dscores @ kk
            dk.index_add_(2, key_index, dscores.transpose(-1, -2) @ qq)
    back = lambda t, like: t.transpose(1, 2).to(like.dtype).contiguous()  # noqa: E731
    return back(dq, q), back(dk, k), back(dv, v)


def dense_attention(q, k, v, block_mask, block_tokens, scale=None):
    """Dense masked softmax attention over the full ``L x L`` score matrix (small inputs only).

    The most literal statement of the semantics, used by tests as a second, independent reference.
    Differentiable with autograd; computes in the input dtype (pass fp64 tensors for a tight reference).
    """
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    token_block = torch.arange(q.shape[1], device=q.device) // block_tokens
    allowed = block_mask.to(q.device, torch.bool)[token_block[:, None], token_block[None, :]]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    # A row with no allowed key would be softmax(all -inf) = NaN (and NaN gradients): give it finite
    # scores and zero its probabilities instead, so its output and gradients are exactly zero.
    has_key = allowed.any(dim=-1)
    scores = scores.masked_fill(~allowed & has_key[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1) * has_key[:, None]
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)
