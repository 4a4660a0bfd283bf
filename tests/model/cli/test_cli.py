"""The swift-i2v command line on the tiny random-weight models (small sizes: fast on CPU)."""

import json
import os
import stat

import numpy as np
import pytest

from swift_model.cli import main
from swift_model.io.video import read_mp4

from helpers import write_png

SMALL = ["--frames", "5", "--width", "64", "--height", "64", "--quiet"]


def test_demo_writes_mp4_and_report(tmp_path, capsys):
    out, rep = tmp_path / "demo.mp4", tmp_path / "r.json"
    old = os.umask(0o022)  # the mp4 gets a normal file's mode under the umask (not mkstemp's 0600)
    try:
        assert main(["demo", "--out", str(out), "--report", str(rep)] + SMALL) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    video = read_mp4(str(out))
    assert video.shape == (5, 64, 64, 3)
    report = json.loads(rep.read_text())
    assert report["random_weights"] is True and report["frames"] == 5
    assert {"stage1", "stage2", "bridge", "decode", "total"} <= set(report["seconds"])
    err = capsys.readouterr().err
    assert "RANDOM-WEIGHT" in err and "random" in err


def test_generate_tiny_size_and_seeds(tmp_path):
    img = write_png(tmp_path / "in.png")
    outs = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        out = tmp_path / f"{name}.mp4"
        args = ["generate", "--tiny", "--image", img, "--prompt", "a dog", "--out", str(out), "--seed", seed,
                "--frames", "9", "--width", "128", "--height", "64", "--neighbors", "1,1", "--segment-blocks", "1",
                "--quiet"]
        assert main(args) == 0
        outs.append(read_mp4(str(out)))
    assert outs[0].shape == (9, 64, 128, 3)
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("extra,needle", [
    (["--image", "MISSING"], "image not found"),
    (["--frames", "8"], "4k+1"),
    (["--width", "100"], "multiples of"),
    (["--neighbors", "x"], "neighbors"),
    (["--guidance", "-1"], "guidance"),
])
def test_bad_inputs_one_line_error(tmp_path, capsys, extra, needle):
    img = write_png(tmp_path / "in.png")
    out = tmp_path / "o.mp4"
    args = ["generate", "--tiny", "--image", img, "--prompt", "p", "--out", str(out)] + SMALL + extra
    args = [str(tmp_path / "nope.png") if a == "MISSING" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in.png"]  # no half-written or temporary mp4


def test_unreadable_image_unwritable_output_wrong_checkpoint(tmp_path, capsys):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"nope")
    assert main(["generate", "--tiny", "--image", str(junk), "--prompt", "p", "--out", str(tmp_path / "o.mp4")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    img = write_png(tmp_path / "in.png")
    assert main(["generate", "--tiny", "--image", img, "--prompt", "p", "--out", str(tmp_path / "no" / "o.mp4")]) == 2
    assert "output folder does not exist" in capsys.readouterr().err
    assert main(["generate", "--image", img, "--prompt", "p", "--out", str(tmp_path / "o.mp4"),
                 "--stage1", str(tmp_path / "ckpt1"), "--stage2", str(tmp_path / "ckpt2")]) == 2
    assert "stage1 checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_generate_guidance_flags(tmp_path):
    img = write_png(tmp_path / "in.png")
    outs = []
    for name, extra in (("a", []), ("b", ["--guidance", "1"]), ("c", ["--guidance", "4", "--negative-prompt", "blur"])):
        out = tmp_path / f"{name}.mp4"
        assert main(["generate", "--tiny", "--image", img, "--prompt", "a dog", "--out", str(out)] + SMALL + extra) == 0
        outs.append(read_mp4(str(out)))
    assert np.array_equal(outs[0], outs[1])  # guidance 1 is no guidance
    assert not np.array_equal(outs[0], outs[2])


def test_generate_shared_anchor_flag(tmp_path):
    """``--shared-anchor`` reaches Stage II (the report says so, the video differs); off by default."""
    img = write_png(tmp_path / "in.png")
    outs, reports = [], []
    for name, extra in (("a", []), ("b", ["--shared-anchor"])):
        out, rep = tmp_path / f"{name}.mp4", tmp_path / f"{name}.json"
        assert main(["generate", "--tiny", "--image", img, "--prompt", "a dog", "--out", str(out), "--report",
                     str(rep), "--stage2-kind", "swift"] + SMALL + extra) == 0
        outs.append(read_mp4(str(out)))
        reports.append(json.loads(rep.read_text()))
    assert [r["shared_anchor"] for r in reports] == [False, True]
    assert not np.array_equal(outs[0], outs[1])


def test_one_dispatch_style_every_command_names_its_function():
    """Every command's parser carries the function that runs it (``func``); ``main`` calls nothing else."""
    from swift_model.cli.main import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"generate", "demo", "batch", "plan", "prepare", "train", "export", "train-lora"}
    for name, sub in commands.items():
        func = sub.get_default("func")
        assert callable(func) and func.__module__.startswith("swift_model.cli."), name


def test_python_dash_m_runs_the_command_line(tmp_path):
    """``python -m swift_model.cli`` (what ``torchrun ... -m swift_model.cli`` starts) is the console script: its
    exit status and its one-line errors."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "swift_model.cli", "generate", "--tiny", "--image",
                        str(tmp_path / "missing.png"), "--out", str(tmp_path / "o.mp4")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.png" in lines[0], r.stderr
    assert not (tmp_path / "o.mp4").exists()
