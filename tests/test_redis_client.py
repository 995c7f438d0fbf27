"""The outer Redis retry layer: waits that grow to a cap, and one log line per outage."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bridge.redis_client import (
    ACL_OPTIONAL_COMMANDS,
    InfoRefused,
    Outage,
    Recovery,
    acl_rules,
    info_field,
)


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append(("warning", event, kw))

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append(("info", event, kw))


def test_waits_double_up_to_the_cap_and_never_drop_below_half() -> None:
    outage = Outage("publish", Log(), base_wait=0.1, max_wait=1.0)
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    for ceiling in ceilings:
        wait = outage.failed(ConnectionError("down"))
        assert ceiling / 2 <= wait <= ceiling
    assert outage.failures == len(ceilings)
    for _ in range(2000):  # far past 2**1024: still capped, no OverflowError
        assert outage.failed(ConnectionError("down")) <= 1.0


def test_one_warning_per_outage_and_one_recovery_line() -> None:
    log, now = Log(), [100.0]
    outage = Outage("control", log, clock=lambda: now[0])
    outage.recovered()  # no outage yet: nothing to say
    assert outage.failures == 0
    for _ in range(50):
        outage.failed(ConnectionError("Connection refused"))
        now[0] += 1
    assert outage.active is True
    outage.recovered()
    outage.recovered()
    assert [(level, event) for level, event, _ in log.lines] == [
        ("warning", "redis_unavailable"),
        ("info", "redis_recovered"),
    ]
    assert log.lines[0][2] == {"what": "control", "error": "ConnectionError: Connection refused"}
    assert log.lines[1][2] == {"what": "control", "failures": 50, "outage_seconds": 50.0}
    assert outage.failures == 0
    # The next outage starts over from the base wait.
    assert outage.failed(ConnectionError("down")) <= 0.1


NOPERM = "NOPERM User bridge has no permissions to run the 'blmove' command"


def _state(outage: Outage) -> tuple[float | None, float | None, str | None]:
    return outage.failing_for(), outage.since_at, outage.last_error


def test_a_long_outage_is_recalled_once_a_minute_and_says_since_when() -> None:
    log, now = Log(), [100.0]
    outage = Outage("control", log, clock=lambda: now[0], wall_clock=lambda: 1_700_000_000.0)
    assert _state(outage) == (None, None, None)
    for _ in range(150):  # one failure a second for 150 s
        outage.failed(ResponseError(NOPERM))
        now[0] += 1
    assert [event for _, event, _ in log.lines] == [
        "redis_unavailable",
        "redis_still_unavailable",
        "redis_still_unavailable",
    ]
    assert log.lines[1][2]["outage_seconds"] == 60.0
    assert log.lines[2][2]["failures"] == 120
    assert outage.failing_for() == 150.0
    assert outage.since_at == 1_700_000_000.0
    assert outage.last_error == f"ResponseError: {NOPERM}"
    outage.recovered()
    assert _state(outage) == (None, None, None)


@pytest.mark.parametrize(("base_wait", "max_wait"), [(-1.0, 1.0), (2.0, 1.0)])
def test_nonsense_waits_are_refused(base_wait: float, max_wait: float) -> None:
    with pytest.raises(ValueError, match="wait"):
        Outage("status", Log(), base_wait=base_wait, max_wait=max_wait)


async def test_info_field_reads_one_field_and_says_when_info_is_refused() -> None:
    server = fakeredis.FakeServer()
    refused = fakeredis.FakeAsyncRedis(server=server)  # fakeredis has no INFO
    with pytest.raises(InfoRefused):
        await info_field(refused, "server", "run_id")
    await refused.aclose()


@pytest.mark.redis
async def test_info_field_against_a_real_server(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        run_id = await info_field(client, "server", "run_id")
        assert run_id is not None
        assert len(run_id) == 40
        assert await info_field(client, "server", "no_such_field") is None
    finally:
        await client.aclose()


def test_the_operators_guide_shows_the_acl_the_bridge_is_tested_with() -> None:
    guide = (Path(__file__).resolve().parents[1] / "docs" / "operators.md").read_text()
    block = guide.split("redis-cli ACL SETUSER kite-bridge on '>CHANGE-ME' ", 1)[1].split("```")[0]
    shown = [word.strip("'").replace("\\|", "|") for word in block.split() if word != "\\"]
    assert shown == acl_rules("kite")
    assert ACL_OPTIONAL_COMMANDS == ("info", "config|get", "role")  # the three the guide names


async def _woken_by(pause: Awaitable[None], trigger: Callable[[], None], within: float) -> bool:
    """Whether ``trigger`` ends ``pause`` (a long wait) within ``within`` seconds."""
    task = asyncio.ensure_future(pause)
    await asyncio.sleep(0.02)
    trigger()
    done, _ = await asyncio.wait({task}, timeout=within)
    task.cancel()
    await asyncio.wait({task})
    return bool(done)


async def test_a_loop_backing_off_is_woken_when_another_loop_reaches_redis() -> None:
    """After a long outage the publisher may be 5 s into its backoff when Redis returns; the
    status writer, trying every half second, gets there first and wakes it."""
    recovery = Recovery()
    publish = Outage("publish", Log(), recovery=recovery)
    status = Outage("status", Log(), recovery=recovery)
    status.failed(ConnectionError("down"))
    publish.failed(ConnectionError("down"))
    assert await _woken_by(publish.pause(60), status.recovered, within=5)
    # Only a recovery from an outage wakes the others: a success of a healthy loop does not.
    assert not await _woken_by(publish.pause(60), status.recovered, within=0.3)


async def test_a_private_recovery_wakes_nobody_else_and_stop_ends_a_pause() -> None:
    alone, other = Outage("resync", Log()), Outage("status", Log())
    other.failed(ConnectionError("down"))
    assert not await _woken_by(alone.pause(60), other.recovered, within=0.3)
    stop = asyncio.Event()
    assert await _woken_by(alone.pause(60, stop), stop.set, within=5)
