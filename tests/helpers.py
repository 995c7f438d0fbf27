"""What the tests share: tick builders, waiters, the published key sets, processes of our own.

Imported as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``). The bridge
and Redis processes here are observed from outside, as an operator would: ``/metrics`` and
``/readyz`` on the bridge's HTTP port, ``/proc/<pid>/status`` for memory, Redis keys and replies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from bridge.kite.records import LtpTick, Ohlc, QuoteTick

__all__ = [
    "FULL_KEYS",
    "INDEX_FULL_KEYS",
    "INDEX_QUOTE_KEYS",
    "LTP_KEYS",
    "QUOTE_KEYS",
    "ROOT",
    "TOKEN",
    "BlockingSocket",
    "BridgeProcess",
    "Calls",
    "Launch",
    "MakeRedis",
    "Metrics",
    "PrivateRedis",
    "bridge_env",
    "command",
    "free_port",
    "http_get",
    "ltp",
    "quote",
    "redis_up",
    "wait_until",
]

ROOT = Path(__file__).resolve().parents[1]
#: The access token of every test bridge (``bridge_env``); give it to a Simulator that checks.
TOKEN = "test-access-token"

#: CONTRACT §3: the keys of each published tick shape, in order.
LTP_KEYS = ["tradable", "mode", "instrument_token", "last_price"]
INDEX_QUOTE_KEYS = [*LTP_KEYS, "ohlc", "change"]
INDEX_FULL_KEYS = [*INDEX_QUOTE_KEYS, "exchange_timestamp"]
QUOTE_KEYS = [
    *LTP_KEYS,
    "last_traded_quantity",
    "average_traded_price",
    "volume_traded",
    "total_buy_quantity",
    "total_sell_quantity",
    "ohlc",
    "change",
]
FULL_KEYS = [
    *QUOTE_KEYS,
    "last_trade_time",
    "oi",
    "oi_day_high",
    "oi_day_low",
    "exchange_timestamp",
    "depth",
]


def ltp(token: int, price: float = 100.0) -> LtpTick:
    return LtpTick(tradable=True, mode="ltp", instrument_token=token, last_price=price)


def quote(token: int, price: float = 100.0) -> QuoteTick:
    return QuoteTick(
        tradable=True,
        mode="quote",
        instrument_token=token,
        last_price=price,
        last_traded_quantity=1,
        average_traded_price=price,
        volume_traded=10,
        total_buy_quantity=5,
        total_sell_quantity=6,
        ohlc=Ohlc(open=price, high=price, low=price, close=price),
        change=0.0,
    )


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], within: float = 5.0, step: float = 0.01
) -> None:
    """Poll ``predicate`` (sync or async) until true; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(step)


class Calls:
    """Counts the calls of an async method, replaced through ``monkeypatch``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        self.count = 0
        inner = getattr(owner, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await inner(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


class BlockingSocket:
    """A websocket stand-in whose sends block after the first message (a full write buffer)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.first = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, message: str) -> None:
        if self.sent:
            await self.release.wait()
        self.sent.append(message)
        self.first.set()

    def subscribed(self) -> set[int]:
        """Every token a ``subscribe`` message sent so far named."""
        messages = [orjson.loads(m) for m in self.sent]
        return {token for m in messages if m["a"] == "subscribe" for token in m["v"]}


def free_port() -> int:
    """A loopback port nothing listens on (just now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- Redis -----------------------------------------------------------------------------------


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
    """A redis-server of our own on a free port, killable and restartable on the same port.

    Nothing is persisted unless ``durable``: then ``appendfsync always``, so every acknowledged
    write is on disk before the reply and a ``kill -9`` loses nothing that a client was told
    had happened.
    """

    def __init__(self, server: str, directory: Path, *extra: str, durable: bool = False) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        if durable:
            persistence = ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            persistence = ["--appendonly", "no"]
        self._argv = [
            server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            *persistence, "--dir", str(directory), *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        """Start the server without waiting for it to answer."""
        self.proc = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL)

    async def start(self, within: float = 10.0) -> None:
        """Start the server and wait until it answers."""
        self.spawn()
        deadline = time.monotonic() + within
        while not await redis_up(self.url):
            assert time.monotonic() < deadline, "private redis-server did not start"
            await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what was fsynced survives."""
        if self.proc is not None:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
            self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM, and wait for the server to exit."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


async def command(redis: Redis, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    """Send a JSON command with an id and wait for its reply, as an operator would."""
    await redis.rpush(f"{namespace}:control", orjson.dumps(body))
    reply = await redis.blpop([f"{namespace}:reply:{body['id']}"], 10)
    assert reply is not None, f"no reply to {body}"
    result: dict[str, Any] = orjson.loads(reply[1])
    return result


# -- The bridge as a subprocess ----------------------------------------------------------------


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
        KITE_API_KEY="test-key",
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
        """The HTTP endpoint on a free port unless ``env`` says otherwise ("0": none)."""
        env = {"BRIDGE_HTTP_PORT": str(free_port()), **env}
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge", "run",
                cwd=cwd, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        return cls(proc, log, int(env["BRIDGE_HTTP_PORT"]))

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


#: The factories of the fixtures ``launch`` and ``private_redis`` (tests/conftest.py).
Launch = Callable[..., Awaitable[BridgeProcess]]
MakeRedis = Callable[..., Awaitable[PrivateRedis]]
