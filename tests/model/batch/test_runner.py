"""Running jobs (swift_model/batch/runner.py) and ``SwiftI2VPipeline.generate_many``: per-request outcomes,
error records, resume."""

import json
import os

import numpy as np
import pytest
import torch

from swift_model.batch.jobs import read_jobs
from swift_model.batch.results import RESULTS_FILE, ResultsLog, write_video_atomic
from swift_model.batch.runner import job_request, run_batch, run_job
from swift_model.generation.request import GenerationRequest

from helpers import write_png

SMALL = dict(frames=5, width=64, height=64)


def test_generate_many_yields_each_result_or_error(tiny_pipe, tmp_path, monkeypatch):
    """Four requests with the models loaded once: a missing image and an out-of-memory failure come back as
    their exceptions, in order, and the good ones are bitwise the videos ``generate`` makes alone."""
    img = write_png(tmp_path / "in.png", seed=int(np.random.default_rng().integers(2**31)))
    seeds = [int(s) for s in np.random.default_rng().integers(0, 2**31, 2)]
    good = [GenerationRequest(image=img, prompt="a cat", seed=s, **SMALL) for s in seeds]
    missing = good[0].replace(image=str(tmp_path / "nope.png"))
    oom = good[1].replace(seed=7)
    real = type(tiny_pipe).run_stage1

    def stage1(self, run, state):  # out of memory on the third request only
        if run.request.seed == 7:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, run, state)

    monkeypatch.setattr(type(tiny_pipe), "run_stage1", stage1)
    outcomes = list(tiny_pipe.generate_many([good[0], missing, oom, good[1]], progress=False))
    assert len(outcomes) == 4
    assert isinstance(outcomes[1], ValueError) and str(tmp_path / "nope.png") in str(outcomes[1])
    assert isinstance(outcomes[2], torch.OutOfMemoryError)
    for got, request in zip((outcomes[0], outcomes[3]), good):
        alone = tiny_pipe.generate(request=request, progress=False)
        assert torch.equal(got.frames, alone.frames) and torch.equal(got.latents, alone.latents)
    assert not torch.equal(outcomes[0].frames, outcomes[3].frames)


def test_generate_many_lets_a_bug_through(tiny_pipe, tmp_path, monkeypatch):
    """Only a request's own failures are yielded; an error that is a bug stops the loop."""
    monkeypatch.setattr(type(tiny_pipe), "prepare", lambda self, *a, **k: {}["bug"])
    with pytest.raises(KeyError):
        next(tiny_pipe.generate_many([GenerationRequest(image="x.png", prompt="p", **SMALL)], progress=False))


class _StubPipe:
    """A pipeline that "generates" a video of the request's seed and fails for the images named bad (the
    runner's bookkeeping on its own, without the models)."""

    def __init__(self):
        self.ran = []

    def generate_many(self, requests, *, progress=True):
        for r in requests:
            self.ran.append(os.path.basename(r.output))
            if "bad" in r.image:
                yield ValueError(f"cannot read image {r.image}: broken")
                continue
            frames = np.full((2, 16, 16, 3), r.seed % 256, dtype=np.uint8)
            yield type("Result", (), {"output": write_video_atomic(frames, r.output, r.fps)})()


def test_run_batch_records_and_resumes(tmp_path):
    jobs_file = tmp_path / "jobs.jsonl"
    names = ["a", "bad1", "c", "bad2", "e"]
    jobs_file.write_text("".join(json.dumps({"id": n, "image": f"{n}.png", "seed": i}) + "\n"
                                 for i, n in enumerate(names)))
    jobs = read_jobs(jobs_file, GenerationRequest(prompt="p", **SMALL))
    out = tmp_path / "out"
    out.mkdir()
    (out / ".swift-i2v-0123456789abcdef.mp4").write_bytes(b"a killed run's partial video")
    pipe = _StubPipe()
    s = run_batch(pipe, jobs, str(out), progress=False)
    assert (s.ok, s.failed, s.skipped) == (3, 2, 0)
    assert [r["id"] for r in s.failures] == ["bad1", "bad2"] and "bad1.png" in s.failures[0]["error"]
    recs = ResultsLog(out).records()
    assert [(r["id"], r["status"]) for r in recs] == [("a", "ok"), ("bad1", "error"), ("c", "ok"),
                                                      ("bad2", "error"), ("e", "ok")]
    assert recs[0]["output"] == str(out / "a.mp4") and recs[1]["output"] is None
    assert sorted(os.listdir(out)) == ["a.mp4", "c.mp4", "e.mp4", RESULTS_FILE]  # the stale temp file removed
    os.remove(out / "c.mp4")  # a finished video deleted by hand is made again
    pipe.ran.clear()
    s = run_batch(pipe, jobs, str(out), progress=False)
    assert pipe.ran == ["bad1.mp4", "c.mp4", "bad2.mp4"]
    assert (s.ok, s.failed, s.skipped) == (1, 2, 2)
    assert len(ResultsLog(out).records()) == 8


def test_run_job_turns_a_failure_into_a_record(tiny_pipe, tmp_path):
    (job,) = read_jobs(_one_job(tmp_path, "missing.png"), GenerationRequest(prompt="p", **SMALL))
    assert job_request(job, tmp_path).output == str(tmp_path / "j.mp4")
    rec = run_job(tiny_pipe, job, str(tmp_path))
    assert rec["status"] == "error" and rec["id"] == "j" and rec["output"] is None
    assert f"image not found: {tmp_path / 'missing.png'}" == rec["error"]
    assert not (tmp_path / "j.mp4").exists()


def _one_job(folder, image):
    path = folder / "one.jsonl"
    path.write_text(json.dumps({"id": "j", "image": image}) + "\n")
    return path
