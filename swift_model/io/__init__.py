"""Layer 1, reading and writing files: checkpoint key naming (``keys``), weight and config files (``files``),
images and mp4 video (``video``). Imports nothing else of ``swift_model``."""
