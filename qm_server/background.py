"""Work that goes on after the caller that started it has left.

Two shapes: store work a cancelled caller leaves behind (`outliving_caller`: a claim or a
destroy commits all the same, and its follow-up must still happen), and work started
without awaiting it (`Background`: the release of a claim nobody waits for any more, the
end of an expired session, the end of a cancelled Subscribe call), which the server's
stop waits for before it closes the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Background:
    """Tasks nobody awaits, held until done so that they are neither collected nor lost."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, work: Coroutine[None, None, None]) -> None:
        """Run work without awaiting it; a failure is logged here, since nobody awaits it
        (a release that a call's end starts after the store closed, at shutdown, fails
        with Unavailable)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("background work failed: %s", exc, exc_info=exc)

    async def finish(self) -> None:
        """Wait until no work is left. The end of a cancelled call can start some while
        others finish, so this waits until none is left rather than for the ones running
        now."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def outliving_caller(work: Awaitable[T], orphaned: Callable[[T], None]) -> T:
    """Await store work that commits even if this caller is cancelled (a client's deadline,
    a closed stream); then, once it has succeeded, `orphaned(result)` does what the caller
    would have done after it. Work that failed needs nothing."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def finished(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                orphaned(done.result())

        task.add_done_callback(finished)
        raise
