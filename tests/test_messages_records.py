"""Text-frame records: every kind is frozen, not only ``KiteError`` (mutation audit)."""

from __future__ import annotations

import dataclasses

import pytest

from bridge.kite.messages import (
    InvalidText,
    KiteError,
    KiteMessage,
    OrderUpdate,
    OtherMessage,
    TextMessage,
    parse_text_frame,
)


@pytest.mark.parametrize(
    "record",
    [
        OrderUpdate({"order_id": "1"}),
        KiteError("x"),
        KiteMessage("x"),
        OtherMessage("notice", "x"),
        InvalidText("x", "not JSON"),
        parse_text_frame('{"type": "message", "data": "hi"}'),
    ],
)
def test_every_text_record_is_frozen(record: TextMessage) -> None:
    name = dataclasses.fields(record)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(record, name, "changed")
