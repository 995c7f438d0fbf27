"""What only the chaos tests share: a counting Redis listener, the simulator factory, scaling.

The bridge subprocess, its HTTP endpoint and private redis-servers are in tests/helpers.py.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from bridge.simulator.server import Simulator

__all__ = ["Listen", "Listener", "MakeSim", "scaled"]


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


#: The fixtures' factories (tests/chaos/conftest.py).
MakeSim = Callable[..., Awaitable[Simulator]]
Listen = Callable[[str], Awaitable[Listener]]
