"""Audit events: who logged in, was refused, created or destroyed what, changed which user.

Each event is one INFO line on the `qm_server.audit` logger with a stable `event` name
(`Event`) and its fields (`user`, `queue`, `map`, `reason`, ...) as attributes of the
record: the JSON format (logs.py) shows them as keys, the text format as `key='value'`
after the event name. A line logged during a call also carries the call's request id,
RPC and peer (call_context.py), so an event names where it came from without being
told; the text shows the peer after the fields. Never a payload, password, token or
ciphertext: the callers pass names, counts and reasons only, and the tests grep a
scenario's whole log for a known password, token and payload.
"""

from __future__ import annotations

import enum
import logging

from qm_server import call_context

log = logging.getLogger(__name__)


class Event(enum.StrEnum):
    LOGIN_OK = "login.ok"
    LOGIN_FAILED = "login.failed"
    LOGIN_THROTTLED = "login.throttled"
    """Once per backoff of a (user, host) pair or a host, and once while a host's line of
    logins is full: the refusals in between are counted (qm_login_throttled_total), not
    logged, so that a flood cannot flood the log."""
    PERMISSION_DENIED = "permission.denied"
    SESSION_ENDED = "session.ended"
    QUEUE_CREATED = "queue.created"
    QUEUE_DESTROYED = "queue.destroyed"
    QUEUE_PURGED = "queue.purged"
    MAP_CREATED = "map.created"
    MAP_DESTROYED = "map.destroyed"
    USER_ADDED = "user.added"
    USER_REMOVED = "user.removed"
    USER_PASSWORD_CHANGED = "user.password_changed"
    GRANT_ADDED = "grant.added"
    GRANT_REVOKED = "grant.revoked"


class EndReason(enum.StrEnum):
    """Why a session ended: `reason` of SESSION_ENDED."""

    LOGGED_OUT = "logged_out"
    EXPIRED = "expired"
    USER_REMOVED = "user_removed"
    PASSWORD_CHANGED = "password_changed"
    ENDED_BY_ADMIN = "ended_by_admin"
    """EndSession: the admin who ended it is its `by` field."""


# LogRecord attributes that an event's field must not shadow (logging refuses them).
_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def record(event: Event, **fields: str | float) -> None:
    """Log the event at INFO with its fields; fields that are empty strings are left out."""
    clash = _RESERVED.intersection(fields)
    if clash:
        raise ValueError(f"audit field names clash with LogRecord attributes: {clash}")
    if not log.isEnabledFor(logging.INFO):
        return
    shown = {k: v if isinstance(v, int | float) else str(v) for k, v in fields.items() if v != ""}
    text = " ".join([event.value, *(f"{k}={v!r}" for k, v in shown.items())])
    call = call_context.current()
    if call is not None:  # a key of its own in JSON (call_context.CallFilter)
        text += f" peer={call.peer!r}"
    log.info("%s", text, extra={"event": event.value, **shown})


def session_ended(user: str, session_id: int, reason: EndReason, by: str = "") -> None:
    """SESSION_ENDED; `by` names the admin for ENDED_BY_ADMIN."""
    record(Event.SESSION_ENDED, user=user, session=f"{session_id:x}", reason=reason, by=by)
