"""A batch's outputs (swift_model/batch/results.py): atomic videos, the results log with a torn line, resume."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from swift_model.batch.results import (RESULTS_FILE, ResultsLog, make_record, output_path, remove_temp_files,
                                       write_video_atomic)
from swift_model.io.video import TEMP_PREFIX, read_mp4


def _job(job_id):
    return SimpleNamespace(id=job_id)


def _frames(seed, n=3, h=32, w=48):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_write_video_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = output_path(tmp_path, "clip")
    assert path == str(tmp_path / "clip.mp4")
    first = _frames(np.random.default_rng().integers(2**31))
    assert write_video_atomic(first, path, fps=8) == path
    assert read_mp4(path).shape == first.shape
    before = (tmp_path / "clip.mp4").read_bytes()

    def dies_midway():  # a job killed while its video is being encoded
        yield first[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_video_atomic(dies_midway(), path, fps=8)
    assert (tmp_path / "clip.mp4").read_bytes() == before  # the old video intact, no temporary file left
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        write_video_atomic(first[0], path)


def test_remove_temp_files_removes_only_a_killed_runs_leftovers(tmp_path):
    stale = [tmp_path / f"{TEMP_PREFIX}{i:016x}.mp4" for i in range(2)]
    keep = [tmp_path / "a.mp4", tmp_path / RESULTS_FILE, tmp_path / ".other.mp4"]
    for p in stale + keep:
        p.write_bytes(b"x")
    assert sorted(remove_temp_files(tmp_path)) == sorted(map(str, stale))
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in keep)


def test_make_record():
    rec = make_record(_job("a"), "ok", "/o/a.mp4", 1.23456)
    assert rec == {"id": "a", "status": "ok", "output": "/o/a.mp4", "seconds": 1.235, "error": None}
    rec = make_record(_job("b"), "error", None, 0, "image not found:\n  /x.png")
    assert rec["error"] == "image not found: /x.png" and rec["output"] is None
    for args in (("done", None, 1), ("error", None, 1), ("ok", "o", 1, "boom")):
        with pytest.raises(ValueError):
            make_record(_job("c"), *args)


def test_results_log_last_record_wins_and_needs_the_video(tmp_path):
    log = ResultsLog(tmp_path)
    assert log.records() == [] and log.finished() == set()
    ids = [f"j{i}" for i in range(5)]
    for i in ids:
        log.append(make_record(_job(i), "ok", output_path(tmp_path, i), 1.0))
    for i in ids[:4]:  # j4's video is missing: not finished
        (tmp_path / f"{i}.mp4").write_bytes(b"video")
    log.append(make_record(_job("j1"), "error", None, 1.0, "out of memory"))  # j1 failed on its last run
    log.append(make_record(_job("j2"), "error", None, 1.0, "x"))
    log.append(make_record(_job("j2"), "ok", output_path(tmp_path, "j2"), 1.0))  # ... j2 then succeeded
    assert log.finished() == {"j0", "j2", "j3"}
    assert len(log.records()) == 8
    lines = (tmp_path / RESULTS_FILE).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ids + ["j1", "j2", "j2"]


def test_a_torn_last_line_is_skipped_and_terminated(tmp_path):
    log = ResultsLog(tmp_path)
    log.append(make_record(_job("a"), "ok", output_path(tmp_path, "a"), 1.0))
    (tmp_path / "a.mp4").write_bytes(b"v")
    (tmp_path / "b.mp4").write_bytes(b"v")
    whole = json.dumps(make_record(_job("b"), "ok", output_path(tmp_path, "b"), 2.0))
    cut = np.random.default_rng().integers(1, len(whole) - 1)
    with open(tmp_path / RESULTS_FILE, "a") as f:  # a run killed in the middle of writing b's record
        f.write(whole[:cut])
    assert [r["id"] for r in log.records()] == ["a"] and log.finished() == {"a"}
    log.append(make_record(_job("c"), "error", None, 0.5, "bad image"))
    assert [r["id"] for r in log.records()] == ["a", "c"]  # c's record was not glued to the torn line
    text = (tmp_path / RESULTS_FILE).read_text()
    assert text.endswith("\n") and text.count("\n") == 3
    (tmp_path / RESULTS_FILE).write_bytes(b'{"id": "a", "status": "ok"}\n\xff\xfe\n[1]\n{"id": 3, "status": "ok"}\n')
    assert [r["id"] for r in log.records()] == ["a"]  # undecodable and malformed lines are skipped too
