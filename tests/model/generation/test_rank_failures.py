"""One rank fails at any phase of ``generate``, every rank ends within seconds with one ``error:`` line naming the
failing rank and a non-zero exit, never a hang in a collective (swift_model.generation.failures).

Two ranks run the command line under a torchrun-like environment (``env://`` on a local port, gloo, the
collective timeout left at its 30 minutes: only the peer watch can end the waiting rank in time); rank 1 raises a
``RuntimeError`` (the kind an out-of-memory is) in one phase. Processes are forked from the test session's fork
server (tests/spawn.py) and killed at a deadline, so a hang fails the test."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest

import spawn
from helpers import random_image

pytestmark = pytest.mark.distributed

PHASES = ("encode_conditioning", "run_stage1", "run_bridge", "run_stage2", "run_decode")
DEADLINE_S = 120  # forks, imports and a tiny run on two loaded cores; a hang would last 30 minutes
WITHIN_S = 15  # the peer ends this long after the failing rank at most (it polls every 0.5 s)


def _rank_main(rank: int, world: int, port: int, out_dir: str, phase: str | None, failing: int) -> None:
    import torch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    err = os.open(os.path.join(out_dir, f"stderr{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)  # what this rank prints, for the parent to read (os._exit ends a rank without flushing)
    from swift_model.cli import main
    from swift_model.generation.pipeline import SwiftI2VPipeline

    if phase is not None and rank == failing:
        def fail(self, *args, **kwargs):
            raise RuntimeError(f"injected failure in {phase}")

        setattr(SwiftI2VPipeline, phase, fail)
    status = main(["generate", "--tiny", "--image", os.path.join(out_dir, "in.png"), "--prompt", "p", "--frames",
                   "9", "--width", "128", "--height", "64", "--quiet", "--out", os.path.join(out_dir, "v.mp4")])
    sys.stderr.flush()
    os._exit(status)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out_dir, phase: str | None, failing: int = 1) -> dict:
    """Both ranks' exit codes, end times and stderr lines."""
    random_image(5).save(os.path.join(out_dir, "in.png"))
    ctx, port = spawn.fork_context(), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, str(out_dir), phase, failing), daemon=True)
             for r in range(2)]
    start = time.monotonic()
    for p in procs:
        p.start()
    ended = [None, None]
    while time.monotonic() - start < DEADLINE_S and None in ended:
        for r, p in enumerate(procs):
            if ended[r] is None and not p.is_alive():
                ended[r] = time.monotonic()
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    lines = []
    for r in range(2):
        with open(os.path.join(out_dir, f"stderr{r}.txt")) as f:
            lines.append([line for line in f.read().splitlines() if line.startswith("error:")])
    return {"codes": [p.exitcode for p in procs], "ended": ended, "errors": lines}


@pytest.mark.parametrize("phase", PHASES)
def test_one_rank_failing_ends_every_rank(tmp_path, phase):
    run = _run(tmp_path, phase)
    assert None not in run["ended"], f"a rank hung: exit codes {run['codes']}"
    assert abs(run["ended"][0] - run["ended"][1]) < WITHIN_S, run["ended"]
    assert run["codes"][1] == 1, run  # the failing rank: status 1 (a failure, not bad input)
    assert run["codes"][0] != 0 or os.path.exists(tmp_path / "v.mp4"), run  # ended, or it had finished its part
    assert run["errors"] == [[], [f"error: rank 1: RuntimeError: injected failure in {phase}"]], run["errors"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".mp4") and p != "v.mp4"]  # no partial output


def test_no_failure_runs_through(tmp_path):
    """The watch itself never ends a healthy run: both ranks exit 0 and the video is written."""
    run = _run(tmp_path, None)
    assert run["codes"] == [0, 0] and run["errors"] == [[], []], run
    assert os.path.getsize(tmp_path / "v.mp4") > 0
