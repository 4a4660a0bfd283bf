"""``swift-i2v plan``: a memory (device and host) and FLOP estimate per phase of a ``generate`` run, on fake
tensors (no GPU, no weights read). It takes ``generate``'s command line as is and checks it as ``generate`` does."""

from __future__ import annotations

import json

from .args import add_generation_args, add_model_args, request_from_args


def add_commands(sub) -> None:
    """Add ``plan`` to the CLI's subparsers."""
    pl = sub.add_parser("plan", help="estimate device memory, host memory (RAM), FLOPs and host-to-device bytes "
                        "per phase of a generate run, on fake tensors (no GPU, no weights read); takes generate's "
                        "arguments")
    add_model_args(pl, plan=True)
    # generate's arguments that do not change the estimate are accepted (hidden), so a command line plans as is
    add_generation_args(pl, frames=81, width=2560, height=1408, need_out=False, hidden=True)
    pl.add_argument("--stage1-preset", default=None, help="a built-in Stage I architecture instead of a folder "
                    "(e.g. wan2.1-i2v-14b; wan2.2-i2v-a14b: both experts, one on the GPU at a time but under "
                    "fast)")
    pl.add_argument("--stage2-preset", default=None, help="a built-in Stage II architecture (e.g. wan2.2-ti2v-5b)")
    pl.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    pl.set_defaults(func=run_plan)


def _spec(args):
    """The models to plan: the tiny ones, checkpoint folders' configs, or presets."""
    from ..loading.preflight import checkpoint_spec
    from ..nets.spec import ModelSpec

    if args.tiny:
        return ModelSpec.tiny(args.stage2_kind)
    if args.stage1 or args.stage2:
        if not (args.stage1 and args.stage2):
            raise ValueError("plan needs both --stage1 and --stage2 folders (or presets, or --tiny)")
        return checkpoint_spec(args.stage1, args.stage2, stage2_kind=args.stage2_kind, text_encoder=args.text_encoder,
                               load_text_encoder=args.prompt_embeds is None)
    return ModelSpec.preset(args.stage1_preset or "wan2.1-i2v-14b", args.stage2_preset or "wan2.2-ti2v-5b",
                            stage2_kind=args.stage2_kind, text_encoder=args.prompt_embeds is None)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def run_plan(args) -> int:
    """Run ``plan``: the estimate as a table (or one JSON object with ``--json``)."""
    from ..generation.distributed import check_fsdp_memory, resolve_degrees
    from ..planning.planner import plan_generation

    request = request_from_args(args, with_inputs=False)
    # the layout, as generate checks it, before any config is read
    resolve_degrees(args.world_size, ulysses=args.ulysses, cfg_parallel=args.cfg_parallel, fsdp=args.fsdp,
                    guidance=request.guided)
    check_fsdp_memory(args.fsdp, args.memory)
    result = plan_generation(_spec(args), request, memory=args.memory, vae_dtype=args.vae_dtype,
                             world_size=args.world_size, ulysses=args.ulysses, cfg_parallel=args.cfg_parallel,
                             fsdp=args.fsdp)
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
    print(f"{'phase':<14} {peak:>9} {'TFLOP':>10} {'to device GiB':>14} {'host GiB':>9} {'mapped GiB':>11}")
    print(f"{'loading':<14} {'':>9} {'':>10} {'':>14} {_gib(i['host_load_bytes']):>9}")
    for name, p in result.phases.items():
        print(f"{name:<14} {_gib(p['peak_bytes']):>9} {p['flops'] / 1e12:>10.1f} {_gib(p['h2d_bytes']):>14} "
              f"{_gib(p['host_peak_bytes']):>9} {_gib(p['mapped_bytes']):>11}")
    print(f"{'whole run':<14} {_gib(result.peak_bytes):>9} {result.flops / 1e12:>10.1f} {'':>14} "
          f"{_gib(result.host_peak_bytes):>9}")
    print("host: pageable and page-locked memory of the process's tensors; mapped: weight-file pages read through a "
          "memory map (the OS page cache, not resident memory)")
    print("not counted: the CUDA context, library workspaces, allocator fragmentation, the Python process itself "
          "(about 1-3 GiB of host memory)")
    return 0
