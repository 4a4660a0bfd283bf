"""Layer 3, loading public checkpoints: DiT weights in the diffusers and original Wan formats (``checkpoint``), LoRA
merging (``lora``) and the checks that run before any weight is read (``preflight``)."""
