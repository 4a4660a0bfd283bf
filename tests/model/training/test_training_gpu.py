"""Stage II training on a GPU (marked ``gpu``: skipped without one; nothing here has run on a GPU yet).

- The whole trainer on the tiny model with bf16 compute: FSDP2 on a one-rank NCCL group (fp32 master weights,
  fp32 reduction), checkpoint and resume.
- One training step of the 5B preset (random weights, widened input) on a real-size packed clip (2560x1408,
  81 frames: 21 latent frames of 3,520 tokens, every window of M=2, N=(1,0) with its anchor copy), with
  activation checkpointing and our attention backward. Weights, gradients and AdamW state in bf16 so that one
  80 GB GPU may hold them (fp32 master weights need FSDP over several GPUs: ~16 bytes per parameter). Estimate:
  40 GB of weights, gradients and optimiser state, ~25 GB of checkpointed block inputs (137,280 tokens x 3,072
  x 2 bytes x 30 blocks), and one block's recomputation; ``SWIFT_I2V_TRAIN_WINDOWS=k`` packs only the first k
  windows. Peak memory and step time are written as JSON to ``$SWIFT_I2V_RESULTS`` (a folder) when it is set,
  for ``benchmarks/results/``.
- The same step as ``offload_optimizer`` runs it: the bf16 network on the GPU, fp32 master weights, gradient sums
  and AdamW in host memory (about 85 GiB of it), the step on the host.

The real-size steps are skipped, with the reason, where their estimate (``helpers.step_5b_estimate``: the bf16
network times the states kept on the GPU, plus the activations counted on fake tensors) does not fit the GPU's
memory less the reserve of ``swift_model.training.memory``: the bf16-AdamW step needs about 91 GiB (an H200, not
an 80 GB H100), the offloaded one about 63 GiB.
"""

from __future__ import annotations

import datetime
import json
import os
import time

import pytest
import torch

from helpers import STEP_5B_LATENTS, fake_prepared_data, step_5b_estimate
from swift_model import WanDiT, WanDiTConfig
from swift_model.training.packing import TrainingWindows, count_segments, flow_matching_loss, sample_sigmas, window_inputs
from swift_model.training.trainer import train
from swift_model.training.config import make_config
from swift_model.training.memory import format_bytes, shortfall

pytestmark = pytest.mark.gpu


def _skip_unless_fits(device, need: int, what: str) -> None:
    """Skip (with the reason) when ``need`` estimated bytes do not fit ``device``'s memory less the reserve."""
    props = torch.cuda.get_device_properties(device)
    why = shortfall(need, props.total_memory)
    if why:
        pytest.skip(f"{what} {why} ({props.name})")


def test_tiny_trainer_bf16_fsdp_on_gpu(gpu_device, tmp_path):
    data = fake_prepared_data(tmp_path / "data", clips=3)
    cfg = dict(tiny=True, lr=1e-3, batch_size=2, compute_dtype="bfloat16", ema=True, log_every=1, checkpoint_every=2)
    train(make_config(None, {**cfg, "steps": 2}), data, tmp_path / "run", device=gpu_device, progress=False)
    last = train(make_config(None, {**cfg, "steps": 4}), data, tmp_path / "run", device=gpu_device, progress=False)
    assert last["step"] == 4 and torch.isfinite(torch.tensor(last["loss"]))
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert len(losses) == 4


def test_5b_training_step_real_size_packed_clip(gpu_device):
    if not os.environ.get("SWIFT_I2V_TRAIN_WINDOWS"):
        _skip_unless_fits(gpu_device, step_5b_estimate(4), "the 5B step with bf16 weights, gradients and AdamW")
    C, T, h, w = STEP_5B_LATENTS
    cfg = WanDiTConfig.preset("wan2.2-ti2v-5b").widened_input(C)
    with torch.device("meta"):
        model = WanDiT(cfg)
    model.to_empty(device=gpu_device).reset_parameters().to_dtype(torch.bfloat16)
    model.train().requires_grad_(True)
    model.block_boundary, model.checkpoint_blocks = "unfused", True
    P = (h // 2) * (w // 2)
    segments = tuple(range(count_segments(T, 2)))[: int(os.environ.get("SWIFT_I2V_TRAIN_WINDOWS", "0")) or None]
    layout = TrainingWindows(T, P, 2, (1, 0), segments).layout
    g = torch.Generator().manual_seed(0)
    z, z_ref, noise = (torch.randn(1, C, T, h, w, generator=g) for _ in range(3))
    batch = window_inputs(z, z_ref, layout, sample_sigmas((1, len(segments)), g, shift=5.0), noise)
    batch = batch.to(gpu_device, torch.bfloat16)
    ctx = torch.randn(1, 512, cfg.text_dim, device=gpu_device, dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2):  # the first step includes kernel compilation
        t0 = time.perf_counter()
        out = model(batch.inputs, batch.timesteps, ctx, layout=layout)
        loss = flow_matching_loss(out, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        assert torch.isfinite(loss)
    result = {
        "what": "one Stage II training step, 5B preset widened to 96 input channels, bf16 weights/grads/AdamW, "
                "activation checkpointing, unfused block boundary",
        "tokens": layout.num_tokens, "windows": len(segments), "clip": "81 frames 2560x1408 (21 x 88 x 160 latents)",
        "step_seconds": times, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": float(loss), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(result))
    folder = os.environ.get("SWIFT_I2V_RESULTS")
    if folder:
        with open(os.path.join(folder, "train-step-5b.json"), "w") as f:
            json.dump(result, f, indent=2)


def test_compiled_blocks_give_the_eager_gradients_on_gpu(gpu_device, tmp_path):
    """``compile = true`` (torch.compile of every block): the same loss and gradients as eager, to fp32
    rounding. (On the development CPU: identical loss, gradients within 2e-5, ~70 s of compilation.)"""
    from swift_model.training.trainer import Trainer

    data = fake_prepared_data(tmp_path / "data", clips=2)
    kw = dict(tiny=True, steps=1, batch_size=2, compute_dtype="float32", fsdp=False)
    compiled = Trainer(make_config(None, {**kw, "compile": True}), data, tmp_path / "a", device=gpu_device)
    eager = Trainer(make_config(None, kw), data, tmp_path / "b", device=gpu_device)
    assert abs(compiled.forward_backward(0) - eager.forward_backward(0)) < 1e-5
    for p, q in zip(compiled.params, eager.params):
        assert (p.grad - q.grad).abs().max() <= 1e-3 * q.grad.abs().max()


def test_5b_offloaded_training_step_on_one_gpu(gpu_device):
    """Two training steps of the 5B Stage II as ``offload_optimizer`` runs them, at the real size: the device's
    peak stays within the estimate (plus 5% of the device for what it does not count), the master weights move
    and the bf16 device weights are their rounding."""
    from swift_model.training.offload import HostOffload, device_copy

    need = step_5b_estimate(1)
    _skip_unless_fits(gpu_device, need, "the offloaded 5B step")
    C, T, h, w = STEP_5B_LATENTS
    cfg = WanDiTConfig.preset("wan2.2-ti2v-5b").widened_input(C)
    with torch.device("meta"):
        master = WanDiT(cfg)
    master.to_empty(device="cpu").reset_parameters(torch.Generator().manual_seed(0))
    master.train().requires_grad_(True)
    master.block_boundary, master.checkpoint_blocks = "unfused", True
    before = master.proj_out.weight.detach().clone()
    model = device_copy(master, gpu_device, torch.bfloat16)
    offload = HostOffload(master, model)
    optimizer = torch.optim.AdamW([p for p in master.parameters() if p.requires_grad], lr=1e-5, fused=True)
    P = (h // 2) * (w // 2)
    segments = tuple(range(count_segments(T, 2)))
    layout = TrainingWindows(T, P, 2, (1, 0), segments).layout
    g = torch.Generator().manual_seed(1)
    z, z_ref, noise = (torch.randn(1, C, T, h, w, generator=g) for _ in range(3))
    batch = window_inputs(z, z_ref, layout, sample_sigmas((1, len(segments)), g, shift=5.0), noise).to(gpu_device)
    ctx = torch.randn(1, 512, cfg.text_dim, device=gpu_device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        offload.zero_grad()
        loss = flow_matching_loss(model(batch.inputs, batch.timesteps, ctx, layout=layout), batch)
        loss.backward()
        offload.collect()
        optimizer.step()
        offload.push()
        times.append(time.perf_counter() - t0)
        assert torch.isfinite(loss)
    peak = torch.cuda.max_memory_allocated()
    total = torch.cuda.get_device_properties(gpu_device).total_memory
    result = {"what": "two Stage II training steps, 5B preset widened to 96 input channels, offload_optimizer "
                      "(bf16 network on the GPU, fp32 master weights and fused AdamW on the host)",
              "tokens": layout.num_tokens, "step_seconds": times, "peak_memory_gib": peak / 2**30,
              "estimate_gib": need / 2**30, "loss": float(loss), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(result))
    folder = os.environ.get("SWIFT_I2V_RESULTS")
    if folder:
        with open(os.path.join(folder, "train-step-5b-offload.json"), "w") as f:
            json.dump(result, f, indent=2)
    assert peak <= need + 0.05 * total, f"peak {format_bytes(peak)} above the estimate {format_bytes(need)}"
    assert not torch.equal(before, master.proj_out.weight.detach())
    masters = dict(master.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().cpu(), masters[name].detach().to(p.dtype)), name
