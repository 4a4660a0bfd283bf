"""Applying a memory plan: moving whole modules between the CPU and the device phase by phase
(:class:`Residency`), and streaming a DiT's transformer blocks from host memory (:class:`BlockStreamer`).

The real run and the planner (:mod:`swift_model.planning.planner`, which runs the same phases on fake tensors)
both go through :class:`Residency`, so the estimate and the run cannot disagree about what is resident. Moves
work on fake tensors too (the planner's): :func:`set_tensor_data` and :func:`tensor_device` know their
``fake_device``.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..nets.placeholders import assign_weights, drop_weights, is_placeholder
from .memory import PHASES, MemoryPlan



def named_tensors(module: nn.Module, skip: str | None = None):
    """``(name inside module, owner, attribute, tensor)`` of every parameter and buffer of ``module`` (outside
    ``skip.*``)."""
    for mod_name, mod in module.named_modules():
        if skip is not None and (mod_name == skip or mod_name.startswith(skip + ".")):
            continue
        for attr, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            yield (f"{mod_name}.{attr}" if mod_name else attr), mod, attr, t


def module_tensors(module: nn.Module, skip: str | None = None):
    """``(owner, attribute, tensor)`` of every parameter and buffer of ``module`` (outside ``skip.*``)."""
    for _name, mod, attr, t in named_tensors(module, skip):
        yield mod, attr, t


def set_tensor_data(t: torch.Tensor, new: torch.Tensor) -> None:
    """``t.data = new``, also for the planner's fake tensors (which keep their device in a field of their own)."""
    t.data = new
    if hasattr(t, "fake_device"):
        t.fake_device = new.device


def tensor_device(t: torch.Tensor) -> torch.device:
    # a fake tensor's device without a dispatch (the planner moves thousands of them)
    return getattr(t, "fake_device", None) or t.device


@torch.no_grad()
def move_module(module: nn.Module, device: torch.device, skip: str | None = None) -> int:
    """Move ``module``'s parameters and buffers (outside ``skip``) to ``device`` in place (``.data``, so the
    Parameter objects, and any hooks on the module, stay); returns the bytes copied to a non-CPU device. Weights
    not in memory (:func:`~swift_model.nets.placeholders.placeholder` s: blocks read from their files on use,
    encoders read on use) stay as they are."""
    moved = 0
    for _mod, _attr, t in module_tensors(module, skip):
        src = tensor_device(t)
        if src != device and not is_placeholder(t):
            if device.type != "cpu":
                moved += t.numel() * t.element_size()
            if hasattr(t, "fake_device"):  # a fake tensor (the planner) has no data to copy: one allocation
                new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            else:
                new = t.to(device, non_blocking=src.type == "cpu" and device.type == "cuda")
            set_tensor_data(t, new)
    return moved


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:N`` (the current device; 0 without a driver, as fake tensors say), so that comparing it
    with a tensor's device tells whether the tensor is there."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def _align(n: int, a: int = 256) -> int:
    return (n + a - 1) // a * a


def _unregister(ptr: int) -> None:
    with contextlib.suppress(Exception):  # the process may be shutting down
        torch.cuda.cudart().cudaHostUnregister(ptr)


def host_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """A host byte buffer of exactly ``nbytes`` (at least 1), page-locked when ``pinned`` (so that copies from it
    to a GPU are asynchronous).

    Page-locking registers an ordinary allocation with the driver (``cudaHostRegister``) instead of allocating
    through PyTorch's pinned-memory allocator, which rounds every request up to a power of two (a 770 MiB block
    of a 14B DiT would take 1 GiB); the registration ends when the buffer's storage is freed. Where the driver
    refuses, the buffer stays pageable (copies from it are then synchronous) and a warning says so.
    """
    buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
    if not pinned:
        return buf
    storage = buf.untyped_storage()
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(storage.data_ptr(), storage.nbytes(), 0)
    if err != cudart.cudaError.success:
        warnings.warn(f"could not page-lock a {nbytes / 2**20:.0f} MiB host buffer ({err}); its copies to the GPU "
                      "will be synchronous", RuntimeWarning, stacklevel=2)
        return buf
    # unregistered when the storage goes (a weakref callback runs before its memory is released)
    weakref.finalize(storage, _unregister, storage.data_ptr())
    return buf


class BlockStreamer:
    """Streams the weights of a sequence of modules (a DiT's transformer blocks) to the device block by block.

    Where the block weights come from:

    - by default every block's parameters and buffers are packed into one host buffer of its exact size
      (page-locked when CUDA is present, so the copy is asynchronous: :func:`host_buffer`) and the block's
      tensors become views of it;
    - with a ``source`` (a DiT loaded with ``blocks_from_files``: its ``block_source``), the blocks are never in
      host memory: their tensors are placeholders between uses (:mod:`swift_model.nets.placeholders`), and each
      load reads the block from the
      weight files' mapped pages (``source.read``) into one of ``slots`` staging buffers of the block's exact
      size (page-locked), copies it to the device and lets the source finish it there (``source.finish``: a
      LoRA merged on the device). A staging buffer is refilled only once its previous copy has completed.

    ``slots`` device buffers, each the size of the largest block, hold the blocks being used: before block ``i``
    runs (its ``forward``, or ``context_kv`` for a DiT's cross-attention cache) its weights are copied into a
    slot and its tensors point there, and block ``i + 1``'s copy is started on a side CUDA stream so it overlaps
    block ``i``'s compute (the side stream first waits for the work queued so far, so it never overwrites a slot
    still being read; the compute stream waits for the copy's event before using a block). A block evicted from
    its slot points back at its host buffer (or at its placeholders). On a CPU (or with fake tensors) the same
    code runs with synchronous copies.

    At most ``slots`` blocks have their weights on the device at any time (:attr:`max_resident` records it),
    and every block use that misses the slots costs one copy (:attr:`h2d_bytes` counts the bytes;
    :attr:`mapped_bytes` the bytes a source read from its files).

    Args:
        blocks: the modules to stream (e.g. ``dit.blocks``); each must keep its weights in its own tensors.
        device: the compute device.
        slots: device buffers (>= 1; 2 overlaps one copy with one block's compute).
        methods: methods besides ``forward`` that read a block's weights (patched on each block instance).
        source: where the blocks' weights are read from on each load (see above); ``None``: packed host buffers.
    """

    def __init__(self, blocks: Sequence[nn.Module], device, slots: int = 2,
                 methods: Iterable[str] = ("context_kv",), source=None) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.blocks = list(blocks)
        self.device = _indexed(torch.device(device))
        self.num_slots = slots
        self.source = source
        if source is not None and source.num_blocks != len(self.blocks):
            raise ValueError(f"the block source holds {source.num_blocks} blocks, the model {len(self.blocks)}")
        # Real CUDA only: fake CUDA tensors (the planner) and CPUs take the synchronous path.
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._layouts: list[list[tuple[torch.Tensor, int]]] = []
        self._names: list[list[str]] = []
        self._host: list[torch.Tensor] = []
        self._host_views: list[list[torch.Tensor]] = []  # built once: a load or an eviction only re-points
        self._slot_views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.block_bytes: list[int] = []
        for blk in self.blocks:
            if source is not None:
                drop_weights(blk)  # at rest a block holds no memory: placeholders of its tensors' shapes
            entries, names, off = [], [], 0
            for name, _mod, _attr, t in named_tensors(blk):
                entries.append((t, off))
                names.append(name)
                off = _align(off + t.numel() * t.element_size())
            self._layouts.append(entries)
            self._names.append(names)
            self.block_bytes.append(off)
            if source is not None:
                self._host_views.append([t.data for t, _o in entries])
                continue
            host = host_buffer(off, pinned=self._cuda)
            views = []
            for t, o in entries:
                view = self._view(host, t, o)
                view.copy_(t.data)
                set_tensor_data(t, view)  # the block now lives in its host buffer
                views.append(view)
            self._host_views.append(views)
            self._host.append(host)
        size = max(self.block_bytes, default=1)
        # a source's staging buffers: one per slot, so that a block can be read while the previous one copies
        self._staging = [host_buffer(size, pinned=self._cuda) for _ in range(slots)] if source is not None else []
        self._staging_done: list[object | None] = [None] * len(self._staging)
        self._next_staging = 0
        self.mapped_bytes = 0
        self._slots: list[torch.Tensor] = []
        self._slot_block: list[int | None] = [None] * slots
        self._slot_used = [0] * slots
        self._where: dict[int, int] = {}  # block -> slot
        self._events: dict[int, object] = {}
        self._clock = 0
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self.h2d_bytes = 0
        self.max_resident = 0
        self.loads = 0
        self.active = False
        self._handles = []
        self._patched: list[tuple[nn.Module, str]] = []
        for i, blk in enumerate(self.blocks):
            self._handles.append(blk.register_forward_pre_hook(lambda _m, _a, i=i: self._enter(i)))
            for name in methods:
                if hasattr(blk, name):
                    bound = getattr(blk, name)

                    def wrapped(*args, _f=bound, _i=i, **kw):
                        self._enter(_i)
                        return _f(*args, **kw)

                    setattr(blk, name, wrapped)  # an instance attribute shadows the method
                    self._patched.append((blk, name))

    @staticmethod
    def _view(buf: torch.Tensor, like: torch.Tensor, offset: int) -> torch.Tensor:
        n = like.numel() * like.element_size()
        return buf[offset:offset + n].view(like.dtype).view(like.shape)

    @property
    def resident(self) -> int:
        """Blocks whose weights are on the device now."""
        return sum(b is not None for b in self._slot_block)

    @property
    def slot_bytes(self) -> int:
        """Device bytes of the slots (``slots`` x the largest block)."""
        return sum(s.numel() for s in self._slots)

    @property
    def host_bytes(self) -> int:
        """Host bytes this streamer holds: the packed blocks, or a source's staging buffers."""
        return sum(b.numel() for b in (*self._host, *self._staging))

    def resume(self) -> "BlockStreamer":
        """Allocate the device slots and start streaming (the hooks act only while streaming)."""
        if not self.active:
            size = max(self.block_bytes, default=1)
            self._slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(self.num_slots)]
            self._slot_used = [0] * self.num_slots
            self.active = True
        return self

    def suspend(self) -> None:
        """Stop streaming: every block points back at its host buffer (or its placeholders) and the device slots
        are freed (the host buffers and hooks stay, so :meth:`resume` starts again without repacking)."""
        if self.active:
            self.release()
            self._slots = []
            self._slot_views.clear()
            self.active = False

    def _enter(self, i: int) -> None:
        """Block ``i`` is about to run: make its weights resident, and start the copy of the next block."""
        if not self.active:
            if self.source is not None:  # its weights are placeholders: running it would compute with zeros
                raise RuntimeError("this DiT's blocks are read from its files only while it streams (inside a "
                                   "phase of a memory profile that streams it); it cannot run outside one")
            return
        self._load(i)
        if self._cuda and i in self._events:
            torch.cuda.current_stream(self.device).wait_event(self._events.pop(i))
        if self.num_slots > 1 and i + 1 < len(self.blocks):
            self._load(i + 1)

    def _staged(self, i: int) -> tuple[torch.Tensor, int]:
        """Block ``i`` read by the source into the next staging buffer (once that buffer's last copy is done):
        the buffer and its index."""
        k = self._next_staging
        self._next_staging = (k + 1) % len(self._staging)
        if self._staging_done[k] is not None:
            self._staging_done[k].synchronize()  # its previous block is still being copied out of it
            self._staging_done[k] = None
        buf = self._staging[k]
        self.source.read(i, [(n, self._view(buf, t, o)) for n, (t, o) in zip(self._names[i], self._layouts[i])])
        self.mapped_bytes += self.source.stored_bytes // max(self.source.num_blocks, 1)
        return buf, k

    def _load(self, i: int) -> None:
        self._clock += 1
        if i in self._where:
            self._slot_used[self._where[i]] = self._clock
            return
        # the least recently used slot: never the block about to run (it was touched last)
        s = min(range(self.num_slots), key=lambda k: self._slot_used[k])
        old = self._slot_block[s]
        if old is not None:
            self._point_home(old)
            del self._where[old]
            self._events.pop(old, None)
        nbytes = self.block_bytes[i]
        dst = self._slots[s][:nbytes]
        views = self._slot_views.get((i, s))
        if views is None:
            views = self._slot_views[i, s] = [self._view(self._slots[s], t, o) for t, o in self._layouts[i]]
        src, k = self._staged(i) if self.source is not None else (self._host[i], None)
        if self._cuda:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                dst.copy_(src[:nbytes], non_blocking=True)
                if self.source is not None:
                    self.source.finish(i, list(zip(self._names[i], views)))
                ev = torch.cuda.Event()
                ev.record(self._stream)
            self._events[i] = ev
            if k is not None:
                self._staging_done[k] = ev
        else:
            dst.copy_(src[:nbytes])
            if self.source is not None:
                self.source.finish(i, list(zip(self._names[i], views)))
        for (t, _o), v in zip(self._layouts[i], views):
            set_tensor_data(t, v)
        self._slot_block[s] = i
        self._slot_used[s] = self._clock
        self._where[i] = s
        self.h2d_bytes += nbytes
        self.loads += 1
        self.max_resident = max(self.max_resident, self.resident)

    def _point_home(self, i: int) -> None:
        """Block ``i``'s tensors point back at its host buffer (or at placeholders, with a source)."""
        for (t, _o), v in zip(self._layouts[i], self._host_views[i]):
            set_tensor_data(t, v)

    def release(self) -> None:
        """Point every block back at its host buffer (the slots stay allocated until :meth:`close`)."""
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        for s, i in enumerate(self._slot_block):
            if i is not None:
                self._point_home(i)
                self._slot_block[s] = None
        self._where.clear()
        self._events.clear()

    def close(self) -> None:
        """Suspend and remove the hooks and method patches. The blocks stay on the CPU (in their host
        buffers), or as placeholders (with a source)."""
        self.suspend()
        for h in self._handles:
            h.remove()
        for blk, name in self._patched:
            with contextlib.suppress(AttributeError):
                delattr(blk, name)
        self._handles.clear()
        self._patched.clear()


def _refuse_dropped(module: nn.Module, _args) -> None:
    if any(is_placeholder(t) for t in module.parameters()):
        raise RuntimeError(f"the {type(module).__name__}'s weights are read from its files only for the phases that "
                           "use it (memory profile with read_on_use); it cannot run outside them")


def _guard_dropped(module: nn.Module) -> None:
    """A forward pre-hook (once) that refuses to run ``module`` while its weights are dropped."""
    if not getattr(module, "_guards_dropped_weights", False):
        module.register_forward_pre_hook(_refuse_dropped)
        module._guards_dropped_weights = True


class Residency:
    """Applies a :class:`MemoryPlan` to a pipeline's modules, phase by phase.

    ``components`` maps component names (:data:`COMPONENTS`) to ``nn.Module`` s (or ``None`` when absent); a
    DiT to stream must have a ``blocks`` ``ModuleList``. :meth:`phase` evicts what the phase does not keep,
    then brings in what it needs, and streams the DiT of a ``"stream"`` placement for the phase's duration.

    :attr:`h2d_bytes` counts the bytes each phase copied to the device (whole modules and streamed blocks);
    :attr:`resident` lists, per phase, the components with weights on the device during it.
    :attr:`streamers` holds a :class:`BlockStreamer` per streamed component, kept across phases and runs (its
    host buffers are packed once); it streams only during the phases that stream its component. A streamed DiT
    with a ``block_source`` (loaded with ``blocks_from_files``) streams from its files.

    A component the plan :meth:`reads on use <MemoryPlan.reads_on_use>` and whose module has a
    ``weight_reader`` (an encoder loaded with ``deferred`` weights) is read onto the device by that reader when
    a phase brings it in (the bytes count in :attr:`h2d_bytes`) and dropped (placeholders:
    :mod:`swift_model.nets.placeholders`) when a phase evicts it, instead of being copied to and from host memory;
    calling it while dropped raises.
    """

    def __init__(self, plan: MemoryPlan, device) -> None:
        self.plan = plan
        self.device = _indexed(torch.device(device))
        self.h2d_bytes: dict[str, int] = {}
        self.mapped_bytes: dict[str, int] = {}  # per phase: bytes streamers read from weight files
        self.resident: dict[str, list[str]] = {}
        self.streamers: dict[str, BlockStreamer] = {}
        self.current: str | None = None
        self._moved = 0  # bytes the current phase has copied in as whole modules (phase start and switches)
        self._streamed: dict[str, tuple[int, int]] = {}  # each streamer's (h2d, mapped) bytes when the phase began
        self._turn: dict[tuple[str, ...], str | None] = {}  # turn group -> its member on the device now

    def place_initial(self, components: Mapping[str, nn.Module | None]) -> None:
        """Put every component where the plan keeps it outside any phase (all on the device under ``fast``)."""
        for name, m in components.items():
            if m is None:
                continue
            if self._reads_on_use(name, m):
                _guard_dropped(m)
            if self._reads_on_use(name, m) and self.plan.initial(name) != "device":
                drop_weights(m)  # read from its files by the first phase that uses it
            else:
                move_module(m, self.device if self.plan.initial(name) == "device" else torch.device("cpu"))

    def _reads_on_use(self, name: str, m: nn.Module) -> bool:
        return self.plan.reads_on_use(name) and getattr(m, "weight_reader", None) is not None

    def _to_host(self, name: str, m: nn.Module, runs_here: bool = False) -> None:
        """Component ``name`` off the device: dropped (read again on its next use) or copied to the CPU;
        ``runs_here``: the phase runs it on the CPU, so a dropped one is read there."""
        if not self._reads_on_use(name, m):
            move_module(m, torch.device("cpu"))
        elif not runs_here:
            drop_weights(m)
            move_module(m, torch.device("cpu"))  # what is not dropped (non-persistent buffers) leaves too
        elif any(is_placeholder(t) or tensor_device(t).type != "cpu" for t in m.parameters()):
            assign_weights(m, m.weight_reader(torch.device("cpu")))

    @contextlib.contextmanager
    def phase(self, phase: str, components: Mapping[str, nn.Module | None]):
        """Run the body as phase ``phase`` of the plan (see the class docstring); yields the phase's name."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        present = {n: m for n, m in components.items() if m is not None}
        # evict first, so the phase's own weights never meet the previous phase's on the device
        self.evict(phase, present)
        self.current, self._moved, self._streamed, self._turn = phase, 0, {}, {}
        deferred = self._deferred(phase, present)
        for name, m in present.items():
            if name in deferred:
                self._to_host(name, m)  # comes in when the phase switches to it
            else:
                self._moved += self._bring(phase, name, m)
        self._note_resident(phase, present)
        try:
            yield phase
        finally:
            moved, mapped = self._moved, 0
            for name, s in self.streamers.items():
                h2d0, mapped0 = self._streamed.get(name, (s.h2d_bytes, s.mapped_bytes))
                moved += s.h2d_bytes - h2d0
                mapped += s.mapped_bytes - mapped0
                s.suspend()
            self.h2d_bytes[phase] = self.h2d_bytes.get(phase, 0) + moved
            self.mapped_bytes[phase] = self.mapped_bytes.get(phase, 0) + mapped
            self.current = None

    def _deferred(self, phase: str, present: Mapping[str, nn.Module]) -> set[str]:
        """The components of ``phase`` that take turns (:meth:`MemoryPlan.turns`) with another one present and used
        in the phase: none of them comes in when the phase starts, each when :meth:`switch` names it."""
        deferred = set()
        for name in present:
            group = self.plan.turns(name)
            members = [n for n in group if n in present and self.plan.placement(phase, n) != "cpu"]
            if len(members) > 1:
                deferred.update(members)
                self._turn[group] = None
        return deferred

    def _bring(self, phase: str, name: str, m: nn.Module) -> int:
        """Bring component ``name`` in as ``phase`` places it (whole, or its blocks streamed); the bytes of whole
        tensors copied (a streamer counts its blocks itself)."""
        where = self.plan.placement(phase, name)
        source = getattr(m, "block_source", None)
        if source is not None and where == "device":
            raise ValueError(f"the {name} DiT was loaded with its blocks left in its files (blocks_from_files), "
                             f"which only a memory profile that streams it can run; phase {phase!r} of "
                             f"{self.plan.profile!r} places it {where!r}")
        if where == "device" and self._reads_on_use(name, m) and any(is_placeholder(t) for t in m.parameters()):
            state = m.weight_reader(self.device)
            assign_weights(m, state)
            move_module(m, self.device)  # what is not read (non-persistent buffers: position ids) comes along
            return sum(t.numel() * t.element_size() for t in {id(t): t for t in state.values()}.values())
        if where == "device":
            return move_module(m, self.device)
        if where != "stream":
            return 0
        moved = move_module(m, self.device, skip="blocks")
        s = self.streamers.get(name)
        if s is None or s.blocks != list(m.blocks):
            if s is not None:
                s.close()
            move_module(m.blocks, torch.device("cpu"))
            s = self.streamers[name] = BlockStreamer(m.blocks, self.device, self.plan.stream_blocks, source=source)
        self._streamed.setdefault(name, (s.h2d_bytes, s.mapped_bytes))
        s.resume()
        return moved

    def _note_resident(self, phase: str, present: Mapping[str, nn.Module], keep: bool = False) -> None:
        """What ``phase`` keeps on the device (whole, or a streamed DiT's resident part), as the tensors say;
        ``keep``: add to what the phase had before (a switch: each expert counts as resident in the phase)."""
        now = [n for n, m in present.items()
               if any(tensor_device(t).type == self.device.type for t in m.parameters())]
        before = self.resident.get(phase, []) if keep else []
        self.resident[phase] = before + [n for n in now if n not in before]

    def switch(self, name: str, components: Mapping[str, nn.Module | None]) -> None:
        """Inside a phase: make component ``name`` the one of its turn group (:data:`~.memory.TURNS`, e.g. the
        two experts of a two-expert Stage I) on the device. The member there before leaves first (whole to the
        CPU, or its streaming stops and frees its slots), then ``name`` comes in as the phase places it; the
        bytes copied count in the phase's :attr:`h2d_bytes`. A no-op for the member already there, and under a
        profile where nothing takes turns (``fast``: every member stays resident) or with one member present."""
        if self.current is None:
            raise RuntimeError("Residency.switch() is for use inside a phase")
        group = self.plan.turns(name)
        if group not in self._turn or self._turn[group] == name:
            return
        for other in group:
            m = components.get(other)
            if other != name and m is not None:
                if other in self.streamers:
                    self.streamers[other].suspend()
                self._to_host(other, m)
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the expert that left makes room for the one that comes
        self._moved += self._bring(self.current, name, components[name])
        self._turn[group] = name
        self._note_resident(self.current, {n: m for n, m in components.items() if m is not None}, keep=True)

    def evict(self, phase: str, components: Mapping[str, nn.Module | None]) -> None:
        """Move to the CPU every component that ``phase`` keeps there (the first step of :meth:`phase`; the
        planner calls it alone to start a phase's count after the previous phase's weights have left)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        for name, m in components.items():
            if m is not None and self.plan.placement(phase, name) == "cpu":
                self._to_host(name, m, runs_here=self.plan.runs_on_cpu(phase, name))
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Remove every streamer's hooks (the streamed blocks stay in their host buffers on the CPU)."""
        for s in self.streamers.values():
            s.close()
        self.streamers.clear()
