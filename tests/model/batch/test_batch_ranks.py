"""``swift-i2v batch`` on 4 torch.distributed ranks (gloo, CPU processes) with ``--ulysses-degree 2``: two
replicas of two ranks each, every replica splitting its videos' DiT calls over its two ranks (tests/spawn.py).

The ranks run the command line under a torchrun-like environment and save the frames their replica's first rank
hands the video encoder; the test compares them with one process's batch of the same job file (fp32 rounding:
the Ulysses split changes the attention's batching, see test_parallel.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

import spawn
from helpers import assert_frames_match, recorded_video_frames, torchrun_env, write_png

TINY = ["--tiny", "--prompt", "a dog", "--frames", "5", "--width", "64", "--height", "64", "--quiet"]


def _case_ulysses_replicas(group):
    from swift_model.cli import main

    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(os.environ["SPAWN_OUT_DIR"])
    if rank == 0:  # inputs with fresh seeds; the parent reads them back from the job file
        rng = np.random.default_rng()
        write_png(out / "in.png", 40, 30, seed=int(rng.integers(2**31)))
        jobs = [{"id": "j0", "image": "in.png", "seed": int(rng.integers(2**31))},
                {"id": "bad", "image": "gone.png"},
                {"id": "j2", "image": "in.png", "seed": int(rng.integers(2**31)), "frames": 9}]
        (out / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    dist.barrier()
    with torchrun_env(rank, world), recorded_video_frames() as videos:
        status = main(["batch", "--jobs", str(out / "jobs.jsonl"), "--out-dir", str(out / "videos"),
                       "--ulysses-degree", "2", "--report", str(out / "report.json")] + TINY)
    assert status == 1, status  # the bad job
    np.savez(out / f"frames{rank}.npz", *videos)


CASES = {"ulysses-replicas": _case_ulysses_replicas}


@pytest.mark.distributed
def test_batch_with_ulysses_replicas(spawned, tmp_path):
    """4 ranks, ``--ulysses-degree 2``: replica 0 (ranks 0, 1) makes j0 then j2, replica 1 (ranks 2, 3) fails
    ``bad`` and idles; one results.jsonl in job order; the frames are one process's to fp32 rounding."""
    from swift_model.cli import main

    run = spawned(4)
    spawn.check(run, "ulysses-replicas")
    out = Path(run["out_dir"])
    recs = [json.loads(line) for line in (out / "videos" / "results.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"]) for r in recs] == [("j0", "ok"), ("bad", "error"), ("j2", "ok")]
    assert str(out / "gone.png") in recs[1]["error"]
    report = json.loads((out / "report.json").read_text())
    degrees = ("world_size", "ulysses_degree", "cfg_degree", "data_parallel_degree", "fsdp")
    assert tuple(report[k] for k in degrees) == (4, 2, 1, 2, False)
    frames = [list(np.load(out / f"frames{r}.npz").values()) for r in range(4)]
    assert [len(f) for f in frames] == [2, 0, 0, 0]  # only replica 0's first rank wrote videos
    with recorded_video_frames() as one:
        assert main(["batch", "--jobs", str(out / "jobs.jsonl"), "--out-dir", str(tmp_path)] + TINY) == 1
    assert [f.shape for f in one] == [(5, 64, 64, 3), (9, 64, 64, 3)]
    for got, want in zip(frames[0], one):
        assert_frames_match(got, want)
