"""``bridge check-config --connect``: prove the settings work before the service relies on them.

Switching the stack to the live feed is an edit of ``.env``; without a preflight an expired
token or a wrong Redis password shows up only as a service that exits 3 or keeps retrying at the
market open. The checks do once, without retries and within a bound, what ``bridge run`` does
first: reach Redis, see whether another bridge holds the namespace, and complete one websocket
handshake with the configured credentials (closed at once, code 1000, nothing subscribed).
Nothing is written to Redis.

Another bridge holding the namespace is reported, not failed: checking the settings of a running
stack (``docker compose run --rm bridge check-config --connect``) is the common case, and Kite
accepts a few connections per login.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

from redis.exceptions import RedisError, ResponseError

from bridge import persistence
from bridge.exit_codes import EXIT_AUTH, EXIT_CRASH, EXIT_OK
from bridge.kite.feed import KiteFeed
from bridge.kite.retry import AUTH_STATUS, AuthError
from bridge.lease import describe_identity
from bridge.redis_client import create_redis

if TYPE_CHECKING:
    from bridge.config import Settings

__all__ = ["Check", "exit_code", "preflight"]

#: Seconds each check may take; a check that needs longer fails.
CHECK_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one check, as ``check-config --connect`` prints it."""

    check: str
    ok: bool
    detail: str
    #: HTTP status of a refused websocket handshake; ``None`` otherwise.
    status: int | None = None
    #: Passed, but with a risk the operator should know about (printed, exit code unchanged).
    warning: bool = False

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def check_redis(settings: Settings, within: float = CHECK_TIMEOUT) -> list[Check]:
    """Reach Redis, refuse a read-only replica, read who holds the namespace and whether the
    server keeps the stored subscriptions across its restart and under memory pressure."""
    ns = settings.namespace
    where = settings.redis_url_redacted
    client = create_redis(
        settings.redis_url,
        socket_timeout=within,
        connect_timeout=within,
        retries=0,
        client_name=f"bridge:{ns}:check",
    )
    try:
        async with asyncio.timeout(within):
            await client.ping()
            try:
                role = (await client.role())[0]
            except ResponseError:  # an ACL or a proxy without ROLE: the bridge does not need it
                role = b"unknown"
            if role == b"slave":
                detail = f"{where} is a replica; the bridge writes {ns}:status, use the primary"
                return [Check("redis", False, detail)]
            holder = await client.get(f"{ns}:lock")
            stored = await client.hlen(f"{ns}:subscriptions")
            kept = await persistence.probe(client)
            evict = await persistence.probe_eviction(client)
    except (RedisError, OSError, TimeoutError) as exc:
        return [Check("redis", False, f"{where}: {_error(exc)}")]
    finally:
        await client.aclose()
    return [
        Check("redis", True, f"{where}: reachable, {stored} stored subscriptions in {ns}"),
        Check(
            "namespace",
            True,
            f"{ns} is free"
            if holder is None
            else f"{ns} is held by a running bridge ({describe_identity(holder)}); "
            "a second one would wait as its standby",
        ),
        Check("persistence", True, kept.detail, warning=kept.durable is False),
        Check("eviction", True, evict.detail, warning=evict.durable is False),
    ]


async def check_kite(settings: Settings, within: float = CHECK_TIMEOUT) -> Check:
    """One websocket handshake with the configured credentials."""
    feed = KiteFeed(**settings.feed_credentials(), connect_timeout=within)
    where = feed.redacted_url
    try:
        async with asyncio.timeout(within):
            await feed.handshake()
    except AuthError as exc:
        detail = (
            f"{where}: HTTP {exc.response.status_code}, the token is expired or invalid; "
            "log in again and update the credentials"
        )
        return Check("kite", False, detail, exc.response.status_code)
    except Exception as exc:  # any failure to connect is the check's answer, not a crash
        return Check("kite", False, f"{where}: {_error(exc)}")
    return Check("kite", True, f"{where}: handshake accepted")


async def preflight(settings: Settings, within: float = CHECK_TIMEOUT) -> list[Check]:
    """Run every check, Redis and Kite side by side; never raises for what it finds."""
    redis_checks, kite_check = await asyncio.gather(
        check_redis(settings, within), check_kite(settings, within)
    )
    return [*redis_checks, kite_check]


def exit_code(checks: list[Check]) -> int:
    """3 when Kite refused the login (as ``bridge run`` would exit), 1 for any other failure."""
    if any(c.status == AUTH_STATUS for c in checks):
        return EXIT_AUTH
    return EXIT_OK if all(c.ok for c in checks) else EXIT_CRASH
