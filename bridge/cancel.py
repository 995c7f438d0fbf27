"""Stopping tasks that may swallow their cancellation.

On Python 3.11 ``asyncio.wait_for`` returns the inner result and drops the cancellation when
both arrive in the same loop iteration (CPython gh-86296, fixed in 3.12). redis-py wraps every
socket write in ``wait_for``, so a task cancelled in the middle of a Redis command carries on as
if nothing happened about one time in five (measured here with a loop of ``EXISTS``; see
tests/test_cancel.py). A loop over Redis calls then runs on, and ``await task`` after
``task.cancel()`` waits for ever: a shutdown that never ends.

Cancelling again is not enough on its own. The window is not random: it is the moment a
task's write has completed but the task has not resumed yet, and a busy loop (CPU contention,
a reply that lands together with the canceller's timer) keeps a task in it at every attempt;
21 cancels in a row were swallowed here under load. A swallowed request is still counted by
``Task.cancelling()``, though, so two measures together make it certain:

* every loop the bridge stops by cancelling calls :func:`checkpoint` once per round, which
  raises the cancellation a library swallowed;
* :func:`cancel_and_wait` cancels again until the task has ended, within a bound, for tasks
  stopped in the middle of a round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_and_wait", "checkpoint"]


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any] | None],
    *,
    timeout: float = 2.0,  # noqa: ASYNC109 (a shutdown budget, not an operation's timeout)
    interval: float = 0.05,
) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` (``None`` entries are skipped) and wait until each has ended.

    Cancels again every ``interval`` seconds whatever is still running, and gives up after
    ``timeout``, returning the tasks still running (normally none). Exceptions of the tasks are
    retrieved, never raised: this is for tearing down, where a task's failure was reported by
    the task itself or no longer matters.
    """
    everything = {task for task in tasks if task is not None}
    pending = {task for task in everything if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(interval, remaining))
    for task in everything - pending:
        if not task.cancelled():
            task.exception()  # mark it retrieved: no "exception was never retrieved" warning
    return pending


def checkpoint() -> None:
    """Raise ``CancelledError`` if the current task was asked to stop and something swallowed it.

    Call once per round of a loop that is stopped by cancellation and awaits Redis.
    ``Task.cancelling()`` counts requests nobody withdrew (``asyncio.timeout`` withdraws its
    own), so a positive count here means a cancellation was lost on its way.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
