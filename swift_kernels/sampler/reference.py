"""PyTorch reference of the fused sampler step, including the counter-based Gaussian noise.

The noise of element ``i`` (flat index in the state tensor ``x``) is a function of ``(seed, g)`` only,
with ``g = i + offset``: one Philox4x32-10 call keyed by the 64-bit seed on the counter
``c = g // 4`` (as ``(lo32(c), hi32(c), 0, 0)``) gives four 32-bit integers, mapped to four uniforms and
Box-Muller'd in pairs into four normals ``(r1 cos t1, r1 sin t1, r2 cos t2, r2 sin t2)``; element g takes
normal number ``g % 4``. This is exactly the Triton kernel's ``philox_randn4x(seed, c)`` (Triton's
``tl.randn4x(seed, c)`` from Triton 3.4 on; the kernel spends one generator call per four elements), re-implemented with int64 tensor arithmetic so that the torch and
Triton backends draw the same noise: the Philox integers and the uniforms agree bit for bit; the final
log/sqrt/cos/sin are libm-dependent, so the normals agree to a few ulp (not necessarily bitwise).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float scale for 32-bit ints


def _mulhilo(a: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product of the constant ``a`` and uint32 values ``c`` (int64).

    The product needs up to 64 bits, which overflows signed int64, so ``c`` is split in 16-bit halves.
    """
    c_hi = c >> 16
    c_lo = c & 0xFFFF
    p_hi = a * c_hi  # < 2**48
    p_lo = a * c_lo  # < 2**48
    t = p_hi + (p_lo >> 16)
    hi = t >> 16
    lo = ((p_hi << 16) + p_lo) & _M32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int, n_rounds: int = 10):
    """The Philox4x32 block function (Salmon et al., Random123) on int64 tensors holding uint32 values."""
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox4x32(seed: int, counter: torch.Tensor, n_rounds: int = 10):
    """Philox4x32 of counters ``(lo32(counter), hi32(counter), 0, 0)`` keyed by the 64-bit ``seed``.

    ``counter`` is an int64 tensor of non-negative values; returns four int64 tensors of uint32 values.
    This is Triton's ``randint4x(seed, counter)`` for an int64 counter.
    """
    zero = torch.zeros_like(counter)
    return philox4x32_10(counter & _M32, (counter >> 32) & _M32, zero, zero, seed & _M32, (seed >> 32) & _M32, n_rounds)


def uint32_to_uniform(u: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit values: bitcast to int32, fold negatives, scale (fp32)."""
    s = torch.where(u >= 2**31, u - 2**32, u)  # bitcast to int32
    s = torch.where(s < 0, -s - 1, s)  # ~x for negatives
    return s.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def philox_uniforms(seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four fp32 uniforms of ``tl.rand4x(seed, counter)`` (bit-exact with Triton)."""
    return tuple(uint32_to_uniform(i) for i in philox4x32(seed, counter))


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Triton's pair_uniform_to_normal, in fp32
    u1 = torch.clamp_min(u1, 1.0e-7)
    th = torch.tensor(6.283185307179586, dtype=torch.float32) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def philox_randn4x(seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Four standard normal fp32 draws per int64 counter, as Triton's ``tl.randn4x(seed, counter)``."""
    u1, u2, u3, u4 = philox_uniforms(seed, counter)
    return (*_box_muller(u1, u2), *_box_muller(u3, u4))


def noise_at(seed: int, g: torch.Tensor) -> torch.Tensor:
    """The fp32 normal of global element index ``g`` (int64 tensor): lane ``g % 4`` of randn4x(seed, g // 4)."""
    n = torch.stack(philox_randn4x(int(seed), g // 4), dim=-1)
    return n.gather(-1, (g % 4).unsqueeze(-1)).squeeze(-1)


def noise_like(x: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """The fp32 noise that ``flow_step(mode="renoise")`` adds to ``x``: element i gets ``noise_at(seed, i + offset)``."""
    g = torch.arange(x.numel(), dtype=torch.int64, device=x.device) + int(offset)
    return noise_at(seed, g).reshape(x.shape)


def flow_step(
    x, v, sigma, sigma_next, *, mode="renoise", seed=0, offset=0, elem_mask=None, v_uncond=None, guidance=None
):
    """One sampler step in fp32 (fp64 when x is fp64); returns ``(new_state, x0)`` in the compute dtype.

    ``elem_mask`` (bool, broadcastable to x) marks conditioning elements: they keep x (new_state = x0 = x).
    On the last step (``sigma_next == 0``) the new state is x0 in both modes.
    """
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(ct)
    vf = v.to(ct)
    if v_uncond is not None:
        vu = v_uncond.to(ct)
        vf = vu + guidance * (vf - vu)
    x0 = xf - sigma * vf
    if sigma_next == 0:
        new = x0
    elif mode == "euler":
        new = xf + (sigma_next - sigma) * vf  # coefficient formed in double, as the kernel's
    else:
        eps = noise_like(x, seed, offset).to(ct)
        new = (1.0 - sigma_next) * x0 + sigma_next * eps
    if elem_mask is not None:
        new = torch.where(elem_mask, xf, new)
        x0 = torch.where(elem_mask, xf, x0)
    return new, x0
