"""The typed records of sessions as the server reports them, and their translation from
the proto: HeartBeat's status of the caller's own session, and ListSessions' summaries.

As in ``_lifecycle.py``: field names are the proto's, durations stay in milliseconds
where the proto counts them, and points in time become aware UTC ``datetime``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from qm.v1 import queue_manager_pb2 as pb

from ._lifecycle import required_datetime_from_ms

__all__ = [
    "ServerLimits",
    "SessionStatus",
    "SessionSummary",
    "session_status_from_pb",
    "session_summary_from_pb",
]


@dataclass(frozen=True)
class ServerLimits:
    """What the server said at login that it takes in one call; 0 where it did not say
    (an older server)."""

    max_batch: int
    """The most elements, ids or pairs in one call (AddAll, PullElements, MapBatchPut)."""
    max_request_bytes: int
    """The largest request its transport accepts, in bytes."""


@dataclass(frozen=True)
class SessionStatus:
    """The caller's own session, as ``heartbeat`` just renewed it."""

    session_id: int
    """The id ``list_sessions`` and ``end_session`` name the session by."""
    expires_in_ms: int
    """Time left before the session expires if no call renews it."""
    messages_held: int
    """Messages in flight for the session, on every stream and poll."""
    subscriptions: int
    """Subscribe streams the session has open."""


@dataclass(frozen=True)
class SessionSummary:
    """One live session, as ``list_sessions`` lists it to an admin."""

    session_id: int
    username: str
    peer: str
    """The address that logged in, as gRPC names it (``ipv4:127.0.0.1:53422``)."""
    created_at: datetime
    last_active_at: datetime
    messages_held: int
    subscriptions: int


def session_status_from_pb(message: pb.SessionStatus) -> SessionStatus:
    return SessionStatus(
        session_id=message.session_id,
        expires_in_ms=message.expires_in_ms,
        messages_held=message.messages_held,
        subscriptions=message.subscriptions,
    )


def session_summary_from_pb(message: pb.SessionSummary) -> SessionSummary:
    return SessionSummary(
        session_id=message.session_id,
        username=message.username,
        peer=message.peer,
        created_at=required_datetime_from_ms(message.created_at_ms),
        last_active_at=required_datetime_from_ms(message.last_active_at_ms),
        messages_held=message.messages_held,
        subscriptions=message.subscriptions,
    )
