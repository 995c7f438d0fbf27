"""Text frames: server messages in (never raising), client requests out (exact JSON)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.kite.messages import (
    InvalidText,
    KiteError,
    KiteMessage,
    OrderUpdate,
    OtherMessage,
    mode_message,
    parse_text_frame,
    subscribe_message,
    unsubscribe_message,
)

ORDER = {
    "user_id": "AB1234",
    "order_id": "220303000308932",
    "status": "COMPLETE",
    "instrument_token": 779521,
    "average_price": 470,
    "meta": {},
    "tag": None,
}


@pytest.mark.parametrize("as_bytes", [False, True])
def test_order_update(as_bytes: bool) -> None:
    text = orjson.dumps({"type": "order", "data": ORDER}).decode()
    assert parse_text_frame(text.encode() if as_bytes else text) == OrderUpdate(ORDER)


def test_error_and_message() -> None:
    assert parse_text_frame('{"type": "error", "data": "max tokens exceeded"}') == KiteError(
        "max tokens exceeded"
    )
    assert parse_text_frame(b'{"data": "Market closes at 15:30", "type": "message"}') == (
        KiteMessage("Market closes at 15:30")
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "not JSON"),
        ("", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        ("[1, 2]", "not a JSON object but list"),
        ('"order"', "not a JSON object but str"),
        ("null", "not a JSON object but NoneType"),
        ('{"data": "x"}', "no message type: 'type' is None"),
        ('{"type": ["order"], "data": {}}', "no message type: 'type' is ['order']"),
        ('{"type": "", "data": {}}', "no message type: 'type' is ''"),
        ('{"type": "quote"}', "quote message has no data"),
        ('{"type": "order"}', "order message has no data"),
        ('{"type": "order", "data": "filled"}', "order data is str, not an object"),
        ('{"type": "order", "data": null}', "order data is NoneType"),
        ('{"type": "order", "data": {}}', "order data is an empty object"),
        ('{"type": "message"}', "message message has no data"),
    ],
)
def test_invalid_text(text: str | bytes, reason: str) -> None:
    parsed = parse_text_frame(text)
    assert isinstance(parsed, InvalidText)
    assert reason in parsed.reason
    expected_raw = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    assert parsed.raw == expected_raw


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)
ENVELOPES = st.fixed_dictionaries(
    {"type": st.sampled_from(["order", "error", "message", "other"]) | JSON_VALUES},
    optional={"data": JSON_VALUES},
)
FRAMES = st.one_of(
    st.text(),
    st.binary(),
    JSON_VALUES.map(orjson.dumps),
    ENVELOPES.map(lambda envelope: orjson.dumps(envelope).decode()),
)


@settings(deadline=None)
@given(FRAMES)
def test_parse_never_raises(data: str | bytes) -> None:
    parsed = parse_text_frame(data)
    assert isinstance(parsed, OrderUpdate | KiteError | KiteMessage | OtherMessage | InvalidText)


@pytest.mark.parametrize(
    ("text", "kind", "data"),
    [
        ('{"type": "quote", "data": {}}', "quote", {}),
        ('{"type": "notice", "data": "market closes early"}', "notice", "market closes early"),
        ('{"data": [1, 2], "type": "Order"}', "Order", [1, 2]),  # types are case-sensitive
        ('{"type": "x", "data": null, "extra": 1}', "x", None),
        # Documented as strings; other shapes are passed on as sent, not dropped.
        ('{"type": "error", "data": {"code": 1}}', "error", {"code": 1}),
        ('{"type": "message", "data": 5}', "message", 5),
    ],
)
def test_undocumented_types_are_passed_on_not_rejected(text: str, kind: str, data: object) -> None:
    assert parse_text_frame(text) == OtherMessage(kind, data)


def test_records_are_frozen() -> None:
    message = KiteError("x")
    with pytest.raises(AttributeError):
        message.message = "y"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Client requests


def test_exact_client_json() -> None:
    assert subscribe_message([408065, 884737]) == '{"a":"subscribe","v":[408065,884737]}'
    assert unsubscribe_message([884737]) == '{"a":"unsubscribe","v":[884737]}'
    assert mode_message("full", [408065]) == '{"a":"mode","v":["full",[408065]]}'
    assert mode_message("ltp", (1, 2)) == '{"a":"mode","v":["ltp",[1,2]]}'
    assert mode_message("quote", []) == '{"a":"mode","v":["quote",[]]}'
    assert subscribe_message([0, 2**32 - 1]) == '{"a":"subscribe","v":[0,4294967295]}'


@pytest.mark.parametrize(
    "tokens",
    [[True], [1.0], ["408065"], [None], [-1], [2**32], "408065", b"\x01", 408065, {1, 2}],
)
def test_bad_tokens_are_rejected(tokens: Any) -> None:
    with pytest.raises(ValueError, match="token"):
        subscribe_message(tokens)
    with pytest.raises(ValueError, match="token"):
        unsubscribe_message(tokens)
    with pytest.raises(ValueError, match="token"):
        mode_message("full", tokens)


@pytest.mark.parametrize("mode", ["FULL", "snap", "", None, ["full"]])
def test_bad_mode_is_rejected(mode: Any) -> None:
    with pytest.raises(ValueError, match="mode"):
        mode_message(mode, [408065])
