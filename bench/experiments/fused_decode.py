"""Full packet -> CONTRACT §3 JSON bytes: through the tick dataclasses, or straight from the tuple.

The experiment behind docs/performance.md "Where the time goes" (2): the same frames (the
firehose's, 3000 instruments, 500 per frame), both paths, byte-identical output checked first.
Only full packets are handled by the direct path; that is all the benchmark sends.

Run: ``.venv/bin/python -m bench.experiments.fused_decode``
"""

from __future__ import annotations

import statistics
import struct
import time
from collections.abc import Callable
from typing import Any, Final

import orjson

from bench.e2e import tokens_for
from bench.firehose import build_frames
from bridge.kite import codec
from bridge.kite.codec import FULL_LENGTH, decode_frame
from bridge.kite.records import Mode
from bridge.payload import tick_json
from bridge.simulator.market import Market

__all__ = ["direct_payloads", "main", "record_payloads"]

_U16: Final = struct.Struct(">H")
_FULL: Final = struct.Struct(">IiIiIIIiiii" + "IIIII" + "IiH2x" * 10)
_iso: dict[int, str | None] = {}


def _iso_time(raw: int) -> str | None:
    """ISO-8601 IST text of an epoch second, cached: the codec's own datetime, rendered once."""
    text = _iso.get(raw, "")
    if text == "":
        if len(_iso) >= 4096:
            _iso.clear()
        moment = codec._timestamp(raw)
        text = _iso[raw] = None if moment is None else moment.isoformat()
    return text


def _depth(v: tuple[Any, ...], start: int, divisor: float) -> list[dict[str, Any]]:
    return [
        {"quantity": v[i], "price": v[i + 1] / divisor, "orders": v[i + 2]}
        for i in range(start, start + 15, 3)
    ]


def direct_payloads(frame: bytes) -> list[bytes]:
    """One JSON payload per full packet, built from the unpacked tuple with no records."""
    out: list[bytes] = []
    (count,) = _U16.unpack_from(frame, 0)
    position = 2
    dumps = orjson.dumps
    for _ in range(count):
        (length,) = _U16.unpack_from(frame, position)
        position += 2
        if length != FULL_LENGTH:
            raise ValueError("full packets only")
        v = _FULL.unpack_from(frame, position)
        position += length
        token = v[0]
        divisor = codec.segment_divisor(token)
        last, close = v[1] / divisor, v[10] / divisor
        tick = {
            "tradable": token & 0xFF != 9,
            "mode": "full",
            "instrument_token": token,
            "last_price": last,
            "last_traded_quantity": v[2],
            "average_traded_price": v[3] / divisor,
            "volume_traded": v[4],
            "total_buy_quantity": v[5],
            "total_sell_quantity": v[6],
            "ohlc": {
                "open": v[7] / divisor,
                "high": v[8] / divisor,
                "low": v[9] / divisor,
                "close": close,
            },
            "change": (last - close) * 100 / close if close else 0.0,
            "last_trade_time": _iso_time(v[11]),
            "oi": v[12],
            "oi_day_high": v[13],
            "oi_day_low": v[14],
            "exchange_timestamp": _iso_time(v[15]),
            "depth": {"buy": _depth(v, 16, divisor), "sell": _depth(v, 31, divisor)},
        }
        out.append(dumps(tick))
    return out


def record_payloads(frame: bytes) -> list[bytes]:
    """Today's path: ``decode_frame`` into dataclasses, then ``tick_json`` per tick."""
    return [tick_json(tick) for tick in decode_frame(frame)]


def _rate(convert: Callable[[bytes], list[bytes]], frames: list[bytes], seconds: float) -> float:
    done = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for frame in frames:
            done += len(convert(frame))
    return done / elapsed


def main() -> int:
    layout: list[tuple[int, Mode]] = [(token, "full") for token in tokens_for(3000)]
    frames = [bytes(f) for f in build_frames(layout, 500, 8, Market(7), {}).frames]
    for frame in frames:
        if direct_payloads(frame) != record_payloads(frame):
            raise SystemExit("outputs differ")
    print(f"{len(frames)} frames x 500 full packets, payloads byte-identical; median of 5")
    cases = (("decode_frame + tick_json", record_payloads), ("unpack -> dict", direct_payloads))
    for name, convert in cases:
        rates = [_rate(convert, frames, 1.0) for _ in range(5)]
        rate = statistics.median(rates)
        print(f"{name:28} {rate:>10,.0f} full ticks/s  {1e6 / rate:6.2f} us/tick")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
