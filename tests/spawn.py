"""Processes the tests start (see helpers.py for why this is a file of its own).

Torch.distributed ranks on CPU processes with gloo, once per world size. A test module defines ``CASES`` (name ->
``case(group)``), and optionally a module-level ``RECORD`` list that its cases append notes to. :func:`launch`
starts ``world_size`` processes (forked from a fork server that has imported the heavy modules once per
session); each imports that module, joins a gloo group (with a collective timeout, so a mismatch fails instead
of hanging), runs every case in the same order (so the collectives line up) and writes its verdicts to a JSON
file after each case. The parent joins the children until a deadline and then kills them. :func:`problems`
turns the verdicts of one case into the failure messages of a pytest test. ``SPAWN_OUT_DIR`` in the children's
environment names a scratch folder shared by the ranks of one launch. The ``spawned`` fixture of conftest.py
launches a module's cases on first use.

Run as a script, ``python tests/spawn.py FRAMES.npy ARGS...`` is the command line (``swift_model.cli.main``) on
``ARGS`` that also saves the frames it hands to the video encoder, before the lossy codec, to ``FRAMES.npy``
(under torchrun: the rank that writes the video). Every rank runs with one torch thread, as the tests do.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30  # a rank waiting longer for its peers raises (init_process_group timeout)
LAUNCH_DEADLINE_S = 150  # the whole spawn of one world size; then the children are killed


def _worker(rank: int, world_size: int, store: str, out_dir: str, module_name: str, timeout_s: float) -> None:
    torch.set_num_threads(1)  # as the tests (conftest.py); several ranks share two cores
    os.environ["SPAWN_OUT_DIR"] = out_dir
    module = importlib.import_module(module_name)
    record = getattr(module, "RECORD", None)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    verdicts = {}
    path = os.path.join(out_dir, f"rank{rank}.json")
    try:
        for name, case in module.CASES.items():  # the same order on every rank: the collectives line up
            t0 = time.perf_counter()
            if record is not None:
                record.clear()
            try:
                case(dist.group.WORLD)
                verdicts[name] = {"ok": True, "s": round(time.perf_counter() - t0, 3),
                                  "checks": list(record or [])}
            except Exception as exc:  # noqa: BLE001 -- reported to the parent, which fails the test
                verdicts[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                  "trace": traceback.format_exc(limit=6)}
            with open(path + ".tmp", "w") as f:  # after every case: a hang later still reports these
                json.dump(verdicts, f)
            os.replace(path + ".tmp", path)
    finally:
        dist.destroy_process_group()


# What every rank imports, imported once per test session by the fork server rather than once per rank: torch
# and diffusers' VAE take ~10 s of CPU per process, which 4 ranks on 2 cores pay twice over in wall time.
PRELOAD = ("torch", "torch.distributed", "diffusers.models.autoencoders.autoencoder_kl_wan", "transformers",
           "swift_model.generation.pipeline", "swift_model.generation.distributed", "swift_model.planning.planner")


def fork_context():
    """A ``forkserver`` context whose server has imported :data:`PRELOAD`: each rank is forked from that clean,
    single-threaded process (no OpenMP pool, no process group: safe to fork), with the modules loaded. The
    server starts with the first launch and serves every later one of the session."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def launch(module_name: str, world_size: int, out_dir: str, *, deadline_s: float = LAUNCH_DEADLINE_S,
           timeout_s: float = COLLECTIVE_TIMEOUT_S) -> dict:
    """Spawn ``world_size`` ranks running ``module_name``'s ``CASES``; returns the verdicts of every rank (and
    ``out_dir``, the ranks' scratch folder)."""
    ctx = fork_context()
    store = os.path.join(out_dir, "store")
    procs = [ctx.Process(target=_worker, args=(r, world_size, store, out_dir, module_name, timeout_s), daemon=True)
             for r in range(world_size)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.0, deadline_s - (time.monotonic() - t0)))
    timed_out = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    results = {"_exitcodes": [p.exitcode for p in procs], "_timed_out": timed_out, "_deadline": deadline_s,
               "_seconds": time.monotonic() - t0, "out_dir": out_dir, "ranks": []}
    for r in range(world_size):
        try:
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                results["ranks"].append(json.load(f))
        except FileNotFoundError:
            results["ranks"].append({})
    return results


def problems(run: dict, case: str) -> list[str]:
    """The failures of ``case`` in a :func:`launch` result, one message per failing rank (empty: passed)."""
    out = []
    for rank, verdicts in enumerate(run["ranks"]):
        v = verdicts.get(case)
        if v is None:
            out.append(f"rank {rank}: the case did not run (exit codes {run['_exitcodes']}, "
                       f"killed after {run['_deadline']} s: ranks {run['_timed_out']})")
        elif not v["ok"]:
            out.append(f"rank {rank}: {v['error']}\n{v['trace']}")
    return out


def check(run: dict, case: str) -> None:
    """Fail (a pytest assertion) with the failures of ``case`` in a :func:`launch` result."""
    found = problems(run, case)
    assert not found, "\n".join(found)


def _cli_recording_frames(argv: list[str]) -> int:
    import numpy as np

    from helpers import recorded_video_frames
    from swift_model.cli import main

    torch.set_num_threads(1)
    with recorded_video_frames() as videos:
        status = main(argv[1:])
    if videos:
        np.save(argv[0], videos[0])
    return status


if __name__ == "__main__":
    sys.exit(_cli_recording_frames(sys.argv[1:]))
