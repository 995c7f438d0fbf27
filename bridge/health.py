"""``bridge health``: the container HEALTHCHECK, read from ``<ns>:status`` (arq's ``--check``).

No HTTP server is needed: a bridge is healthy when it refreshed its status recently and is in a
live state. Short timeouts and no retries keep the probe bounded; any doubt is "unhealthy".
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, TextIO

import redis

from bridge.status import LIVE_STATES

if TYPE_CHECKING:
    from bridge.config import Settings

__all__ = ["check", "main"]

_TIMEOUT = 2.0
#: Status fields that say since when a part of the bridge's work has failed ("" while it works).
_FAILING_FIELDS: Final = (
    ("publish_failing_since", "publishing"),
    ("control_failing_since", "taking control commands"),
)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def check(
    status: Mapping[bytes | str, bytes | str], max_age: float, now: datetime | None = None
) -> tuple[bool, str]:
    """Judge an HGETALL of ``<ns>:status``: (healthy, one-line reason)."""
    if not status:
        return False, "no status: the bridge has not started (or wrong namespace)"
    fields = {_text(key): _text(value) for key, value in status.items()}
    state = fields.get("state", "")
    updated_text = fields.get("updated_at", "")
    try:
        updated = datetime.fromisoformat(updated_text)
    except ValueError:
        return False, f"status has no valid updated_at ({updated_text!r})"
    if updated.tzinfo is None:
        updated = updated.replace(tzinfo=UTC)
    age = ((now or datetime.now(UTC)) - updated).total_seconds()
    if age > max_age:
        return False, f"status is stale: updated {age:.1f} s ago (max {max_age:g} s), state {state}"
    if state not in LIVE_STATES:
        return False, f"state is {state or 'missing'}"
    for field, what in _FAILING_FIELDS:
        failing_text = fields.get(field, "")
        if not failing_text:  # absent (an older bridge) or "" while it works
            continue
        try:
            failing = datetime.fromisoformat(failing_text)
        except ValueError:
            return False, f"status has no valid {field} ({failing_text!r})"
        failing_for = ((now or datetime.now(UTC)) - failing).total_seconds()
        if failing_for > max_age:
            return False, f"{what} has failed for {failing_for:.1f} s (since {failing_text})"
    return True, f"state {state}, updated {age:.1f} s ago"


def main(settings: Settings, max_age: float = 10.0, *, stderr: TextIO | None = None) -> int:
    """Exit code for the HEALTHCHECK: 0 healthy, 1 not (reason on stderr)."""
    err = sys.stderr if stderr is None else stderr
    key = f"{settings.namespace}:status"
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=_TIMEOUT,
        socket_connect_timeout=_TIMEOUT,
        driver_info=None,  # no CLIENT SETINFO (see redis_client.create_redis)
    )
    try:
        status = client.hgetall(key)
    except redis.RedisError as exc:
        print(f"unhealthy: Redis {settings.redis_url_redacted}: {exc}", file=err)
        return 1
    finally:
        client.close()
    healthy, reason = check(status, max_age)
    if not healthy:
        print(f"unhealthy: {reason}", file=err)
        return 1
    return 0
