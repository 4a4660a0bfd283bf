"""``swift-i2v batch ... --ray [ADDRESS]``: the batch's jobs as a Ray Data pipeline across machines
(:mod:`swift_model.batch.ray_pipeline`): a pool of Stage I actors and a pool of Stage II actors, each actor holding
one DiT; the same videos and ``results.jsonl`` as the plain batch.
"""

from __future__ import annotations

import json
import sys

RAY_FLAGS = ("stage1_actors", "stage2_actors", "gpus_per_actor", "processes_per_actor")


def add_ray_args(p) -> None:
    """``--ray [ADDRESS]``, ``--stage1-actors``, ``--stage2-actors``, ``--gpus-per-actor``,
    ``--processes-per-actor`` (``batch``)."""
    g = p.add_argument_group('across machines with Ray Data (pip install ".[ray]" in the checkout; docs/batch.md)')
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the jobs as a Ray Data pipeline on the cluster at ADDRESS (without one: RAY_ADDRESS's "
                        "cluster, else a local cluster started for this batch)")
    g.add_argument("--stage1-actors", type=int, default=None,
                   help="Stage I actors (each holds the Stage I DiT and the encoders; default 1)")
    g.add_argument("--stage2-actors", type=int, default=None,
                   help="Stage II actors (each holds the Stage II DiT and the VAEs, and writes the videos; "
                        "default 1)")
    g.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs each actor reserves (default: 1 on a cluster with GPUs, 0 without: the CPU; a "
                        "fraction shares a GPU; K > 1: the actor runs K processes on K GPUs of its node, each video "
                        "split over them with Ulysses; K must divide both DiTs' attention heads; not yet run on "
                        "GPUs)")
    g.add_argument("--processes-per-actor", type=int, default=None, metavar="K",
                   help="processes of each actor, which make each video together (Ulysses over K ranks): K GPUs "
                        "on a cluster with GPUs (as --gpus-per-actor K), K CPU processes (gloo) with "
                        "--gpus-per-actor 0 or without GPUs; default 1")


def check_ray_args(args) -> None:
    """``ValueError`` for a Ray flag without ``--ray``, or ``--ray`` under torchrun."""
    if args.ray is None:
        given = [f"--{name.replace('_', '-')}" for name in RAY_FLAGS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{given[0]} needs --ray")
        return
    from ..generation.distributed import torchrun_world_size

    if torchrun_world_size() > 1:
        raise ValueError("--ray runs the batch from one process (the driver): start it without torchrun")
    # an actor's group (--gpus-per-actor K) is its own world, with Ulysses over all of it
    for flag, on in (("--ulysses-degree", getattr(args, "ulysses", None) not in (None, 1)),
                     ("--cfg-degree 2", getattr(args, "cfg_parallel", False)),
                     ("--fsdp", getattr(args, "fsdp", False))):
        if on:
            raise ValueError(f"{flag} is not supported with --ray: an actor splits each video over its own "
                             "processes (--gpus-per-actor K, --processes-per-actor K); scale with --stage1-actors "
                             "and --stage2-actors")


def model_source(args, jobs):
    """The models of ``batch``: what the plain batch loads its pipeline from (``cli/batch.py``) and every Ray actor
    its part of them, one definition for both."""
    from ..batch.ray_pipeline import ModelSource
    from ..generation.distributed import memory_plan

    common = dict(stage2_kind=args.stage2_kind, vae_dtype=args.vae_dtype, memory=memory_plan(args.memory),
                  compile=args.compile)
    if args.tiny:
        return ModelSource(dict(seed=0, **common), tiny=True)
    # the text encoder is loaded only when some job has a prompt without its embeddings
    needs_text = any(job.request.prompt_embeds is None for job in jobs)
    return ModelSource(dict(stage1=args.stage1, stage2=args.stage2, stage1_lora=args.stage1_lora,
                            lora_scale=args.lora_scale, stage1_lora_2=getattr(args, "stage1_lora_2", None),
                            text_encoder=args.text_encoder, load_text_encoder=needs_text, **common))


def run_ray_command(args, jobs, out_dir: str) -> int:
    """Run ``batch --ray`` on the checked ``jobs``: exit status 0 when every job ran ok (or was done before), 1
    when some job failed; a failure of the pipeline itself prints one ``error:`` line (status 2)."""
    from ..batch.ray_pipeline import RayOptions, run_ray_batch

    gpus = args.gpus_per_actor
    if gpus is None and args.device is not None:  # --device says which the actors use
        gpus = 0 if args.device == "cpu" else (args.processes_per_actor or 1)
    pools = {name: 1 if getattr(args, name) is None else getattr(args, name)
             for name in ("stage1_actors", "stage2_actors")}
    options = RayOptions(address=args.ray or None, gpus_per_actor=gpus,
                         processes_per_actor=args.processes_per_actor, **pools)
    if args.tiny:
        print("swift-i2v: using the tiny RANDOM-WEIGHT models (--tiny).", file=sys.stderr)
    try:
        summary = run_ray_batch(jobs, out_dir, model_source(args, jobs), options, progress=not args.quiet)
    except RuntimeError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(summary.line(out_dir))
    for rec in summary.failures[:10]:
        print(f"  {rec['id']}: {rec['error']}", file=sys.stderr)
    if args.report is not None:
        report = dict(jobs=len(jobs), ok=summary.ok, failed=summary.failed, skipped=summary.skipped,
                      seconds=round(summary.seconds, 3), out_dir=out_dir, random_weights=args.tiny,
                      ray=dict(address=options.address, stage1_actors=options.stage1_actors,
                               stage2_actors=options.stage2_actors, gpus_per_actor=options.gpus_per_actor,
                               processes_per_actor=options.processes))
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if summary.failed else 0
