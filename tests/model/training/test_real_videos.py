"""The videos people have, read for training: other frame rates (25, 29.97) resampled to the clips' rate, other
sizes and aspect ratios, rotation tags, heavy compression, and the unusable ones (too short, too slow, too small,
corrupt) skipped with a warning naming the file and why."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from swift_model.io.video import read_video_frames, resample_indices

LEVEL0, LEVEL_STEP = 20, 5  # frame i is painted with grey LEVEL0 + LEVEL_STEP * i: the codec keeps it within +-2


def _encode(path: Path, frames: np.ndarray, fps: float, *extra: str) -> Path:
    """Write ``frames`` (uint8 [F, H, W, 3]) at ``fps`` with ffmpeg (libx264); ``extra``: output options."""
    import imageio_ffmpeg

    h, w = frames.shape[1:3]
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", *extra, str(path)]
    subprocess.run(cmd, input=frames.tobytes(), check=True, timeout=60)
    return path


def _numbered(count: int, h: int = 32, w: int = 48) -> np.ndarray:
    """Frames whose grey level says their index (a dark left quarter marks the orientation)."""
    out = np.empty((count, h, w, 3), np.uint8)
    for i in range(count):
        out[i] = LEVEL0 + LEVEL_STEP * i
        out[i, :, : w // 4] = 0
    return out


def _indices(frames: np.ndarray) -> list[int]:
    w = frames.shape[2]
    grey = frames[:, :, w // 2:].reshape(len(frames), -1).astype(np.float64).mean(1)
    return [int(round((g - LEVEL0) / LEVEL_STEP)) for g in grey]


def _rotate(src: Path, dst: Path, degrees: int) -> Path:
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-display_rotation", str(degrees),
                    "-i", str(src), "-c", "copy", str(dst)], check=True, timeout=60)
    return dst


def test_resample_indices():
    assert resample_indices(5, 30.0, None) == [0, 1, 2, 3, 4]
    assert resample_indices(5, 16.0, 16) == [0, 1, 2, 3, 4]
    assert resample_indices(5, 25.0, 16) == [0, 1, 3, 4, 6]  # floor(k * 25 / 16)
    assert resample_indices(4, 32.0, 16) == [0, 2, 4, 6]
    assert resample_indices(3, 29.97, 29.97) == [0, 1, 2]
    assert resample_indices(3, 29.97, 30) == [0, 1, 2]  # within 0.1%: the same rate
    with pytest.raises(ValueError, match="frame rate 12 fps is below the output's 16 fps"):
        resample_indices(5, 12.0, 16)
    with pytest.raises(ValueError, match="frame rate is unknown"):
        resample_indices(5, 0.0, 16)
    with pytest.raises(TypeError, match="fps must be a positive number"):
        resample_indices(5, 25.0, 0)


@pytest.mark.parametrize("source_fps", [25, 30000 / 1001])
def test_frame_rates_are_resampled(tmp_path, source_fps):
    path = _encode(tmp_path / "v.mp4", _numbered(40), source_fps)
    frames, fps = read_video_frames(path, 9, 16)
    assert fps == pytest.approx(source_fps, rel=1e-3)
    assert frames.shape == (9, 32, 48, 3) and frames.dtype == np.uint8
    assert _indices(frames) == resample_indices(9, fps, 16)
    every, _ = read_video_frames(path, 9, None)  # no resampling: the first 9 frames
    assert _indices(every) == list(range(9))


def test_rotation_tag_is_applied(tmp_path):
    src = _encode(tmp_path / "src.mp4", _numbered(12), 16)
    rotated, _ = read_video_frames(_rotate(src, tmp_path / "rot.mp4", 90), 5, 16)
    plain, _ = read_video_frames(src, 5, 16)
    assert rotated.shape == (5, 48, 32, 3)  # portrait, as a phone shows it
    # the dark quarter, on the left of the stored picture, is now a horizontal band (top or bottom)
    dark_rows = rotated[0].mean(axis=(1, 2)) < LEVEL0 / 2
    assert dark_rows.sum() == 12 and (dark_rows[:12].all() or dark_rows[-12:].all())
    assert any(np.abs(np.rot90(plain[0], k).astype(int) - rotated[0]).max() <= 6 for k in (1, 3))


def test_heavy_compression_is_read(tmp_path):
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (9, 30, 46, 3), dtype=np.uint8)  # noise at the worst quality: blocks of mush
    frames, _ = read_video_frames(_encode(tmp_path / "crushed.mp4", noisy, 16, "-crf", "51"), 9, 16)
    assert frames.shape == (9, 30, 46, 3) and frames.dtype == np.uint8
    assert 40 < frames.mean() < 215 and frames.std() > 1  # decoded pictures, not a blank or a failed read


def test_unusable_videos_say_why(tmp_path):
    short = _encode(tmp_path / "short.mp4", _numbered(6), 25)
    with pytest.raises(ValueError, match=r"too short: 6 frames, needs 13 for 9 frames at 16 fps"):
        read_video_frames(short, 9, 16)
    slow = _encode(tmp_path / "slow.mp4", _numbered(20), 12)
    with pytest.raises(ValueError, match="frame rate 12 fps is below"):
        read_video_frames(slow, 9, 16)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="cannot read the video"):
        read_video_frames(corrupt, 9, 16)


def test_prepare_reads_real_videos(tmp_path, capsys):
    """``prepare`` at 16 fps over a folder of the kinds users have: the usable ones become clips, each other one
    is skipped with one warning naming it and the reason in the manifest."""
    from swift_model.training.prepare import PrepareSettings, load_prepare_models, prepare

    rng = np.random.default_rng(1)
    videos = tmp_path / "videos"
    videos.mkdir()

    def clip(count, h, w):
        return (rng.integers(60, 200, (1, 1, 1, 3)) + np.zeros((count, h, w, 3))).astype(np.uint8)

    _encode(videos / "pal.mp4", clip(24, 72, 96), 25)  # 25 fps, 4:3
    _rotate(_encode(tmp_path / "phone.mp4", clip(24, 64, 112), 30000 / 1001), videos / "phone.mp4", 90)
    _encode(videos / "small.mp4", clip(24, 48, 48), 16)  # smaller than 64x64
    _encode(videos / "slow.mp4", clip(24, 80, 80), 12)
    _encode(videos / "short.mp4", clip(6, 80, 80), 16)
    models = load_prepare_models(tiny=True, need_text_encoder=False, device="cpu")
    embeds = tmp_path / "embeds.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"prompt_embeds": torch.randn(1, 4, models.stage1.config.text_dim)}, str(embeds))
    result = prepare(videos, tmp_path / "data", models, PrepareSettings(frames=9, width=64, height=64),
                     prompt_embeds=embeds, progress=False)
    assert sorted(c["video"] for c in result["clips"]) == ["pal.mp4", "phone.mp4"]
    reasons = {s["video"]: s["reason"] for s in result["skipped"]}
    assert set(reasons) == {"small.mp4", "slow.mp4", "short.mp4"}
    assert "48x48 is smaller than the output 64x64" in reasons["small.mp4"]
    assert "frame rate 12 fps is below the output's 16 fps" in reasons["slow.mp4"]
    assert "too short" in reasons["short.mp4"]
    err = capsys.readouterr().err
    for name in reasons:
        assert f"warning: skipped {name}: {reasons[name]}" in err
