"""``prepare`` on 2 gloo ranks with uneven work: rank 1 has no video, rank 0 works longer than the ranks'
collective timeout. A barrier at the end (as before) would time out on rank 1; the completion markers wait with no
deadline (tests/spawn.py: spawned ranks, a join deadline so a hang fails)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import spawn
from helpers import write_videos

pytestmark = pytest.mark.distributed

COLLECTIVE_TIMEOUT_S = 3  # shorter than rank 0's work below
RANK0_EXTRA_S = 2 * COLLECTIVE_TIMEOUT_S
RECORD: list = []


def _case_uneven(group):
    from swift_model.training import prepare as prep

    root = Path(os.environ["SPAWN_OUT_DIR"]) / "uneven"
    if dist.get_rank() == 0:
        write_videos(root / "videos", [0], frames=9, size=64)  # one video: video 0 -> rank 0, none for rank 1
        real = prep.stage_transition_reference

        def slow(*args, **kwargs):  # a long clip: rank 0 is still working when rank 1's timeout would fire
            time.sleep(RANK0_EXTRA_S)
            return real(*args, **kwargs)

        prep.stage_transition_reference = slow
    dist.barrier()  # the videos are written (both ranks arrive together here)
    models = prep.load_prepare_models(tiny=True, device="cpu")
    for attempt in ("first", "rerun"):  # a rerun finds the clip done: no rank has work, and markers of the
        result = prep.prepare(root / "videos", root / "data", models,  # first run must not satisfy this one
                              prep.PrepareSettings(frames=9, width=64, height=64),
                              captions=root / "videos" / "captions.jsonl", progress=False)
        assert [c["video"] for c in result["clips"]] == ["clip000.mp4"] and not result["skipped"], result
        assert result == {**json.loads((root / "data" / "manifest.json").read_text()),
                          "_this_rank": result["_this_rank"]}
        RECORD.append(f"{attempt}: rank {dist.get_rank()} {result['_this_rank']}")
    expected = {"made": 0, "already_done": 1 if dist.get_rank() == 0 else 0, "skipped": 0}
    assert result["_this_rank"] == expected, result["_this_rank"]


CASES = {"uneven": _case_uneven}


def test_prepare_with_uneven_ranks_never_times_out(tmp_path):
    run = spawn.launch(__name__, 2, str(tmp_path), timeout_s=COLLECTIVE_TIMEOUT_S, deadline_s=120)
    spawn.check(run, "uneven")
    assert run["ranks"][0]["uneven"]["s"] > RANK0_EXTRA_S  # rank 0 really outlasted the collective timeout
