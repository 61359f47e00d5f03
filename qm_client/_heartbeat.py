"""The thread that keeps a session alive between the caller's own calls."""

from __future__ import annotations

import logging
import random
import threading

from qm.v1 import queue_manager_pb2 as pb

from ._session import Session
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
            interval = max(ttl / 3, 0.05)
            if session.closing.wait(interval * random.uniform(0.7, 1.0)):
                return
            try:
                session.call(
                    session.stub.HeartBeat,
                    pb.HeartBeatRequest(),
                    timeout=min(session.timeout, ttl / 2),
                )
            except ClientClosed:
                return
            except QMError as error:
                logger.warning(
                    "heartbeat for %s@%s failed: %s", session.username, session.target, error
                )
            except Exception:
                # Not a service error (a re-login that cannot parse the server's key, say):
                # a dead heartbeat would let the session lapse with no word, so log it and
                # beat again on the next interval.
                logger.exception("heartbeat for %s@%s failed", session.username, session.target)
