"""A queue's lifecycle settings: leases, delivery limit, dead letters, backoff, delay, age
and length, with their bounds and defaults in one place.

Every default is the seed's behaviour (no deadline, no limit, no backoff, no delay), so a
queue made by the seed's `new_queue(queue_name)` behaves exactly as it did before these
settings existed. The engine validates a request's settings here; the stores keep them
and apply them; the servicer only translates them to and from the proto's QueueSettings.
Times are milliseconds, like the proto's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qm_server import errors

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

# Bounds of each setting (0 always means "off": the default). A lease longer than SQS's
# longest visibility timeout (12 h) is a worker that should extend instead.
MIN_ACK_DEADLINE_MS = 1_000
MAX_ACK_DEADLINE_MS = 12 * HOUR_MS
MAX_DELIVERIES = 1_000
MAX_RETRY_DELAY_MS = 12 * HOUR_MS
MIN_RETRY_MULTIPLIER = 1.0
MAX_RETRY_MULTIPLIER = 10.0
DEFAULT_RETRY_MULTIPLIER = 2.0
MAX_DELAY_MS = 7 * DAY_MS
MIN_MAX_AGE_MS = 1_000
MAX_MAX_AGE_MS = 365 * DAY_MS
MAX_MAX_LENGTH = 1_000_000_000
MAX_REQUEST_ID_CHARS = 128

# Why a message was dead-lettered (the proto's DeadLetter.cause).
CAUSE_ACK_ERROR = "max_deliveries after ack error"
CAUSE_LEASE_EXPIRY = "max_deliveries after lease expiry"
CAUSE_SESSION_END = "max_deliveries after session end"
CAUSE_EXTEND_TO_ZERO = "max_deliveries after extend to 0"
CAUSE_MAX_AGE = "max_age"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff after ACK_TYPE_ERROR: the n-th failed delivery waits
    min(initial_delay_ms * multiplier ** (n - 1), max_delay_ms)."""

    initial_delay_ms: int = 0
    multiplier: float = DEFAULT_RETRY_MULTIPLIER
    max_delay_ms: int = 0

    def delay_ms(self, delivery_count: int) -> int:
        """How long a message failed on its `delivery_count`-th delivery waits (0: none)."""
        if self.initial_delay_ms <= 0:
            return 0
        cap = self.max_delay_ms or self.initial_delay_ms
        # Past the cap the power only grows: stop computing it before it overflows.
        wait = float(self.initial_delay_ms)
        for _ in range(max(0, delivery_count - 1)):
            wait *= self.multiplier
            if wait >= cap:
                return cap
        return min(int(wait), cap)


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """A queue's settings, all resolved (no "unset"): what a store keeps and applies."""

    ack_deadline_ms: int = 0
    max_deliveries: int = 0
    dead_letter_queue: str = ""
    retry: RetryPolicy = RetryPolicy()
    delay_ms: int = 0
    max_age_ms: int = 0
    max_length: int = 0

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_SETTINGS


DEFAULT_SETTINGS = QueueSettings()


@dataclass(frozen=True, slots=True)
class SettingsChange:
    """A request's settings: None leaves a field as it is (UpdateQueue) or at its default
    (NewQueue). The servicer builds it from the proto's optional fields."""

    ack_deadline_ms: int | None = None
    max_deliveries: int | None = None
    dead_letter_queue: str | None = None
    retry: RetryPolicy | None = None
    delay_ms: int | None = None
    max_age_ms: int | None = None
    max_length: int | None = None

    def applied_to(self, current: QueueSettings) -> QueueSettings:
        """The settings after this change, checked (InvalidArgument names the field);
        whether dead_letter_queue exists is the store's to check."""
        changes = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }
        if "retry" in changes:
            changes["retry"] = _resolved_retry(changes["retry"])
        settings = dataclasses.replace(current, **changes)
        check_settings(settings)
        return settings


def _resolved_retry(retry: RetryPolicy) -> RetryPolicy:
    multiplier = retry.multiplier or DEFAULT_RETRY_MULTIPLIER
    max_delay = retry.max_delay_ms or retry.initial_delay_ms
    return RetryPolicy(retry.initial_delay_ms, multiplier, max_delay)


def check_settings(settings: QueueSettings) -> None:
    """InvalidArgument naming the first setting out of bounds."""
    _check_off_or_within(
        "ack_deadline_ms", settings.ack_deadline_ms, MIN_ACK_DEADLINE_MS, MAX_ACK_DEADLINE_MS
    )
    _check_off_or_within("max_deliveries", settings.max_deliveries, 1, MAX_DELIVERIES)
    if settings.max_deliveries and not settings.dead_letter_queue:
        raise errors.InvalidArgument(
            "max_deliveries needs a dead_letter_queue: a message past it is moved there, "
            "never dropped"
        )
    retry = settings.retry
    _check_off_or_within(
        "retry_delay.initial_delay_ms", retry.initial_delay_ms, 1, MAX_RETRY_DELAY_MS
    )
    if not MIN_RETRY_MULTIPLIER <= retry.multiplier <= MAX_RETRY_MULTIPLIER:
        raise errors.InvalidArgument(
            f"retry_delay.multiplier must be {MIN_RETRY_MULTIPLIER} to {MAX_RETRY_MULTIPLIER}"
            f" (0 for the default {DEFAULT_RETRY_MULTIPLIER}), not {retry.multiplier}"
        )
    if retry.initial_delay_ms and not (
        retry.initial_delay_ms <= retry.max_delay_ms <= MAX_RETRY_DELAY_MS
    ):
        raise errors.InvalidArgument(
            f"retry_delay.max_delay_ms must be initial_delay_ms to {MAX_RETRY_DELAY_MS}, "
            f"not {retry.max_delay_ms}"
        )
    check_delay_ms("delay_ms", settings.delay_ms)
    _check_off_or_within("max_age_ms", settings.max_age_ms, MIN_MAX_AGE_MS, MAX_MAX_AGE_MS)
    _check_off_or_within("max_length", settings.max_length, 1, MAX_MAX_LENGTH)


def check_delay_ms(field: str, value: int) -> None:
    if not 0 <= value <= MAX_DELAY_MS:
        raise errors.InvalidArgument(f"{field} must be 0 to {MAX_DELAY_MS}, not {value}")


def check_ack_deadline_ms(field: str, value: int, allow_zero: bool) -> None:
    """A lease asked for by a call: Poll, PullElements, Subscribe (`allow_zero` False) or
    ExtendLease (0 gives the message back)."""
    if allow_zero and value == 0:
        return
    if not MIN_ACK_DEADLINE_MS <= value <= MAX_ACK_DEADLINE_MS:
        zero = " (0 to give it back)" if allow_zero else ""
        raise errors.InvalidArgument(
            f"{field} must be {MIN_ACK_DEADLINE_MS} to {MAX_ACK_DEADLINE_MS}{zero}, not {value}"
        )


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise errors.InvalidArgument(
            f"request_id is {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}"
        )


def _check_off_or_within(field: str, value: int, low: int, high: int) -> None:
    if value != 0 and not low <= value <= high:
        raise errors.InvalidArgument(f"{field} must be 0 (off) or {low} to {high}, not {value}")
