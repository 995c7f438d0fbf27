"""A do-almost-nothing relay: the latency floor of the benchmark set-up itself.

Same path as the bridge (websocket in, one Lua ``EVALSHA`` of PUBLISHes per frame out, same
Redis, same subscriber) but no decoding: each packet's payload is a pre-rendered CONTRACT §3
JSON of its instrument with only the frame stamp (``volume_traded``) substituted. Whatever
latency this shows is the machine's (scheduling of four processes on two shared cores,
loopback, Redis), not the bridge's; the harness's ``floor`` scenario runs it.

Environment as ``bridge run`` (``KITE_WS_URL``, ``KITE_API_KEY``, ``KITE_ACCESS_TOKEN``,
``REDIS_URL``, ``BRIDGE_NAMESPACE``, ``BRIDGE_SUBSCRIBE``); writes ``ticks_total`` and
``updated_at`` to ``<ns>:status`` like the bridge.
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
from typing import Final

import redis.asyncio as redis
from websockets.asyncio.client import connect

from bench.naive_bridge import parse_subscribe
from bridge.kite.codec import decode_frame
from bridge.payload import tick_json

__all__ = ["main"]

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_MARK: Final = b'"volume_traded":'
_LUA: Final = "for i = 1, #ARGV, 2 do redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end return 0"


def _template(payload: bytes) -> tuple[bytes, bytes]:
    """Split a tick JSON around its ``volume_traded`` value."""
    start = payload.index(_MARK) + len(_MARK)
    return payload[:start], payload[payload.index(b",", start) :]


class _Relay:
    def __init__(self, namespace: str) -> None:
        self.prefix = f"{namespace}:ticks:"
        self.templates: dict[int, tuple[bytes, bytes, bytes]] = {}
        self.ticks = 0

    def flat(self, frame: bytes) -> list[bytes]:
        """Channel, payload, channel, payload... for every quote/full packet of ``frame``."""
        (count,) = _U16.unpack_from(frame, 0)
        out: list[bytes] = []
        position = 2
        for _ in range(count):
            (length,) = _U16.unpack_from(frame, position)
            packet = position + 2
            position = packet + length
            (token,) = _U32.unpack_from(frame, packet)
            template = self.templates.get(token)
            if template is None:
                tick = decode_frame(_U16.pack(1) + frame[packet - 2 : position])[0]
                head, tail = _template(tick_json(tick))
                template = (f"{self.prefix}{token}".encode(), head, tail)
                self.templates[token] = template
            (stamp,) = _U32.unpack_from(frame, packet + 16)
            out.append(template[0])
            out.append(b"%b%d%b" % (template[1], stamp, template[2]))
        self.ticks += count
        return out


async def _status(client: redis.Redis, key: str, relay: _Relay) -> None:
    while True:
        now = datetime.now(UTC).isoformat()
        await client.hset(key, mapping={"ticks_total": relay.ticks, "updated_at": now})
        await asyncio.sleep(1.0)


async def _run(relay: _Relay, namespace: str) -> None:
    env = os.environ
    url = (
        env["KITE_WS_URL"].rstrip("/")
        + f"/?api_key={env['KITE_API_KEY']}&access_token={env['KITE_ACCESS_TOKEN']}"
    )
    client = redis.Redis.from_url(env["REDIS_URL"])
    script = client.register_script(_LUA)
    reporter = asyncio.create_task(_status(client, f"{namespace}:status", relay))
    try:
        async with connect(url, compression=None, max_size=2**22) as ws:
            for mode, tokens in parse_subscribe(env.get("BRIDGE_SUBSCRIBE", "")).items():
                await ws.send(json.dumps({"a": "subscribe", "v": tokens}))
                await ws.send(json.dumps({"a": "mode", "v": [mode, tokens]}))
            async for message in ws:
                if isinstance(message, bytes) and len(message) > 2:
                    await script(args=relay.flat(message))
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        with contextlib.suppress(Exception):  # the final count, for the harness's totals
            await client.hset(f"{namespace}:status", "ticks_total", relay.ticks)
        await client.aclose()


async def _main() -> int:
    namespace = os.environ.get("BRIDGE_NAMESPACE", "kite")
    relay = _Relay(namespace)
    task = asyncio.create_task(_run(relay, namespace))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    print(json.dumps({"event": "stopped", "decoded": relay.ticks, "published": relay.ticks}))
    return 0


def main() -> int:
    return asyncio.run(_main())


if __name__ == "__main__":
    sys.exit(main())
