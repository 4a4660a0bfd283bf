"""``python -m swift_model.cli``: the ``swift-i2v`` command line (``torchrun ... -m swift_model.cli`` uses it)."""

import sys

from .main import main

sys.exit(main())
