"""The feed's reader -> dispatcher hand-off: bounded, and never blocking the socket for long.

The inbox holds up to ``limit`` frames and ``max_bytes`` bytes (a full-mode frame of 3000
instruments is ~560 KB, so a frame count alone would not bound memory). When it is full the
reader waits for room, at most its ``patience`` (the feed's ``queue_timeout``), for the
dispatcher to take a frame: a busy dispatcher does within milliseconds, and meanwhile TCP pushes
back on the server, so a CPU-bound burst loses nothing. A consumer that takes nothing in that
time is stuck: the older half of the waiting tick frames is dropped and the reader goes on.
Waiting longer would stop the socket being read, and with it the answers to the server's pings:
the connection would die (kite-protocol §7 pitfall 2) while nothing could notice.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, NamedTuple, TypeAlias

__all__ = ["STOP", "Event", "Inbox", "Item"]


class Event(NamedTuple):
    """A lifecycle call queued behind the frames that preceded it."""

    handler: str
    args: tuple[Any, ...]


STOP: Final = Event("", ())

Item: TypeAlias = bytes | str | Event


class Inbox:
    """Reader -> dispatcher hand-off: bounded for frames, never blocking for long.

    A deque and two events rather than ``asyncio.Queue``: the dispatcher takes what is already
    there without a coroutine per item, which is most of the hand-off's cost per frame.
    Lifecycle events are never dropped.
    """

    def __init__(self, limit: int, max_bytes: int) -> None:
        self.items: deque[Item] = deque()
        #: ``time.monotonic()`` when each waiting frame arrived, oldest first (events have none).
        self.stamps: deque[float] = deque()
        self.limit = limit
        self.max_bytes = max_bytes
        #: Bytes of the frames waiting (lifecycle events count as nothing).
        self.size = 0
        self.ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        #: The reader is waiting for room, and since when it last stopped doing so: the
        #: silence is then ours, not the server's (the watchdog must not call it stale).
        self.waiting = False
        self.waited_until = 0.0

    def qsize(self) -> int:
        return len(self.items)

    def put_nowait(self, item: Item) -> None:
        self.items.append(item)
        self.ready.set()

    def full(self) -> bool:
        return len(self.items) >= self.limit or self.size >= self.max_bytes

    async def put_frame(self, item: bytes | str, stamp: float, patience: float) -> int:
        """Enqueue a frame once there is room, waiting at most ``patience`` for the dispatcher
        to take one; then drop the older half instead. Returns how many frames were dropped."""
        dropped = 0
        if self.full():
            self._space.clear()
            self.waiting = True
            try:
                async with asyncio.timeout(patience):
                    await self._space.wait()
            except TimeoutError:
                dropped = self._drop_older_half()
            except asyncio.CancelledError:
                # The reader is being stopped (close, drop): a frame it has read is not lost,
                # it goes in one over the bound and the dispatcher still gets it.
                self._append(item, stamp)
                raise
            finally:
                self.waiting = False
                self.waited_until = time.monotonic()
        self._append(item, stamp)
        return dropped

    def _append(self, item: bytes | str, stamp: float) -> None:
        self.size += len(item)
        self.stamps.append(stamp)
        self.put_nowait(item)

    def _drop_older_half(self) -> int:
        """Make room by dropping the older half of the waiting tick frames.

        Text frames (order updates, Kite's errors) and lifecycle events stay: a tick is
        superseded by the instrument's next one, an order update by nothing. Only when text frames
        alone still fill the inbox do the oldest of them go too, so memory stays bounded whatever
        the server sends. Half at once, not one per new frame: one O(n) pass per many frames.
        """
        dropped = self._drop_half(lambda item: type(item) is bytes)
        if self.full():
            dropped += self._drop_half(lambda item: True)
        return dropped

    def _drop_half(self, droppable: Callable[[bytes | str], bool]) -> int:
        """Drop the older half of the droppable frames, and more, oldest first, while over half
        of ``max_bytes``."""
        candidates = sum(
            1 for item in self.items if not isinstance(item, Event) and droppable(item)
        )
        half_bytes = self.max_bytes // 2
        dropped = 0
        items: list[Item] = []
        stamps: list[float] = []
        frame_stamps = iter(self.stamps)
        for item in self.items:
            if isinstance(item, Event):
                items.append(item)
                continue
            stamp = next(frame_stamps)
            if droppable(item) and (dropped < candidates // 2 or self.size > half_bytes):
                self.size -= len(item)
                dropped += 1
            else:
                items.append(item)
                stamps.append(stamp)
        # In place: the reader and the dispatcher hold these deques.
        self.items.clear()
        self.items.extend(items)
        self.stamps.clear()
        self.stamps.extend(stamps)
        return dropped

    async def wait(self) -> None:
        """Return once there is something to pop."""
        while not self.items:
            self.ready.clear()
            await self.ready.wait()

    def pop(self) -> Item:
        items = self.items
        item = items.popleft()
        if not isinstance(item, Event):
            self.size -= len(item)
            self.stamps.popleft()
        if not self._space.is_set() and not self.full():
            self._space.set()  # room for the reader's frame: it waited for progress only
        return item
