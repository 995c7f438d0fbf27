"""The desired subscriptions, kept in the hash ``<ns>:subscriptions`` (token → mode).

Redis, not the process, owns this set: it survives restarts, and the feed is reconciled to it
on every (re)connect. Every write replaces or extends the set inside MULTI/EXEC, so a reader
never sees half a change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, cast

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT, FieldT

from bridge.kite.records import Mode

__all__ = ["MODES", "SubscriptionStore", "decode_subscriptions", "encode_subscriptions"]

_log = structlog.get_logger(__name__)

MODES: Final[frozenset[str]] = frozenset({"ltp", "quote", "full"})


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def decode_subscriptions(raw: Mapping[bytes | str, bytes | str], key: str = "") -> dict[int, Mode]:
    """Parse an HGETALL reply; entries that are not ``<positive int> → <mode>`` are skipped.

    Only the bridge writes the hash, but an operator may edit it by hand: a bad entry is
    logged and ignored rather than taking the bridge down.
    """
    desired: dict[int, Mode] = {}
    for field, value in raw.items():
        token_text, mode = _text(field), _text(value).strip().lower()
        try:
            token = int(token_text)
        except ValueError:
            token = 0
        if token <= 0 or token >= 2**32 or mode not in MODES:
            _log.warning("subscription_entry_invalid", key=key, token=token_text, mode=mode)
            continue
        desired[token] = cast(Mode, mode)
    return desired


def encode_subscriptions(desired: Mapping[int, Mode]) -> dict[FieldT, EncodableT]:
    return {str(token): mode for token, mode in desired.items()}


class SubscriptionStore:
    """Reads and writes ``<ns>:subscriptions``."""

    def __init__(self, redis: Redis, namespace: str) -> None:
        self._redis = redis
        self.key = f"{namespace}:subscriptions"

    async def load(self) -> dict[int, Mode]:
        raw = await self._redis.hgetall(self.key)
        return decode_subscriptions(raw, self.key)

    def queue_replace(self, pipe: Pipeline, desired: Mapping[int, Mode]) -> None:
        """Queue the commands that make the hash equal ``desired`` on ``pipe``.

        For callers that must change the set in the same MULTI/EXEC as other writes (the
        control consumer acknowledges a command in the transaction that applies it).
        """
        pipe.delete(self.key)
        if desired:
            pipe.hset(self.key, mapping=encode_subscriptions(desired))

    async def replace(self, desired: Mapping[int, Mode]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self.queue_replace(pipe, desired)
            await pipe.execute()

    async def merge(self, extra: Mapping[int, Mode]) -> dict[int, Mode]:
        """Add ``extra`` (its modes win) and return the whole resulting set, atomically."""
        async with self._redis.pipeline(transaction=True) as pipe:
            if extra:
                pipe.hset(self.key, mapping=encode_subscriptions(extra))
            pipe.hgetall(self.key)
            replies = await pipe.execute()
        return decode_subscriptions(replies[-1], self.key)
