"""swift_model: the two-stage SwiftI2V network on swift_kernels.

- The DiT: a Wan2.1/Wan2.2-compatible transformer (``WanDiT``, ``WanDiTConfig``), checkpoint loading in
  the diffusers and original Wan formats, LoRA merging.
- The pipeline: Stage I (motion at 360P), the hybrid reference, Stage II by Conditional Segment-wise
  Generation, the Wan VAEs, the encoders, mp4 output and the ``swift-i2v`` command line.

The pipeline names are imported on first use, so ``import swift_model`` for the DiT alone does not load
diffusers' VAE code or transformers' encoders.

One folder per layer, each importing only earlier ones (``tests/test_layering.py`` checks it): ``io`` (key
naming, weight and config files, video) -> ``nets`` (the DiT, VAEs, encoders, parallel layers, ``ModelSpec``)
-> ``loading`` (checkpoints, LoRA, the checks before any weight is read) -> ``generation`` (the request, CSG,
the memory plan, several processes, the pipeline) -> ``planning`` and ``training`` (siblings) -> ``cli``.
This package ``__init__`` is the facade on top; importing it imports the loading layer, which registers the
loader behind ``WanDiT.from_pretrained``.
"""

import importlib

from .loading.checkpoint import DiTCheckpoint, inspect_dit, load_dit, load_state_dict, read_dit_config, save_dit
from .nets.config import WanDiTConfig
from .nets.dit import ContextCache, WanDiT
from .io.files import CheckpointError, CheckpointNotFoundError
from .io.keys import to_diffusers_keys, to_wan_keys
from .loading.lora import load_lora, merge_lora

# name -> submodule that defines it (imported lazily, see __getattr__)
_LAZY = {
    "SwiftI2VPipeline": "generation.pipeline",
    "GenerationResult": "generation.pipeline",
    "GenerationRequest": "generation.request",
    "MemoryPlan": "generation.memory",
    "ModelSpec": "nets.spec",
    "CSGPlan": "generation.csg",
    "CSGWindow": "generation.csg",
    "run_csg": "generation.csg",
    "flow_steps": "generation.csg",
    "WanVAE": "nets.vae",
    "TextEncoder": "nets.encoders",
    "ImageEncoder": "nets.encoders",
    "load_prompt_embeds": "nets.encoders",
    "save_prompt_embeds": "nets.encoders",
    "hybrid_reference": "generation.bridge",
    "read_image": "io.video",
    "write_mp4": "io.video",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "ContextCache",
    "DiTCheckpoint",
    "WanDiT",
    "WanDiTConfig",
    "inspect_dit",
    "load_dit",
    "load_lora",
    "load_state_dict",
    "merge_lora",
    "read_dit_config",
    "save_dit",
    "to_diffusers_keys",
    "to_wan_keys",
    *sorted(_LAZY),
]
