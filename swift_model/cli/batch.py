"""``swift-i2v batch``: many videos from a job file with the models loaded once.

Everything that needs no model is checked first (the arguments, every line of the job file, the output folder),
so a bad job file costs no weight load. Under ``torchrun`` each rank is a replica that makes its own videos
(``N`` ranks: ``N`` videos at once), or ``--ulysses-degree K`` consecutive ranks are one replica that makes each
of its videos together; rank 0 alone prints, shows the bar and writes ``results.jsonl``.
"""

from __future__ import annotations

import json
import os
import sys

from .args import add_compile_arg, add_generation_args, add_model_args, request_from_args
from .batch_ray import add_ray_args, check_ray_args, model_source, run_ray_command


def add_commands(sub) -> None:
    """Add ``batch`` to the CLI's subparsers."""
    b = sub.add_parser("batch", help="many videos from a job file (JSON Lines or CSV), the models loaded once; "
                       "reruns resume")
    b.add_argument("--jobs", required=True, help="job file: .jsonl (one JSON object per line) or .csv (a header "
                   "row): id, image, and any per-video field (prompt, seed, frames, ...); see docs/batch.md")
    b.add_argument("--out-dir", required=True, help="folder of the videos (<id>.mp4) and results.jsonl "
                   "(created if missing)")
    add_model_args(b, batch=True)
    add_generation_args(b, frames=81, width=2560, height=1408, out=False)
    add_compile_arg(b)
    add_ray_args(b)  # --ray [ADDRESS] and the actor pools (batch_ray.py)
    b.set_defaults(func=run_batch_command)
    for action in b._actions:  # the generation arguments are the defaults of every job
        if action.dest in ("frames", "width", "height", "seed", "prompt", "guidance") and action.help:
            action.help += " (a job's own value wins)"


def check_batch_layout(args) -> None:
    """``ValueError`` for a layout ``batch`` does not run: the replicas make different videos, so nothing may span
    them (``--cfg-degree 2`` pairs ranks across the halves of the world, ``--fsdp`` shards over every rank)."""
    if args.cfg_parallel:
        raise ValueError("batch: --cfg-degree 2 is not supported (each replica makes its own videos; the distilled "
                         "4-step models run without guidance anyway)")
    if args.fsdp:
        raise ValueError("batch: --fsdp (weights sharded over every rank) is not supported: each replica holds "
                         "its own models")


def prepare_batch(args):
    """Everything checked before any weight is read: ``(jobs, out_dir)`` (absolute; made later, when the ranks
    start). Raises ``ValueError`` naming the flag, or ``file:line`` of the job file."""
    from ..batch.jobs import read_jobs

    check_batch_layout(args)
    defaults = request_from_args(args)
    jobs = read_jobs(args.jobs, defaults)
    if not (args.tiny or (args.stage1 and args.stage2)):
        raise ValueError("batch needs --stage1 and --stage2 checkpoint folders (or --tiny)")
    for job in jobs:  # the text encoder is loaded only when some job has a prompt without its embeddings
        if job.request.prompt is None and job.request.prompt_embeds is None:
            raise ValueError(f"{args.jobs}:{job.line}: job {job.id!r} has no prompt: give prompt or prompt_embeds "
                             "in the job file, or --prompt / --prompt-embeds")
    out_dir = os.path.abspath(args.out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out-dir is not a folder: {args.out_dir}")
    if args.report is not None:
        folder = os.path.dirname(os.path.abspath(args.report))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"cannot write the report to {args.report}")
    return jobs, out_dir


def _make_out_dir(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)  # by every rank (no rank may check it before it exists); exist_ok: races
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"--out-dir is not writable: {out_dir}")


def _load(args, jobs, device):
    """The pipeline of ``args`` on ``device`` (each rank its own whole copy): the models :func:`model_source` names,
    as every Ray actor loads its part of them."""
    from ..generation.distributed import env_rank
    from ..generation.pipeline import PARTS

    if args.tiny and env_rank() == 0:
        print("swift-i2v: using the tiny RANDOM-WEIGHT models (--tiny).", file=sys.stderr)
    return model_source(args, jobs).load(PARTS, device)


def run_batch_command(args) -> int:
    """Run ``batch``: exit status 0 when every job ran ok (or was done before), 1 when some job failed."""
    import torch.distributed as dist

    from ..batch.runner import Replicas, run_batch
    from ..generation.distributed import distribute, processes

    check_ray_args(args)
    jobs, out_dir = prepare_batch(args)
    if args.ray is not None:  # the same jobs and outputs, run by the Ray Data pipeline (batch_ray.py)
        return run_ray_command(args, jobs, out_dir)
    ulysses = args.ulysses or 1  # batch's default: every rank a replica of its own
    with processes(args.device, ulysses=ulysses) as (par, device):
        error = None
        try:
            _make_out_dir(out_dir)
            pipe = _load(args, jobs, device)
            own = par.replica()  # the ranks of this rank's replica, as a world of their own
            if own.distributed:
                distribute(pipe, own)
        except (ValueError, TypeError, OSError) as exc:
            error = exc
        par.agree(error)  # every rank goes on, or every rank stops with the same message
        replicas = Replicas(count=par.replicas, size=par.ulysses, rank=par.rank,
                            group=dist.group.WORLD if par.distributed else None)
        summary = run_batch(pipe, jobs, out_dir, replicas=replicas, progress=not args.quiet)
        if par.is_main:
            print(summary.line(out_dir))
            for rec in summary.failures[:10]:
                print(f"  {rec['id']}: {rec['error']}", file=sys.stderr)
            if args.report is not None:
                report = dict(jobs=len(jobs), ok=summary.ok, failed=summary.failed, skipped=summary.skipped,
                              seconds=round(summary.seconds, 3), out_dir=out_dir, device=str(device),
                              random_weights=args.tiny, **par.report())
                with open(args.report, "w") as f:
                    json.dump(report, f, indent=2)
    return 1 if summary.failed else 0
