"""The typed records of a queue's lifecycle, and their translation to and from the proto.

Field names mirror the server's (``qm_server/lifecycle.py``) and the proto's, times in
milliseconds where the proto counts milliseconds, so that a setting reads the same in the
proto, the README, the server and here. Points in time become ``datetime`` (UTC): an epoch
millisecond count is easy to misread as a duration.

In a request a setting left ``None`` is not sent: NewQueue gives it its default,
UpdateQueue leaves it as it is. In an answer every setting is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from qm.v1 import queue_manager_pb2 as pb

from .errors import QMError, error_for_code

__all__ = [
    "AddedIds",
    "DeadLetter",
    "LeaseResult",
    "QueueInfo",
    "QueueSettings",
    "QueueSummary",
    "RedriveResult",
    "RetryPolicy",
    "datetime_from_ms",
    "required_datetime_from_ms",
    "settings_from_pb",
    "settings_to_pb",
]


def datetime_from_ms(ms: int) -> datetime | None:
    """A proto time (Unix epoch milliseconds) as an aware UTC datetime; 0 means none."""
    if ms <= 0:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def required_datetime_from_ms(ms: int) -> datetime:
    """A time every answer carries (the epoch itself only if a server left it out)."""
    return datetime_from_ms(ms) or datetime.fromtimestamp(0, tz=UTC)


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff after a nack: the n-th failed delivery waits
    ``min(initial_delay_ms * multiplier ** (n - 1), max_delay_ms)``.

    ``initial_delay_ms=0`` turns backoff off (a nacked message is ready again at once);
    ``multiplier=0`` means the server's default (2.0), ``max_delay_ms=0`` means
    ``initial_delay_ms``.
    """

    initial_delay_ms: int = 0
    multiplier: float = 2.0
    max_delay_ms: int = 0


@dataclass(frozen=True)
class QueueSettings:
    """A queue's lifecycle settings (proto ``QueueSettings``; bounds are documented there).

    ``None`` in a request: not sent (the default on ``new_queue``, unchanged on
    ``update_queue``); set ``0`` (``""`` for ``dead_letter_queue``) to turn one off.
    ``retry`` is the proto's ``retry_delay``.
    """

    ack_deadline_ms: int | None = None
    max_deliveries: int | None = None
    dead_letter_queue: str | None = None
    retry: RetryPolicy | None = None
    delay_ms: int | None = None
    max_age_ms: int | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class QueueInfo:
    """A queue's settings and counts (``GetQueueInfo``)."""

    name: str
    settings: QueueSettings
    ready: int
    delayed: int
    in_flight: int
    dead_lettered: int
    """Messages dead-lettered from this queue that still sit in its dead-letter queue."""
    oldest_ready_age_ms: int
    holding_sessions: int
    subscriptions: int
    dead_letters_held: int
    """Dead letters of other queues that this queue holds (when it is a dead-letter queue)."""


@dataclass(frozen=True)
class QueueSummary:
    """One queue as ``list_queues`` lists it."""

    name: str
    ready: int
    in_flight: int
    delayed: int


@dataclass(frozen=True)
class DeadLetter:
    """A dead-lettered message with its history, as ``dead_letters`` lists it."""

    message_id: int
    original_queue: str
    delivery_count: int
    enqueued_at: datetime
    dead_lettered_at: datetime
    cause: str
    element: str


@dataclass(frozen=True)
class LeaseResult:
    """The outcome of ``extend_lease`` for one message.

    ``error`` is ``None`` on success, else the exception the code names
    (:class:`LeaseExpired`, :class:`MessageNotFound`), not raised because the other ids of
    the call were extended all the same. ``lease_expires_at`` is the new end of the lease,
    ``None`` when the message was given back (deadline 0) or on failure.
    """

    message_id: int
    error: QMError | None
    lease_expires_at: datetime | None

    @property
    def ok(self) -> bool:
        return self.error is None


def settings_to_pb(settings: QueueSettings) -> pb.QueueSettings:
    """The proto of a request's settings: only the fields that are not ``None``."""
    message = pb.QueueSettings()
    for name in (
        "ack_deadline_ms",
        "max_deliveries",
        "dead_letter_queue",
        "delay_ms",
        "max_age_ms",
        "max_length",
    ):
        value = getattr(settings, name)
        if value is not None:
            setattr(message, name, value)
    if settings.retry is not None:
        retry = settings.retry
        message.retry_delay.CopyFrom(
            pb.RetryPolicy(
                initial_delay_ms=retry.initial_delay_ms,
                multiplier=retry.multiplier,
                max_delay_ms=retry.max_delay_ms,
            )
        )
    return message


def settings_from_pb(message: pb.QueueSettings) -> QueueSettings:
    """The settings of an answer (every field set by the server; unset ones read as 0)."""
    retry = message.retry_delay
    return QueueSettings(
        ack_deadline_ms=message.ack_deadline_ms,
        max_deliveries=message.max_deliveries,
        dead_letter_queue=message.dead_letter_queue,
        retry=RetryPolicy(retry.initial_delay_ms, retry.multiplier, retry.max_delay_ms),
        delay_ms=message.delay_ms,
        max_age_ms=message.max_age_ms,
        max_length=message.max_length,
    )


def queue_info_from_pb(name: str, response: pb.GetQueueInfoResponse) -> QueueInfo:
    return QueueInfo(
        name=name,
        settings=settings_from_pb(response.settings),
        ready=response.ready,
        delayed=response.delayed,
        in_flight=response.in_flight,
        dead_lettered=response.dead_lettered,
        oldest_ready_age_ms=response.oldest_ready_age_ms,
        holding_sessions=response.holding_sessions,
        subscriptions=response.subscriptions,
        dead_letters_held=response.dead_letters_held,
    )


def dead_letter_from_pb(message: pb.DeadLetter) -> DeadLetter:
    return DeadLetter(
        message_id=message.message_id,
        original_queue=message.original_queue,
        delivery_count=message.delivery_count,
        enqueued_at=required_datetime_from_ms(message.enqueued_at_ms),
        dead_lettered_at=required_datetime_from_ms(message.dead_lettered_at_ms),
        cause=message.cause,
        element=message.element,
    )


def lease_result_from_pb(message: pb.LeaseResult) -> LeaseResult:
    error = None
    if message.code != pb.CODE_OK:
        error = error_for_code(message.code, f"lease of message {message.message_id}")
    return LeaseResult(
        message_id=message.message_id,
        error=error,
        lease_expires_at=datetime_from_ms(message.lease_expires_at_ms),
    )


def summary_from_pb(message: pb.QueueSummary) -> QueueSummary:
    return QueueSummary(
        name=message.name,
        ready=message.ready,
        in_flight=message.in_flight,
        delayed=message.delayed,
    )


@dataclass(frozen=True)
class RedriveResult:
    """What ``redrive`` did: how many dead letters went back to their original queues,
    and why each of the others stayed (by id: :class:`MessageNotFound` for an id that is
    not a dead letter of the queue, :class:`QueueNotFound` when its original queue is
    gone, :class:`PermissionDenied` without ``write`` on it)."""

    moved: int
    failed: dict[int, QMError]


def redrive_result_from_pb(response: pb.RedriveResponse) -> RedriveResult:
    failed = {
        result.message_id: error_for_code(result.code, f"dead letter {result.message_id}")
        for result in response.results
        if result.code != pb.CODE_OK
    }
    return RedriveResult(moved=response.moved, failed=failed)


class AddedIds(list[int]):
    """The ids ``add_all`` gave, in order (a ``list``), with whether the answer was a
    replay: ``replayed`` is true when the ``request_id`` had been seen before, so that
    nothing was added by this call and the ids are those of the first one."""

    def __init__(self, ids: list[int], *, replayed: bool, request_id: str) -> None:
        super().__init__(ids)
        self.replayed = replayed
        self.request_id = request_id
