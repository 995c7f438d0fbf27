"""CPU per published message of each publish transport, on the bridge's side and on Redis's.

A private ``redis-server`` and a ``bench.subscriber`` on ``<ns>:ticks:*`` (pattern matching is
part of Redis's cost, as in production) are started; then each transport publishes ``--total``
messages of ``--size`` bytes over 3000 channels in batches of ``--batch``, interleaved over
``--runs`` rounds so machine noise hits all alike. Reported per transport (median of the runs):
messages/s, this process's CPU µs per message (``getrusage``) and Redis's (``INFO cpu``). The
subscriber's count must equal what was sent, or the run fails.

Run: ``.venv/bin/python -m bench.transports`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from bench.processes import Child, private_redis
from bridge.transports import LuaTransport, PipelineTransport, Transport, UnrepliedTransport

__all__ = ["main"]

_KINDS: dict[str, type[UnrepliedTransport] | type[LuaTransport] | type[PipelineTransport]] = {
    "unreplied": UnrepliedTransport,
    "lua": LuaTransport,
    "pipeline": PipelineTransport,
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _redis_cpu(admin: Redis) -> float:
    info = await admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _one(
    url: str, kind: str, channels: list[bytes], message: bytes, total: int, batch: int
) -> tuple[float, float, float]:
    client = Redis.from_url(url)
    admin = Redis.from_url(url)
    transport: Transport = _KINDS[kind](client)
    flat_channels = [channels[n % len(channels)] for n in range(total)]
    await transport([channels[0], message])  # connect, load the script, probe CLIENT REPLY
    cpu0, redis0, t0 = _cpu(), await _redis_cpu(admin), time.perf_counter()
    for start in range(0, total, batch):
        flat: list[bytes] = []
        for channel in flat_channels[start : start + batch]:
            flat += (channel, message)
        await transport(flat)
    elapsed = time.perf_counter() - t0
    cpu, redis_cpu = _cpu() - cpu0, await _redis_cpu(admin) - redis0
    if isinstance(transport, UnrepliedTransport):
        await transport.aclose()
    await client.aclose()
    await admin.aclose()
    return total / elapsed, 1e6 * cpu / total, 1e6 * redis_cpu / total


async def _amain(args: argparse.Namespace, url: str, subscriber: Child) -> int:
    ns = "bench-transports"
    channels = [f"{ns}:ticks:{256265 + 256 * n}".encode() for n in range(3000)]
    message = b'{"pad":"' + b"x" * max(0, args.size - 10) + b'"}'
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in args.transports}
    for _ in range(args.runs):
        for kind in args.transports:
            results[kind].append(await _one(url, kind, channels, message, args.total, args.batch))
    expected = args.runs * len(args.transports) * (args.total + 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        received = int(subscriber.events.get("progress", {}).get("received", 0))
        if received >= expected:
            break
        await asyncio.sleep(0.3)
    print(
        f"{args.total} messages of {len(message)} bytes per run, batches of {args.batch}, "
        f"{args.runs} runs interleaved; medians"
    )
    print(f"{'transport':10s} {'msg/s':>10s} {'bridge µs/msg':>14s} {'redis µs/msg':>13s}")
    for kind, runs in results.items():
        rate, ours, theirs = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"{kind:10s} {rate:10,.0f} {ours:14.2f} {theirs:13.2f}")
    print(f"subscriber received {received} of {expected}")
    return 0 if received == expected else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transports", description=__doc__)
    parser.add_argument("--total", type=int, default=200_000, help="messages per run")
    parser.add_argument("--batch", type=int, default=2000, help="messages per round trip")
    parser.add_argument("--size", type=int, default=900, help="bytes per message")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--transports", nargs="+", choices=sorted(_KINDS), default=["unreplied", "lua", "pipeline"]
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-transports-") as tmp:
        logs = Path(tmp)
        with private_redis(logs) as (url, _redis):
            subscriber = Child(
                "subscriber",
                [
                    sys.executable, "-m", "bench.subscriber", "--redis-url", url,
                    "--pattern", "bench-transports:ticks:*", "--report-interval", "0.25",
                ],
                logs,
            )  # fmt: skip
            try:
                subscriber.wait_event("ready", 10)
                return asyncio.run(_amain(args, url, subscriber))
            finally:
                subscriber.stop()


if __name__ == "__main__":
    raise SystemExit(main())
