"""``codec.frame_payloads``: each tick's CONTRACT §3 JSON straight from the wire.

The reference is the record path: ``tick_json(record)`` for each record of ``decode_frame``, byte
for byte. Also here: the exact-size payloads, the ISO text cache, the generator's checks of the
packet specs. Elsewhere: the golden vectors and kiteconnect-mocks samples through both outputs
(tests/test_codec_golden.py), the malformed-frame cases through both (tests/test_codec.py).
"""

from __future__ import annotations

import struct
import tracemalloc
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packets import UNKNOWN_PACKETS, VALID_PACKETS

from bridge.kite import codec
from bridge.kite.codec import (
    Buffer,
    FrameError,
    decode_frame,
    encode_frame,
    encode_raw_frame,
    frame_payloads,
)
from bridge.kite.records import Depth, DepthLevel, LtpTick, Ohlc
from bridge.payload import tick_json

PROFILE = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=300)


def via_records(data: Buffer, skipped: list[int] | None = None) -> list[tuple[int, bytes]]:
    return [(tick.instrument_token, tick_json(tick)) for tick in decode_frame(data, skipped)]


@PROFILE
@given(st.lists(VALID_PACKETS, max_size=8))
def test_payloads_are_tick_json_of_the_records(packets: list[bytes]) -> None:
    data = encode_raw_frame(packets)
    ticks = decode_frame(data)
    assert encode_frame(ticks) == data  # a frame of valid ticks of every kind, mixed
    assert frame_payloads(data) == [(tick.instrument_token, tick_json(tick)) for tick in ticks]


# -- edge values, one packet of each kind per case -----------------------------------------------

NSE, CDS, BCD, NCO, INDEX, ODD = 1, 3, 6, 12, 9, 255
MAX_TIME = 2**32 - 1


def every_kind(segment: int, prices: list[int], times: tuple[int, int]) -> list[bytes]:
    """One packet of each kind; ``prices`` are the 5 raw prices ltp, atp/high, open, low, close."""
    token = (0x1234 << 8) | segment
    ltp, second, open_, low, close = prices
    last_trade, exchange = times
    quote = struct.pack(
        ">IiIiIIIiiii", token, ltp, 7, second, 2**32 - 1, 0, 5, open_, second, low, close
    )
    depth = b"".join(struct.pack(">IiH2x", 3 + i, prices[i % 5], i) for i in range(10))
    index = struct.pack(">Iiiiiii", token, ltp, second, low, open_, close, 0)
    return [
        struct.pack(">Ii", token, ltp),
        index,
        index + struct.pack(">I", exchange),
        quote,
        quote + struct.pack(">IIIII", last_trade, 1, 2, 3, exchange) + depth,
    ]


EDGES = {
    f"segment-{segment}": every_kind(segment, [157315, 157033, 156915, 156105, 156780], (1, 2))
    for segment in (NSE, CDS, BCD, NCO, INDEX, ODD)
}
EDGES |= {
    "close-zero": every_kind(NSE, [100, 200, 300, 400, 0], (1718176568, 1718176569)),
    "negative": every_kind(CDS, [-1, -(2**31), -5, -250, -3], (1718176568, 1718176569)),
    "int32-max": every_kind(BCD, [2**31 - 1] * 5, (MAX_TIME, MAX_TIME)),
    "zero-times": every_kind(NCO, [0, 1, 2, 3, 4], (0, 0)),
    "mixed-times": every_kind(NSE, [1, 2, 3, 4, 5], (0, 1718176569)),
}


@pytest.mark.parametrize("packets", list(EDGES.values()), ids=list(EDGES))
def test_edge_values(packets: list[bytes]) -> None:
    data = encode_raw_frame(packets)
    payloads = frame_payloads(data)
    assert payloads == via_records(data)
    assert [len(packet) for packet in packets] == [8, 28, 32, 44, 184]


def test_edge_payload_text() -> None:
    """Spelled out, not only compared: nulls, a zero change, divisors, the IST offset."""
    *_, (_, quote), (_, full) = frame_payloads(encode_raw_frame(EDGES["zero-times"]))
    assert orjson.loads(full)["last_trade_time"] is None
    assert b'"last_trade_time":null,' in full
    assert b'"exchange_timestamp":null,' in full
    assert b'"last_price":0.0,' in quote  # NCO: raw 0 / 1e4
    *_, (_, quote), _ = frame_payloads(encode_raw_frame(EDGES["close-zero"]))
    assert quote.endswith(b',"close":0.0},"change":0.0}')
    (_, ltp), *_ = frame_payloads(encode_raw_frame(EDGES["segment-3"]))
    assert ltp == (
        b'{"tradable":true,"mode":"ltp","instrument_token":1192963,"last_price":0.0157315}'
    )
    *_, (_, full) = frame_payloads(encode_raw_frame(EDGES["mixed-times"]))
    assert b'"last_trade_time":null,' in full
    assert b'"exchange_timestamp":"2024-06-12T12:46:09+05:30",' in full
    *_, (_, full) = frame_payloads(encode_raw_frame(EDGES["int32-max"]))
    assert b'"exchange_timestamp":"2106-02-07T11:58:15+05:30",' in full
    (_, index), *_ = frame_payloads(encode_raw_frame(EDGES["segment-9"]))
    assert index.startswith(b'{"tradable":false,"mode":"ltp"')


def test_payloads_are_exact_size() -> None:
    """The publisher holds up to 10,000 payloads: none may pin orjson's ~8 KB output buffer.

    Measured with tracemalloc: ``sys.getsizeof`` reports the length orjson sets, not the buffer
    it allocated, so it cannot tell an exact-size copy from the buffer itself.
    """
    data = encode_raw_frame(EDGES["segment-1"] * 200)
    size = sum(len(payload) for _, payload in frame_payloads(data))
    tracemalloc.start()
    try:
        kept = frame_payloads(data)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(kept) == 1000
    assert all(type(payload) is bytes for _, payload in kept)
    assert held < size + 1000 * 150  # the bytes, their headers and the (token, payload) tuples


def test_payloads_are_bytes_of_every_buffer_type() -> None:
    data = encode_raw_frame(EDGES["segment-1"])
    expected = via_records(data)
    assert frame_payloads(bytearray(data)) == expected
    assert frame_payloads(memoryview(data)) == expected
    assert frame_payloads(memoryview(b"\0" + data)[1:]) == expected


def test_iso_cache_is_bounded_and_transparent() -> None:
    codec._iso_timestamps.clear()
    start = 1_700_000_000
    for second in range(start, start + codec._TIMESTAMP_CACHE_SIZE * 2 + 7):
        packet = struct.pack(">IiiiiiiI", 256265, 1, 1, 1, 1, 1, 0, second)
        ((_, payload),) = frame_payloads(encode_raw_frame([packet]))
        text = orjson.loads(payload)["exchange_timestamp"]
        assert datetime.fromisoformat(text) == datetime.fromtimestamp(second, UTC)
        assert text.endswith("+05:30")
        assert len(codec._iso_timestamps) <= codec._TIMESTAMP_CACHE_SIZE
    assert codec._iso_timestamps  # it is used at all


# -- malformed input: the same outcome as the record path, whatever the bytes -------------------


def outcome(decode: Any, data: bytes) -> tuple[object, list[int]]:
    """What ``decode`` makes of ``data``: its result or its FrameError's text, and the skips."""
    skipped: list[int] = []
    try:
        return decode(data, skipped), skipped
    except FrameError as exc:
        return f"FrameError: {exc}", skipped


@PROFILE
@given(st.binary(max_size=600))
def test_arbitrary_bytes_give_what_the_records_give(data: bytes) -> None:
    assert outcome(frame_payloads, data) == outcome(via_records, data)


@PROFILE
@given(
    st.lists(st.one_of(VALID_PACKETS, UNKNOWN_PACKETS), max_size=6),
    st.integers(0, 10_000),
    st.integers(0, 255),
    st.integers(0, 40),
)
def test_corrupted_frames_give_what_the_records_give(
    packets: list[bytes], where: int, byte: int, cut: int
) -> None:
    data = bytearray(encode_raw_frame(packets))
    data[where % len(data)] = byte
    for candidate in (bytes(data), bytes(data[: len(data) - cut]), bytes(data) + bytes(cut)):
        assert outcome(frame_payloads, candidate) == outcome(via_records, candidate)


# -- the generator of the per-kind decoders ------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ((LtpTick, codec._TRADABLE, "ltp", 0), "LtpTick has 4 fields"),
        ((LtpTick, codec._TRADABLE, "ltp", 0, 1, 1), "LtpTick has 4 fields"),
        ((LtpTick, codec._TRADABLE, "ltp", 0, 2), "2 cannot give"),  # no such struct value
        ((LtpTick, codec._TRADABLE, "ltp", codec._Change(0, 1), 1), "cannot give"),  # an int
        ((LtpTick, "ltp", codec._TRADABLE, 0, 1), "cannot give"),  # a bool from a str
        ((LtpTick, codec._TRADABLE, "ltp", 0, (Ohlc, 1, 1, 1, 1)), "cannot give"),
        ((LtpTick, codec._TRADABLE, "LTP", 0, 1), "'LTP' cannot give"),  # not a Mode
        ((DepthLevel, 0, 1, [0]), "cannot give"),
        ((Depth, [(DepthLevel, 0, 1, 1)], [(Ohlc, 0, 1, 1, 1)]), "cannot give"),
    ],
)
def test_spec_mistakes_fail_at_import(spec: tuple[Any, ...], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        codec._source(8, 2, spec, payload=True)


def test_generated_payload_keys_are_the_record_fields() -> None:
    source = codec._SOURCES[8, True]
    assert "{'tradable': segment != 9, 'mode': 'ltp', 'instrument_token': v0, " in source
    assert sorted(codec._SOURCES) == [(n, p) for n in (8, 28, 32, 44, 184) for p in (False, True)]
