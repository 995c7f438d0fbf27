"""Golden vectors: kite-protocol.md §8 worked examples E1-E11 and the kiteconnect-mocks packets,
through both outputs of the codec (records, and the payloads of ``frame_payloads``).

Expected values are written out from the spec (which took them from pykiteconnect 5.2.2), so a
regression in any field, divisor, signedness or the ``change`` formula changes a result here.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from bridge.kite.codec import (
    decode_frame,
    encode_frame,
    encode_packet,
    encode_raw_frame,
    frame_payloads,
)
from bridge.kite.records import (
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
from bridge.payload import tick_json

IST_OFFSET = timedelta(hours=5, minutes=30)
T = datetime(2024, 6, 12, 7, 16, 9, tzinfo=UTC)  # 1718176569 = 12:46:09 IST
LTT = T - timedelta(seconds=1)

E1 = "00 01 00 08 00 06 3a 01 00 02 66 83"
E2 = (
    "00 01 00 1c 00 03 e9 09 00 23 b7 4d 00 23 c5 03 00 23 8b fb 00 23 9e ed 00 23 7f d5"
    " 00 00 37 78"
)
E3 = E2.replace("00 01 00 1c", "00 01 00 20", 1) + " 66 69 4b 39"
E3B = (
    "00 01 00 20 00 03 f8 09 00 4b 87 f0 00 4c 72 50 00 4b 60 e0 00 4c 4b 40 00 4c 5e fa"
    " ff ff 28 f6 66 69 4b 39"
)
E4 = (
    "00 01 00 2c 00 0b 45 01 00 04 7c b6 00 00 00 01 00 04 79 eb 00 2b 25 b9 00 03 43 13"
    " 00 06 7c 9f 00 04 72 ac 00 04 7f f4 00 04 70 db 00 04 72 07"
)
E5 = """
00 01 00 b8 00 bf 02 02 00 23 c8 28 00 00 00 4b 00 23 bd 0b 00 44 fd 54 00 09 58 62 00 08 f6 3d
00 23 a5 00 00 23 d7 00 00 23 91 7d 00 23 89 e4 66 69 4b 38 00 d0 8d bf 00 d2 38 9a 00 cd fe 60
66 69 4b 39
00 00 00 4b 00 23 c8 1e 00 02 00 00   00 00 00 96 00 23 c8 19 00 03 00 00
00 00 02 0d 00 23 c8 14 00 07 00 00   00 00 00 4b 00 23 c8 0f 00 01 00 00
00 00 01 2c 00 23 c8 0a 00 04 00 00
00 00 00 e1 00 23 c8 28 00 03 00 00   00 00 00 4b 00 23 c8 32 00 01 00 00
00 00 01 c2 00 23 c8 37 00 06 00 00   00 00 00 96 00 23 c8 3c 00 02 00 00
00 00 03 84 00 23 c8 41 00 0b 00 00
"""
E6 = (
    "00 01 00 2c 00 06 4c 03 31 9f 52 c8 00 00 00 05 31 9e c0 4c 00 12 d6 87 00 00 22 c5"
    " 00 00 1d e6 31 9d 6a 80 31 a0 77 c0 31 9b e3 e0 31 9c a7 30"
)
E7 = """
00 01 00 b8 00 06 4c 03 31 9f 52 c8 00 00 00 05 31 9e c0 4c 00 12 d6 87 00 00 22 c5 00 00 1d e6
31 9d 6a 80 31 a0 77 c0 31 9b e3 e0 31 9c a7 30 66 69 4b 38 00 1f 36 ee 00 20 0b 20 00 1e 84 80
66 69 4b 39
00 00 00 0a 31 9e f1 20 00 02 00 00   00 00 00 19 31 9e 8f 78 00 04 00 00
00 00 00 05 31 9e 2d d0 00 01 00 00   00 00 00 28 31 9d cc 28 00 06 00 00
00 00 00 0f 31 9d 6a 80 00 02 00 00
00 00 00 0c 31 9f b4 70 00 03 00 00   00 00 00 1e 31 a0 16 18 00 05 00 00
00 00 00 08 31 a0 77 c0 00 01 00 00   00 00 00 32 31 a0 d9 68 00 07 00 00
00 00 00 14 31 a1 3b 10 00 02 00 00
"""
E8 = "00 01 00 08 00 0f 47 06 00 0c b4 26"
E9 = (
    "00 02 00 08 00 06 3a 01 00 02 66 83 00 1c 00 03 e9 09 00 23 b7 4d 00 23 c5 03 00 23 8b fb"
    " 00 23 9e ed 00 23 7f d5 00 00 37 78"
)
E10 = "00"
# E11: kiteconnectjs captures (TATAMOTORS 884737, 2022-06-16 after close).
E11_LTP = "00 01 00 08 00 0d 80 01 00 00 99 7f"
E11_QUOTE_PACKET = (
    "00 0d 80 01 00 00 99 7f 00 00 00 02 00 00 9d 73 01 53 ad 28 00 00 15 f1 00 00 00 00"
    " 00 00 a4 10 00 00 a4 6a 00 00 98 62 00 00 a1 c2"
)
E11_QUOTE = "00 01 00 2c " + E11_QUOTE_PACKET
E11_FULL = (
    "00 01 00 b8 "
    + E11_QUOTE_PACKET
    + " 62 ab 05 a0"  # last trade time 1655375264
    + " 00" * 12  # oi, oi day high, oi day low
    + " 62 ab 11 98"  # exchange timestamp 1655378328
    + " 00 00 15 f1 00 00 99 7f 00 1e 00 00"  # bid 1: (5617, 392.95, 30)
    + " 00" * 108
)


def frame(hex_text: str) -> bytes:
    return bytes.fromhex(hex_text)


def levels(*entries: tuple[int, float, int]) -> list[DepthLevel]:
    return [DepthLevel(quantity, price, orders) for quantity, price, orders in entries]


E1_TICK = LtpTick(tradable=True, mode="ltp", instrument_token=408065, last_price=1573.15)
E2_TICK = IndexQuoteTick(
    tradable=False,
    mode="quote",
    instrument_token=256265,
    last_price=23406.85,
    ohlc=Ohlc(open=23344.45, high=23441.95, low=23295.95, close=23264.85),
    change=0.6103628435171514,
)
E3_TICK = IndexFullTick(
    tradable=False,
    mode="full",
    instrument_token=256265,
    last_price=23406.85,
    ohlc=Ohlc(open=23344.45, high=23441.95, low=23295.95, close=23264.85),
    change=0.6103628435171514,
    exchange_timestamp=T,
)
E3B_TICK = IndexFullTick(
    tradable=False,
    mode="full",
    instrument_token=260105,
    last_price=49500.0,
    ohlc=Ohlc(open=50000.0, high=50100.0, low=49400.0, close=50050.5),
    change=-1.0998891119968832,
    exchange_timestamp=T,
)
E4_TICK = QuoteTick(
    tradable=True,
    mode="quote",
    instrument_token=738561,
    last_price=2940.7,
    last_traded_quantity=1,
    average_traded_price=2933.55,
    volume_traded=2827705,
    total_buy_quantity=213779,
    total_sell_quantity=425119,
    ohlc=Ohlc(open=2915.0, high=2949.0, low=2910.35, close=2913.35),
    change=0.9387818147493404,
)
E5_TICK = FullTick(
    tradable=True,
    mode="full",
    instrument_token=12517890,
    last_price=23450.0,
    last_traded_quantity=75,
    average_traded_price=23421.55,
    volume_traded=4521300,
    total_buy_quantity=612450,
    total_sell_quantity=587325,
    ohlc=Ohlc(open=23360.0, high=23488.0, low=23310.05, close=23290.6),
    change=0.684396280044316,
    last_trade_time=LTT,
    oi=13667775,
    oi_day_high=13777050,
    oi_day_low=13500000,
    exchange_timestamp=T,
    depth=Depth(
        buy=levels(
            (75, 23449.90, 2),
            (150, 23449.85, 3),
            (525, 23449.80, 7),
            (75, 23449.75, 1),
            (300, 23449.70, 4),
        ),
        sell=levels(
            (225, 23450.00, 3),
            (75, 23450.10, 1),
            (450, 23450.15, 6),
            (150, 23450.20, 2),
            (900, 23450.25, 11),
        ),
    ),
)
E6_TICK = QuoteTick(
    tradable=True,
    mode="quote",
    instrument_token=412675,
    last_price=83.2525,
    last_traded_quantity=5,
    average_traded_price=83.24875,
    volume_traded=1234567,
    total_buy_quantity=8901,
    total_sell_quantity=7654,
    ohlc=Ohlc(open=83.24, high=83.26, low=83.23, close=83.235),
    change=0.021024809274942387,
)
E7_TICK = FullTick(
    tradable=True,
    mode="full",
    instrument_token=412675,
    last_price=83.2525,
    last_traded_quantity=5,
    average_traded_price=83.24875,
    volume_traded=1234567,
    total_buy_quantity=8901,
    total_sell_quantity=7654,
    ohlc=Ohlc(open=83.24, high=83.26, low=83.23, close=83.235),
    change=0.021024809274942387,
    last_trade_time=LTT,
    oi=2045678,
    oi_day_high=2100000,
    oi_day_low=2000000,
    exchange_timestamp=T,
    depth=Depth(
        buy=levels(
            (10, 83.25, 2), (25, 83.2475, 4), (5, 83.245, 1), (40, 83.2425, 6), (15, 83.24, 2)
        ),
        sell=levels(
            (12, 83.255, 3), (30, 83.2575, 5), (8, 83.26, 1), (50, 83.2625, 7), (20, 83.265, 2)
        ),
    ),
)
E8_TICK = LtpTick(tradable=True, mode="ltp", instrument_token=1001222, last_price=83.255)
E11_LTP_TICK = LtpTick(tradable=True, mode="ltp", instrument_token=884737, last_price=392.95)
E11_QUOTE_TICK = QuoteTick(
    tradable=True,
    mode="quote",
    instrument_token=884737,
    last_price=392.95,
    last_traded_quantity=2,
    average_traded_price=403.07,
    volume_traded=22261032,
    total_buy_quantity=5617,
    total_sell_quantity=0,
    ohlc=Ohlc(open=420.0, high=420.9, low=390.1, close=414.1),
    change=-5.107461965708774,
)
E11_FULL_TICK = FullTick(
    tradable=True,
    mode="full",
    instrument_token=884737,
    last_price=392.95,
    last_traded_quantity=2,
    average_traded_price=403.07,
    volume_traded=22261032,
    total_buy_quantity=5617,
    total_sell_quantity=0,
    ohlc=Ohlc(open=420.0, high=420.9, low=390.1, close=414.1),
    change=-5.107461965708774,
    last_trade_time=datetime(2022, 6, 16, 15, 57, 44, tzinfo=timezone(IST_OFFSET)),
    oi=0,
    oi_day_high=0,
    oi_day_low=0,
    exchange_timestamp=datetime(2022, 6, 16, 16, 48, 48, tzinfo=timezone(IST_OFFSET)),
    depth=Depth(
        buy=levels((5617, 392.95, 30), (0, 0.0, 0), (0, 0.0, 0), (0, 0.0, 0), (0, 0.0, 0)),
        sell=levels((0, 0.0, 0), (0, 0.0, 0), (0, 0.0, 0), (0, 0.0, 0), (0, 0.0, 0)),
    ),
)

GOLDEN: list[tuple[str, str, list[Tick]]] = [
    ("E1", E1, [E1_TICK]),
    ("E2", E2, [E2_TICK]),
    ("E3", E3, [E3_TICK]),
    ("E3b", E3B, [E3B_TICK]),
    ("E4", E4, [E4_TICK]),
    ("E5", E5, [E5_TICK]),
    ("E6", E6, [E6_TICK]),
    ("E7", E7, [E7_TICK]),
    ("E8", E8, [E8_TICK]),
    ("E9", E9, [E1_TICK, E2_TICK]),
    ("E11-ltp", E11_LTP, [E11_LTP_TICK]),
    ("E11-quote", E11_QUOTE, [E11_QUOTE_TICK]),
    ("E11-full", E11_FULL, [E11_FULL_TICK]),
]
GOLDEN_IDS = [name for name, _, _ in GOLDEN]


def timestamps(tick: Tick) -> list[datetime | None]:
    return [getattr(tick, name, None) for name in ("last_trade_time", "exchange_timestamp")]


@pytest.mark.parametrize(("name", "hex_text", "expected"), GOLDEN, ids=GOLDEN_IDS)
def test_decodes_worked_example(name: str, hex_text: str, expected: list[Tick]) -> None:
    ticks = decode_frame(frame(hex_text))
    # Dataclass equality compares every field, floats exactly, datetimes as instants.
    assert ticks == expected
    assert [type(tick) for tick in ticks] == [type(tick) for tick in expected]


@pytest.mark.parametrize(("name", "hex_text", "expected"), GOLDEN, ids=GOLDEN_IDS)
def test_timestamps_are_ist_aware(name: str, hex_text: str, expected: list[Tick]) -> None:
    for tick in decode_frame(frame(hex_text)):
        for moment in timestamps(tick):
            if moment is not None:
                assert moment.utcoffset() == IST_OFFSET


@pytest.mark.parametrize(("name", "hex_text", "expected"), GOLDEN, ids=GOLDEN_IDS)
def test_payloads_are_tick_json_of_the_records(
    name: str, hex_text: str, expected: list[Tick]
) -> None:
    # Of the decoded records: ``expected`` has UTC datetimes, the same instants in other text.
    data = frame(hex_text)
    payloads = frame_payloads(data)
    assert payloads == [(tick.instrument_token, tick_json(tick)) for tick in decode_frame(data)]
    assert [token for token, _ in payloads] == [tick.instrument_token for tick in expected]


@pytest.mark.parametrize(("name", "hex_text", "expected"), GOLDEN, ids=GOLDEN_IDS)
def test_encodes_worked_example_back(name: str, hex_text: str, expected: list[Tick]) -> None:
    assert encode_frame(expected) == frame(hex_text)


def test_e3_exchange_timestamp_wall_clock() -> None:
    (tick,) = decode_frame(frame(E3))
    assert isinstance(tick, IndexFullTick)
    assert tick.exchange_timestamp is not None
    assert tick.exchange_timestamp.isoformat() == "2024-06-12T12:46:09+05:30"


def test_e3b_negative_change_field_is_signed_on_the_wire() -> None:
    # The absolute change field of the index packet is ff ff 28 f6 = -55050 (signed).
    assert encode_packet(E3B_TICK)[24:28] == bytes.fromhex("ffff28f6")


def test_e5_depth_entries_live_at_documented_offsets() -> None:
    data = frame(E5)
    assert data[68:80] == bytes.fromhex("0000004b0023c81e00020000")
    assert data[128:140] == bytes.fromhex("000000e10023c82800030000")


def test_e8_bcd_uses_ten_thousand_divisor() -> None:
    (tick,) = decode_frame(frame(E8))
    assert tick.last_price == 83.255  # 8325.50 with the old divide-by-100 bug


def test_e10_heartbeat_decodes_to_nothing() -> None:
    assert decode_frame(frame(E10)) == []
    assert decode_frame(b"") == []


def test_e11_full_orjson_payload() -> None:
    (tick,) = decode_frame(frame(E11_FULL))
    payload = orjson.loads(orjson.dumps(tick))
    assert payload["last_trade_time"] == "2022-06-16T15:57:44+05:30"
    assert payload["exchange_timestamp"] == "2022-06-16T16:48:48+05:30"
    assert payload["depth"]["buy"][0] == {"quantity": 5617, "price": 392.95, "orders": 30}


# ---------------------------------------------------------------------------------------------
# kiteconnect-mocks (zerodha/kiteconnect-mocks c7a8123, copied unchanged into
# /work/shared/kite-mocks; embedded here so the tests need nothing outside the repository).
# The packets carry no frame header. The JSON uses pre-v4 key names and Go's absolute change.

MOCK_FULL_PACKET = (
    "AAY6AQACZroAAAAHAAJlbQASMhcAA+m7AAWKAQACZPMAAmc8AAJhyQACZGxg4pR/AAAAAAAAAAAAAAAAYOKUfwAAAAUAAm"
    "acAAEAAAAAAIwAAmZ0AAIAAAAAAAIAAmZvAAEAAAAAANsAAmZqAAcAAAAAADIAAmZlAAEAAAAAAKwAAma6AAMAAAAAACwA"
    "Ama/AAMAAAAAAS4AAmbJAAMAAAAAAI0AAmbOAAIAAAAAAtQAAmbTAAUAAA=="
)
MOCK_QUOTE_PACKET = "AAY6AQACZoMAAAABAAJlaQAR8bIAA+n/AAWANwACZPMAAmc8AAJhyQACZGw="
MOCK_OHLC = {"open": 1569.15, "high": 1575, "low": 1561.05, "close": 1567.8}
MOCK_LTP_JSON: dict[str, Any] = {
    "mode": "ltp",
    "tradable": True,
    "instrument_token": 408065,
    "last_price": 1573.15,
}
MOCK_QUOTE_JSON: dict[str, Any] = {
    "mode": "quote",
    "tradable": True,
    "instrument_token": 408065,
    "last_price": 1573.15,
    "last_quantity": 1,
    "average_price": 1570.33,
    "volume": 1175986,
    "buy_quantity": 256511,
    "sell_quantity": 360503,
    "ohlc": MOCK_OHLC,
    "change": 5.900000000000091,
}
MOCK_FULL_JSON: dict[str, Any] = {
    "mode": "full",
    "tradable": True,
    "instrument_token": 408065,
    "last_price": 1573.7,
    "last_quantity": 7,
    "average_price": 1570.37,
    "volume": 1192471,
    "buy_quantity": 256443,
    "sell_quantity": 363009,
    "ohlc": MOCK_OHLC,
    "last_trade_time": "2021-07-05T10:41:27+05:30",
    "oi": 0,
    "oi_day_high": 0,
    "oi_day_low": 0,
    "timestamp": "2021-07-05T10:41:27+05:30",
    "change": 5.900000000000091,
    "depth": {
        "buy": [
            {"price": 1573.4, "quantity": 5, "orders": 1},
            {"price": 1573, "quantity": 140, "orders": 2},
            {"price": 1572.95, "quantity": 2, "orders": 1},
            {"price": 1572.9, "quantity": 219, "orders": 7},
            {"price": 1572.85, "quantity": 50, "orders": 1},
        ],
        "sell": [
            {"price": 1573.7, "quantity": 172, "orders": 3},
            {"price": 1573.75, "quantity": 44, "orders": 3},
            {"price": 1573.85, "quantity": 302, "orders": 3},
            {"price": 1573.9, "quantity": 141, "orders": 2},
            {"price": 1573.95, "quantity": 724, "orders": 5},
        ],
    },
}
OLD_KEYS = {
    "last_quantity": "last_traded_quantity",
    "average_price": "average_traded_price",
    "volume": "volume_traded",
    "buy_quantity": "total_buy_quantity",
    "sell_quantity": "total_sell_quantity",
    "timestamp": "exchange_timestamp",
}


def published_shape(mock: dict[str, Any]) -> dict[str, Any]:
    """The mock JSON with today's key names and the percent change pykiteconnect computes."""
    payload = {OLD_KEYS.get(key, key): value for key, value in mock.items()}
    if "change" in payload:
        close = payload["ohlc"]["close"]
        payload["change"] = (payload["last_price"] - close) * 100 / close
    return payload


def framed(packet_b64: str) -> bytes:
    return encode_raw_frame([base64.b64decode(packet_b64)])


@pytest.mark.parametrize(
    ("data", "mock"),
    [
        (frame(E1), MOCK_LTP_JSON),
        (framed(MOCK_QUOTE_PACKET), MOCK_QUOTE_JSON),
        (framed(MOCK_FULL_PACKET), MOCK_FULL_JSON),
    ],
    ids=["ltp", "quote", "full"],
)
def test_decodes_kiteconnect_mocks(data: bytes, mock: dict[str, Any]) -> None:
    (tick,) = decode_frame(data)
    assert orjson.loads(orjson.dumps(tick)) == published_shape(mock)
    assert encode_frame([tick]) == data
    # The payload path gives the same bytes as serialising the record.
    assert frame_payloads(data) == [(408065, tick_json(tick))]


def test_mock_change_is_percent_not_go_absolute() -> None:
    (tick,) = decode_frame(framed(MOCK_FULL_PACKET))
    assert isinstance(tick, FullTick)
    assert tick.change == (1573.7 - 1567.8) * 100 / 1567.8
    assert tick.change != MOCK_FULL_JSON["change"]
