"""Layer 2, the networks: the DiT (``dit``) and its config (``config``), the Wan VAEs (``vae``) and their tiling
(``vae_tiling``, ``vae_parallel``), the text and image encoders (``encoders``), the DiT's sequence-parallel and
FSDP2 layers (``parallel``). Imports only :mod:`swift_model.io`."""
