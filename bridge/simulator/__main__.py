"""``python -m bridge.simulator``: the same as ``bridge simulate``."""

from __future__ import annotations

import sys

from bridge.simulator.cli import main

sys.exit(main())
