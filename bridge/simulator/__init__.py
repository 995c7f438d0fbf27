"""A local, protocol-faithful Kite ticker server (kite-protocol §9, CONTRACT §8).

``Simulator`` is the importable server used by tests and benchmarks; ``Market`` is its pure,
seedable price model; ``bridge.simulator.cli`` runs it as ``bridge simulate``.
"""

from __future__ import annotations

from bridge.simulator.market import Instrument, Market
from bridge.simulator.server import (
    HEARTBEAT,
    ConnectionState,
    FrameHook,
    HandshakeRecord,
    Simulator,
    sample_order,
)

__all__ = [
    "HEARTBEAT",
    "ConnectionState",
    "FrameHook",
    "HandshakeRecord",
    "Instrument",
    "Market",
    "Simulator",
    "sample_order",
]
