"""bridge.probes: /healthz, /readyz, /metrics over real HTTP, and their wiring in the service."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from helpers import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from redis.asyncio import Redis

from bridge.config import Settings
from bridge.probes import ProbeServer, Readiness, ReadinessReport
from bridge.service import EXIT_CRASH, EXIT_OK, Bridge
from bridge.simulator.server import Simulator


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def fetch(port: int, path: str, method: str = "GET", extra: str = "") -> Reply:
    """One HTTP/1.1 request on a fresh connection; the server closes it after replying."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: probe\r\n{extra}\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, text = line.partition(":")
        headers[name.strip().lower()] = text.strip()
    return Reply(int(status_line.split()[1]), headers, body)


# -- Readiness -------------------------------------------------------------------------------


@dataclass
class World:
    """The inputs of a readiness check, all good by default."""

    state: str = "connected"
    connected: bool = True
    reconciled: bool = True
    frame_age: float | None = 0.2
    redis_age: float | None = 0.5
    redis_error: str | None = None
    standby: str | None = None
    publishing: str | None = None

    def readiness(self) -> Readiness:
        return Readiness(
            state=lambda: self.state,
            connected=lambda: self.connected,
            reconciled=lambda: self.reconciled,
            last_frame_age=lambda: self.frame_age,
            redis_write_age=lambda: self.redis_age,
            redis_error=lambda: self.redis_error,
            standby=lambda: self.standby,
            publishing=lambda: self.publishing,
            max_frame_age=5.0,
            max_redis_age=3.0,
        )


def test_ready_when_everything_holds() -> None:
    report = World().readiness().check()
    assert report.ready
    assert orjson.loads(report.json()) == {
        "ready": True,
        "state": "connected",
        "reasons": [],
        "last_frame_age": 0.2,
        "redis_write_age": 0.5,
    }


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"connected": False, "state": "reconnecting"},
            "websocket not connected (state reconnecting)",
        ),
        ({"reconciled": False}, "subscriptions not yet reconciled with Redis"),
        ({"frame_age": 6.0}, "feed is stale: last frame 6.0 s ago"),
        ({"frame_age": None}, "feed is stale: last frame never"),
        ({"redis_age": 3.5}, "redis not writable: last successful write 3.5 s ago"),
        ({"redis_age": None}, "redis not writable: no successful write yet"),
        (
            {"redis_age": 4.0, "redis_error": "OutOfMemoryError: command not allowed"},
            "redis not writable: last successful write 4.0 s ago "
            "(OutOfMemoryError: command not allowed)",
        ),
        ({"redis_error": "ReadOnlyError: a late error"}, None),  # recent write: still ready
        (
            {"publishing": "publishing failing for 3.0 s (NoPermissionError: denied)"},
            "publishing failing for 3.0 s (NoPermissionError: denied)",
        ),
    ],
)
def test_each_failed_condition_is_a_reason(change: dict[str, Any], reason: str | None) -> None:
    world = World(**change)
    report = world.readiness().check()
    assert report.reasons == (() if reason is None else (reason,))
    assert report.ready is (reason is None)


def test_a_standby_is_not_ready_for_that_reason_alone() -> None:
    world = World(connected=False, state="starting", redis_age=None)
    world.standby = "host pid 7 since then"
    report = world.readiness().check()
    assert orjson.loads(report.json()) == {
        "ready": False,
        "state": "standby",
        "reasons": ["standby: another bridge holds the namespace (host pid 7 since then)"],
        "last_frame_age": None,
        "redis_write_age": None,
    }


def test_reasons_accumulate() -> None:
    report = World(connected=False, state="connecting", redis_age=None).readiness().check()
    assert len(report.reasons) == 2  # the feed checks collapse into "not connected"


# -- ProbeServer -----------------------------------------------------------------------------


@pytest.fixture
async def probe() -> AsyncIterator[tuple[ProbeServer, dict[str, Any]]]:
    knobs: dict[str, Any] = {"report": ReadinessReport("connected"), "metrics": b"m_total 1.0\n"}
    server = ProbeServer(
        metrics=lambda: knobs["metrics"],
        readiness=lambda: knobs["report"],
        liveness=lambda: {"state": "connected"},
        host="127.0.0.1",
        port=0,
    )
    async with server:
        yield server, knobs


async def test_healthz(probe: tuple[ProbeServer, dict[str, Any]]) -> None:
    server, _ = probe
    reply = await fetch(server.port, "/healthz")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"alive": True, "state": "connected"}


async def test_readyz_follows_the_report(probe: tuple[ProbeServer, dict[str, Any]]) -> None:
    server, knobs = probe
    assert (await fetch(server.port, "/readyz")).status == 200
    knobs["report"] = ReadinessReport("reconnecting", ("websocket not connected",))
    reply = await fetch(server.port, "/readyz?verbose=1")  # a query string is ignored
    assert reply.status == 503
    assert reply.json()["reasons"] == ["websocket not connected"]
    assert reply.json()["ready"] is False


async def test_metrics_is_prometheus_text(probe: tuple[ProbeServer, dict[str, Any]]) -> None:
    server, knobs = probe
    knobs["metrics"] = b"# TYPE x_total counter\nx_total 42.0\n"
    reply = await fetch(server.port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert reply.headers["cache-control"] == "no-store"
    [family] = text_string_to_metric_families(reply.body.decode())
    assert family.samples[0].value == 42


async def test_unknown_paths_methods_and_head(probe: tuple[ProbeServer, dict[str, Any]]) -> None:
    server, _ = probe
    assert (await fetch(server.port, "/nope")).status == 404
    post = await fetch(server.port, "/healthz", "POST", "Content-Length: 0\r\n")
    assert (post.status, post.headers["allow"]) == (405, "GET, HEAD")
    head = await fetch(server.port, "/healthz", "HEAD")
    assert head.status == 200
    assert head.body == b""
    assert int(head.headers["content-length"]) == len(b'{"alive":true,"state":"connected"}')
    assert server.requests == 3


async def test_a_websocket_upgrade_is_answered_with_plain_http(
    probe: tuple[ProbeServer, dict[str, Any]],
) -> None:
    server, _ = probe
    upgrade = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    reply = await fetch(server.port, "/healthz", extra=upgrade)
    assert reply.status == 200


async def test_a_taken_port_raises_and_stop_frees_it() -> None:
    def report() -> ReadinessReport:
        return ReadinessReport("connected")

    first = ProbeServer(metrics=bytes, readiness=report, host="127.0.0.1", port=0)
    await first.start()
    second = ProbeServer(metrics=bytes, readiness=report, host="127.0.0.1", port=first.port)
    with pytest.raises(OSError, match="in use"):
        await second.start()
    await first.stop()
    await second.start()  # the port is free again
    assert (await fetch(second.port, "/healthz")).status == 200
    await second.stop()


# -- wired into the service ------------------------------------------------------------------


@pytest.fixture
async def clean(redis_url: str, namespace: str) -> AsyncIterator[None]:
    """Deletes what the in-process bridge left under this test's namespace."""
    yield
    client = Redis.from_url(redis_url)
    keys = [key async for key in client.scan_iter(f"{namespace}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(tick_interval=0.05, heartbeat_interval=0.2, seed=11) as simulator:
        yield simulator


def bridge_settings(redis_url: str, namespace: str, url: str, port: int) -> Settings:
    return Settings(
        kite_api_key="k",
        kite_access_token=SecretStr("t"),
        kite_ws_url=url,
        redis_url=redis_url,
        namespace=namespace,
        http_port=port,
        liveness_timeout=1.0,
        base_wait=0.05,
        max_wait=0.2,
        subscribe={408065: "quote"},
    )


async def poll(port: int, path: str, predicate: Callable[[Reply], bool]) -> Reply:
    replies: list[Reply] = []

    async def check() -> bool:
        try:
            replies.append(await fetch(port, path))
        except OSError:  # not listening yet
            return False
        return predicate(replies[-1])

    await wait_until(check, within=10, step=0.05)
    return replies[-1]


@pytest.mark.redis
@pytest.mark.usefixtures("clean")
async def test_service_serves_probes_through_its_lifecycle(
    redis_url: str, namespace: str, sim: Simulator
) -> None:
    port = free_port()
    bridge = Bridge(
        bridge_settings(redis_url, namespace, sim.url, port),
        install_signals=False,
        redis_max_wait=0.2,
    )
    run = asyncio.create_task(bridge.run())
    try:
        ready = await poll(port, "/readyz", lambda r: r.status == 200)
        assert ready.json()["state"] == "connected"
        assert (await fetch(port, "/healthz")).json()["state"] == "connected"
        await wait_until(lambda: bridge.publisher.stats.published > 0)
        text = (await fetch(port, "/metrics")).body.decode()
        values = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert values[("bridge_websocket_connected", ())] == 1
        assert values[("bridge_subscriptions", (("mode", "quote"),))] == 1
        assert values[("bridge_ticks_published_total", ())] > 0
        assert values[("bridge_publish_latency_seconds_count", ())] > 0
        assert values[("bridge_state", (("state", "connected"),))] == 1

        sim.stall()  # silent feed: not ready, then stale and reconnecting
        stale = await poll(port, "/readyz", lambda r: r.status == 503)
        assert any("stale" in r or "not connected" in r for r in stale.json()["reasons"])
        await wait_until(lambda: bridge.feed.stats.reconnects_by_cause.get("stale", 0) >= 1)
        sim.stall(False)
        await poll(port, "/readyz", lambda r: r.status == 200)
    finally:
        bridge.request_stop()
        code = await asyncio.wait_for(run, 10)
    assert code == EXIT_OK
    with pytest.raises(ConnectionRefusedError):  # the endpoint closed with the bridge
        await fetch(port, "/healthz")


@pytest.mark.redis
@pytest.mark.usefixtures("clean")
async def test_service_exits_when_its_port_is_taken(
    redis_url: str, namespace: str, sim: Simulator
) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bridge = Bridge(bridge_settings(redis_url, namespace, sim.url, port), install_signals=False)
        assert await asyncio.wait_for(bridge.run(), 10) == EXIT_CRASH
    assert not sim.handshakes  # it never got as far as the feed
