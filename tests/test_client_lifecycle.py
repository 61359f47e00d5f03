"""The client's lifecycle methods and their typed results, against a real server through
real gRPC: queue settings, queue info, leases, purge, dead letters and redrive, listings,
delayed and idempotent adds, and map paging by key cursor."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from client_fixtures import ScriptedServicer, connect, scripted_server

from conftest import ServerHandle
from qm.v1 import queue_manager_pb2 as pb
from qm_client import (
    AddedIds,
    DeadLetter,
    InvalidArgument,
    LeaseExpired,
    MessageNotFound,
    QueueInfo,
    QueueManagerClient,
    QueueNotFound,
    QueueSettings,
    QueueSummary,
    RetryPolicy,
    Unavailable,
)

# Every setting at its default, as an answer spells it (the server resolves the retry
# multiplier to its default, 2.0).
DEFAULTS = QueueSettings(
    ack_deadline_ms=0,
    max_deliveries=0,
    dead_letter_queue="",
    retry=RetryPolicy(0, 2.0, 0),
    delay_ms=0,
    max_age_ms=0,
    max_length=0,
)
# Clocks of client and server are the same machine's; this only absorbs the call itself.
NEAR = timedelta(seconds=5)


@pytest.fixture
def qm(server: ServerHandle) -> Iterator[QueueManagerClient]:
    with connect(server) as client:
        yield client


@pytest.fixture
def other(server: ServerHandle) -> Iterator[QueueManagerClient]:
    """A second session: another consumer."""
    with connect(server) as client:
        yield client


def near(when: datetime | None, expected: datetime) -> bool:
    return when is not None and abs(when - expected) < NEAR


# -- settings and info ----------------------------------------------------------------------


def test_a_queue_without_settings_has_the_defaults(qm: QueueManagerClient) -> None:
    qm.new_queue("plain")
    assert qm.queue_info("plain") == QueueInfo(
        name="plain",
        settings=DEFAULTS,
        ready=0,
        delayed=0,
        in_flight=0,
        dead_lettered=0,
        oldest_ready_age_ms=0,
        holding_sessions=0,
        subscriptions=0,
        dead_letters_held=0,
    )


def test_new_queue_takes_settings_and_queue_info_shows_them_with_counts(
    qm: QueueManagerClient,
) -> None:
    qm.new_queue("jobs.dead")
    settings = QueueSettings(
        ack_deadline_ms=30_000,
        max_deliveries=5,
        dead_letter_queue="jobs.dead",
        retry=RetryPolicy(initial_delay_ms=1_000, multiplier=3.0, max_delay_ms=60_000),
        delay_ms=0,
        max_age_ms=86_400_000,
        max_length=100,
    )
    qm.new_queue("jobs", settings)
    qm.add_all("jobs", ["a", "b", "c"])
    held = qm.poll("jobs")
    assert held is not None
    info = qm.queue_info("jobs")
    assert info.settings == settings
    assert (info.ready, info.in_flight, info.delayed, info.holding_sessions) == (2, 1, 0, 1)
    assert info.oldest_ready_age_ms >= 0


def test_a_setting_left_none_takes_its_default(qm: QueueManagerClient) -> None:
    qm.new_queue("short", QueueSettings(max_length=2))
    assert qm.queue_info("short").settings == replace(DEFAULTS, max_length=2)


def test_update_queue_changes_only_what_is_given_and_answers_every_setting(
    qm: QueueManagerClient,
) -> None:
    qm.new_queue("jobs", QueueSettings(ack_deadline_ms=5_000, max_length=10))
    now = qm.update_queue("jobs", QueueSettings(max_length=20, delay_ms=1_000))
    expected = replace(DEFAULTS, ack_deadline_ms=5_000, max_length=20, delay_ms=1_000)
    assert now == expected
    assert qm.queue_info("jobs").settings == expected
    # 0 turns a setting off.
    assert qm.update_queue("jobs", QueueSettings(ack_deadline_ms=0)).ack_deadline_ms == 0


def test_settings_out_of_bounds_and_missing_queues_raise_typed_errors(
    qm: QueueManagerClient,
) -> None:
    with pytest.raises(InvalidArgument):
        qm.new_queue("bad", QueueSettings(ack_deadline_ms=10))
    with pytest.raises(InvalidArgument):
        qm.new_queue("bad", QueueSettings(max_deliveries=3))  # without a dead-letter queue
    with pytest.raises(QueueNotFound):
        qm.queue_info("bad")
    with pytest.raises(QueueNotFound):
        qm.update_queue("nope", QueueSettings(max_length=1))


# -- deliveries: enqueue time and lease -------------------------------------------------------


def test_deliveries_carry_their_enqueue_time_and_lease(qm: QueueManagerClient) -> None:
    qm.new_queue("jobs", QueueSettings(ack_deadline_ms=60_000))
    added = datetime.now(UTC)
    qm.add_all("jobs", ["a", "b", "c", "d"])
    polled = qm.poll("jobs")
    assert polled is not None
    assert near(polled.enqueued_at, added)
    assert polled.enqueued_at.tzinfo is UTC
    assert near(polled.lease_expires_at, datetime.now(UTC) + timedelta(seconds=60))
    # A call's ack_deadline wins over the queue's.
    pulled = qm.pull("jobs", 2, ack_deadline=5)
    assert [m.element for m in pulled] == ["b", "c"]
    for message in pulled:
        assert near(message.lease_expires_at, datetime.now(UTC) + timedelta(seconds=5))
    with qm.subscribe("jobs", ack_deadline=7) as subscription:
        pushed = next(subscription)
        assert pushed.element == "d"
        assert near(pushed.lease_expires_at, datetime.now(UTC) + timedelta(seconds=7))
        pushed.ack()


def test_a_queue_without_ack_deadline_gives_no_lease(qm: QueueManagerClient) -> None:
    qm.new_queue("jobs")
    qm.add("jobs", "a")
    message = qm.poll("jobs")
    assert message is not None
    assert message.lease_expires_at is None
    assert message.delivery_count == 1


def test_extend_lease_moves_the_deadline_with_a_result_per_message(
    qm: QueueManagerClient,
) -> None:
    qm.new_queue("jobs")
    qm.add_all("jobs", ["a", "b"])
    first, second = qm.pull("jobs", 2, ack_deadline=2)
    results = qm.extend_lease([first, second.message_id, 999_999], 60)
    assert [r.message_id for r in results] == [first.message_id, second.message_id, 999_999]
    assert results[0].ok and results[1].ok
    for result in results[:2]:
        assert near(result.lease_expires_at, datetime.now(UTC) + timedelta(seconds=60))
    assert isinstance(results[2].error, MessageNotFound)
    assert results[2].lease_expires_at is None
    # A deadline of 0 gives the message back at once.
    (given_back,) = qm.extend_lease([second], 0)
    assert given_back.ok and given_back.lease_expires_at is None
    assert (qm.size("jobs"), qm.unacked("jobs")) == (1, 1)
    first.ack()


def test_an_ack_after_the_lease_ran_out_raises_lease_expired(
    qm: QueueManagerClient, other: QueueManagerClient
) -> None:
    qm.new_queue("jobs")
    qm.add("jobs", "slow")
    message = qm.poll("jobs", ack_deadline=1)
    assert message is not None
    again = other.poll("jobs", wait=15)  # ready again once the lease runs out
    assert again is not None
    assert (again.message_id, again.delivery_count) == (message.message_id, 2)
    with pytest.raises(LeaseExpired) as caught:
        message.ack()
    assert caught.value.code == pb.CODE_LEASE_EXPIRED
    assert isinstance(caught.value, MessageNotFound)  # "no longer mine", for older code
    again.ack()
    assert (qm.size("jobs"), qm.unacked("jobs")) == (0, 0)


# -- purge, dead letters, redrive -------------------------------------------------------------


def test_purge_removes_ready_and_delayed_but_not_in_flight(qm: QueueManagerClient) -> None:
    qm.new_queue("jobs")
    qm.add_all("jobs", ["a", "b", "c"])
    qm.add("jobs", "later", delay=3600)
    held = qm.poll("jobs")
    assert held is not None
    assert qm.purge("jobs") == 3
    info = qm.queue_info("jobs")
    assert (info.ready, info.delayed, info.in_flight) == (0, 0, 1)
    held.ack()
    with pytest.raises(QueueNotFound):
        qm.purge("nope")


def dead_letter_queue(qm: QueueManagerClient) -> None:
    """``jobs``, whose messages are dead-lettered to ``jobs.dead`` at their first nack."""
    qm.new_queue("jobs.dead")
    qm.new_queue("jobs", QueueSettings(max_deliveries=1, dead_letter_queue="jobs.dead"))


def test_dead_letters_keep_their_history_and_redrive_moves_them_back(
    qm: QueueManagerClient,
) -> None:
    dead_letter_queue(qm)
    added = datetime.now(UTC)
    ids = qm.add_all("jobs", ["x", "y", "z"])
    for message in qm.pull("jobs", 3):
        message.nack()
    letters = list(qm.dead_letters("jobs.dead", page_size=2))  # two pages
    assert [d.message_id for d in letters] == ids
    first = letters[0]
    assert first == DeadLetter(
        message_id=ids[0],
        original_queue="jobs",
        delivery_count=1,
        enqueued_at=first.enqueued_at,
        dead_lettered_at=first.dead_lettered_at,
        cause="max_deliveries after ack error",
        element="x",
    )
    assert near(first.enqueued_at, added)
    assert near(first.dead_lettered_at, datetime.now(UTC))
    assert first.dead_lettered_at >= first.enqueued_at
    assert qm.queue_info("jobs").dead_lettered == 3
    assert qm.queue_info("jobs.dead").dead_letters_held == 3

    result = qm.redrive("jobs.dead", [ids[1], 999_999])
    assert result.moved == 1
    assert list(result.failed) == [999_999]
    assert isinstance(result.failed[999_999], MessageNotFound)
    assert qm.size("jobs") == 1
    everything = qm.redrive("jobs.dead")
    assert (everything.moved, everything.failed) == (2, {})
    assert list(qm.dead_letters("jobs.dead")) == []
    back = qm.pull("jobs", 3)
    assert sorted(m.message_id for m in back) == ids
    assert all(m.delivery_count == 2 for m in back)  # the count is kept


# -- listings -----------------------------------------------------------------------------------


def test_list_queues_pages_by_name_with_counts(qm: QueueManagerClient) -> None:
    names = [f"q{i}" for i in range(5)]
    for name in reversed(names):
        qm.new_queue(name)
    qm.add_all("q1", ["a", "b"])
    qm.add("q1", "later", delay=3600)
    assert qm.poll("q1") is not None
    listed = list(qm.list_queues(page_size=2))
    assert [q.name for q in listed] == names
    assert listed[1] == QueueSummary(name="q1", ready=1, in_flight=1, delayed=1)


def test_list_maps_pages_by_name(qm: QueueManagerClient) -> None:
    for name in ("m2", "m0", "m1"):
        qm.map(name)["k"] = "v"
    assert list(qm.list_maps(page_size=2)) == ["m0", "m1", "m2"]


# -- adds ---------------------------------------------------------------------------------------


def test_a_delayed_add_is_not_ready_until_its_delay(qm: QueueManagerClient) -> None:
    qm.new_queue("jobs")
    qm.add("jobs", "later", delay=3600)
    qm.add_all("jobs", ["b", "c"], delay=3600)
    assert qm.poll("jobs") is None
    info = qm.queue_info("jobs")
    assert (info.ready, info.delayed) == (0, 3)
    # A short delay runs out while a long poll waits.
    quick = qm.add("jobs", "soon", delay=1)
    message = qm.poll("jobs", wait=15)
    assert message is not None and message.message_id == quick


def test_a_repeated_request_id_adds_nothing_and_answers_the_first_ids(
    qm: QueueManagerClient,
) -> None:
    qm.new_queue("jobs")
    first = qm.add_all("jobs", ["a", "b"], request_id="batch-1")
    assert isinstance(first, AddedIds)
    assert (first.replayed, first.request_id) == (False, "batch-1")
    again = qm.add_all("jobs", ["a", "b"], request_id="batch-1")
    assert (list(again), again.replayed) == (list(first), True)
    one = qm.add("jobs", "c", request_id="one-1")
    assert qm.add("jobs", "c", request_id="one-1") == one
    assert qm.size("jobs") == 3
    # The same id for another request is refused.
    with pytest.raises(InvalidArgument):
        qm.add_all("jobs", ["other"], request_id="batch-1")


def test_idempotent_adds_get_a_request_id_of_their_own(qm: QueueManagerClient) -> None:
    qm.new_queue("jobs")
    first = qm.add_all("jobs", ["a"], idempotent=True)
    second = qm.add_all("jobs", ["a"], idempotent=True)
    assert first.request_id and second.request_id and first.request_id != second.request_id
    assert not first.replayed and not second.replayed
    assert qm.add_all("jobs", ["a"]).request_id == ""
    assert qm.size("jobs") == 3


def test_an_add_with_a_request_id_is_repeated_after_an_unavailable_status() -> None:
    servicer = ScriptedServicer()  # type: ignore[abstract]
    with scripted_server(servicer) as target, QueueManagerClient(target, "u", "p") as client:
        servicer.failures["Add"] = 2
        assert client.add("jobs", "a", request_id="r") == 1
        assert servicer.attempts["Add"] == 3
        servicer.failures["Add"] = 1
        with pytest.raises(Unavailable):
            client.add("jobs", "a")  # no request id: the first call may have added it
        assert servicer.attempts["Add"] == 4


# -- maps by key cursor -------------------------------------------------------------------------


def test_map_iteration_by_cursor_is_stable_while_the_map_changes(qm: QueueManagerClient) -> None:
    view = qm.map("m", page_size=3)
    view.update({f"k{i:02}": str(i) for i in range(10)})
    seen: list[str] = []
    for key in view:
        seen.append(key)
        if key == "k04":
            # Keys added before the cursor would shift an offset and repeat entries.
            view.update({"a0": "x", "a1": "y", "a2": "z"})
    assert seen == [f"k{i:02}" for i in range(10)]
    page, cursor = view.page_after(None, 2)
    assert (page, cursor) == ([("a0", "x"), ("a1", "y")], "a1")
    page, cursor = view.page_after("k08")
    assert (page, cursor) == ([("k09", "9")], None)
    # The empty key is a key like any other: the first page holds it.
    view[""] = "empty"
    assert view.page_after(None, 1) == ([("", "empty")], "")
    assert next(iter(view)) == ""
    assert len(view) == 14


def test_map_clear_removes_every_key_of_a_map_larger_than_a_page(qm: QueueManagerClient) -> None:
    view = qm.map("m", page_size=4)
    view.update({f"k{i:02}": "v" for i in range(11)})
    view.clear()
    assert view.exists()
    assert len(view) == 0
