"""Domain errors: every failure a client can cause or observe, each carrying its wire code.

The engine and the stores raise these; the servicer turns them into a response's `code`
and `message` through one table (the `code` attribute), so no rule about codes lives in
the servicer. The numbers are the proto's `qm.v1.Code` values, kept here as plain ints so
that the engine does not import generated code.
"""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    """Mirror of qm.v1.Code; tests/test_codes.py checks the two stay equal."""

    OK = 0
    INVALID_ARGUMENT = 1
    UNAUTHENTICATED = 2
    PERMISSION_DENIED = 3
    QUEUE_NOT_FOUND = 4
    QUEUE_ALREADY_EXISTS = 5
    QUEUE_EMPTY = 6
    QUEUE_NOT_EMPTY = 7
    MESSAGE_NOT_FOUND = 8
    MAP_NOT_FOUND = 9
    KEY_NOT_FOUND = 10
    RESOURCE_EXHAUSTED = 11
    UNAVAILABLE = 12
    INTERNAL = 13
    LEASE_EXPIRED = 14
    SESSION_NOT_FOUND = 15


class QmError(Exception):
    """A domain outcome other than OK; `str(error)` is the message for people."""

    code: Code = Code.INTERNAL


class InvalidArgument(QmError):
    code = Code.INVALID_ARGUMENT


class Unauthenticated(QmError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(QmError):
    code = Code.PERMISSION_DENIED


class QueueNotFound(QmError):
    code = Code.QUEUE_NOT_FOUND


class QueueAlreadyExists(QmError):
    code = Code.QUEUE_ALREADY_EXISTS


class QueueEmpty(QmError):
    code = Code.QUEUE_EMPTY


class QueueNotEmpty(QmError):
    code = Code.QUEUE_NOT_EMPTY


class MessageNotFound(QmError):
    code = Code.MESSAGE_NOT_FOUND


class LeaseExpired(QmError):
    """The caller's lease on the message ran out before its ack or extension."""

    code = Code.LEASE_EXPIRED


class MapNotFound(QmError):
    code = Code.MAP_NOT_FOUND


class SessionNotFound(QmError):
    code = Code.SESSION_NOT_FOUND


class KeyNotFound(QmError):
    code = Code.KEY_NOT_FOUND


class ResourceExhausted(QmError):
    code = Code.RESOURCE_EXHAUSTED


class Unavailable(QmError):
    """The store cannot commit (disk full, file gone, read-only) or the server is draining."""

    code = Code.UNAVAILABLE


class OutcomeUnknown(Unavailable):
    """The store may or may not have committed the call: its database connection broke
    while a commit was in flight (store/pg_outcome.py). Never a response code: the
    servicer answers it with the gRPC status UNAVAILABLE, which tells a client that the
    call may have taken effect, as a lost answer does; CODE_UNAVAILABLE would promise that
    nothing was applied. An Unavailable still, so that background work (sweeps, the due
    loop) treats it as the store being out of reach. The embedded store never raises it:
    it commits in the server's own process, so an answer is lost only with the process,
    and then the client sees the transport fail."""


COMMIT_LOST = "the database connection was lost during the commit; the call may have taken effect"
"""What an OutcomeUnknown of the PostgreSQL store says first (the detail follows)."""
