"""Garbage in, nothing out of place: 10,000 bad commands and random websocket frames.

The expected outcome of every input is computed with the bridge's own pure functions
(``parse_command``/``apply_command``, ``decode_frame``, ``parse_text_frame``), so the counts the
running bridge reports must match exactly, not just "roughly".
"""

from __future__ import annotations

import asyncio
import random
import string
from collections.abc import Callable

import orjson
from helpers import Launch, command, wait_until
from redis.asyncio import Redis

from bridge.commands import CommandError, apply_command, parse_command
from bridge.kite.codec import FrameError, decode_frame, encode_frame
from bridge.kite.messages import InvalidText, parse_text_frame
from bridge.kite.records import LtpTick
from bridge.payload import command_text
from chaos.harness import Listen, MakeSim, scaled
from chaos.test_feed_faults import assert_ticks_accounted, quiesce

INFY = 408065
#: Bridge RSS may grow by at most this many bytes per garbage command after the first
#: thousand (which warm up every code path and allocator pool). Measured: ~280 B per command
#: for the first ~12,000 commands, then flat (a 30,000 run: +3.5 MiB by 12,000, +0.3 MiB over
#: the 18,000 after), i.e. bounded buffers filling, not a leak. The raw commands average
#: ~1.3 KB: the limit is below half of them (checked below), so a leak keeping half of each
#: command fails even if nothing else grew, and with the ~280 B measured one of ~250 B does.
RSS_GROWTH_PER_COMMAND = 512


def _rejected(raw: bytes) -> bool:
    try:
        apply_command({}, parse_command(raw))
    except CommandError:
        return True
    return False


def garbage_commands(rng: random.Random, count: int) -> list[bytes]:
    """``count`` commands the bridge must reject, from many families of wrongness."""
    too_many = " ".join(str(t) for t in range(1_000_000, 1_005_000))
    families: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randint(1, 200)),
        lambda: b"subscribe full " + b"9" * rng.randint(70_000, 120_000),  # > 64 KiB
        lambda: rng.choice([b"", b"   ", b"\n\t", b"\xff\xfe", b"\x00"]),
        lambda: b'{"action": "subscribe", "tokens": [1, 2' + rng.randbytes(rng.randint(0, 5)),
        lambda: orjson.dumps({"action": rng.choice(["sub", "SUBSCRIBE!", "", 5, None])}),
        lambda: f"subscribe {rng.choice([0, -1, 2**32, 2**64, '1.5', 'x', '0x10'])}".encode(),
        lambda: orjson.dumps(
            {"action": "subscribe", "tokens": [rng.choice([0, 2**32, -3, 1.5, "7", True, None])]}
        ),
        lambda: f"subscribe {too_many}".encode(),  # 5,000 tokens: above Kite's 3,000
        lambda: orjson.dumps({"action": "subscribe", "tokens": list(range(1, 5001))}),
        lambda: f"mode {rng.choice(['ltp', 'full'])} {rng.randint(1, 2**31)}".encode(),
        lambda: f"subscribe {rng.choice(['fast', 'LTPX', '*'])} 408065".encode(),
        lambda: orjson.dumps({"id": "x" * 65, "action": "list"}),
        lambda: orjson.dumps({"id": "a b", "action": "list"}),
        lambda: orjson.dumps({"action": "list", "extra": 1}),
        lambda: "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 80))).encode(),
        lambda: orjson.dumps([1, 2, 3]),
        lambda: b"{" * rng.randint(1, 3000),
    ]
    weights = [30, 1, 3, 8, 6, 8, 8, 1, 1, 8, 6, 4, 4, 4, 20, 3, 2]
    result: list[bytes] = []
    while len(result) < count:
        raw = rng.choices(families, weights)[0]()
        if _rejected(raw):  # a random string that happens to be a valid command is skipped
            result.append(raw)
    return result


async def test_ten_thousand_garbage_commands_are_rejected_and_memory_stays_flat(
    make_sim: MakeSim, launch: Launch, listen: Listen, redis: Redis, redis_url: str, namespace: str
) -> None:
    total = int(scaled("CHAOS_GARBAGE_COMMANDS", 10_000))
    warmup = total // 10
    commands = garbage_commands(random.Random(5), total)
    sim = await make_sim()
    bridge = await launch(sim, redis_url)
    listener = await listen(redis_url)
    await wait_until(bridge.ready, within=15)
    control = f"{namespace}:control"

    async def push_and_wait(batch: list[bytes], expected_total: int) -> None:
        for start in range(0, len(batch), 500):
            await redis.rpush(control, *batch[start : start + 500])

        async def done() -> bool:
            metrics = await bridge.metrics()
            return metrics.get("bridge_commands_total", result="rejected") >= expected_total

        await wait_until(done, within=120, step=0.1)

    await push_and_wait(commands[:warmup], warmup)
    curve = [bridge.rss()]  # after the warm-up, then after every further batch
    for start in range(warmup, total, warmup):
        await push_and_wait(commands[start : start + warmup], min(total, start + warmup))
        curve.append(bridge.rss())

    metrics = await bridge.metrics()
    assert metrics.get("bridge_commands_total", result="rejected") == total
    assert metrics.get("bridge_commands_total", result="applied") == 0
    assert metrics.get("bridge_commands_by_action_total", action="invalid") > total // 2
    # Every one rejected with a reason, in the order sent: one result event each.
    await wait_until(lambda: len(listener.named("command")) >= total, within=15)
    results = listener.named("command")
    assert len(results) == total
    assert [result["command"] for result in results] == [command_text(raw) for raw in commands]
    assert all(result["ok"] is False for result in results)
    assert all(isinstance(result["error"], str) and result["error"] for result in results)
    dead = await redis.lrange(f"{namespace}:control:dead", 0, -1)
    assert len(dead) == 1000  # capped, newest last
    letters = [orjson.loads(entry) for entry in dead]
    assert all(letter["error"] and letter["at"] for letter in letters)
    assert [letter["command"] for letter in letters] == [command_text(c) for c in commands[-1000:]]
    assert [letter["error"] for letter in letters] == [r["error"] for r in results[-1000:]]
    assert await redis.llen(control) == 0
    assert await redis.llen(f"{namespace}:control:processing") == 0
    assert await redis.hgetall(f"{namespace}:subscriptions") == {}

    # Still alive, still applying good commands.
    result = await command(
        redis, namespace, {"id": "good", "action": "subscribe", "mode": "full", "tokens": [INFY]}
    )
    assert result["ok"] is True
    await wait_until(lambda: listener.ticks[INFY] > 0, within=10)
    assert sim.subscriptions() == {INFY: "full"}
    measured = total - warmup
    growth = curve[-1] - curve[0]
    limit = RSS_GROWTH_PER_COMMAND * measured
    assert limit < sum(len(raw) for raw in commands[warmup:]) / 2  # the margin claimed above
    print(
        f"{total} garbage commands: RSS after the first {warmup} then every {warmup} more:",
        " ".join(f"{rss / 2**20:.2f}" for rss in curve),
        f"MiB; grew {growth / 2**20:.2f} MiB over {measured} (limit {limit / 2**20:.2f})",
    )
    assert growth < limit, growth
    code, _ = await bridge.stop()
    assert code == 0


def random_binary_frames(rng: random.Random, count: int) -> list[bytes]:
    """Noise, and real frames broken in the ways a bad link or a buggy server breaks them."""
    good = encode_frame(
        [LtpTick(tradable=True, mode="ltp", instrument_token=408065, last_price=1500.5)] * 3
    )
    makers: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randint(2, 600)),
        lambda: good[: rng.randint(2, len(good) - 1)],  # truncated
        lambda: good + rng.randbytes(rng.randint(1, 20)),  # trailing junk
        lambda: b"\xff\xff" + good[2:],  # packet count far too high
        lambda: b"\x00\x01\x00\x00",  # one packet of length 0
        lambda: bytes(good[:4]) + rng.randbytes(len(good) - 4),  # right shape, random content
        lambda: b"\x00\x01\x00\x08" + rng.randbytes(8),  # a valid-length random ltp packet
    ]
    return [rng.choice(makers)() for _ in range(count)]


def random_text_frames(rng: random.Random, count: int) -> list[str]:
    makers: list[Callable[[], str]] = [
        lambda: "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 200))),
        lambda: orjson.dumps(
            {"type": rng.choice(["order", "error", "message", "x", 5, None])}
        ).decode(),
        lambda: orjson.dumps(
            {"type": "order", "data": rng.choice([5, "s", [1], None, {}])}
        ).decode(),
        lambda: orjson.dumps(
            {"type": "error", "data": rng.choice([5, {"a": 1}, "bad thing"])}
        ).decode(),
        lambda: '{"type": "message", "data": ' + "[" * rng.randint(1, 2000),
        lambda: '{"type": "order", "data": {"n": ' + "9" * rng.randint(20, 400) + "}}",
        lambda: "x" * rng.randint(10_000, 100_000),
    ]
    return [rng.choice(makers)() for _ in range(count)]


async def test_random_frames_are_counted_and_ticks_resume(
    make_sim: MakeSim, launch: Launch, listen: Listen, redis_url: str
) -> None:
    rng = random.Random(9)
    binary = random_binary_frames(rng, int(scaled("CHAOS_FUZZ_FRAMES", 300)))
    text = random_text_frames(rng, int(scaled("CHAOS_FUZZ_FRAMES", 300)))
    bad_binary = 0
    for frame in binary:
        try:
            decode_frame(frame)
        except FrameError:
            bad_binary += 1
    bad_text = sum(isinstance(parse_text_frame(frame), InvalidText) for frame in text)
    assert bad_binary > len(binary) // 2
    assert bad_text > len(text) // 2

    sim = await make_sim()
    bridge = await launch(sim, redis_url, BRIDGE_SUBSCRIBE=f"quote:{INFY}")
    listener = await listen(redis_url)
    await wait_until(bridge.ready, within=15)
    before = await bridge.metrics()
    frames: list[bytes | str] = [*binary, *text]
    rng.shuffle(frames)
    for i, item in enumerate(frames):
        if isinstance(item, bytes):
            await sim.send_binary(item)
        else:
            await sim.send_text(item)
        if i % 50 == 0:
            await asyncio.sleep(0.01)

    async def all_counted() -> bool:
        metrics = await bridge.metrics()
        return metrics["bridge_malformed_frames_total"] >= bad_binary + bad_text

    await wait_until(all_counted, within=15, step=0.2)
    ticks_before = listener.ticks[INFY]
    await wait_until(lambda: listener.ticks[INFY] > ticks_before + 10, within=5)
    metrics = await quiesce(sim, bridge)
    assert metrics["bridge_malformed_frames_total"] == bad_binary + bad_text
    assert metrics["bridge_text_messages_total"] - before["bridge_text_messages_total"] == len(text)
    assert metrics["bridge_connections_total"] == 1  # the connection survived all of it
    assert metrics["bridge_handler_errors_total"] == 0
    assert_ticks_accounted(metrics)
    assert bridge.alive()
    print(f"fuzzed {len(binary)} binary ({bad_binary} malformed)", end=" ")
    print(f"+ {len(text)} text ({bad_text} malformed)")
    code, _ = await bridge.stop()
    assert code == 0
