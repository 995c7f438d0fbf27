"""Property tests: the codec is a bijection on valid packets and total on arbitrary bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packets import INT32, KNOWN_LENGTHS, SEGMENTS, UNKNOWN_PACKETS, VALID_PACKETS

from bridge.kite.codec import FrameError, decode_frame, encode_frame, encode_raw_frame
from bridge.kite.records import (
    FullTick,
    IndexFullTick,
    IndexQuoteTick,
    LtpTick,
    QuoteTick,
    Tick,
)

# Machines running these tests are shared and slow: no per-example deadline.
PROFILE = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=150)

# Written out independently of the codec's own table (kite-protocol.md §3.8).
DIVISORS = {3: 10_000_000, 6: 10_000, 12: 10_000}
# Raw prices are uint32 in those segments and int32 in all others.
PRICE_FORMAT = {3: "I", 6: "I", 12: "I"}
KINDS = {8: LtpTick, 28: IndexQuoteTick, 32: IndexFullTick, 44: QuoteTick, 184: FullTick}


@PROFILE
@given(st.lists(VALID_PACKETS, max_size=8))
def test_encode_of_decode_is_identity(packets: list[bytes]) -> None:
    data = encode_raw_frame(packets)
    ticks = decode_frame(data)
    assert [type(tick) for tick in ticks] == [KINDS[len(packet)] for packet in packets]
    assert encode_frame(ticks) == data
    assert decode_frame(encode_frame(ticks)) == ticks


@PROFILE
@given(VALID_PACKETS)
def test_decoded_fields_follow_the_segment(packet: bytes) -> None:
    (tick,) = decode_frame(encode_raw_frame([packet]))
    token = struct.unpack_from(">I", packet)[0]
    segment = token & 0xFF
    (raw_ltp,) = struct.unpack_from(">" + PRICE_FORMAT.get(segment, "i"), packet, 4)
    assert tick.instrument_token == token
    assert tick.tradable is (segment != 9)
    assert tick.last_price == raw_ltp / DIVISORS.get(segment, 100)
    assert tick.mode == {8: "ltp", 28: "quote", 32: "full", 44: "quote", 184: "full"}[len(packet)]
    if isinstance(tick, IndexQuoteTick | QuoteTick):
        close = tick.ohlc.close
        assert tick.change == ((tick.last_price - close) * 100 / close if close else 0.0)


@PROFILE
@given(SEGMENTS, st.lists(INT32, min_size=10, max_size=10))
def test_depth_prices_use_the_segment_divisor(segment: int, prices: list[int]) -> None:
    packet = (
        struct.pack(">IiIiIIIiiii", 0x100 | segment, *([0] * 10))
        + bytes(20)
        + b"".join(struct.pack(">IiH2x", 1, price, 1) for price in prices)
    )
    (tick,) = decode_frame(encode_raw_frame([packet]))
    assert isinstance(tick, FullTick)
    divisor = DIVISORS.get(segment, 100)
    decoded = [level.price for level in tick.depth.buy + tick.depth.sell]
    # The same 32 bits, read as the segment reads prices.
    raw = [price % 2**32 if segment in PRICE_FORMAT else price for price in prices]
    assert decoded == [price / divisor for price in raw]


@PROFILE
@given(st.binary(max_size=600))
def test_arbitrary_bytes_give_ticks_or_frame_error(data: bytes) -> None:
    try:
        ticks = decode_frame(data, [])
    except FrameError:
        return
    assert isinstance(ticks, list)


@PROFILE
@given(
    st.lists(st.one_of(VALID_PACKETS, UNKNOWN_PACKETS), max_size=6),
    st.integers(0, 10_000),
    st.integers(0, 255),
)
def test_corrupted_frames_give_ticks_or_frame_error(
    packets: list[bytes], where: int, byte: int
) -> None:
    data = bytearray(encode_raw_frame(packets))
    data[where % len(data)] = byte
    try:
        ticks: list[Tick] = decode_frame(bytes(data))
    except FrameError:
        return
    assert all(isinstance(tick, LtpTick) for tick in ticks)


@PROFILE
@given(st.lists(VALID_PACKETS, min_size=1, max_size=4), st.data())
def test_truncated_frames_raise_frame_error(packets: list[bytes], data: st.DataObject) -> None:
    frame = encode_raw_frame(packets)
    cut = data.draw(st.integers(2, len(frame) - 1))
    with pytest.raises(FrameError):
        decode_frame(frame[:cut])


@PROFILE
@given(st.lists(VALID_PACKETS, max_size=4), st.binary(min_size=1, max_size=40))
def test_trailing_bytes_raise_frame_error(packets: list[bytes], extra: bytes) -> None:
    with pytest.raises(FrameError, match="trailing"):
        decode_frame(encode_raw_frame(packets) + extra)


@PROFILE
@given(st.lists(st.one_of(VALID_PACKETS, UNKNOWN_PACKETS), max_size=8))
def test_unknown_lengths_are_skipped_and_reported(packets: list[bytes]) -> None:
    skipped: list[int] = []
    ticks = decode_frame(encode_raw_frame(packets), skipped)
    known = [packet for packet in packets if len(packet) in KNOWN_LENGTHS]
    assert ticks == decode_frame(encode_raw_frame(known))
    assert skipped == [len(packet) for packet in packets if len(packet) not in KNOWN_LENGTHS]
