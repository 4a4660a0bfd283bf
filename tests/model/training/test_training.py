"""Stage II training in one process: the packed training sequence reproduces inference's window calls, the loss
reads only noisy tokens, timesteps, config, model initialisation, the stage-transition reference, exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import fake_prepared_data
from swift_kernels import CSGLayout
from swift_model import WanDiT, WanDiTConfig
from swift_model.loading.checkpoint import save_dit
from swift_model.generation.csg import CSGPlan, flow_steps, run_csg
from swift_model.training.packing import (TrainingWindows, choose_segments, flow_matching_loss, sample_sigmas, shift_sigma,
                                 window_inputs, window_spans)
from swift_model.training.trainer import Trainer, build_model, train
from swift_model.training.config import TrainConfig, make_config, read_toml
from swift_model.training.transition import remaining_steps, transition_latents

C, H, W = 48, 4, 6
P = (H // 2) * (W // 2)


def _clip(T=7, B=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z, z_ref, noise = (torch.randn(B, C, T, H, W, generator=g, dtype=dtype) for _ in range(3))
    z_ref[:, :, 0] = z[:, :, 0]  # the bridge puts the full-size first frame into both
    ctx = torch.randn(B, 12, 32, generator=g, dtype=dtype)
    return z, z_ref, noise, ctx


def _swift_model(seed=0):
    cfg = WanDiTConfig.preset("tiny-ti2v").widened_input(C)
    return WanDiT(cfg).reset_parameters(torch.Generator().manual_seed(seed)).eval()


# -- the training sequence is the inference call ---------------------------------------------------------------


def test_training_inputs_are_the_calls_run_csg_makes():
    """Drive the real sampler loop with a teacher that writes the ground truth back: every window call it makes
    (state, reference channels, per-token timesteps, RoPE positions, layout) is what window_inputs builds."""
    z, z_ref, _, _ = _clip(T=8, B=1)
    plan = CSGPlan(8, 2, (1, 1), block_tokens=P)
    calls = []

    def teacher(x, ref, tt, positions, layout):
        calls.append((x.clone(), ref.clone(), tt.clone(), positions.clone(), layout))
        return x - z.index_select(2, positions)  # one step from sigma 1: x0 = x - v = the ground truth

    run_csg(teacher, z_ref, plan, flow_steps(1, 5.0), kind="swift", seed=3)
    assert len(calls) == plan.num_segments
    for win, (x, ref, tt, positions, layout) in zip(plan.windows, calls):
        noise = torch.zeros_like(z)
        noisy = win.noisy_mask()
        noise[:, :, torch.tensor(win.targets)] = x[:, :, noisy]  # the sampler's own noise at sigma 1
        b = window_inputs(z, z_ref, win.layout, torch.ones(1, 1), noise)
        assert layout == win.layout == b.layout and torch.equal(positions, b.frame_positions)
        assert torch.equal(b.timesteps, tt)
        assert torch.equal(b.inputs[:, C:], ref)
        assert torch.equal(b.inputs[:, :C, noisy], x[:, :, noisy])
        # the conditioning blocks: anchor and right neighbours from z_ref, finished left neighbours (here the
        # ground truth the teacher wrote, up to the rounding of x - (x - z))
        torch.testing.assert_close(b.inputs[:, :C, ~noisy], x[:, :, ~noisy], rtol=0, atol=1e-6)


@pytest.mark.parametrize("shared", [False, True])
def test_packed_forward_equals_each_dense_window(shared):
    """The packed training forward, on each window's tokens, equals the forward of the window call inference
    makes (CSGPlan's, with anchor_attends matching): fp32 rounding with a different noise level per window
    (the timestep MLP runs once on the sequence's distinct timesteps); fp64 rounding when they are equal."""
    T = 7
    plan = CSGPlan(T, 2, (1, 1), block_tokens=P, anchor_attends="anchor" if shared else "all")
    segments = (2, 0, 1)
    for dtype, equal_sigmas, rtol in ((torch.float32, False, 1e-5), (torch.float64, True, 1e-12)):
        model = _swift_model().to(dtype)
        z, z_ref, noise, ctx = _clip(T, dtype=dtype)
        sig = torch.rand(2, 1).expand(2, 3).contiguous() if equal_sigmas else torch.rand(2, 3)
        layout = TrainingWindows(T, P, 2, (1, 1), segments, shared_anchor=shared).layout
        packed = window_inputs(z, z_ref, layout, sig, noise)
        with torch.no_grad():
            out = model(packed.inputs.to(dtype), packed.timesteps, ctx, layout=layout)
        spans = window_spans(layout)
        assert [s for s, _, _ in spans] == list(segments)
        for k, (s, first, last) in enumerate(spans):
            rows = torch.arange(first, last)
            if shared:  # the shared anchor, then the window's own blocks
                rows = torch.cat([torch.tensor([0]), rows])
            win = plan.windows[s]
            alone = window_inputs(z, z_ref, win.layout, sig[:, k:k + 1], noise)
            # the same tokens, RoPE positions and timesteps
            assert torch.equal(packed.inputs[:, :, rows], alone.inputs)
            assert torch.equal(packed.frame_positions[rows], win.frame_positions())
            assert torch.equal(packed.timesteps.view(2, -1, P)[:, rows].reshape(2, -1), alone.timesteps)
            with torch.no_grad():
                want = model(alone.inputs.to(dtype), alone.timesteps, ctx, layout=win.layout)
            got = out[:, :, rows]
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err <= rtol, f"{dtype} window {s}: relative error {err:.1e}"


def _time_per_value(model):
    """Make the model's fp32 timestep MLP run one value at a time: its rounding then does not depend on which
    other timesteps share the call (the only batch-dependent rounding of a forward)."""
    orig = model._time

    def per_value(t):
        parts = [orig(t[i:i + 1]) for i in range(t.shape[0])]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    model._time = per_value
    return model


@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("joint", [False, True])
def test_cached_shared_anchor_is_the_packed_training_forward(joint, chunk):
    """``generate --shared-anchor`` computes the anchor's keys and values once (``precompute_anchor``) and every
    window call reuses them: each window's output equals the packed shared-anchor training forward on that
    window's tokens, and the window forward without the cache (fp32 rounding; fp64 rounding with the fp32
    timestep MLP run per value). Joint mode (the whole clip, ``anchor_attends="anchor"``) likewise. With
    ``chunk``, the inference calls run their blocks in token chunks of 5 (the packed training forward is the
    same reference)."""
    T = 7
    plan = CSGPlan(T, 2, (1, 1), block_tokens=P, anchor_attends="anchor")
    segments = (0, 1, 2)
    for dtype, rtol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        model = _swift_model().to(dtype)
        if dtype == torch.float64:
            _time_per_value(model)
        z, z_ref, noise, ctx = _clip(T, dtype=dtype)
        cache = model.precompute_context(ctx)
        model.inference_chunk_tokens = chunk
        sig = torch.rand(2, 1).expand(2, 3).contiguous()  # one timestep, as in one sampler step
        layout = TrainingWindows(T, P, 2, (1, 1), segments, shared_anchor=True).layout
        packed = window_inputs(z, z_ref, layout, sig, noise)
        with torch.no_grad():
            want_packed = model(packed.inputs, packed.timesteps, None, layout=layout, context_cache=cache)
        anchor = None
        calls = [(plan.clip_layout, None)] if joint else [(w.layout, k) for k, w in enumerate(plan.windows)]
        for lay, k in calls:
            if joint:  # every non-anchor block noisy, as run_csg(joint=True) calls it
                x = torch.cat([z_ref[:, :, :1], (1 - sig[:, :1, None, None, None]) * z[:, :, 1:]
                               + sig[:, :1, None, None, None] * noise[:, :, 1:]], 2)
                inputs = torch.cat([x, z_ref], 1)
                tt = torch.cat([torch.zeros(2, P), (sig[:, :1] * 1000).expand(2, (T - 1) * P)], 1)
            else:
                b = window_inputs(z, z_ref, lay, sig[:, k:k + 1], noise)
                inputs, tt = b.inputs, b.timesteps
            with torch.no_grad():
                if anchor is None:
                    anchor = model.precompute_anchor(inputs[:, :, :1], cache, lay.block_ids[:1])
                want = model(inputs, tt, None, layout=lay, context_cache=cache)
                got = model(inputs, tt, None, layout=lay, context_cache=cache, anchor_cache=anchor)
            assert got.shape == want.shape
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err <= rtol, f"{dtype} joint={joint} window {k}: relative error {err:.1e}"
            if not joint:  # the packed training forward on this window's rows
                first, last = window_spans(layout)[k][1:]
                rows = torch.cat([torch.tensor([0]), torch.arange(first, last)])
                ref = want_packed[:, :, rows]
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                assert err <= rtol, f"{dtype} window {k} against the packed forward: relative error {err:.1e}"


def test_anchor_cache_refuses_calls_it_does_not_fit():
    """The cache is only exact for a sequence that starts with the same anchor input, at timestep 0, in a layout
    where that anchor attends only itself, with the same conditioning: anything else is a ValueError."""
    T = 7
    model = _swift_model()
    z, z_ref, noise, ctx = _clip(T)
    cache = model.precompute_context(ctx)
    plan = CSGPlan(T, 2, (1, 1), block_tokens=P, anchor_attends="anchor")
    win = plan.windows[1]
    b = window_inputs(z, z_ref, win.layout, torch.full((2, 1), 0.5), noise)
    anchor = model.precompute_anchor(b.inputs[:, :, :1], cache)
    dense = CSGPlan(T, 2, (1, 1), block_tokens=P).windows[1].layout
    other = b.inputs.clone()
    other[:, :, 0] += 1
    tt_bad = b.timesteps.clone()
    tt_bad[:, 0] = 5.0
    bad = [
        (dict(layout=dense), "attending only itself"),
        (dict(layout=TrainingWindows(T, P, 2, (1, 1), (1, 2)).layout), "attending only itself"),  # anchor copies
        (dict(latents=other), "anchor blocks differ"),
        (dict(timestep=tt_bad), "timestep must be 0"),
        (dict(context_cache=model.precompute_context(ctx * 2)), "another context_cache"),
    ]
    for change, match in bad:
        kw = dict(latents=b.inputs, timestep=b.timesteps, layout=win.layout, context_cache=cache)
        kw.update(change)
        lat, t = kw.pop("latents"), kw.pop("timestep")
        if kw["layout"].num_seq_blocks != lat.shape[2]:
            lat = window_inputs(z, z_ref, kw["layout"], torch.full((2, 2), 0.5), noise).inputs
            t = torch.zeros(2, lat.shape[2] * P)
        with pytest.raises(ValueError, match=match), torch.no_grad():
            model(lat, t, None, anchor_cache=anchor, **kw)


def test_a_shared_anchor_attending_the_windows_does_not_reproduce_inference():
    """The layout the copies replace (one anchor attending every window) is measurably different: the check
    above would catch a packing that silently fell back to it."""
    T = 7
    model = _swift_model()
    z, z_ref, noise, ctx = _clip(T)
    layout = CSGLayout(T, P, 2, (1, 1), mode="packed")  # shared anchor, anchor_attends="all"
    sig = torch.rand(2, layout.num_segments)
    packed = window_inputs(z, z_ref, layout, sig, noise)
    with torch.no_grad():
        out = model(packed.inputs, packed.timesteps, ctx, layout=layout)
    plan = CSGPlan(T, 2, (1, 1), block_tokens=P)
    worst = 0.0
    for k, (s, first, last) in enumerate(window_spans(layout)):
        rows = torch.cat([torch.tensor([0]), torch.arange(first, last)])
        alone = window_inputs(z, z_ref, plan.windows[s].layout, sig[:, k:k + 1], noise)
        with torch.no_grad():
            want = model(alone.inputs, alone.timesteps, ctx, layout=plan.windows[s].layout)
        worst = max(worst, ((out[:, :, rows] - want).abs().max() / want.abs().max()).item())
    assert worst > 1e-3, worst


def test_loss_reads_only_the_noisy_tokens():
    """The gradient of the loss with respect to the DiT's output is exactly zero on every conditioning token
    (anchor copies, neighbours) and non-zero on the noisy ones; only the noisy blocks carry noise."""
    model = _swift_model().train()
    z, z_ref, noise, ctx = _clip(T=7)
    layout = TrainingWindows(7, P, 2, (1, 1), (0, 1, 2)).layout
    batch = window_inputs(z, z_ref, layout, torch.rand(2, 3), noise)
    out = model(batch.inputs, batch.timesteps, ctx, layout=layout)
    out.retain_grad()
    flow_matching_loss(out, batch).backward()
    noisy = layout.noisy_blocks
    assert torch.equal(out.grad[:, :, ~noisy], torch.zeros_like(out.grad[:, :, ~noisy]))
    assert bool((out.grad[:, :, noisy].abs().amax(dim=(0, 1, 3, 4)) > 0).all())
    # conditioning blocks are clean: the anchor copies and right neighbours are z_ref, left neighbours z
    ids, roles = layout.block_ids, layout.block_roles
    state = batch.inputs[:, :C]
    for i in torch.nonzero(~noisy).flatten().tolist():
        source = z if roles[i] == 1 else z_ref
        assert torch.equal(state[:, :, i], source[:, :, ids[i]])
    assert batch.timesteps.view(2, -1, P)[:, ~noisy].abs().max() == 0
    # and the target is the flow-matching velocity of the noisy blocks
    own = ids[noisy]
    assert torch.allclose(batch.target, noise[:, :, own] - z[:, :, own])


def test_timestep_sampling():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas((4000,), g)
    assert s.min() >= 1e-3 and s.max() <= 1 and abs(s.median().item() - 0.5) < 0.03
    shifted = sample_sigmas((4000,), torch.Generator().manual_seed(0), shift=3.0)
    assert abs(shifted.median().item() - 0.75) < 0.03 and torch.allclose(shifted, shift_sigma(s, 3.0).clamp(1e-3, 1))
    u = sample_sigmas((4000,), g, sampling="uniform")
    assert abs(u.mean().item() - 0.5) < 0.03 and u.std().item() > 0.25
    a = sample_sigmas((2, 3), torch.Generator().manual_seed(5))
    assert torch.equal(a, sample_sigmas((2, 3), torch.Generator().manual_seed(5))) and len(a.unique()) == 6
    with pytest.raises(ValueError, match="timestep sampling"):
        sample_sigmas((2,), g, sampling="beta")
    picks = {choose_segments(6, 2, g) for _ in range(50)}
    assert len(picks) > 5 and all(len(p) == 2 and p[0] < p[1] for p in picks)
    assert choose_segments(6, 0, g) == tuple(range(6)) == choose_segments(6, 9, g)


# -- configuration and model --------------------------------------------------------------------------------


def test_config_toml_and_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('tiny = true\nsteps = 7\nlr = 2e-4\nneighbors = [1, 1]\nshared_anchor = true\n'
                    'timestep_sampling = "uniform"\n')
    cfg = make_config(path, {"steps": 9, "lr": None, "batch_size": 3})
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.neighbor_pair, cfg.shared_anchor) == (9, 2e-4, 3, (1, 1), True)
    for text, needle in (('lr = "fast"', "field 'lr' must be a number"), ("steps = 1.5", "'steps' must be an integer"),
                         ("ema = 1", "'ema' must be true or false"), ("stepz = 3", "unknown field 'stepz'"),
                         ("steps = ", "not valid TOML"), ("neighbors = [1]", "'neighbors' must be two integers")):
        path.write_text(text + "\n")
        with pytest.raises(ValueError, match=needle) as info:
            read_toml(path)
        assert str(path) in str(info.value)
    for over, needle in (({"steps": -1}, "'steps' must be >= 0"), ({"lr_schedule": "linear"}, "lr_schedule"),
                         ({"tiny": False}, "--init"), ({"init": "x"}, "not both"), ({"neighbors": "a"}, "neighbors"),
                         ({"eval_every": 5}, "eval_data"), ({"ema_decay": 1.0}, "ema_decay")):
        with pytest.raises(ValueError, match=needle):
            make_config(None, {"tiny": True, **over})
    cos = make_config(None, {"tiny": True, "lr_schedule": "cosine", "warmup_steps": 2, "steps": 10, "lr": 1.0})
    assert [round(cos.lr_at(s), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_init_widens_a_public_stage2_and_refuses_other_kinds(tmp_path):
    base = WanDiT(WanDiTConfig.preset("tiny-ti2v")).reset_parameters(torch.Generator().manual_seed(1))
    save_dit(base, tmp_path / "s2")
    model = build_model(TrainConfig(init=str(tmp_path / "s2")), 48, 32, "cpu")
    assert model.config.in_channels == 96 and model.training and model.block_boundary == "unfused"
    assert model.checkpoint_blocks and all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    w = model.patch_embedding.weight
    assert torch.equal(w[:, :48], base.patch_embedding.weight) and not w[:, 48:].any()
    sd = base.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items() if k != "patch_embedding.weight")
    # a widened one is continued as is
    save_dit(model, tmp_path / "wide")
    again = build_model(TrainConfig(init=str(tmp_path / "wide")), 48, 32, "cpu")
    assert torch.equal(again.patch_embedding.weight, w)
    save_dit(WanDiT(WanDiTConfig.preset("tiny-i2v")), tmp_path / "s1")
    with pytest.raises(ValueError, match="not a Stage II checkpoint for 48-channel latents: in/out channels 36/16"):
        build_model(TrainConfig(init=str(tmp_path / "s1")), 48, 32, "cpu")
    with pytest.raises(ValueError, match="takes 32-wide text embeddings, the data has 4096"):
        build_model(TrainConfig(tiny=True), 48, 4096, "cpu")


# -- the stage-transition reference ----------------------------------------------------------------------------


def test_transition_steps_and_light_denoising():
    assert [remaining_steps(s) for s in (0.3, 0.5, 0.9, 1.0)] == [1, 1, 3, 4]
    from swift_model.generation.pipeline import SwiftI2VPipeline

    pipe = SwiftI2VPipeline.tiny(seed=0, device="cpu")
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(3, 9, 16, 16, generator=g) * 2 - 1
    ctx = torch.randn(1, 8, 32, generator=g)
    fea = pipe.image_encoder.encode(clip[:, 0])
    z1 = pipe.vae1.encode(clip[None])

    def run(sigma, steps, seed=0):
        return transition_latents(pipe.stage1, pipe.vae1, clip, ctx, sigma=sigma, steps=steps, seed=seed, clip_fea=fea)

    # barely noised, one step: Stage I hands back (almost) the clip's own latents
    assert (run(1e-4, 1) - z1).abs().max() < 1e-3 * z1.abs().max()
    a, b = run(0.5, 1), run(0.5, 1)
    assert torch.equal(a, b) and not torch.equal(a, run(0.5, 1, seed=1)) and not torch.equal(a, run(0.9, 3))
    assert (a - z1).abs().max() > 1e-2 * z1.abs().max()  # Stage I really changed the clip
    with pytest.raises(ValueError, match="transition sigma"):
        run(0.0, 1)


# -- runs ----------------------------------------------------------------------------------------------------


def test_resume_continues_bitwise(tmp_path):
    """k steps, stop, resume to n: the weights, EMA, optimiser state and logged losses of n uninterrupted steps."""
    data = fake_prepared_data(tmp_path / "data", clips=3)

    def cfg(steps):
        return make_config(None, dict(tiny=True, steps=steps, lr=1e-3, batch_size=2, grad_accum=2, ema=True,
                                      warmup_steps=2, grad_clip=0.1, windows_per_clip=2, log_every=1,
                                      checkpoint_every=2, keep_checkpoints=1, seed=4))

    train(cfg(5), data, tmp_path / "whole", device="cpu", progress=False)
    train(cfg(3), data, tmp_path / "parts", device="cpu", progress=False)
    assert sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir()) == ["step-0000003"]
    train(cfg(5), data, tmp_path / "parts", device="cpu", progress=False)
    a = Trainer(cfg(5), data, tmp_path / "whole", device="cpu", progress=False)
    b = Trainer(cfg(5), data, tmp_path / "parts", device="cpu", progress=False)
    assert a.step == b.step == 5
    for p, q in zip(a.params, b.params):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a.optimizer.state[p][key], b.optimizer.state[q][key])
    assert all(torch.equal(e, f) for e, f in zip(a.ema, b.ema))
    logs = [[json.loads(x)["loss"] for x in open(tmp_path / r / "log.jsonl")] for r in ("whole", "parts")]
    assert logs[0] == logs[1] and len(logs[0]) == 5
    # another setting on the same run folder is refused; an execution setting may change
    with pytest.raises(ValueError, match="other settings \\(lr 0.001 -> 0.002\\)"):
        Trainer(make_config(None, {**cfg(5).to_dict(), "lr": 2e-3}), data, tmp_path / "whole", device="cpu")
    Trainer(make_config(None, {**cfg(6).to_dict(), "log_every": 3}), data, tmp_path / "whole", device="cpu")
    # the data changed under a run: refused, not silently reordered
    shutil.rmtree(data)
    fake_prepared_data(data, clips=4)
    with pytest.raises(ValueError, match="the data changed"):
        Trainer(cfg(5), data, tmp_path / "whole", device="cpu")


def test_captions_files(tmp_path):
    from swift_model.training.prepare import clip_id, read_captions

    (tmp_path / "c.jsonl").write_text('{"video": "a/b.mp4", "caption": "one"}\n\n{"video": "c.mp4", "caption": ""}\n')
    assert read_captions(tmp_path / "c.jsonl") == {"a/b.mp4": "one", "c.mp4": ""}
    (tmp_path / "c.csv").write_text('video,caption\na.mp4,"a, b"\n')
    assert read_captions(tmp_path / "c.csv") == {"a.mp4": "a, b"}
    for name, text, needle in (("d.jsonl", '{"video": 1}\n', "line 1"), ("e.jsonl", "oops\n", "not JSON"),
                               ("f.csv", "name,text\n", "columns")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=needle):
            read_captions(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        read_captions(tmp_path / "none.jsonl")
    assert clip_id("a/b c.mp4") != clip_id("a__b c.mp4") and "/" not in clip_id("a/b c.mp4")
