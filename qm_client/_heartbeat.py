"""The thread that keeps a session alive between the caller's own calls.

``beat_pause``, ``beat_timeout`` and ``beat_failed`` are the heartbeat's rules, shared
with the asyncio client's heartbeat task.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Any

from qm.v1 import queue_manager_pb2 as pb

from ._session import Session
from ._session_core import SessionCore
from .errors import ClientClosed, QMError

__all__ = ["Heartbeat"]

logger = logging.getLogger("qm_client")


class Heartbeat:
    """A named daemon thread that renews ``session`` until the session is shut."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._thread = threading.Thread(
            target=self._run,
            name=f"qm-heartbeat-{session.username}@{session.target}",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        """Wait for the thread to end (after the session was shut).

        The heartbeat thread itself may close the client (from ``on_session_lost``); it
        cannot join itself, and returns at once then.
        """
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        """Renew the session at a jittered third of its ttl until it is shut.

        Heartbeats are sent even while other calls are active, because a long poll may
        count as activity only when it starts. Failures are logged and retried on the
        next beat; a lost session is renewed and reported by ``Session.call``.
        """
        session = self._session
        while True:
            try:
                ttl = session.current().ttl
            except ClientClosed:
                return
            if session.closing.wait(beat_pause(ttl)):
                return
            try:
                session.call(
                    session.stub.HeartBeat,
                    pb.HeartBeatRequest(),
                    timeout=beat_timeout(session, ttl),
                )
            except ClientClosed:
                return
            except Exception as error:
                beat_failed(session, error)


def beat_pause(ttl: float) -> float:
    """Seconds until the next beat: a third of the ttl, jittered down by up to 30 %."""
    return max(ttl / 3, 0.05) * random.uniform(0.7, 1.0)


def beat_timeout(session: SessionCore[Any], ttl: float) -> float:
    """A beat's deadline: no longer than half the ttl, so a slow one leaves time for
    the next."""
    return min(session.timeout, ttl / 2)


def beat_failed(session: SessionCore[Any], error: Exception) -> None:
    """Log a failed beat; the next one comes on the next interval.

    Not only service errors: a re-login that cannot parse the server's key, say, must
    not kill the heartbeat, which would let the session lapse with no word.
    """
    if isinstance(error, QMError):
        logger.warning("heartbeat for %s@%s failed: %s", session.username, session.target, error)
    else:
        logger.error("heartbeat for %s@%s failed", session.username, session.target, exc_info=error)
