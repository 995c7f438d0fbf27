"""Binary codec of the Kite ticker protocol (kite-protocol.md §3): bytes in, ticks out.

Pure and Sans-I/O, so the feed, the simulator and the tests share one implementation.

Malformed input policy (also in docs/codec.md):

* a frame shorter than 2 bytes is a heartbeat and decodes to ``[]``;
* a packet of an unknown length is skipped on its own: its length prefix says exactly where the
  next packet starts, so newer server packet kinds cannot break older clients (the official
  clients do the same). Callers that want to count them pass a ``skipped`` list;
* structural corruption (a packet count or length prefix cut short, a declared length running
  past the end of the frame, bytes left over after the declared packets) raises
  :class:`FrameError`. Nothing else escapes, and no value is ever guessed: once the framing is
  wrong, no packet boundary in the frame can be trusted.

Two outputs share that one framing walk (:func:`_walk`): :func:`decode_frame` gives the records
of ``records.py``; :func:`frame_payloads` gives each tick's CONTRACT §3 JSON, byte for byte
``payload.tick_json(record)``, without building the records: the bridge's hot path, ~1.8x faster
than records + ``tick_json``: the 13 records of a full tick are GC-tracked objects kept alive
until serialised, while the dicts (mostly untracked) serialise a little faster and die at once.

Each packet kind is described once, in ``_PACKETS``: its :class:`struct.Struct` and the record's
constructor call spelled with struct value indices. At import that description is compiled, the
way ``dataclasses`` compiles ``__init__``, into a record decoder and a payload decoder whose dict
keys are the records' ``dataclasses.fields()``, so the two outputs cannot drift apart. Generated
rather than one hand-written decoder per kind taking the constructors as parameters, because the
payload decoder then builds dict literals instead of making 13 builder calls per full tick:
~259k against ~236k full ticks/s (records then ``tick_json`` per packet: ~175k; docs/codec.md).
The record decoders are the code that used to be hand-written (unpacked into locals: ~3% faster).

Other speed choices: one precompiled ``struct`` per kind, divisors in a tuple indexed by the
segment byte, and epoch seconds turned into datetimes (or ISO text) through small bounded caches,
because every tick of the same second shares its timestamps.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, is_dataclass
from datetime import datetime
from typing import (
    Any,
    Final,
    Literal,
    TypeAlias,
    TypeVar,
    get_args,
    get_origin,
    get_type_hints,
)

import orjson

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

__all__ = [
    "FULL_LENGTH",
    "INDEX_FULL_LENGTH",
    "INDEX_QUOTE_LENGTH",
    "LTP_LENGTH",
    "QUOTE_LENGTH",
    "Buffer",
    "FrameError",
    "decode_frame",
    "encode_frame",
    "encode_packet",
    "encode_raw_frame",
    "frame_payloads",
    "segment_divisor",
    "unsigned_prices",
]

LTP_LENGTH: Final = 8
INDEX_QUOTE_LENGTH: Final = 28
INDEX_FULL_LENGTH: Final = 32
QUOTE_LENGTH: Final = 44
FULL_LENGTH: Final = 184

#: Segment byte of index tokens: indices are not tradable.
_INDICES_SEGMENT: Final = 9

# Token, quantities, volume, OI and timestamps are uint32 (kite-protocol §3.3-3.7). Prices (``$``
# below) are read as int32 in the segments divided by 100 and as uint32 in those divided by 1e4 or
# 1e7: a raw value >= 2**31 is either negative or very large, and which one is real depends on the
# divisor. Divided by 100 it would be a price above 21,474,836.47 (none trades there) or a negative
# one (MCX crude settled at -37 USD in April 2020), so signed. Divided by 1e4 it would be a price
# above 2,14,748.3647 (NSE commodity silver is quoted per kg, near that level) or a negative
# currency or commodity price, so unsigned, as pykiteconnect reads every price. The index packets'
# absolute change (value 6) is signed in every segment.
_U16: Final = struct.Struct(">H")
_LTP_FORMAT: Final = ">I$"
# token, ltp, high, low, open, close, absolute change [, exchange timestamp]
_INDEX_QUOTE_FORMAT: Final = ">I$$$$$i"
_INDEX_FULL_FORMAT: Final = _INDEX_QUOTE_FORMAT + "I"
# token, ltp, ltq, atp, volume, total buy, total sell, open, high, low, close
_QUOTE_FORMAT: Final = ">I$I$III$$$$"
# + last trade time, oi, oi day high, oi day low, exchange timestamp, 10 x (qty, price, orders, pad)
_FULL_FORMAT: Final = _QUOTE_FORMAT + "IIIII" + "I$H2x" * 10

_DIVISORS: Final[dict[int, int]] = {3: 10_000_000, 6: 10_000, 12: 10_000}
_DEFAULT_DIVISOR: Final = 100


@dataclass(frozen=True)
class _Layout:
    """One packet kind's struct in both price readings: signed and unsigned."""

    signed: struct.Struct
    unsigned: struct.Struct

    @classmethod
    def of(cls, template: str) -> _Layout:
        return cls(
            struct.Struct(template.replace("$", "i")), struct.Struct(template.replace("$", "I"))
        )

    def for_token(self, token: int) -> struct.Struct:
        return self.unsigned if unsigned_prices(token) else self.signed


_LTP: Final = _Layout.of(_LTP_FORMAT)
_INDEX_QUOTE: Final = _Layout.of(_INDEX_QUOTE_FORMAT)
_INDEX_FULL: Final = _Layout.of(_INDEX_FULL_FORMAT)
_QUOTE: Final = _Layout.of(_QUOTE_FORMAT)
_FULL: Final = _Layout.of(_FULL_FORMAT)


#: What :func:`decode_frame` reads: websocket libraries hand out bytes, tests also use views.
Buffer: TypeAlias = bytes | bytearray | memoryview


class FrameError(ValueError):
    """A binary frame whose structure is corrupt: its packets cannot be located reliably."""


def segment_divisor(token: int) -> int:
    """Price divisor of an instrument: CDS 1e7, BCD and NCO 1e4, every other segment 100."""
    return _DIVISORS.get(token & 0xFF, _DEFAULT_DIVISOR)


def unsigned_prices(token: int) -> bool:
    """Whether the instrument's raw prices are uint32 (divisor above 100) rather than int32.

    So the prices the wire can carry are ``0 .. (2**32 - 1) / divisor`` for CDS, BCD and NCO and
    ``-2**31 / 100 .. (2**31 - 1) / 100`` elsewhere (see the formats above for why).
    """
    return segment_divisor(token) != _DEFAULT_DIVISOR


# Indexed by the segment byte: one tuple lookup per packet instead of a call and a dict miss.
_DIVISOR_BY_SEGMENT: Final[tuple[float, ...]] = tuple(
    float(segment_divisor(segment)) for segment in range(256)
)

# ---------------------------------------------------------------------------------------------
# Timestamps. Ticks arrive in time order, so when a cache is full dropping everything is as good
# as LRU here and costs nothing per hit.


_TIMESTAMP_CACHE_SIZE: Final = 4096
_timestamps: dict[int, datetime] = {}
_iso_timestamps: dict[int, str] = {}


def _timestamp(raw: int) -> datetime | None:
    """Epoch seconds to an aware IST datetime (``None`` for 0), through a bounded cache."""
    if raw == 0:
        return None
    if len(_timestamps) >= _TIMESTAMP_CACHE_SIZE:
        _timestamps.clear()
    moment = _timestamps[raw] = datetime.fromtimestamp(raw, IST)
    return moment


def _iso_timestamp(raw: int) -> str | None:
    """Epoch seconds to the text orjson writes for :func:`_timestamp`'s datetime, cached."""
    if raw == 0:
        return None
    if len(_iso_timestamps) >= _TIMESTAMP_CACHE_SIZE:
        _iso_timestamps.clear()
    # orjson's own rendering (quotes stripped), so it cannot differ from serialising the record.
    text = _iso_timestamps[raw] = orjson.dumps(datetime.fromtimestamp(raw, IST))[1:-1].decode()
    return text


# ---------------------------------------------------------------------------------------------
# Packet kinds: the one description of each, compiled into both decoders below.
#
# A spec is the record's constructor call: ``(RecordClass, argument, ...)`` with one argument per
# dataclass field, in field order. An ``int`` argument is the index of a value unpacked by the
# kind's struct, converted by the field's type: ``float`` fields are prices (divided by the
# segment divisor), ``datetime | None`` fields epoch seconds (0 is ``None``), ``int`` fields are
# taken as they are. A nested tuple is a nested record, a list a list of them, a ``str`` a
# constant, and the two markers below the derived fields.


class _Tradable:
    """``tradable``: every segment but the indices'."""


@dataclass(frozen=True)
class _Change:
    """``change``: percent change of the price at index ``last`` against the one at ``close``."""

    last: int
    close: int


_Spec: TypeAlias = tuple[Any, ...]

_TRADABLE: Final = _Tradable()


# Full packets: 5 buy then 5 sell levels from value 16 on, each (quantity, price, orders); the
# padding after ``orders`` is not unpacked.
_DEPTH: Final = tuple(
    [(DepthLevel, index, index + 1, index + 2) for index in range(side, side + 15, 3)]
    for side in (16, 31)
)


# What the index packets and the quote and full packets start with, after tradable and mode. The
# index packets' value 6, an absolute change in raw units, is not published.
_INDEX_HEAD: Final = (0, 1, (Ohlc, 4, 2, 3, 5), _Change(1, 5))
_QUOTE_HEAD: Final = (0, 1, 2, 3, 4, 5, 6, (Ohlc, 7, 8, 9, 10), _Change(1, 10))

_PACKETS: Final[dict[int, tuple[_Layout, _Spec]]] = {
    LTP_LENGTH: (_LTP, (LtpTick, _TRADABLE, "ltp", 0, 1)),
    INDEX_QUOTE_LENGTH: (_INDEX_QUOTE, (IndexQuoteTick, _TRADABLE, "quote", *_INDEX_HEAD)),
    INDEX_FULL_LENGTH: (_INDEX_FULL, (IndexFullTick, _TRADABLE, "full", *_INDEX_HEAD, 7)),
    QUOTE_LENGTH: (_QUOTE, (QuoteTick, _TRADABLE, "quote", *_QUOTE_HEAD)),
    FULL_LENGTH: (
        _FULL,
        (FullTick, _TRADABLE, "full", *_QUOTE_HEAD, 11, 12, 13, 14, 15, (Depth, *_DEPTH)),
    ),
}

# ---------------------------------------------------------------------------------------------
# The generator. Every packet starts with the instrument token, value 0 (``v0`` below), whose low
# byte, the packet's fourth, is the segment: it picks the struct (signed or unsigned prices) before
# unpacking. For the 184-byte packet the record decoder reads
#
#     segment = data[offset + 3]
#     v0, v1, ..., v45 = unpackers[segment](data, offset)
#     divisor = divisors[segment]
#     p1 = v1 / divisor
#     p10 = v10 / divisor
#     return FullTick(segment != 9, 'full', v0, p1, v2, v3 / divisor, ...)
#
# and the payload decoder ends in ``return v0, bytes(memoryview(dumps({'tradable': segment != 9,
# 'mode': 'full', ...})))``. ``print(codec._SOURCES[184, True])`` shows the whole payload decoder.

#: The names generated code uses, bound as closure variables (as cheap to read as locals).
_NAMES: Final[dict[str, object]] = {
    "divisors": _DIVISOR_BY_SEGMENT,
    "time_get": _timestamps.get,
    "time": _timestamp,
    "iso_get": _iso_timestamps.get,
    "iso": _iso_timestamp,
    "dumps": orjson.dumps,
    **{cls.__name__: cls for cls in (LtpTick, IndexQuoteTick, IndexFullTick, QuoteTick, FullTick)},
    **{cls.__name__: cls for cls in (Ohlc, Depth, DepthLevel)},
}
#: Generated source by (packet length, payload?), for reading and debugging.
_SOURCES: dict[tuple[int, bool], str] = {}


def _changes(node: Any) -> Iterable[_Change]:
    if isinstance(node, _Change):
        yield node
    elif isinstance(node, tuple | list):
        for item in node:
            yield from _changes(item)


class _Writer:
    """Writes the Python expression of a spec, for records or for payloads."""

    def __init__(self, length: int, values: int, spec: _Spec, *, payload: bool) -> None:
        self.length = length
        self.values = values  # how many values the kind's struct unpacks
        self.payload = payload
        # Prices ``change`` also uses: divided once, into locals.
        self.hoisted = {index for change in _changes(spec) for index in (change.last, change.close)}

    def price(self, index: int) -> str:
        return f"p{index}" if index in self.hoisted else f"v{index} / divisor"

    def expression(self, node: Any, hint: Any) -> str:
        """The expression of ``node`` for a field of type ``hint``; TypeError if it cannot be."""
        if isinstance(node, tuple) and node[0] is hint and is_dataclass(hint):
            return self.record(node)
        if isinstance(node, list) and get_origin(hint) is list:
            (item_hint,) = get_args(hint)
            return "[" + ", ".join(self.expression(item, item_hint) for item in node) + "]"
        if isinstance(node, _Tradable) and hint is bool:
            return f"segment != {_INDICES_SEGMENT}"
        if isinstance(node, _Change) and hint is float:
            last, close = self.price(node.last), self.price(node.close)
            # pykiteconnect's operations in its order, so the floats match bit for bit; "+ 0.0"
            # turns the -0.0 of an unchanged negative close into 0.0 and changes nothing else.
            return f"({last} - {close}) * 100 / {close} + 0.0 if {close} else 0.0"
        if isinstance(node, str) and get_origin(hint) is Literal and node in get_args(hint):
            return repr(node)
        if type(node) is int and 0 <= node < self.values:
            if hint is float:
                return self.price(node)
            if hint is int:
                return f"v{node}"
            if hint == datetime | None:
                cached, convert = ("iso_get", "iso") if self.payload else ("time_get", "time")
                return f"({cached}(v{node}) or {convert}(v{node}))"
        raise TypeError(f"{self.length}-byte spec: {node!r} cannot give a {hint}")

    def record(self, node: _Spec) -> str:
        cls, *arguments = node
        names = [field.name for field in fields(cls)]
        if len(arguments) != len(names):
            raise TypeError(f"{self.length}-byte spec: {cls.__name__} has {len(names)} fields")
        hints = get_type_hints(cls)
        parts = [self.expression(arguments[i], hints[name]) for i, name in enumerate(names)]
        if not self.payload:
            return f"{cls.__name__}({', '.join(parts)})"
        # The payload's keys are the record's field names, in the record's order.
        items = [f"{name!r}: {part}" for name, part in zip(names, parts, strict=True)]
        return "{" + ", ".join(items) + "}"


def _source(length: int, values: int, spec: _Spec, *, payload: bool) -> str:
    """Python source of a factory ``make(unpackers, **_NAMES)`` of one decoder of a packet kind.

    Records are built by constructor calls; payloads by dict displays, then ``orjson.dumps`` and
    an exact-size copy (see ``payload.tick_json``).
    """
    writer = _Writer(length, values, spec, payload=payload)
    result = writer.expression(spec, spec[0])
    if payload:
        result = f"v0, bytes(memoryview(dumps({result})))"
    name = f"decode_{length}_{'payload' if payload else 'record'}"
    unpacked = ", ".join(f"v{i}" for i in range(values))
    return "\n".join(
        [
            f"def make(unpackers, {', '.join(_NAMES)}):",
            f"    def {name}(data, offset):",
            "        segment = data[offset + 3]",
            f"        {unpacked} = unpackers[segment](data, offset)",
            "        divisor = divisors[segment]",
            *(f"        p{index} = v{index} / divisor" for index in sorted(writer.hoisted)),
            f"        return {result}",
            f"    return {name}",
            "",
        ]
    )


def _compile(length: int, *, payload: bool) -> Callable[[Buffer, int], Any]:
    layout, spec = _PACKETS[length]
    if {layout.signed.size, layout.unsigned.size} != {length}:
        raise TypeError(f"{length}-byte spec: its structs read {layout.signed.size} bytes")
    values = len(layout.signed.unpack(bytes(length)))
    # Indexed by the segment byte, like ``divisors``: no call to pick the struct.
    unpackers = tuple(layout.for_token(segment).unpack_from for segment in range(256))
    source = _SOURCES[length, payload] = _source(length, values, spec, payload=payload)
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<bridge.kite.codec {length}-byte packet>", "exec"), namespace)
    decoder: Callable[[Buffer, int], Any] = namespace["make"](unpackers, **_NAMES)
    return decoder


_RECORD_DECODERS: Final[dict[int, Callable[[Buffer, int], Tick]]] = {
    length: _compile(length, payload=False) for length in _PACKETS
}
_PAYLOAD_DECODERS: Final[dict[int, Callable[[Buffer, int], tuple[int, bytes]]]] = {
    length: _compile(length, payload=True) for length in _PACKETS
}

# ---------------------------------------------------------------------------------------------
# The framing walk, shared by both outputs.

_Item = TypeVar("_Item")


def _walk(
    data: Buffer, skipped: list[int] | None, decoders: dict[int, Callable[[Buffer, int], _Item]]
) -> list[_Item]:
    size = len(data)
    if size < 2:
        return []
    (count,) = _U16.unpack_from(data, 0)
    items: list[_Item] = []
    append = items.append
    decoder_for = decoders.get
    unpack_length = _U16.unpack_from
    position = 2
    unknown: list[int] | None = None  # reported only once the whole frame is known sound
    for index in range(count):
        if position + 2 > size:
            raise FrameError(
                f"length prefix of packet {index + 1} of {count} cut short at offset {position}"
                f" (frame length {size})"
            )
        (length,) = unpack_length(data, position)
        position += 2
        end = position + length
        if end > size:
            raise FrameError(
                f"packet {index + 1} of {count} at offset {position} declares {length} bytes,"
                f" running past the end of the frame (frame length {size})"
            )
        decoder = decoder_for(length)
        if decoder is not None:
            append(decoder(data, position))
        elif unknown is None:
            unknown = [length]
        else:
            unknown.append(length)
        position = end
    if position != size:
        raise FrameError(
            f"{size - position} trailing bytes at offset {position} after the {count} declared"
            f" packets (frame length {size})"
        )
    if unknown is not None and skipped is not None:
        skipped.extend(unknown)
    return items


def decode_frame(data: Buffer, skipped: list[int] | None = None) -> list[Tick]:
    """Decode one binary websocket message into its ticks, in wire order.

    A heartbeat (fewer than 2 bytes) gives ``[]``. Packets of unknown length are skipped and, if
    ``skipped`` is given, their lengths appended to it. Raises :class:`FrameError` when the
    framing itself is corrupt (see the module docstring); never any other exception.
    """
    return _walk(data, skipped, _RECORD_DECODERS)


def frame_payloads(data: Buffer, skipped: list[int] | None = None) -> list[tuple[int, bytes]]:
    """``(instrument_token, CONTRACT §3 JSON)`` per tick of one binary message, in wire order.

    Each payload is byte for byte ``payload.tick_json(record)`` of the matching record of
    :func:`decode_frame`, exact-size, at about twice the speed. Heartbeats, unknown packet
    lengths, ``skipped`` and :class:`FrameError` exactly as :func:`decode_frame`.
    """
    return _walk(data, skipped, _PAYLOAD_DECODERS)


# ---------------------------------------------------------------------------------------------
# Encoding: the exact inverse, for the simulator and the tests.


def _epoch(moment: datetime | None) -> int:
    if moment is None:
        return 0
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"timestamp {moment!r} is naive: ticks carry timezone-aware datetimes")
    return int(moment.timestamp() // 1)


def _raw_price(value: float, divisor: int) -> int:
    try:
        return round(value * divisor)
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"price {value!r} cannot be encoded") from exc


def _wrap_int32(value: int) -> int:
    # The index change field is informational (decoders ignore it); wrapping like a C server
    # would keeps encoding total for every pair of in-range prices.
    return (value + 0x8000_0000) % 0x1_0000_0000 - 0x8000_0000


def _pack(packer: struct.Struct, tick: Tick, *values: int) -> bytes:
    try:
        return packer.pack(*values)
    except struct.error as exc:
        raise ValueError(f"{type(tick).__name__} field out of range for the wire: {exc}") from exc


def encode_packet(tick: Tick) -> bytes:
    """Encode one tick as its packet (no length prefix); prices as ``round(value * divisor)``.

    The packet kind follows the record type, not ``tick.mode``. ``tradable`` and ``change`` are
    derived on decoding, so they are not encoded. Raises ``ValueError`` for values the wire
    cannot carry (out of int32/uint32 range, naive datetimes, NaN).
    """
    token = tick.instrument_token
    divisor = segment_divisor(token)
    ltp = _raw_price(tick.last_price, divisor)
    if isinstance(tick, QuoteTick):
        ohlc = tick.ohlc
        quote = (
            token,
            ltp,
            tick.last_traded_quantity,
            _raw_price(tick.average_traded_price, divisor),
            tick.volume_traded,
            tick.total_buy_quantity,
            tick.total_sell_quantity,
            _raw_price(ohlc.open, divisor),
            _raw_price(ohlc.high, divisor),
            _raw_price(ohlc.low, divisor),
            _raw_price(ohlc.close, divisor),
        )
        if not isinstance(tick, FullTick):
            return _pack(_QUOTE.for_token(token), tick, *quote)
        levels = tick.depth.buy + tick.depth.sell
        if len(tick.depth.buy) != 5 or len(tick.depth.sell) != 5:
            raise ValueError("a full tick carries exactly 5 buy and 5 sell depth levels")
        depth = [
            value
            for level in levels
            for value in (level.quantity, _raw_price(level.price, divisor), level.orders)
        ]
        return _pack(
            _FULL.for_token(token),
            tick,
            *quote,
            _epoch(tick.last_trade_time),
            tick.oi,
            tick.oi_day_high,
            tick.oi_day_low,
            _epoch(tick.exchange_timestamp),
            *depth,
        )
    if isinstance(tick, IndexQuoteTick):
        ohlc = tick.ohlc
        close = _raw_price(ohlc.close, divisor)
        index = (
            token,
            ltp,
            _raw_price(ohlc.high, divisor),
            _raw_price(ohlc.low, divisor),
            _raw_price(ohlc.open, divisor),
            close,
            _wrap_int32(ltp - close),
        )
        if isinstance(tick, IndexFullTick):
            return _pack(
                _INDEX_FULL.for_token(token), tick, *index, _epoch(tick.exchange_timestamp)
            )
        return _pack(_INDEX_QUOTE.for_token(token), tick, *index)
    return _pack(_LTP.for_token(token), tick, token, ltp)


def encode_raw_frame(packets: Iterable[bytes]) -> bytes:
    """Wrap already-encoded packets (of any length) in the frame header and length prefixes."""
    parts = [b""]
    count = 0
    for packet in packets:
        if len(packet) > 0xFFFF:
            raise ValueError(f"packet of {len(packet)} bytes exceeds the uint16 length prefix")
        parts.append(_U16.pack(len(packet)))
        parts.append(packet)
        count += 1
    if count > 0xFFFF:
        raise ValueError(f"{count} packets exceed the uint16 packet count")
    parts[0] = _U16.pack(count)
    return b"".join(parts)


def encode_frame(ticks: Iterable[Tick]) -> bytes:
    """Encode ticks as one binary websocket message, in order."""
    return encode_raw_frame(encode_packet(tick) for tick in ticks)
