"""How fast a Kite-protocol source can send: subscribe, then count packets without decoding.

The benchmark is only meaningful if the source outruns the bridge (>= 100k full ticks/s); this
client reads only each frame's 2-byte packet count, so what it measures is the source's ceiling
(plus websockets' framing), not a consumer's.

Run: ``.venv/bin/python -m bench.sink ws://127.0.0.1:8765 --instruments 3000 --seconds 8``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time

from websockets.asyncio.client import connect

from bench.e2e import BENCH_TOKEN, tokens_for

__all__ = ["main", "measure"]

_U16 = struct.Struct(">H")


async def measure(url: str, instruments: int, seconds: float) -> tuple[float, float]:
    """(ticks/s, frames/s) received from ``url`` in full mode, after the first frame."""
    tokens = tokens_for(instruments)
    query = f"/?api_key=bench&access_token={BENCH_TOKEN}"
    async with connect(url.rstrip("/") + query, compression=None, max_size=2**24) as ws:
        await ws.send(json.dumps({"a": "subscribe", "v": tokens}))
        await ws.send(json.dumps({"a": "mode", "v": ["full", tokens]}))
        ticks = frames = 0
        start: float | None = None
        async for message in ws:
            if isinstance(message, str) or len(message) < 2:
                continue
            now = time.perf_counter()
            if start is None:
                start = now
                continue
            ticks += _U16.unpack_from(message)[0]
            frames += 1
            if now - start >= seconds:
                return ticks / (now - start), frames / (now - start)
    raise RuntimeError("the source closed the connection")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sink", description=__doc__)
    parser.add_argument("url", help="e.g. ws://127.0.0.1:8765")
    parser.add_argument("--instruments", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    ticks, frames = asyncio.run(measure(args.url, args.instruments, args.seconds))
    print(f"{ticks:,.0f} full ticks/s in {frames:,.0f} frames/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
