"""``bridge run`` with the cyclic GC tuned the way docs/performance.md recommends.

Experiment, not product code: it shows what moving three lines into ``bridge.service.run``
would gain. Everything is imported first so the start-up objects go into the permanent
generation (``gc.freeze``) and are never traversed again; the young-generation threshold is
raised so ticks waiting for their publish batch die young instead of being promoted.

Run: ``.venv/bin/python -m bench.e2e throughput \\
--bridge-command ".venv/bin/python -m bench.experiments.gc_tuned_bridge"``
"""

from __future__ import annotations

import gc
import sys

import bridge.cli
import bridge.service  # imported before gc.freeze(), like everything the loop needs

__all__ = ["main"]

#: Young generation every 50,000 net allocations (default 700); the older ones as default-ish.
THRESHOLDS = (50_000, 20, 100)


def main() -> int:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    return bridge.cli.main(["run"])


if __name__ == "__main__":
    sys.exit(main())
