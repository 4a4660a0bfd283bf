"""Few-step flow schedule and the fused sampler step (torch reference and Triton kernel)."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from swift_kernels._backend import BackendUnavailableError
from swift_kernels.sampler import FlowSchedule, FlowStepResult, flow_step
from swift_kernels.sampler import reference as R
from swift_kernels.sampler.triton_kernels import philox_randint4x, philox_randn4x

# ----------------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------------


def test_flow_schedule_default():
    s = FlowSchedule()
    expected = [1.0, 0.9375, 2.5 / 3.0, 0.625]
    torch.testing.assert_close(s.sigmas, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(s.timesteps, 1000 * torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(s.next_sigmas, torch.tensor(expected[1:] + [0.0], dtype=torch.float64), rtol=0, atol=1e-15)
    assert len(s) == 4
    steps = list(s)
    assert len(steps) == 4 and all(isinstance(v, float) for step in steps for v in step)
    assert steps[-1][2] == 0.0 and steps[0][:2] == (1000.0, 1.0)


def test_flow_schedule_formula_other_shift():
    s = FlowSchedule(timesteps=(900, 400), shift=3.0)
    for sig, t in zip(s.sigmas.tolist(), (0.9, 0.4)):
        assert math.isclose(sig, 3 * t / (1 + 2 * t), rel_tol=1e-15)
    assert FlowSchedule(timesteps=(500,), shift=1.0).sigmas.tolist() == [0.5]


@pytest.mark.parametrize(
    "kwargs",
    [dict(timesteps=()), dict(timesteps=(1000, 1000)), dict(timesteps=(500, 750)), dict(timesteps=(1001,)),
     dict(timesteps=(0,)), dict(shift=0.0), dict(shift=-1.0)],
)
def test_flow_schedule_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        FlowSchedule(**kwargs)


# ----------------------------------------------------------------------------------------------
# Philox noise: the reference matches Random123's known answers and Triton's generator
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ctr, key, expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_philox_known_answers(ctr, key, expected):
    out = R.philox4x32_10(*(torch.tensor([c]) for c in ctr), *key)
    assert tuple(int(o) for o in out) == expected


@triton.jit
def _draw_kernel(i_ptr, n_ptr, seed, offset, N, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    c = o.to(tl.int64) + offset
    i1, i2, i3, i4 = philox_randint4x(seed, c)  # the sampler kernel's generator
    n1, n2, n3, n4 = philox_randn4x(seed, c)
    tl.store(i_ptr + 4 * o, i1.to(tl.int32, bitcast=True), mask=m)
    tl.store(i_ptr + 4 * o + 1, i2.to(tl.int32, bitcast=True), mask=m)
    tl.store(i_ptr + 4 * o + 2, i3.to(tl.int32, bitcast=True), mask=m)
    tl.store(i_ptr + 4 * o + 3, i4.to(tl.int32, bitcast=True), mask=m)
    tl.store(n_ptr + 4 * o, n1, mask=m)
    tl.store(n_ptr + 4 * o + 1, n2, mask=m)
    tl.store(n_ptr + 4 * o + 2, n3, mask=m)
    tl.store(n_ptr + 4 * o + 3, n4, mask=m)


@pytest.mark.triton_device
@pytest.mark.parametrize("seed, offset", [(12345, 0), (2**40 + 7, 2**33 + 5)])
def test_reference_noise_matches_kernel_philox(seed, offset):
    N = 256
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ints = torch.full((N, 4), -1, dtype=torch.int32, device=dev)
    normals = torch.full((N, 4), float("nan"), device=dev)
    _draw_kernel[(triton.cdiv(N, 128),)](ints, normals, seed, offset, N, BLOCK=128)
    ctr = torch.arange(N, dtype=torch.int64) + offset
    ref_ints = torch.stack(R.philox4x32(seed, ctr), dim=-1)
    assert torch.equal(ints.cpu().long() & 0xFFFFFFFF, ref_ints)
    # the normals go through libm log/sqrt/cos/sin: equal up to a few ulp
    torch.testing.assert_close(normals.cpu(), torch.stack(R.philox_randn4x(seed, ctr), dim=-1), rtol=0, atol=4e-6)
    # element g of the noise is lane g % 4 of counter g // 4
    g = torch.arange(4 * N, dtype=torch.int64) + 4 * offset
    torch.testing.assert_close(R.noise_at(seed, g), normals.cpu().flatten(), rtol=0, atol=4e-6)


# ----------------------------------------------------------------------------------------------
# flow_step against fp64 formulas
# ----------------------------------------------------------------------------------------------


def _latent(B=2, C=4, F=3, H=4, W=6, dtype=torch.float32):
    x = torch.randn(B, C, F, H, W).to(dtype)
    v = torch.randn(B, C, F, H, W).to(dtype)
    return x, v


def _f64_step(x, v, sigma, sigma_next, mode, eps=None, vu=None, g=None):
    xd, vd = x.double(), v.double()
    if vu is not None:
        vd = vu.double() + g * (vd - vu.double())
    x0 = xd - sigma * vd
    if sigma_next == 0:
        return x0, x0
    if mode == "euler":
        return xd + (sigma_next - sigma) * vd, x0
    return (1 - sigma_next) * x0 + sigma_next * eps.double(), x0


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=2e-3), torch.bfloat16: dict(rtol=8e-3, atol=2e-2)}
CPU_BACKENDS = ("torch", "triton")


@pytest.mark.parametrize(
    "backend, dtype",
    [("torch", torch.float32), ("torch", torch.float16), ("torch", torch.bfloat16), ("triton", torch.float32), ("triton", torch.float16)],
)
@pytest.mark.parametrize("mode", ["euler", "renoise"])
def test_flow_step_formula(backend, dtype, mode):
    x, v = _latent(dtype=dtype)
    vu = torch.randn_like(x)
    sigma, sigma_next, seed, offset = 0.9375, 0.8333, 77, 1000
    res = flow_step(x, v, sigma, sigma_next, mode=mode, seed=seed, offset=offset, return_x0=True, backend=backend)
    eps = R.noise_like(x, seed, offset)
    new64, x064 = _f64_step(x, v, sigma, sigma_next, mode, eps)
    assert isinstance(res, FlowStepResult) and res.model_input is None
    assert res.x.dtype == dtype and res.x0.dtype == dtype
    torch.testing.assert_close(res.x.double(), new64, **TOL[dtype])
    torch.testing.assert_close(res.x0.double(), x064, **TOL[dtype])
    # classifier-free guidance
    g = 3.5
    out = flow_step(x, v, sigma, sigma_next, mode=mode, seed=seed, offset=offset, v_uncond=vu, guidance=g, backend=backend)
    new64, _ = _f64_step(x, v, sigma, sigma_next, mode, eps, vu, g)
    torch.testing.assert_close(out.double(), new64, **TOL[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["euler", "renoise"])
def test_last_step_returns_x0_exactly(backend, mode):
    x, v = _latent(dtype=torch.float16)
    sigma = 0.625
    res = flow_step(x, v, sigma, 0.0, mode=mode, seed=3, return_x0=True, backend=backend)
    expected = (x.float() - sigma * v.float()).to(torch.float16)
    assert torch.equal(res.x, expected)
    assert torch.equal(res.x0, expected)


@pytest.mark.interpreter
def test_backends_agree():
    x, v = _latent()
    for mode in ("euler", "renoise"):
        a = flow_step(x, v, 0.8, 0.5, mode=mode, seed=9, offset=5, return_x0=True, backend="torch")
        b = flow_step(x, v, 0.8, 0.5, mode=mode, seed=9, offset=5, return_x0=True, backend="triton")
        assert torch.equal(a.x0, b.x0)
        if mode == "euler":
            assert torch.equal(a.x, b.x)
        else:  # same noise up to libm ulps
            torch.testing.assert_close(a.x, b.x, rtol=0, atol=4e-6)


# ----------------------------------------------------------------------------------------------
# conditioning mask, reference concat, out buffers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_cond_frames_untouched_latent(backend, per_sample):
    x, v = _latent(B=2, F=4, dtype=torch.float16)
    x[0, 0, 0, 0, 0] = float("-0.0")  # bitwise copy keeps even the sign of zero
    mask = torch.tensor([True, False, True, False])
    if per_sample:
        mask = torch.stack([mask, torch.tensor([False, True, False, False])])
    res = flow_step(x, v, 0.9, 0.6, seed=1, cond_mask=mask, return_x0=True, backend=backend)
    full = flow_step(x, v, 0.9, 0.6, seed=1, backend=backend)
    m = mask.expand(2, 4)
    for b in range(2):
        for f in range(4):
            if m[b, f]:
                assert torch.equal(res.x[b, :, f].view(torch.int16), x[b, :, f].view(torch.int16))
                assert torch.equal(res.x0[b, :, f], x[b, :, f])
            else:  # noisy frames get the same result (and noise) as without a mask
                assert torch.equal(res.x[b, :, f], full[b, :, f])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cond_tokens_untouched(backend):
    B, L, C = 2, 10, 12
    x = torch.randn(B, L, C)
    v = torch.randn(B, L, C)
    mask = torch.rand(B, L) < 0.4
    mask[0, 0] = True
    mask[1, 0] = False
    out = flow_step(x, v, 0.7, 0.3, mode="euler", cond_mask=mask, backend=backend)
    assert torch.equal(out[mask], x[mask])
    expected = x + (0.3 - 0.7) * v
    torch.testing.assert_close(out[~mask], expected[~mask], rtol=1e-6, atol=1e-6)
    out1 = flow_step(x, v, 0.7, 0.3, seed=4, cond_mask=mask[0], backend=backend)
    assert torch.equal(out1[:, mask[0]], x[:, mask[0]])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mi_dtype", [torch.float32, torch.float16])
def test_ref_concat_written_in_one_pass(backend, mi_dtype):
    x, v = _latent(B=2, C=4, dtype=torch.float32)
    ref = torch.randn(2, 3, *x.shape[2:]).to(torch.float16)
    out = torch.full((2, 7, *x.shape[2:]), float("nan"), dtype=mi_dtype)
    res = flow_step(x, v, 0.9, 0.5, seed=11, ref=ref, out=out, cond_mask=torch.tensor([True, False, False]), backend=backend)
    assert res.model_input is out and not out.isnan().any()
    plain = flow_step(x, v, 0.9, 0.5, seed=11, cond_mask=torch.tensor([True, False, False]), backend=backend)
    assert torch.equal(out[:, :4], plain.to(mi_dtype))
    assert torch.equal(out[:, 4:], ref.to(mi_dtype))
    assert torch.equal(res.x, plain)  # the state keeps x's dtype (a view of out when dtypes agree)
    if mi_dtype == x.dtype:
        assert res.x.data_ptr() == out.data_ptr()
    # without out: a new model-input buffer in x.dtype
    res2 = flow_step(x, v, 0.9, 0.5, seed=11, ref=ref, cond_mask=torch.tensor([True, False, False]), backend=backend)
    assert res2.model_input.dtype == x.dtype and torch.equal(res2.model_input[:, 4:], ref.float())
    assert torch.equal(res2.x, plain)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_and_in_place(backend):
    x, v = _latent()
    expected = flow_step(x, v, 0.8, 0.4, seed=2, backend=backend)
    out = torch.full_like(x, float("nan"))
    assert flow_step(x, v, 0.8, 0.4, seed=2, out=out, backend=backend) is out
    assert torch.equal(out, expected)
    xc = x.clone()
    flow_step(xc, v, 0.8, 0.4, seed=2, out=xc, backend=backend)
    assert torch.equal(xc, expected)


# ----------------------------------------------------------------------------------------------
# noise: determinism, independence, statistics
# ----------------------------------------------------------------------------------------------


def _noise(shape, seed, offset, backend):
    # sigma = sigma_next = 1: the renoised state is exactly the noise
    x = torch.randn(shape)
    v = torch.randn(shape)
    return flow_step(x, v, 1.0, 1.0, seed=seed, offset=offset, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_renoise_determinism_and_offsets(backend):
    x, v = _latent()
    a = flow_step(x, v, 0.9, 0.5, seed=123, offset=7, backend=backend)
    b = flow_step(x, v, 0.9, 0.5, seed=123, offset=7, backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, flow_step(x, v, 0.9, 0.5, seed=124, offset=7, backend=backend))
    # the noise of element i depends on i + offset only: a shifted offset shifts the stream (offset 3
    # also takes the kernel's unaligned path, offset 0 its 4-normals-per-call path)
    n0 = _noise((4, 64), 5, 0, backend).flatten()
    n1 = _noise((4, 64), 5, 3, backend).flatten()
    assert torch.equal(n0[3:], n1[:-3])
    n_odd = _noise((3, 21), 5, 0, backend).flatten()  # a row length that is not a multiple of 4
    assert torch.equal(n_odd, n0[: n_odd.numel()])
    # disjoint offsets give uncorrelated noise
    n2 = _noise((4, 64), 5, 256, backend).flatten()
    r = torch.corrcoef(torch.stack([n0, n2]))[0, 1].item()
    assert abs(r) < 5 / math.sqrt(n0.numel())


def test_seed_none_uses_torch_generator():
    x, v = _latent()
    torch.manual_seed(42)
    a = flow_step(x, v, 0.9, 0.5, backend="torch")
    torch.manual_seed(42)
    b = flow_step(x, v, 0.9, 0.5, backend="torch")
    c = flow_step(x, v, 0.9, 0.5, backend="torch")
    assert torch.equal(a, b) and not torch.equal(a, c)


def _check_normal(n: torch.Tensor):
    n = n.double().flatten()
    N = n.numel()
    assert torch.isfinite(n).all()
    assert abs(n.mean().item()) < 5 / math.sqrt(N)
    assert abs(n.var().item() - 1) < 5 * math.sqrt(2 / N)
    p = 0.6826894921370859  # P(|z| < 1)
    frac = (n.abs() < 1).double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / N)
    # Box-Muller tails: P(|z| > 3) = 0.0027
    tail = (n.abs() > 3).double().mean().item()
    assert abs(tail - 0.0026997960632601866) < 5 * math.sqrt(0.0027 / N) + 1e-5


def test_noise_statistics_torch_large():
    _check_normal(_noise((1 << 20,), 2024, 0, "torch"))


@pytest.mark.interpreter
def test_noise_statistics_triton():
    _check_normal(_noise((1 << 14,), 7, 3, "triton"))


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def test_flow_step_validation():
    x, v = _latent()
    with pytest.raises(ValueError, match="v must"):
        flow_step(x, v[:, :2], 0.9, 0.5)
    with pytest.raises(TypeError, match="x"):
        flow_step(x.to(torch.int32), v, 0.9, 0.5)
    with pytest.raises(ValueError, match="sigma"):
        flow_step(x, v, 0.5, 0.9)
    with pytest.raises(ValueError, match="mode"):
        flow_step(x, v, 0.9, 0.5, mode="ddim")
    with pytest.raises(ValueError, match="together"):
        flow_step(x, v, 0.9, 0.5, v_uncond=v)
    with pytest.raises(ValueError, match="seed"):
        flow_step(x, v, 0.9, 0.5, seed=-1)
    with pytest.raises(ValueError, match="offset"):
        flow_step(x, v, 0.9, 0.5, seed=1, offset=-3)
    with pytest.raises(ValueError, match="cond_mask"):
        flow_step(x, v, 0.9, 0.5, cond_mask=torch.tensor([True, False]))
    with pytest.raises(TypeError, match="cond_mask"):
        flow_step(x, v, 0.9, 0.5, cond_mask=torch.tensor([1, 0, 0]))
    with pytest.raises(ValueError, match="ref"):
        flow_step(x, v, 0.9, 0.5, ref=torch.randn(2, 3, 3, 4, 5))
    with pytest.raises(ValueError, match="out"):
        flow_step(x, v, 0.9, 0.5, ref=torch.randn(2, 3, 3, 4, 6), out=torch.empty_like(x))
    with pytest.raises(ValueError, match="contiguous"):
        flow_step(x.transpose(3, 4), v.transpose(3, 4), 0.9, 0.5)
    with pytest.raises(ValueError, match="v is on"):
        flow_step(x, v.to("meta"), 0.9, 0.5)
    with pytest.raises(ValueError, match="sigma <= 1"):
        flow_step(x, v, 2.0, 0.5)
    with pytest.raises(TypeError, match="seed"):
        flow_step(x, v, 0.9, 0.5, seed=1.5)
    with pytest.raises(TypeError, match="offset"):
        flow_step(x, v, 0.9, 0.5, seed=1, offset=1.5)
    # a non-tensor ref/out is named, not an AttributeError from the device check
    with pytest.raises(TypeError, match="ref"):
        flow_step(x, v, 0.9, 0.5, ref=[0.0])
    with pytest.raises(TypeError, match="out"):
        flow_step(x, v, 0.9, 0.5, out=[0.0])
    with pytest.raises(BackendUnavailableError):
        flow_step(x, v, 0.9, 0.5, backend="cuda")


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["euler", "renoise"])
def test_gpu_flow_step_bf16(mode, gpu_device):
    B, C, F, H, W = 1, 48, 5, 22, 40
    x = torch.randn(B, C, F, H, W, device=gpu_device).to(torch.bfloat16)
    v = torch.randn_like(x)
    ref = torch.randn(B, C, F, H, W, device=gpu_device).to(torch.bfloat16)
    mask = torch.tensor([True, False, False, False, True], device=gpu_device)
    out = torch.full((B, 2 * C, F, H, W), float("nan"), device=gpu_device, dtype=torch.bfloat16)
    a = flow_step(x, v, 0.9375, 0.8333, mode=mode, seed=99, offset=12, cond_mask=mask, ref=ref, out=out, return_x0=True, backend="triton")
    b = flow_step(x, v, 0.9375, 0.8333, mode=mode, seed=99, offset=12, cond_mask=mask, ref=ref, return_x0=True, backend="torch")
    assert not out.isnan().any()
    assert torch.equal(out[:, C:], ref)
    assert torch.equal(a.x[:, :, 0], x[:, :, 0]) and torch.equal(a.x[:, :, 4], x[:, :, 4])
    torch.testing.assert_close(a.x.float(), b.x.float(), rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(a.x0.float(), b.x0.float(), rtol=8e-3, atol=1e-2)
    # a large draw from the GPU kernel
    xs = torch.randn(1 << 22, device=gpu_device)
    _check_normal(flow_step(xs, torch.randn_like(xs), 1.0, 1.0, seed=5, backend="triton").cpu())


# ----------------------------------------------------------------------------------------------
# torch.library / torch.compile
# ----------------------------------------------------------------------------------------------


def test_flow_step_torch_compile_fullgraph():
    x, v = _latent()
    ref = torch.randn(2, 3, *x.shape[2:])
    mask = torch.tensor([True, False, False])

    def step(x, v, ref):
        r = flow_step(x, v, 0.9, 0.5, seed=7, offset=4, cond_mask=mask, ref=ref, return_x0=True, backend="torch")
        return r.x * 2, r.x0, r.model_input

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(x, v, ref), step(x, v, ref)):
        assert torch.equal(a, b)


def test_flow_step_opcheck():
    x, v = _latent()
    state = torch.empty_like(x)
    x0 = torch.empty_like(x)
    torch.library.opcheck(
        torch.ops.swift_kernels.flow_step_,
        (x, v, None, None, None, state, None, x0, 1, 0.9, 0.5, 1.0, 3, 0, "renoise", "torch"),
    )


def test_flow_step_env_backend_is_explicit(monkeypatch):
    """SWIFT_KERNELS_BACKEND=triton with float64 raises as backend='triton' does, instead of falling back."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SWIFT_KERNELS_BACKEND", "triton")
    x, v = (t.double() for t in _latent())
    with pytest.raises(TypeError, match="triton"):
        flow_step(x, v, 0.9, 0.5, seed=1)


def test_flow_schedule_rejects_bad_types():
    with pytest.raises(TypeError, match="shift"):
        FlowSchedule(shift=True)
    with pytest.raises(ValueError, match="shift"):
        FlowSchedule(shift=float("inf"))
    with pytest.raises(TypeError, match="timesteps"):
        FlowSchedule("1000")
    with pytest.raises(TypeError, match="timesteps"):
        FlowSchedule(["a", "b"])
