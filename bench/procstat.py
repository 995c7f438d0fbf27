"""CPU seconds and memory of a process from ``/proc`` (Linux), for the benchmark harness.

Read from outside the process so the measurement costs the bridge nothing and works the same
for the bridge, the naive baseline, Redis and the helpers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

__all__ = ["Memory", "cpu_seconds", "memory"]

_TICKS_PER_SECOND: Final = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (``/proc/<pid>/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        raw = stat.read()
    # The command name (field 2) may contain spaces; the fields after it start past its ")".
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_SECOND


@dataclass(frozen=True)
class Memory:
    rss_mb: float  #: VmRSS: resident now
    hwm_mb: float  #: VmHWM: peak resident since the process started


def memory(pid: int) -> Memory:
    """Resident and peak resident set size of ``pid`` in MiB (``/proc/<pid>/status``)."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) / 1024  # kB
    return Memory(values.get("VmRSS", 0.0), values.get("VmHWM", 0.0))
