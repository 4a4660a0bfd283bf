"""Layer 6, the ``swift-i2v`` command line (``python -m swift_model.cli`` runs it too)."""

from .main import main

__all__ = ["main"]
