"""The training commands of the ``swift-i2v`` command line: ``prepare``, ``train``, ``export``.

:func:`add_commands` adds their parsers to the CLI's subparsers, each with the function that runs it; the CLI's
``main`` turns their ``ValueError``/``TypeError``/``OSError`` into one ``error: ...`` line.
Under ``torchrun`` (``torchrun --nproc-per-node N -m swift_model.cli train ...``) every rank runs the
command: ``prepare`` splits the videos over the ranks, ``train`` the batches (and, with ``--ulysses``, the
sequence).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

def _add_prepare(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prepare", help="make Stage II training data (latents, stage-transition references, "
                       "prompt embeddings) from videos",
                       description="For each video: the Stage II latents of the full-size clip, the reference z_ref "
                       "made the stage-transition way (Stage I lightly denoises the downsampled clip, then the "
                       "bridge), and the caption's prompt embeddings; one safetensors shard per clip plus "
                       "manifest.json. Rerunning completes the folder; bad or short videos are skipped.")
    p.add_argument("--videos", required=True, help="folder of videos (mp4, searched recursively)")
    p.add_argument("--captions", default=None, help="captions: JSON lines {\"video\": ..., \"caption\": ...} or a CSV "
                   "with columns video,caption (video: path relative to --videos, or the file name)")
    p.add_argument("--prompt-embeds", default=None, help="one prompt-embeddings file (.safetensors, tensor "
                   "'prompt_embeds') for every clip, instead of captions and the text encoder")
    p.add_argument("--out", required=True, help="the data folder to write (DATA_DIR)")
    p.add_argument("--stage1", default=None, help="Stage I checkpoint folder (DiT, VAE, encoders)")
    p.add_argument("--stage1-lora", default=None, help="LoRA merged into Stage I (e.g. 4-step distillation)")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--stage2", default=None, help="Stage II checkpoint folder (its VAE encodes the clips)")
    p.add_argument("--text-encoder", default=None, help="UMT5 folder (default: the Stage I folder)")
    p.add_argument("--tiny", action="store_true", help="the tiny random-weight models of the demo (no checkpoints)")
    p.add_argument("--frames", type=int, default=81, help="frames per clip, 4k+1 (default 81)")
    p.add_argument("--width", type=int, default=2560, help="clip width (default 2560)")
    p.add_argument("--height", type=int, default=1408, help="clip height (default 1408)")
    p.add_argument("--transition-sigma", type=float, default=0.5,
                   help="noise level Stage I starts its light denoising from (default 0.5)")
    p.add_argument("--transition-steps", type=int, default=0,
                   help="Stage I steps from it to 0 (default 0: those a 4-step schedule has left there)")
    p.add_argument("--shift", type=float, default=5.0, help="flow-matching shift of those steps (default 5)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--fps", type=int, default=16, help="frame rate of the clips: each video is resampled to it "
                   "(default 16, the rate generate makes; 0: every source frame); a slower video is skipped")
    p.add_argument("--allow-upscale", action="store_true", help="keep videos smaller than --width x --height "
                   "(upscaled to cover it; default: skipped with a warning)")
    p.add_argument("--latent-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="storage dtype of the latents (bfloat16 halves the disk; default float32)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_train(sub) -> argparse.ArgumentParser:
    from ..training.config import TrainConfig, field_type

    p = sub.add_parser("train", help="train the method's Stage II on prepared data (packed CSG windows)",
                       description="Train Stage II on a prepared data folder. Settings come from the defaults, "
                       "then --config FILE.toml (top-level keys named as the flags, with underscores), then the "
                       "flags below. RUN_DIR gets run.json, log.jsonl and checkpoints/; running again on the same "
                       "RUN_DIR resumes from its latest checkpoint. Before any weight is read, it prints its "
                       "per-rank memory estimate (weights, gradients, optimiser state, EMA, activations counted on "
                       "fake tensors) and stops with an error when that does not fit the device's memory.")
    p.add_argument("--data", required=True, help="prepared data folder (from swift-i2v prepare)")
    p.add_argument("--out", required=True, help="the run folder (RUN_DIR)")
    p.add_argument("--config", default=None, help="TOML file of settings")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda:LOCAL_RANK when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device-memory", type=float, default=None, metavar="GIB",
                   help="device memory in GiB to check the memory estimate against (default: the GPU's total "
                   "memory; on a CPU no check; 0: no check)")
    defaults = TrainConfig()
    helps = {
        "tiny": "train the tiny random-weight Stage II (CPU tests and demos)",
        "init": "Stage II checkpoint to start from: a public Wan2.2-TI2V-5B class folder (its input is widened, "
                "the z_ref channels starting at zero) or an exported swift Stage II",
        "steps": "optimiser steps to train to", "batch_size": "clips per micro-batch and data-parallel rank",
        "grad_accum": "micro-batches per optimiser step", "lr": "peak learning rate (AdamW)",
        "seed": "seed of the initial tiny weights, the data order, windows and noise",
        "windows_per_clip": "segment windows packed per clip (0: all)",
        "shared_anchor": "one anchor per sequence attending only itself (a departure from the paper; "
                         "generate such a network with generate --shared-anchor)",
        "timestep_sampling": "logit_normal or uniform", "compute_dtype": "auto, float32 or bfloat16",
        "ulysses": "Ulysses sequence-parallel degree (ranks per sequence)",
        "offload_optimizer": "one process: fp32 master weights, gradient sums and AdamW state in host memory, the "
                             "AdamW step on the host, the network on the GPU in the compute dtype (bf16: 2 instead "
                             "of 16 bytes per parameter on the device; about 16-20 bytes per parameter of host "
                             "memory); lets one 80 GB GPU train the 5B Stage II",
        "eval_data": "prepared data folder of held-out clips", "eval_every": "evaluate the held-out loss every N steps",
    }
    for f in dataclasses.fields(TrainConfig):
        tp = field_type(f.name)
        default = getattr(defaults, f.name)
        text = f"{helps.get(f.name, f.name.replace('_', ' '))} (default {default!r})"
        if tp is bool:
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(_flag(f.name), dest=f.name, type=tp, default=None, help=text, metavar=tp.__name__.upper())
    return p


def _add_export(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a training run's Stage II as a checkpoint folder for generate",
                       description="RUN_DIR -> a diffusers-layout folder (transformer/ and the Stage II vae/) that "
                       "swift-i2v generate --stage2 FOLDER --stage2-kind swift loads.")
    p.add_argument("--run", required=True, help="the training run folder (RUN_DIR)")
    p.add_argument("--out", required=True, help="the checkpoint folder to create")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="export the EMA weights (default: when the run kept them)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weight dtype (default float32, the master weights)")
    p.add_argument("--vae", default=None, help="Stage II VAE to put beside it (default: the one of the run's data)")
    p.add_argument("--no-vae", action="store_true", help="write the transformer only")
    return p


def _add_train_lora(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train-lora", help="train a LoRA of Stage I at its low resolution (for generate --stage1-lora)",
                       description="Flow-matching LoRA training of the Stage I DiT on videos at the Stage I size (a "
                       "quarter of the output per side), conditioned on each clip's first frame as generate's Stage I "
                       "is. Writes a LoRA file (kohya-style factors) that generate --stage1-lora merges.")
    p.add_argument("--videos", required=True, help="folder of videos (mp4, searched recursively)")
    p.add_argument("--captions", default=None, help="captions: JSON lines or CSV, as for prepare")
    p.add_argument("--prompt-embeds", default=None, help="one prompt-embeddings file for every clip, instead of "
                   "captions and the text encoder")
    p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument("--stage1", default=None, help="Stage I checkpoint folder (DiT, VAE, encoders)")
    p.add_argument("--text-encoder", default=None, help="UMT5 folder (default: the Stage I folder)")
    p.add_argument("--tiny", action="store_true", help="the tiny random-weight Stage I of the demo (no checkpoints)")
    p.add_argument("--frames", type=int, default=81, help="frames per clip, 4k+1 (default 81)")
    p.add_argument("--width", type=int, default=640, help="Stage I width: the output width / 4 (default 640)")
    p.add_argument("--height", type=int, default=352, help="Stage I height: the output height / 4 (default 352)")
    p.add_argument("--fps", type=int, default=16, help="frame rate of the clips: each video is resampled to it "
                   "(default 16, the rate generate makes; 0: every source frame); a slower video is skipped")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps, one clip each (default 1000)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--shift", type=float, default=5.0, help="timestep shift of the sampled noise levels (default 5)")
    p.add_argument("--timestep-sampling", choices=("logit_normal", "uniform"), default="logit_normal")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter's start, the clip order and the noise")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def add_commands(sub) -> None:
    """Add ``prepare``, ``train``, ``export`` and ``train-lora`` to the CLI's subparsers."""
    for add, run in ((_add_prepare, _run_prepare), (_add_train, _run_train), (_add_export, _run_export),
                     (_add_train_lora, _run_train_lora)):
        add(sub).set_defaults(func=run)


def _device(name):
    """The device of this process for ``--device`` (``None``: the command's default). Under torchrun ``cuda``
    means ``cuda:LOCAL_RANK`` (and becomes the current device), so the ranks never share GPU 0; naming one GPU
    for several ranks is an error."""
    import torch

    from ..generation.distributed import resolve_device, torchrun_env

    if name is None:
        return None
    device = resolve_device(name, torchrun_env())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _run_prepare(args) -> int:
    import torch.distributed as dist

    from ..training.prepare import PrepareSettings, load_prepare_models, prepare
    from ..training.trainer import default_device, distributed_run

    if args.captions is None and args.prompt_embeds is None:
        raise ValueError("prepare needs --captions (with the text encoder) or --prompt-embeds")
    if args.tiny and (args.stage1 or args.stage2):
        raise ValueError("use --tiny or --stage1/--stage2, not both")
    settings = PrepareSettings(frames=args.frames, width=args.width, height=args.height,
                               transition_sigma=args.transition_sigma, transition_steps=args.transition_steps,
                               shift=args.shift, seed=args.seed, latent_dtype=args.latent_dtype,
                               fps=args.fps, allow_upscale=args.allow_upscale)
    settings.check()
    device = _device(args.device) or default_device()
    # a process group only for torchrun (the ranks split the videos and meet at a barrier): gloo is enough
    with distributed_run(device, single_rank=False, backend="gloo"):
        models = load_prepare_models(stage1=args.stage1, stage2=args.stage2, stage1_lora=args.stage1_lora,
                                     lora_scale=args.lora_scale, text_encoder=args.text_encoder,
                                     need_text_encoder=args.prompt_embeds is None, tiny=args.tiny, device=device)
        result = prepare(args.videos, args.out, models, settings, captions=args.captions,
                         prompt_embeds=args.prompt_embeds, progress=not args.quiet)
        rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        print(f"prepared {len(result['clips'])} clips into {args.out} ({len(result['skipped'])} skipped); "
              f"latents {tuple(result['latent'].values())}")
    return 0


def _device_memory(args, device) -> tuple[int | None, str]:
    """``(bytes, name)`` of the memory the estimate is checked against: ``--device-memory`` (GiB; 0: none), else
    the GPU's total memory (``torch.cuda.get_device_properties``), else none (a CPU)."""
    import torch

    if args.device_memory is not None:
        if not args.device_memory >= 0:
            raise ValueError(f"--device-memory must be >= 0 (GiB), got {args.device_memory}")
        return (int(args.device_memory * 2**30) or None), f"the device (--device-memory {args.device_memory:g})"
    if device.type != "cuda":
        return None, str(device)
    props = torch.cuda.get_device_properties(device)
    return int(props.total_memory), f"{device} ({props.name})"


def check_training_memory(config, args, device):
    """Print the run's per-rank memory estimate (rank 0) and raise ``ValueError`` when it does not fit the
    device; reads the data's manifest and the checkpoint's headers, no weight. Returns the estimate."""
    from ..generation.distributed import AgreedError, env_rank, torchrun_world_size
    from ..planning.training_step import training_activation_bytes
    from ..training.dataset import PreparedData
    from ..training.memory import check_fits, estimate_training_memory, host_memory_bytes
    from ..training.trainer import stage2_config

    data = PreparedData.open(args.data)
    model_config, _ = stage2_config(config, data.latent_shape[0], data.text_dim)
    estimate = estimate_training_memory(config, model_config, data.latent_shape, world=torchrun_world_size(),
                                        device_type=device.type, activations=training_activation_bytes)
    if env_rank() == 0:
        print(estimate.summary(), flush=True)
    memory, name = _device_memory(args, device)
    if memory is not None:
        try:
            check_fits(estimate, config, memory, name, host_memory_bytes() if estimate.mode == "offload" else None)
        except ValueError as exc:  # every rank computes the same estimate: one line, printed once
            raise AgreedError(str(exc)) from None
    return estimate


def _run_train(args) -> int:
    from ..training.trainer import default_device, train
    from ..training.config import TrainConfig, make_config

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    config = make_config(args.config, {n: getattr(args, n) for n in names})
    device = _device(args.device) or default_device()
    check_training_memory(config, args, device)
    last = train(config, args.data, args.out, device=device, progress=not args.quiet)
    if last and int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {last.get('step')}: " + json.dumps({k: v for k, v in last.items() if k != 'time'}))
    return 0


def _run_export(args) -> int:
    from ..training.export import export

    if args.no_vae and args.vae:
        raise ValueError("use --vae or --no-vae, not both")
    info = export(args.run, args.out, step=args.step, ema=args.ema, dtype=args.dtype, vae=args.vae,
                  with_vae=not args.no_vae)
    print(f"exported step {info['step']} ({info['weights']} weights) to {info['folder']}")
    return 0


def _run_train_lora(args) -> int:
    from ..training.stage1_lora import encode_clip, train_stage1_lora
    from ..training.prepare import _to_clip, list_videos, load_prepare_models, read_captions, read_frames
    from ..training.trainer import default_device

    if args.captions is None and args.prompt_embeds is None:
        raise ValueError("train-lora needs --captions (with the text encoder) or --prompt-embeds")
    if args.tiny and args.stage1:
        raise ValueError("use --tiny or --stage1, not both")
    out = os.fspath(args.out)
    if not out.endswith(".safetensors"):
        raise ValueError(f"--out must be a .safetensors file, got {out}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write the LoRA to {out}: no writable folder {folder}")
    for name in ("rank", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.fps < 0:
        raise ValueError(f"--fps must be >= 0 (0: every source frame), got {args.fps}")
    names = list_videos(args.videos)
    if not names:
        raise ValueError(f"no video files in {args.videos}")
    device = _device(args.device) or default_device()
    models = load_prepare_models(stage1=args.stage1, text_encoder=args.text_encoder, need_stage2=False,
                                 need_text_encoder=args.prompt_embeds is None, tiny=args.tiny, device=device)
    models.vae1.check_size(args.frames, args.height, args.width)
    if args.prompt_embeds is not None:
        from ..nets.encoders import load_prompt_embeds

        fixed, captions = load_prompt_embeds(os.fspath(args.prompt_embeds)), {}
    else:
        fixed, captions = None, read_captions(args.captions)
    clips = []
    for name in names:
        caption = captions.get(name, captions.get(name.rsplit("/", 1)[-1]))
        try:
            if fixed is None and caption is None:
                raise ValueError(f"no caption for it in {args.captions}")
            frames = read_frames(os.path.join(os.fspath(args.videos), name), args.frames, args.fps)
        except ValueError as exc:
            print(f"warning: skipped {name}: {exc}", file=sys.stderr)
            continue
        context = fixed if fixed is not None else models.text_encoder.encode(caption)
        if context.shape[-1] != models.stage1.config.text_dim:
            raise ValueError(f"the prompt embeddings are {context.shape[-1]}-wide, the Stage I DiT takes "
                             f"{models.stage1.config.text_dim}")
        clips.append(encode_clip(models.stage1, models.vae1, _to_clip(frames, args.width, args.height), context,
                                 models.image_encoder))
    if not clips:
        raise ValueError(f"no usable video in {args.videos}")
    adapters, losses = train_stage1_lora(models.stage1, clips, rank=args.rank, alpha=args.alpha, steps=args.steps,
                                         lr=args.lr, seed=args.seed, shift=args.shift,
                                         timestep_sampling=args.timestep_sampling, progress=not args.quiet)
    adapters.save(out)
    k = max(1, len(losses) // 10)
    print(f"trained a rank-{adapters.rank} Stage I LoRA on {len(clips)} clips for {len(losses)} steps (loss "
          f"{sum(losses[:k]) / k:.4f} -> {sum(losses[-k:]) / k:.4f}); wrote {out}")
    return 0
