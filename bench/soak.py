"""Soak test: hours-long behaviour in minutes. ``bridge run`` at a steady tick rate, checked for
flat memory and zero loss (docs/reliability.md).

Processes, all started here: a private ``redis-server`` (free port, no persistence) unless
``--redis-url`` is given, ``bridge simulate`` (the real simulator, paced at ``--rate`` ticks/s
over ``--tokens`` instruments, logging every frame it sends), ``bridge run`` with its HTTP
endpoint, and ``bench.subscriber`` counting ``<ns>:ticks:*``.

Every ``--sample-every`` seconds: the bridge's RSS and CPU from ``/proc``, and ``/metrics``
(decoded, published, pending, reconnects, publish latency). At the end the simulator is stopped
first, so the counts settle, and four numbers must agree: ticks sent (the simulator's frame
log), decoded by the bridge, published (plus conflated), received by the subscriber.

Run: ``.venv/bin/python -m bench.soak --minutes 10`` (the default: 5,000 quote ticks/s over
1,000 instruments). Exit 0 when all of these hold, else 1 with the reasons in ``failures``:

* nothing lost: sent = decoded = published + conflated, received = published;
* the rate was the one asked for: the steady decode rate after the warm-up within
  ``--rate-tolerance`` (5 %) of ``--rate`` (a slow machine or a stalled feed is not a soak);
* memory flat after the warm-up, judged twice: the least-squares slope of RSS over the warm
  samples below ``--max-slope`` MiB per 10 minutes (a steady leak, even a small one, shows
  here), and the last warm sample less than ``--max-growth-mib`` above the first;
* no reconnect, and exit 0 on SIGTERM at the end.

The summary is printed as JSON (and written to ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Sample", "main", "slope"]

PYTHON: Final = sys.executable
ROOT: Final = Path(__file__).resolve().parents[1]
#: A fake credential the simulator is told to accept. Never a real one.
SOAK_TOKEN: Final = "soak-access-token"
NAMESPACE: Final = "soak"
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    t: float  #: seconds since the bridge was ready
    rss_mib: float
    cpu_percent: float
    decoded: float
    published: float
    pending: float
    reconnects: float
    publish_ms: float  #: mean publish round trip since the previous sample


@dataclass
class Summary:
    minutes: float
    rate_target: float
    rate_measured: float  #: decoded over the whole run (start-up included)
    rate_steady: float  #: decode rate between the first warm sample and the last one
    tokens: int
    sent: int
    decoded: int
    published: int
    replaced: int
    received: int
    lost: int
    reconnects: int
    rss_warm_mib: float
    rss_end_mib: float
    rss_max_mib: float
    rss_slope_mib_per_hour: float
    rss_slope_mib_per_10min: float
    cpu_percent_mean: float
    publish_ms_mean: float
    exit_code: int
    stop_seconds: float
    ok: bool
    failures: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(x, y)`` points; 0 for fewer than two."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def _steady_rate(warm: list[Sample]) -> float:
    """Ticks decoded per second between the first and the last warm sample; 0 for fewer than 2."""
    if len(warm) < 2 or warm[-1].t <= warm[0].t:
        return 0.0
    return (warm[-1].decoded - warm[0].decoded) / (warm[-1].t - warm[0].t)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_port(port: int, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing listens on port {port} after {within} s")
        time.sleep(0.05)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_seconds(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _metrics(port: int) -> dict[str, float]:
    """Unlabelled samples by name, labelled ones summed (reconnects over every cause)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("bridge_"):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class _Lines(threading.Thread):
    """Collects the JSON lines a child prints (the subscriber's progress and summary)."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[dict[str, Any]] = []

    def run(self) -> None:
        for raw in self.stream:
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(raw))

    def last(self, event: str) -> dict[str, Any] | None:
        return next((line for line in reversed(self.lines) if line.get("event") == event), None)


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _settle(port: int, within: float = 20.0) -> dict[str, float]:
    """Metrics once nothing is pending and the counters stopped moving."""
    deadline = time.monotonic() + within
    previous: dict[str, float] = {}
    while True:
        current = _metrics(port)
        keys = ("bridge_ticks_total", "bridge_ticks_published_total")
        if (
            previous
            and all(current[k] == previous[k] for k in keys)
            and current["bridge_publish_pending"] == 0
            and current["bridge_feed_pending"] == 0
        ):
            return current
        if time.monotonic() > deadline:
            return current
        previous = current
        time.sleep(0.5)


def run(args: argparse.Namespace) -> Summary:
    tokens = [(6000 + i) * 256 + 1 for i in range(args.tokens)]
    tick_interval = args.tokens / args.rate
    work = Path(tempfile.mkdtemp(prefix="bridge-soak-"))
    frame_log = work / "frames.log"
    http_port = _free_port()
    samples: list[Sample] = []
    with _processes() as procs:
        redis_url = args.redis_url
        if redis_url is None:
            server = shutil.which("redis-server")
            if server is None:
                raise SystemExit("redis-server not on PATH: pass --redis-url")
            redis_port = _free_port()
            argv = [server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(work)]  # fmt: skip
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
            _wait_port(redis_port, 10)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        sim_port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        simulator = subprocess.Popen(
            [PYTHON, "-m", "bridge", "simulate", "--port", str(sim_port), "--seed", "1",
             "--tick-interval", f"{tick_interval:g}", "--access-token", SOAK_TOKEN,
             "--frame-log", str(frame_log), "--log-format", "json", "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(simulator)
        _wait_port(sim_port, 15)
        subscriber = subprocess.Popen(
            [PYTHON, "-m", "bench.subscriber", "--redis-url", redis_url,
             "--pattern", f"{NAMESPACE}:ticks:*", "--report-interval", "1"],
            env=env, stdout=subprocess.PIPE,
        )  # fmt: skip
        procs.append(subscriber)
        assert subscriber.stdout is not None
        sub_lines = _Lines(subscriber.stdout)
        sub_lines.start()
        bridge_env = {
            k: v for k, v in env.items() if not k.startswith(("BRIDGE_", "KITE_", "REDIS_URL"))
        }
        bridge_env.update(
            KITE_WS_URL=f"ws://127.0.0.1:{sim_port}",
            KITE_API_KEY="soak-key",
            KITE_ACCESS_TOKEN=SOAK_TOKEN,
            REDIS_URL=redis_url,
            BRIDGE_NAMESPACE=NAMESPACE,
            BRIDGE_SUBSCRIBE=f"{args.mode}:" + ",".join(map(str, tokens)),
            BRIDGE_HTTP_PORT=str(http_port),
            BRIDGE_LOG_FORMAT="json",
        )
        with (work / "bridge.log").open("wb") as log:
            bridge = subprocess.Popen(
                [PYTHON, "-m", "bridge", "run"], env=bridge_env, stdout=log, stderr=log, cwd=work
            )
        procs.append(bridge)
        deadline = time.monotonic() + 30
        while not _ready(http_port):
            if time.monotonic() > deadline or bridge.poll() is not None:
                raise SystemExit(f"the bridge did not become ready; see {work / 'bridge.log'}")
            time.sleep(0.2)

        began = time.monotonic()
        cpu_before, at_before = _cpu_seconds(bridge.pid), began
        latency_before = (0.0, 0.0)
        end = began + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(args.sample_every, max(0.0, end - time.monotonic())))
            now = time.monotonic()
            metrics = _metrics(http_port)
            cpu = _cpu_seconds(bridge.pid)
            lat_sum = metrics.get("bridge_publish_latency_seconds_sum", 0.0)
            lat_count = metrics.get("bridge_publish_latency_seconds_count", 0.0)
            batches = lat_count - latency_before[1]
            sample = Sample(
                t=round(now - began, 1),
                rss_mib=round(_rss_mib(bridge.pid), 2),
                cpu_percent=round(100 * (cpu - cpu_before) / (now - at_before), 1),
                decoded=metrics["bridge_ticks_total"],
                published=metrics["bridge_ticks_published_total"],
                pending=metrics["bridge_publish_pending"] + metrics["bridge_feed_pending"],
                reconnects=metrics["bridge_reconnects_total"],
                publish_ms=round(1000 * (lat_sum - latency_before[0]) / batches, 3)
                if batches
                else 0.0,
            )
            cpu_before, at_before, latency_before = cpu, now, (lat_sum, lat_count)
            samples.append(sample)
            print(json.dumps({"event": "sample", **asdict(sample)}), flush=True)
        elapsed = time.monotonic() - began
        reconnects_during = int(samples[-1].reconnects) if samples else 0

        # Settle: stop the source, let the bridge and the subscriber drain.
        simulator.send_signal(signal.SIGTERM)
        simulator.wait(15)
        final = _settle(http_port)
        published = int(final["bridge_ticks_published_total"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            progress = sub_lines.last("progress")
            if progress is not None and progress["received"] >= published:
                break
            time.sleep(0.25)
        time.sleep(1.5)  # one more report interval: nothing extra may arrive
        subscriber.send_signal(signal.SIGTERM)
        subscriber.wait(10)
        sub_lines.join(5)
        stopped = sub_lines.last("stopped") or {}
        stop_began = time.monotonic()
        bridge.send_signal(signal.SIGTERM)
        exit_code = bridge.wait(10)
        stop_seconds = time.monotonic() - stop_began

    sent = sum(int(line.split()[2]) for line in frame_log.read_text().splitlines() if line)
    received = int(stopped.get("received", -1))
    decoded = int(final["bridge_ticks_total"])
    replaced = int(final["bridge_ticks_replaced_total"])
    warm = [s for s in samples if s.t >= args.warmup]
    rss = [s.rss_mib for s in warm] or [0.0]
    growth = rss[-1] - rss[0]
    per_second = slope([(s.t, s.rss_mib) for s in warm])
    steady = _steady_rate(warm)
    lost = sent - received
    checks = {
        f"lost {lost} of {sent} ticks sent": lost == 0,
        f"decoded {decoded} != sent {sent}": decoded == sent,
        f"decoded {decoded} != published {published} + conflated {replaced}": (
            decoded == published + replaced
        ),
        f"received {received} != published {published}": received == published,
        f"fewer than 3 samples after the {args.warmup:g} s warm-up": len(warm) >= 3,
        f"steady rate {steady:.0f}/s not within {args.rate_tolerance:.0%} of {args.rate:g}/s": (
            abs(steady - args.rate) <= args.rate_tolerance * args.rate
        ),
        f"RSS slope {600 * per_second:.2f} MiB/10 min >= {args.max_slope:g}": (
            600 * per_second < args.max_slope
        ),
        f"RSS grew {growth:.2f} MiB after the warm-up, >= {args.max_growth_mib:g}": (
            growth < args.max_growth_mib
        ),
        f"exit code {exit_code} on SIGTERM": exit_code == 0,
        f"{reconnects_during} reconnects": reconnects_during == 0,
    }
    failures = [reason for reason, passed in checks.items() if not passed]
    return Summary(
        minutes=round(elapsed / 60, 2),
        rate_target=args.rate,
        rate_measured=round(decoded / elapsed, 1),
        rate_steady=round(steady, 1),
        tokens=args.tokens,
        sent=sent,
        decoded=decoded,
        published=published,
        replaced=replaced,
        received=received,
        lost=lost,
        reconnects=reconnects_during,
        rss_warm_mib=rss[0],
        rss_end_mib=rss[-1],
        rss_max_mib=max(rss),
        rss_slope_mib_per_hour=round(3600 * per_second, 2),
        rss_slope_mib_per_10min=round(600 * per_second, 3),
        cpu_percent_mean=round(sum(s.cpu_percent for s in samples) / max(1, len(samples)), 1),
        publish_ms_mean=round(
            sum(s.publish_ms for s in samples) / max(1, len(samples)),
            3,
        ),
        exit_code=exit_code,
        stop_seconds=round(stop_seconds, 2),
        ok=not failures,
        failures=failures,
        samples=samples,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=5000.0, help="ticks/s (default: %(default)s)")
    parser.add_argument(
        "--tokens", type=int, default=1000, help="instruments (default: %(default)s)"
    )
    parser.add_argument("--mode", choices=("ltp", "quote", "full"), default="quote")
    parser.add_argument("--redis-url", help="default: a private redis-server on a free port")
    parser.add_argument("--sample-every", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument(
        "--warmup",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="samples before this are not judged for growth (default: %(default)s)",
    )
    parser.add_argument(
        "--rate-tolerance",
        type=float,
        default=0.05,
        metavar="FRACTION",
        help="the steady rate may differ from --rate by this fraction (default: %(default)s)",
    )
    parser.add_argument(
        "--max-slope",
        type=float,
        default=1.0,
        metavar="MIB_PER_10MIN",
        help="RSS trend after the warm-up, least squares (default: %(default)s MiB per 10 min)",
    )
    parser.add_argument("--max-growth-mib", type=float, default=10.0)
    parser.add_argument("--out", type=Path, help="also write the summary JSON here")
    args = parser.parse_args(argv)
    summary = run(args)
    result = {"event": "summary", **asdict(summary)}
    samples = result.pop("samples")
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps({**result, "samples": samples}, indent=2) + "\n")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
