"""Layer 5, training: Stage II on packed CSG windows (``packing``, ``dataset``, ``config``, ``trainer``, ``prepare``,
``transition``, ``export``) and Stage I's low-resolution LoRA (``stage1_lora``)."""
