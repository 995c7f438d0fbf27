"""Binary codec of the Kite ticker protocol (kite-protocol.md §3): bytes in, tick records out.

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

Speed matters (a full-mode frame carries up to hundreds of 184-byte packets): each packet kind is
read with one precompiled :class:`struct.Struct`, divisors are looked up in a table indexed by the
segment byte, and epoch seconds are turned into datetimes through a small bounded cache because
every tick of the same second shares its timestamps.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Final, TypeAlias

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
    "segment_divisor",
]

LTP_LENGTH: Final = 8
INDEX_QUOTE_LENGTH: Final = 28
INDEX_FULL_LENGTH: Final = 32
QUOTE_LENGTH: Final = 44
FULL_LENGTH: Final = 184

#: Segment byte of index tokens: indices are not tradable.
_INDICES_SEGMENT: Final = 9

# Prices are int32; token, quantities, volume, OI and timestamps uint32 (kite-protocol §3.3-3.7).
_U16: Final = struct.Struct(">H")
_LTP: Final = struct.Struct(">Ii")
# token, ltp, high, low, open, close, absolute change [, exchange timestamp]
_INDEX_QUOTE: Final = struct.Struct(">Iiiiiii")
_INDEX_FULL: Final = struct.Struct(">IiiiiiiI")
# token, ltp, ltq, atp, volume, total buy, total sell, open, high, low, close
_QUOTE_FORMAT: Final = ">IiIiIIIiiii"
_QUOTE: Final = struct.Struct(_QUOTE_FORMAT)
# + last trade time, oi, oi day high, oi day low, exchange timestamp, 10 x (qty, price, orders, pad)
_FULL: Final = struct.Struct(_QUOTE_FORMAT + "IIIII" + "IiH2x" * 10)

_DIVISORS: Final[dict[int, int]] = {3: 10_000_000, 6: 10_000, 12: 10_000}
_DEFAULT_DIVISOR: Final = 100


#: What :func:`decode_frame` reads: websocket libraries hand out bytes, tests also use views.
Buffer: TypeAlias = bytes | bytearray | memoryview


class FrameError(ValueError):
    """A binary frame whose structure is corrupt: its packets cannot be located reliably."""


def segment_divisor(token: int) -> int:
    """Price divisor of an instrument: CDS 1e7, BCD and NCO 1e4, every other segment 100."""
    return _DIVISORS.get(token & 0xFF, _DEFAULT_DIVISOR)


# Indexed by the segment byte: one tuple lookup per packet instead of a call and a dict miss.
_DIVISOR_BY_SEGMENT: Final[tuple[float, ...]] = tuple(
    float(segment_divisor(segment)) for segment in range(256)
)

# ---------------------------------------------------------------------------------------------
# Timestamps


_TIMESTAMP_CACHE_SIZE: Final = 4096
_timestamps: dict[int, datetime] = {}


def _timestamp(raw: int) -> datetime | None:
    """Epoch seconds to an aware IST datetime (``None`` for 0), through a bounded cache."""
    if raw == 0:
        return None
    if len(_timestamps) >= _TIMESTAMP_CACHE_SIZE:
        # Ticks arrive in time order, so old seconds are not needed again: dropping everything
        # is as good as LRU here and costs nothing per hit.
        _timestamps.clear()
    moment = _timestamps[raw] = datetime.fromtimestamp(raw, IST)
    return moment


# ---------------------------------------------------------------------------------------------
# Decoding: one function per packet kind, taking the frame and the packet's offset in it.


def _percent_change(last_price: float, close: float) -> float:
    # Same operations in the same order as pykiteconnect, so the floats match bit for bit.
    return (last_price - close) * 100 / close if close else 0.0


def _decode_ltp(data: Buffer, offset: int) -> LtpTick:
    token, ltp = _LTP.unpack_from(data, offset)
    segment = token & 0xFF
    return LtpTick(segment != _INDICES_SEGMENT, "ltp", token, ltp / _DIVISOR_BY_SEGMENT[segment])


def _decode_index_quote(data: Buffer, offset: int) -> IndexQuoteTick:
    token, ltp, high, low, open_, close, _change = _INDEX_QUOTE.unpack_from(data, offset)
    segment = token & 0xFF
    divisor = _DIVISOR_BY_SEGMENT[segment]
    last_price = ltp / divisor
    close_price = close / divisor
    return IndexQuoteTick(
        segment != _INDICES_SEGMENT,
        "quote",
        token,
        last_price,
        Ohlc(open_ / divisor, high / divisor, low / divisor, close_price),
        _percent_change(last_price, close_price),
    )


def _decode_index_full(data: Buffer, offset: int) -> IndexFullTick:
    token, ltp, high, low, open_, close, _change, ts = _INDEX_FULL.unpack_from(data, offset)
    segment = token & 0xFF
    divisor = _DIVISOR_BY_SEGMENT[segment]
    last_price = ltp / divisor
    close_price = close / divisor
    return IndexFullTick(
        segment != _INDICES_SEGMENT,
        "full",
        token,
        last_price,
        Ohlc(open_ / divisor, high / divisor, low / divisor, close_price),
        _percent_change(last_price, close_price),
        _timestamps.get(ts) or _timestamp(ts),
    )


def _decode_quote(data: Buffer, offset: int) -> QuoteTick:
    token, ltp, ltq, atp, volume, buy, sell, open_, high, low, close = _QUOTE.unpack_from(
        data, offset
    )
    segment = token & 0xFF
    divisor = _DIVISOR_BY_SEGMENT[segment]
    last_price = ltp / divisor
    close_price = close / divisor
    return QuoteTick(
        segment != _INDICES_SEGMENT,
        "quote",
        token,
        last_price,
        ltq,
        atp / divisor,
        volume,
        buy,
        sell,
        Ohlc(open_ / divisor, high / divisor, low / divisor, close_price),
        _percent_change(last_price, close_price),
    )


def _decode_full(data: Buffer, offset: int) -> FullTick:
    v = _FULL.unpack_from(data, offset)
    token = v[0]
    segment = token & 0xFF
    divisor = _DIVISOR_BY_SEGMENT[segment]
    last_price = v[1] / divisor
    close_price = v[10] / divisor
    get = _timestamps.get
    # Depth entries start at index 16, three values each; spelled out because building these
    # ten records is the single biggest cost of decoding a full frame.
    return FullTick(
        segment != _INDICES_SEGMENT,
        "full",
        token,
        last_price,
        v[2],
        v[3] / divisor,
        v[4],
        v[5],
        v[6],
        Ohlc(v[7] / divisor, v[8] / divisor, v[9] / divisor, close_price),
        _percent_change(last_price, close_price),
        get(v[11]) or _timestamp(v[11]),
        v[12],
        v[13],
        v[14],
        get(v[15]) or _timestamp(v[15]),
        Depth(
            [
                DepthLevel(v[16], v[17] / divisor, v[18]),
                DepthLevel(v[19], v[20] / divisor, v[21]),
                DepthLevel(v[22], v[23] / divisor, v[24]),
                DepthLevel(v[25], v[26] / divisor, v[27]),
                DepthLevel(v[28], v[29] / divisor, v[30]),
            ],
            [
                DepthLevel(v[31], v[32] / divisor, v[33]),
                DepthLevel(v[34], v[35] / divisor, v[36]),
                DepthLevel(v[37], v[38] / divisor, v[39]),
                DepthLevel(v[40], v[41] / divisor, v[42]),
                DepthLevel(v[43], v[44] / divisor, v[45]),
            ],
        ),
    )


_DECODERS: Final[dict[int, Callable[[Buffer, int], Tick]]] = {
    LTP_LENGTH: _decode_ltp,
    INDEX_QUOTE_LENGTH: _decode_index_quote,
    INDEX_FULL_LENGTH: _decode_index_full,
    QUOTE_LENGTH: _decode_quote,
    FULL_LENGTH: _decode_full,
}


def decode_frame(data: Buffer, skipped: list[int] | None = None) -> list[Tick]:
    """Decode one binary websocket message into its ticks, in wire order.

    A heartbeat (fewer than 2 bytes) gives ``[]``. Packets of unknown length are skipped and, if
    ``skipped`` is given, their lengths appended to it. Raises :class:`FrameError` when the
    framing itself is corrupt (see the module docstring); never any other exception.
    """
    size = len(data)
    if size < 2:
        return []
    (count,) = _U16.unpack_from(data, 0)
    ticks: list[Tick] = []
    append = ticks.append
    decoders = _DECODERS.get
    unpack_length = _U16.unpack_from
    position = 2
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
        decoder = decoders(length)
        if decoder is not None:
            append(decoder(data, position))
        elif skipped is not None:
            skipped.append(length)
        position = end
    if position != size:
        raise FrameError(
            f"{size - position} trailing bytes at offset {position} after the {count} declared"
            f" packets (frame length {size})"
        )
    return ticks


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
            return _pack(_QUOTE, tick, *quote)
        levels = tick.depth.buy + tick.depth.sell
        if len(tick.depth.buy) != 5 or len(tick.depth.sell) != 5:
            raise ValueError("a full tick carries exactly 5 buy and 5 sell depth levels")
        depth = [
            value
            for level in levels
            for value in (level.quantity, _raw_price(level.price, divisor), level.orders)
        ]
        return _pack(
            _FULL,
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
            return _pack(_INDEX_FULL, tick, *index, _epoch(tick.exchange_timestamp))
        return _pack(_INDEX_QUOTE, tick, *index)
    return _pack(_LTP, tick, token, ltp)


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
