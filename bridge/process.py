"""The process entry point of ``bridge`` and ``python -m bridge``: what only a whole process does.

Two promises of CONTRACT §6 (SIGTERM → exit 0 within 5 s) need more than the service can give
from inside its event loop:

* **SIGTERM from the first instant.** The service installs its handlers once its loop runs,
  ~0.4 s after exec (most of it imports); a SIGTERM before that would end the interpreter with
  143, which an orchestrator stopping a container right after starting it reads as a crash.
  For ``bridge run`` a handler is installed here, before the heavy imports: until the service
  takes over, SIGTERM is a clean exit 0 (nothing has been taken from Redis or published yet).
* **No waiting on threads that cannot finish.** asyncio resolves host names with
  ``getaddrinfo`` on worker threads, and a lookup cannot be cancelled: with DNS unreachable it
  blocks for the resolver's timeout (10 s with glibc's defaults, longer with retries). The
  service abandons such a thread when it stops (``bridge.service.run``), and the interpreter
  would still join it at exit, past the 5 s promise and near Docker's 10 s stop grace. Once the
  service has returned its exit code and the logs are flushed, the process exits without
  joining.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

__all__ = ["main"]


def _command_word(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _stop_before_start(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def _stuck_threads() -> list[str]:
    main_thread = threading.main_thread()
    return [
        thread.name
        for thread in threading.enumerate()
        if thread is not main_thread and thread.is_alive() and not thread.daemon
    ]


def exit_process(code: int) -> NoReturn:
    """Exit with ``code``; without joining threads stuck in work nobody waits for any more."""
    stuck = _stuck_threads()
    if not stuck:
        raise SystemExit(code)
    import logging

    import structlog

    from bridge.logs import logging_configured

    if logging_configured():
        structlog.get_logger("bridge.process").warning(
            "exiting_without_joining_threads",
            threads=stuck,
            hint="a host name lookup (DNS) or other blocking call was still running",
        )
    try:
        logging.shutdown()  # flush the handlers: os._exit skips every clean-up
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except (OSError, ValueError):  # a closed pipe: nothing more can be said anyway
        pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the CLI (:func:`bridge.cli.main`) as a process and exit with its code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if _command_word(arguments) == "run":
        signal.signal(signal.SIGTERM, _stop_before_start)
    from bridge.cli import main as cli_main

    exit_process(cli_main(arguments))
