"""``swift-i2v generate`` (real checkpoints) and ``swift-i2v demo`` (tiny random weights, CPU).

Every argument that needs no model is checked before any checkpoint file is opened; under ``torchrun`` every
rank runs the command, an error on any rank stops every rank with one message, and rank 0 alone prints and
writes.
"""

from __future__ import annotations

import json
import os
import sys

from .args import add_compile_arg, add_cuda_graphs_arg, add_generation_args, add_model_args, request_from_args

DEMO_TEXT = ("swift-i2v demo: the whole two-stage pipeline on TINY RANDOM-WEIGHT models on the CPU. "
             "The weights are random, so the video is noise-like: this shows the machinery runs, not quality.")


def add_commands(sub) -> None:
    """Add ``generate`` and ``demo`` to the CLI's subparsers."""
    g = sub.add_parser("generate", help="generate a video from an image and a prompt with real checkpoints")
    add_model_args(g)
    add_generation_args(g, frames=81, width=2560, height=1408)
    add_compile_arg(g)
    add_cuda_graphs_arg(g)
    g.set_defaults(func=run_generation)
    d = sub.add_parser("demo", help="run the whole pipeline on tiny random-weight models on the CPU")
    d.add_argument("--image", default=None, help="input image (default: a generated test pattern)")
    d.add_argument("--prompt", default="a red fox running through fresh snow, cinematic")
    d.add_argument("--stage2-kind", choices=("swift", "refine"), default="swift")
    add_generation_args(d, frames=17, width=256, height=128, need_out=False)
    add_compile_arg(d)
    add_cuda_graphs_arg(d)
    d.set_defaults(out="swift-i2v-demo.mp4", func=run_generation)
    for action in d._actions:
        if action.dest == "out":
            action.help = "output .mp4 path (default swift-i2v-demo.mp4)"


def demo_image(width: int, height: int):
    """A smooth synthetic test picture (gradients and a disc), so the demo needs no input file."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(1, width - 1)
    g = 255 * y / max(1, height - 1)
    disc = ((x - width * 0.6) ** 2 + (y - height * 0.5) ** 2) < (min(width, height) * 0.25) ** 2
    b = np.where(disc, 230, 60)
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8))


def summary(result) -> str:
    """The one line ``generate`` prints when done."""
    s = result.seconds
    parts = ", ".join(f"{k} {v:.2f}s" for k, v in s.items() if k != "total")
    compiled = result.info.get("compile")
    if compiled:  # compilation happens inside the phases: said apart, not added to them
        parts += f"; of which compiling {compiled['seconds']:.2f}s ({compiled['backend']})"
    return (f"done: {result.output} ({result.info['frames']} frames, {result.info['width']}x{result.info['height']}); "
            f"total {s['total']:.2f}s ({parts}); peak memory {result.peak_memory_bytes / 2**30:.2f} GiB "
            f"on {result.info['device']}")


def run_generation(args) -> int:
    """Run ``generate`` or ``demo``: on every rank under torchrun, one process otherwise."""
    from ..generation.distributed import check_pipeline, distribute, processes

    device = args.device or ("cpu" if args.command == "demo" else None)  # the demo runs on the CPU
    guided = args.guidance is not None and args.guidance != 1.0
    with processes(device, ulysses=getattr(args, "ulysses", None), cfg_parallel=getattr(args, "cfg_parallel", False),
                   fsdp=getattr(args, "fsdp", False), guidance=guided) as (par, device):
        error = None
        try:
            pipe, request = _load(args, device)
            check_pipeline(pipe, par)
        except (ValueError, TypeError, OSError) as exc:
            error = exc
        par.agree(error)  # every rank goes on, or every rank stops with the same message
        distribute(pipe, par)
        result = pipe.generate(request=request, progress=not args.quiet, free_text_encoder=True)
        if par.is_main:  # rank 0 alone prints and writes
            print(summary(result))
            if args.report is not None:
                with open(args.report, "w") as f:
                    json.dump(result.report(), f, indent=2)
    return 0


def _load(args, device):
    """Check the arguments and build the pipeline on ``device``: ``(pipeline, request)``."""
    from ..generation.distributed import env_rank, memory_plan
    from ..generation.pipeline import SwiftI2VPipeline
    from ..io.video import check_output_path, read_image

    # every argument that needs no model is checked before any checkpoint file is opened
    request_from_args(args, with_inputs=False)
    check_output_path(args.out)
    if args.report is not None:
        folder = os.path.dirname(os.path.abspath(args.report)) or "."
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"cannot write the report to {args.report}")
    demo = args.command == "demo"
    # --fsdp: the DiTs are loaded into host memory and distribute() moves each rank's shards to its GPU
    memory = memory_plan(getattr(args, "memory", None), getattr(args, "fsdp", False))
    if getattr(args, "cuda_graphs", False):  # refused before any checkpoint is read
        from ..generation.window_model import cuda_graphs_unavailable

        why_not = cuda_graphs_unavailable(device, memory)
        if why_not is not None:
            raise ValueError(why_not)
    image = read_image(args.image) if args.image else demo_image(args.width, args.height)
    request = request_from_args(args, image=image)
    if demo or args.tiny:
        if env_rank() == 0:
            print(DEMO_TEXT if demo else "swift-i2v: using the tiny RANDOM-WEIGHT models (--tiny).", file=sys.stderr)
        pipe = SwiftI2VPipeline.tiny(seed=0, stage2_kind=args.stage2_kind, device=device,
                                     vae_dtype=getattr(args, "vae_dtype", None), memory=memory,
                                     compile=getattr(args, "compile", False))
    else:
        if not args.stage1 or not args.stage2:
            raise ValueError("generate needs --stage1 and --stage2 checkpoint folders (or --tiny)")
        if args.prompt is None and args.prompt_embeds is None:
            raise ValueError("generate needs --prompt or --prompt-embeds")
        pipe = SwiftI2VPipeline.from_pretrained(
            args.stage1, args.stage2, stage1_lora=args.stage1_lora, lora_scale=args.lora_scale,
            stage1_lora_2=args.stage1_lora_2,
            stage2_kind=args.stage2_kind, text_encoder=args.text_encoder,
            load_text_encoder=args.prompt_embeds is None, device=device, memory=memory,
            vae_dtype=args.vae_dtype, compile=getattr(args, "compile", False))
    pipe.use_cuda_graphs(getattr(args, "cuda_graphs", False))
    pipe.check_inputs(args.frames, args.width, args.height)
    return pipe, request
