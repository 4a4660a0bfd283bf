"""The ``swift-i2v`` command line: ``generate`` (real checkpoints), ``plan`` (a memory and FLOP estimate on fake
tensors), ``demo`` (tiny random weights, CPU) and the training commands (``prepare``, ``train``, ``export``,
``train-lora``).

Each command's module adds its parser with the function that runs it (``set_defaults(func=...)``); :func:`main`
parses and calls it. Bad input gets a one-line ``error: ...`` on stderr and exit status 2, never a traceback,
and never a half-written mp4 (the video is written to a temporary file and renamed when complete).
"""

from __future__ import annotations

import argparse
import sys

from . import generate, plan, training

# the modules of the commands, in the order --help lists them
COMMANDS = (generate, plan, training)


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
    except (ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError, OSError) as exc:
        from ..generation.distributed import AgreedError, env_rank, torchrun_world_size

        msg = " ".join(str(exc).split()) or type(exc).__name__
        rank = env_rank()
        if torchrun_world_size() > 1 and not isinstance(exc, AgreedError):
            msg = f"rank {rank}: {msg}"  # an error of this rank alone
        if rank == 0 or not isinstance(exc, AgreedError):  # every rank has the same one: printed once
            print(f"error: {msg}", file=sys.stderr)
        return 2
