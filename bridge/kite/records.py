"""Typed tick records, one dataclass per packet kind.

Field names and order are those of the official Python client (pykiteconnect >= 4), so that
``dataclasses.asdict(tick)`` has exactly the keys of CONTRACT.md §3 and strategy code written
against ``KiteTicker.on_ticks`` reads the published JSON unchanged.

The classes are plain (neither ``frozen`` nor ``slots``): on CPython 3.11 ``frozen`` triples the
construction cost and ``slots`` makes orjson serialise about 4x slower (ecosystem-notes §3), and
both costs sit on the per-tick hot path. Treat the records as immutable anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Final, Literal, TypeAlias

__all__ = [
    "IST",
    "Depth",
    "DepthLevel",
    "FullTick",
    "IndexFullTick",
    "IndexQuoteTick",
    "LtpTick",
    "Mode",
    "Ohlc",
    "QuoteTick",
    "Tick",
]

#: India Standard Time: UTC+05:30, no daylight saving. Exchange timestamps are rendered in it.
IST: Final = timezone(timedelta(hours=5, minutes=30), "IST")

Mode: TypeAlias = Literal["ltp", "quote", "full"]


@dataclass
class Ohlc:
    """Day open, high, low and the previous day's close."""

    open: float
    high: float
    low: float
    close: float


@dataclass
class DepthLevel:
    """One level of the order book."""

    quantity: int
    price: float
    orders: int


@dataclass
class Depth:
    """Five bid levels (best first) and five offer levels (best first)."""

    buy: list[DepthLevel]
    sell: list[DepthLevel]


@dataclass
class LtpTick:
    """8-byte packet: last traded price only (any segment, indices included)."""

    tradable: bool
    mode: Mode
    instrument_token: int
    last_price: float


@dataclass
class IndexQuoteTick(LtpTick):
    """28-byte index packet. ``change`` is the percent change against the previous close."""

    ohlc: Ohlc
    change: float


@dataclass
class IndexFullTick(IndexQuoteTick):
    """32-byte index packet: the index quote plus the exchange timestamp."""

    exchange_timestamp: datetime | None


@dataclass
class QuoteTick(LtpTick):
    """44-byte packet of a tradable instrument."""

    last_traded_quantity: int
    average_traded_price: float
    volume_traded: int
    total_buy_quantity: int
    total_sell_quantity: int
    ohlc: Ohlc
    change: float


@dataclass
class FullTick(QuoteTick):
    """184-byte packet: the quote plus trade time, open interest and 5+5 market depth."""

    last_trade_time: datetime | None
    oi: int
    oi_day_high: int
    oi_day_low: int
    exchange_timestamp: datetime | None
    depth: Depth


#: Every record ``decode_frame`` can return.
Tick: TypeAlias = LtpTick | IndexQuoteTick | IndexFullTick | QuoteTick | FullTick
