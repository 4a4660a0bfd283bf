"""One rank fails, every rank ends: the failure of any rank, whatever it is (out of memory included), ends every
rank within seconds, with one ``error:`` line naming the failing rank, and never leaves a peer waiting in a
collective until its timeout.

A collective cannot carry the news: the failing rank is by definition not in the collective its peers wait in.
So the news goes through the process group's key-value store (torchrun's, or the ``init_method``'s), which every
rank can read while its main thread is blocked:

- :func:`watch_peers` (a context manager around a multi-rank command, entered after the process group exists)
  starts a daemon thread that polls the store's failure key every ``poll_s`` seconds. When a peer has written it,
  the thread ends this process at once (``os._exit``: the main thread may be stuck in NCCL or gloo, where no
  Python exception can reach it) with :data:`PEER_FAILED_EXIT`, printing nothing: the failing rank prints.
- An exception leaving the block on this rank (unless every rank raised it together, as an
  :class:`~swift_model.generation.distributed.AgreedError` says with ``agreed_by_all_ranks``: the command line
  prints that once) is written to the key with a
  compare-and-set, so the first failing rank's message wins; :func:`failure_of` then tells the command line
  whether this rank's error is that first failure (print it, naming the rank) or a consequence of a peer's (a
  broken collective: stay silent).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading

import torch.distributed as dist

PEER_FAILED_EXIT = 1  # the exit status of a rank ended because a peer failed
_KEY = "swift-i2v/failed/{}"
_watches = itertools.count()  # the same sequence on every rank: one key per watched block of a command


def one_line(exc: BaseException) -> str:
    """An exception as one line: a bad input's message as is (it names the argument or the file), any other
    failure with its kind first (``OutOfMemoryError: ...``, ``RuntimeError: ...``)."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if isinstance(exc, (ValueError, TypeError, OSError)) else f"{type(exc).__name__}: {text}"


def failure_of(exc: BaseException) -> tuple[int, bool] | None:
    """``(failing rank, whether it is this rank's own first failure)`` for an exception that left a
    :func:`watch_peers` block, or ``None`` when it left no block (one process, or raised before the group)."""
    return getattr(exc, "_swift_rank_failure", None)


def _store():
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


@contextlib.contextmanager
def watch_peers(poll_s: float = 0.5):
    """Watch the other ranks of the initialised process group for the block's duration (see the module
    docstring). Without a group, or with one rank, it does nothing."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    key, rank, store = _KEY.format(next(_watches)), dist.get_rank(), _store()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll_s):
            try:
                if not store.check([key]):
                    continue
                failed_rank = int(store.get(key).decode().split("\t", 1)[0])
            except Exception:  # noqa: BLE001 -- the store is gone: the job is ending anyway
                return
            if failed_rank != rank and not stop.is_set():
                with contextlib.suppress(Exception):
                    store.add(key + "/seen", 1)  # the failing rank may host the store: it waits for this
                sys.stderr.flush()
                os._exit(PEER_FAILED_EXIT)
            return

    thread = threading.Thread(target=watch, name="swift-i2v-peer-watch", daemon=True)
    thread.start()
    try:
        yield
    except BaseException as exc:
        stop.set()
        if not getattr(exc, "agreed_by_all_ranks", False):
            found = exc._swift_rank_failure = _publish(store, key, rank, exc)
            if found[1]:
                _wait_seen(store, key, dist.get_world_size() - 1, timeout_s=max(5.0, 10 * poll_s))
        raise
    finally:
        stop.set()


def _publish(store, key: str, rank: int, exc: BaseException) -> tuple[int, bool]:
    """Write this rank's failure unless a peer's is there already; ``(failing rank, this rank's first)``."""
    mine = f"{rank}\t{one_line(exc)}"
    try:
        value = store.compare_set(key, "", mine).decode()
    except Exception:  # noqa: BLE001 -- no store to tell: this rank reports its own failure
        return rank, True
    failed_rank = int(value.split("\t", 1)[0])
    return failed_rank, failed_rank == rank


def _wait_seen(store, key: str, peers: int, timeout_s: float) -> None:
    """Wait (at most ``timeout_s``) until ``peers`` ranks have seen this rank's failure: when this rank hosts the
    store (``env://`` without torchrun's agent), leaving at once would take the news away before they read it."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if store.add(key + "/seen", 0) >= peers:
                return
        except Exception:  # noqa: BLE001 -- no store: nothing more to wait for
            return
        time.sleep(0.05)


def error_line(exc: BaseException) -> str | None:
    """The one ``error:`` line of a failure under a :func:`watch_peers` block: the failing rank's message on
    that rank, ``None`` on a rank whose error followed a peer's failure (it stays silent)."""
    found = failure_of(exc)
    if found is None:
        return f"error: {one_line(exc)}"
    failed_rank, own = found
    return f"error: rank {failed_rank}: {one_line(exc)}" if own else None
