"""``swift-i2v batch --ray`` (swift_model/batch/ray_pipeline.py): the jobs as a Ray Data pipeline with a Stage I
and a Stage II actor pool, and the pipelines of one part (``SwiftI2VPipeline(..., parts=...)``) its actors hold.

The fast tests run the two actors' code in this process, without Ray: a job through a Stage I worker, its packed
Stage I result through a Stage II worker, gives the frames ``run_job`` gives (the same phase methods on the same
weights, one torch thread). The Ray tests (marked ``distributed``: a local cluster starts worker processes;
skipped where Ray cannot be imported) run the pipeline on a local two-CPU cluster: the same videos and records as
the plain batch, a Stage II actor killed once (its job retried, no second video or record), bad jobs recorded.
Actors of two processes each (``processes_per_actor=2``: a gloo group per actor, Ulysses over its two ranks) are
tested twice, also marked ``distributed``: their worker code in this process against ``run_job`` (the frames
before the codec, to fp32 rounding), and on the local cluster against the plain batch (videos and records), with
no helper process left once the batch is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import sys
import time

import numpy as np
import pytest
import torch

from helpers import assert_frames_match, recorded_video_frames, write_png
from swift_model.batch.jobs import read_jobs
from swift_model.batch.ray_pipeline import (ModelSource, RayOptions, Stage1Worker, Stage2Worker, pack_handoff,
                                            run_ray_batch, unpack_handoff)
from swift_model.batch.results import RESULTS_FILE, ResultsLog
from swift_model.batch.runner import run_batch, run_job
from swift_model.cli import main
from swift_model.generation.pipeline import Conditioning, GenerationState, SwiftI2VPipeline
from swift_model.generation.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")

DEFAULTS = GenerationRequest(frames=5, width=128, height=64, prompt="a red fox in the snow")
TINY = ModelSource(dict(seed=0, stage2_kind="swift"), tiny=True)  # the models of conftest's tiny_pipe


def _job_file(folder, rng):
    """Four jobs in ``folder``: two good ones (fresh random images and seeds, one with its own prompt), a corrupt
    image and a missing one."""
    seeds = [int(s) for s in rng.integers(0, 2**31, 4)]
    write_png(folder / "a.png", 128, 64, seed=seeds[0])
    write_png(folder / "b.png", 96, 80, seed=seeds[1])  # another aspect: resized and cropped like any input
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [dict(id="a", image="a.png", seed=seeds[2]),
             dict(id="b", image="b.png", seed=seeds[3], prompt="a boat at dawn"),
             dict(id="corrupt", image="corrupt.png"),
             dict(id="missing", image="nowhere.png")]
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return read_jobs(path, DEFAULTS)


def _job_file_path(folder):
    """A job file of one job (its image need not exist: the tests using it stop before any job runs)."""
    path = folder / "one.jsonl"
    path.write_text(json.dumps(dict(id="x", image="x.png", prompt="p", frames=5, width=128, height=64)) + "\n")
    return path


def _same_record(got: dict, want: dict) -> None:
    """Records equal but for the seconds (and the folder of the output)."""
    assert set(got) == set(want) == {"id", "status", "output", "seconds", "error"}
    for key in ("id", "status", "error"):
        assert got[key] == want[key], (key, got, want)
    assert (got["output"] is None) == (want["output"] is None)
    if got["output"] is not None:
        assert os.path.basename(got["output"]) == os.path.basename(want["output"]) == f"{got['id']}.mp4"
    assert got["seconds"] >= 0


# -- the actors' code in this process (fast) ---------------------------------------------------------------------


def test_stage_workers_make_the_plain_batch_videos(tmp_path, tiny_pipe):
    """A Stage I worker then a Stage II worker (each holding one DiT) write the frames and records ``run_job``
    writes, exactly (bitwise: the same phase methods on the same weights, one thread); bad jobs are error records
    from the stage that finds them."""
    rng = np.random.default_rng()
    jobs = _job_file(tmp_path, rng)
    plain, split = tmp_path / "plain", tmp_path / "split"
    plain.mkdir()
    split.mkdir()
    with recorded_video_frames() as want_frames:
        want = [run_job(tiny_pipe, job, plain) for job in jobs]
    s1 = Stage1Worker(TINY, "cpu", 1, str(split))
    s2 = Stage2Worker(TINY, "cpu", 1, str(split))
    # each holds its own DiT (and Stage I its encoders), never the other's
    assert s1.pipe.parts == ("stage1",) and s1.pipe.stage2 is None and s1.pipe.text_encoder is not None
    assert s2.pipe.parts == ("stage2",) and s2.pipe.stage1 is None and s2.pipe.text_encoder is None
    assert s2.pipe.image_encoder is None
    with recorded_video_frames() as got_frames:
        rows = [s1({"id": job.id, "job": pickle.dumps(job)}) for job in jobs]
        got = [json.loads(s2(row)["record"]) for row in rows]
    assert [r["status"] for r in want] == ["ok", "ok", "error", "error"]
    for g, w in zip(got, want):
        _same_record(g, w)
    assert "corrupt.png" in got[2]["error"] and "nowhere.png" in got[3]["error"]
    assert rows[2]["handoff"] == b"" and rows[2]["record"]  # found by Stage I, passed through Stage II
    assert len(got_frames) == len(want_frames) == 2
    for g, w in zip(got_frames, want_frames):
        assert g.dtype == np.uint8 and np.array_equal(g, w)
    assert sorted(os.listdir(split)) == ["a.mp4", "b.mp4"]  # no record file: the driver writes it


def test_handoff_carries_what_stage2_reads():
    """The packed Stage I result restores the Stage I latents and the prompt embeddings exactly (and the negative
    ones when guided); the CLIP tokens, which only Stage I reads, stay behind."""
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    lat, ctx, neg, clip = (torch.randn(s, generator=g) for s in ((1, 16, 2, 4, 8), (1, 7, 32), (1, 5, 32), (1, 3, 8)))
    for negative in (None, neg):
        state = GenerationState(conditioning=Conditioning(ctx, negative, clip), stage1_latents=lat)
        back = unpack_handoff(pack_handoff(state))
        assert torch.equal(back.stage1_latents, lat) and torch.equal(back.conditioning.context, ctx)
        assert (back.conditioning.negative_context is None) == (negative is None)
        if negative is not None:
            assert torch.equal(back.conditioning.negative_context, neg)
        assert back.conditioning.clip_fea is None and back.reference is None
    with pytest.raises(ValueError, match="run text_encoding and stage1 first"):
        pack_handoff(GenerationState())


def test_pipeline_parts_refuse_the_other_parts_phases(tmp_path):
    """A pipeline of one part runs its phases and names the missing DiT for the others; ``parts`` is checked."""
    p1 = SwiftI2VPipeline.tiny(device="cpu", parts="stage1")
    run = p1.prepare(DEFAULTS.replace(image=write_png(tmp_path / "in.png", 128, 64)))
    state = GenerationState()
    p1.run_phase("text_encoding", run, state)
    p1.run_phase("stage1", run, state)
    for phase in ("stage2", "decode"):
        with pytest.raises(ValueError, match=f"phase '{phase}' needs the stage2 DiT.*parts=\\('stage1',\\)"):
            p1.run_phase(phase, run, state)
    for bad in ((), ("stage3",), "both"):
        with pytest.raises(ValueError, match="parts must be a non-empty subset"):
            SwiftI2VPipeline.tiny(device="cpu", parts=bad)
    with pytest.raises(ValueError, match="at least one of the DiTs"):
        SwiftI2VPipeline(None, None, p1.vae1, p1.vae2)


def test_ray_options_and_a_missing_ray(tmp_path, monkeypatch, capsys):
    """Bad pool settings are refused naming the setting (a fractional GPU count above 1, processes that are not
    one per GPU); processes per actor that do not divide both DiTs' heads are refused from the configs alone; without
    Ray the batch says how to install it (before anything is written)."""
    for kw, needle in ((dict(stage1_actors=0), "stage1_actors must be an int >= 1"),
                       (dict(stage2_actors=1.5), "stage2_actors must be an int >= 1"),
                       (dict(gpus_per_actor=-1), "gpus_per_actor must be a number >= 0"),
                       (dict(gpus_per_actor=2.5), "--gpus-per-actor 2.5: an actor over several GPUs runs one "
                                                  "process per GPU"),
                       (dict(processes_per_actor=0), "processes_per_actor must be an int >= 1"),
                       (dict(gpus_per_actor=2, processes_per_actor=3), "--processes-per-actor 3 with --gpus-per-"),
                       (dict(gpus_per_actor=1, processes_per_actor=2), "an actor on GPUs runs one process per GPU"),
                       (dict(cpus_per_actor=0), "cpus_per_actor must be a number > 0")):
        with pytest.raises(ValueError, match=needle):
            RayOptions(**kw)
    assert [RayOptions(**kw).processes for kw in (dict(), dict(gpus_per_actor=0.5), dict(gpus_per_actor=2),
                                                  dict(gpus_per_actor=0, processes_per_actor=2))] == [1, 1, 2, 2]
    TINY.check_processes(2)  # the tiny DiTs have 4 heads
    with pytest.raises(ValueError, match="3 processes per actor split each DiT call's attention heads, and the "
                                         "Stage I DiT has 4 heads"):
        TINY.check_processes(3)
    # the command line: the flags need --ray, one line each, before any weight or cluster
    base = ["batch", "--tiny", "--jobs", str(_job_file_path(tmp_path)), "--out-dir", str(tmp_path / "out"),
            "--quiet"]
    for extra, needle in ((["--stage1-actors", "2"], "--stage1-actors needs --ray"),
                          (["--gpus-per-actor", "1"], "--gpus-per-actor needs --ray"),
                          (["--processes-per-actor", "2"], "--processes-per-actor needs --ray"),
                          (["--ray", "--gpus-per-actor", "1.5"], "--gpus-per-actor 1.5: an actor over several GPUs"),
                          (["--ray", "--device", "cpu", "--processes-per-actor", "-1"],
                           "processes_per_actor must be an int >= 1"),
                          (["--ray", "--device", "cpu", "--processes-per-actor", "3"],
                           "3 processes per actor split each DiT call's attention heads"),
                          (["--ray", "--gpus-per-actor", "3"], "3 processes per actor split each DiT call's"),
                          (["--ray", "--stage2-actors", "0"], "stage2_actors must be an int >= 1"),
                          (["--ray", "--ulysses-degree", "2"], "--ulysses-degree is not supported with --ray")):
        assert main(base + extra) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if "--tiny" not in line]  # the note
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main(base + ["--ray"]) == 2
    assert 'pip install "ray[data]>=2.40"' in capsys.readouterr().err
    with pytest.raises(ValueError, match=r'pip install "ray\[data\]>=2.40"'):
        run_ray_batch([], tmp_path / "out", TINY)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="needs --stage1 and --stage2"):
        ModelSource().check()


# -- on a local Ray cluster (distributed) ------------------------------------------------------------------------

RAY_TIMEOUT_S = 300  # a cluster start, four actor starts (one a restart) on a loaded two-core machine


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail (TimeoutError) instead of hanging when the block takes longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"the Ray batch took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of four logical CPUs for the module (started once, shut down after): two actors of
    two processes each reserve four (on a two-core machine: they take turns on the cores)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install \".[ray]\")")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install \"ray[data]\")")
    ray.init(num_cpus=4, object_store_memory=100 * 2**20, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.mark.distributed
def test_ray_batch_equals_the_plain_batch_through_a_crash(tmp_path, tiny_pipe, ray_cluster, capsys):
    """On a local cluster, ``run_ray_batch`` writes the plain batch's videos (decoded frames equal: both sides
    compute the same frames on one thread, and the same encoder on the same frames writes the same video) and
    records; a Stage II actor whose process dies after writing a video is restarted and its job rerun, leaving
    one video and one record per job; the bad jobs are error records; a rerun skips the finished jobs."""
    from swift_model.io.video import read_mp4

    jobs = _job_file(tmp_path, np.random.default_rng())
    plain, on_ray = tmp_path / "plain", tmp_path / "ray"
    plain.mkdir()
    want = run_batch(tiny_pipe, jobs, plain, progress=False)
    assert (want.ok, want.failed) == (2, 2)
    marker = tmp_path / "crash-once"
    marker.touch()
    with _deadline(RAY_TIMEOUT_S):
        got = run_ray_batch(jobs, on_ray, TINY, RayOptions(), progress=False, crash_once=str(marker))
    assert not marker.exists()  # a Stage II actor did die
    assert (got.ok, got.failed, got.skipped) == (2, 2, 0)
    records = ResultsLog(on_ray).records()
    assert sorted(r["id"] for r in records) == ["a", "b", "corrupt", "missing"]  # one record each
    plain_records = ResultsLog(plain).last()
    for rec in records:
        _same_record(rec, plain_records[rec["id"]])
    assert sorted(os.listdir(on_ray)) == ["a.mp4", "b.mp4", RESULTS_FILE]  # no second video, no temporary file
    for name in ("a.mp4", "b.mp4"):
        g, w = read_mp4(str(on_ray / name)), read_mp4(str(plain / name))
        assert g.shape == w.shape == (5, 64, 128, 3) and np.array_equal(g, w), name
    # resume, from the command line: the finished jobs are skipped without starting an actor (the cluster of
    # this process is used); the records stay as they were
    done = tmp_path / "done.jsonl"
    done.write_text("".join((tmp_path / "jobs.jsonl").read_text().splitlines(keepends=True)[:2]))
    with _deadline(60):
        status = main(["batch", "--tiny", "--stage2-kind", "swift", "--jobs", str(done), "--out-dir", str(on_ray),
                       "--ray", "--frames", "5", "--width", "128", "--height", "64", "--prompt", "p", "--quiet"])
    out = capsys.readouterr().out
    assert status == 0 and "batch: 0 ok, 0 failed, 2 skipped" in out, out
    assert ResultsLog(on_ray).records() == records
    # actors asking for a GPU on a cluster without one: refused, not waited for
    with _deadline(60), pytest.raises(ValueError, match="--gpus-per-actor 1: the Ray cluster has no GPU"):
        run_ray_batch(jobs, tmp_path / "gpu", TINY, RayOptions(gpus_per_actor=1), progress=False)


# -- actors of two processes (distributed) -----------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _helpers_gone(pid_dir, seconds: float) -> list[int]:
    """The helpers (pid files in ``pid_dir``) still running after waiting up to ``seconds`` for them to end."""
    pids = [int(name) for name in os.listdir(pid_dir)]
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


@pytest.mark.distributed
def test_two_process_workers_make_the_plain_batch_frames(tmp_path, tiny_pipe):
    """A Stage I worker then a Stage II worker of two processes each (this process is rank 0, one helper each;
    gloo, Ulysses over the two ranks) write ``run_job``'s frames to fp32 rounding and its records; the bad jobs
    are error records agreed by both ranks, and the group goes on with the next job; each helper ends when its
    worker closes the group."""
    rng = np.random.default_rng()
    jobs = _job_file(tmp_path, rng)
    jobs = [jobs[2], jobs[0], jobs[3], jobs[1]]  # a failing job first: the group must go on after it
    plain, split, pids = tmp_path / "plain", tmp_path / "split", tmp_path / "pids"
    for folder in (plain, split, pids):
        folder.mkdir()
    with recorded_video_frames() as want_frames:
        want = [run_job(tiny_pipe, job, plain) for job in jobs]
    with _deadline(120):
        s1 = Stage1Worker(TINY, "cpu", 1, str(split), 2, str(pids))
        assert s1.pipe.parallel.world_size == s1.pipe.parallel.ulysses == 2
        rows = [s1({"id": job.id, "job": pickle.dumps(job)}) for job in jobs]
        s1.group.close()  # one default process group per process: Stage II's group comes after
        s2 = Stage2Worker(TINY, "cpu", 1, str(split), 2, str(pids))
        with recorded_video_frames() as got_frames:
            got = [json.loads(s2(row)["record"]) for row in rows]
        s2.group.close()
    assert [r["status"] for r in want] == ["error", "ok", "error", "ok"]
    for g, w in zip(got, want):
        _same_record(g, w)
    assert "corrupt.png" in got[0]["error"] and "nowhere.png" in got[2]["error"]
    assert len(got_frames) == len(want_frames) == 2
    for g, w in zip(got_frames, want_frames):
        assert_frames_match(g, w)
    assert sorted(os.listdir(split)) == ["a.mp4", "b.mp4"]
    assert len(os.listdir(pids)) == 2 and _helpers_gone(pids, 10) == []


@pytest.mark.distributed
def test_ray_batch_with_two_process_actors(tmp_path, tiny_pipe, ray_cluster):
    """On a local cluster, actors of two processes each (``processes_per_actor=2`` on the CPU) write the plain
    batch's records and videos (decoded frames equal, or within the codec's answer to a 1-level difference of
    fp32 rounding), through a Stage II actor killed after writing a video (its helper ends with it, Ray restarts
    it with a new helper and reruns the job: one video and one record each); every helper process has ended once
    the batch is done."""
    from swift_model.io.video import read_mp4

    jobs = _job_file(tmp_path, np.random.default_rng())
    plain, on_ray, pids = tmp_path / "plain", tmp_path / "ray", tmp_path / "pids"
    plain.mkdir()
    pids.mkdir()
    want = run_batch(tiny_pipe, jobs, plain, progress=False)
    marker = tmp_path / "crash-once"
    marker.touch()
    with _deadline(RAY_TIMEOUT_S):
        got = run_ray_batch(jobs, on_ray, TINY, RayOptions(gpus_per_actor=0, processes_per_actor=2),
                            progress=False, crash_once=str(marker), pid_dir=str(pids))
    assert not marker.exists()  # a Stage II actor did die
    assert (got.ok, got.failed, got.skipped) == (want.ok, want.failed, 0) == (2, 2, 0)
    records, plain_records = ResultsLog(on_ray).records(), ResultsLog(plain).last()
    assert sorted(r["id"] for r in records) == ["a", "b", "corrupt", "missing"]
    for rec in records:
        _same_record(rec, plain_records[rec["id"]])
    assert sorted(os.listdir(on_ray)) == ["a.mp4", "b.mp4", RESULTS_FILE]
    for name in ("a.mp4", "b.mp4"):
        g, w = (read_mp4(str(folder / name)).astype(np.int16) for folder in (on_ray, plain))
        assert g.shape == w.shape == (5, 64, 128, 3), name
        assert np.abs(g - w).mean() < 0.5, (name, np.abs(g - w).mean())
    assert len(os.listdir(pids)) >= 3  # a helper per actor, and one more for the restarted Stage II actor
    assert _helpers_gone(pids, 30) == []
