"""The benchmark's own parts: if they miscount, every number in docs/performance.md is wrong.

Covers the subscriber's pmessage parsing and checks, the firehose's frames and protocol, the
naive baseline's decoder, the null relay's stamping, and the harness's latency and RSS maths.
No Redis and no subprocesses: each part is driven directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import struct
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

# bench/ is a directory of scripts next to the package, not an installed package.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import e2e, naive_bridge, null_relay, procstat, profile_summary  # noqa: E402
from bench.decode import main as decode_main  # noqa: E402
from bench.decode import make_frames  # noqa: E402
from bench.firehose import HEARTBEAT, Firehose, build_frames  # noqa: E402
from bench.subscriber import Counter, pmessage_stream  # noqa: E402
from bridge.kite.codec import decode_frame, encode_frame  # noqa: E402
from bridge.kite.records import FullTick, Mode, QuoteTick  # noqa: E402
from bridge.payload import tick_json  # noqa: E402
from bridge.simulator.market import Market  # noqa: E402

NSE, NFO, INDEX = 408065, 12517890, 256265
PATTERN = b"bench:ticks:*"


def _full_tick() -> FullTick:
    tick = decode_frame(make_frames(1, 1)[0])[0]
    assert isinstance(tick, FullTick)
    return tick


def _message(tick: FullTick, channel_token: int | None = None) -> bytes:
    token = tick.instrument_token if channel_token is None else channel_token
    return pmessage_stream(PATTERN, b"bench:ticks:%d" % token, tick_json(tick), 1)


# -- subscriber ----------------------------------------------------------------------------------


def test_subscriber_counts_and_checks_every_sampled_message() -> None:
    counter = Counter(sample=1)
    counter.feed(_message(_full_tick()) * 5, 0)
    assert (counter.received, counter.checked, counter.bad) == (5, 5, 0)


@pytest.mark.parametrize(
    "payload",
    [b"not json", b'{"instrument_token": 408065}', b"[1, 2]"],
)
def test_subscriber_flags_payloads_that_break_the_contract(payload: bytes) -> None:
    counter = Counter(sample=1)
    counter.feed(pmessage_stream(PATTERN, b"bench:ticks:408065", payload, 1), 0)
    assert (counter.received, counter.bad) == (1, 1)


def test_subscriber_flags_a_tick_on_another_instruments_channel() -> None:
    tick = _full_tick()
    counter = Counter(sample=1)
    counter.feed(_message(tick, channel_token=tick.instrument_token + 256), 0)
    assert counter.bad == 1


def test_subscriber_reassembles_messages_split_across_reads() -> None:
    stream = _message(_full_tick()) * 40
    counter = Counter(sample=7)
    for start in range(0, len(stream), 333):  # cuts through headers and payloads alike
        counter.feed(stream[start : start + 333], 0)
    assert (counter.received, counter.checked, counter.bad) == (40, 5, 0)


def test_subscriber_feeds_large_reads_in_slices_without_losing_any() -> None:
    stream = _message(_full_tick()) * 300  # ~300 KiB: several 64 KiB slices
    counter = Counter()
    counter.feed(bytearray(stream) + bytearray(10), 0, size=len(stream))
    assert counter.received == 300


def test_subscriber_records_first_last_and_count_per_frame_stamp() -> None:
    tick = _full_tick()
    counter = Counter(stamps=True)
    for stamp, now in ((7, 100), (7, 150), (8, 160)):
        counter.feed(_message(dataclasses.replace(tick, volume_traded=stamp)), now)
    assert counter.frames == {7: [100, 150, 2], 8: [160, 160, 1]}
    assert counter.unstamped == 0


# -- firehose ------------------------------------------------------------------------------------


def _layout() -> list[tuple[int, Mode]]:
    return [(NSE, "full"), (NFO, "quote"), (NSE + 256, "ltp"), (INDEX, "full"), (NFO + 256, "full")]


def test_firehose_frames_cover_the_layout_in_every_variant_with_stampable_volumes() -> None:
    layout = _layout()
    frames = build_frames(layout, 2, 3, Market(1), {})
    assert len(frames.frames) == 3 * 3  # ceil(5 / 2) windows x 3 variants
    assert frames.packets == [2] * 9
    seen: list[int] = []
    for frame, offsets in zip(frames.frames, frames.stamps, strict=True):
        for offset in offsets:
            struct.pack_into(">I", frame, offset, 424242)
        ticks = decode_frame(bytes(frame))
        seen.extend(tick.instrument_token for tick in ticks)
        stamped = [t for t in ticks if isinstance(t, QuoteTick)]
        assert len(offsets) == len(stamped)
        assert all(t.volume_traded == 424242 for t in stamped)
    assert set(seen) == {token for token, _ in layout}


def test_firehose_prices_move_between_variants() -> None:
    frames = build_frames([(NSE, "full")], 1, 4, Market(1), {})
    prices = {decode_frame(bytes(frame))[0].last_price for frame in frames.frames}
    assert len(prices) > 1


async def test_firehose_speaks_the_kite_protocol_and_logs_every_frame() -> None:
    log = io.StringIO()
    firehose = Firehose(packets_per_frame=2, access_token="good", frame_log=log)
    await firehose.start()
    try:
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{firehose.url}/?api_key=k&access_token=bad")
        assert refused.value.response.status_code == 403
        async with connect(f"{firehose.url}/?api_key=k&access_token=good") as ws:
            await ws.send(json.dumps({"a": "subscribe", "v": [NSE, NFO]}))
            await ws.send(json.dumps({"a": "mode", "v": ["full", [NSE, NFO]]}))
            frame = await asyncio.wait_for(ws.recv(decode=False), 10)
            ticks = decode_frame(frame)
            assert {t.instrument_token for t in ticks} == {NSE, NFO}
            assert all(isinstance(t, FullTick) for t in ticks)
            firehose.pause()
            # After the pause only heartbeats: whatever frames were in flight, then silence.
            while (message := await asyncio.wait_for(ws.recv(decode=False), 5)) != HEARTBEAT:
                assert len(message) > 1
    finally:
        await firehose.stop()
    lines = [line.split() for line in log.getvalue().splitlines()]
    assert len(lines) == firehose.frames_sent >= 1
    assert [int(n) for n, _, _ in lines] == list(range(1, len(lines) + 1))
    assert all(int(count) == 2 for _, _, count in lines)
    first_stamp = {t.volume_traded for t in ticks if isinstance(t, QuoteTick)}
    assert len(first_stamp) == 1
    assert first_stamp <= {int(n) for n, _, _ in lines}


# -- naive baseline and null relay ----------------------------------------------------------------


def _mixed_frame() -> bytes:
    market = Market(3)
    ticks = [
        market.tick(NSE, "full"),
        market.tick(NFO, "quote"),
        market.tick(NSE + 256, "ltp"),
        market.tick(INDEX, "quote"),
        market.tick(INDEX + 256, "full"),
    ]
    return encode_frame(ticks)


def _plain(value: Any) -> Any:
    """Dataclass dicts with instants instead of datetimes (the naive decoder's are naive)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, datetime):
        return value.timestamp()
    return value


def test_naive_decoder_agrees_with_the_codec_on_every_packet_kind() -> None:
    frame = _mixed_frame()
    expected = [_plain(dataclasses.asdict(tick)) for tick in decode_frame(frame)]
    assert [_plain(tick) for tick in naive_bridge.parse_binary(frame)] == expected


def test_decode_benchmark_reports_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    decode_main(["--frames", "2", "--per-frame", "3", "--seconds", "0.001", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "2 frames x 3 full packets, median of 1"
    names = [line.split("  ")[0] for line in lines[1:]]
    assert names == [
        "codec.decode_frame",
        "codec.decode_frame, timestamp cache cleared every frame",
        "codec.frame_payloads",
        "codec.decode_frame + payload.tick_json",
        "naive pykiteconnect-style decoder",
        "orjson.dumps(FullTick)",
    ]


def test_naive_subscribe_parses_bridge_subscribe() -> None:
    assert naive_bridge.parse_subscribe("full:1,2; LTP:3;") == {"full": [1, 2], "ltp": [3]}


def test_null_relay_publishes_contract_payloads_with_the_frame_stamp() -> None:
    tick = _full_tick()
    frame = bytearray(encode_frame([tick, tick]))
    struct.pack_into(">I", frame, 2 + 2 + 16, 99)
    relay = null_relay._Relay("ns")
    flat = relay.flat(bytes(frame))
    assert flat[0] == flat[2] == b"ns:ticks:%d" % tick.instrument_token
    assert orjson.loads(flat[1]) == orjson.loads(
        tick_json(dataclasses.replace(tick, volume_traded=99))
    )
    assert orjson.loads(flat[3])["volume_traded"] == tick.volume_traded
    assert relay.ticks == 2


# -- harness maths -------------------------------------------------------------------------------


def test_latency_is_send_to_last_tick_over_complete_frames_in_the_window(tmp_path: Path) -> None:
    ms = 1_000_000
    sent = {1: (0, 2), 2: (10 * ms, 2), 3: (20 * ms, 2), 4: (30 * ms, 2), 5: (99 * ms, 2)}
    stamps = tmp_path / "stamps.txt"
    # frame 3 lost one tick, frame 4 never arrived, frame 5 is outside the window
    stamps.write_text(
        f"1 {1 * ms} {2 * ms} 2\n2 {11 * ms} {14 * ms} 2\n3 {21 * ms} {21 * ms} 1\n"
        f"5 {100 * ms} {100 * ms} 2\n"
    )
    latency, incomplete, measured = e2e._latency(sent, stamps, 0, 50 * ms)
    assert (measured, incomplete) == (2, 2)
    assert latency["p50_ms"] == 4.0  # the upper of the two: 2 and 4 ms
    assert latency["max_ms"] == 4.0
    assert latency["first_tick_p50_ms"] == 1.0


def test_rss_slope_is_megabytes_per_minute() -> None:
    series = [(float(t), 50.0 + 0.5 * t) for t in range(0, 120, 5)]
    assert e2e._slope(series) == pytest.approx(30.0)
    assert e2e._slope(series[:2]) == 0.0


def test_tokens_are_distinct_and_tradable() -> None:
    tokens = e2e.tokens_for(3000)
    assert len(set(tokens)) == 3000
    assert {token & 0xFF for token in tokens} == {1, 2}


def test_procstat_reads_this_process() -> None:
    before = procstat.cpu_seconds(os.getpid())
    deadline = procstat.cpu_seconds(os.getpid()) + 0.05
    while procstat.cpu_seconds(os.getpid()) < deadline:
        pass
    assert procstat.cpu_seconds(os.getpid()) > before
    mem = procstat.memory(os.getpid())
    assert 0 < mem.rss_mb <= mem.hwm_mb


def test_profile_summary_counts_self_and_inclusive_samples() -> None:
    lines = [
        "main (app.py:1);work (bridge/codec.py:10);inner (bridge/codec.py:20) 6\n",
        "main (app.py:1);work (bridge/codec.py:12) 3\n",
        "main (app.py:1) 1\n",
        "garbage\n",
    ]
    total, own, inclusive = profile_summary.summarise(lines)
    assert total == 10
    assert own == {"inner (bridge/codec.py)": 6, "work (bridge/codec.py)": 3, "main (app.py)": 1}
    assert inclusive["work (bridge/codec.py)"] == 9
    assert inclusive["main (app.py)"] == 10
