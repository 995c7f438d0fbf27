"""Top functions of a py-spy ``--format raw`` (collapsed stacks) profile, as plain text.

The same file opens in https://www.speedscope.app (it reads collapsed stacks), so one
recording serves both the flame graph and the table in docs/performance.md.

Run: ``.venv/bin/python -m bench.profile_summary bridge.collapsed.txt [--top 25]``
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable
from typing import Final

__all__ = ["main", "summarise"]

#: ``function (path/to/file.py:123)`` -> ``function (file.py)``: lines differ per sample.
_FRAME: Final = re.compile(r"^(?P<name>.*?) \((?P<path>[^():]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    """The function and the last two parts of its path: enough to tell modules apart."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['name']} ({'/'.join(match['path'].split('/')[-2:])})"


def summarise(lines: Iterable[str]) -> tuple[int, Counter[str], Counter[str]]:
    """(samples, self samples per function, inclusive samples per function)."""
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return total, own, inclusive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with open(args.path) as profile:
        total, own, inclusive = summarise(profile)
    if not total:
        print("no samples")
        return 1
    print(f"{total} samples (CPU only: py-spy leaves out idle threads)")
    for title, table in (("self", own), ("inclusive", inclusive)):
        print(f"\ntop {args.top} by {title} time")
        for name, count in table.most_common(args.top):
            print(f"{100 * count / total:6.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
