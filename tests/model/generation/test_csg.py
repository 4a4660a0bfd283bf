"""The Stage II CSG scheduler: windows, timesteps, RoPE positions, write-back, bounded window size."""

import pytest
import torch

from swift_model.generation.csg import CSGPlan, flow_steps, parse_neighbors, run_csg

STEPS = flow_steps(4, 5.0)


def test_flow_steps_paper_schedule():
    assert [round(s, 4) for _, s, _ in STEPS] == [1.0, 0.9375, 0.8333, 0.625]
    assert [round(t, 2) for t, _, _ in STEPS] == [1000.0, 937.5, 833.33, 625.0]
    assert STEPS[-1][2] == 0.0
    refine = flow_steps(4, 5.0, start_sigma=0.6)
    assert refine[0][1] == pytest.approx(0.6) and refine[-1][2] == 0.0
    assert all(a[1] > b[1] for a, b in zip(refine, refine[1:]))


def test_windows_t21_m2_left1():
    plan = CSGPlan(21, 2, (1, 0))
    assert plan.num_segments == 10
    expected = [(0, 1, 2)] + [(0, 2 * s, 2 * s + 1, 2 * s + 2) for s in range(1, 10)]
    assert [w.blocks for w in plan.windows] == expected
    assert [w.targets for w in plan.windows] == [(2 * s + 1, 2 * s + 2) for s in range(10)]
    assert plan.windows[0].noisy == (False, True, True)
    assert all(w.noisy == (False, False, True, True) for w in plan.windows[1:])


def test_windows_t21_m3_both1():
    plan = CSGPlan(21, 3, (1, 1))
    assert [w.blocks for w in plan.windows] == [
        (0, 1, 2, 3, 4), (0, 3, 4, 5, 6, 7), (0, 6, 7, 8, 9, 10), (0, 9, 10, 11, 12, 13),
        (0, 12, 13, 14, 15, 16), (0, 15, 16, 17, 18, 19), (0, 18, 19, 20)]
    assert plan.windows[0].noisy == (False, True, True, True, False)
    assert plan.windows[-1].noisy == (False, False, True, True)
    assert plan.windows[-1].targets == (19, 20)


@pytest.mark.parametrize("m,n", [(1, (0, 0)), (2, (1, 0)), (3, (1, 1)), (4, (2, 1)), (5, (0, 2))])
def test_windows_general_rule(m, n):
    T = 21
    plan = CSGPlan(T, m, n)
    for s, w in enumerate(plan.windows):
        start, end = 1 + s * m, min(1 + (s + 1) * m, T)
        lo, hi = max(1, start - n[0]), min(T, end + n[1])
        assert w.blocks == (0,) + tuple(range(lo, hi))
        assert w.targets == tuple(range(start, end))
        assert torch.equal(w.frame_positions(), torch.tensor(w.blocks))


def test_token_timesteps():
    w = CSGPlan(21, 2, (1, 1)).windows[3]  # blocks 0, 6, 7, 8, 9
    tt = w.token_timesteps(937.5, block_tokens=5, batch=2)
    assert tt.shape == (2, 25) and tt.dtype == torch.float32
    expected = torch.tensor([0.0, 0.0, 937.5, 937.5, 0.0]).repeat_interleave(5)
    assert torch.equal(tt[0], expected) and torch.equal(tt[1], expected)


def test_parse_neighbors_and_bad_input():
    assert parse_neighbors("1,0") == (1, 0)
    assert parse_neighbors("2") == (2, 2)
    assert parse_neighbors((1, 1)) == (1, 1)
    with pytest.raises(ValueError, match="neighbors"):
        parse_neighbors("a,b")
    with pytest.raises(ValueError, match="neighbors"):
        parse_neighbors((-1, 0))
    with pytest.raises(ValueError, match="segment_blocks"):
        CSGPlan(21, 0)
    with pytest.raises(ValueError, match="num_blocks"):
        CSGPlan(1, 2)
    with pytest.raises(TypeError, match="num_blocks"):
        CSGPlan(21.0, 2)


class Recorder:
    """A fake DiT: records every call and returns the oracle velocity that makes x0 equal ``target``."""

    def __init__(self, target, block_tokens):
        self.target = target
        self.P = block_tokens
        self.calls = []

    def __call__(self, x, ref, tt, positions, layout):
        self.calls.append(dict(x=x.clone(), ref=ref.clone(), tt=tt.clone(), pos=positions.clone(), layout=layout))
        # Read the sigma of the noisy tokens back from the timestep (t = 1000*sigma).
        sigma = tt.max().item() / 1000.0
        tgt = self.target.index_select(2, positions)
        return (x - tgt) / sigma


def _inputs(T, B=1, C=3, H=2, W=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_ref = torch.randn(B, C, T, H, W, generator=g)
    target = torch.randn(B, C, T, H, W, generator=g)
    return z_ref, target


@pytest.mark.parametrize("m,n", [(2, (1, 0)), (3, (1, 1)), (1, (2, 0))])
@pytest.mark.parametrize("kind", ["swift", "refine"])
def test_run_csg_sequential(m, n, kind):
    T, H, W = 21, 2, 4
    P = H * W // 4 if H * W >= 4 else 1
    z_ref, target = _inputs(T, H=H, W=W)
    plan = CSGPlan(T, m, n, block_tokens=P)
    steps = STEPS if kind == "swift" else flow_steps(4, 5.0, start_sigma=0.6)
    rec = Recorder(target, P)
    writes = []
    out = run_csg(rec, z_ref, plan, steps, kind=kind, seed=3, on_write=lambda s, b: writes.append((s, b)))

    # One call per (segment, step), in segment order, each on its window with clip positions.
    assert len(rec.calls) == plan.num_segments * len(steps)
    for i, call in enumerate(rec.calls):
        w = plan.windows[i // len(steps)]
        t = steps[i % len(steps)][0]
        assert torch.equal(call["pos"], torch.tensor(w.blocks))
        assert call["layout"] == w.layout
        assert call["x"].shape[2] == w.num_blocks
        assert torch.equal(call["tt"], w.token_timesteps(t, P))
        # The reference passed along is z_ref at the window's blocks.
        assert torch.equal(call["ref"], z_ref[:, :, list(w.blocks)])
        # Conditioning tokens: anchor and right neighbours from z_ref, left neighbours already finished.
        for j, (b, noisy) in enumerate(zip(w.blocks, w.noisy)):
            if noisy:
                continue
            expected = out[:, :, b] if 0 < b < w.targets[0] else z_ref[:, :, b]
            assert torch.equal(call["x"][:, :, j], expected), (i, b)

    # Each non-anchor block written exactly once, anchor never; the anchor is bit-identical to z_ref.
    written = [b for _, blocks in writes for b in blocks]
    assert sorted(written) == list(range(1, T))
    assert [s for s, _ in writes] == list(range(plan.num_segments))
    assert torch.equal(out[:, :, 0], z_ref[:, :, 0])
    # The oracle velocity makes every generated block equal its target.
    torch.testing.assert_close(out[:, :, 1:], target[:, :, 1:], rtol=1e-4, atol=1e-4)


def test_run_csg_joint():
    T = 9
    z_ref, target = _inputs(T)
    plan = CSGPlan(T, 2, (1, 0), block_tokens=2)
    rec = Recorder(target, 2)
    writes = []
    out = run_csg(rec, z_ref, plan, STEPS, joint=True, on_write=lambda s, b: writes.append(b))
    assert len(rec.calls) == len(STEPS)
    for call, (t, _, _) in zip(rec.calls, STEPS):
        assert call["layout"] == plan.clip_layout and call["layout"].mode == "clip"
        assert torch.equal(call["pos"], torch.arange(T))
        assert torch.equal(call["x"][:, :, 0], z_ref[:, :, 0])
        expected = torch.tensor([0.0] + [t] * (T - 1)).repeat_interleave(2)
        assert torch.equal(call["tt"][0], expected)
    assert writes == [tuple(range(1, T))]
    torch.testing.assert_close(out[:, :, 1:], target[:, :, 1:], rtol=1e-4, atol=1e-4)
    assert torch.equal(out[:, :, 0], z_ref[:, :, 0])


@pytest.mark.parametrize("m,n", [(2, (1, 0)), (3, (1, 1))])
def test_largest_call_independent_of_frames(m, n):
    sizes = []
    for frames in (81, 161, 241):
        T = (frames - 1) // 4 + 1
        plan = CSGPlan(T, m, n, block_tokens=4)
        z_ref, target = _inputs(T, C=2, H=1, W=2)
        rec = Recorder(target, 4)
        run_csg(rec, z_ref, plan, STEPS[-1:], seed=0)
        sizes.append((plan.max_window_tokens, max(c["x"].numel() for c in rec.calls), len(rec.calls)))
    assert sizes[0][0] == sizes[1][0] == sizes[2][0] == (1 + n[0] + m + n[1]) * 4
    assert sizes[0][1] == sizes[1][1] == sizes[2][1]
    # The number of calls grows with the clip (about linearly), the size of each does not.
    assert sizes[0][2] < sizes[1][2] < sizes[2][2]


def test_seed_determinism():
    z_ref, _ = _inputs(7)
    plan = CSGPlan(7, 2, (1, 0))

    def model(x, ref, tt, pos, layout):  # a smooth non-oracle model: output depends on the noise
        return 0.5 * x + 0.1 * ref

    a = run_csg(model, z_ref, plan, STEPS, seed=1)
    b = run_csg(model, z_ref, plan, STEPS, seed=1)
    c = run_csg(model, z_ref, plan, STEPS, seed=2)
    assert torch.equal(a, b)
    assert not torch.allclose(a[:, :, 1:], c[:, :, 1:])


def test_run_csg_bad_input():
    z_ref, _ = _inputs(7)
    plan = CSGPlan(7, 2, (1, 0))
    model = lambda x, ref, tt, pos, layout: x  # noqa: E731
    with pytest.raises(ValueError, match="num_blocks"):
        run_csg(model, z_ref[:, :, :5], plan, STEPS)
    with pytest.raises(ValueError, match="kind"):
        run_csg(model, z_ref, plan, STEPS, kind="bogus")
    with pytest.raises(ValueError, match="z_ref"):
        run_csg(model, z_ref[0], plan, STEPS)


def _cat_model(C):
    """A smooth non-oracle model of the concatenated input (its output depends on the noise and on ref)."""

    def f(inp):
        inp = inp.float()
        return 0.5 * inp[:, :C] + 0.1 * inp[:, C:] - 0.05 * inp[:, :C].roll(1, dims=2)

    return f


@pytest.mark.parametrize("m,n,joint", [(2, (1, 0), False), (3, (1, 1), False), (2, (1, 0), True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ref_matches_cat(m, n, joint, dtype):
    # The fused model input (flow_step(ref=, out=)) must give the same model inputs and the same latents,
    # bit for bit, as building it with torch.cat after an unfused step.
    T, C = 9, 3
    z_ref, _ = _inputs(T, C=C)
    plan = CSGPlan(T, m, n, block_tokens=2)
    f = _cat_model(C)
    seen_cat, seen_fused = [], []

    def cat_model(x, ref, tt, pos, layout):
        inp = torch.cat([x, ref], 1).to(dtype)
        seen_cat.append(inp.clone())
        return f(inp)

    def fused_model(inp, ref, tt, pos, layout):
        assert ref is None and inp.dtype == dtype and inp.shape[1] == 2 * C
        seen_fused.append(inp.clone())
        return f(inp)

    a = run_csg(cat_model, z_ref, plan, STEPS, seed=5, joint=joint)
    b = run_csg(fused_model, z_ref, plan, STEPS, seed=5, joint=joint, fuse_ref=True, input_dtype=dtype)
    assert len(seen_cat) == len(seen_fused) == (1 if joint else plan.num_segments) * len(STEPS)
    for i, (u, w) in enumerate(zip(seen_cat, seen_fused)):
        assert torch.equal(u, w), i
    assert torch.equal(a, b)
    assert not torch.allclose(a[:, :, 1:], z_ref[:, :, 1:])


def test_fused_ref_oracle():
    T, H, W = 21, 2, 4
    z_ref, target = _inputs(T, H=H, W=W)
    plan = CSGPlan(T, 2, (1, 0), block_tokens=2)
    rec = Recorder(target, 2)
    C = z_ref.shape[1]

    def fused(inp, ref, tt, pos, layout):
        return rec(inp[:, :C], inp[:, C:], tt, pos, layout)

    out = run_csg(fused, z_ref, plan, STEPS, seed=3, fuse_ref=True)
    for i, call in enumerate(rec.calls):
        w = plan.windows[i // len(STEPS)]
        assert torch.equal(call["ref"], z_ref[:, :, list(w.blocks)])
    torch.testing.assert_close(out[:, :, 1:], target[:, :, 1:], rtol=1e-4, atol=1e-4)
    assert torch.equal(out[:, :, 0], z_ref[:, :, 0])
    with pytest.raises(ValueError, match="fuse_ref"):
        run_csg(fused, z_ref, plan, STEPS, kind="refine", fuse_ref=True)


@pytest.mark.parametrize("fuse", [False, True])
def test_run_csg_guidance(fuse):
    T, C = 7, 3
    z_ref, _ = _inputs(T, C=C)
    plan = CSGPlan(T, 2, (1, 0))
    f = _cat_model(C)

    def split(x, ref):
        return (x[:, :C], x[:, C:]) if ref is None else (x, ref)

    def pair(x, ref, tt, pos, layout):
        xx, rr = split(x, ref)
        inp = torch.cat([xx, rr], 1)
        return f(inp), f(inp) * 0.3 + 0.2

    def single(x, ref, tt, pos, layout):
        return pair(x, ref, tt, pos, layout)[0]

    def mixed(g):
        def fn(x, ref, tt, pos, layout):
            vc, vu = pair(x, ref, tt, pos, layout)
            return vu + g * (vc - vu)
        return fn

    kw = dict(seed=2, fuse_ref=fuse)
    base = run_csg(single, z_ref, plan, STEPS, **kw)
    assert torch.equal(run_csg(pair, z_ref, plan, STEPS, guidance=1.0, **kw), base)
    g3 = run_csg(pair, z_ref, plan, STEPS, guidance=3.0, **kw)
    assert not torch.allclose(g3[:, :, 1:], base[:, :, 1:])
    torch.testing.assert_close(g3, run_csg(mixed(3.0), z_ref, plan, STEPS, **kw), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="guidance"):
        run_csg(pair, z_ref, plan, STEPS, guidance="big", **kw)
