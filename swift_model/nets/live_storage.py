"""Counting the storages alive on one device type while a dispatch mode is active, and their peak (nets layer: the
VAE measures its passes' working sets with it on the meta device; the planner counts whole runs on fake tensors).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATOR_ROUND = 512  # the CUDA caching allocator rounds every block up to 512 bytes


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of the storages alive on one device type, and their peak.

    Every tensor an operation returns is looked at; a storage seen for the first time on ``device_type`` is
    added (its size rounded up to :data:`ALLOCATOR_ROUND`) and a ``weakref.finalize`` on it subtracts it when
    the storage is freed. Works on real and fake tensors alike. :meth:`track` adds tensors created before the
    mode was entered (weights).
    """

    def __init__(self, device_type: str = "cuda", round_to: int = ALLOCATOR_ROUND) -> None:
        super().__init__()
        self.device_type = device_type
        self.round_to = round_to
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest = 0  # the most elements of one tensor an operation returned on the device type
        self.ops = 0
        self._live: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, *tensors: torch.Tensor) -> None:
        """Count the storages of ``tensors`` (those on the tracked device type, once each)."""
        for t in tensors:
            # a fake tensor's device without a dispatch
            if (getattr(t, "fake_device", None) or t.device).type != self.device_type:
                continue
            self.largest = max(self.largest, t.numel())
            st = t.untyped_storage()
            key = id(st)
            if key in self._live:
                continue
            n = -(-st.nbytes() // self.round_to) * self.round_to
            self._live[key] = n
            self.live_bytes += n
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def bump(self, bytes_alive: int) -> None:
        """Record that ``bytes_alive`` bytes were alive at some moment (a replayed call's transient peak)."""
        self.peak_bytes = max(self.peak_bytes, bytes_alive)

    @contextlib.contextmanager
    def section(self):
        """Measure the peak of the body alone; yields a dict that gets ``peak`` when the body ends."""
        saved = self.peak_bytes
        self.peak_bytes = self.live_bytes
        result = {}
        try:
            yield result
        finally:
            result["peak"] = self.peak_bytes
            self.peak_bytes = max(saved, self.peak_bytes)
