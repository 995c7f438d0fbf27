"""``python -m bridge``: the same as the ``bridge`` console script."""

from __future__ import annotations

from bridge.process import main

main()
