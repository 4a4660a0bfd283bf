"""``swift-i2v export``: a training run -> a Stage II checkpoint folder for ``generate``.

The folder has the diffusers pipeline layout that :meth:`WanDiT.from_pretrained` and ``swift-i2v generate
--stage2 FOLDER --stage2-kind swift`` read::

    FOLDER/transformer/config.json, diffusion_pytorch_model.safetensors    the trained DiT (widened input)
    FOLDER/vae/                                                           the Stage II VAE the data was made with

The weights are read from the run's latest (or a chosen) ``torch.distributed.checkpoint`` in one process,
whatever world size wrote it; the EMA weights when the run kept them (unless asked otherwise).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..loading.checkpoint import save_dit
from .dataset import read_folder_json
from ..nets.dit import WanDiT
from .trainer import CHECKPOINTS, RUN_FILE, checkpoint_steps, model_config_from_dict, quiet_single_process_dcp

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def read_run(run_dir) -> dict:
    """The ``run.json`` of a run directory (``FileNotFoundError``/``ValueError`` naming what is missing)."""
    run, path = read_folder_json(run_dir, RUN_FILE, kind="run folder", hint="not a swift-i2v training run")
    try:
        model_config_from_dict(run["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} holds no usable model config: {exc}") from None
    return run


def load_trained(run_dir, *, step: int | None = None, ema: bool | None = None) -> tuple[WanDiT, dict]:
    """The trained Stage II network of a run (fp32, CPU, eval mode) and a description of what was loaded.

    ``step``: the checkpoint (default: the latest); ``ema``: the EMA weights (default: when the run kept them;
    ``True`` without them raises)."""
    import torch.distributed.checkpoint as dcp

    run_dir = Path(os.fspath(run_dir))
    run = read_run(run_dir)
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise ValueError(f"{run_dir} has no checkpoint yet")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{run_dir} has no checkpoint of step {step} (it has {steps})")
    folder = run_dir / CHECKPOINTS / f"step-{step:07d}"
    keys = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    has_ema = any(k.startswith("ema.") for k in keys)
    if ema is None:
        ema = has_ema
    elif ema and not has_ema:
        raise ValueError(f"{folder} has no EMA weights (the run had ema = false)")
    with torch.device("meta"):
        model = WanDiT(model_config_from_dict(run["model"]))
    model.to_empty(device="cpu")
    part = "ema" if ema else "model"
    state = {part: {n: p.detach() for n, p in model.named_parameters()}}
    with quiet_single_process_dcp():  # one process reads a checkpoint of any world size
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return model.eval().requires_grad_(False), {"step": step, "weights": part, "checkpoint": str(folder)}


def _write_vae(source: str, folder: Path) -> None:
    """The Stage II VAE of ``source`` (``"tiny"``, a diffusers folder or an original Wan file/folder) as a
    diffusers ``vae/`` folder."""
    if source == "tiny":
        from ..generation.pipeline import SwiftI2VPipeline

        SwiftI2VPipeline.tiny(seed=0, device="cpu").vae2.model.save_pretrained(str(folder))
        return
    from ..nets.vae import WanVAE, locate_vae

    layout, path = locate_vae(source)
    if layout == "diffusers":
        shutil.copytree(path, folder)
    else:
        WanVAE.from_pretrained(path, device="cpu").model.save_pretrained(str(folder))


def export(run_dir, out, *, step: int | None = None, ema: bool | None = None, dtype: str = "float32",
           vae: str | None = None, with_vae: bool = True) -> dict:
    """Write the run's trained network as a Stage II checkpoint folder ``out`` (see the module docstring).

    Args:
        run_dir: the training run.
        out: the folder to create (must not exist yet; written under a temporary name and renamed).
        step, ema: which weights (see :func:`load_trained`).
        dtype: ``"float32"`` (the master weights, nothing lost) or ``"bfloat16"`` (the parameters Wan keeps in
            fp32 stay fp32).
        vae: the Stage II VAE to copy beside it (default: the one the run's data was prepared with).
        with_vae: False to write the transformer alone.

    Returns a description (``step``, ``weights``, ``folder``).
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    out = Path(os.fspath(out))
    if out.exists():
        raise ValueError(f"{out} exists already: export writes a new folder")
    if not out.parent.is_dir():
        raise ValueError(f"the folder of {out} does not exist")
    model, info = load_trained(run_dir, step=step, ema=ema)
    source = vae or read_run(run_dir).get("data_settings", {}).get("stage2_vae")
    if with_vae and not source:
        raise ValueError("the run does not record its Stage II VAE: pass --vae PATH (or --no-vae)")
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        save_dit(model.to_dtype(EXPORT_DTYPES[dtype]), tmp / "transformer")
        if with_vae:
            _write_vae(source, tmp / "vae")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {**info, "folder": str(out), "vae": source if with_vae else None}
