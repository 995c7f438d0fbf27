"""Published JSON: ticks exactly as CONTRACT §3, events and command results as §4/§5."""

from __future__ import annotations

import json
import tracemalloc
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from bridge.commands import MAX_COMMAND_BYTES
from bridge.kite.codec import decode_frame
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
)
from bridge.payload import (
    command_result,
    command_text,
    dead_letter,
    event_json,
    now_iso,
    readable_subscriptions,
    tick_json,
)
from bridge.simulator.market import Market

# CONTRACT.md §3, verbatim.
CONTRACT_QUOTE = """
{"tradable": true, "mode": "quote", "instrument_token": 408065, "last_price": 1573.15,
 "last_traded_quantity": 1, "average_traded_price": 1570.33, "volume_traded": 1175986,
 "total_buy_quantity": 256511, "total_sell_quantity": 360503,
 "ohlc": {"open": 1569.15, "high": 1575.0, "low": 1561.05, "close": 1567.8},
 "change": 0.3412425054216186}
"""
# kite-protocol.md E11: the kiteconnect-mocks INFY packets (no frame header).
MOCK_QUOTE_PACKET = (
    "00063a010002668300000001000265690011f1b20003e9ff00058037000264f30002673c000261c90002646c"
)
MOCK_FULL_PACKET = (
    "00063a01000266ba000000070002656d001232170003e9bb00058a01000264f30002673c000261c90002646c"
    "60e2947f00000000000000000000000060e2947f000000050002669c000100000000008c0002667400020000"
    "000000020002666f00010000000000db0002666a00070000000000320002666500010000000000ac000266ba"
    "000300000000002c000266bf000300000000012e000266c9000300000000008d000266ce00020000000002d4"
    "000266d300050000"
)


def framed(packet_hex: str) -> bytes:
    packet = bytes.fromhex(packet_hex.replace(" ", ""))
    return b"\x00\x01" + len(packet).to_bytes(2, "big") + packet


def quote_tick() -> QuoteTick:
    return QuoteTick(
        tradable=True,
        mode="quote",
        instrument_token=408065,
        last_price=1573.15,
        last_traded_quantity=1,
        average_traded_price=1570.33,
        volume_traded=1175986,
        total_buy_quantity=256511,
        total_sell_quantity=360503,
        ohlc=Ohlc(open=1569.15, high=1575.0, low=1561.05, close=1567.8),
        change=(1573.15 - 1567.8) * 100 / 1567.8,
    )


def test_quote_tick_is_byte_for_byte_the_contract_example() -> None:
    expected = json.loads(CONTRACT_QUOTE)
    assert tick_json(quote_tick()) == orjson.dumps(expected)
    assert list(orjson.loads(tick_json(quote_tick()))) == list(expected)


def test_decoded_mock_quote_packet_publishes_the_contract_example() -> None:
    (tick,) = decode_frame(framed(MOCK_QUOTE_PACKET))
    assert tick_json(tick) == orjson.dumps(json.loads(CONTRACT_QUOTE))


def test_decoded_mock_full_packet_has_ist_timestamps_and_depth() -> None:
    (tick,) = decode_frame(framed(MOCK_FULL_PACKET))
    payload = orjson.loads(tick_json(tick))
    assert list(payload) == [
        "tradable", "mode", "instrument_token", "last_price", "last_traded_quantity",
        "average_traded_price", "volume_traded", "total_buy_quantity", "total_sell_quantity",
        "ohlc", "change", "last_trade_time", "oi", "oi_day_high", "oi_day_low",
        "exchange_timestamp", "depth",
    ]  # fmt: skip
    assert payload["mode"] == "full"
    assert payload["last_price"] == 1573.7
    assert payload["last_trade_time"] == "2021-07-05T10:41:27+05:30"
    assert payload["exchange_timestamp"] == "2021-07-05T10:41:27+05:30"
    assert payload["depth"]["buy"][0] == {"quantity": 5, "price": 1573.4, "orders": 1}
    assert payload["depth"]["sell"][4] == {"quantity": 724, "price": 1573.95, "orders": 5}
    assert payload["change"] == pytest.approx((1573.7 - 1567.8) * 100 / 1567.8)


def test_ltp_tick_has_only_the_four_ltp_keys() -> None:
    tick = LtpTick(tradable=True, mode="ltp", instrument_token=408065, last_price=1573.15)
    assert tick_json(tick) == (
        b'{"tradable":true,"mode":"ltp","instrument_token":408065,"last_price":1573.15}'
    )


def test_index_ticks() -> None:
    ohlc = Ohlc(open=23344.45, high=23441.95, low=23295.95, close=23264.85)
    quote = IndexQuoteTick(False, "quote", 256265, 23406.85, ohlc, 0.6103628435171514)
    assert orjson.loads(tick_json(quote)) == {
        "tradable": False,
        "mode": "quote",
        "instrument_token": 256265,
        "last_price": 23406.85,
        "ohlc": {"open": 23344.45, "high": 23441.95, "low": 23295.95, "close": 23264.85},
        "change": 0.6103628435171514,
    }
    at = datetime(2024, 6, 12, 12, 46, 9, tzinfo=IST)
    full = IndexFullTick(False, "full", 256265, 23406.85, ohlc, 0.61, at)
    assert orjson.loads(tick_json(full))["exchange_timestamp"] == "2024-06-12T12:46:09+05:30"


def test_missing_timestamps_are_null() -> None:
    level = DepthLevel(quantity=0, price=0.0, orders=0)
    tick = FullTick(
        **vars(quote_tick()) | {"mode": "full"},
        last_trade_time=None,
        oi=0,
        oi_day_high=0,
        oi_day_low=0,
        exchange_timestamp=None,
        depth=Depth(buy=[level] * 5, sell=[level] * 5),
    )
    payload = orjson.loads(tick_json(tick))
    assert payload["last_trade_time"] is None
    assert payload["exchange_timestamp"] is None
    assert b'"exchange_timestamp":null' in tick_json(tick)


# -- events ----------------------------------------------------------------------------------------


def test_event_has_event_first_and_at_last_with_an_offset() -> None:
    before = datetime.now(UTC)
    payload = orjson.loads(event_json("disconnected", code=1006, reason="abnormal"))
    assert list(payload) == ["event", "code", "reason", "at"]
    assert payload["event"] == "disconnected"
    at = datetime.fromisoformat(payload["at"])
    assert at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= at <= datetime.now(UTC) + timedelta(seconds=1)


def test_event_at_can_be_given() -> None:
    payload = orjson.loads(event_json("stopped", at="2026-01-01T00:00:00+00:00"))
    assert payload == {"event": "stopped", "at": "2026-01-01T00:00:00+00:00"}


def test_event_fields_may_have_integer_keys_and_datetimes() -> None:
    at = datetime(2024, 6, 12, 12, 46, 9, tzinfo=IST)
    payload = orjson.loads(event_json("kite_message", data={1: "x"}, when=at))
    assert payload["data"] == {"1": "x"}
    assert payload["when"] == "2024-06-12T12:46:09+05:30"


def test_now_iso_is_utc_milliseconds() -> None:
    text = now_iso()
    assert text.endswith("+00:00")
    assert len(text.split(".")[1]) == len("123+00:00")


def test_command_result_has_the_contract_keys_in_order() -> None:
    raw = b'{"id": "a1", "action": "subscribe", "mode": "full", "tokens": [256265]}'
    payload = orjson.loads(
        command_result(raw, ok=True, id="a1", subscriptions={408065: "ltp", 256265: "full"})
    )
    assert list(payload) == ["event", "id", "command", "ok", "error", "subscriptions", "at"]
    assert payload["event"] == "command"
    assert payload["id"] == "a1"
    assert payload["command"] == raw.decode()
    assert payload["ok"] is True
    assert payload["error"] is None
    assert payload["subscriptions"] == {"256265": "full", "408065": "ltp"}
    assert list(payload["subscriptions"]) == ["256265", "408065"]


def test_rejected_command_result() -> None:
    payload = orjson.loads(
        command_result(b"subscribe \xff", ok=False, error="command is not valid UTF-8")
    )
    assert payload["command"] == "subscribe \ufffd"
    assert payload["ok"] is False
    assert payload["error"] == "command is not valid UTF-8"
    assert payload["id"] is None
    assert payload["subscriptions"] is None


def test_readable_subscriptions_sorts_tokens_numerically() -> None:
    assert list(readable_subscriptions({10: "ltp", 9: "full", 100: "quote"})) == ["9", "10", "100"]


def test_command_text_caps_oversized_input() -> None:
    assert command_text("list") == "list"
    long = command_text(b"x" * (MAX_COMMAND_BYTES + 10))
    assert long.startswith("x" * MAX_COMMAND_BYTES)
    assert long.endswith("...[truncated]")
    assert len(long) < MAX_COMMAND_BYTES + 20


def test_dead_letter() -> None:
    payload = orjson.loads(dead_letter("jump 1", "unknown command 'jump'", at="t"))
    assert payload == {"command": "jump 1", "error": "unknown command 'jump'", "at": "t"}
    assert "at" in orjson.loads(dead_letter("x", "y"))


def test_payloads_held_in_memory_cost_their_size_not_the_encoder_buffer() -> None:
    """The publisher keeps up to 10,000 payloads: each must not pin an 8 KB encoder buffer."""
    tick = Market(seed=3).tick(408065, "full")
    size = len(tick_json(tick))
    tracemalloc.start()
    try:
        kept = [tick_json(tick) for _ in range(1000)]
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(kept) == 1000
    assert held < 1000 * (size + 200)
