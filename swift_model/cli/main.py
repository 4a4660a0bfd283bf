"""The ``swift-i2v`` command line: ``generate`` (real checkpoints), ``plan`` (a memory and FLOP estimate on fake
tensors), ``demo`` (tiny random weights, CPU), ``batch`` (many videos from a job file) and the training
commands (``prepare``, ``train``, ``export``, ``train-lora``).

Each command's module adds its parser with the function that runs it (``set_defaults(func=...)``); :func:`main`
parses and calls it. Bad input gets a one-line ``error: ...`` on stderr and exit status 2, any other failure
(out of memory, a bug) one line and exit status 1 (``SWIFT_I2V_TRACEBACK=1`` shows the traceback), never a traceback,
and never a half-written mp4 (the video is written to a temporary file and renamed when complete).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import batch, generate, plan, training

# the modules of the commands, in the order --help lists them
COMMANDS = (generate, batch, plan, training)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each sets ``func``, the function that runs it."""
    parser = argparse.ArgumentParser(prog="swift-i2v", description="High-resolution image-to-video by SwiftI2V "
                                     "(two stages, Conditional Segment-wise Generation).")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_commands(sub)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``swift-i2v`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        sys.stdout.flush()
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- the command line prints one line, never a traceback
        if os.environ.get("SWIFT_I2V_TRACEBACK") == "1":  # for developers: the whole traceback
            raise
        line, status = error_report(exc)
        if line is not None:
            print(line, file=sys.stderr)
        return status


def error_report(exc: Exception) -> tuple[str | None, int]:
    """``(the one error line to print or None, exit status)`` of an exception that ended a command: status 2 for
    bad input (``ValueError``, ``TypeError``, ``OSError``), 1 for any other failure (out of memory, a bug).

    Under torchrun: an error every rank raised together (``AgreedError``) is printed by rank 0 alone; one rank's
    own failure is printed by that rank, naming it, while the peers it ended stay silent
    (:mod:`swift_model.generation.failures`).
    """
    from ..generation.distributed import AgreedError, env_rank, torchrun_world_size
    from ..generation.failures import error_line, failure_of, one_line

    bad_input = isinstance(exc, (ValueError, TypeError, OSError))
    status = 2 if bad_input else 1
    if failure_of(exc) is not None:  # raised inside a multi-rank command's watched block
        return error_line(exc), status
    msg = one_line(exc)
    rank = env_rank()
    if torchrun_world_size() > 1 and not isinstance(exc, AgreedError):
        msg = f"rank {rank}: {msg}"  # an error of this rank alone
    if rank == 0 or not isinstance(exc, AgreedError):  # every rank has the same one: printed once
        return f"error: {msg}", status
    return None, status
