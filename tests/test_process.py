"""The process entry (``bridge.process``) and the service's loop: SIGTERM → exit 0 within 5 s
even before the service runs, and even with a thread stuck in a host name lookup (CONTRACT §6)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import ROOT, bridge_env, free_port, wait_until

from bridge import service

TIMEOUT = 20.0


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=bridge_env(**env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("command", "code"),
    [
        # Long before the service's loop could install a handler: without the entry's own
        # handler the process dies with -15.
        ("run", 0),
        ("check-config", -15),  # only `bridge run` promises exit 0 on SIGTERM
    ],
)
def test_sigterm_while_the_cli_is_still_importing(command: str, code: int) -> None:
    done = _python(
        f"""
        import os, signal, sys, time

        class SignalDuringImport:
            def find_spec(self, name, path=None, target=None):
                if name == "bridge.cli":
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)
                return None

        sys.meta_path.insert(0, SignalDuringImport())
        from bridge.process import main
        main([{command!r}])
        """
    )
    assert done.returncode == code, done.stderr


def test_the_process_exits_with_its_code_without_joining_a_stuck_thread() -> None:
    started = time.monotonic()
    done = _python(
        """
        import threading, time
        from bridge.logs import configure_logging
        from bridge.process import exit_process

        configure_logging("info", "json")
        threading.Thread(target=time.sleep, args=(60,), name="stuck-lookup").start()
        exit_process(4)
        """
    )
    assert done.returncode == 4
    assert time.monotonic() - started < TIMEOUT
    assert '"exiting_without_joining_threads"' in done.stderr + done.stdout
    assert "stuck-lookup" in done.stderr + done.stdout


def test_the_process_exits_normally_without_stuck_threads() -> None:
    done = _python(
        """
        import atexit
        from bridge.process import exit_process

        atexit.register(print, "atexit ran")  # os._exit would skip it
        exit_process(3)
        """
    )
    assert (done.returncode, done.stdout) == (3, "atexit ran\n")


def test_the_service_loop_closes_without_waiting_for_its_blocking_threads() -> None:
    release = threading.Event()
    entered = threading.Event()

    def lookup() -> None:  # a getaddrinfo that DNS never answers
        entered.set()
        release.wait(30)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pending = loop.run_in_executor(None, lookup)
        await asyncio.to_thread(entered.wait, 5)
        pending.cancel()

    try:
        with asyncio.Runner() as runner, service._abandoned_threads(runner):
            runner.run(main())
        # Closed while the lookup still blocks: Runner.close() did not join its thread.
        assert not release.is_set()
        assert any(t.name.startswith("bridge-blocking") for t in threading.enumerate())
    finally:
        release.set()


async def test_sigterm_during_a_hanging_dns_lookup_exits_0_within_5_s(tmp_path: Path) -> None:
    """The Redis host name never resolves (DNS unreachable): stopping must not wait for it."""
    marker = tmp_path / "lookup-started"
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import socket, time

            _real = socket.getaddrinfo

            def getaddrinfo(host, *args, **kwargs):
                if host == "dns-hangs.invalid":
                    open({str(marker)!r}, "w").close()
                    time.sleep(60)
                return _real(host, *args, **kwargs)

            socket.getaddrinfo = getaddrinfo
            """
        )
    )
    env = bridge_env(
        PYTHONPATH=f"{tmp_path}:{ROOT}",
        KITE_WS_URL=f"ws://127.0.0.1:{free_port()}",  # never dialled: Redis comes first
        REDIS_URL="redis://dns-hangs.invalid:6379/0",
        BRIDGE_HTTP_PORT=str(free_port()),
    )
    log = tmp_path / "bridge.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "run",
            cwd=tmp_path, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    try:
        await wait_until(marker.exists, within=TIMEOUT)
        started = time.monotonic()
        proc.terminate()
        code = await asyncio.wait_for(proc.wait(), TIMEOUT)
        took = time.monotonic() - started
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log.read_text()
    assert code == 0, text
    assert took < 5.0, text
    assert '"bridge_stopped"' in text
    assert '"exiting_without_joining_threads"' in text
