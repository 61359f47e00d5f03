"""Typed exceptions for every outcome that is not CODE_OK.

The service answers domain outcomes in ``response.code`` with gRPC status OK, and uses a
gRPC status only for what it never got to judge (deadline, size limit, shutdown). A caller
should not have to care which of the two channels an outcome came by, so both are mapped
here, in one table, onto the same exception classes: ``except Unavailable`` catches a
failed store (``CODE_UNAVAILABLE``) and a draining server (gRPC ``UNAVAILABLE``) alike.
"""

from __future__ import annotations

import grpc
import grpc.aio

from qm.v1 import queue_manager_pb2 as pb

__all__ = [
    "ClientClosed",
    "DeadlineExceeded",
    "FingerprintMismatch",
    "InternalError",
    "InvalidArgument",
    "KeyNotFound",
    "LeaseExpired",
    "LeaseLost",
    "MapNotFound",
    "MessageNotFound",
    "MessageReleased",
    "PermissionDenied",
    "QMError",
    "QueueAlreadyExists",
    "QueueEmpty",
    "QueueNotEmpty",
    "QueueNotFound",
    "ResourceExhausted",
    "SessionNotFound",
    "TransportError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "code_name",
    "error_for_code",
    "error_for_rpc_error",
]


class QMError(Exception):
    """Base of every error the client raises for a failed call.

    ``code_name`` is what scripts and logs should key on: the proto's code without its
    ``CODE_`` prefix (``QUEUE_NOT_FOUND``) or, for failures the service never judged, the
    gRPC status name (``DEADLINE_EXCEEDED``). ``code`` is the numeric ``qm.v1.Code`` when
    the service answered one, else ``None``; ``grpc_status`` is set only for the latter.
    """

    code_name: str = "UNKNOWN"

    def __init__(
        self,
        message: str = "",
        *,
        code: int | None = None,
        grpc_status: grpc.StatusCode | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.grpc_status = grpc_status
        if code is None and grpc_status is not None and type(self).code_name == "UNKNOWN":
            # A status with no class of its own keeps its name for people and scripts.
            self.code_name = grpc_status.name

    def __str__(self) -> str:
        return f"{self.code_name}: {self.message}" if self.message else self.code_name


class InvalidArgument(QMError):
    """A field was missing, malformed or out of range; nothing was applied."""

    code_name = "INVALID_ARGUMENT"


class Unauthenticated(QMError):
    """The login failed, or a session could not be re-established."""

    code_name = "UNAUTHENTICATED"


class PermissionDenied(QMError):
    """The user may not do this on that queue or map."""

    code_name = "PERMISSION_DENIED"


class QueueNotFound(QMError):
    """The named queue does not exist (only ``new_queue`` creates one)."""

    code_name = "QUEUE_NOT_FOUND"


class QueueAlreadyExists(QMError):
    """``new_queue`` on a name that is taken."""

    code_name = "QUEUE_ALREADY_EXISTS"


class QueueEmpty(QMError):
    """Nothing was ready.

    ``poll`` and ``pull`` return ``None`` / ``[]`` instead, because an empty queue is the
    normal state of a consumer loop, not a failure; the class exists so that the table is
    complete and the CLI can name the outcome.
    """

    code_name = "QUEUE_EMPTY"


class QueueNotEmpty(QMError):
    """``destroy_queue`` without ``force`` on a queue that still holds messages."""

    code_name = "QUEUE_NOT_EMPTY"


class MessageNotFound(QMError):
    """The id is unknown, already acked, or in flight for another session."""

    code_name = "MESSAGE_NOT_FOUND"


class MessageReleased(MessageNotFound):
    """The message was delivered to a session that has since ended.

    The server put it back to ready when that session ended (it may already be in flight
    elsewhere, with its delivery count raised), so acking it now would be wrong: the client
    refuses locally instead of acking another consumer's copy by id.
    """

    code_name = "MESSAGE_NOT_FOUND"


class MapNotFound(QMError):
    """The named map does not exist."""

    code_name = "MAP_NOT_FOUND"


class KeyNotFound(QMError, KeyError):
    """The map exists but lacks the key.

    Also a :class:`KeyError`, so a map view honours ``Mapping`` conventions
    (``m.get(k)``, ``k in m``, ``m.pop(k, default)``).
    """

    code_name = "KEY_NOT_FOUND"

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message; keep the QMError form.
        return QMError.__str__(self)


class LeaseExpired(MessageNotFound):
    """The lease of a delivered message ran out before its ack or extension: the message
    is ready again (or delivered elsewhere) and this delivery's work no longer counts.

    A :class:`MessageNotFound` too, as :class:`MessageReleased` is: code that handles "this
    delivery is no longer mine" keeps working, and code that cares can tell them apart.
    """

    code_name = "LEASE_EXPIRED"


class LeaseLost(LeaseExpired):
    """The client's lease keeper lost the lease of a message while its handler ran: an
    extension was refused (``cause`` is that error), or the lease reached ``max_lease``
    (``cause`` is ``None``). Raised locally by ``ack``/``nack`` of that message, without
    a call: the message is, or soon will be, delivered again.
    """

    code_name = "LEASE_EXPIRED"

    def __init__(self, message: str = "", *, cause: QMError | None = None) -> None:
        super().__init__(message, code=pb.CODE_LEASE_EXPIRED)
        self.cause = cause


class SessionNotFound(QMError):
    """EndSession of a session id that is not live (it ended, or never was)."""

    code_name = "SESSION_NOT_FOUND"


class ResourceExhausted(QMError):
    """A configured limit was hit (size, batch, count, login attempts)."""

    code_name = "RESOURCE_EXHAUSTED"


class Unavailable(QMError):
    """The store failed, or the server is draining or unreachable; try again later.

    A ``CODE_UNAVAILABLE`` answer (``code`` set) means nothing was applied: the client
    already made the call again with backoff before raising this, for every call but
    ``add`` and ``add_all`` without a request id. A gRPC ``UNAVAILABLE`` status
    (``grpc_status`` set) means the call may not have reached the server, or its answer was
    lost (on the network, or between the server and its database during the commit), so it
    may have taken effect: gRPC retried it only for calls whose repetition cannot change
    the outcome, and the client an add with a request id (docs/client.md, "Retries").
    """

    code_name = "UNAVAILABLE"


class InternalError(QMError):
    """A bug in the server; ``message`` carries the id it logged the detail under."""

    code_name = "INTERNAL"


class DeadlineExceeded(QMError):
    """The call did not finish within its deadline; it may or may not have been applied."""

    code_name = "DEADLINE_EXCEEDED"


class Unimplemented(QMError):
    """The server does not know this method (it is older than this client)."""

    code_name = "UNIMPLEMENTED"


class TransportError(QMError):
    """Any other non-OK gRPC status; ``grpc_status`` says which."""


class FingerprintMismatch(QMError):
    """The server's public key does not match ``pin_fingerprint``; no password was sent."""

    code_name = "FINGERPRINT_MISMATCH"


class ClientClosed(QMError):
    """The client was used after ``close()``."""

    code_name = "CLIENT_CLOSED"


# The one table: a code's name (proto Code without "CODE_", or a gRPC status name) to the
# class raised for it.
_BY_NAME: dict[str, type[QMError]] = {
    cls.code_name: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        QueueNotFound,
        QueueAlreadyExists,
        QueueEmpty,
        QueueNotEmpty,
        MessageNotFound,
        MapNotFound,
        KeyNotFound,
        LeaseExpired,
        SessionNotFound,
        ResourceExhausted,
        Unavailable,
        InternalError,
        DeadlineExceeded,
        Unimplemented,
    )
}


def code_name(code: int) -> str:
    """The proto name of a ``qm.v1.Code`` ("CODE_QUEUE_EMPTY"); a code newer than this
    client is named by its number ("CODE_42") rather than raising."""
    try:
        return pb.Code.Name(code)
    except ValueError:
        return f"CODE_{code}"


def error_for_code(code: int, message: str = "") -> QMError:
    """The exception for a non-OK ``qm.v1.Code`` found in a response."""
    name = code_name(code)
    if name != f"CODE_{code}":  # a known code: errors are named without the prefix
        name = name.removeprefix("CODE_")
    cls = _BY_NAME.get(name, QMError)
    err = cls(message, code=code)
    if cls is QMError:
        err.code_name = name
    return err


def error_for_rpc_error(error: grpc.RpcError) -> QMError:
    """The exception for a call that failed with a non-OK gRPC status."""
    status: grpc.StatusCode | None = None
    details = str(error)
    # grpc.aio's failures are AioRpcError, which has a call's code and details without
    # being a grpc.Call.
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        status = error.code()
        details = error.details() or ""
    if status is None:
        return TransportError(details)
    cls = _BY_NAME.get(status.name, TransportError)
    return cls(details, grpc_status=status)
