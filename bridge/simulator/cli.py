"""``bridge simulate``: run the Kite simulator from the command line, with scripted faults.

``add_arguments`` and ``run`` are split so ``bridge/cli.py`` can mount them as a sub-command;
``main`` serves ``python -m bridge.simulator``. Tokens given on the command line are never logged:
only how many there are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import IO, Any

import structlog

from bridge.simulator.server import FrameHook, Simulator, check_close_code

__all__ = ["add_arguments", "main", "run"]

log = structlog.get_logger(__name__)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _at_least_one(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _close_code(text: str) -> int:
    code = _integer(text)
    try:
        return check_close_code(code)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"cannot be sent in a close frame: {code} (use 1000-1003, 1007-1014 or 3000-4999)"
        ) from None


def _enctoken(text: str) -> tuple[str, str]:
    user_id, sep, token = text.partition(":")
    if not sep or not user_id or not token:
        # Deliberately no echo of the value: it holds a secret.
        raise argparse.ArgumentTypeError("expected USER_ID:ENCTOKEN")
    return user_id, token


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser`` (a top-level parser or a sub-command)."""
    net = parser.add_argument_group("listening")
    net.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s)")
    net.add_argument("--port", type=int, default=8765, help="port, 0 = any (default: %(default)s)")
    net.add_argument(
        "--compression",
        action="store_true",
        help="negotiate permessage-deflate if the client offers it (default: off)",
    )

    auth = parser.add_argument_group("authentication (HTTP 403 for anything else)")
    auth.add_argument(
        "--access-token",
        action="append",
        metavar="TOKEN",
        help="accepted Kite Connect access token; repeatable (default: any non-empty token)",
    )
    auth.add_argument(
        "--enctoken",
        action="append",
        type=_enctoken,
        metavar="USER_ID:TOKEN",
        help="accepted Kite Web user and enctoken; repeatable (default: any non-empty pair)",
    )
    auth.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="accepted Kite Connect api_key; repeatable (default: any non-empty key)",
    )

    feed = parser.add_argument_group("market data")
    feed.add_argument(
        "--tick-interval",
        type=_positive,
        default=0.2,
        metavar="SECONDS",
        help="pause between tick frames, also the random walk's step (default: %(default)s)",
    )
    feed.add_argument(
        "--heartbeat-interval",
        type=_positive,
        default=1.0,
        metavar="SECONDS",
        help="1-byte heartbeat after this much silence (default: %(default)s)",
    )
    feed.add_argument("--seed", type=int, help="random seed for reproducible prices")
    feed.add_argument(
        "--max-tokens",
        type=_at_least_one,
        default=3000,
        help="instruments per connection, duplicates counted (default: %(default)s)",
    )
    feed.add_argument(
        "--unlisted",
        type=_integer,
        nargs="+",
        action="extend",
        default=[],
        metavar="TOKEN",
        help="tokens of no instrument: accepted, never ticking (Kite does not validate tokens)",
    )
    feed.add_argument(
        "--firehose",
        action="store_true",
        help="benchmark mode: send frames back to back instead of every tick interval",
    )
    feed.add_argument(
        "--packets-per-frame",
        type=int,
        default=500,
        metavar="N",
        help="most packets in one frame (default: %(default)s)",
    )
    feed.add_argument(
        "--frames-per-second",
        type=_positive,
        metavar="RATE",
        help="with --firehose: pace each connection at this frame rate (default: unpaced)",
    )
    feed.add_argument(
        "--frame-log",
        type=argparse.FileType("w"),
        metavar="PATH",
        help="write 'frame_no monotonic_ns packets' per tick frame sent (latency benchmarks)",
    )

    faults = parser.add_argument_group("fault injection")
    faults.add_argument(
        "--drop-every",
        type=_positive,
        metavar="SECONDS",
        help="abort all TCP connections (no close frame, clients see 1006) periodically",
    )
    faults.add_argument(
        "--stall-after",
        type=_positive,
        metavar="SECONDS",
        help="go silent (no frames, heartbeats or pongs) this long after start",
    )
    faults.add_argument(
        "--stall-for",
        type=_positive,
        metavar="SECONDS",
        help="end the stall after this long (default: stall until stopped)",
    )
    faults.add_argument(
        "--close-every",
        type=_positive,
        metavar="SECONDS",
        help="close all connections with a close frame carrying --close-code periodically",
    )
    faults.add_argument(
        "--close-code",
        type=_close_code,
        default=1000,
        metavar="CODE",
        help="WebSocket close code for --close-every, e.g. 1011 (default: %(default)s)",
    )
    faults.add_argument(
        "--reject-first",
        type=int,
        default=0,
        metavar="N",
        help="answer the first N handshakes with --reject-status",
    )
    faults.add_argument(
        "--reject-status",
        type=int,
        default=403,
        metavar="STATUS",
        help="HTTP status for --reject-first (default: %(default)s)",
    )
    faults.add_argument(
        "--order-every",
        type=_positive,
        metavar="SECONDS",
        help="send an order-update text frame to every connection periodically",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; 0 on a clean stop, 2 on bad options, 1 if it cannot bind."""
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:  # a second ^C while stopping
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bridge.simulator``."""
    parser = argparse.ArgumentParser(
        prog="python -m bridge.simulator", description="Local Kite ticker websocket simulator."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


async def _serve(args: argparse.Namespace) -> int:
    frame_log: IO[str] | None = args.frame_log
    try:
        simulator = Simulator(
            host=args.host,
            port=args.port,
            access_tokens=args.access_token,
            enctokens=dict(args.enctoken) if args.enctoken else None,
            api_keys=args.api_key,
            tick_interval=args.tick_interval,
            heartbeat_interval=args.heartbeat_interval,
            max_tokens=args.max_tokens,
            seed=args.seed,
            firehose=args.firehose,
            packets_per_frame=args.packets_per_frame,
            frames_per_second=args.frames_per_second,
            on_frame_sent=_frame_logger(frame_log) if frame_log else None,
            compression=args.compression,
            unlisted=args.unlisted,
        )
        if args.reject_first:
            simulator.reject_next(args.reject_first, args.reject_status)
    except ValueError as exc:
        log.error("invalid simulator options", error=str(exc))
        return 2
    try:
        await simulator.start()
    except OSError as exc:
        log.error("cannot listen", host=args.host, port=args.port, error=str(exc))
        return 1
    log.info(
        "simulator ready",
        url=simulator.url,
        access_tokens=len(args.access_token) if args.access_token else "any",
        enctokens=len(args.enctoken) if args.enctoken else "any",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    tasks = [asyncio.create_task(fault) for fault in _faults(simulator, args)]
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await simulator.stop()
        if frame_log is not None:
            frame_log.close()
    return 0


def _frame_logger(stream: IO[str]) -> FrameHook:
    def record(frame_no: int, sent_ns: int, tokens: tuple[int, ...]) -> None:
        stream.write(f"{frame_no} {sent_ns} {len(tokens)}\n")

    return record


def _faults(simulator: Simulator, args: argparse.Namespace) -> list[Coroutine[Any, Any, None]]:
    faults: list[Coroutine[Any, Any, None]] = []
    if args.drop_every:
        faults.append(_every(args.drop_every, simulator.drop))
    if args.order_every:
        faults.append(_every(args.order_every, simulator.send_order))
    if args.close_every:
        code: int = args.close_code
        faults.append(_every(args.close_every, lambda: simulator.close(code)))
    if args.stall_after:
        faults.append(_stall(simulator, args.stall_after, args.stall_for))
    return faults


async def _every(seconds: float, action: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        with contextlib.suppress(TimeoutError):
            await action()


async def _stall(simulator: Simulator, after: float, duration: float | None) -> None:
    await asyncio.sleep(after)
    simulator.stall(True)
    if duration is not None:
        await asyncio.sleep(duration)
        simulator.stall(False)
