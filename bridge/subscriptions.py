"""The desired subscriptions, kept in the hash ``<ns>:subscriptions`` (token → mode).

Redis, not the process, owns this set: it survives restarts, and the feed is reconciled to it
on every (re)connect. Every write replaces or extends the set inside MULTI/EXEC, so a reader
never sees half a change.

One exception to "Redis owns it": a Redis *server* restart. Without persistence (the default of
many deployments, including our compose file) it empties the hash while the bridge still runs;
with RDB snapshots it brings back the set of the last snapshot, undoing every command
acknowledged since. Following Redis then would silently unsubscribe instruments, or re-add
removed ones, at the next command or reconnect. The store therefore remembers the last set it
read or wrote together with the server's ``run_id``; when the server's identity changed and the
hash differs from that set, it writes the remembered set back (``subscriptions_restored``):
nothing the bridge acknowledged can be newer. On the same server, whatever the hash holds is the
desired set: an operator's ``unsubscribe all``, ``DEL`` or hand edit is followed, with one more
exception: a hash that vanished while the server's ``evicted_keys`` grew, on a server whose
``maxmemory`` policy may evict any key (``allkeys-*``), was most likely evicted and is written
back too. A fresh bridge process has nothing to remember and takes the hash as it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Final, cast

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from bridge.kite.records import Mode
from bridge.redis_client import InfoRefused, info_field

__all__ = ["MODES", "SubscriptionStore", "decode_subscriptions", "encode_subscriptions"]

_log = structlog.get_logger(__name__)

MODES: Final[frozenset[str]] = frozenset({"ltp", "quote", "full"})


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def decode_subscriptions(
    raw: Mapping[bytes | str, bytes | str],
    key: str = "",
    warned: set[tuple[str, str]] | None = None,
) -> dict[int, Mode]:
    """Parse an HGETALL reply; entries that are not ``<positive int> → <mode>`` are skipped.

    Only the bridge writes the hash, but an operator may edit it by hand: a bad entry is
    logged and ignored rather than taking the bridge down. With ``warned`` (the bad entries of
    the previous read, updated in place) each is logged once while it stays, not at every read.
    """
    desired: dict[int, Mode] = {}
    invalid: set[tuple[str, str]] = set()
    for field, value in raw.items():
        token_text, mode = _text(field), _text(value).strip().lower()
        try:
            token = int(token_text)
        except ValueError:
            token = 0
        if token <= 0 or token >= 2**32 or mode not in MODES:
            invalid.add((token_text, mode))
            if warned is None or (token_text, mode) not in warned:
                # ``instrument_token``: the log's redaction masks a key named ``token``.
                _log.warning(
                    "subscription_entry_invalid",
                    key=key,
                    instrument_token=token_text,
                    mode=mode,
                    expected="<instrument token 1..4294967295> -> ltp | quote | full",
                )
            continue
        desired[token] = cast(Mode, mode)
    if warned is not None:
        warned.clear()
        warned.update(invalid)
    return desired


def encode_subscriptions(desired: Mapping[int, Mode]) -> dict[FieldT, EncodableT]:
    return {str(token): mode for token, mode in desired.items()}


class SubscriptionStore:
    """Reads and writes ``<ns>:subscriptions``."""

    def __init__(self, redis: Redis, namespace: str) -> None:
        self._redis = redis
        self.key = f"{namespace}:subscriptions"
        #: The last set read from or written to Redis by this process, and the ``run_id`` of the
        #: server it came from (None: unknown, or the server cannot tell us).
        self._known: dict[int, Mode] = {}
        self._server_id: str | None = None
        self._server_id_supported = True
        #: Hand-written entries the last read skipped (each logged once while it stays).
        self._invalid: set[tuple[str, str]] = set()
        #: The server's ``evicted_keys`` when the set was last read (None: unknown).
        self._evicted: int | None = None
        #: How many times a restarted Redis server's lost or older set was written back.
        self.restored = 0
        #: Held by every read of the set (:meth:`load`, :meth:`reload`, :meth:`merge`) and by a
        #: writer from before its write until :meth:`remember`, so :attr:`known` is always what
        #: the latest of them saw: a read answered before a concurrent command's commit but
        #: finished after it would otherwise leave the pre-command set in :attr:`known`, and a
        #: later Redis restart would write that stale set back (a subscription lost). It also
        #: keeps a reader from taking the bridge's own committed write for an outside edit.
        self.lock = asyncio.Lock()

    @property
    def known(self) -> Mapping[int, Mode]:
        """The set this process last read from or wrote to Redis."""
        return self._known

    async def load(self) -> dict[int, Mode]:
        """The desired set; rewritten from memory if a restarted Redis server lost or aged it."""
        _, desired = await self.reload()
        return desired

    async def reload(self) -> tuple[dict[int, Mode], dict[int, Mode]]:
        """The set this process knew before reading, and the desired set read (:meth:`load`).

        Both under the lock, so a difference between them is a change made outside the bridge.
        """
        async with self.lock:
            known = dict(self._known)
            return known, await self._read()

    async def _read(self) -> dict[int, Mode]:
        server_id = await self._current_server_id()
        while True:
            raw = await self._redis.hgetall(self.key)
            # Read after the hash: an eviction that emptied it is then always counted already.
            evicted = await self._evicted_keys()
            # A restart between INFO and HGETALL would pass the new server's empty hash off as
            # the old server's: an operator's DEL, followed. Read again until both agree.
            after = await self._current_server_id()
            if after == server_id:
                break
            server_id = after
        desired = decode_subscriptions(raw, self.key, self._invalid)
        restarted = server_id is not None and self._server_id not in (None, server_id)
        # Only on the same server (a restart resets the counter), and only where the policy
        # can evict a key without a TTL: elsewhere another application's evicted cache keys
        # would turn an operator's DEL into an eviction.
        was_evicted = (
            not raw
            and not restarted
            and None not in (evicted, self._evicted)
            and evicted != self._evicted
            and await self._evicts_any_key()
        )
        if (restarted or was_evicted) and self._known and desired != self._known:
            if was_evicted:
                reason = "Redis evicted the set (maxmemory policy): evicted_keys grew meanwhile"
            elif not raw:
                reason = "the Redis server restarted and lost the set"
            else:
                reason = "the Redis server restarted with an older set (a snapshot, a replica)"
            _log.warning(
                "subscriptions_restored",
                reason=reason,
                found=len(desired),
                subscriptions=len(self._known),
            )
            await self._write(self._known)
            self.restored += 1
            desired = dict(self._known)
        self._server_id = server_id
        self._evicted = evicted
        self._known = desired
        return desired

    async def exists(self) -> bool:
        return bool(await self._redis.exists(self.key))

    def remember(self, desired: Mapping[int, Mode]) -> None:
        """Record a set the caller has written itself (e.g. through :meth:`queue_replace`)."""
        self._known = dict(desired)

    async def _current_server_id(self) -> str | None:
        if not self._server_id_supported:
            return None
        try:
            return await info_field(self._redis, "server", "run_id") or None
        except InfoRefused:
            self._server_id_supported = False
            _log.warning("redis_run_id_unavailable", consequence="restart guard disabled")
            return None

    async def _evicted_keys(self) -> int | None:
        if not self._server_id_supported:
            return None
        try:
            count = await info_field(self._redis, "stats", "evicted_keys")
        except InfoRefused:
            return None
        return None if count is None else int(count)

    async def _evicts_any_key(self) -> bool:
        """Is the policy ``allkeys-*``? Unknown (``CONFIG`` refused) counts as yes: losing every
        subscription silently is worse than undoing a ``DEL`` by hand."""
        try:
            policy = (await self._redis.config_get("maxmemory-policy")).get("maxmemory-policy")
        except ResponseError:
            return True
        text = policy.decode() if isinstance(policy, bytes) else str(policy)
        return policy is None or text.startswith("allkeys-")

    def queue_replace(self, pipe: Pipeline, desired: Mapping[int, Mode]) -> None:
        """Queue the commands that make the hash equal ``desired`` on ``pipe``.

        For callers that must change the set in the same MULTI/EXEC as other writes (the
        control consumer acknowledges a command in the transaction that applies it).
        """
        pipe.delete(self.key)
        if desired:
            pipe.hset(self.key, mapping=encode_subscriptions(desired))

    async def replace(self, desired: Mapping[int, Mode]) -> None:
        async with self.lock:
            await self._write(desired)

    async def _write(self, desired: Mapping[int, Mode]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self.queue_replace(pipe, desired)
            await pipe.execute()
        self.remember(desired)

    async def merge(self, extra: Mapping[int, Mode]) -> dict[int, Mode]:
        """Add ``extra`` (its modes win) and return the whole resulting set, atomically.

        The set is read first, as :meth:`load` does, so a server restarted since the last read
        gets the remembered set back before ``extra`` joins it rather than ``extra`` alone.
        """
        async with self.lock:
            await self._read()
            async with self._redis.pipeline(transaction=True) as pipe:
                if extra:
                    pipe.hset(self.key, mapping=encode_subscriptions(extra))
                pipe.hgetall(self.key)
                replies = await pipe.execute()
            desired = decode_subscriptions(replies[-1], self.key, self._invalid)
            self.remember(desired)
            return desired
