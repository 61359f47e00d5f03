"""A semaphore weighted by bytes: bounds the memory that answers in progress may hold.

Counting calls does not bound memory when one answer may be a few bytes or 4 MiB; so each
read reserves the largest answer it may build, and waits, first come first served, while
the reads already in progress hold the whole budget. Waiting rather than refusing: a read
holds its share only for the milliseconds it takes to read and build, a refused client
would retry at once, and a waiting one costs a future; the wait ends with the call's
deadline, which cancels it and gives its place up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class ByteBudget:
    """At most `capacity` bytes reserved at once; every reservation must fit in it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.reserved = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        """Reserve `size` bytes for the body of the `async with`."""
        if size > self.capacity:
            raise ValueError(f"{size} bytes can never fit in a budget of {self.capacity}")
        if self._waiters or self.reserved + size > self.capacity:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (size, waiter)
            self._waiters.append(entry)
            try:
                await waiter  # granted: its bytes were reserved for it by _grant
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release(size)  # granted as it was cancelled: give it back
                else:
                    # Still waiting, unless a release already skipped the cancelled place.
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(entry)
                    self._grant()  # those behind it may fit now
                raise
        else:
            self.reserved += size
        try:
            yield
        finally:
            self._release(size)

    def _release(self, size: int) -> None:
        self.reserved -= size
        self._grant()

    def _grant(self) -> None:
        """Admit waiters in order while the first of them fits."""
        while self._waiters:
            size, waiter = self._waiters[0]
            if waiter.cancelled():
                # Its caller gave up in this loop turn and has not run yet to leave.
                self._waiters.popleft()
                continue
            if self.reserved + size > self.capacity:
                break
            self._waiters.popleft()
            self.reserved += size
            waiter.set_result(None)
