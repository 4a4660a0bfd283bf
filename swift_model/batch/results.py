"""What a batch leaves in its output folder: ``<id>.mp4`` per finished job and ``results.jsonl``, one record per
job run, so that a rerun resumes where the last one stopped.

Both survive a kill at any moment: a video is written to a hidden temporary file in the same folder and renamed
into place when complete (:func:`write_video_atomic`; a leftover temporary file is removed by
:func:`remove_temp_files` when the next run starts), and a record is one whole line appended by one ``os.write``
on an ``O_APPEND`` descriptor, then synced (:class:`ResultsLog`); a torn last line (a crash in the middle of the
write, a full disk) is skipped when the log is read and terminated before the next append.
"""

from __future__ import annotations

import glob
import json
import os

import torch

from ..io.video import TEMP_PREFIX, write_mp4

__all__ = ["RESULTS_FILE", "ResultsLog", "make_record", "output_path", "remove_temp_files", "write_video_atomic"]

RESULTS_FILE = "results.jsonl"
STATUSES = ("ok", "error")
RECORD_KEYS = ("id", "status", "output", "seconds", "error")


def output_path(out_dir, job_id: str) -> str:
    """The video of job ``job_id``: ``<out_dir>/<job_id>.mp4`` (absolute)."""
    return os.path.join(os.path.abspath(os.fspath(out_dir)), f"{job_id}.mp4")


def write_video_atomic(frames, path, fps: int = 16) -> str:
    """Write ``frames`` (a uint8 ``[F, H, W, 3]`` tensor or array, or an iterable of frames or such chunks) to
    the mp4 ``path``: into a temporary file in the same folder, renamed over ``path`` when complete, so that
    ``path`` is never a partial video. Returns the absolute path."""
    if isinstance(frames, torch.Tensor) or hasattr(frames, "ndim"):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [F, H, W, 3], got {tuple(frames.shape)}")
        frames = (frames,)
    return write_mp4(frames, path, fps=fps)


def remove_temp_files(out_dir) -> list[str]:
    """Remove the temporary videos a killed run left in ``out_dir`` (call it before any job of a new run starts
    writing there); returns the paths removed."""
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(os.fspath(out_dir)), f"{TEMP_PREFIX}*.mp4")):
        try:
            os.remove(tmp)
        except FileNotFoundError:  # removed by someone else meanwhile
            continue
        removed.append(tmp)
    return removed


def make_record(job, status: str, output, seconds: float, error=None) -> dict:
    """The ``results.jsonl`` record of one run of ``job`` (a :class:`~swift_model.batch.jobs.Job`): ``id``,
    ``status`` (``"ok"``/``"error"``), ``output`` (the mp4, ``None`` on error), ``seconds`` and ``error`` (a
    one-line message, ``None`` when ok)."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    if (status == "error") != (error is not None):
        raise ValueError("an error record needs an error message, an ok record none")
    if error is not None:
        error = " ".join(str(error).split()) or "error"
    return {"id": job.id, "status": status, "output": None if output is None else os.fspath(output),
            "seconds": round(float(seconds), 3), "error": error}


class ResultsLog:
    """``<out_dir>/results.jsonl``: the records of every job run into ``out_dir``, oldest first (a job run twice
    has two records; its last one counts). One writer at a time (rank 0 of a batch)."""

    def __init__(self, out_dir) -> None:
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.path = os.path.join(self.out_dir, RESULTS_FILE)

    def records(self) -> list[dict]:
        """Every whole record in the file (none when there is no file); a line that is not a complete JSON
        object (a torn last line) is skipped."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        out = []
        for raw in data.split(b"\n"):
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue  # a torn line (the empty text after the last newline lands here too)
            if isinstance(rec, dict) and isinstance(rec.get("id"), str) and rec.get("status") in STATUSES:
                out.append(rec)
        return out

    def last(self) -> dict[str, dict]:
        """Each job id's last record."""
        return {rec["id"]: rec for rec in self.records()}

    def finished(self) -> set[str]:
        """The ids whose last record is ok and whose video is in ``out_dir``: the jobs a rerun skips."""
        return {i for i, rec in self.last().items()
                if rec["status"] == "ok" and os.path.isfile(output_path(self.out_dir, i))}

    def append(self, record: dict) -> None:
        """Append ``record`` as one line: one ``os.write`` on an ``O_APPEND`` descriptor, then ``fsync``, so a
        reader sees the whole line or none of it (a kill cannot leave half of it followed by the next record)."""
        missing = [k for k in ("id", "status") if k not in record]
        if missing:
            raise ValueError(f"a record needs {missing}")
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # read: the last byte
        try:
            if _ends_torn(fd):
                data = b"\n" + data  # end the torn line first, or this record would be glued to it
            view = memoryview(data)
            while view:  # a regular file takes it in one write; a short write is finished, never dropped
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def _ends_torn(fd: int) -> bool:
    """Whether the file of ``fd`` is non-empty and does not end with a newline."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"
