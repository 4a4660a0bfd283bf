"""``swift-i2v prepare`` -> ``train`` -> ``export`` -> ``generate`` on tiny checkpoint folders the test writes, and
the commands' answers to bad input (one ``error:`` line, exit status 2, no traceback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import fake_prepared_data, tiny_checkpoints, write_videos
from swift_model import WanDiT
from swift_model.cli import main
from swift_model.training.export import load_trained
from swift_model.io.video import read_mp4

SIZE = ["--frames", "9", "--width", "64", "--height", "64"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    s1, s2, emb = tiny_checkpoints(root)
    write_videos(root / "videos", range(3), frames=9, size=64)
    (root / "videos" / "broken.mp4").write_bytes(b"junk")
    return root, s1, s2, emb


def _error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and needle in err[-1], err[-3:]
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_prepare_train_export_generate(folders, tmp_path, capsys):
    root, s1, s2, emb = folders
    data, run, exported, out = tmp_path / "data", tmp_path / "run", tmp_path / "exported", tmp_path / "out.mp4"
    prepare = ["prepare", "--videos", str(root / "videos"), "--prompt-embeds", str(emb), "--out", str(data),
               "--stage1", str(s1), "--stage2", str(s2)] + SIZE + ["--quiet"]
    assert main(prepare) == 0
    captured = capsys.readouterr()
    assert "prepared 3 clips" in captured.out and "1 skipped" in captured.out
    assert captured.err.count("warning: skipped broken.mp4: cannot read the video") == 1
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["latent"] == {"channels": 48, "frames": 3, "height": 4, "width": 4}
    assert manifest["skipped"][0]["video"] == "broken.mp4" and manifest["settings"]["transition_sigma"] == 0.5
    shards = sorted((data / "clips").glob("*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    assert main(prepare) == 0  # the rerun finds every clip done
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    from safetensors.torch import load_file

    clip = load_file(str(shards[0]))
    assert torch.equal(clip["z"][:, 0], clip["z_ref"][:, 0])  # frame 0 := the full-size first frame
    assert not torch.equal(clip["z"][:, 1:], clip["z_ref"][:, 1:])
    assert main(prepare[:-1] + ["--transition-sigma", "0.7", "--quiet"]) == 2
    _error(capsys, "other settings (transition_sigma 0.5 -> 0.7)")

    (tmp_path / "train.toml").write_text("steps = 100\nlr = 1e-3\nwindows_per_clip = 1\nsegment_blocks = 1\nema = true\n"
                                         "log_every = 2\ncheckpoint_every = 2\n")
    train = ["train", "--data", str(data), "--out", str(run), "--init", str(s2), "--config", str(tmp_path / "train.toml"),
             "--steps", "4", "--batch-size", "2", "--seed", "1", "--quiet"]
    assert main(train) == 0
    assert "trained to step 4" in capsys.readouterr().out
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["steps"] == 4 and record["config"]["lr"] == 1e-3 and record["config"]["ema"]
    assert record["model"]["in_channels"] == 96 and record["data_settings"]["stage2_vae"] == str(s2)
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in log] == [2, 4] and all(np.isfinite(r["loss"]) for r in log)

    assert main(["export", "--run", str(run), "--out", str(exported)]) == 0
    assert "exported step 4 (ema weights)" in capsys.readouterr().out
    trained, info = load_trained(run)
    loaded = WanDiT.from_pretrained(exported, device="cpu")
    assert info["weights"] == "ema" and loaded.config.in_channels == 96
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
    assert (exported / "vae" / "config.json").is_file()
    assert main(["export", "--run", str(run), "--out", str(exported)]) == 2
    _error(capsys, "exists already")

    from PIL import Image

    Image.fromarray(read_mp4(str(root / "videos" / "clip000.mp4"))[0]).save(tmp_path / "first.png")
    assert main(["generate", "--image", str(tmp_path / "first.png"), "--prompt-embeds", str(emb), "--stage1", str(s1),
                 "--stage2", str(exported), "--stage2-kind", "swift", "--out", str(out), "--quiet"] + SIZE) == 0
    assert read_mp4(str(out)).shape == (9, 64, 64, 3)


def _bad_train(tmp_path, folders):
    root, s1, s2, emb = folders
    data = fake_prepared_data(tmp_path / "data", clips=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = json.loads((data / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "clips": [], "skipped": [{"video": "a.mp4",
                                                                                          "reason": "too short"}]}))
    (tmp_path / "bad.toml").write_text('tiny = true\nlr = "fast"\n')
    run = str(tmp_path / "run")
    return [
        (["train", "--data", str(tmp_path / "missing"), "--out", run, "--tiny"], "data folder not found"),
        (["train", "--data", str(empty), "--out", run, "--tiny"], "lists no clips (1 skipped: a.mp4: too short"),
        (["train", "--data", str(data), "--out", run, "--config", str(tmp_path / "bad.toml")],
         "field 'lr' must be a number, got 'fast'"),
        (["train", "--data", str(data), "--out", run, "--init", str(s1)],
         "is not a Stage II checkpoint for 48-channel latents: in/out channels 36/16"),
        (["train", "--data", str(data), "--out", run, "--init", str(tmp_path / "nowhere")], "nowhere"),
        (["train", "--data", str(data), "--out", run], "needs --init"),
        (["train", "--data", str(data), "--out", run, "--tiny", "--ulysses", "2"], "needs 2 processes"),
        (["export", "--run", str(tmp_path / "norun"), "--out", str(tmp_path / "e")], "run folder not found"),
        (["export", "--run", str(data), "--out", str(tmp_path / "e")], "not a swift-i2v training run"),
        (["prepare", "--videos", str(tmp_path / "novideos"), "--out", str(tmp_path / "d"), "--tiny",
          "--prompt-embeds", str(emb)], "videos folder not found"),
        (["prepare", "--videos", str(root / "videos"), "--out", str(tmp_path / "d"), "--tiny"],
         "needs --captions"),
        (["prepare", "--videos", str(root / "videos"), "--out", str(tmp_path / "d"), "--tiny", "--frames", "8",
          "--prompt-embeds", str(emb)], "4k+1"),
    ]


def test_bad_input_one_line_error(folders, tmp_path, capsys):
    for argv, needle in _bad_train(tmp_path, folders):
        assert main(argv) == 2, argv
        _error(capsys, needle)
    assert not (tmp_path / "e").exists() and not (tmp_path / "d" / "manifest.json").exists()
