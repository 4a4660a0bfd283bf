"""Image input and mp4 output.

Images are read with Pillow. Videos are written with imageio's ffmpeg plugin into a temporary file in the
target folder and renamed into place only when complete, so a failed or interrupted run never leaves a
half-written mp4 behind.
"""

from __future__ import annotations

import os
import secrets
from typing import Iterable

import numpy as np
import torch

# The name of a video being written starts with this (hidden); ``<prefix><16 hex digits>.mp4``.
TEMP_PREFIX = ".swift-i2v-"


def read_image(path: str):
    """The image at ``path`` as an RGB ``PIL.Image``; ``ValueError`` when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"image must be a path, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise ValueError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def image_to_tensor(image, width: int, height: int) -> torch.Tensor:
    """``image`` (PIL) resized (bicubic, after a centre crop to the target aspect) to ``[3, height, width]``
    float32 in ``[-1, 1]``."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
    w0, h0 = image.size
    # Centre crop to the target aspect so the content is not stretched.
    target = width / height
    if w0 / h0 > target:
        cw = round(h0 * target)
        box = ((w0 - cw) // 2, 0, (w0 - cw) // 2 + cw, h0)
    else:
        ch = round(w0 / target)
        box = (0, (h0 - ch) // 2, w0, (h0 - ch) // 2 + ch)
    im = image.crop(box).resize((width, height), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float() / 127.5 - 1.0


def check_output_path(path: str) -> str:
    """Absolute ``path`` after checking that an mp4 can be written there (``ValueError`` otherwise)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"out must be a path, got {type(path).__name__}")
    path = os.path.abspath(os.fspath(path))
    if not path.lower().endswith(".mp4"):
        raise ValueError(f"output must be an .mp4 file, got {path}")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise ValueError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"output folder is not writable: {folder}")
    if os.path.isdir(path):
        raise ValueError(f"output path is a folder: {path}")
    return path


def _new_temp_file(folder: str) -> str:
    """Create an empty, uniquely named hidden ``.mp4`` in ``folder`` and return its path.

    Created with mode 0o666 filtered by the process umask, as ``open(path, "w")`` would make it: the video
    renamed from it is then readable as any other file the user writes (``mkstemp`` would force 0o600).
    """
    for _ in range(100):
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(8)}.mp4")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"cannot create a temporary file in {folder}")


def write_mp4(frames: Iterable, path: str, fps: int = 16, quality: int = 8) -> str:
    """Write ``frames`` (uint8 ``[H, W, 3]`` arrays/tensors, or ``[F, H, W, 3]`` chunks) to ``path`` atomically.

    Returns the absolute path. On any error the temporary file is removed and nothing appears at ``path``.
    """
    import imageio.v2 as imageio

    path = check_output_path(path)
    tmp = _new_temp_file(os.path.dirname(path))
    n = 0
    writer = None
    try:
        # macro_block_size=1: keep the exact size (sizes are multiples of 16 anyway); yuv420p for players.
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=quality,
                                    macro_block_size=1, pixelformat="yuv420p", ffmpeg_log_level="error")
        for chunk in frames:
            arr = chunk.cpu().numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk)
            if arr.dtype != np.uint8:
                raise TypeError(f"frames must be uint8, got {arr.dtype}")
            for frame in (arr if arr.ndim == 4 else arr[None]):
                writer.append_data(frame)
                n += 1
        if n == 0:
            raise ValueError("no frames to write")
        writer.close()
        writer = None
        os.replace(tmp, path)
    except BaseException:
        # Close the encoder first (it finishes writing the temporary file on close), then remove the file.
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_mp4(path: str) -> np.ndarray:
    """All frames of an mp4 as uint8 ``[F, H, W, 3]`` (for tests and checks)."""
    import imageio.v2 as imageio

    with imageio.get_reader(path, format="FFMPEG") as reader:
        return np.stack([np.asarray(f) for f in reader])


# -- reading training videos ----------------------------------------------------------------------------------


def resample_indices(count: int, source_fps: float, fps: float | None) -> list[int]:
    """The source frame of each of ``count`` output frames at ``fps``: the frame shown at the output frame's time
    (``k / fps`` seconds), i.e. source index ``floor(k * source_fps / fps + 1e-6)``. ``fps=None`` keeps every source
    frame. Only downsampling (``fps <= source_fps``): a slower source would repeat frames, which teaches a model
    frozen motion, so it is a ``ValueError``."""
    if fps is None:
        return list(range(count))
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise TypeError(f"fps must be a positive number or None, got {fps!r}")
    if not source_fps > 0:
        raise ValueError("its frame rate is unknown")
    if fps > source_fps * 1.002:  # 29.97 (30000/1001) sources pass a 29.97 or 30 fps target
        raise ValueError(f"its frame rate {source_fps:g} fps is below the output's {fps:g} fps")
    step = max(1.0, source_fps / fps)  # a rate within the tolerance above takes every frame
    return [int(k * step + 1e-6) for k in range(count)]


def read_video_frames(path, count: int, fps: float | None = None):
    """``count`` frames of the video at ``path``, resampled to ``fps`` (``None``: the source's own frames), as uint8
    ``[count, H, W, 3]`` in display orientation, and the source's frame rate: ``(frames, source_fps)``.

    Any size, aspect ratio, codec and frame rate ffmpeg decodes is read; a rotation tag (phones) is applied, so
    the frames stand as the video is shown. Frames are taken from the start. ``ValueError`` (its reason, without
    the path: the caller names the file) when the video cannot be decoded, is shorter than ``count`` frames at
    ``fps``, or runs at a lower frame rate than ``fps``.
    """
    import contextlib
    import io

    import imageio.v2 as imageio

    def unreadable(exc: BaseException) -> ValueError:
        return ValueError(f"cannot read the video: {' '.join(str(exc).split())[:200] or type(exc).__name__}")

    try:
        # imageio prints a note when a rotation tag changes the frame size: the rotation is wanted, the note is not
        with contextlib.redirect_stdout(io.StringIO()):
            reader = imageio.get_reader(os.fspath(path), format="FFMPEG")
    except Exception as exc:  # noqa: BLE001 -- whatever the decoder says, the video is unusable
        raise unreadable(exc) from None
    with reader:
        source_fps = float(reader.get_meta_data().get("fps") or 0.0)
        wanted = resample_indices(count, source_fps, fps)
        last, keep = wanted[-1], set(wanted)
        picked: dict[int, np.ndarray] = {}
        seen = 0
        try:
            for index, frame in enumerate(reader):
                seen = index + 1
                if index in keep:
                    picked[index] = np.asarray(frame)
                if index >= last:
                    break
        except Exception as exc:  # noqa: BLE001 -- a stream that breaks part-way is unusable too
            raise unreadable(exc) from None
    if len(picked) < len(keep):
        at = f" at {fps:g} fps" if fps is not None else ""
        raise ValueError(f"too short: {seen} frames, needs {last + 1} for {count} frames{at}")
    frames = [picked[i] for i in wanted]
    if frames[0].ndim != 3 or frames[0].shape[2] < 3:
        raise ValueError(f"unexpected frame shape {frames[0].shape}")
    return np.stack([f[..., :3] for f in frames]), source_fps
