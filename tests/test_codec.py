"""Codec behaviour beyond the golden vectors: framing errors, skipping, divisors, record shape.

The framing tests run through both outputs, ``decode_frame`` and ``frame_payloads``.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import orjson
import pytest
from helpers import FULL_KEYS, INDEX_FULL_KEYS, INDEX_QUOTE_KEYS, LTP_KEYS, QUOTE_KEYS

from bridge.kite import codec
from bridge.kite.codec import (
    Buffer,
    FrameError,
    decode_frame,
    encode_frame,
    encode_packet,
    encode_raw_frame,
    frame_payloads,
    segment_divisor,
)
from bridge.kite.records import (
    IST,
    Depth,
    DepthLevel,
    FullTick,
    IndexFullTick,
    IndexQuoteTick,
    LtpTick,
    Ohlc,
    QuoteTick,
    Tick,
)

IST_OFFSET = timedelta(hours=5, minutes=30)
MOMENT = datetime(2024, 6, 12, 12, 46, 9, tzinfo=IST)

LTP_PACKET = bytes.fromhex("00063a0100026683")  # E1: 408065 @ 1573.15
INDEX_PACKET = bytes.fromhex("0003e9090023b74d0023c50300238bfb00239eed00237fd500003778")  # E2


def quote_tick(token: int = 738561, close: float = 2913.35) -> QuoteTick:
    return QuoteTick(
        True,
        "quote",
        token,
        2940.7,
        1,
        2933.55,
        2827705,
        213779,
        425119,
        Ohlc(2915.0, 2949.0, 2910.35, close),
        0.0,
    )


def full_tick(**changes: Any) -> FullTick:
    tick = FullTick(
        True,
        "full",
        12517890,
        23450.0,
        75,
        23421.55,
        4521300,
        612450,
        587325,
        Ohlc(23360.0, 23488.0, 23310.05, 23290.6),
        0.684396280044316,
        MOMENT - timedelta(seconds=1),
        13667775,
        13777050,
        13500000,
        MOMENT,
        Depth(
            [DepthLevel(75 + i, 23449.9 - i / 20, 2 + i) for i in range(5)],
            [DepthLevel(225 + i, 23450.0 + i / 20, 3 + i) for i in range(5)],
        ),
    )
    return dataclasses.replace(tick, **changes)


# ---------------------------------------------------------------------------------------------
# Framing: one walk behind both outputs (records and payloads), so each test runs through both.

#: ``decode_frame`` or ``frame_payloads``.
Decode: TypeAlias = Callable[..., list[Any]]
BOTH = pytest.mark.parametrize(
    "decode", [decode_frame, frame_payloads], ids=["records", "payloads"]
)


def token_of(item: Tick | tuple[int, bytes]) -> int:
    return item[0] if isinstance(item, tuple) else item.instrument_token


def test_frame_error_is_a_value_error() -> None:
    assert issubclass(FrameError, ValueError)


@BOTH
@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"\x00\x00", bytearray(b"\x00\x00"), memoryview(b"\x00\x00")],
    ids=["empty", "heartbeat", "no-packets", "bytearray", "memoryview"],
)
def test_empty_frame_and_buffer_types(decode: Decode, data: Buffer) -> None:
    assert decode(data) == []


@BOTH
def test_accepts_bytearray_and_memoryview(decode: Decode) -> None:
    data = encode_raw_frame([LTP_PACKET])
    expected = decode(data)
    assert decode(bytearray(data)) == expected
    assert decode(memoryview(data)) == expected
    assert [token_of(item) for item in expected] == [408065]
    assert decode_frame(data)[0].last_price == 1573.15


@BOTH
def test_count_without_length_prefix(decode: Decode) -> None:
    with pytest.raises(FrameError, match=r"packet 1 of 1 cut short at offset 2 \(frame length 2\)"):
        decode(b"\x00\x01")


@BOTH
def test_length_prefix_cut_in_half(decode: Decode) -> None:
    with pytest.raises(FrameError, match=r"cut short at offset 2 \(frame length 3\)"):
        decode(b"\x00\x01\x00")


@BOTH
def test_declared_length_past_the_end(decode: Decode) -> None:
    data = encode_raw_frame([LTP_PACKET])[:-1]
    with pytest.raises(FrameError, match=r"offset 4 declares 8 bytes.*frame length 11"):
        decode(data)


@BOTH
def test_count_larger_than_packets(decode: Decode) -> None:
    data = b"\x00\x02" + encode_raw_frame([LTP_PACKET])[2:]
    with pytest.raises(FrameError, match="packet 2 of 2 cut short at offset 12"):
        decode(data)


@BOTH
def test_trailing_bytes(decode: Decode) -> None:
    with pytest.raises(FrameError, match=r"3 trailing bytes at offset 12 .*frame length 15"):
        decode(encode_raw_frame([LTP_PACKET]) + b"\x00\x00\x00")


@BOTH
def test_trailing_bytes_after_zero_packets(decode: Decode) -> None:
    with pytest.raises(FrameError, match="trailing"):
        decode(b"\x00\x00\x00")


@BOTH
def test_unknown_length_is_skipped_and_reported(decode: Decode) -> None:
    data = encode_raw_frame([LTP_PACKET, b"\x01" * 12, b"", INDEX_PACKET, b"\xff" * 164])
    skipped: list[int] = []
    items = decode(data, skipped)
    assert [token_of(item) for item in items] == [408065, 256265]
    assert skipped == [12, 0, 164]
    assert decode(data) == items  # without a list, skipping is silent


@BOTH
def test_skipped_list_is_appended_to_not_replaced(decode: Decode) -> None:
    skipped = [99]
    decode(encode_raw_frame([b"abc"]), skipped)
    assert skipped == [99, 3]


@BOTH
def test_a_rejected_frame_reports_no_skipped_packets(decode: Decode) -> None:
    """A frame is rejected whole, so the unknown packet before the fault was not "skipped"."""
    skipped: list[int] = []
    with pytest.raises(FrameError, match="running past the end"):
        # two packets: 5 bytes of an unknown kind, then 8 declared with only 2 present
        decode(bytes.fromhex("0002 0005 0102030405 0008 0000"), skipped)
    assert skipped == []


# ---------------------------------------------------------------------------------------------
# Field decoding


@pytest.mark.parametrize(
    ("segment", "divisor"),
    [
        (1, 100),
        (2, 100),
        (3, 10_000_000),
        (4, 100),
        (5, 100),
        (6, 10_000),
        (7, 100),
        (8, 100),
        (9, 100),
        (10, 100),
        (11, 100),
        (12, 10_000),
        (13, 100),
        (0, 100),
        (255, 100),
    ],
)
def test_segment_divisor(segment: int, divisor: int) -> None:
    assert segment_divisor(0x123400 | segment) == divisor
    token = (0xABCDEF << 8) | segment
    (tick,) = decode_frame(encode_raw_frame([struct.pack(">Ii", token, 123456789)]))
    assert tick.last_price == 123456789 / divisor
    assert tick.tradable is (segment != 9)


def test_divisor_applies_to_every_price_and_no_quantity() -> None:
    tick = full_tick(
        instrument_token=(5 << 8) | 3,
        last_price=83.2525,
        average_traded_price=83.1,
        ohlc=Ohlc(83.0, 83.5, 82.5, 83.25),
        depth=Depth([DepthLevel(7, 83.2, 9)] * 5, [DepthLevel(8, 83.3, 10)] * 5),
    )
    packet = encode_packet(tick)
    values = struct.unpack(">IiIiIIIiiiiIIIII" + "IiH2x" * 10, packet)
    assert values[1] == 832525000
    assert values[3] == 831000000
    assert values[7:11] == (830000000, 835000000, 825000000, 832500000)
    assert (values[2], values[4]) == (75, 4521300)  # quantities and volume untouched
    assert values[12:15] == (13667775, 13777050, 13500000)  # OI untouched
    assert values[16:19] == (7, 832000000, 9)
    assert decode_frame(encode_raw_frame([packet])) == [
        dataclasses.replace(tick, change=(83.2525 - 83.25) * 100 / 83.25)
    ]


def test_prices_divided_by_100_are_signed_and_quantities_unsigned() -> None:
    packet = struct.pack(
        ">IiIiIIIiiii",
        0x0101,
        -5,
        0xFFFF_FFFF,
        -7,
        0xFFFF_FFFF,
        0xFFFF_FFFE,
        0x8000_0000,
        -100,
        100,
        -200,
        -50,
    )
    (tick,) = decode_frame(encode_raw_frame([packet]))
    assert isinstance(tick, QuoteTick)
    assert tick.last_price == -0.05
    assert tick.average_traded_price == -0.07
    assert tick.last_traded_quantity == 4294967295
    assert tick.volume_traded == 4294967295
    assert tick.total_buy_quantity == 4294967294
    assert tick.total_sell_quantity == 2147483648
    assert tick.ohlc == Ohlc(open=-1.0, high=1.0, low=-2.0, close=-0.5)
    assert tick.change == (-0.05 - -0.5) * 100 / -0.5


@pytest.mark.parametrize(("segment", "divisor"), [(3, 10_000_000), (6, 10_000), (12, 10_000)])
def test_prices_divided_by_more_than_100_are_unsigned(segment: int, divisor: int) -> None:
    # NSE commodity silver is quoted per kg: Rs 2,50,000.0000 is 2.5e9 raw, above 2**31 - 1.
    token = (0x1234 << 8) | segment
    raw = 2_500_000_000
    quote = struct.pack(">IIIIIIIIIII", token, raw, 1, raw - 1, 2, 3, 4, raw, raw + 5, raw - 5, raw)
    depth = b"".join(struct.pack(">IIH2x", 1, raw - level, 1) for level in range(10))
    packet = quote + struct.pack(">IIIII", 0, 0, 0, 0, 0) + depth
    frame = encode_raw_frame([struct.pack(">II", token, 0xFFFF_FFFF), packet])
    ltp, (tick,) = decode_frame(frame)[0], decode_frame(frame)[1:]
    assert ltp.last_price == 0xFFFF_FFFF / divisor
    assert isinstance(tick, FullTick)
    assert tick.last_price == raw / divisor > 0
    assert tick.average_traded_price == (raw - 1) / divisor
    assert tick.ohlc == Ohlc(raw / divisor, (raw + 5) / divisor, (raw - 5) / divisor, raw / divisor)
    prices = [level.price for level in tick.depth.buy + tick.depth.sell]
    assert prices == [(raw - level) / divisor for level in range(10)]
    assert [orjson.loads(body)["last_price"] for _, body in frame_payloads(frame)] == [
        0xFFFF_FFFF / divisor,
        raw / divisor,
    ]
    assert encode_frame(decode_frame(frame)) == frame


def test_the_wire_range_of_prices_depends_on_the_segment() -> None:
    nco, nse = (7 << 8) | 12, (7 << 8) | 1
    assert encode_packet(LtpTick(True, "ltp", nco, 429_496.7295)) == struct.pack(
        ">II", nco, 0xFFFF_FFFF
    )
    assert encode_packet(LtpTick(True, "ltp", nse, -37.63)) == struct.pack(">Ii", nse, -3763)
    for tick in (
        LtpTick(True, "ltp", nco, -0.01),  # no negative price where prices are unsigned
        LtpTick(True, "ltp", nco, 429_496.7296),
        LtpTick(True, "ltp", nse, 21_474_836.48),
    ):
        with pytest.raises(ValueError, match="out of range"):
            encode_packet(tick)


def test_depth_orders_are_uint16_and_padding_is_ignored() -> None:
    packet = bytearray(encode_packet(full_tick()))
    struct.pack_into(">IiH", packet, 64, 0xFFFF_FFFF, -1, 0xFFFF)
    packet[74:76] = b"\xff\xff"  # non-zero padding: read past, never into `orders`
    (tick,) = decode_frame(encode_raw_frame([bytes(packet)]))
    assert isinstance(tick, FullTick)
    assert tick.depth.buy[0] == DepthLevel(quantity=4294967295, price=-0.01, orders=65535)
    assert encode_packet(tick)[74:76] == b"\x00\x00"


def test_index_packet_order_is_high_low_open_close() -> None:
    packet = struct.pack(">Iiiiiii", 256265, 500, 400, 300, 200, 100, 12345)
    (tick,) = decode_frame(encode_raw_frame([packet]))
    assert tick == IndexQuoteTick(False, "quote", 256265, 5.0, Ohlc(2.0, 4.0, 3.0, 1.0), 400.0)


def test_quote_packet_order_is_open_high_low_close() -> None:
    packet = struct.pack(">IiIiIIIiiii", 408065, 500, 1, 2, 3, 4, 5, 200, 400, 300, 100)
    (tick,) = decode_frame(encode_raw_frame([packet]))
    assert isinstance(tick, QuoteTick)
    assert tick.ohlc == Ohlc(open=2.0, high=4.0, low=3.0, close=1.0)
    assert (tick.last_traded_quantity, tick.average_traded_price) == (1, 0.02)
    assert (tick.volume_traded, tick.total_buy_quantity, tick.total_sell_quantity) == (3, 4, 5)


@pytest.mark.parametrize("tick", [quote_tick(close=0.0), full_tick(ohlc=Ohlc(1.0, 2.0, 0.5, 0.0))])
def test_change_is_zero_when_close_is_zero(tick: Tick) -> None:
    (decoded,) = decode_frame(encode_frame([tick]))
    assert isinstance(decoded, QuoteTick)
    assert decoded.change == 0.0
    assert isinstance(decoded.change, float)


def test_an_unchanged_negative_close_gives_a_change_of_plus_zero() -> None:
    # (ltp - close) * 100 / close is -0.0 when both are the same negative price (MCX crude in
    # April 2020); published as "-0.0" it reads like a fall.
    packet = struct.pack(">Iiiiiii", 9, -100, -100, -100, -100, -100, 0)
    frame = encode_raw_frame(
        [packet, struct.pack(">IiIiIIIiiii", 5, -7, 1, -7, 1, 1, 1, 0, 0, 0, -7)]
    )
    changes = [
        tick.change for tick in decode_frame(frame) if isinstance(tick, QuoteTick | IndexQuoteTick)
    ]
    assert changes == [0.0, 0.0]
    assert all(math.copysign(1.0, change) == 1.0 for change in changes)
    assert [b'"change":0.0' in body for _, body in frame_payloads(frame)] == [True, True]


def test_zero_timestamps_are_none() -> None:
    tick = full_tick(last_trade_time=None, exchange_timestamp=None)
    packet = encode_packet(tick)
    assert packet[44:48] == packet[60:64] == b"\x00\x00\x00\x00"
    (decoded,) = decode_frame(encode_raw_frame([packet]))
    assert isinstance(decoded, FullTick)
    assert decoded.last_trade_time is None
    assert decoded.exchange_timestamp is None


def test_timestamps_are_aware_ist_instants() -> None:
    (decoded,) = decode_frame(encode_frame([full_tick()]))
    assert isinstance(decoded, FullTick)
    assert decoded.exchange_timestamp == datetime(2024, 6, 12, 7, 16, 9, tzinfo=UTC)
    assert decoded.exchange_timestamp is not None
    assert decoded.exchange_timestamp.utcoffset() == IST_OFFSET
    assert decoded.last_trade_time == MOMENT - timedelta(seconds=1)


def test_timestamp_cache_is_bounded_and_transparent() -> None:
    codec._timestamps.clear()
    start = 1_700_000_000
    for second in range(start, start + codec._TIMESTAMP_CACHE_SIZE * 2 + 7, 1):
        packet = struct.pack(">IiiiiiiI", 256265, 1, 1, 1, 1, 1, 0, second)
        (tick,) = decode_frame(encode_raw_frame([packet]))
        assert isinstance(tick, IndexFullTick)
        assert tick.exchange_timestamp == datetime.fromtimestamp(second, UTC)
        assert len(codec._timestamps) <= codec._TIMESTAMP_CACHE_SIZE
    assert codec._timestamps  # it is used at all


def test_max_uint32_timestamp() -> None:
    packet = struct.pack(">IiiiiiiI", 256265, 1, 1, 1, 1, 1, 0, 0xFFFF_FFFF)
    (tick,) = decode_frame(encode_raw_frame([packet]))
    assert isinstance(tick, IndexFullTick)
    assert tick.exchange_timestamp == datetime(2106, 2, 7, 6, 28, 15, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------
# Record shape (CONTRACT §3)

OHLC_KEYS = ["open", "high", "low", "close"]

ONE_OF_EACH: list[tuple[bytes, type, str, list[str]]] = [
    (LTP_PACKET, LtpTick, "ltp", LTP_KEYS),
    (INDEX_PACKET, IndexQuoteTick, "quote", INDEX_QUOTE_KEYS),
    (INDEX_PACKET + b"\x66\x69\x4b\x39", IndexFullTick, "full", INDEX_FULL_KEYS),
    (encode_packet(quote_tick()), QuoteTick, "quote", QUOTE_KEYS),
    (encode_packet(full_tick()), FullTick, "full", FULL_KEYS),
]


@pytest.mark.parametrize(
    ("packet", "kind", "mode", "keys"),
    ONE_OF_EACH,
    ids=[kind.__name__ for _, kind, _, _ in ONE_OF_EACH],
)
def test_asdict_has_contract_keys_in_order(
    packet: bytes, kind: type, mode: str, keys: list[str]
) -> None:
    (tick,) = decode_frame(encode_raw_frame([packet]))
    assert type(tick) is kind
    assert tick.mode == mode
    as_dict = dataclasses.asdict(tick)
    assert list(as_dict) == keys
    if "ohlc" in as_dict:
        assert list(as_dict["ohlc"]) == OHLC_KEYS
    if "depth" in as_dict:
        assert list(as_dict["depth"]) == ["buy", "sell"]
        for side in ("buy", "sell"):
            assert len(as_dict["depth"][side]) == 5
            for level in as_dict["depth"][side]:
                assert list(level) == ["quantity", "price", "orders"]


@pytest.mark.parametrize(
    ("packet", "kind", "mode", "keys"),
    ONE_OF_EACH,
    ids=[kind.__name__ for _, kind, _, _ in ONE_OF_EACH],
)
def test_orjson_serialises_every_record(
    packet: bytes, kind: type, mode: str, keys: list[str]
) -> None:
    (tick,) = decode_frame(encode_raw_frame([packet]))
    payload = orjson.loads(orjson.dumps(tick))
    assert list(payload) == keys
    assert payload["mode"] == mode
    for name in ("last_trade_time", "exchange_timestamp"):
        if name in payload:
            assert payload[name].endswith("+05:30")
            assert datetime.fromisoformat(payload[name]) == getattr(tick, name)


# ---------------------------------------------------------------------------------------------
# Encoding


def test_encode_ignores_mode_and_tradable_labels() -> None:
    tick = LtpTick(tradable=False, mode="full", instrument_token=408065, last_price=1573.15)
    assert encode_packet(tick) == LTP_PACKET


def test_index_change_field_is_raw_ltp_minus_raw_close_wrapped() -> None:
    tick = IndexQuoteTick(
        False, "quote", 256265, 21474836.47, Ohlc(0.0, 0.0, 0.0, -21474836.48), 0.0
    )
    packet = encode_packet(tick)
    assert struct.unpack(">i", packet[24:28]) == (-1,)  # (2**31 - 1) - (-2**31) wrapped
    (decoded,) = decode_frame(encode_raw_frame([packet]))
    assert decoded.last_price == 21474836.47


def test_prices_encode_rounded() -> None:
    tick = LtpTick(True, "ltp", 408065, 1573.149999)
    assert encode_packet(tick) == LTP_PACKET


@pytest.mark.parametrize(
    ("tick", "match"),
    [
        (full_tick(last_trade_time=datetime(2024, 6, 12, 12, 0)), "naive"),
        (full_tick(oi=-1), "out of range"),
        (full_tick(volume_traded=2**32), "out of range"),
        (LtpTick(True, "ltp", 2**32, 1.0), "out of range"),
        (LtpTick(True, "ltp", 408065, 21474836.48), "out of range"),
        (LtpTick(True, "ltp", 408065, math.nan), "cannot be encoded"),
        (LtpTick(True, "ltp", 408065, math.inf), "cannot be encoded"),
        (full_tick(depth=Depth([], [])), "5 buy and 5 sell"),
        (quote_tick(token=(1 << 8) | 3), "out of range"),  # 2940.70 does not fit CDS scaling
    ],
)
def test_encode_rejects_what_the_wire_cannot_carry(tick: Tick, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_packet(tick)


def test_encode_raw_frame_limits() -> None:
    with pytest.raises(ValueError, match="uint16 length"):
        encode_raw_frame([b"\x00" * 65536])
    assert encode_raw_frame([]) == b"\x00\x00"
    assert encode_raw_frame([b"ab", b""]) == b"\x00\x02\x00\x02ab\x00\x00"
