"""Child processes for the benchmark harness: start, watch stdout JSON events, stop politely.

Every child's stdout and stderr go to files in the run directory (the evidence behind each
number); stdout lines that are JSON objects with an ``event`` key are also kept by name, which
is how the harness learns a source's URL or the subscriber's running count.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

__all__ = ["ROOT", "Child", "free_port", "log", "private_redis", "wait_port"]

#: The repository root, put on PYTHONPATH so ``-m bench.*`` works from any directory.
ROOT: Final = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Child:
    """A subprocess whose stdout JSON lines are kept by event name; both streams go to files."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        logs: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.stdout_path = logs / f"{name}.stdout"
        self.stderr_path = logs / f"{name}.stderr"
        self.events: dict[str, dict[str, Any]] = {}
        self._changed = threading.Condition()
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 (closed in stop)
        environ = dict(os.environ if env is None else env)
        environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), environ.get("PYTHONPATH")])
        )
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=environ,
            cwd=cwd,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.stdout_path, "w") as copy:
            for line in self.proc.stdout:
                copy.write(line)
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and "event" in event:
                        with self._changed:
                            self.events[event["event"]] = event
                            self._changed.notify_all()

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while name not in self.events:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name}: no {name!r} event (exit code {self.proc.poll()}); "
                        f"see {self.stderr_path}"
                    )
                self._changed.wait(min(left, 0.2))
            return self.events[name]

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop in {timeout} s: killing it")
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        self._stderr.close()
        return self.proc.returncode


def wait_port(port: int, child: Child, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{child.name}: port {port} not open after {timeout} s")


@contextlib.contextmanager
def private_redis(logs: Path) -> Iterator[tuple[str, Child]]:
    """A throw-away redis-server; pub/sub output buffers unlimited (see docs/performance.md)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH")
    port = free_port()
    child = Child(
        "redis",
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--client-output-buffer-limit",
            "pubsub 0 0 0",
            "--logfile",
            str(logs / "redis.log"),
        ],
        logs,
    )
    try:
        wait_port(port, child)
        yield f"redis://127.0.0.1:{port}/0", child
    finally:
        child.stop()
