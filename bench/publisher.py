"""Publisher throughput: the Lua (one EVALSHA per batch) against the pipeline transport.

Feeds pre-built ticks to :class:`bridge.publisher.Publisher` in frames of ``--frame`` ticks, as
the feed would, with the sender task running, and reports ticks/s until everything is
published, plus the mean round trip per batch. Serialisation (``tick_json``) is included: it is
part of the publisher's per-tick cost.

Run (real Redis; a pattern subscriber is attached unless ``--no-subscriber``)::

    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python -m bench.publisher --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from typing import Literal

from redis.asyncio import Redis

from bridge.kite.records import LtpTick, Ohlc, QuoteTick, Tick
from bridge.publisher import Publisher
from bridge.redis_client import create_redis

__all__ = ["main"]


def _tick(kind: str, token: int, price: float) -> Tick:
    if kind == "ltp":
        return LtpTick(True, "ltp", token, price)
    ohlc = Ohlc(price, price + 1, price - 1, price - 0.5)
    return QuoteTick(True, "quote", token, price, 1, price, 1000, 50, 60, ohlc, 0.5)


def _ticks(kind: str, count: int, tokens: int) -> list[Tick]:
    return [_tick(kind, 1 + n % tokens, 100.0 + n % 97) for n in range(count)]


async def _drain(pubsub: object, stop: asyncio.Event) -> int:
    received = 0
    while not stop.is_set():
        msg = await pubsub.get_message(timeout=0.05)  # type: ignore[attr-defined]
        if msg is not None and msg["type"] == "pmessage":
            received += 1
    return received


async def one_run(
    redis: Redis,
    transport: Literal["lua", "pipeline"],
    ticks: list[Tick],
    frame: int,
    batch_max: int,
    subscribe: bool,
) -> tuple[float, float]:
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    publisher = Publisher(
        redis, ns, transport=transport, max_pending=len(ticks) + 1, batch_max=batch_max
    )
    sub_client = pubsub = None
    stop = asyncio.Event()
    drain = None
    if subscribe:
        sub_client = Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
        pubsub = sub_client.pubsub()
        await pubsub.psubscribe(f"{ns}:ticks:*")
        drain = asyncio.create_task(_drain(pubsub, stop))
    publisher.start()
    started = time.perf_counter()
    for i in range(0, len(ticks), frame):
        publisher.submit(ticks[i : i + frame])
        if i // frame % 8 == 7:
            await asyncio.sleep(0)  # let the sender run, as the feed's reader would
    assert await publisher.flush(120)
    elapsed = time.perf_counter() - started
    await publisher.close(1)
    stop.set()
    if drain is not None:
        await drain
    if pubsub is not None and sub_client is not None:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await sub_client.aclose()
    stats = publisher.stats
    assert stats.published == len(ticks), stats
    return len(ticks) / elapsed, stats.batch_seconds_total / max(stats.batches, 1)


async def amain(args: argparse.Namespace) -> None:
    redis = create_redis(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    ticks = _ticks(args.kind, args.ticks, args.tokens)
    results: dict[str, list[tuple[float, float]]] = {"lua": [], "pipeline": []}
    transports: tuple[Literal["lua", "pipeline"], ...] = ("lua", "pipeline")
    for _ in range(args.runs):
        for transport in transports:  # interleaved: noise hits both alike
            results[transport].append(
                await one_run(
                    redis, transport, ticks, args.frame, args.batch_max, not args.no_subscriber
                )
            )
    await redis.aclose()
    for name, runs in results.items():
        rates = [rate for rate, _ in runs]
        rtt = statistics.median(batch for _, batch in runs) * 1000
        print(
            f"{name:8s} median {statistics.median(rates):9.0f} ticks/s "
            f"(min {min(rates):.0f}, max {max(rates):.0f}; {args.runs} runs); "
            f"median batch round trip {rtt:.2f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=100_000)
    parser.add_argument("--kind", choices=["ltp", "quote"], default="quote")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--frame", type=int, default=200, help="ticks per submit()")
    parser.add_argument("--batch-max", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-subscriber", action="store_true")
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
