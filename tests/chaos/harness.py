"""What only the chaos tests share: counting Redis listeners (a parsing one, a raw one fast
enough for a firehose), TCP queue sizes from ``/proc``, the simulator factory, scaling.

The bridge subprocess, its HTTP endpoint and private redis-servers are in tests/helpers.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from bridge.simulator.server import Simulator

__all__ = ["Listen", "Listener", "MakeSim", "RawCounter", "scaled", "tcp_queues"]


def scaled(name: str, default: float) -> float:
    """A duration the CI default keeps short and ``name`` in the environment can lengthen."""
    return float(os.environ.get(name, default))


@dataclass
class Listener:
    """Counts what the bridge publishes under ``<ns>:``; resubscribes after a Redis restart."""

    url: str
    namespace: str
    ticks: Counter[int] = field(default_factory=Counter)
    events: list[dict[str, Any]] = field(default_factory=list)
    reconnects: int = 0
    _task: asyncio.Task[None] | None = None

    @property
    def total_ticks(self) -> int:
        return sum(self.ticks.values())

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    async def start(self) -> None:
        subscribed = asyncio.Event()
        self._task = asyncio.create_task(self._run(subscribed))
        await asyncio.wait_for(subscribed.wait(), 10)

    async def _run(self, subscribed: asyncio.Event) -> None:
        prefix = f"{self.namespace}:ticks:".encode()
        events = f"{self.namespace}:events".encode()
        while True:
            client = Redis.from_url(self.url, socket_connect_timeout=1)
            pubsub = client.pubsub()
            try:
                await pubsub.psubscribe(f"{self.namespace}:ticks:*", f"{self.namespace}:events")
                subscribed.set()
                async for msg in pubsub.listen():
                    if msg["type"] != "pmessage":
                        continue
                    channel: bytes = msg["channel"]
                    if channel.startswith(prefix):
                        self.ticks[int(channel[len(prefix) :])] += 1
                    elif channel == events:
                        self.events.append(orjson.loads(msg["data"]))
            except (RedisConnectionError, OSError):
                self.reconnects += 1
                await asyncio.sleep(0.1)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def tcp_queues() -> dict[tuple[tuple[str, int], tuple[str, int]], tuple[int, int]]:
    """``(local, remote) -> (tx_queue, rx_queue)`` bytes of every IPv4 TCP socket (Linux).

    From ``/proc/net/tcp``: for an open connection ``tx_queue`` is what was written but not yet
    acknowledged by the peer, ``rx_queue`` what arrived but the owning process has not read.
    """
    queues = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        ends = [_address(field) for field in fields[1:3]]
        tx, rx = (int(part, 16) for part in fields[4].split(":"))
        queues[(ends[0], ends[1])] = (tx, rx)
    return queues


def _address(field: str) -> tuple[str, int]:
    host, port = field.split(":")
    return socket.inet_ntoa(int(host, 16).to_bytes(4, "little")), int(port, 16)


class RawCounter:
    """A subscriber fast enough for a firehose: counts messages per pattern on the raw RESP stream.

    ``PSUBSCRIBE``s ``patterns`` on a plain socket and counts each pattern's message header
    (``pmessage``, the pattern) in the bytes as they arrive, never parsing a payload: JSON has
    no raw CR/LF, so a header cannot occur inside one. Give the server an unlimited pub/sub
    output buffer (``client-output-buffer-limit pubsub 0 0 0``) so that it never cuts this
    client off while it lags behind.
    """

    def __init__(self, host: str, port: int, *patterns: str) -> None:
        self.host, self.port = host, port
        self.patterns = patterns
        self.counts: dict[str, int] = dict.fromkeys(patterns, 0)
        self._markers = {
            pattern: b"$8\r\npmessage\r\n$%d\r\n%s\r\n" % (len(pattern), pattern.encode())
            for pattern in patterns
        }
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        parts = ["PSUBSCRIBE", *self.patterns]
        request = b"*%d\r\n" % len(parts) + b"".join(
            b"$%d\r\n%s\r\n" % (len(part), part.encode()) for part in parts
        )
        writer.write(request)
        await writer.drain()
        confirmed = b""
        while confirmed.count(b"psubscribe") < len(self.patterns):
            chunk = await reader.read(4096)
            assert chunk, "the server closed the subscriber"
            confirmed += chunk
        self._task = asyncio.create_task(self._run(reader, writer, confirmed))

    async def _run(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chunk: bytes
    ) -> None:
        keep = max(len(marker) for marker in self._markers.values()) - 1
        tail = b""
        try:
            while chunk:
                data = tail + chunk
                for pattern, marker in self._markers.items():
                    # Occurrences ending inside ``tail`` were counted with the previous chunk.
                    self.counts[pattern] += data.count(marker) - tail.count(marker)
                tail = data[-keep:]
                chunk = await reader.read(1 << 20)
        finally:
            writer.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


#: The fixtures' factories (tests/chaos/conftest.py).
MakeSim = Callable[..., Awaitable[Simulator]]
Listen = Callable[[str], Awaitable[Listener]]
