"""Decoding throughput of ``bridge.kite.codec`` against a naive pykiteconnect-style decoder.

Run: ``.venv/bin/python -m bench.decode`` (``--help`` for knobs). Prints full-mode ticks per
second (median of the repeats, which are interleaved across the cases so that load from other
processes spreads over all of them) of: ``decode_frame`` to records, ``frame_payloads`` to
published JSON, the record path to the same JSON (``decode_frame`` then ``tick_json``), and the
naive decoder; then the cost of ``orjson.dumps`` per full tick. Numbers depend on the machine;
compare them on one machine only.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import orjson

from bridge.kite import codec
from bridge.kite.codec import decode_frame, encode_frame, frame_payloads
from bridge.kite.records import IST, Depth, DepthLevel, FullTick, Ohlc
from bridge.payload import tick_json

__all__ = ["main", "make_frames", "naive_decode_frame"]

_BASE = datetime(2024, 6, 12, 12, 46, 9, tzinfo=IST)


def _full_tick(token: int, step: int, moment: datetime) -> FullTick:
    divisor = codec.segment_divisor(token)
    tick_size = 5 / divisor if divisor == 100 else 25 / divisor
    ltp = round((83 if divisor > 100 else 1000) + (step % 97) * tick_size, 7)
    return FullTick(
        tradable=True,
        mode="full",
        instrument_token=token,
        last_price=ltp,
        last_traded_quantity=1 + step % 50,
        average_traded_price=ltp - 1,
        volume_traded=1_000_000 + step,
        total_buy_quantity=250_000 + step,
        total_sell_quantity=360_000 - step,
        ohlc=Ohlc(open=ltp - 1, high=ltp + 2, low=ltp - 3, close=ltp - 0.5),
        change=0.0,
        last_trade_time=moment - timedelta(seconds=1),
        oi=13_000_000 + step,
        oi_day_high=13_500_000,
        oi_day_low=12_900_000,
        exchange_timestamp=moment,
        depth=Depth(
            buy=[DepthLevel(100 + i, round(ltp - (i + 1) * tick_size, 7), 1 + i) for i in range(5)],
            sell=[DepthLevel(90 + i, round(ltp + (i + 1) * tick_size, 7), 2 + i) for i in range(5)],
        ),
    )


def make_frames(frames: int, per_frame: int) -> list[bytes]:
    """Frames of ``per_frame`` full packets; each frame one second later than the previous."""
    tokens = [408065, 738561, 12517890, 412675, 1001222]  # NSE, NSE, NFO, CDS, BCD
    return [
        encode_frame(
            _full_tick(
                tokens[i % len(tokens)] + (i << 8), f * per_frame + i, _BASE + timedelta(seconds=f)
            )
            for i in range(per_frame)
        )
        for f in range(frames)
    ]


# ---------------------------------------------------------------------------------------------
# Naive decoder in the style of the official Python client: a struct.unpack per field of a
# sliced packet, dicts, and datetime.fromtimestamp per timestamp. Our own code, for comparison.


def _int(packet: bytes, start: int, end: int, fmt: str = ">I") -> int:
    value: int = struct.unpack(fmt, packet[start:end])[0]
    return value


def _naive_packet(packet: bytes) -> dict[str, Any] | None:
    token = _int(packet, 0, 4)
    segment = token & 0xFF
    divisor = 10_000_000.0 if segment == 3 else 10_000.0 if segment in (6, 12) else 100.0
    if len(packet) != 184:
        return None  # the benchmark only feeds full packets
    tick: dict[str, Any] = {
        "tradable": segment != 9,
        "mode": "full",
        "instrument_token": token,
        "last_price": _int(packet, 4, 8) / divisor,
        "last_traded_quantity": _int(packet, 8, 12),
        "average_traded_price": _int(packet, 12, 16) / divisor,
        "volume_traded": _int(packet, 16, 20),
        "total_buy_quantity": _int(packet, 20, 24),
        "total_sell_quantity": _int(packet, 24, 28),
        "ohlc": {
            "open": _int(packet, 28, 32) / divisor,
            "high": _int(packet, 32, 36) / divisor,
            "low": _int(packet, 36, 40) / divisor,
            "close": _int(packet, 40, 44) / divisor,
        },
    }
    close = tick["ohlc"]["close"]
    tick["change"] = (tick["last_price"] - close) * 100 / close if close else 0
    tick["last_trade_time"] = datetime.fromtimestamp(_int(packet, 44, 48))
    tick["oi"] = _int(packet, 48, 52)
    tick["oi_day_high"] = _int(packet, 52, 56)
    tick["oi_day_low"] = _int(packet, 56, 60)
    tick["exchange_timestamp"] = datetime.fromtimestamp(_int(packet, 60, 64))
    depth: dict[str, list[dict[str, Any]]] = {"buy": [], "sell": []}
    for index, offset in enumerate(range(64, 184, 12)):
        depth["buy" if index < 5 else "sell"].append(
            {
                "quantity": _int(packet, offset, offset + 4),
                "price": _int(packet, offset + 4, offset + 8) / divisor,
                "orders": _int(packet, offset + 8, offset + 10, ">H"),
            }
        )
    tick["depth"] = depth
    return tick


def naive_decode_frame(data: bytes) -> list[dict[str, Any]]:
    ticks: list[dict[str, Any]] = []
    count = _int(data, 0, 2, ">H")
    position = 2
    for _ in range(count):
        length = _int(data, position, position + 2, ">H")
        tick = _naive_packet(data[position + 2 : position + 2 + length])
        if tick is not None:
            ticks.append(tick)
        position += 2 + length
    return ticks


# ---------------------------------------------------------------------------------------------


def _rate(
    decode: Callable[[bytes], object], frames: list[bytes], ticks: int, seconds: float
) -> float:
    """Ticks per second of ``decode`` cycling over ``frames`` for about ``seconds``."""
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for frame in frames:
            decode(frame)
        done += 1
        now = time.perf_counter()
        if now >= deadline:
            return done * ticks / (now - start)


def _cold(frame: bytes) -> object:
    codec._timestamps.clear()
    return decode_frame(frame)


def _via_records(frame: bytes) -> list[tuple[int, bytes]]:
    """What the bridge published before ``frame_payloads``: records, then ``tick_json``."""
    return [(tick.instrument_token, tick_json(tick)) for tick in decode_frame(frame)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100, help="distinct frames (default 100)")
    parser.add_argument("--per-frame", type=int, default=50, help="full packets per frame (50)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per repeat (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats, median reported (5)")
    args = parser.parse_args(argv)

    frames = make_frames(args.frames, args.per_frame)
    ticks = args.frames * args.per_frame
    assert len(naive_decode_frame(frames[0])) == len(decode_frame(frames[0])) == args.per_frame
    assert frame_payloads(frames[0]) == _via_records(frames[0])

    cases: list[tuple[str, Callable[[bytes], object], float]] = [
        ("codec.decode_frame", decode_frame, args.seconds),
        ("codec.decode_frame, timestamp cache cleared every frame", _cold, args.seconds),
        ("codec.frame_payloads", frame_payloads, args.seconds),
        ("codec.decode_frame + payload.tick_json", _via_records, args.seconds / 2),
        ("naive pykiteconnect-style decoder", naive_decode_frame, args.seconds / 2),
    ]
    print(f"{args.frames} frames x {args.per_frame} full packets, median of {args.repeats}")
    rates: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(args.repeats):
        for name, decode, seconds in cases:
            rates[name].append(_rate(decode, frames, ticks, seconds))
    for name, runs in rates.items():
        print(
            f"{name:58} {statistics.median(runs):>10,.0f} full ticks/s"
            f"  (runs: {', '.join(f'{r:,.0f}' for r in runs)})"
        )

    decoded = [tick for frame in frames for tick in decode_frame(frame)]
    dumps = orjson.dumps
    costs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for tick in decoded:
            dumps(tick)
        costs.append((time.perf_counter() - start) / len(decoded) * 1e6)
    print(f"{'orjson.dumps(FullTick)':58} {statistics.median(costs):>10.2f} us per tick")


if __name__ == "__main__":
    main()
