"""Python client for the queue manager service.

    from qm_client import QueueManagerClient

    with QueueManagerClient("localhost:50051", "admin", password) as qm:
        qm.new_queue("jobs", exist_ok=True)
        qm.add("jobs", "hello")
        if (message := qm.poll("jobs", wait=5)) is not None:
            print(message.element)
            message.ack()

For asyncio code, :class:`AsyncQueueManagerClient` has the same surface, awaited.
Every failure is a :class:`QMError` subclass named after the service's code.
"""

from ._aio_lease_keeper import AsyncLeaseGuard
from ._lease_keeper import LeaseGuard
from ._lifecycle import (
    AddedIds,
    DeadLetter,
    LeaseResult,
    QueueInfo,
    QueueSettings,
    QueueSummary,
    RedriveResult,
    RetryPolicy,
)
from ._message import AsyncMessage
from ._sessions import ServerLimits, SessionStatus, SessionSummary
from ._version import __version__
from .aio import AsyncQueueManagerClient
from .aio_maps import AsyncQMap
from .aio_subscribe import AsyncSubscription
from .client import (
    DEFAULT_MAX_LEASE,
    DEFAULT_TIMEOUT,
    Message,
    QueueManagerClient,
    SessionLoss,
    health,
)
from .errors import (
    ClientClosed,
    DeadlineExceeded,
    FingerprintMismatch,
    InternalError,
    InvalidArgument,
    KeyNotFound,
    LeaseExpired,
    LeaseLost,
    MapNotFound,
    MessageNotFound,
    MessageReleased,
    PermissionDenied,
    QMError,
    QueueAlreadyExists,
    QueueEmpty,
    QueueNotEmpty,
    QueueNotFound,
    ResourceExhausted,
    SessionNotFound,
    TransportError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from .maps import QMap
from .subscribe import Subscription

__all__ = [
    "DEFAULT_MAX_LEASE",
    "DEFAULT_TIMEOUT",
    "AddedIds",
    "AsyncLeaseGuard",
    "AsyncMessage",
    "AsyncQMap",
    "AsyncQueueManagerClient",
    "AsyncSubscription",
    "ClientClosed",
    "DeadLetter",
    "DeadlineExceeded",
    "FingerprintMismatch",
    "InternalError",
    "InvalidArgument",
    "KeyNotFound",
    "LeaseExpired",
    "LeaseGuard",
    "LeaseLost",
    "LeaseResult",
    "MapNotFound",
    "Message",
    "MessageNotFound",
    "MessageReleased",
    "PermissionDenied",
    "QMError",
    "QMap",
    "QueueAlreadyExists",
    "QueueEmpty",
    "QueueInfo",
    "QueueManagerClient",
    "QueueNotEmpty",
    "QueueNotFound",
    "QueueSettings",
    "QueueSummary",
    "RedriveResult",
    "ResourceExhausted",
    "RetryPolicy",
    "ServerLimits",
    "SessionLoss",
    "SessionNotFound",
    "SessionStatus",
    "SessionSummary",
    "Subscription",
    "TransportError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "__version__",
    "health",
]
