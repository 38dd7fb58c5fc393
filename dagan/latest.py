"""The latest-frame-wins rule, in one place: a one-item mailbox between threads where the newest item wins.

Used wherever frames cross from a producer (webcam, WebRTC receiver) to a slower consumer (inference):
an unread item is overwritten and counted as dropped, so a slow consumer always sees the newest frame and
latency never grows.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """``put`` never blocks and returns True when it overwrote an unread item (a dropped frame).
    ``take`` empties the slot without waiting; ``get`` waits for a new item, a timeout, or ``close``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._closed = False
        self.dropped = 0
        self.put_count = 0

    def put(self, item: T) -> bool:
        with self._cond:
            dropped = self._item is not None
            self._item = item
            self.put_count += 1
            self.dropped += dropped
            self._cond.notify_all()
            return dropped

    def take(self) -> T | None:
        with self._cond:
            item, self._item = self._item, None
            return item

    def get(self, timeout: float | None = None) -> T | None:
        """The newest unread item; None on timeout, or once closed with nothing unread."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout=timeout)
            item, self._item = self._item, None
            return item

    @property
    def pending(self) -> bool:
        return self._item is not None

    def clear(self) -> None:
        with self._cond:
            self._item = None

    def close(self) -> None:
        """Wake every waiting ``get``; later ``get`` calls return at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
