"""The naive baseline the bridge is measured against: how a first Kite -> Redis script looks.

A websockets client, ticks unpacked field by field into dicts the way the official Python
client (pykiteconnect) does it, ``json.dumps`` per tick and one awaited redis-py ``PUBLISH``
per tick. It reads the same environment as ``bridge run`` (CONTRACT §1: ``KITE_WS_URL``,
``KITE_API_KEY``, ``KITE_ACCESS_TOKEN``, ``REDIS_URL``, ``BRIDGE_NAMESPACE``,
``BRIDGE_SUBSCRIBE``) so the harness drives both identically, and writes ``ticks_total`` and
``updated_at`` to ``<ns>:status`` once a second, as the bridge does, so both are counted alike.
No reconnects, no control list: it is a yardstick, not a product.

Run: ``KITE_WS_URL=ws://127.0.0.1:8765 KITE_API_KEY=k KITE_ACCESS_TOKEN=t
BRIDGE_SUBSCRIBE=full:408065 .venv/bin/python -m bench.naive_bridge``
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import sys
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as redis
from websockets.asyncio.client import connect

__all__ = ["main", "parse_binary", "parse_subscribe"]


def _unpack_int(data: bytes, start: int, end: int, byte_format: str = "I") -> int:
    value: int = struct.unpack(">" + byte_format, data[start:end])[0]
    return value


def _split_packets(data: bytes) -> list[bytes]:
    if len(data) < 2:
        return []
    count = _unpack_int(data, 0, 2, "H")
    packets = []
    j = 2
    for _ in range(count):
        length = _unpack_int(data, j, j + 2, "H")
        packets.append(data[j + 2 : j + 2 + length])
        j = j + 2 + length
    return packets


def _timestamp(raw: int) -> datetime | None:
    return datetime.fromtimestamp(raw) if raw else None


def parse_binary(data: bytes) -> list[dict[str, Any]]:
    """Every packet of a frame as a dict: pykiteconnect's ``_parse_binary`` approach."""
    ticks: list[dict[str, Any]] = []
    for packet in _split_packets(data):
        token = _unpack_int(packet, 0, 4)
        segment = token & 0xFF
        divisor = 10_000_000.0 if segment == 3 else 10_000.0 if segment in (6, 12) else 100.0
        tradable = segment != 9
        if len(packet) == 8:
            ticks.append(
                {
                    "tradable": tradable,
                    "mode": "ltp",
                    "instrument_token": token,
                    "last_price": _unpack_int(packet, 4, 8) / divisor,
                }
            )
        elif len(packet) in (28, 32):
            mode = "quote" if len(packet) == 28 else "full"
            tick: dict[str, Any] = {
                "tradable": tradable,
                "mode": mode,
                "instrument_token": token,
                "last_price": _unpack_int(packet, 4, 8, "i") / divisor,
                "ohlc": {
                    "high": _unpack_int(packet, 8, 12, "i") / divisor,
                    "low": _unpack_int(packet, 12, 16, "i") / divisor,
                    "open": _unpack_int(packet, 16, 20, "i") / divisor,
                    "close": _unpack_int(packet, 20, 24, "i") / divisor,
                },
            }
            close = tick["ohlc"]["close"]
            tick["change"] = (tick["last_price"] - close) * 100 / close if close else 0
            if len(packet) == 32:
                tick["exchange_timestamp"] = _timestamp(_unpack_int(packet, 28, 32))
            ticks.append(tick)
        elif len(packet) in (44, 184):
            mode = "quote" if len(packet) == 44 else "full"
            tick = {
                "tradable": tradable,
                "mode": mode,
                "instrument_token": token,
                "last_price": _unpack_int(packet, 4, 8, "i") / divisor,
                "last_traded_quantity": _unpack_int(packet, 8, 12),
                "average_traded_price": _unpack_int(packet, 12, 16, "i") / divisor,
                "volume_traded": _unpack_int(packet, 16, 20),
                "total_buy_quantity": _unpack_int(packet, 20, 24),
                "total_sell_quantity": _unpack_int(packet, 24, 28),
                "ohlc": {
                    "open": _unpack_int(packet, 28, 32, "i") / divisor,
                    "high": _unpack_int(packet, 32, 36, "i") / divisor,
                    "low": _unpack_int(packet, 36, 40, "i") / divisor,
                    "close": _unpack_int(packet, 40, 44, "i") / divisor,
                },
            }
            close = tick["ohlc"]["close"]
            tick["change"] = (tick["last_price"] - close) * 100 / close if close else 0
            if len(packet) == 184:
                tick["last_trade_time"] = _timestamp(_unpack_int(packet, 44, 48))
                tick["oi"] = _unpack_int(packet, 48, 52)
                tick["oi_day_high"] = _unpack_int(packet, 52, 56)
                tick["oi_day_low"] = _unpack_int(packet, 56, 60)
                tick["exchange_timestamp"] = _timestamp(_unpack_int(packet, 60, 64))
                depth: dict[str, list[dict[str, Any]]] = {"buy": [], "sell": []}
                for i, p in enumerate(range(64, len(packet), 12)):
                    depth["sell" if i >= 5 else "buy"].append(
                        {
                            "quantity": _unpack_int(packet, p, p + 4),
                            "price": _unpack_int(packet, p + 4, p + 8, "i") / divisor,
                            "orders": _unpack_int(packet, p + 8, p + 10, "H"),
                        }
                    )
                tick["depth"] = depth
            ticks.append(tick)
    return ticks


def parse_subscribe(text: str) -> dict[str, list[int]]:
    """``"full:1,2;ltp:3"`` -> ``{"full": [1, 2], "ltp": [3]}`` (BRIDGE_SUBSCRIBE's shape)."""
    groups: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        mode, _, tokens = part.partition(":")
        groups.setdefault(mode.strip().lower(), []).extend(
            int(t) for t in tokens.split(",") if t.strip()
        )
    return groups


def _default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class _Counts:
    decoded = 0
    published = 0


async def _report(client: redis.Redis, key: str, counts: _Counts) -> None:
    while True:
        now = datetime.now(UTC).isoformat()
        await client.hset(key, mapping={"ticks_total": counts.decoded, "updated_at": now})
        await asyncio.sleep(1.0)


async def _run(counts: _Counts) -> None:
    env = os.environ
    namespace = env.get("BRIDGE_NAMESPACE", "kite")
    url = (
        env.get("KITE_WS_URL", "wss://ws.kite.trade").rstrip("/")
        + f"/?api_key={env['KITE_API_KEY']}&access_token={env['KITE_ACCESS_TOKEN']}"
    )
    client = redis.Redis.from_url(env.get("REDIS_URL", "redis://localhost:6379/0"))
    reporter = asyncio.create_task(_report(client, f"{namespace}:status", counts))
    try:
        async with connect(url) as ws:
            for mode, tokens in parse_subscribe(env.get("BRIDGE_SUBSCRIBE", "")).items():
                await ws.send(json.dumps({"a": "subscribe", "v": tokens}))
                await ws.send(json.dumps({"a": "mode", "v": [mode, tokens]}))
            async for message in ws:
                if not isinstance(message, bytes) or len(message) <= 4:
                    continue
                for tick in parse_binary(message):
                    counts.decoded += 1
                    channel = f"{namespace}:ticks:{tick['instrument_token']}"
                    await client.publish(channel, json.dumps(tick, default=_default))
                    counts.published += 1
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        with contextlib.suppress(Exception):
            await client.hset(f"{namespace}:status", "ticks_total", counts.decoded)
        await client.aclose()


async def _main() -> int:
    counts = _Counts()
    task = asyncio.create_task(_run(counts))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    print(
        json.dumps({"event": "stopped", "decoded": counts.decoded, "published": counts.published})
    )
    return 0


def main() -> int:
    return asyncio.run(_main())


if __name__ == "__main__":
    sys.exit(main())
