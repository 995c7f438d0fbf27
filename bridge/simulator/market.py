"""A seedable random-walk market that produces plausible Kite ticks.

Pure: no I/O, no clock reads unless the caller omits ``now``. Every instrument owns its own
``random.Random`` derived from ``(seed, token)``, so a token's price path does not depend on which
other tokens were subscribed or in what order: tests can replay a walk exactly.

All prices are kept as raw wire integers (price x segment divisor) that are multiples of the
segment's tick size, so the encoder never has to round and depth/OHLC invariants hold exactly.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from bridge.kite.records import (
    IST,
    Depth,
    DepthLevel,
    FullTick,
    IndexFullTick,
    IndexQuoteTick,
    LtpTick,
    Mode,
    Ohlc,
    QuoteTick,
    Tick,
)

__all__ = [
    "DERIVATIVE_SEGMENTS",
    "INDEX_SEGMENT",
    "Instrument",
    "Market",
    "divisor_of",
    "is_index",
    "segment_of",
    "tick_size_of",
]

INDEX_SEGMENT: Final = 9
#: Segments whose instruments carry open interest (NFO, CDS, BFO, BCD, MCX, NCO).
DERIVATIVE_SEGMENTS: Final = frozenset({2, 3, 5, 6, 7, 12})

_DIVISORS: Final = {3: 10_000_000, 6: 10_000, 12: 10_000}
#: Tick size in raw units: 0.05 at ÷100, 0.0025 at ÷1e7 (CDS) and ÷1e4 (BCD), 0.01 at ÷1e4 (NCO).
_TICKS: Final = {3: 25_000, 6: 25, 12: 100}
_DEFAULT_TICK: Final = 5

#: Well-known tokens get their real-world price level; others get one drawn per segment.
_KNOWN_PRICES: Final = {
    256265: 24_000.0,  # NIFTY 50
    260105: 51_000.0,  # NIFTY BANK
    408065: 1_550.0,  # INFY
    738561: 2_900.0,  # RELIANCE
    884737: 950.0,  # TATAMOTORS
    779521: 820.0,  # SBIN
    341249: 1_650.0,  # HDFCBANK
    412675: 83.25,  # USDINR future (CDS)
}
_PRICE_RANGES: Final = {
    3: (70.0, 100.0),
    6: (70.0, 100.0),
    7: (100.0, 10_000.0),
    9: (1_000.0, 60_000.0),
    12: (100.0, 5_000.0),
}
_DEFAULT_RANGE: Final = (20.0, 5_000.0)
_LOTS: Final = {2: (15, 25, 50, 75), 5: (10, 15, 20)}

#: Keep every raw value well inside int32 so JS/Java clients (signed readers) agree with ours.
_RAW_LIMIT: Final = 2_000_000_000
#: Per-step volatility as a fraction of the price, and pull back towards the previous close.
_VOLATILITY: Final = 0.0004
_REVERSION: Final = 0.01
#: Exchange price band around the previous close (a circuit filter keeps walks bounded).
_BAND: Final = 0.2
_DEPTH_LEVELS: Final = 5


def segment_of(token: int) -> int:
    """Exchange segment: the token's lowest byte (kite-protocol §3.8)."""
    return token & 0xFF


def divisor_of(token: int) -> int:
    """Price divisor of the token's segment (CDS 1e7, BCD and NCO 1e4, else 100)."""
    return _DIVISORS.get(segment_of(token), 100)


def tick_size_of(token: int) -> int:
    """Minimum price step of the token's segment, in raw wire units."""
    return _TICKS.get(segment_of(token), _DEFAULT_TICK)


def is_index(token: int) -> bool:
    """Indices (segment 9) are not tradable and use the 28/32-byte packet layout."""
    return segment_of(token) == INDEX_SEGMENT


def _draw(rng: random.Random, low: int, high: int) -> int:
    """Uniform integer in [low, high]; ~10x cheaper than ``randint`` on the per-step path."""
    return low + int(rng.random() * (high - low + 1))


@dataclass
class Instrument:
    """Mutable day state of one instrument. Prices are raw wire integers."""

    token: int
    divisor: int
    tick: int
    lot: int
    close: int
    open: int
    high: int
    low: int
    ltp: int
    ltq: int
    volume: int
    turnover: int
    total_buy: int
    total_sell: int
    oi: int
    oi_high: int
    oi_low: int
    last_trade_time: int
    exchange_timestamp: int
    #: Levels quoted on each side; the rest of the five are empty, ``(0, 0, 0)`` on the wire.
    levels: int = 5
    #: (quantity, raw price, orders), best first.
    bids: list[tuple[int, int, int]] = field(default_factory=list)
    asks: list[tuple[int, int, int]] = field(default_factory=list)
    #: Bumped on every step so encoders can cache packets per (token, mode, version).
    version: int = 0

    @property
    def index(self) -> bool:
        return is_index(self.token)

    @property
    def average_price(self) -> int:
        """Volume-weighted average price, raw (not a tick multiple, as on the real feed).

        Every traded price lies within the day's low..high, and so does this average.
        """
        return self.turnover // self.volume if self.volume else 0


class Market:
    """Per-token random walks. ``step`` advances one instrument; ``tick`` renders it as a record."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed if seed is not None else random.SystemRandom().getrandbits(64)
        self._instruments: dict[int, Instrument] = {}
        self._rngs: dict[int, random.Random] = {}

    def __contains__(self, token: int) -> bool:
        return token in self._instruments

    def __len__(self) -> int:
        return len(self._instruments)

    def forget(self, token: int) -> None:
        """Drop the token's state; its next use starts its walk over from the day's open."""
        self._instruments.pop(token, None)
        self._rngs.pop(token, None)

    def instrument(self, token: int, now: float | None = None) -> Instrument:
        """The instrument's state, created (at the day's open) on first use."""
        inst = self._instruments.get(token)
        if inst is None:
            inst = self._create(token, time.time() if now is None else now)
            self._instruments[token] = inst
        return inst

    def step(self, token: int, now: float | None = None) -> Instrument:
        """Advance one trade: new price, quantities, OI and a fresh order book."""
        stamp = int(time.time() if now is None else now)
        inst = self.instrument(token, stamp)
        rng = self._rngs[token]
        tick = inst.tick
        sigma = max(1.0, inst.ltp * _VOLATILITY / tick)
        pull = (inst.close - inst.ltp) / tick * _REVERSION
        moved = inst.ltp + round(rng.gauss(pull, sigma)) * tick
        inst.ltp = min(max(moved, _floor(inst)), _ceiling(inst))
        inst.high = max(inst.high, inst.ltp)
        inst.low = min(inst.low, inst.ltp)
        inst.exchange_timestamp = stamp
        if not inst.index:
            self._trade(inst, rng, stamp)
        inst.version += 1
        return inst

    def tick(self, token: int, mode: Mode, now: float | None = None) -> Tick:
        """The instrument's current state as the record a client decodes for ``mode``."""
        inst = self.instrument(token, now)
        div = inst.divisor
        last_price = inst.ltp / div
        if mode == "ltp":
            return LtpTick(not inst.index, "ltp", token, last_price)
        close = inst.close / div
        ohlc = Ohlc(inst.open / div, inst.high / div, inst.low / div, close)
        change = (last_price - close) * 100 / close if close else 0.0
        if inst.index:
            if mode == "quote":
                return IndexQuoteTick(False, "quote", token, last_price, ohlc, change)
            return IndexFullTick(
                False, "full", token, last_price, ohlc, change, _ist(inst.exchange_timestamp)
            )
        quote = (
            True,
            mode,
            token,
            last_price,
            inst.ltq,
            inst.average_price / div,
            inst.volume,
            inst.total_buy,
            inst.total_sell,
            ohlc,
            change,
        )
        if mode == "quote":
            return QuoteTick(*quote)
        depth = Depth(
            buy=[DepthLevel(q, p / div, o) for q, p, o in inst.bids],
            sell=[DepthLevel(q, p / div, o) for q, p, o in inst.asks],
        )
        return FullTick(
            *quote,
            _ist(inst.last_trade_time),
            inst.oi,
            inst.oi_high,
            inst.oi_low,
            _ist(inst.exchange_timestamp),
            depth,
        )

    def _create(self, token: int, now: float) -> Instrument:
        rng = random.Random(f"{self.seed}:{token}")
        self._rngs[token] = rng
        segment = segment_of(token)
        div, tick = divisor_of(token), tick_size_of(token)
        price = _KNOWN_PRICES.get(token)
        if price is None:
            low, high = _PRICE_RANGES.get(segment, _DEFAULT_RANGE)
            price = rng.uniform(low, high)
        close = max(round(price * div / tick), 40) * tick
        close = min(close, _RAW_LIMIT // 2 // tick * tick)
        band = int(close * _BAND) // tick * tick
        gap = round(rng.gauss(0, close * 0.004 / tick)) * tick
        opened = max(min(close + gap, close + band), close - band, 20 * tick)
        lots = _LOTS.get(segment)
        lot = rng.choice(lots) if lots else 1
        volume = 0 if is_index(token) else lot * _draw(rng, 1_000, 100_000)
        derivative = segment in DERIVATIVE_SEGMENTS
        oi = lot * _draw(rng, 1_000, 200_000) if derivative else 0
        stamp = int(now)
        inst = Instrument(
            token=token,
            divisor=div,
            tick=tick,
            lot=lot,
            close=close,
            open=opened,
            high=opened,
            low=opened,
            ltp=opened,
            ltq=0 if is_index(token) else lot,
            volume=volume,
            # The volume traded before we joined, at the open (the day's whole range so far),
            # so the average price stays within low..high as the walk widens them.
            turnover=volume * opened,
            total_buy=lot * _draw(rng, 100, 10_000) if volume else 0,
            total_sell=lot * _draw(rng, 100, 10_000) if volume else 0,
            oi=oi,
            oi_high=oi,
            oi_low=oi,
            last_trade_time=stamp,
            exchange_timestamp=stamp,
            levels=_quoted_levels(token) if derivative else _DEPTH_LEVELS,
        )
        if not is_index(token):
            _book(inst, rng)
        return inst

    def _trade(self, inst: Instrument, rng: random.Random, stamp: int) -> None:
        lot = inst.lot
        inst.ltq = lot * _draw(rng, 1, 20)
        traded = inst.ltq + lot * _draw(rng, 0, 50)
        if inst.volume + traded < _RAW_LIMIT and inst.turnover < 2**62:
            inst.volume += traded
            inst.turnover += traded * inst.ltp
        inst.last_trade_time = stamp
        inst.total_buy = max(0, inst.total_buy + lot * _draw(rng, -20, 20))
        inst.total_sell = max(0, inst.total_sell + lot * _draw(rng, -20, 20))
        if segment_of(inst.token) in DERIVATIVE_SEGMENTS:
            inst.oi = min(max(0, inst.oi + lot * _draw(rng, -5, 5)), _RAW_LIMIT)
            inst.oi_high = max(inst.oi_high, inst.oi)
            inst.oi_low = min(inst.oi_low, inst.oi)
        _book(inst, rng)


def _quoted_levels(token: int) -> int:
    """Depth levels quoted for a derivative: five for most, one to four for one in five (a far
    strike). From the token alone, so the seeded random walk is the same either way."""
    mixed = (token * 0x9E37_79B1) & 0xFFFF_FFFF
    return _DEPTH_LEVELS if mixed % 5 else 1 + (mixed >> 8) % (_DEPTH_LEVELS - 1)


def _floor(inst: Instrument) -> int:
    """Lowest allowed price: the lower band, and high enough that five bid levels stay > 0."""
    return max(int(inst.close * (1 - _BAND)) // inst.tick * inst.tick, 20 * inst.tick)


def _ceiling(inst: Instrument) -> int:
    return min(int(inst.close * (1 + _BAND)) // inst.tick * inst.tick, _RAW_LIMIT // 2)


def _book(inst: Instrument, rng: random.Random) -> None:
    """Strictly descending bids at or below the LTP, ascending asks at or above it: five of each,
    or ``inst.levels`` and then empty ones (thin books, as real captures show, kite-protocol
    §3.7).

    One ``getrandbits`` call feeds the whole book (12 bits per level): this runs on every walk
    step of every subscribed token, and per-value RNG calls made it the simulator's hot spot.
    """
    tick, lot = inst.tick, inst.lot
    bits = rng.getrandbits(2 + 12 * 2 * _DEPTH_LEVELS)
    spread_below = bits & 1
    spread_above = 1 if spread_below == 0 else (bits >> 1) & 1
    bits >>= 2
    bid = inst.ltp - spread_below * tick
    ask = inst.ltp + spread_above * tick
    bids: list[tuple[int, int, int]] = []
    asks: list[tuple[int, int, int]] = []
    for _ in range(_DEPTH_LEVELS):
        # 6 bits of size (1-40 lots), 5 bits of order count (1-30, at most one per unit), 1 bit gap
        quantity = lot * (1 + (bits & 63) % 40)
        bids.append((quantity, bid, 1 + ((bits >> 6) & 31) % min(quantity, 30)))
        bid -= tick * (1 + ((bits >> 11) & 1))
        bits >>= 12
        quantity = lot * (1 + (bits & 63) % 40)
        asks.append((quantity, ask, 1 + ((bits >> 6) & 31) % min(quantity, 30)))
        ask += tick * (1 + ((bits >> 11) & 1))
        bits >>= 12
    empty = _DEPTH_LEVELS - inst.levels
    if empty:  # drawn all the same, so a seeded walk does not depend on the book's depth
        bids[inst.levels :] = [(0, 0, 0)] * empty
        asks[inst.levels :] = [(0, 0, 0)] * empty
    inst.bids = bids
    inst.asks = asks


_TIMESTAMP_CACHE_SIZE: Final = 1024
_timestamps: dict[int, datetime] = {}


def _ist(epoch: int) -> datetime | None:
    """Epoch seconds to an aware IST datetime; cached because a whole frame shares one second."""
    if not epoch:
        return None
    moment = _timestamps.get(epoch)
    if moment is None:
        if len(_timestamps) >= _TIMESTAMP_CACHE_SIZE:
            _timestamps.clear()
        moment = _timestamps[epoch] = datetime.fromtimestamp(epoch, IST)
    return moment
