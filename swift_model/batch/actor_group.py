"""An actor over several devices: a process group of K processes on one node that runs each job together.

A Ray actor that reserves K GPUs (``--gpus-per-actor K``; Ray sets ``CUDA_VISIBLE_DEVICES`` to them) or, on the
CPU, K processes (``--processes-per-actor K``) is rank 0 of a group of K processes (:class:`ActorGroup`): it
starts K-1 helper processes of this module (``python -m swift_model.batch.actor_group``) that join a
torch.distributed group with it (a TCP store on a free localhost port; NCCL on GPUs, gloo on the CPU), each on
its own device (rank ``r`` on ``cuda:r`` of the visible GPUs). Every rank builds the same part of the pipeline
and hands it the Ulysses parallelism over the K ranks (:func:`~swift_model.generation.distributed.distribute`),
as ``generate`` under ``torchrun`` does; each job's phases then run on every rank together, every DiT call
split over the K ranks, rank 0 alone writing the video.

The jobs reach the helpers over a pipe from rank 0 (not a collective: a helper may wait for its next
job longer than any collective timeout), one message per job; the helpers answer each one, loop until told to
stop, and end with rank 0:

- a helper watches its parent and exits when the parent is gone (a killed actor leaves no orphan);
- rank 0 watches its helpers: one that dies ends the actor's process at once (a collective would otherwise wait
  for it until its timeout), so Ray restarts the actor and runs its unfinished jobs again.

A failure of the job itself on every rank (a missing image, a size the models cannot make: ``prepare`` checks
them on every rank alike; an out-of-memory on every rank) is agreed by the ranks after each step and becomes
the job's error, and the next job runs. A failure on some ranks only leaves the others in a collective until
its timeout (30 minutes by default); a group that cannot agree after that raises :class:`ActorGroupError`,
which stops the batch (a rerun resumes).

Tested on CPU processes with gloo (tests/model/batch/test_ray_batch.py); the NCCL form has not run on GPUs.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from ..generation.distributed import COLLECTIVE_TIMEOUT, Parallelism, distribute
from ..generation.failures import one_line
from ..generation.pipeline import GenerationState, SwiftI2VPipeline

__all__ = ["ActorGroup", "ActorGroupError", "GroupJobError", "run_phases"]

HELPER_EXIT = 70  # the status an actor ends with when one of its helpers died (Ray then restarts it)
_WATCH_S = 0.5


class ActorGroupError(Exception):
    """The process group of an actor is broken (a rank failed alone, a helper could not start): not a failure of
    one job, so it stops the batch (deliberately not one of the pipeline's request errors)."""


class GroupJobError(ValueError):
    """A job failed on the ranks of an actor's group (the first failing rank's error line): the job's own
    failure, recorded like any other, and the group goes on with the next job."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device(device_type: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def _join(rank: int, world: int, port: int, source, parts, device_type: str, threads: int,
          timeout_s: float) -> SwiftI2VPipeline:
    """Join the group as ``rank`` and build this rank's pipeline with Ulysses over the ``world`` ranks (every
    rank calls it with the same arguments: the group creation and ``distribute`` are collectives)."""
    device = _device(device_type, rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    init = f"tcp://127.0.0.1:{port}"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world, timeout=timeout,
                                device_id=device)
    else:
        torch.set_num_threads(max(1, threads))  # the actor's CPUs are shared by its ranks (see RayOptions)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timeout)
    pipe = source.load(parts, device)
    distribute(pipe, Parallelism.build(ulysses=world))
    return pipe


def _agree(error: BaseException | None) -> str | None:
    """The first failing rank's error line when any rank of the group failed this step (``None``: none did); a
    collective every rank calls at the same point. ``ActorGroupError`` when the group itself is broken."""
    mine = None if error is None else one_line(error)
    every: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(every, mine)
    except Exception as exc:  # noqa: BLE001 - a timed-out or broken group: no job can run on it any more
        raise ActorGroupError(f"the actor's process group failed: {one_line(exc)}") from None
    return next((line for line in every if line is not None), None)


def run_phases(pipe: SwiftI2VPipeline, request, phases, state: GenerationState):
    """Run ``phases`` of ``request`` on this rank of a group (every rank calls it with the same arguments):
    ``(run, None)`` when they ran on every rank, ``(None, error line)`` when the job failed on some rank (its
    first failing rank's error: the job's error record). The failure of a step is agreed before the next one,
    so no rank goes on into a collective the others will not reach."""
    run, error = None, None
    try:
        run = pipe.prepare(request)
    except SwiftI2VPipeline.REQUEST_ERRORS as exc:  # checked alike on every rank: a bad image, a bad size
        error = exc
    line = _agree(error)
    if line is not None:
        return None, line
    try:
        with torch.no_grad():
            for phase in phases:
                pipe.run_phase(phase, run, state)
    except SwiftI2VPipeline.REQUEST_ERRORS as exc:
        # out of memory: on every rank alike, or on some while the others wait in a collective until its timeout
        # (then fail too, and the agreement below finds the group broken or names the first failure)
        error = exc
    if error is not None and pipe.device.type == "cuda":
        torch.cuda.empty_cache()
    line = _agree(error)
    return (None, line) if line is not None else (run, None)


class ActorGroup:
    """Rank 0 of a group of ``processes`` processes on this node (this process) and its helpers, each holding
    ``parts`` of the pipeline from ``source`` (a :class:`~swift_model.batch.ray_pipeline.ModelSource`) with
    Ulysses over the group. ``device_type``: ``"cuda"`` (rank ``r`` on ``cuda:r``) or ``"cpu"`` (``threads``
    torch threads per rank). ``timeout_s``: the collective timeout. ``pid_dir``: when given, each helper writes
    an empty file named by its process id there (the tests check that none outlives the batch).

    ``RuntimeError``/``ValueError`` when a rank cannot start (the models' load error, naming the rank)."""

    def __init__(self, source, parts, processes: int, device_type: str, threads: int = 1, *,
                 timeout_s: float = COLLECTIVE_TIMEOUT.total_seconds(), pid_dir: str | None = None) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 2:
            raise ValueError(f"an actor group needs processes >= 2, got {processes!r}")
        self.closing = False
        self.procs, self.conns = [], []
        port = _free_port()
        try:
            for rank in range(1, processes):
                self._start_helper(dict(rank=rank, world=processes, port=port, source=source, parts=tuple(parts),
                                        device_type=device_type, threads=threads, timeout_s=timeout_s,
                                        pid_dir=pid_dir))
            self.pipe = _join(0, processes, port, source, parts, device_type, threads, timeout_s)
            for rank, conn in enumerate(self.conns, 1):  # each helper built its pipeline too, or says why not
                try:
                    status = conn.recv()
                except EOFError:
                    status = f"it ended (status {self.procs[rank - 1].wait()})"
                if status is not None:
                    raise RuntimeError(f"rank {rank} of the actor's group could not start: {status}")
        except BaseException:
            self.close()
            raise
        # watched once started (a helper that fails to start is reported above, not by ending the actor)
        threading.Thread(target=self._watch_helpers, name="swift-i2v-helpers", daemon=True).start()

    def _start_helper(self, cfg: dict) -> None:
        # two pipes per helper, its ends passed by descriptor: the helper reads EOF when this process is gone,
        # and this one when the helper is (no socket to accept, nothing to wait on forever)
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        proc = subprocess.Popen([sys.executable, "-m", __name__, str(down_r), str(up_w)], pass_fds=(down_r, up_w))
        os.close(down_r)
        os.close(up_w)
        self.procs.append(proc)
        conn = _Duplex(Connection(up_r, writable=False), Connection(down_w, readable=False))
        self.conns.append(conn)
        conn.send(cfg)

    def _watch_helpers(self) -> None:
        # a dead helper leaves rank 0 waiting in a collective: end the actor, which Ray restarts
        while not self.closing:
            for rank, proc in enumerate(self.procs, 1):
                if proc.poll() is not None and not self.closing:
                    print(f"swift-i2v: rank {rank} of an actor's group ended (status {proc.returncode}); the actor "
                          "ends too", file=sys.stderr, flush=True)
                    os._exit(HELPER_EXIT)
            time.sleep(_WATCH_S)

    def run(self, request, phases, state: GenerationState):
        """Run ``phases`` of ``request`` on every rank from ``state`` (sent to every rank); returns rank 0's
        prepared run, ``state`` filled in. :class:`GroupJobError` when the job failed (:func:`run_phases`),
        :class:`ActorGroupError` when the group did."""
        for conn in self.conns:
            conn.send(("job", request, tuple(phases), state))
        result = run_phases(self.pipe, request, phases, state)
        for rank, conn in enumerate(self.conns, 1):
            answer = conn.recv()
            if answer is not None:  # a helper's own failure that is not the job's: the group cannot go on
                raise ActorGroupError(f"rank {rank} of the actor's group failed: {answer}")
        run, line = result
        if line is not None:
            raise GroupJobError(line)
        return run

    def close(self) -> None:
        """Tell the helpers to stop and wait for them (killed after a few seconds); leaves the group."""
        self.closing = True
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except OSError:  # that helper is gone already
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self.conns:
            conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    def __del__(self) -> None:
        if not getattr(self, "closing", True):
            self.close()


class _Duplex:
    """Two one-way connections as one: ``recv`` from the first, ``send`` to the second. Plain pickles: tensors
    travel by value (torch's own pickler for connections would share their memory through a side channel that
    a process of ours, not started by multiprocessing, cannot authenticate to)."""

    def __init__(self, inbound: Connection, outbound: Connection) -> None:
        self.inbound, self.outbound = inbound, outbound

    def recv(self):
        return pickle.loads(self.inbound.recv_bytes())

    def send(self, obj) -> None:
        self.outbound.send_bytes(pickle.dumps(obj))

    def close(self) -> None:
        self.inbound.close()
        self.outbound.close()


def _watch_parent(parent: int) -> None:
    # the actor was killed (Ray ends its actors that way): this helper goes too, whatever it was doing
    while os.getppid() == parent:
        time.sleep(_WATCH_S)
    os._exit(0)


def _helper(read_fd: int, write_fd: int) -> int:
    """A helper's life: connect to rank 0, join the group, then run each job it is sent until told to stop."""
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="swift-i2v-parent", daemon=True).start()
    conn = _Duplex(Connection(read_fd, writable=False), Connection(write_fd, readable=False))
    cfg = conn.recv()
    if cfg["pid_dir"]:
        open(os.path.join(cfg["pid_dir"], str(os.getpid())), "w").close()
    try:
        pipe = _join(cfg["rank"], cfg["world"], cfg["port"], cfg["source"], cfg["parts"], cfg["device_type"],
                     cfg["threads"], cfg["timeout_s"])
    except Exception as exc:  # noqa: BLE001 - told to rank 0, which names this rank
        conn.send(one_line(exc))
        return 1
    conn.send(None)
    broken = None  # once the group failed, every job is answered with that failure (rank 0 stops the batch);
    # the helper stays until told to stop, so it is not mistaken for a crash that Ray should retry
    while True:
        try:
            message = conn.recv()
        except EOFError:  # rank 0 is gone
            return 0
        if message[0] == "stop":
            if broken is None:
                dist.destroy_process_group()
            return 0
        _, request, phases, state = message
        if broken is None:
            try:
                run_phases(pipe, request, phases, state)
            except Exception as exc:  # noqa: BLE001 - a broken group or a bug: rank 0 stops the batch with it
                broken = one_line(exc)
        conn.send(broken)


if __name__ == "__main__":
    sys.exit(_helper(int(sys.argv[1]), int(sys.argv[2])))
