"""What the chaos tests share: the bridge as a subprocess, its HTTP endpoint, Redis listeners.

Everything here observes the bridge from outside, as an operator would: ``/metrics`` and
``/readyz`` on its HTTP port, ``/proc/<pid>/status`` for memory, Redis keys and channels, the
simulator's own records of handshakes and subscriptions.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from bridge.simulator.server import Simulator

__all__ = [
    "ROOT",
    "TOKEN",
    "BridgeProcess",
    "Launch",
    "Listen",
    "Listener",
    "MakeRedis",
    "MakeSim",
    "Metrics",
    "PrivateRedis",
    "bridge_env",
    "free_port",
    "http_get",
    "redis_up",
    "scaled",
]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "chaos-access-token"


def scaled(name: str, default: float) -> float:
    """A duration the CI default keeps short and ``name`` in the environment can lengthen."""
    return float(os.environ.get(name, default))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """Status and body of one GET; raises ``OSError`` while nothing listens."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: chaos\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class Metrics:
    """One scrape of ``/metrics``: ``m["bridge_frames_total"]``, ``m.get(name, cause=...)``."""

    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, tuple(sorted(labels.items()))), 0.0)

    def __getitem__(self, name: str) -> float:
        return self.values[(name, ())]


def bridge_env(**overrides: str) -> dict[str, str]:
    """The environment of a test bridge: ours only, nothing inherited that could leak in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BRIDGE_", "KITE_")) and k != "REDIS_URL"
    }
    env.update(
        PYTHONPATH=str(ROOT),
        KITE_API_KEY="chaos-key",
        KITE_ACCESS_TOKEN=TOKEN,
        BRIDGE_BASE_WAIT="0.1",
        BRIDGE_MAX_WAIT="0.5",
        BRIDGE_LIVENESS_TIMEOUT="1",
        BRIDGE_LOG_FORMAT="json",
        BRIDGE_LOG_LEVEL="info",
    )
    env.update(overrides)
    return env


class BridgeProcess:
    """One ``python -m bridge run`` subprocess with its HTTP port and a log file."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, http_port: int) -> None:
        self.proc = proc
        self.log = log
        self.http_port = http_port

    @classmethod
    async def start(cls, env: dict[str, str], log: Path, cwd: Path) -> BridgeProcess:
        port = free_port()
        env = {**env, "BRIDGE_HTTP_PORT": str(port)}
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge", "run",
                cwd=cwd, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        return cls(proc, log, port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.returncode is None

    async def metrics(self) -> Metrics:
        status, body = await http_get(self.http_port, "/metrics")
        assert status == 200, body
        return Metrics(body.decode())

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        status, body = await http_get(self.http_port, "/readyz")
        return status, orjson.loads(body)

    async def ready(self) -> bool:
        try:
            status, _ = await self.readiness()
        except OSError:
            return False
        return status == 200

    def rss(self) -> int:
        """Resident set size in bytes, from /proc (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    async def stop(self, sig: int = signal.SIGTERM, within: float = 5.0) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), within)
        return code, time.monotonic() - started

    async def wait(self, within: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), within)

    def log_events(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_bytes().splitlines():
            if line.startswith(b"{") and f'"event":"{event}"'.encode() in line.replace(b" ", b""):
                found.append(orjson.loads(line))
        return found


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


async def redis_up(url: str) -> bool:
    client = Redis.from_url(url, socket_connect_timeout=0.5)
    try:
        await client.ping()
    except (RedisConnectionError, OSError):
        return False
    finally:
        await client.aclose()
    return True


class PrivateRedis:
    """A redis-server of our own on a free port, killable and restartable with its data.

    ``appendfsync always``: every acknowledged write is on disk before the reply, so a
    ``kill -9`` loses nothing that a client was told had happened.
    """

    def __init__(self, server: str, directory: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._argv = [
            server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--dir", str(directory), *extra,
        ]  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self._argv, stdout=asyncio.subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not await redis_up(self.url):
            assert time.monotonic() < deadline, "private redis-server did not start"
            await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what was fsynced survives."""
        if self.proc is not None:
            self.proc.kill()
            await self.proc.wait()
            self.proc = None


#: The fixtures' factories (tests/chaos/conftest.py).
MakeSim = Callable[..., Awaitable[Simulator]]
Launch = Callable[..., Awaitable[BridgeProcess]]
MakeRedis = Callable[..., Awaitable[PrivateRedis]]
Listen = Callable[[str], Awaitable[Listener]]
