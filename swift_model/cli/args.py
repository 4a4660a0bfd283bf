"""The arguments ``generate``, ``demo`` and ``plan`` share, and the request they make: one definition each.

A generation's settings are the fields of :class:`~swift_model.generation.request.GenerationRequest`;
:func:`request_from_args` builds one from parsed arguments (its checks are the request's own, so the command line
and the Python API reject the same values with the same messages).
"""

from __future__ import annotations

import argparse

from ..generation.memory import PROFILES
from ..generation.request import GenerationRequest
from ..nets.spec import STAGE2_KINDS


def add_generation_args(p: argparse.ArgumentParser, *, frames: int, width: int, height: int, need_out: bool = True,
                        hidden: bool = False, out: bool = True) -> None:
    """The arguments of every generation (``generate``, ``plan``, ``demo``, ``batch``). ``hidden``: accepted
    without help (``plan`` takes a ``generate`` command line as is; the arguments that do not change its estimate
    are hidden there). ``out=False``: no ``--out`` (``batch`` names its videos after the jobs)."""
    hide = dict(help=argparse.SUPPRESS) if hidden else {}
    if out:
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
    p.add_argument("--guidance-2", type=float, default=None,
                   help="a two-expert Stage I's (Wan2.2-I2V-A14B) guidance on its low-noise expert's steps "
                        "(diffusers' guidance_scale_2; default: --guidance; needs --guidance)")
    p.add_argument("--negative-prompt", default="", **(hide or dict(help="negative prompt of the guidance "
                                                                         "(default: empty)")))
    p.add_argument("--shared-anchor", action="store_true",
                   help="Stage II: the anchor frame attends only itself in every window, for Stage II networks "
                        "trained with shared_anchor (a departure from the paper; default off); its keys and "
                        "values are computed once and reused")


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    """``--compile`` (``generate`` and ``demo``): ``SwiftI2VPipeline(..., compile=True)``."""
    p.add_argument("--compile", action="store_true",
                   help="compile both DiTs regionally with torch.compile (one compiled block reused by every "
                        "block); compiling takes seconds to minutes on the first run of each shape, counted in "
                        "--report under 'compile'")


def add_cuda_graphs_arg(p: argparse.ArgumentParser) -> None:
    """``--cuda-graphs`` (``generate`` and ``demo``): ``SwiftI2VPipeline(..., cuda_graphs=True)``."""
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the Stage II window call in CUDA graphs, once per window shape, and replay it for "
                        "every window and step (one process on a CUDA GPU, memory profile fast or balanced; "
                        "untested on a GPU)")


def _cfg_degree(text: str) -> bool:
    """``--cfg-degree``'s value as the ``cfg_parallel`` flag it sets (1: off, 2: on)."""
    if text.strip() not in ("1", "2"):
        raise argparse.ArgumentTypeError(f"must be 1 or 2 (the two guidance branches), got {text!r}")
    return text.strip() == "2"


def add_parallel_args(p: argparse.ArgumentParser, *, plan: bool = False, batch: bool = False) -> None:
    """``--ulysses-degree``, ``--cfg-degree``, ``--fsdp`` (``generate`` and ``batch`` under torchrun; ``plan``
    with ``--world-size``). The degrees are named as other video generators name them; ``--ulysses`` and
    ``--cfg-parallel`` (= ``--cfg-degree 2``) are kept as aliases, with the same ``args`` (``ulysses``,
    ``cfg_parallel``)."""
    n = "--world-size N" if plan else "N"
    group = p.add_argument_group("several GPUs (the estimate of one rank of N)" if plan else
                                 "several GPUs (under torchrun --nproc-per-node N)")
    if plan:
        group.add_argument("--world-size", type=int, default=1,
                           help="estimate one rank (rank 0) of a torchrun --nproc-per-node N run (default 1)")
    default = ("1: each rank makes its own videos; K: K ranks make each video together" if batch else
               f"all {n}, or half of them with --cfg-degree 2")
    group.add_argument("--ulysses-degree", "--ulysses", dest="ulysses", type=int, default=None,
                       help=f"ranks that split each DiT call's tokens and attention heads (default: {default}); "
                            f"must divide {n} and both DiTs' head counts")
    group.add_argument("--cfg-degree", dest="cfg_parallel", type=_cfg_degree, default=False, metavar="{1,2}",
                       help=f"2: run the conditional and unconditional guidance branches on two halves of the "
                            f"ranks (needs --guidance and an even {n}; default 1)")
    group.add_argument("--cfg-parallel", dest="cfg_parallel", action="store_true", help="the same as --cfg-degree 2")
    group.add_argument("--fsdp", action="store_true",
                       help=f"shard both DiTs' blocks over the {n} ranks (FSDP2): they are loaded into host memory "
                            "and each rank moves only its shards to its GPU; needs --memory fast (its default)")


def add_model_args(p: argparse.ArgumentParser, *, plan: bool = False, batch: bool = False) -> None:
    """The models of a generation and where they live (``generate``, ``batch`` and ``plan``: ``plan`` reads the
    folders' configs only; ``batch`` takes its images from the job file, so it has no ``--image``)."""
    only = " (its configs are read, no weights)" if plan else ""
    p.add_argument("--stage1", default=None, help=f"Stage I checkpoint folder (Wan2.1-I2V-14B class, or Wan2.2-I2V-A14B: both "
                   f"experts){only}")
    p.add_argument("--stage2", default=None, help=f"Stage II checkpoint folder (Wan2.2-TI2V-5B class){only}")
    p.add_argument("--stage2-kind", choices=STAGE2_KINDS, default="refine")
    p.add_argument("--text-encoder", default=None, help="UMT5 folder (default: the Stage I folder)")
    p.add_argument("--prompt-embeds", default=None,
                   help="precomputed prompt embeddings (.safetensors, tensor 'prompt_embeds'), instead of running "
                        "the text encoder")
    p.add_argument("--memory", choices=tuple(PROFILES), default=None,
                   help="what stays on the GPU: " + "; ".join(f"{name}: {prof.summary}"
                                                              for name, prof in PROFILES.items()))
    p.add_argument("--tiny", action="store_true", help="use the tiny random-weight models (no checkpoints)")
    p.add_argument("--vae-dtype", choices=("bf16", "fp32"), default=None,
                   help="dtype of the VAEs (default: bf16 on a GPU, fp32 on the CPU)")
    hide = dict(help=argparse.SUPPRESS) if plan else {}
    if not batch:
        p.add_argument("--image", required=not plan, **(hide or dict(help="input image (any format Pillow reads)")))
    p.add_argument("--prompt", default=None, **(hide or dict(help="text prompt (needs the text encoder)")))
    p.add_argument("--negative-prompt-embeds", default=None,
                   **(hide or dict(help="precomputed negative prompt embeddings (.safetensors) for --guidance "
                                        "without the text encoder")))
    p.add_argument("--stage1-lora", default=None,
                   **(hide or dict(help="LoRA merged into Stage I (e.g. 4-step distillation); for a two-expert "
                                        "Stage I (Wan2.2-I2V-A14B), into its high-noise expert")))
    p.add_argument("--stage1-lora-2", default=None,
                   **(hide or dict(help="LoRA merged into a two-expert Stage I's low-noise expert (e.g. the "
                                        "low-noise file of LightX2V's 4-step pair)")))
    p.add_argument("--lora-scale", type=float, default=1.0, **hide)
    add_parallel_args(p, plan=plan, batch=batch)


def request_from_args(args, *, image=None, with_inputs: bool = True) -> GenerationRequest:
    """The :class:`~swift_model.generation.request.GenerationRequest` of parsed generation arguments; checked as
    the request checks itself (``--guidance`` must be > 0; 1 is off). ``with_inputs=False``: the settings only
    (a plan needs no image or prompt)."""
    if args.guidance is not None and not args.guidance > 0:
        raise ValueError(f"--guidance must be > 0, got {args.guidance}")
    guidance_2 = getattr(args, "guidance_2", None)
    if guidance_2 is not None and not guidance_2 > 0:
        raise ValueError(f"--guidance-2 must be > 0, got {guidance_2}")
    if guidance_2 is not None and (args.guidance is None or args.guidance == 1.0):
        raise ValueError("--guidance-2 needs --guidance (with the guidance off, no step runs its unconditional "
                         "branch)")
    inputs = {}
    if with_inputs:
        inputs = dict(image=image, prompt=getattr(args, "prompt", None),
                      prompt_embeds=getattr(args, "prompt_embeds", None), negative_prompt=args.negative_prompt,
                      negative_prompt_embeds=getattr(args, "negative_prompt_embeds", None),
                      output=getattr(args, "out", None), fps=args.fps)
    return GenerationRequest(frames=args.frames, width=args.width, height=args.height, steps=args.steps,
                             shift=args.shift, seed=args.seed, step_mode=args.step_mode, guidance_scale=args.guidance,
                             guidance_scale_2=guidance_2,
                             segment_blocks=args.segment_blocks, neighbors=args.neighbors, joint=args.joint,
                             start_sigma=args.start_sigma, shared_anchor=args.shared_anchor, **inputs)
