"""``<ns>:lock``: one bridge at a time publishes for a namespace; a second one waits as standby.

Two bridges on one namespace (a second ``docker compose`` project, ``bridge run`` on a laptop
beside the container, a rolling update) would each hold a Kite websocket and publish every tick
twice, split the control queue between them and overwrite each other's status: consumers would
see duplicated ticks and nothing would say why. So a bridge must hold a lease before it touches
anything of the namespace:

* ``SET <ns>:lock <identity> NX PX <ttl>`` takes it. A bridge that finds it taken waits, logging
  who holds it, and takes over within ``ttl`` of the holder dying (a clean stop releases it at
  once): a hot standby for free.
* The holder renews it every second with a script that extends the key only if it is still its
  own (and takes it again if it vanished). A script, not ``WATCH``/``MULTI``: Redis refuses
  every command queued in a transaction when it is out of memory, but runs ``GET`` and
  ``PEXPIRE`` in a script, so an out-of-memory Redis that still takes ``PUBLISH`` does not
  stop the ticks. Where scripting is refused (an ACL, a proxy, fakeredis) the same steps run
  under ``WATCH``. Redis's clock expires a lease its holder stopped renewing; the holder's
  own clock closes its :meth:`~NamespaceLease.valid` gate a margin earlier, so a bridge cut
  off from Redis stops publishing before a standby can have taken over. A server that answers
  but refuses writes (out of memory, read-only replica, ``MISCONF``: it cannot persist) refuses
  them to a standby as well, so it keeps the gate open.
* A holder that finds the key held by another identity has lost it (a partition outlived the
  TTL): it must stop publishing at once.
* A Redis restart without persistence empties the key while its holder is alive. A standby
  could then take it before the holder's next renewal and would start with the empty
  subscription set of the restarted server, while the holder, which remembers the set and would
  have written it back, exits: every subscription gone. So a standby that saw the lease held on
  a server that has restarted since (its ``run_id`` changed) leaves the key alone for one TTL,
  as if it had survived; the holder takes it back within a second. Only a holder that died
  meanwhile is replaced, after that TTL, as if it had stopped renewing.

The identity is JSON (``host``, ``pid``, ``since``, a random ``id``), so ``GET <ns>:lock`` tells an
operator which process holds the namespace.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from enum import Enum
from typing import Final

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import (
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    WatchError,
)

from bridge.redis_client import InfoRefused, info_field

__all__ = ["DEFAULT_TTL", "LeaseState", "NamespaceLease", "describe_identity"]

_log = structlog.get_logger(__name__)

#: Extend the lease if it is ours, take it if it is free: 1; someone else's: their identity.
_RENEW: Final = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return holder
"""
#: Delete the lease only if it is ours: 1 if it was.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: The error Redis answers writes with while it cannot persist (``stop-writes-on-bgsave-error``,
#: a failing append-only file); redis-py has no exception class of its own for it.
_MISCONF: Final = re.compile(r"MISCONF\b")

#: Seconds a holder that stopped renewing (crashed, frozen, cut off) keeps the namespace.
DEFAULT_TTL: Final = 5.0
#: The holder's gate closes this fraction of the TTL after its last confirmed renewal, leaving
#: room for the two clocks, Redis's and ours, to disagree a little.
_GATE_FRACTION: Final = 0.8


def describe_identity(raw: bytes | str) -> str:
    """``host pid N since T`` for a value of ``<ns>:lock``; the raw value if it is not ours."""
    try:
        who = orjson.loads(raw)
        return f"{who['host']} pid {who['pid']} since {who['since']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        return text[:200]


class LeaseState(Enum):
    HELD = "held"
    TAKEN = "taken"  # another identity holds it


class NamespaceLease:
    """The lease on ``<ns>:lock``; every call is one short Redis exchange, raising its errors."""

    def __init__(
        self,
        redis: Redis,
        namespace: str,
        *,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key = f"{namespace}:lock"
        self.ttl = ttl
        self.identity: bytes = orjson.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": datetime.now(UTC).isoformat(timespec="seconds"),
                "id": secrets.token_hex(8),
            }
        )
        #: The holder's identity as last seen by a failed :meth:`acquire` or :meth:`renew`.
        self.holder: bytes | None = None
        self.held = False
        self.lost = False
        self._redis = redis
        self._clock = clock
        self._confirmed_at: float | None = None
        self._renew_script = redis.register_script(_RENEW)
        self._release_script = redis.register_script(_RELEASE)
        self._scripting = True
        #: ``run_id`` of the server on which a standby last saw another identity hold the lease.
        self._seen_on: str | None = None
        #: When a standby's wait for that holder to re-claim after a Redis restart ends.
        self._grace_until: float | None = None

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl * 1000))

    def valid(self) -> bool:
        """Is the lease certainly still ours? The publisher's gate: cheap, no I/O."""
        confirmed = self._confirmed_at
        return (
            not self.lost
            and confirmed is not None
            and self._clock() - confirmed < self.ttl * _GATE_FRACTION
        )

    async def acquire(self) -> LeaseState:
        """Take the lease if it is free (or already ours); see the module doc for the wait a
        standby makes after a Redis restart."""
        run_id = await self._run_id()
        if self._restart_grace(run_id):
            current = await self._redis.get(self.key)
            if current is None:
                return LeaseState.TAKEN  # still the holder's to re-claim
            self._seen_on, self._grace_until = run_id, None
            if current != self.identity:
                return self._taken(_bytes(current))
        sent_at = self._clock()
        if await self._redis.set(self.key, self.identity, nx=True, px=self._ttl_ms):
            return self._confirm(sent_at)
        # Taken, or taken by us: a SET whose reply was lost and that redis-py retried.
        state = await self.renew()
        if state is LeaseState.TAKEN:
            self._seen_on, self._grace_until = run_id, None
        return state

    def _restart_grace(self, run_id: str | None) -> bool:
        """Is this a standby still giving the holder it saw time to re-claim the lease after a
        restart of the server?"""
        if self._seen_on is None or run_id is None or run_id == self._seen_on:
            return False
        now = self._clock()
        if self._grace_until is None:
            self._grace_until = now + self.ttl
            _log.info(
                "lease_restart_grace",
                key=self.key,
                holder=self.describe_holder(),
                wait=self.ttl,
                reason="Redis restarted since the holder was seen: it may re-claim the lease",
            )
        return now < self._grace_until

    async def _run_id(self) -> str | None:
        """The server's ``run_id`` (new at every start); ``None`` where ``INFO`` is refused."""
        try:
            return await info_field(self._redis, "server", "run_id")
        except InfoRefused:
            return None

    async def renew(self) -> LeaseState:
        """Extend our lease; take it again if it vanished; TAKEN if someone else holds it."""
        if self._scripting:
            sent_at = self._clock()
            try:
                result = await self._renew_script(
                    keys=[self.key], args=[self.identity, self._ttl_ms]
                )
            except (OutOfMemoryError, ReadOnlyError):
                self._refused_to_everyone(sent_at)
                raise
            except ResponseError as exc:
                if _MISCONF.match(str(exc)):
                    self._refused_to_everyone(sent_at)
                    raise
                if not self._scripting_refused(exc):
                    raise
            else:
                if result == 1:
                    return self._confirm(sent_at)
                return self._taken(_bytes(result))
        return await self._renew_watched()

    async def release(self) -> bool:
        """Give the lease up (a clean stop), only if it is still ours; True if it was."""
        self.held = False
        self._confirmed_at = None
        if self._scripting:
            try:
                released = await self._release_script(keys=[self.key], args=[self.identity])
            except ResponseError as exc:
                if not self._scripting_refused(exc):
                    raise
            else:
                return bool(released)
        return await self._release_watched()

    def _refused_to_everyone(self, sent_at: float) -> None:
        """The server answered, and it refuses writes to everyone (out of memory, a read-only
        replica, ``MISCONF``: it cannot persist, e.g. a full disk under ``appendonly yes``):
        nobody can take the lease from us there, so the gate stays open and the ticks keep
        flowing to its subscribers (``PUBLISH`` still works). Still a failure, raised."""
        if self.held:
            self._confirmed_at = sent_at

    def _scripting_refused(self, exc: ResponseError) -> bool:
        """Scripting is unavailable here (for good): switch to ``WATCH``, logging it once."""
        refused = isinstance(exc, NoPermissionError) or (
            type(exc) is ResponseError and "unknown command" in str(exc).lower()
        )
        if refused:
            _log.warning("lease_scripting_refused", error=str(exc), fallback="watch")
            self._scripting = False
        return refused

    async def _renew_watched(self) -> LeaseState:
        while True:
            sent_at = self._clock()
            try:
                # Leaving the block resets the connection (UNWATCH) whatever happened inside.
                async with self._redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(self.key)
                    current = await pipe.get(self.key)
                    if current is not None and current != self.identity:
                        return self._taken(_bytes(current))
                    extended = 0
                    if current is not None:
                        pipe.multi()  # type: ignore[no-untyped-call]  # redis-py: no annotations
                        pipe.pexpire(self.key, self._ttl_ms)
                        (extended,) = await pipe.execute()
            except WatchError:
                continue  # changed between GET and EXEC: look again
            if extended:
                return self._confirm(sent_at)
            # Expired, or lost with a Redis restart: whoever sets it first holds it.
            if await self._redis.set(self.key, self.identity, nx=True, px=self._ttl_ms):
                return self._confirm(sent_at)
            # Someone was quicker: the next round says who.

    async def _release_watched(self) -> bool:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                await pipe.watch(self.key)
                if await pipe.get(self.key) != self.identity:
                    return False
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.delete(self.key)
                await pipe.execute()
        except WatchError:
            return False
        return True

    def holder_is_local(self) -> bool:
        """Did the holder run on this host (or in this container, whose hostname is its id)?"""
        try:
            who = orjson.loads(self.holder or b"")
            return bool(who["host"] == socket.gethostname())
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return False

    def describe_holder(self) -> str:
        """``host pid N since T`` for logs and ``/readyz``; ``unknown`` before any answer."""
        return "unknown" if self.holder is None else describe_identity(self.holder)

    def _confirm(self, sent_at: float) -> LeaseState:
        # Redis set the expiry when it received the request, after ``sent_at``: counting from
        # ``sent_at`` errs on the safe side.
        self._seen_on = self._grace_until = None
        self.held = True
        self.holder = self.identity
        self._confirmed_at = sent_at
        return LeaseState.HELD

    def _taken(self, current: bytes) -> LeaseState:
        self.holder = current
        if self.held:
            self.lost = True
            self.held = False
        self._confirmed_at = None
        return LeaseState.TAKEN


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
