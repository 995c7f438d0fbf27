"""How a batch of (channel, message) pairs reaches Redis in one round trip.

The publisher hands every transport a flat list alternating channel and message. Three ways to
send it, fastest first (measured per message with ``bench/transports.py``, a pattern subscriber
attached, docs/performance.md):

* :class:`UnrepliedTransport`: the batch pre-encoded as RESP ``PUBLISH`` commands between
  ``CLIENT REPLY OFF`` and ``CLIENT REPLY ON`` on a connection of its own, so Redis answers the
  whole batch with one ``+OK``. About 0.4 µs of bridge CPU and 0.8 µs of Redis CPU per message.
* :class:`LuaTransport`: one ``EVALSHA`` whose arguments are the pairs. About 1.3 µs of bridge
  CPU and 2.4 µs of Redis CPU per message (Lua's argument handling).
* :class:`PipelineTransport`: redis-py's pipeline, one ``PUBLISH`` each; packing and reading a
  reply per command costs ~5-15 µs of bridge CPU per message. Portable: fakeredis, proxies.

Each falls back to the next for good on its first refusal (a ``ResponseError``: the command is
unknown, or an ACL denies it; for ``CLIENT REPLY`` also a server that ignores it), logging it
once, so the bridge uses the fastest the server accepts.

:class:`FencedTransport` wraps any of them so that nothing is sent while the bridge cannot be
sure it still holds its namespace (bridge/lease.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import structlog
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError

__all__ = [
    "LUA_PUBLISH",
    "FencedTransport",
    "LuaTransport",
    "NotLeaseholder",
    "PipelineTransport",
    "Transport",
    "UnrepliedTransport",
]

_log = structlog.get_logger(__name__)

#: Publishes ARGV as (channel, message) pairs; returns how many reached no subscriber.
LUA_PUBLISH: Final = """
local unheard = 0
for i = 1, #ARGV, 2 do
  if redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) == 0 then unheard = unheard + 1 end
end
return unheard
"""


class Transport(Protocol):
    """Sends one batch in one round trip: ``flat`` alternates channel and message.

    Returns how many messages are known to have reached no subscriber.
    """

    def __call__(self, flat: list[bytes], /) -> Awaitable[int]: ...


class NotLeaseholder(RedisError):
    """Raised instead of sending while the namespace lease is not confirmed.

    A ``RedisError`` on purpose: the publisher then does what it does in an outage (keeps the
    batch, conflates, backs off, logs once) until the lease is confirmed again or the bridge
    stops. A bridge cut off from Redis for longer than the lease must not flush its backlog of
    old prices into channels a standby has been publishing to meanwhile.
    """


class FencedTransport:
    """Sends through ``inner`` only while ``gate()`` says the namespace is still ours."""

    def __init__(self, inner: Transport, gate: Callable[[], bool]) -> None:
        self._inner = inner
        self._gate = gate

    async def __call__(self, flat: list[bytes], /) -> int:
        if not self._gate():
            raise NotLeaseholder("the namespace lease is not confirmed: holding the batch")
        return await self._inner(flat)


class PipelineTransport:
    """One ``PUBLISH`` per message in a non-transactional redis-py pipeline."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def __call__(self, flat: list[bytes], /) -> int:
        it = iter(flat)
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel, message in zip(it, it, strict=True):
                pipe.publish(channel, message)
            replies = await pipe.execute()
        return sum(1 for n in replies if n == 0)


class LuaTransport:
    """All messages as the arguments of ONE ``EVALSHA`` of :data:`LUA_PUBLISH`.

    redis-py loads the script again on ``NOSCRIPT`` (after a Redis restart). Where scripting is
    refused (an ACL without ``EVAL``, a proxy, fakeredis) the first ``ResponseError`` switches
    to :class:`PipelineTransport`; a batch the script had half published may then repeat some
    messages, which at-least-once delivery allows.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._script = redis.register_script(LUA_PUBLISH)
        self._fallback: PipelineTransport | None = None

    async def __call__(self, flat: list[bytes], /) -> int:
        if self._fallback is not None:
            return await self._fallback(flat)
        try:
            return int(await self._script(args=flat))
        except ResponseError as exc:
            _log.warning("publish_transport_fallback", error=str(exc), fallback="pipeline")
            self._fallback = PipelineTransport(self._redis)
            return await self._fallback(flat)


_REPLY_OFF: Final = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$3\r\nOFF\r\n"
_REPLY_ON: Final = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$2\r\nON\r\n"
_CRLF: Final = b"\r\n"
#: Cached RESP prefixes (``PUBLISH <channel>``) kept before the cache starts over.
_MAX_HEADS: Final = 20_000


class _Refused(Exception):
    """The server refuses or ignores ``CLIENT REPLY``: this transport cannot work there."""


class UnrepliedTransport:
    """``PUBLISH`` commands pre-encoded as RESP, with Redis's replies switched off per batch.

    Reading one integer reply per message through redis-py costs more than everything else the
    bridge does for a tick, and Lua costs Redis three times what plain ``PUBLISH`` does. With
    ``CLIENT REPLY OFF`` … ``ON`` around the batch, Redis runs the commands in order and answers
    only the final ``ON``: when that ``+OK`` arrives, every message of the batch was published.

    What replies would have told, checked another way:

    * ``PUBLISH`` fails only for a malformed command (ours, tested) or an ACL that denies the
      channel. The first batch on every new connection, and then one batch every
      ``verify_every`` seconds (5), is therefore sent *with* replies and every reply checked,
      so a denied channel raises ``NoPermissionError`` (retried, counted and reported by the
      publisher, and ``/readyz`` turns 503) within seconds instead of vanishing for good: a
      first batch may hold only events on channels the ACL allows. An ACL that allows some
      tick channels and denies others is seen only when a checked batch holds one of those.
      Reading the replies of one batch in 5 s costs a few milliseconds.
    * How many messages reached no subscriber is counted only for the checked batches.

    The connection is this transport's own (taken from the pool and never returned), because
    a batch cut short mid-way (timeout, cancellation) can leave it with replies off; every such
    failure disconnects it, and a new connection starts with replies on. If the server refuses
    ``CLIENT REPLY`` (Redis < 3.2, a proxy, an ACL), or accepts it but answers anyway (the
    first answer of a batch is not the final ``+OK``), the transport switches to
    :class:`LuaTransport` for good.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        verify_every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._connection: AbstractConnection | None = None
        self._checked = False  # the current connection accepted CLIENT REPLY and a batch
        self._verify_every = verify_every
        self._clock = clock
        self._verified_at = -math.inf  # when a batch was last sent with its replies checked
        self._heads: dict[bytes, bytes] = {}
        self._fallback: LuaTransport | None = None

    async def __call__(self, flat: list[bytes], /) -> int:
        if self._fallback is not None:
            return await self._fallback(flat)
        connection = self._connection
        if connection is None:
            pool = self._redis.connection_pool
            connection = self._connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            due = self._clock() - self._verified_at >= self._verify_every
            if due or not self._checked or not connection.is_connected:
                return await self._replied_batch(connection, flat)
            await connection.send_packed_command(self._encode(flat, unreplied=True), False)
            reply = await connection.read_response()
            if reply != b"OK":
                # Replies were not switched off (a proxy or server that accepts CLIENT REPLY but
                # ignores it): the answers are out of step with the batches.
                raise _Refused(f"CLIENT REPLY OFF ignored: first answer {reply!r}")
        except _Refused as refused:
            # For good; the batch is re-sent through Lua (at-least-once: it may repeat).
            _log.warning("publish_transport_fallback", error=str(refused), fallback="lua")
            await self.aclose()
            self._fallback = LuaTransport(self._redis)
            return await self._fallback(flat)
        except BaseException:
            self._checked = False
            await connection.disconnect(nowait=True)
            raise
        return 0

    async def aclose(self) -> None:
        """Disconnect the transport's own connection (the pool does not know it is in use)."""
        if self._connection is not None:
            await self._connection.disconnect()
            await self._redis.connection_pool.release(self._connection)
            self._connection = None

    async def _replied_batch(self, connection: AbstractConnection, flat: list[bytes]) -> int:
        """Make sure replies are on (probing ``CLIENT REPLY`` on a fresh connection), then send
        ``flat`` reading every reply."""
        self._checked = False
        if not connection.is_connected:
            await connection.connect()  # type: ignore[no-untyped-call]
        await connection.send_packed_command(_REPLY_ON, False)
        try:
            await connection.read_response()
        except ResponseError as exc:
            raise _Refused(str(exc)) from exc
        await connection.send_packed_command(self._encode(flat, unreplied=False), False)
        unheard = 0
        for _ in range(len(flat) // 2):
            if await connection.read_response() == 0:
                unheard += 1
        self._checked = True
        self._verified_at = self._clock()
        return unheard

    def _encode(self, flat: list[bytes], *, unreplied: bool) -> list[bytes]:
        heads = self._heads
        if len(heads) > _MAX_HEADS:
            heads.clear()
        parts: list[bytes] = [_REPLY_OFF] if unreplied else []
        append = parts.append
        it = iter(flat)
        for channel, message in zip(it, it, strict=True):
            head = heads.get(channel)
            if head is None:
                head = heads[channel] = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n" % (
                    len(channel),
                    channel,
                )
            append(head)
            append(b"$%d\r\n" % len(message))
            append(message)
            append(_CRLF)
        if unreplied:
            append(_REPLY_ON)
        return parts
