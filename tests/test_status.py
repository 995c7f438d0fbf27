"""``<ns>:status`` (fields, refresh, state changes, outages) and the ``bridge health`` probe."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import fakeredis
import pytest
from helpers import free_port, wait_until
from pydantic import SecretStr
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bridge import __version__
from bridge.config import Settings
from bridge.health import check, main
from bridge.status import STATES, StatusCounters, StatusReporter

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


# ``server`` (fakeredis) comes from tests/conftest.py; this ``redis`` decodes responses.


@pytest.fixture
async def redis(server: fakeredis.FakeServer) -> AsyncIterator[Redis]:
    client = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    yield client
    await client.aclose()


def counters() -> StatusCounters:
    return StatusCounters(
        last_frame_at=T0 - timedelta(seconds=1),
        last_tick_at=None,
        ticks_total=12,
        frames_total=5,
        reconnects_total=2,
        subscriptions=3,
    )


async def test_every_field_is_written_with_iso_times(redis: Redis) -> None:
    clock = Clock()
    reporter = StatusReporter(redis, "n", counters, pid=4242, now=clock)
    clock.now = T0 + timedelta(seconds=3)
    assert await reporter.write()
    status = await redis.hgetall("n:status")
    assert status == {
        "state": "starting",
        "since": "2026-01-02T03:04:05+00:00",
        "last_frame_at": "2026-01-02T03:04:04+00:00",
        "last_tick_at": "",
        "ticks_total": "12",
        "frames_total": "5",
        "reconnects_total": "2",
        "subscriptions": "3",
        "publish_failing_since": "",
        "control_failing_since": "",
        "version": __version__,
        "pid": "4242",
        "updated_at": "2026-01-02T03:04:08+00:00",
    }
    assert datetime.fromisoformat(str(status["updated_at"])).utcoffset() == timedelta(0)


async def test_state_change_resets_since_and_is_written_at_once(redis: Redis) -> None:
    clock = Clock()
    reporter = StatusReporter(redis, "n", counters, interval=60, now=clock)
    task = asyncio.create_task(reporter.run())
    try:
        await wait_until(lambda: reporter.writes == 1)
        clock.now = T0 + timedelta(seconds=9)
        reporter.set_state("connected")
        reporter.set_state("connected")  # no change, no extra write
        await wait_until(lambda: reporter.writes == 2)
        status = await redis.hgetall("n:status")
        assert status["state"] == "connected"
        assert status["since"] == "2026-01-02T03:04:14+00:00"
        await asyncio.sleep(0.05)
        assert reporter.writes == 2  # the 60 s interval did not fire
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_refreshed_every_interval(redis: Redis) -> None:
    reporter = StatusReporter(redis, "n", counters, interval=0.01)
    task = asyncio.create_task(reporter.run())
    try:
        await wait_until(lambda: reporter.writes >= 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_outage_is_logged_once_and_never_raises(
    redis: Redis, server: fakeredis.FakeServer
) -> None:
    reporter = StatusReporter(redis, "n", counters)
    server.connected = False
    with capture_logs() as logs:
        assert not await reporter.write()
        errors = [reporter.last_error]
        assert not await reporter.write()
        server.connected = True
        assert await reporter.write()
        errors.append(reporter.last_error)
    assert errors[0] is not None
    assert errors[0].startswith("ConnectionError")
    assert errors[1] is None  # /readyz shows only a current failure
    assert [e["event"] for e in logs] == ["redis_unavailable", "redis_recovered"]


def test_states_are_the_contract_ones() -> None:
    assert set(STATES) == {
        "starting", "connecting", "connected", "reconnecting", "auth_failed", "stopping", "stopped",
    }  # fmt: skip


NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
NOW_TEXT = NOW.isoformat().encode()


@pytest.mark.parametrize(
    ("status", "healthy", "reason"),
    [
        ({}, False, "no status"),
        ({b"state": b"connected", b"updated_at": b"2026-05-01T11:59:58+00:00"}, True, "connected"),
        ({b"state": b"reconnecting", b"updated_at": b"2026-05-01T17:29:55+05:30"}, True, ""),
        ({b"state": b"connected", b"updated_at": b"2026-05-01T11:59:40+00:00"}, False, "stale"),
        ({b"state": b"stopped", b"updated_at": b"2026-05-01T12:00:00+00:00"}, False, "stopped"),
        ({b"state": b"auth_failed", b"updated_at": b"2026-05-01T12:00:00+00:00"}, False, "auth"),
        ({b"state": b"connected", b"updated_at": b"soon"}, False, "updated_at"),
        (  # publishing works
            {b"state": b"connected", b"updated_at": NOW_TEXT, b"publish_failing_since": b""},
            True,
            "connected",
        ),
        (  # a blip: failing for 5 s, under max_age
            {
                b"state": b"connected",
                b"updated_at": NOW_TEXT,
                b"publish_failing_since": b"2026-05-01T11:59:55+00:00",
            },
            True,
            "connected",
        ),
        (  # every publish refused for 30 s (an ACL, the lease unconfirmed): ticks go nowhere
            {
                b"state": b"connected",
                b"updated_at": NOW_TEXT,
                b"publish_failing_since": b"2026-05-01T17:29:30+05:30",
            },
            False,
            "publishing has failed for 30.0 s",
        ),
        (
            {b"state": b"connected", b"updated_at": NOW_TEXT, b"publish_failing_since": b"x"},
            False,
            "publish_failing_since",
        ),
        (  # commands refused for 30 s (an ACL without BLMOVE): none is applied or answered
            {
                b"state": b"connected",
                b"updated_at": NOW_TEXT,
                b"publish_failing_since": b"",
                b"control_failing_since": b"2026-05-01T11:59:30+00:00",
            },
            False,
            "taking control commands has failed for 30.0 s",
        ),
        (  # a blip
            {
                b"state": b"connected",
                b"updated_at": NOW_TEXT,
                b"control_failing_since": b"2026-05-01T11:59:57+00:00",
            },
            True,
            "connected",
        ),
    ],
)
def test_health_check_judgement(
    status: dict[bytes | str, bytes | str], healthy: bool, reason: str
) -> None:
    ok, why = check(status, max_age=10, now=NOW)
    assert ok is healthy
    assert reason in why


def _settings(redis_url: str, namespace: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        namespace=namespace,
        kite_api_key="key",
        kite_access_token=SecretStr("secret-token"),
    )


@pytest.mark.redis
async def test_health_main_against_a_live_status(redis_url: str, namespace: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        settings = _settings(redis_url, namespace)
        err = io.StringIO()
        assert await asyncio.to_thread(main, settings, 10.0, stderr=err) == 1
        assert "no status" in err.getvalue()
        reporter = StatusReporter(client, namespace, counters)
        reporter.set_state("connected")
        assert await reporter.write()
        assert await asyncio.to_thread(main, settings, 10.0, stderr=err) == 0
        reporter.set_state("stopped")
        assert await reporter.write()
        err = io.StringIO()
        assert await asyncio.to_thread(main, settings, 10.0, stderr=err) == 1
        assert err.getvalue().strip() == "unhealthy: state is stopped"
    finally:
        await client.delete(f"{namespace}:status")
        await client.aclose()


def test_health_main_when_redis_is_unreachable() -> None:
    port = free_port()
    settings = _settings(f"redis://user:hunter2@127.0.0.1:{port}/0", "h")
    err = io.StringIO()
    assert main(settings, 10.0, stderr=err) == 1
    assert "unhealthy: Redis" in err.getvalue()
    assert "hunter2" not in err.getvalue()
    assert os.linesep not in err.getvalue().rstrip()  # one line
