"""The asyncio task that keeps a session alive between the caller's own calls.

The same rules as the sync heartbeat thread (``_heartbeat.py``: when to beat, each
beat's deadline, what a failure means), run as a named task of the client's event loop.
"""

from __future__ import annotations

import asyncio

from qm.v1 import queue_manager_pb2 as pb

from ._aio_session import AsyncSession
from ._heartbeat import beat_failed, beat_pause, beat_timeout
from .errors import ClientClosed

__all__ = ["AsyncHeartbeat"]


class AsyncHeartbeat:
    """A task that renews ``session`` until the session is shut."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        name = f"qm-heartbeat-{self._session.username}@{self._session.target}"
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    async def join(self) -> None:
        """Wait for the task to end (after the session was shut); at once when called
        from the task itself (``on_session_lost`` may close the client)."""
        task = self._task
        if task is not None and task is not asyncio.current_task():
            await asyncio.wait([task])

    async def _run(self) -> None:
        session = self._session
        while True:
            try:
                ttl = session.current().ttl
            except ClientClosed:
                return
            if await session.closed_within(beat_pause(ttl)):
                return
            try:
                await session.call(
                    session.stub.HeartBeat,
                    pb.HeartBeatRequest(),
                    timeout=beat_timeout(session, ttl),
                )
            except ClientClosed:
                return
            except Exception as error:
                beat_failed(session, error)
