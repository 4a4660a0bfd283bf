"""Triton kernel of the fused sampler step (one read of x and v, one write of each output)."""

from __future__ import annotations

import triton
import triton.language as tl

MODE_EULER = 0
MODE_RENOISE = 1
MODE_FINAL = 2  # sigma_next == 0: the new state is x0


@triton.jit
def philox_randint4x(seed, c):
    """The four uint32 words of Philox4x32-10 keyed by ``seed`` at the int64 counter ``c`` (see reference.py).

    The counter goes in as two 32-bit words ``(lo32(c), hi32(c), 0, 0)``, so every Triton version runs the
    32-bit Philox: ``tl.randint4x`` on an int64 counter does exactly this from Triton 3.4 on, but before 3.4 it
    ran the 64-bit Philox variant, whose numbers differ from the reference's.
    """
    lo = (c & 0xFFFFFFFF).to(tl.uint32)
    hi = (c >> 32).to(tl.uint32)
    zero = lo * 0
    return tl.philox(seed, lo, hi, zero, zero)


@triton.jit
def philox_randn4x(seed, c):
    """The four normals of :func:`philox_randint4x` (Triton's uniform map and Box-Muller, as ``tl.randn4x``)."""
    i1, i2, i3, i4 = philox_randint4x(seed, c)
    n1, n2 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i1), tl.uint_to_uniform_float(i2))
    n3, n4 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i3), tl.uint_to_uniform_float(i4))
    return n1, n2, n3, n4


@triton.jit
def _noise(seed, g0, g, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Normal of global element index g: lane g % 4 of philox_randn4x(seed, g // 4) (see reference.noise_at).

    ALIGNED (g0, the block's first index, is a multiple of 4): one generator call per 4 elements, the
    four normals interleaved back into element order. Otherwise each element computes its own quad.
    """
    if ALIGNED:
        c = g0 // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
        n1, n2, n3, n4 = philox_randn4x(seed, c)
        # join(join(n1, n3), join(n2, n4))[q, i, j] = n(2i + j + 1): flattening gives element order
        eps = tl.reshape(tl.join(tl.join(n1, n3), tl.join(n2, n4)), (BLOCK,))
    else:
        n1, n2, n3, n4 = philox_randn4x(seed, g // 4)
        lane = g % 4
        eps = tl.where(lane == 0, n1, tl.where(lane == 1, n2, tl.where(lane == 2, n3, n4)))
    return eps


@triton.jit
def _flow_step_kernel(
    x_ptr, v_ptr, vu_ptr, ref_ptr, mask_ptr,
    state_ptr, mi_ptr, x0_ptr,
    R, S, R_REF, G, NG,
    s_sb, s_sr, mi_sb, mi_sr,
    sigma, coef_a, coef_b, guidance, seed, offset,
    MODE: tl.constexpr, HAS_CFG: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr,
    WRITE_STATE: tl.constexpr, WRITE_MI_STATE: tl.constexpr, WRITE_X0: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    # x is viewed as [B, R, S] (contiguous); program (pid_s, pid_row) covers BLOCK elements of one row.
    # Rows R..R+R_REF-1 of each sample copy ref into the model-input buffer (channel concat).
    pid_s = tl.program_id(0)
    row = tl.program_id(1)
    rows = R + R_REF
    b = row // rows
    r = row % rows
    s = pid_s * BLOCK + tl.arange(0, BLOCK)
    inb = s < S
    if r < R:
        src = (b * R + r).to(tl.int64) * S + s
        xv = tl.load(x_ptr + src, mask=inb, other=0.0)
        xf = xv.to(tl.float32)
        vf = tl.load(v_ptr + src, mask=inb, other=0.0).to(tl.float32)
        if HAS_CFG:
            vu = tl.load(vu_ptr + src, mask=inb, other=0.0).to(tl.float32)
            vf = vu + guidance * (vf - vu)
        x0 = xf - sigma * vf
        if MODE == 2:
            new = x0
        elif MODE == 0:
            new = xf + coef_a * vf  # coef_a = sigma_next - sigma
        else:
            # noise is a function of (seed, flat index in x + offset) only: no tensor, same on any run
            eps = _noise(seed, (b * R + r).to(tl.int64) * S + pid_s * BLOCK + offset, src + offset, BLOCK, ALIGNED)
            new = coef_a * x0 + coef_b * eps  # coef_a = 1 - sigma_next, coef_b = sigma_next
        if HAS_MASK:
            cond = tl.load(mask_ptr + b * NG + s // G, mask=inb, other=0) != 0
            new = tl.where(cond, xf, new)
            x0 = tl.where(cond, xf, x0)
        if WRITE_STATE:
            st = state_ptr + b.to(tl.int64) * s_sb + r.to(tl.int64) * s_sr + s
            tl.store(st, new.to(state_ptr.dtype.element_ty), mask=inb)
        if WRITE_MI_STATE:
            mi = mi_ptr + b.to(tl.int64) * mi_sb + r.to(tl.int64) * mi_sr + s
            tl.store(mi, new.to(mi_ptr.dtype.element_ty), mask=inb)
        if WRITE_X0:
            tl.store(x0_ptr + src, x0.to(x0_ptr.dtype.element_ty), mask=inb)
    else:
        if HAS_REF:
            rr = r - R
            src = (b * R_REF + rr).to(tl.int64) * S + s
            val = tl.load(ref_ptr + src, mask=inb, other=0.0)
            mi = mi_ptr + b.to(tl.int64) * mi_sb + r.to(tl.int64) * mi_sr + s
            tl.store(mi, val.to(mi_ptr.dtype.element_ty), mask=inb)


def flow_step(
    x3, v3, vu3, ref3, mask2, G, state3, mi3, x03, *, sigma, sigma_next, mode, guidance, seed, offset
):
    """Launch the kernel on [B, R, S] views (see api.flow_step for the semantics).

    ``state3`` / ``mi3``: output views with contiguous last dim (either may be None; when the state is a
    view of the model input, pass ``state3=None`` and the state rows are written through ``mi3``).
    """
    B, R, S = x3.shape
    R_REF = ref3.shape[1] if ref3 is not None else 0
    # The step coefficients are formed in Python (double) and rounded once to fp32, exactly as the
    # reference's scalar arithmetic does, so both backends multiply by the same fp32 numbers.
    if sigma_next == 0:
        kmode, coef_a, coef_b = MODE_FINAL, 0.0, 0.0
    elif mode == "euler":
        kmode, coef_a, coef_b = MODE_EULER, sigma_next - sigma, 0.0
    else:
        kmode, coef_a, coef_b = MODE_RENOISE, 1.0 - sigma_next, sigma_next
    write_state = state3 is not None
    write_mi_state = mi3 is not None
    BLOCK = 1024 if S >= 1024 else max(16, triton.next_power_of_2(S))
    # every block starts on a multiple of 4 of the global element index when S and offset are
    aligned = S % 4 == 0 and int(offset) % 4 == 0
    grid = (triton.cdiv(S, BLOCK), B * (R + R_REF))
    dummy = x3
    _flow_step_kernel[grid](
        x3, v3, vu3 if vu3 is not None else dummy, ref3 if ref3 is not None else dummy,
        mask2 if mask2 is not None else dummy,
        state3 if write_state else dummy, mi3 if mi3 is not None else dummy, x03 if x03 is not None else dummy,
        R, S, R_REF, G, mask2.shape[1] if mask2 is not None else 1,
        state3.stride(0) if write_state else 0, state3.stride(1) if write_state else 0,
        mi3.stride(0) if mi3 is not None else 0, mi3.stride(1) if mi3 is not None else 0,
        float(sigma), float(coef_a), float(coef_b), float(guidance if guidance is not None else 1.0), int(seed), int(offset),
        MODE=kmode, HAS_CFG=vu3 is not None, HAS_MASK=mask2 is not None, HAS_REF=ref3 is not None,
        WRITE_STATE=write_state, WRITE_MI_STATE=write_mi_state, WRITE_X0=x03 is not None,
        ALIGNED=aligned, BLOCK=BLOCK, num_warps=4,
    )
