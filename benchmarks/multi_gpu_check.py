"""The GPU check's step for a machine with two or more GPUs: our multi-process DiT paths equal one process.

    torchrun --standalone --nproc-per-node 2 benchmarks/multi_gpu_check.py        # OUT=<folder>; NCCL on GPUs

Each rank builds the same DiT (random weights, a Stage II window of 4 latent frames; Wan2.2-TI2V-5B's head layout
on a GPU, the tiny preset on a CPU) and runs one forward three ways:

- one process (every rank alone), the reference;
- Ulysses over every rank (``sp_group``): the tokens and heads split, two all-to-alls per attention;
- FSDP2 with the next block's all-gather prefetched (``fsdp_shard_blocks(prefetch=True)``, what ``generate --fsdp``
  runs), no Ulysses.

FSDP2 gathers the exact weights, so its output must equal one process bitwise; Ulysses computes attention per head
group and may round differently, so it is held to the attention test rule of docs/testing.md (at most twice the
error of the same computation against an fp32 reference, plus one ulp of the largest value). Rank 0 writes one
``checks.jsonl`` line per case (op ``multi``). On CPUs (``--device cpu``: gloo) it checks the plumbing; CI runs it
so (tests/benchmarks/test_multi_gpu_check.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.distributed as dist


def _inputs(cfg, device, dtype, generator):
    from swift_kernels import CSGLayout

    T, h, w = 7, (44 if device.type == "cuda" else 4), (80 if device.type == "cuda" else 6)
    layout = CSGLayout(T, (h // 2) * (w // 2), segment_blocks=2, neighbors=(1, 0), mode="window", segment=1)
    frames = layout.num_tokens // ((h // 2) * (w // 2))  # the window's blocks: anchor, neighbour, segment
    x = torch.randn(1, cfg.in_channels, frames, h, w, generator=generator).to(device, dtype)
    t = torch.full((1, frames), 750.0)
    t[:, 0] = 0.0  # the anchor is clean
    ctx = torch.randn(1, 16, cfg.text_dim, generator=generator).to(device, dtype)
    return x, t.to(device), ctx, layout


def _record(out_dir, **rec):
    if out_dir and dist.get_rank() == 0:
        with open(os.path.join(out_dir, "checks.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
    if dist.get_rank() == 0:
        print(json.dumps(rec), flush=True)


def main(argv=None) -> int:
    from swift_model import WanDiT, WanDiTConfig
    from swift_model.nets.parallel import fsdp_shard_blocks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    out_dir = os.environ.get("OUT")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = "wan2.2-ti2v-5b" if device.type == "cuda" else "tiny-ti2v"
    cfg = WanDiTConfig.preset(name, num_layers=4)
    torch.manual_seed(0)  # the same weights and inputs on every rank
    model = WanDiT(cfg).to(device).eval()
    model.to_dtype(dtype)
    x, t, ctx, layout = _inputs(cfg, device, dtype, torch.Generator().manual_seed(1))
    failed = 0
    with torch.no_grad():
        want = model(x, t, ctx, layout=layout)
        exact = model.float()(x.float(), t, ctx.float(), layout=layout) if dtype != torch.float32 else want
        model.to_dtype(dtype)
        t0 = time.time()
        ulysses = model(x, t, ctx, layout=layout, sp_group=dist.group.WORLD)
        err, base = (ulysses.double() - exact.double()).abs().max().item(), (want.double() - exact.double()).abs().max().item()
        bound = 2 * base + torch.finfo(dtype).eps * exact.abs().max().item()
        ok = err <= bound
        failed += not ok
        _record(out_dir, op="multi", backend=f"ulysses-{dist.get_world_size()}", case=name, passed=ok,
                max_err=err, bound=bound, seconds=round(time.time() - t0, 2))
        t0 = time.time()
        sharded = fsdp_shard_blocks(copy.deepcopy(model), dist.group.WORLD, prefetch=True)
        got = sharded(x, t, ctx, layout=layout)
        ok = bool(torch.equal(got, want))
        failed += not ok
        _record(out_dir, op="multi", backend=f"fsdp2-prefetch-{dist.get_world_size()}", case=name, passed=ok,
                max_err=(got.double() - want.double()).abs().max().item(), seconds=round(time.time() - t0, 2))
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
