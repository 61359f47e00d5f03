"""Pieces of requests and responses that several handlers build alike: deliveries, queue
settings both ways, per-id results."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from qm.v1 import queue_manager_pb2 as pb
from qm_server import errors
from qm_server.lifecycle import QueueSettings, RetryPolicy, SettingsChange
from qm_server.store.base import Delivery


def code_of(exc: errors.QmError) -> pb.Code:
    """The response code that carries an engine error (the contract's codes)."""
    return cast(pb.Code, int(exc.code))


def add_element_info(
    target: RepeatedCompositeFieldContainer[pb.ElementInfo], deliveries: list[Delivery]
) -> None:
    """Append one ElementInfo per delivery to a response's repeated field.

    Built in place with `add()` and attribute stores: a list of ElementInfo passed to a
    response's constructor is copied element by element, which cost twice as much.
    """
    add = target.add
    for d in deliveries:
        info = add()
        info.element = d.element
        info.message_id = d.message_id
        info.delivery_count = d.delivery_count
        info.enqueued_at_ms = d.enqueued_at_ms
        info.lease_expires_at_ms = d.lease_expires_at_ms


def add_results(
    target: RepeatedCompositeFieldContainer[pb.AckResult], results: Iterable[tuple[int, int]]
) -> None:
    """Append one AckResult per (message id, code)."""
    add = target.add
    for message_id, code in results:
        result = add()
        result.message_id = message_id
        if code:  # stays CODE_OK (0), the default, otherwise
            result.code = cast(pb.Code, int(code))


def settings_change(settings: pb.QueueSettings) -> SettingsChange:
    """A request's QueueSettings as a SettingsChange: an unset field is None."""
    retry = None
    if settings.HasField("retry_delay"):
        r = settings.retry_delay
        retry = RetryPolicy(r.initial_delay_ms, r.multiplier, r.max_delay_ms)

    def given(field: str) -> int | None:
        return cast(int, getattr(settings, field)) if settings.HasField(field) else None

    return SettingsChange(
        ack_deadline_ms=given("ack_deadline_ms"),
        max_deliveries=given("max_deliveries"),
        dead_letter_queue=(
            settings.dead_letter_queue if settings.HasField("dead_letter_queue") else None
        ),
        retry=retry,
        delay_ms=given("delay_ms"),
        max_age_ms=given("max_age_ms"),
        max_length=given("max_length"),
    )


def settings_message(settings: QueueSettings, target: pb.QueueSettings) -> None:
    """Fill an answer's QueueSettings with every field set (the contract: all set)."""
    target.ack_deadline_ms = settings.ack_deadline_ms
    target.max_deliveries = settings.max_deliveries
    target.dead_letter_queue = settings.dead_letter_queue
    target.retry_delay.initial_delay_ms = settings.retry.initial_delay_ms
    target.retry_delay.multiplier = settings.retry.multiplier
    target.retry_delay.max_delay_ms = settings.retry.max_delay_ms
    target.delay_ms = settings.delay_ms
    target.max_age_ms = settings.max_age_ms
    target.max_length = settings.max_length
