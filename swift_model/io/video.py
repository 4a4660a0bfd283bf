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
        tmp = os.path.join(folder, f".swift-i2v-{secrets.token_hex(8)}.mp4")
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
