"""Reading checkpoint files: the one place ``swift_model`` opens safetensors, ``.pth``, ``*.index.json`` and
``config.json`` files (second layer: imports only the key naming).

Every error names the file, a caller-given label (``stage``: ``"stage1"``/``"stage2"`` in the pipeline, a
neutral ``"checkpoint"`` otherwise) and, where there is one, the key or field:
:class:`CheckpointError` (a ``ValueError``) and :class:`CheckpointNotFoundError` (also a
``FileNotFoundError``).

- :func:`read_json`: a JSON object (``config.json``, an index), with non-UTF-8 bytes and bad JSON reported;
- :func:`weight_files`: the weight files of a folder (the shards an index names, all of them present);
- :class:`TensorFiles`: the tensors of one or more files, opened lazily: names, shapes and dtypes come from
  the headers (safetensors) or a meta-device unpickling (``.pth``) without reading any data, and each tensor
  is read on its own when asked for, straight onto the target device (safetensors memory-maps the file), or
  given as a view of the file's mapped pages (:meth:`TensorFiles.mapped`: no copy, no resident memory of ours);
- :func:`read_tensors`: a whole small file as a dict (LoRAs, encoders, the VAE, prompt embeddings).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from .keys import format_keys

DEFAULT_STAGE = "checkpoint"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

# safetensors' dtype names (the header's "dtype" strings) -> torch dtypes; a name not here is refused.
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used. ``stage``, ``file`` and ``key`` (or ``None``) say where."""

    def __init__(self, problem: str, *, file, stage: str | None = None, key: str | None = None) -> None:
        self.stage = stage or DEFAULT_STAGE
        self.file = os.fspath(file)
        self.key = key
        self.problem = problem
        where = f"{self.stage}: {self.file}" + (f": {key}" if key else "")
        super().__init__(f"{where}: {problem}")

    def __str__(self) -> str:  # OSError's __str__ would otherwise win for the FileNotFoundError subclass
        return self.args[0]


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path or a file it names does not exist."""


def read_json(path, *, stage: str | None = None) -> dict:
    """The JSON object in ``path``; :class:`CheckpointError` naming the file for unreadable bytes, non-UTF-8
    text, invalid JSON or a value that is not an object."""
    path = Path(os.fspath(path))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointNotFoundError("file not found", file=path, stage=stage) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read: {exc.strerror or exc}", file=path, stage=stage) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); a JSON file "
                              "was expected", file=path, stage=stage) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
                              file=path, stage=stage) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"holds a JSON {type(data).__name__}, not an object", file=path, stage=stage)
    return data


def _index_map(index: Path, stage: str | None) -> dict[str, str]:
    wm = read_json(index, stage=stage).get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError("has no 'weight_map' object (tensor name -> shard file)", file=index, stage=stage,
                              key="weight_map")
    bad = [k for k, v in wm.items() if not isinstance(v, str) or not v or os.path.basename(v) != v]
    if bad:
        raise CheckpointError(f"'weight_map' values must be shard file names in the same folder: {format_keys(bad)}",
                              file=index, stage=stage, key="weight_map")
    return wm


def weight_files(folder, *, stage: str | None = None) -> tuple[list[Path], dict[str, str] | None, Path | None]:
    """The weight files of a checkpoint folder: ``(files, index weight map or None, index path or None)``.

    A ``*.safetensors.index.json`` decides (every shard it names must exist); else every ``*.safetensors``;
    else every ``*.pth``/``*.pt``/``*.bin``.
    """
    folder = Path(os.fspath(folder))
    idx = sorted(folder.glob("*.safetensors.index.json"))
    if idx:
        wm = _index_map(idx[0], stage)
        files = sorted({folder / v for v in wm.values()})
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise CheckpointNotFoundError(f"names shards that are not in {folder}: {format_keys(missing)}",
                                          file=idx[0], stage=stage)
        return files, wm, idx[0]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(p for ext in ("*.pth", "*.pt", "*.bin") for p in folder.glob(ext))
    if not files:
        raise CheckpointNotFoundError("no weight files (*.safetensors, *.pth, *.pt, *.bin) in this folder",
                                      file=folder, stage=stage)
    return files, None, None


def _st_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return str(device)


def _torch_load(path: Path, stage: str | None, *, meta: bool) -> dict:
    """A ``.pth``/``.pt``/``.bin`` file as a flat dict of tensors (weights only, never arbitrary objects)."""
    try:
        if meta:
            # unpickles the structure only: storages land on the meta device, no tensor data is read
            sd = torch.load(str(path), map_location="meta", weights_only=True)
        else:
            try:  # memory-map (an 11 GB UMT5 file is not read twice); old non-zip files cannot be mapped
                sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"cannot read as a torch checkpoint: {' '.join(str(exc).split())[:300]}",
                              file=path, stage=stage) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"holds a {type(sd).__name__}, not a dict of tensors", file=path, stage=stage)
    not_tensors = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if not_tensors:
        raise CheckpointError(f"entries that are not tensors: {format_keys(not_tensors)}", file=path, stage=stage)
    return sd


class _MappedSafetensors:
    """One safetensors file mapped into memory read-only-by-use: :meth:`view` gives a tensor over a stored
    tensor's bytes, no copy (the pages are the file's, read by the OS when touched and dropped by it under
    memory pressure: page cache, not memory of ours)."""

    def __init__(self, path: Path, stage: str | None) -> None:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 < n < (1 << 30) else None
            size = os.fstat(f.fileno()).st_size
            if not isinstance(header, dict) or size < 8 + n:
                raise CheckpointError("cannot map as a safetensors file (bad header)", file=path, stage=stage)
            # a private (copy-on-write) mapping: pages are shared with the page cache until written, which we
            # never do; writable, so torch.frombuffer takes it without a warning
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self.path, self.stage, self._base, self._header = path, stage, 8 + n, header

    def view(self, key: str) -> torch.Tensor:
        entry = self._header[key]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"dtype {entry['dtype']} cannot be read", file=self.path, stage=self.stage, key=key)
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        count = (end - start) // dtype.itemsize
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable buffer": the map is writable, this is belt and braces
            flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._base + start)
        return flat.view(shape)


class TensorFiles:
    """The tensors of one checkpoint spread over one or more files, read lazily.

    Args:
        files: the weight files (``.safetensors`` or torch checkpoints).
        stage: the label every error carries.
        device: where :meth:`get` puts tensors (safetensors reads them straight there).
        meta: open for names, shapes and dtypes only (torch checkpoints are unpickled onto the meta device,
            so no data is read; :meth:`get` then returns meta tensors).

    Raises :class:`CheckpointError` for a file that is not what its suffix says (a truncated or garbage
    safetensors file, a pickle that is not a dict of tensors) or a tensor name found in two files.
    """

    def __init__(self, files, *, stage: str | None = None, device=None, meta: bool = False) -> None:
        self.files = [Path(os.fspath(f)) for f in files]
        self.stage = stage
        self.device = torch.device(device or "cpu")
        self.meta = meta
        self._where: dict[str, Path] = {}
        self._st: dict[Path, Any] = {}
        self._pt: dict[Path, dict] = {}
        self._maps: dict[Path, _MappedSafetensors] = {}
        for f in self.files:
            if not f.is_file():
                raise CheckpointNotFoundError("file not found", file=f, stage=stage)
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    # parses the header and memory-maps the data; a truncated file fails here
                    h = safe_open(str(f), framework="pt", device="cpu" if meta else _st_device(self.device))
                except Exception as exc:  # noqa: BLE001 - any parse failure is a bad checkpoint
                    raise CheckpointError(f"cannot read as a safetensors file ({' '.join(str(exc).split())})",
                                          file=f, stage=stage) from None
                self._st[f] = h
                keys = list(h.keys())
            elif f.suffix in WEIGHT_SUFFIXES:
                self._pt[f] = _torch_load(f, stage, meta=meta)
                keys = list(self._pt[f])
            else:
                raise CheckpointError(f"unknown weight file type {f.suffix!r} (expected one of "
                                      f"{', '.join(WEIGHT_SUFFIXES)})", file=f, stage=stage)
            for k in keys:
                if k in self._where:
                    raise CheckpointError(f"tensor also stored in {self._where[k].name}", file=f, stage=stage, key=k)
                self._where[k] = f

    def keys(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> Path:
        """The file that stores ``key``."""
        return self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of ``key`` (from the header; no data read)."""
        f = self._where[key]
        if f in self._st:
            return tuple(self._st[f].get_slice(key).get_shape())
        return tuple(self._pt[f][key].shape)

    def dtype(self, key: str) -> torch.dtype | str:
        """The torch dtype of ``key``, or the file's own dtype name when torch has none for it."""
        f = self._where[key]
        if f in self._st:
            name = self._st[f].get_slice(key).get_dtype()
            return _ST_DTYPES.get(name, name)
        return self._pt[f][key].dtype

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` on the device (a meta tensor when opened with ``meta=True``)."""
        f = self._where[key]
        if f in self._st:
            if self.meta:
                dt = self.dtype(key)
                return torch.empty(self.shape(key), dtype=dt if isinstance(dt, torch.dtype) else torch.uint8,
                                   device="meta")
            try:
                return self._st[f].get_tensor(key)
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"cannot read the tensor ({exc})", file=f, stage=self.stage, key=key) from None
        t = self._pt[f][key]
        return t if self.meta else t.to(self.device)

    def mapped(self, key: str) -> torch.Tensor:
        """``key`` as stored (its dtype, on the CPU), as a view of the file's memory-mapped pages: nothing is
        copied, and the pages are the operating system's to keep or drop (what a copy or cast of the view reads
        is read from disk when not cached). A ``.pth`` file is mapped by ``torch.load(mmap=True)``; an old
        non-zip one, which cannot be mapped, was read whole when opened."""
        f = self._where[key]
        if self.meta:
            raise RuntimeError("TensorFiles.mapped() needs files opened with meta=False")
        if f in self._st:
            if f not in self._maps:
                self._maps[f] = _MappedSafetensors(f, self.stage)
            return self._maps[f].view(key)
        return self._pt[f][key]

    def nbytes(self, key: str) -> int:
        """Bytes of ``key``'s data as stored."""
        dt = self.dtype(key)
        size = dt.itemsize if isinstance(dt, torch.dtype) else 1
        n = 1
        for s in self.shape(key):
            n *= s
        return n * size


def read_tensors(path, *, stage: str | None = None, device=None) -> dict[str, torch.Tensor]:
    """Every tensor of one file (``.safetensors`` or a torch checkpoint) as a dict, on ``device`` (CPU)."""
    path = Path(os.fspath(path))
    if not path.is_file():
        raise CheckpointNotFoundError("file not found", file=path, stage=stage)
    src = TensorFiles([path], stage=stage, device=device)
    return {k: src.get(k) for k in src.keys()}
