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
"""

from __future__ import annotations

import datetime
import json
import os
import time

import pytest
import torch

from helpers import fake_prepared_data
from swift_model import WanDiT, WanDiTConfig
from swift_model.training.packing import TrainingWindows, count_segments, flow_matching_loss, sample_sigmas, window_inputs
from swift_model.training.trainer import train
from swift_model.training.config import make_config

pytestmark = pytest.mark.gpu


def test_tiny_trainer_bf16_fsdp_on_gpu(gpu_device, tmp_path):
    data = fake_prepared_data(tmp_path / "data", clips=3)
    cfg = dict(tiny=True, lr=1e-3, batch_size=2, compute_dtype="bfloat16", ema=True, log_every=1, checkpoint_every=2)
    train(make_config(None, {**cfg, "steps": 2}), data, tmp_path / "run", device=gpu_device, progress=False)
    last = train(make_config(None, {**cfg, "steps": 4}), data, tmp_path / "run", device=gpu_device, progress=False)
    assert last["step"] == 4 and torch.isfinite(torch.tensor(last["loss"]))
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert len(losses) == 4


def test_5b_training_step_real_size_packed_clip(gpu_device):
    T, h, w, C = 21, 88, 160, 48
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
