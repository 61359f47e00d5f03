"""Who waits for ready messages in which queue: futures, not threads.

A long poll or a subscription parks one future here; when messages become ready in that
queue the store tells the engine, which wakes as many waiters as there are ready messages
(oldest waiter first). A waiter that wakes and finds nothing simply parks again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable


class ReadySignals:
    def __init__(self, ready_hint: Callable[[str], int]) -> None:
        self._ready_hint = ready_hint
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._count = 0

    def park(self, name: str, waiter: asyncio.Future[None]) -> None:
        """Wait for the next wake-up, or none if messages are ready already: a caller
        parks after a claim that found nothing, and messages made ready in between had
        their wake-up before the waiter was here to take it."""
        self._waiters.setdefault(name, deque()).append(waiter)
        self._count += 1
        if not waiter.done() and self._ready_hint(name) > 0:
            waiter.set_result(None)

    def unpark(self, name: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(name)
        if waiters is None:
            return
        with contextlib.suppress(ValueError):
            waiters.remove(waiter)
            self._count -= 1
        if not waiters:
            del self._waiters[name]

    def wake(self, name: str, everyone: bool = False) -> None:
        """Wake as many waiters as there are ready messages (all, on destroy or drain)."""
        waiters = self._waiters.get(name)
        if not waiters:
            return
        count = len(waiters) if everyone else max(1, self._ready_hint(name))
        for waiter in list(waiters):
            if count <= 0:
                break
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def wake_everyone(self) -> None:
        for name in list(self._waiters):
            self.wake(name, everyone=True)

    def waiting(self) -> int:
        return self._count
