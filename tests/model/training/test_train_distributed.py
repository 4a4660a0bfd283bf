"""Stage II training on torch.distributed (gloo, 2 CPU processes, spawned once; tests/spawn.py).

Every rank builds the one-process reference itself (``Topology()``: no process group, no FSDP, the same seeds)
and compares:

- FSDP2 data parallel (2 ranks x 1 clip) against one process accumulating the same 2 micro-batches, with and
  without activation checkpointing; Ulysses (2 ranks on one sequence) against one process: the loss, and every
  parameter's reduced gradient to 1e-4 of its largest magnitude (seen: 2e-6 data parallel, 1e-5 Ulysses; only
  the order of the sums differs);
- bf16 compute with fp32 master weights: masters fp32 and sharded, the parameters Wan keeps in fp32 whole
  and fp32, gradients fp32, the loss within bf16 rounding of fp32;
- a 2-rank run resumed from its step-2 checkpoint equals the uninterrupted 4-step run bitwise (weights, EMA,
  losses), and one process exports the 2-rank checkpoint to the same weights;
- ``prepare`` split over 2 ranks writes the same shards as one process, with a bad video skipped and named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import spawn
from helpers import fake_prepared_data, mismatch, relative_error, synthetic_video, torch_threads, write_videos
from swift_model.nets.dit import keeps_fp32
from swift_model.training.trainer import Topology, Trainer
from swift_model.training.config import make_config
from swift_model.io.video import write_mp4

WORLD_SIZE = 2
GRAD_RTOL = 1e-4
RECORD: list[str] = []


def _scratch(name: str) -> Path:
    """A folder shared by the ranks of this launch."""
    path = Path(os.environ["SPAWN_OUT_DIR"]) / name
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return path


def _data(root: Path) -> Path:
    if dist.get_rank() == 0 and not (root / "data").exists():
        fake_prepared_data(root / "data", clips=4)
    dist.barrier()
    return root / "data"


def _config(**kw):
    base = dict(tiny=True, steps=4, lr=1e-3, batch_size=1, seed=5, segment_blocks=1, neighbors="1,1",
                windows_per_clip=3, log_every=1, checkpoint_every=100)
    base.update(kw)
    return make_config(None, base)


def _full_grads(trainer) -> dict:
    out = {}
    for name, p in zip(trainer.names, trainer.params):  # the same order on every rank: full_tensor is collective
        g = p.grad
        out[name] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return out


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> float:
    why = mismatch(got, want, rtol)
    assert why is None, f"{what}: {why}"
    return relative_error(got, want)


def _case_gradients(ulysses: int, checkpointing: bool):
    def case(group):
        rank = dist.get_rank()
        root = _scratch(f"grads-u{ulysses}-c{int(checkpointing)}")
        data = _data(root)
        dp = dist.get_world_size() // ulysses
        trainer = Trainer(_config(ulysses=ulysses, activation_checkpointing=checkpointing), data, root / "run",
                          device="cpu", progress=False)
        sharded = [n for n, p in zip(trainer.names, trainer.params) if hasattr(p, "full_tensor")]
        assert sharded and all(not keeps_fp32(n) for n in sharded), "FSDP did not shard the blocks"
        loss = trainer.forward_backward(0)
        grads = _full_grads(trainer)
        # one process, the same micro-batches: the dp ranks' batches are its accumulated micro-batches
        ref = Trainer(_config(fsdp=False, grad_accum=dp, activation_checkpointing=checkpointing), data,
                      root / f"ref-rank{rank}", device="cpu", topology=Topology(), progress=False)
        ref_loss = ref.forward_backward(0)
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), f"loss {loss} vs one process {ref_loss}"
        worst = max(_close(grads[n], p.grad, GRAD_RTOL, f"gradient of {n}") for n, p in zip(ref.names, ref.params))
        RECORD.append(f"loss {loss:.6f} vs {ref_loss:.6f}; worst gradient error {worst:.1e} of its scale")
    return case


def _case_bf16(group):
    root = _scratch("bf16")
    data = _data(root)
    trainer = Trainer(_config(compute_dtype="bfloat16"), data, root / "run", device="cpu", progress=False)
    for name, p in zip(trainer.names, trainer.params):
        assert p.dtype == torch.float32, f"{name}: master weight in {p.dtype}"
        assert hasattr(p, "full_tensor") != keeps_fp32(name), f"{name}: sharded={hasattr(p, 'full_tensor')}"
    loss = trainer.forward_backward(0)
    assert all(p.grad.dtype == torch.float32 for p in trainer.params)
    ref = Trainer(_config(fsdp=False, grad_accum=dist.get_world_size()), data, root / f"ref-rank{dist.get_rank()}",
                  device="cpu", topology=Topology(), progress=False)
    ref_loss = ref.forward_backward(0)
    assert abs(loss - ref_loss) <= 2e-2 * ref_loss, f"bf16 loss {loss} vs fp32 {ref_loss}"
    trainer.optimizer_step(0)
    assert all(bool(torch.isfinite(p.full_tensor() if hasattr(p, "full_tensor") else p).all()) for p in trainer.params)
    RECORD.append(f"bf16 loss {loss:.5f} vs fp32 {ref_loss:.5f}")


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def _case_resume(group):
    root = _scratch("resume")
    data = _data(root)
    cfg = dict(ema=True, grad_clip=0.05, warmup_steps=2, activation_checkpointing=True)
    whole = Trainer(_config(steps=4, **cfg), data, root / "whole", device="cpu", progress=False)
    whole.run()
    Trainer(_config(steps=2, **cfg), data, root / "resumed", device="cpu", progress=False).run()
    resumed = Trainer(_config(steps=4, **cfg), data, root / "resumed", device="cpu", progress=False)
    assert resumed.step == 2
    resumed.run()
    for name, a, b in zip(whole.names, whole.params, resumed.params):
        assert torch.equal(_full(a), _full(b)), f"{name} differs after resuming"
    moved = 0
    for name, a, b, p in zip(whole.names, whole.ema, resumed.ema, whole.params):
        ema = _full(a)
        assert torch.equal(ema, _full(b)), f"EMA of {name} differs after resuming"
        moved += not torch.equal(ema, _full(p))
    assert moved == len(whole.names), "the EMA of a parameter (sharded or whole) was not updated"
    if dist.get_rank() == 0:
        logs = [[json.loads(line)["loss"] for line in open(root / r / "log.jsonl")] for r in ("whole", "resumed")]
        assert logs[0] == logs[1] and len(logs[0]) == 4, logs
        torch.save({n: _full(e) for n, e in zip(whole.names, whole.ema)}, root / "ema.pt")
    else:
        for e in whole.ema:
            _full(e)
    dist.barrier()


def _case_prepare(group):
    from swift_model.training.prepare import PrepareSettings, load_prepare_models, prepare

    root = _scratch("prepare")
    if dist.get_rank() == 0:
        write_videos(root / "videos", range(3), frames=9, size=64)
        (root / "videos" / "broken.mp4").write_bytes(b"not a video")
        write_mp4(synthetic_video(7, frames=5, size=64), str(root / "videos" / "short.mp4"))
        with open(root / "videos" / "captions.jsonl", "a") as f:
            for name in ("broken.mp4", "short.mp4"):
                f.write(json.dumps({"video": name, "caption": "a caption"}) + "\n")
    dist.barrier()
    models = load_prepare_models(tiny=True, device="cpu")
    result = prepare(root / "videos", root / "data", models, PrepareSettings(frames=9, width=64, height=64),
                     captions=root / "videos" / "captions.jsonl", progress=False)
    assert len(result["clips"]) == 3 and [s["video"] for s in result["skipped"]] == ["broken.mp4", "short.mp4"], result
    RECORD.append(f"rank {dist.get_rank()}: {result['_this_rank']}")


CASES = {
    "gradients-data-parallel": _case_gradients(1, False),
    "gradients-data-parallel-checkpointing": _case_gradients(1, True),
    "gradients-ulysses-checkpointing": _case_gradients(2, True),
    "bf16-compute-fp32-masters": _case_bf16,
    "resume": _case_resume,
    "prepare": _case_prepare,
}


@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A gloo process group of this process alone (and the cases' scratch folder): the ranks' code in-process."""
    monkeypatch.setenv("SPAWN_OUT_DIR", str(tmp_path))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["gradients-data-parallel", "bf16-compute-fp32-masters"])
def test_case_on_one_rank(one_rank_group, case):
    """A case of the spawned ranks run here, on a group of one rank (FSDP shards over that rank; the reference
    accumulates one micro-batch): the fast suite's check of the code the distributed tests run at 2 ranks."""
    CASES[case](one_rank_group)


@pytest.fixture(scope="module")
def two_ranks(spawned):
    """The verdicts of the 2 ranks (spawned once for the module) and their scratch folder."""
    run = spawned(WORLD_SIZE)
    return run, Path(run["out_dir"])


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_distributed_training(two_ranks, case):
    spawn.check(two_ranks[0], case)


@pytest.mark.distributed
def test_export_reads_the_two_rank_checkpoint(two_ranks, tmp_path):
    """One process exports the 2-rank run (sharded DCP checkpoint) to exactly the weights the ranks held."""
    from swift_model import WanDiT
    from swift_model.training.export import export

    run, out = two_ranks
    spawn.check(run, "resume")
    ema = torch.load(out / "resume" / "ema.pt")
    export(out / "resume" / "whole", tmp_path / "exported", with_vae=False)
    model = WanDiT.from_pretrained(tmp_path / "exported", device="cpu")
    sd = model.state_dict()
    assert set(sd) == set(ema)
    for name, tensor in ema.items():
        assert torch.equal(sd[name], tensor), name


@pytest.mark.distributed
def test_prepare_on_two_ranks_equals_one_process(two_ranks, tmp_path):
    from safetensors.torch import load_file

    from swift_model.training.prepare import PrepareSettings, load_prepare_models, prepare

    run, out = two_ranks
    spawn.check(run, "prepare")
    two = json.loads((out / "prepare" / "data" / "manifest.json").read_text())
    with torch_threads(1):  # as the ranks ran: the shards are compared bitwise
        one = prepare(out / "prepare" / "videos", tmp_path / "data", load_prepare_models(tiny=True, device="cpu"),
                      PrepareSettings(frames=9, width=64, height=64),
                      captions=out / "prepare" / "videos" / "captions.jsonl", progress=False)
    assert [c["id"] for c in two["clips"]] == [c["id"] for c in one["clips"]]
    assert two["skipped"] == one["skipped"]
    assert "cannot read the video" in two["skipped"][0]["reason"]
    assert two["skipped"][1]["reason"] == "too short: 5 frames, needs 9 for 9 frames at 16 fps"
    for c in one["clips"]:
        a, b = load_file(str(out / "prepare" / "data" / c["file"])), load_file(str(tmp_path / "data" / c["file"]))
        for key in ("z", "z_ref", "prompt_embeds"):
            assert torch.equal(a[key], b[key]), (c["id"], key)
