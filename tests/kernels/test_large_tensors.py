"""GPU: tensors of more than 2**31 elements (64-bit offsets in every kernel), checked on slices past the 2**31 mark.

A 2K CSG window (4 frames of 3,520 tokens, 24 heads of 128) is 43 M elements per tensor; batching 50 of them, or
the sampler's latents of a long clip, passes 2**31. Offsets computed in 32 bits would wrap and read or write the
wrong rows, so the batch elements past the mark are compared with the reference.
"""

from __future__ import annotations

import pytest
import torch

from helpers import check_rule, sdpa_baseline
from swift_kernels import CSGLayout, flow_step, frame_block_attention, plan_attention
from swift_kernels._backend import backend_unavailable_reason
from swift_kernels.attention import reference

pytestmark = pytest.mark.gpu


def _free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_attention_over_2_31_elements(backend, gpu_device):
    if backend_unavailable_reason(backend, gpu_device) is not None:
        pytest.skip(backend_unavailable_reason(backend, gpu_device))
    # 52 x 14,080 tokens x 24 heads x 128 = 2.25e9 elements per tensor (4.5 GB in bf16); 8 such tensors.
    batch, heads, head_dim, dtype = 52, 24, 128, torch.bfloat16
    if _free_gib() < 50:
        pytest.skip(f"needs about 50 GiB of free GPU memory, {_free_gib():.0f} free")
    layout = CSGLayout(21, 3520, 2, (1, 0), mode="window", segment=1)  # 4 dense blocks: 14,080 tokens
    plan = plan_attention(layout, device=gpu_device)
    shape = (batch, layout.num_tokens, heads, head_dim)
    gen = torch.Generator(device=gpu_device).manual_seed(3)
    q, k, v, dout = (torch.randn(shape, generator=gen, device=gpu_device, dtype=dtype) for _ in range(4))
    assert q.numel() > 2**31
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = frame_block_attention(*leaves, plan, backend=backend)
    dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    # the last batch element starts at element (batch - 1) * 14,080 * 24 * 128 > 2**31
    b = batch - 1
    assert b * layout.num_tokens * heads * head_dim > 2**31
    sl = [t.detach()[b:b + 1, :, :2] for t in (q, k, v, dout)]  # two heads of it against the reference
    f32 = [t.float() for t in sl[:3]]
    r_out, r_lse = reference.forward(*f32, layout.block_mask, layout.block_tokens, head_dim**-0.5)
    r_grads = reference.backward(sl[3].float(), *f32, r_out, r_lse, layout.block_mask, layout.block_tokens,
                                 head_dim**-0.5)
    low = sdpa_baseline(*sl, plan, head_dim**-0.5)
    for name, got, want, base in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (r_out, *r_grads), low):
        check_rule(name, got.detach()[b:b + 1, :, :2], want, base, dtype)


def test_flow_step_over_2_31_elements(gpu_device):
    from swift_kernels.sampler import reference as R

    if backend_unavailable_reason("triton", gpu_device) is not None:
        pytest.skip(backend_unavailable_reason("triton", gpu_device))
    if _free_gib() < 30:
        pytest.skip(f"needs about 30 GiB of free GPU memory, {_free_gib():.0f} free")
    # 2K latents of a long clip: [1, 48, 1600, 88, 160] = 2.16e9 elements (4.3 GB in bf16)
    B, C, F, H, W = 1, 48, 1600, 88, 160
    x, v = (torch.randn(B, C, F, H, W, device=gpu_device, dtype=torch.bfloat16) for _ in range(2))
    assert x.numel() > 2**31
    sigma, sigma_next, seed, offset = 0.9375, 0.8333, 11, 5
    got = flow_step(x, v, sigma, sigma_next, mode="renoise", seed=seed, offset=offset, backend="triton")
    # the last 10 frames of every channel lie past element 2**31 for most channels: their flat indices, the
    # reference noise drawn at them, and the reference step
    f = torch.arange(F - 10, F, device=gpu_device)
    g = (torch.arange(C, device=gpu_device)[:, None, None, None] * (F * H * W) + f[None, :, None, None] * (H * W)
         + torch.arange(H, device=gpu_device)[None, None, :, None] * W + torch.arange(W, device=gpu_device)) + offset
    assert g.max().item() > 2**31
    eps = R.noise_at(seed, g.reshape(-1)).view(C, 10, H, W)
    xt, vt = x[0, :, F - 10:].float(), v[0, :, F - 10:].float()
    want = (1 - sigma_next) * (xt - sigma * vt) + sigma_next * eps
    torch.testing.assert_close(got[0, :, F - 10:].float(), want, rtol=8e-3, atol=1e-2)
