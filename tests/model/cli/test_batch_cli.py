"""``swift-i2v batch`` on the tiny models, and the degree flags' names (``--ulysses-degree``/``--cfg-degree`` and
their older aliases) on every command that takes them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from swift_model.cli import main
from swift_model.cli.main import build_parser
from swift_model.io.video import read_mp4

from helpers import recorded_video_frames, write_png

ROOT = Path(__file__).resolve().parents[3]
TINY = ["--tiny", "--prompt", "a dog", "--frames", "5", "--width", "64", "--height", "64", "--quiet"]
TORCHRUN_TIMEOUT_S = 240  # two fresh processes importing torch and diffusers on a loaded two-core machine


def _job_file(folder: Path, jobs: list[dict]) -> Path:
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _no_model_load(monkeypatch):
    """Make any pipeline construction fail the test: what is checked before the weights must not need them."""
    from swift_model.generation.pipeline import SwiftI2VPipeline

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(SwiftI2VPipeline, "tiny", classmethod(refuse))
    monkeypatch.setattr(SwiftI2VPipeline, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize("lines,needle", [
    ([{"id": "a", "image": "a.png"}, {"id": "b", "image": "b.png", "sede": 1}], ":2: unknown field 'sede'"),
    ([{"id": "a", "image": "a.png"}, {"id": "a", "image": "b.png"}], ":2: duplicate id 'a'"),
    (['{"id": "a", "image": '], ":1: not valid JSON"),
    ([{"id": "a", "image": "a.png", "frames": 6}], ":1: frames must be 4k+1"),
])
def test_bad_job_file_one_error_line_before_any_weight(tmp_path, capsys, monkeypatch, lines, needle):
    _no_model_load(monkeypatch)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    assert main(["batch", "--jobs", str(jobs), "--out-dir", str(tmp_path / "out")] + TINY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {jobs}") and needle in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--cfg-degree", "2", "--guidance", "3"], "error: batch: --cfg-degree 2 is not supported"),
    (["--fsdp"], "error: batch: --fsdp"),
    (["--ulysses-degree", "2"], "error: --ulysses 2 needs several processes"),  # one process here
])
def test_batch_refuses_layouts_it_does_not_run(tmp_path, capsys, monkeypatch, extra, needle):
    _no_model_load(monkeypatch)
    jobs = _job_file(tmp_path, [{"id": "a", "image": "a.png"}])
    assert main(["batch", "--jobs", str(jobs), "--out-dir", str(tmp_path / "out")] + TINY + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(needle), err


def test_a_job_without_a_prompt_is_refused_by_line(tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    jobs = _job_file(tmp_path, [{"id": "a", "image": "a.png", "prompt": "x"}, {"id": "b", "image": "b.png"}])
    args = ["batch", "--jobs", str(jobs), "--out-dir", str(tmp_path / "o"), "--tiny", "--frames", "5"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {jobs}:2: job 'b' has no prompt: give prompt or prompt_embeds in the job file, " \
                  "or --prompt / --prompt-embeds"


@pytest.mark.parametrize("command", ["generate", "plan", "batch"])
def test_degree_flags_and_their_aliases_parse_alike(command):
    base = {"generate": ["--image", "i.png", "--out", "o.mp4"], "plan": ["--world-size", "8"],
            "batch": ["--jobs", "j.jsonl", "--out-dir", "d"]}[command]
    parser = build_parser()
    for new, old in ((["--ulysses-degree", "4"], ["--ulysses", "4"]), (["--cfg-degree", "2"], ["--cfg-parallel"]),
                     (["--cfg-degree", "1"], []), (["--ulysses-degree", "2", "--cfg-degree", "2"],
                                                   ["--ulysses", "2", "--cfg-parallel"])):
        a, b = (vars(parser.parse_args([command] + base + flags)) for flags in (new, old))
        assert a == b, (new, old)
    got = parser.parse_args([command] + base + ["--ulysses-degree", "4", "--cfg-degree", "2"])
    assert (got.ulysses, got.cfg_parallel) == (4, True)
    with pytest.raises(SystemExit):
        parser.parse_args([command] + base + ["--cfg-degree", "3"])


@pytest.mark.slow
def test_batch_equals_generate_records_failures_and_resumes(tmp_path, capsys):
    """Four jobs, one with a missing image and one with a corrupt one: the good videos are bitwise the frames
    ``generate`` hands the encoder for the same arguments, the bad ones are error records naming the file, the
    exit status is 1; a rerun skips the finished jobs and retries the failed ones."""
    rng = np.random.default_rng()
    imgs = [write_png(tmp_path / f"in{i}.png", 48, 40, seed=int(rng.integers(2**31))) for i in range(2)]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    seeds = [int(s) for s in rng.integers(0, 2**31, 2)]
    jobs = _job_file(tmp_path, [
        {"id": "first", "image": "in0.png", "seed": seeds[0]},
        {"id": "missing", "image": "gone.png"},
        {"id": "second", "image": "in1.png", "seed": seeds[1], "prompt": "a cat", "frames": 9},
        {"id": "corrupt", "image": "corrupt.png"},
    ])
    out = tmp_path / "out"
    with recorded_video_frames() as batch_frames:
        status = main(["batch", "--jobs", str(jobs), "--out-dir", str(out)] + TINY)
    captured = capsys.readouterr()
    assert status == 1
    assert "batch: 2 ok, 2 failed, 0 skipped" in captured.out
    recs = {r["id"]: r for r in _records(out)}
    assert [r["id"] for r in _records(out)] == ["first", "missing", "second", "corrupt"]
    assert recs["missing"]["status"] == "error" and str(tmp_path / "gone.png") in recs["missing"]["error"]
    assert recs["corrupt"]["status"] == "error" and str(tmp_path / "corrupt.png") in recs["corrupt"]["error"]
    assert recs["first"]["output"] == str(out / "first.mp4") and recs["first"]["error"] is None
    assert sorted(os.listdir(out)) == ["first.mp4", "results.jsonl", "second.mp4"]

    with recorded_video_frames() as alone:  # generate, for the same arguments
        for img, seed, prompt, frames, name in ((imgs[0], seeds[0], "a dog", "5", "g0"),
                                                (imgs[1], seeds[1], "a cat", "9", "g1")):
            args = ["generate", "--image", img, "--seed", str(seed), "--out", str(tmp_path / f"{name}.mp4")]
            assert main(args + TINY + ["--prompt", prompt, "--frames", frames]) == 0
    assert len(batch_frames) == len(alone) == 2
    for got, want in zip(batch_frames, alone):
        assert np.array_equal(got, want)
    assert batch_frames[1].shape == (9, 64, 64, 3)
    assert np.array_equal(read_mp4(str(out / "first.mp4")), read_mp4(str(tmp_path / "g0.mp4")))

    first_bytes = (out / "first.mp4").read_bytes()
    (tmp_path / "gone.png").write_bytes((tmp_path / "in0.png").read_bytes())  # the missing image appears
    with recorded_video_frames() as rerun:
        status = main(["batch", "--jobs", str(jobs), "--out-dir", str(out)] + TINY)
    assert status == 1 and "batch: 1 ok, 1 failed, 2 skipped" in capsys.readouterr().out
    assert len(rerun) == 1  # only the retried job made a video
    assert (out / "first.mp4").read_bytes() == first_bytes
    assert [(r["id"], r["status"]) for r in _records(out)[4:]] == [("missing", "ok"), ("corrupt", "error")]


@pytest.mark.distributed
def test_torchrun_batch_splits_jobs_over_two_replicas(tmp_path):
    """``torchrun --nproc-per-node 2 ... batch``: the two ranks make different videos (each rank one job per
    round), rank 0 writes one results.jsonl in job order, and the videos are those one process makes (both
    sides run one torch thread, so the same frames are encoded to the same video)."""
    rng = np.random.default_rng()
    for i in range(3):
        write_png(tmp_path / f"in{i}.png", 40, 30, seed=int(rng.integers(2**31)))
    jobs = _job_file(tmp_path, [{"id": f"v{i}", "image": f"in{i % 3}.png", "seed": int(rng.integers(2**31))}
                                for i in range(3)] + [{"id": "bad", "image": "gone.png"}])
    assert main(["batch", "--jobs", str(jobs), "--out-dir", str(tmp_path / "one")] + TINY) == 1
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "swift_model.cli", "batch", "--jobs", str(jobs), "--out-dir", str(two),
                           "--report", str(tmp_path / "two.json")] + TINY,
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert proc.returncode != 0, proc.stderr[-3000:]  # the bad job
    # (torchrun prints its own traceback for a rank's non-zero exit; none comes from the package)
    assert "swift_model/" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("batch: 3 ok, 1 failed") == 1, proc.stdout  # rank 0 alone prints
    recs = _records(two)
    assert [(r["id"], r["status"]) for r in recs] == [("v0", "ok"), ("v1", "ok"), ("v2", "ok"), ("bad", "error")]
    for i in range(3):
        assert np.array_equal(read_mp4(str(two / f"v{i}.mp4")), read_mp4(str(tmp_path / "one" / f"v{i}.mp4")))
    report = json.loads((tmp_path / "two.json").read_text())
    degrees = ("world_size", "ulysses_degree", "cfg_degree", "data_parallel_degree", "fsdp")
    assert tuple(report[k] for k in degrees) == (2, 1, 1, 2, False)
    assert sorted(os.listdir(two)) == ["results.jsonl", "v0.mp4", "v1.mp4", "v2.mp4"]


def test_batch_and_ray_load_the_same_models():
    """The plain batch and every Ray actor load from one description of the models (``model_source``), and every
    model argument reaches it (``--compile`` included, for checkpoints and the tiny models alike)."""
    from swift_model.cli.batch_ray import model_source
    from swift_model.cli.main import build_parser

    base = ["batch", "--jobs", "j.jsonl", "--out-dir", "out", "--compile", "--memory", "24gb"]
    for extra in (["--tiny"], ["--stage1", "s1", "--stage2", "s2", "--stage1-lora", "l.safetensors"]):
        source = model_source(build_parser().parse_args(base + extra), [])
        assert source.kwargs["compile"] is True and source.kwargs["memory"].profile == "24gb", source
        assert source.tiny == (extra == ["--tiny"])
    assert source.kwargs["stage1_lora"] == "l.safetensors" and source.kwargs["load_text_encoder"] is False
