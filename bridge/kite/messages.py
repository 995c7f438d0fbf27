"""Text frames of the Kite ticker protocol (kite-protocol.md §2, §5), both directions.

Pure: the feed hands in what the server sent and sends out what these functions return.
Server text is parsed into a closed set of small records and never raises, because one odd
message from the broker must not tear down a market-data connection; the unparseable ones come
back as :class:`InvalidText` so the caller can log and count them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, get_args

import orjson

from bridge.kite.records import Mode

__all__ = [
    "InvalidText",
    "KiteError",
    "KiteMessage",
    "OrderUpdate",
    "OtherMessage",
    "TextMessage",
    "mode_message",
    "parse_text_frame",
    "subscribe_message",
    "unsubscribe_message",
]

_MODES: Final = frozenset(get_args(Mode))
_UINT32_MAX: Final = 0xFFFF_FFFF


@dataclass(frozen=True)
class OrderUpdate:
    """``{"type": "order"}``: the order postback payload, as the server sent it."""

    data: dict[str, Any]


@dataclass(frozen=True)
class KiteError:
    """``{"type": "error"}``: an error string from the server (e.g. too many tokens)."""

    message: str


@dataclass(frozen=True)
class KiteMessage:
    """``{"type": "message"}``: a notice or alert from the broker."""

    message: str


@dataclass(frozen=True)
class OtherMessage:
    """A well-formed envelope of a type Kite has not documented (yet).

    Passed on like Aio-Trader v0.2.0 does (kite-protocol.md §5), not reported as malformed: a
    new kind of notice from the broker is news, not an error.
    """

    type: str
    data: Any


@dataclass(frozen=True)
class InvalidText:
    """A text frame that is not one of the documented messages; ``reason`` says why."""

    raw: str
    reason: str


TextMessage: TypeAlias = OrderUpdate | KiteError | KiteMessage | OtherMessage | InvalidText


def parse_text_frame(data: str | bytes) -> TextMessage:
    """Classify one server text frame; never raises."""
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data).decode("utf-8", errors="replace")
    else:
        raw = data
    try:
        envelope = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return InvalidText(raw, f"not JSON: {exc}")
    if not isinstance(envelope, dict):
        return InvalidText(raw, f"not a JSON object but {type(envelope).__name__}")
    kind = envelope.get("type")
    if not isinstance(kind, str) or not kind:
        return InvalidText(raw, f"no message type: 'type' is {kind!r}")
    if "data" not in envelope:
        return InvalidText(raw, f"{kind} message has no data")
    payload = envelope["data"]
    if kind not in ("order", "error", "message"):
        return OtherMessage(kind, payload)
    if kind == "order":
        if isinstance(payload, dict) and payload:
            return OrderUpdate(payload)
        if isinstance(payload, dict):  # pykiteconnect skips it too: nothing to update
            return InvalidText(raw, "order data is an empty object")
        return InvalidText(raw, f"order data is {type(payload).__name__}, not an object")
    if not isinstance(payload, str):
        # Documented as a string, but a notice in another shape is still news: passed on as
        # sent, like an undocumented type (Aio-Trader v0.2.0 hands on the whole envelope).
        return OtherMessage(kind, payload)
    return KiteError(payload) if kind == "error" else KiteMessage(payload)


def _tokens(tokens: Sequence[int]) -> list[int]:
    if isinstance(tokens, str | bytes | bytearray) or not isinstance(tokens, Sequence):
        raise ValueError(f"tokens must be a sequence of ints, not {type(tokens).__name__}")
    checked = []
    for token in tokens:
        if isinstance(token, bool) or not isinstance(token, int):
            raise ValueError(f"instrument token {token!r} is not an int")
        if not 0 <= token <= _UINT32_MAX:
            raise ValueError(f"instrument token {token} is outside the uint32 range")
        checked.append(int(token))
    return checked


def _dumps(action: str, value: object) -> str:
    # Compact like the Go and JS clients: {"a":"subscribe","v":[408065]}.
    return orjson.dumps({"a": action, "v": value}).decode()


def subscribe_message(tokens: Sequence[int]) -> str:
    """``subscribe`` request; the server starts these tokens in ``quote`` mode."""
    return _dumps("subscribe", _tokens(tokens))


def unsubscribe_message(tokens: Sequence[int]) -> str:
    """``unsubscribe`` request."""
    return _dumps("unsubscribe", _tokens(tokens))


def mode_message(mode: Mode, tokens: Sequence[int]) -> str:
    """``mode`` request: ``{"a":"mode","v":["full",[408065]]}``."""
    if not isinstance(mode, str) or mode not in _MODES:
        raise ValueError(f"mode must be one of ltp, quote, full, not {mode!r}")
    return _dumps("mode", [mode, _tokens(tokens)])
