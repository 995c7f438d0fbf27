"""Hypothesis strategies of Kite ticker packets (kite-protocol.md §3), for the codec's tests.

Packets are raw bytes, built with ``struct`` independently of the codec: every valid packet kind
with any value the wire can carry, in any segment, and packets of the lengths no kind has.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

__all__ = [
    "INT32",
    "KNOWN_LENGTHS",
    "SEGMENTS",
    "TOKENS",
    "UINT16",
    "UINT32",
    "UNKNOWN_PACKETS",
    "VALID_PACKETS",
]

KNOWN_LENGTHS = {8, 28, 32, 44, 184}

INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
UINT16 = st.integers(0, 2**16 - 1)
SEGMENTS = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 12]), st.integers(0, 255))
TOKENS = st.builds(lambda high, segment: (high << 8) | segment, st.integers(0, 2**24 - 1), SEGMENTS)


@st.composite
def index_packets(draw: st.DrawFn, full: bool) -> bytes:
    token = draw(TOKENS)
    ltp, high, low, open_, close = (draw(INT32) for _ in range(5))
    # A valid index packet carries raw ltp - raw close (two's complement) as its change field.
    change = (ltp - close + 2**31) % 2**32 - 2**31
    packet = struct.pack(">Iiiiiii", token, ltp, high, low, open_, close, change)
    return packet + struct.pack(">I", draw(UINT32)) if full else packet


def quote_fields(draw: st.DrawFn) -> bytes:
    return struct.pack(
        ">IiIiIIIiiii",
        draw(TOKENS),
        draw(INT32),
        draw(UINT32),
        draw(INT32),
        draw(UINT32),
        draw(UINT32),
        draw(UINT32),
        *(draw(INT32) for _ in range(4)),
    )


@st.composite
def quote_packets(draw: st.DrawFn) -> bytes:
    return quote_fields(draw)


@st.composite
def full_packets(draw: st.DrawFn) -> bytes:
    head = quote_fields(draw) + struct.pack(">IIIII", *(draw(UINT32) for _ in range(5)))
    depth = b"".join(
        struct.pack(">IiH2x", draw(UINT32), draw(INT32), draw(UINT16)) for _ in range(10)
    )
    return head + depth


LTP_PACKETS = st.builds(lambda token, price: struct.pack(">Ii", token, price), TOKENS, INT32)
VALID_PACKETS = st.one_of(
    LTP_PACKETS,
    index_packets(full=False),
    index_packets(full=True),
    quote_packets(),
    full_packets(),
)
UNKNOWN_PACKETS = st.binary(max_size=300).filter(lambda packet: len(packet) not in KNOWN_LENGTHS)
