"""Training memory: the per-rank estimate against real tiny training steps, the refusal of ``swift-i2v train``
before any weight is read, the offloaded optimiser against plain AdamW, the 5B Stage II on one 80 GB GPU, and
the gate of the real-size GPU training tests."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch

from helpers import STEP_5B_LATENTS, fake_prepared_data, step_5b_estimate
from swift_model import WanDiT, WanDiTConfig
from swift_model.cli.main import main
from swift_model.loading.checkpoint import save_dit
from swift_model.nets.dit import keeps_fp32
from swift_model.planning.tracker import LiveStorageTracker
from swift_model.planning.training_step import training_activation_bytes
from swift_model.training.config import TrainConfig, make_config
from swift_model.training.memory import (GIB, ParameterCounts, TrainingMemory, check_fits, estimate_training_memory,
                                         largest_windows, shortfall)
from swift_model.training.offload import STAGING_ALIGN, STAGING_CHUNK, HostOffload, device_copy, staging_plan
from swift_model.training.packing import TrainingWindows, count_segments, flow_matching_loss, sample_sigmas, \
    window_inputs
from swift_model.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

GB80 = 80 * 10**9  # an "80 GB" GPU, counted low: CUDA reports about 79 GiB for an H100 80GB
CFG_5B = WanDiTConfig.preset("wan2.2-ti2v-5b").widened_input(48)


def _tiny_cfg(layers=2):
    return dataclasses.replace(WanDiTConfig.preset("tiny-ti2v"), num_layers=layers).widened_input(48)


def _drop_grads(model):
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))


# -- the activations: fake tensors against a real step -----------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("T,h,w,layers", [(9, 16, 16, 2), (7, 16, 32, 3)])
def test_activation_count_matches_a_real_tiny_step(T, h, w, layers, checkpointing):
    """The fake-tensor count (with the fused-attention stand-in) against the live bytes of a real fp32 forward
    and backward on the CPU (the reference attention), gradients dropped as made in both: within 3%."""
    cfg = _tiny_cfg(layers)
    P = (h // 2) * (w // 2)
    segments = tuple(range(count_segments(T, 2)))
    layout = TrainingWindows(T, P, 2, (1, 0), segments).layout
    estimate = training_activation_bytes(cfg, layout, (h, w), dtype=torch.float32, checkpointing=checkpointing)
    model = WanDiT(cfg).reset_parameters(torch.Generator().manual_seed(0)).train().requires_grad_(True)
    model.block_boundary, model.checkpoint_blocks = "unfused", checkpointing
    _drop_grads(model)
    g = torch.Generator().manual_seed(1)
    z, z_ref, noise = (torch.randn(1, 48, T, h, w, generator=g) for _ in range(3))
    batch = window_inputs(z, z_ref, layout, sample_sigmas((1, len(segments)), g), noise)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    tracker = LiveStorageTracker("cpu")
    with tracker:
        tracker.track(*model.parameters())
        base = tracker.live_bytes
        # the batch made inside the tracked region, as the trainer's copy to the device makes it
        batch = dataclasses.replace(batch, inputs=batch.inputs.clone(), timesteps=batch.timesteps.clone(),
                                    target=batch.target.clone())
        out = model(batch.inputs, batch.timesteps, ctx.clone(), layout=layout)
        loss = flow_matching_loss(out, batch)
        del out
        loss.backward()
    measured = tracker.peak_bytes - base
    assert abs(estimate - measured) <= 0.03 * measured, (estimate, measured)


def test_activation_count_checks_its_arguments():
    layout = TrainingWindows(5, 16, 2, (1, 0), (0, 1)).layout
    with pytest.raises(ValueError, match="latent_size"):
        training_activation_bytes(_tiny_cfg(), layout, (8, 6))
    with pytest.raises(TypeError, match="layout"):
        training_activation_bytes(_tiny_cfg(), "packed", (8, 8))
    with pytest.raises(ValueError, match="batch"):
        training_activation_bytes(_tiny_cfg(), layout, (8, 8), batch=0)


# -- the other parts: arithmetic against a real trainer -----------------------------------------------------------


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _moments(optimizer) -> int:
    return _bytes(v for st in optimizer.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("offload", [False, True])
def test_estimate_parts_equal_a_real_tiny_trainer(tmp_path, offload):
    """Weights, gradients, AdamW moments, EMA (and the offloaded optimiser's host part) are exactly the bytes a
    real tiny trainer holds after a step; its measured peak over the step stays under the estimate's sum."""
    data = fake_prepared_data(tmp_path / "data", clips=2, latent=(48, 5, 8, 8))
    config = make_config(None, dict(tiny=True, steps=1, batch_size=1, ema=True, compute_dtype="float32", fsdp=False,
                                    offload_optimizer=offload))
    trainer = Trainer(config, data, tmp_path / "run", device="cpu", progress=False)
    estimate = estimate_training_memory(config, trainer.model_config, (48, 5, 8, 8), world=1, device_type="cpu",
                                        activations=training_activation_bytes)
    tracker = LiveStorageTracker("cpu")
    with tracker:
        tracker.track(*trainer.model.parameters())
        trainer.forward_backward(0)
        trainer.optimizer_step(0)
    device_weights = _bytes(trainer.model.parameters())
    assert estimate.weights == device_weights and estimate.ema == (0 if offload else _bytes(trainer.ema))
    if offload:
        assert estimate.mode == "offload" and estimate.gradients == estimate.optimizer == 0
        host = (_bytes(trainer.master.parameters()) + _moments(trainer.optimizer) + _bytes(trainer.ema)
                + trainer.offload.host_bytes())
        assert estimate.host == host
        assert all(p.grad is None for p in trainer.model.parameters())  # nothing left on the device
    else:
        assert estimate.mode == "single" and estimate.host == 0
        assert estimate.gradients == _bytes(p.grad for p in trainer.params)
        assert estimate.optimizer == _moments(trainer.optimizer)
        # the step's live bytes: weights, gradients, moments, activations (the EMA was made before)
        assert tracker.peak_bytes <= estimate.device_bytes - estimate.ema
        assert tracker.peak_bytes >= estimate.weights + estimate.gradients + estimate.optimizer


def test_fsdp_parts_shard_over_the_world():
    """Under FSDP each rank keeps 1/world of the fp32 states (plus the fp32 parameters outside the blocks, whole,
    and the gathered bf16 copies): 8 ranks hold about an eighth of one."""
    config = TrainConfig(tiny=True, ema=True)
    one = estimate_training_memory(config, CFG_5B, STEP_5B_LATENTS, world=1, device_type="cuda",
                                   activations=lambda *a, **k: 0)
    eight = estimate_training_memory(config, CFG_5B, STEP_5B_LATENTS, world=8, device_type="cuda",
                                     activations=lambda *a, **k: 0)
    counts = ParameterCounts.of(CFG_5B)
    assert one.mode == eight.mode == "fsdp"
    assert one.optimizer == 8 * counts.total and one.ema == 4 * counts.total
    assert eight.optimizer <= one.optimizer / 8 + 8 * counts.root_fp32 + 64
    assert 4.9e9 < counts.total < 5.1e9


def test_5b_states_alone_overflow_an_80gb_gpu_without_offload():
    """fp32 weights, gradients and AdamW moments of the 5B are 16 bytes x 5.0B parameters: more than an 80 GB GPU
    before a single activation; with the offloaded optimiser the device keeps the bf16 weights (~9.4 GiB)."""
    config = TrainConfig(tiny=True)
    plain = estimate_training_memory(config, CFG_5B, STEP_5B_LATENTS, world=1, device_type="cuda",
                                     activations=lambda *a, **k: 0)
    assert plain.device_bytes > GB80
    with pytest.raises(ValueError, match="--offload-optimizer"):
        check_fits(plain, config, GB80, "an 80 GB GPU")
    off = estimate_training_memory(dataclasses.replace(config, offload_optimizer=True), CFG_5B, STEP_5B_LATENTS,
                                   world=1, device_type="cuda", activations=lambda *a, **k: 0)
    assert 9 * GIB < off.weights < 10 * GIB and off.host > 16 * ParameterCounts.of(CFG_5B).total


@pytest.mark.slow
def test_5b_at_2560x1408_windows_fits_80gb_only_with_offload():
    """The 5B Stage II on 81 frames at 2560x1408, every window packed (137,280 tokens), bf16, activation
    checkpointing: > 80 GB per GPU without the option, <= 76 GiB with it (estimates; activations on fake
    tensors)."""
    acts = {}

    def measure(*args, **kw):  # both modes train the same micro-batch: count it once
        if not acts:
            acts["bytes"] = training_activation_bytes(*args, **kw)
        return acts["bytes"]

    config = TrainConfig(tiny=True)
    plain = estimate_training_memory(config, CFG_5B, STEP_5B_LATENTS, world=1, device_type="cuda", activations=measure)
    off = estimate_training_memory(dataclasses.replace(config, offload_optimizer=True), CFG_5B, STEP_5B_LATENTS,
                                   world=1, device_type="cuda", activations=measure)
    assert plain.tokens == off.tokens == 137_280
    assert plain.device_bytes > GB80 and off.device_bytes <= 76 * GIB
    check_fits(off, config, GB80, "an 80 GB GPU")
    with pytest.raises(ValueError, match="needs an estimated"):
        check_fits(plain, config, GB80, "an 80 GB GPU")


def test_largest_windows_picks_the_most_tokens():
    config = TrainConfig(tiny=True, windows_per_clip=2)
    layout = largest_windows((48, 8, 4, 4), config)
    assert layout.segments == (1, 2)  # segment 0 has no left neighbour, segment 3 one block: both smaller
    assert largest_windows((48, 8, 4, 4), TrainConfig(tiny=True)).segments == (0, 1, 2, 3)


# -- the refusal of swift-i2v train -------------------------------------------------------------------------------


@pytest.fixture
def no_weight_read(monkeypatch):
    """Fail the test if the trainer is built or a weight or clip is read."""
    from swift_model.training import trainer
    from swift_model.training.dataset import PreparedData

    def forbidden(*a, **k):
        raise AssertionError("a weight or clip was read before the memory check")

    monkeypatch.setattr(trainer, "build_model", forbidden)
    monkeypatch.setattr(WanDiT, "from_pretrained", forbidden)
    monkeypatch.setattr(PreparedData, "load_clip", forbidden)


def _stage2(tmp_path):
    folder = tmp_path / "stage2"
    save_dit(WanDiT(WanDiTConfig.preset("tiny-ti2v")).reset_parameters(torch.Generator().manual_seed(0)), folder)
    return folder


def test_train_refuses_a_gpu_too_small_before_reading_weights(tmp_path, monkeypatch, capsys, no_weight_read):
    """A mocked CUDA device of 1 MiB: one ``error:`` line naming the need, the device and its memory and the
    options, exit status 2, no run folder, no weight read."""
    data = fake_prepared_data(tmp_path / "data", clips=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=2**20, name="Mock GPU"))
    run = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(run), "--init", str(_stage2(tmp_path)), "--device", "cuda",
                 "--ema", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and not run.exists()
    assert out.startswith("memory estimate (one process, fsdp): device ") and "bfloat16" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training needs an estimated ")
    for word in ("Mock GPU", "1.0 MiB", "--offload-optimizer", "--no-ema", "--device-memory", "weights",
                 "activations"):
        assert word in lines[0], word


def test_train_device_memory_override(tmp_path, capsys, no_weight_read):
    """``--device-memory`` checks a CPU run against a given size (refused here); 0 turns the check off (the run
    then gets as far as building the trainer, which this test forbids: an error of status 1)."""
    data = fake_prepared_data(tmp_path / "data", clips=2)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--tiny", "--device", "cpu", "--quiet"]
    assert main(args + ["--device-memory", "0.001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the device (--device-memory 0.001) has 1.0 MiB" in err[0]
    assert main(args + ["--device-memory", "0"]) == 1
    assert "before the memory check" in capsys.readouterr().err
    assert main(args + ["--device-memory", "-1"]) == 2
    assert "--device-memory must be >= 0" in capsys.readouterr().err


def test_train_prints_the_estimate_and_trains_with_offload(tmp_path, capsys):
    data = fake_prepared_data(tmp_path / "data", clips=2)
    run = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(run), "--tiny", "--device", "cpu", "--steps", "1",
                 "--offload-optimizer", "--device-memory", "1", "--quiet"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and out[0].startswith("memory estimate (one process, offload): device ") and "host" in out[0]
    assert json.loads((run / "run.json").read_text())["config"]["offload_optimizer"] is True


# -- the offloaded optimiser equals plain AdamW -------------------------------------------------------------------


def test_offloaded_optimizer_equals_plain_adamw(tmp_path):
    """Three steps of two micro-batches with gradient clipping, weight decay and EMA: the offloaded run (fp32
    master on the host, fused AdamW there) ends with the plain run's weights and EMA to fp32 rounding (the fused
    and the per-tensor AdamW round differently), and its device copy equals its master."""
    data = fake_prepared_data(tmp_path / "data", clips=3)
    kw = dict(tiny=True, steps=3, batch_size=2, grad_accum=2, compute_dtype="float32", fsdp=False, lr=1e-2, ema=True,
              ema_decay=0.5, weight_decay=0.1, grad_clip=1.0)
    plain = Trainer(make_config(None, kw), data, tmp_path / "a", device="cpu", progress=False)
    off = Trainer(make_config(None, {**kw, "offload_optimizer": True}), data, tmp_path / "b", device="cpu",
                  progress=False)
    assert off.offload is not None and plain.offload is None
    clipped = False
    for step in range(3):
        la, lb = plain.forward_backward(step), off.forward_backward(step)
        assert abs(la - lb) <= 1e-6 * abs(la)
        for p, q in zip(plain.params, off.params):  # the gradient sums, before the step
            assert (q.grad - p.grad).abs().max() <= 1e-4 * p.grad.abs().max()
        (na, _), (nb, _) = plain.optimizer_step(step), off.optimizer_step(step)
        clipped |= na > kw["grad_clip"]
        assert abs(na - nb) <= 1e-5 * na
    assert clipped  # the clipping path ran
    for p, q in zip(plain.params + plain.ema, off.params + off.ema):
        assert (p - q).abs().max() <= 1e-5 * p.abs().max()
    moved = max((p - q0).abs().max().item() for p, q0 in zip(plain.params, Trainer(
        make_config(None, {**kw, "steps": 0}), data, tmp_path / "c", device="cpu", progress=False).params))
    assert moved > 1e-3  # the steps did move the weights
    for (name, d), m in zip(off.model.named_parameters(), off.master.parameters()):
        assert torch.equal(d, m), name


def test_host_offload_moves_bf16_gradients_and_weights_exactly():
    """With a bf16 device copy: the master gradient is the fp32 sum of the bf16 gradients of each backward, and
    after a step the device weights are the master's bf16 rounding (the fp32-kept parameters exactly)."""
    cfg = _tiny_cfg()
    master = WanDiT(cfg).reset_parameters(torch.Generator().manual_seed(3)).train().requires_grad_(True)
    model = device_copy(master, torch.device("cpu"), torch.bfloat16)
    reference = device_copy(master, torch.device("cpu"), torch.bfloat16)  # the same bf16 network, plain autograd
    offload = HostOffload(master, model)
    g = torch.Generator().manual_seed(4)
    layout = TrainingWindows(5, 4, 2, (1, 0), (0, 1)).layout
    offload.zero_grad()
    for _ in range(2):
        z, z_ref, noise = (torch.randn(1, 48, 5, 4, 4, generator=g) for _ in range(3))
        batch = window_inputs(z, z_ref, layout, sample_sigmas((1, 2), g), noise)
        ctx = torch.randn(1, 7, cfg.text_dim, generator=g)
        flow_matching_loss(model(batch.inputs, batch.timesteps, ctx, layout=layout), batch).backward()
        offload.collect()
        flow_matching_loss(reference(batch.inputs, batch.timesteps, ctx, layout=layout), batch).backward()
    assert all(p.grad is None for p in model.parameters())
    refs = dict(reference.named_parameters())
    for name, m in zip(offload.names, offload.master):
        # the reference sums the two bf16 gradients in bf16, the offload in fp32: equal to bf16 rounding
        want = refs[name].grad.float()
        assert (m.grad - want).abs().max() <= 2**-7 * want.abs().max() + 1e-30, name
    torch.optim.AdamW(offload.master, lr=1e-2, fused=True).step()
    offload.push()
    for (name, d), m in zip(model.named_parameters(), master.parameters()):
        assert torch.equal(d, m.detach().to(d.dtype)), name
        assert d.dtype == (torch.float32 if keeps_fp32(name) else torch.bfloat16), name


def test_offloaded_run_resumes_exactly(tmp_path):
    """A checkpoint of an offloaded run (master weights, AdamW state) resumes to the uninterrupted run's bits; the
    run cannot be resumed without the option."""
    data = fake_prepared_data(tmp_path / "data", clips=2)
    kw = dict(tiny=True, batch_size=1, compute_dtype="float32", fsdp=False, lr=1e-2, offload_optimizer=True,
              checkpoint_every=2, log_every=1)
    whole = Trainer(make_config(None, {**kw, "steps": 3}), data, tmp_path / "whole", device="cpu", progress=False)
    whole.run()
    Trainer(make_config(None, {**kw, "steps": 2}), data, tmp_path / "part", device="cpu", progress=False).run()
    resumed = Trainer(make_config(None, {**kw, "steps": 3}), data, tmp_path / "part", device="cpu", progress=False)
    assert resumed.step == 2
    resumed.run()
    for p, q in zip(whole.params, resumed.params):
        assert torch.equal(p, q)
    for p, q in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="offload_optimizer True -> False"):  # a run keeps its mode
        Trainer(make_config(None, {**kw, "steps": 4, "offload_optimizer": False}), data, tmp_path / "part",
                device="cpu", progress=False)


def test_staging_plan_packs_without_overlap_or_rounding():
    """Staging buffers of random sizes: aligned, inside their chunk, never overlapping; every chunk a power of
    two (nothing for the page-locked allocator to round up); and little left unfilled."""
    g = torch.Generator().manual_seed(5)
    sizes = [int(x) for x in torch.randint(1, 90 * 2**20, (200,), generator=g)] + [3 * 2**28 + 5, 0, 1]
    places, chunks = staging_plan(sizes)
    assert all(c & (c - 1) == 0 and c >= STAGING_CHUNK for c in chunks)
    spans = {}
    for (c, o), n in zip(places, sizes):
        assert o % STAGING_ALIGN == 0 and o + n <= chunks[c]
        spans.setdefault(c, []).append((o, o + n))
    for pieces in spans.values():
        pieces.sort()
        assert all(a[1] <= b[0] for a, b in zip(pieces, pieces[1:]))
    assert sum(chunks) <= sum(sizes) + 2 * STAGING_CHUNK + 0.05 * sum(sizes)
    with pytest.raises(ValueError, match="bytes"):
        staging_plan([-1])


def test_offload_refuses_several_processes():
    with pytest.raises(ValueError, match="offload_optimizer"):
        make_config(None, dict(tiny=True, offload_optimizer=True, ulysses=2))
    with pytest.raises(ValueError, match="one process"):
        estimate_training_memory(TrainConfig(tiny=True, offload_optimizer=True), _tiny_cfg(), (48, 5, 4, 4), world=2,
                                 device_type="cuda", activations=lambda *a, **k: 0)


# -- the gate of the GPU tests ------------------------------------------------------------------------------------


def test_shortfall_is_the_gate():
    assert shortfall(70 * GIB, GB80) is None
    why = shortfall(int(76 * GIB), GB80)
    assert why and "needs an estimated 76.0 GiB" in why and "74.5 GiB" in why


@pytest.mark.slow
def test_gpu_gate_of_the_5b_steps():
    """The single-GPU 5B step with bf16 AdamW on the GPU is skipped on an 80 GB GPU (it needs ~91 GiB) and runs on
    a 141 GB H200; the offloaded step runs on both."""
    bf16_adamw, offloaded = step_5b_estimate(4), step_5b_estimate(1)
    assert shortfall(bf16_adamw, GB80) and shortfall(bf16_adamw, 141 * 10**9) is None
    assert shortfall(offloaded, GB80) is None and offloaded <= 76 * GIB


def test_summary_line():
    m = TrainingMemory(mode="offload", weights=GIB, gradients=0, optimizer=0, ema=0, activations=2 * GIB,
                       host=4 * GIB, world=1, ulysses=1, tokens=1000, batch=1, dtype="bfloat16", checkpointing=True,
                       parameters=5 * 10**9)
    line = m.summary()
    assert "device 3.0 GiB = weights 1.0 GiB" in line and "host 4.0 GiB" in line and "5.00B parameters" in line
    assert m.to_json()["device_bytes"] == 3 * GIB


def test_offloaded_host_part_is_checked_against_the_ram():
    config = TrainConfig(tiny=True, offload_optimizer=True, ema=True)
    est = estimate_training_memory(config, CFG_5B, STEP_5B_LATENTS, world=1, device_type="cuda",
                                   activations=lambda *a, **k: 0)
    check_fits(est, config, GB80, "an 80 GB GPU", host_memory=128 * GIB)  # the EMA run needs ~103 GiB
    with pytest.raises(ValueError, match=r"needs an estimated 103\.\d GiB of host memory .* has 64\.0 GiB"):
        check_fits(est, config, GB80, "an 80 GB GPU", host_memory=64 * GIB)
