"""The ``swift-i2v`` command line: ``generate`` (real checkpoints), ``plan`` (a memory and FLOP estimate on fake
tensors) and ``demo`` (tiny random weights, CPU).

Bad input gets a one-line ``error: ...`` on stderr and exit status 2, never a traceback, and never a
half-written mp4 (the video is written to a temporary file and renamed when complete).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEMO_TEXT = ("swift-i2v demo: the whole two-stage pipeline on TINY RANDOM-WEIGHT models on the CPU. "
             "The weights are random, so the video is noise-like: this shows the machinery runs, not quality.")


def _add_common(p: argparse.ArgumentParser, *, frames: int, width: int, height: int, need_out: bool = True,
                hidden: bool = False) -> None:
    """The arguments of every generation (``generate``, ``plan``, ``demo``). ``hidden``: accepted without help
    (``plan`` takes a ``generate`` command line as is; the arguments that do not change its estimate are
    hidden there)."""
    hide = dict(help=argparse.SUPPRESS) if hidden else {}
    p.add_argument("--out", required=need_out, **(hide or dict(help="output .mp4 path")))
    p.add_argument("--frames", type=int, default=frames, help=f"frame count, 4k+1 (default {frames})")
    p.add_argument("--width", type=int, default=width, help=f"output width (default {width})")
    p.add_argument("--height", type=int, default=height, help=f"output height (default {height})")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per stage (default 4)")
    p.add_argument("--shift", type=float, default=5.0, help="flow-matching timestep shift (default 5)")
    p.add_argument("--segment-blocks", type=int, default=2, help="M: latent frames per CSG segment (default 2)")
    p.add_argument("--neighbors", default="1,0", help="NL,NR: clean neighbour blocks left,right (default 1,0)")
    p.add_argument("--joint", action="store_true", help="denoise all segments at once (clip-mode attention)")
    p.add_argument("--start-sigma", type=float, default=0.6, help="start noise level of the refine kind (default 0.6)")
    p.add_argument("--step-mode", choices=("renoise", "euler"), default="renoise", **hide)
    p.add_argument("--seed", type=int, default=0, **hide)
    p.add_argument("--fps", type=int, default=16, **hide)
    p.add_argument("--device", default=None, **(hide or dict(help="cuda or cpu (default: cuda when available)")))
    p.add_argument("--report", default=None,
                   **(hide or dict(help="also write the timing/memory summary as JSON to this file")))
    p.add_argument("--quiet", action="store_true", **(hide or dict(help="no progress bars")))
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale in both stages (default: off; 1 is off; costs a second "
                        "DiT call per step)")
    p.add_argument("--negative-prompt", default="", **(hide or dict(help="negative prompt of the guidance "
                                                                         "(default: empty)")))
    p.add_argument("--shared-anchor", action="store_true",
                   help="Stage II: the anchor frame attends only itself in every window, for Stage II networks "
                        "trained with shared_anchor (a departure from the paper; default off); its keys and "
                        "values are computed once and reused")


def _add_parallel(p: argparse.ArgumentParser, *, plan: bool = False) -> None:
    """``--ulysses``, ``--cfg-parallel``, ``--fsdp`` (``generate`` under torchrun; ``plan`` with ``--world-size``)."""
    n = "--world-size N" if plan else "N"
    group = p.add_argument_group("several GPUs (the estimate of one rank of N)" if plan else
                                 "several GPUs (under torchrun --nproc-per-node N)")
    if plan:
        group.add_argument("--world-size", type=int, default=1,
                           help="estimate one rank (rank 0) of a torchrun --nproc-per-node N run (default 1)")
    group.add_argument("--ulysses", type=int, default=None,
                       help=f"ranks that split each DiT call's tokens and attention heads (default: all {n}, or "
                            f"half of them with --cfg-parallel); must divide {n} and both DiTs' head counts")
    group.add_argument("--cfg-parallel", action="store_true",
                       help=f"run the conditional and unconditional guidance branches on two halves of the ranks "
                            f"(needs --guidance and an even {n})")
    group.add_argument("--fsdp", action="store_true",
                       help=f"shard both DiTs' blocks over the {n} ranks (FSDP2): they are loaded into host memory "
                            "and each rank moves only its shards to its GPU; needs --memory fast (its default)")


def _add_models(p: argparse.ArgumentParser, *, plan: bool = False) -> None:
    """The models of a generation and where they live (``generate`` and ``plan``: ``plan`` reads the folders'
    configs only)."""
    only = " (its configs are read, no weights)" if plan else ""
    p.add_argument("--stage1", default=None, help=f"Stage I checkpoint folder (Wan2.1-I2V-14B class){only}")
    p.add_argument("--stage2", default=None, help=f"Stage II checkpoint folder (Wan2.2-TI2V-5B class){only}")
    p.add_argument("--stage2-kind", choices=("swift", "refine"), default="refine")
    p.add_argument("--text-encoder", default=None, help="UMT5 folder (default: the Stage I folder)")
    p.add_argument("--prompt-embeds", default=None,
                   help="precomputed prompt embeddings (.safetensors, tensor 'prompt_embeds'), instead of running "
                        "the text encoder")
    p.add_argument("--memory", choices=("fast", "balanced", "24gb"), default=None,
                   help="what stays on the GPU: fast (everything; the default with --fsdp, where each rank holds "
                        "its weight shards), balanced (one DiT at a time, encoders only while they run; the "
                        "default), 24gb (DiT blocks streamed from CPU memory, text encoder on the CPU)")
    p.add_argument("--tiny", action="store_true", help="use the tiny random-weight models (no checkpoints)")
    p.add_argument("--vae-dtype", choices=("bf16", "fp32"), default=None,
                   help="dtype of the VAEs (default: bf16 on a GPU, fp32 on the CPU)")
    hide = dict(help=argparse.SUPPRESS) if plan else {}
    p.add_argument("--image", required=not plan, **(hide or dict(help="input image (any format Pillow reads)")))
    p.add_argument("--prompt", default=None, **(hide or dict(help="text prompt (needs the text encoder)")))
    p.add_argument("--negative-prompt-embeds", default=None,
                   **(hide or dict(help="precomputed negative prompt embeddings (.safetensors) for --guidance "
                                        "without the text encoder")))
    p.add_argument("--stage1-lora", default=None,
                   **(hide or dict(help="LoRA merged into Stage I (e.g. 4-step distillation)")))
    p.add_argument("--lora-scale", type=float, default=1.0, **hide)
    _add_parallel(p, plan=plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swift-i2v", description="High-resolution image-to-video by SwiftI2V "
                                     "(two stages, Conditional Segment-wise Generation).")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a video from an image and a prompt with real checkpoints")
    _add_models(g)
    _add_common(g, frames=81, width=2560, height=1408)
    pl = sub.add_parser("plan", help="estimate device memory, FLOPs and host-to-device bytes per phase of a "
                        "generate run, on fake tensors (no GPU, no weights read); takes generate's arguments")
    _add_models(pl, plan=True)
    # generate's arguments that do not change the estimate are accepted (hidden), so a command line plans as is
    _add_common(pl, frames=81, width=2560, height=1408, need_out=False, hidden=True)
    pl.add_argument("--stage1-preset", default=None, help="a built-in Stage I architecture instead of a folder "
                    "(e.g. wan2.1-i2v-14b)")
    pl.add_argument("--stage2-preset", default=None, help="a built-in Stage II architecture (e.g. wan2.2-ti2v-5b)")
    pl.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    d = sub.add_parser("demo", help="run the whole pipeline on tiny random-weight models on the CPU")
    d.add_argument("--image", default=None, help="input image (default: a generated test pattern)")
    d.add_argument("--prompt", default="a red fox running through fresh snow, cinematic")
    d.add_argument("--stage2-kind", choices=("swift", "refine"), default="swift")
    _add_common(d, frames=17, width=256, height=128, need_out=False)
    d.set_defaults(out="swift-i2v-demo.mp4")
    for action in d._actions:
        if action.dest == "out":
            action.help = "output .mp4 path (default swift-i2v-demo.mp4)"
    from .training import add_training_commands

    add_training_commands(sub)  # prepare, train, export
    return parser


def _demo_image(width: int, height: int):
    """A smooth synthetic test picture (gradients and a disc), so the demo needs no input file."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(1, width - 1)
    g = 255 * y / max(1, height - 1)
    disc = ((x - width * 0.6) ** 2 + (y - height * 0.5) ** 2) < (min(width, height) * 0.25) ** 2
    b = np.where(disc, 230, 60)
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8))


def _summary(result) -> str:
    s = result.seconds
    parts = ", ".join(f"{k} {v:.2f}s" for k, v in s.items() if k != "total")
    return (f"done: {result.output} ({result.info['frames']} frames, {result.info['width']}x{result.info['height']}); "
            f"total {s['total']:.2f}s ({parts}); peak memory {result.peak_memory_bytes / 2**30:.2f} GiB "
            f"on {result.info['device']}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _check_request(args) -> None:
    """The generation arguments that need no model (``generate``, ``demo`` and ``plan`` alike): frames, size,
    ``--segment-blocks``, ``--neighbors`` and ``--guidance``."""
    from ..generation.pipeline import check_request

    check_request(args.frames, args.width, args.height, segment_blocks=args.segment_blocks, neighbors=args.neighbors)
    if args.guidance is not None and not args.guidance > 0:
        raise ValueError(f"--guidance must be > 0, got {args.guidance}")


def _plan(args) -> int:
    from ..generation.distributed import check_fsdp_memory, resolve_degrees
    from ..planning.planner import checkpoint_spec, plan_generation, preset_spec, tiny_spec

    _check_request(args)
    # the layout, as generate checks it, before any config is read
    resolve_degrees(args.world_size, ulysses=args.ulysses, cfg_parallel=args.cfg_parallel, fsdp=args.fsdp,
                    guidance=args.guidance is not None and args.guidance != 1.0)
    check_fsdp_memory(args.fsdp, args.memory)
    if args.tiny:
        spec = tiny_spec(args.stage2_kind)
    elif args.stage1 or args.stage2:
        if not (args.stage1 and args.stage2):
            raise ValueError("plan needs both --stage1 and --stage2 folders (or presets, or --tiny)")
        spec = checkpoint_spec(args.stage1, args.stage2, stage2_kind=args.stage2_kind, text_encoder=args.text_encoder,
                               load_text_encoder=args.prompt_embeds is None)
    else:
        spec = preset_spec(args.stage1_preset or "wan2.1-i2v-14b", args.stage2_preset or "wan2.2-ti2v-5b",
                           stage2_kind=args.stage2_kind, text_encoder=args.prompt_embeds is None)
    result = plan_generation(spec, memory=args.memory, frames=args.frames, width=args.width, height=args.height,
                             steps=args.steps, shift=args.shift, segment_blocks=args.segment_blocks,
                             neighbors=args.neighbors, joint=args.joint, start_sigma=args.start_sigma,
                             guidance_scale=args.guidance, vae_dtype=args.vae_dtype, world_size=args.world_size,
                             ulysses=args.ulysses, cfg_parallel=args.cfg_parallel, fsdp=args.fsdp,
                             shared_anchor=args.shared_anchor)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    i, par = result.info, result.parallel
    print(f"swift-i2v plan (an ESTIMATE on fake tensors, not a measurement): {i['stage1']} + {i['stage2']}, "
          f"{i['frames']} frames at {i['width']}x{i['height']}, memory profile {result.profile}")
    peak = "peak GiB"
    if par["world_size"] > 1:
        peak = "rank GiB"
        print(f"per rank (rank 0 of {par['world_size']}: ulysses {par['ulysses']}, cfg-parallel "
              f"{'on' if par['cfg_parallel'] else 'off'}, fsdp {'on' if par['fsdp'] else 'off'}); every figure is "
              f"an ESTIMATE of one rank, FLOPs are that rank's")
    print(f"{'phase':<14} {peak:>9} {'TFLOP':>10} {'to device GiB':>14}")
    for name, p in result.phases.items():
        print(f"{name:<14} {_gib(p['peak_bytes']):>9} {p['flops'] / 1e12:>10.1f} {_gib(p['h2d_bytes']):>14}")
    print(f"{'whole run':<14} {_gib(result.peak_bytes):>9} {result.flops / 1e12:>10.1f}")
    print("not counted: the CUDA context, library workspaces, allocator fragmentation")
    return 0


def _run(args) -> int:
    from ..generation.distributed import check_pipeline, distribute, processes

    guided = args.guidance is not None and args.guidance != 1.0
    device = args.device or ("cpu" if args.command == "demo" else None)  # the demo runs on the CPU
    with processes(device, ulysses=getattr(args, "ulysses", None), cfg_parallel=getattr(args, "cfg_parallel", False),
                   fsdp=getattr(args, "fsdp", False), guidance=guided) as (par, device):
        error = None
        try:
            pipe, image, out = _prepare(args, device)
            check_pipeline(pipe, par)
        except (ValueError, TypeError, OSError) as exc:
            error = exc
        par.agree(error)  # every rank goes on, or every rank stops with the same message
        distribute(pipe, par)
        result = pipe.generate(
            image, getattr(args, "prompt", None), prompt_embeds=getattr(args, "prompt_embeds", None),
            frames=args.frames, width=args.width, height=args.height, steps=args.steps, shift=args.shift,
            segment_blocks=args.segment_blocks, neighbors=args.neighbors, joint=args.joint,
            start_sigma=args.start_sigma, seed=args.seed, step_mode=args.step_mode, output=out, fps=args.fps,
            progress=not args.quiet, free_text_encoder=True, guidance_scale=args.guidance,
            negative_prompt=args.negative_prompt, negative_prompt_embeds=getattr(args, "negative_prompt_embeds", None),
            shared_anchor=args.shared_anchor)
        if par.is_main:  # rank 0 alone prints and writes
            print(_summary(result))
            if args.report is not None:
                with open(args.report, "w") as f:
                    json.dump(result.report(), f, indent=2)
    return 0


def _prepare(args, device):
    """Check the arguments and build the pipeline on ``device``: ``(pipeline, image, output path)``."""
    from ..generation.distributed import env_rank, memory_plan
    from ..generation.pipeline import SwiftI2VPipeline
    from ..io.video import check_output_path, read_image

    # every argument that needs no model is checked before any checkpoint file is opened
    _check_request(args)
    out = check_output_path(args.out)
    if args.report is not None:
        folder = os.path.dirname(os.path.abspath(args.report)) or "."
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"cannot write the report to {args.report}")
    demo = args.command == "demo"
    # --fsdp: the DiTs are loaded into host memory and distribute() moves each rank's shards to its GPU
    memory = memory_plan(getattr(args, "memory", None), getattr(args, "fsdp", False))
    image = read_image(args.image) if args.image else _demo_image(args.width, args.height)

    if demo or args.tiny:
        if env_rank() == 0:
            print(DEMO_TEXT if demo else "swift-i2v: using the tiny RANDOM-WEIGHT models (--tiny).", file=sys.stderr)
        pipe = SwiftI2VPipeline.tiny(seed=0, stage2_kind=args.stage2_kind, device=device,
                                     vae_dtype=getattr(args, "vae_dtype", None),
                                     memory=memory)
    else:
        if not args.stage1 or not args.stage2:
            raise ValueError("generate needs --stage1 and --stage2 checkpoint folders (or --tiny)")
        if args.prompt is None and args.prompt_embeds is None:
            raise ValueError("generate needs --prompt or --prompt-embeds")
        pipe = SwiftI2VPipeline.from_pretrained(
            args.stage1, args.stage2, stage1_lora=args.stage1_lora, lora_scale=args.lora_scale,
            stage2_kind=args.stage2_kind, text_encoder=args.text_encoder,
            load_text_encoder=args.prompt_embeds is None, device=device, memory=memory,
            vae_dtype=args.vae_dtype)
    pipe.check_inputs(args.frames, args.width, args.height)
    return pipe, image, out


def main(argv=None) -> int:
    """Entry point of the ``swift-i2v`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from .training import TRAINING_COMMANDS, run_training_command

        if args.command in TRAINING_COMMANDS:
            return run_training_command(args)
        return _plan(args) if args.command == "plan" else _run(args)
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

