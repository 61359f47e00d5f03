"""The lifecycle surface through a real server and real channels: queue settings on
NewQueue and UpdateQueue, GetQueueInfo, Add's delay_ms and request_id, the deliveries'
times, Purge, ListQueues, ListMaps and MapGetList's key cursor, with exact codes and
the bounds of every field. Leases, dead letters and backoff: tests/test_leases.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from queue import SimpleQueue
from typing import Any

import grpc
import pytest
from test_permissions import user_command

from conftest import ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server import lifecycle

Stub = pb_grpc.QueueManagerServiceStub
HOUR_MS = 3_600_000
FIELDS = (
    "ack_deadline_ms",
    "max_deliveries",
    "dead_letter_queue",
    "retry_delay",
    "delay_ms",
    "max_age_ms",
    "max_length",
)

FULL = pb.QueueSettings(
    ack_deadline_ms=30_000,
    max_deliveries=5,
    dead_letter_queue="jobs.dead",
    retry_delay=pb.RetryPolicy(initial_delay_ms=1000, multiplier=3.0, max_delay_ms=60_000),
    delay_ms=2_000,
    max_age_ms=86_400_000,
    max_length=1000,
)
DEFAULTS = pb.QueueSettings(
    ack_deadline_ms=0,
    max_deliveries=0,
    dead_letter_queue="",
    retry_delay=pb.RetryPolicy(initial_delay_ms=0, multiplier=2.0, max_delay_ms=0),
    delay_ms=0,
    max_age_ms=0,
    max_length=0,
)


def new_queue(stub: Stub, token: str, name: str, settings: pb.QueueSettings | None = None) -> None:
    reply = stub.NewQueue(pb.NewQueueRequest(token=token, queue_name=name, settings=settings))
    assert reply.code == pb.CODE_OK, reply.message


def info(stub: Stub, token: str, name: str) -> pb.GetQueueInfoResponse:
    reply = stub.GetQueueInfo(pb.GetQueueInfoRequest(token=token, queue_name=name))
    assert reply.code == pb.CODE_OK, reply.message
    return reply


def assert_all_set(settings: pb.QueueSettings) -> None:
    assert [f for f in FIELDS if not settings.HasField(f)] == []


def now_ms() -> int:
    return int(time.time() * 1000)


# Settings ------------------------------------------------------------------------------


def test_new_queue_settings_are_kept_and_shown_in_full(stub: Stub, token: str) -> None:
    new_queue(stub, token, "jobs.dead")
    new_queue(stub, token, "jobs", FULL)
    new_queue(stub, token, "plain")
    jobs = info(stub, token, "jobs")
    assert_all_set(jobs.settings)
    assert jobs.settings == FULL
    plain = info(stub, token, "plain")
    assert_all_set(plain.settings)
    assert plain.settings == DEFAULTS
    # Unset fields take their default; 0 multiplier and max_delay take theirs.
    partial = pb.QueueSettings(retry_delay=pb.RetryPolicy(initial_delay_ms=500), max_length=7)
    new_queue(stub, token, "partial", partial)
    expected = pb.QueueSettings()
    expected.CopyFrom(DEFAULTS)
    expected.retry_delay.initial_delay_ms = 500
    expected.retry_delay.max_delay_ms = 500
    expected.max_length = 7
    assert info(stub, token, "partial").settings == expected


OUT_OF_BOUNDS = [
    ("ack_deadline_ms", pb.QueueSettings(ack_deadline_ms=999)),
    ("ack_deadline_ms", pb.QueueSettings(ack_deadline_ms=12 * HOUR_MS + 1)),
    ("ack_deadline_ms", pb.QueueSettings(ack_deadline_ms=-1)),
    ("max_deliveries", pb.QueueSettings(max_deliveries=1001, dead_letter_queue="dead")),
    ("max_deliveries", pb.QueueSettings(max_deliveries=-1, dead_letter_queue="dead")),
    ("dead_letter_queue", pb.QueueSettings(max_deliveries=3)),
    (
        "retry_delay.initial_delay_ms",
        pb.QueueSettings(retry_delay=pb.RetryPolicy(initial_delay_ms=-5)),
    ),
    (
        "retry_delay.multiplier",
        pb.QueueSettings(retry_delay=pb.RetryPolicy(initial_delay_ms=5, multiplier=0.5)),
    ),
    (
        "retry_delay.multiplier",
        pb.QueueSettings(retry_delay=pb.RetryPolicy(initial_delay_ms=5, multiplier=float("nan"))),
    ),
    (
        "retry_delay.max_delay_ms",
        pb.QueueSettings(retry_delay=pb.RetryPolicy(initial_delay_ms=50, max_delay_ms=10)),
    ),
    ("delay_ms", pb.QueueSettings(delay_ms=7 * 24 * HOUR_MS + 1)),
    ("delay_ms", pb.QueueSettings(delay_ms=-1)),
    ("max_age_ms", pb.QueueSettings(max_age_ms=999)),
    ("max_length", pb.QueueSettings(max_length=-1)),
    ("max_length", pb.QueueSettings(max_length=lifecycle.MAX_MAX_LENGTH + 1)),
    ("settings.dead_letter_queue", pb.QueueSettings(dead_letter_queue="no space")),
    ("settings.dead_letter_queue", pb.QueueSettings(dead_letter_queue="q")),  # itself
]


@pytest.mark.parametrize(("field", "settings"), OUT_OF_BOUNDS)
def test_settings_out_of_bounds_are_refused_naming_the_field(
    stub: Stub, token: str, field: str, settings: pb.QueueSettings
) -> None:
    new_queue(stub, token, "dead")
    created = stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q", settings=settings))
    assert created.code == pb.CODE_INVALID_ARGUMENT, created.message
    assert field in created.message
    gone = stub.GetQueueInfo(pb.GetQueueInfoRequest(token=token, queue_name="q"))
    assert gone.code == pb.CODE_QUEUE_NOT_FOUND  # nothing half-done
    new_queue(stub, token, "q")
    updated = stub.UpdateQueue(
        pb.UpdateQueueRequest(token=token, queue_name="q", settings=settings)
    )
    assert updated.code == pb.CODE_INVALID_ARGUMENT, updated.message
    assert field.removeprefix("settings.") in updated.message
    assert info(stub, token, "q").settings == DEFAULTS


def test_dead_letter_queue_must_exist(stub: Stub, token: str) -> None:
    settings = pb.QueueSettings(max_deliveries=2, dead_letter_queue="missing")
    created = stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q", settings=settings))
    assert created.code == pb.CODE_QUEUE_NOT_FOUND
    assert "missing" in created.message
    assert stub.Size(pb.SizeRequest(token=token, queue_name="q")).code == pb.CODE_QUEUE_NOT_FOUND
    new_queue(stub, token, "q")
    updated = stub.UpdateQueue(
        pb.UpdateQueueRequest(token=token, queue_name="q", settings=settings)
    )
    assert updated.code == pb.CODE_QUEUE_NOT_FOUND
    assert info(stub, token, "q").settings == DEFAULTS


def test_update_queue_changes_only_what_is_set(stub: Stub, token: str) -> None:
    new_queue(stub, token, "jobs.dead")
    new_queue(stub, token, "jobs", FULL)
    reply = stub.UpdateQueue(
        pb.UpdateQueueRequest(
            token=token,
            queue_name="jobs",
            settings=pb.QueueSettings(ack_deadline_ms=0, max_length=5),
        )
    )
    assert reply.code == pb.CODE_OK, reply.message
    expected = pb.QueueSettings()
    expected.CopyFrom(FULL)
    expected.ack_deadline_ms = 0  # turned off
    expected.max_length = 5
    assert_all_set(reply.settings)
    assert reply.settings == expected
    assert info(stub, token, "jobs").settings == expected
    # No settings at all: nothing changes, the answer shows them.
    same = stub.UpdateQueue(pb.UpdateQueueRequest(token=token, queue_name="jobs"))
    assert (same.code, same.settings) == (pb.CODE_OK, expected)
    # Turning the dead-letter queue off needs max_deliveries off too.
    alone = stub.UpdateQueue(
        pb.UpdateQueueRequest(
            token=token, queue_name="jobs", settings=pb.QueueSettings(dead_letter_queue="")
        )
    )
    assert alone.code == pb.CODE_INVALID_ARGUMENT
    both = stub.UpdateQueue(
        pb.UpdateQueueRequest(
            token=token,
            queue_name="jobs",
            settings=pb.QueueSettings(dead_letter_queue="", max_deliveries=0),
        )
    )
    assert (both.code, both.settings.dead_letter_queue, both.settings.max_deliveries) == (
        pb.CODE_OK,
        "",
        0,
    )
    missing = stub.UpdateQueue(pb.UpdateQueueRequest(token=token, queue_name="nope"))
    assert missing.code == pb.CODE_QUEUE_NOT_FOUND


def test_max_length_refuses_adds_past_it(stub: Stub, token: str) -> None:
    new_queue(stub, token, "q", pb.QueueSettings(max_length=3))
    ok = stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["a", "b"]))
    assert ok.code == pb.CODE_OK
    over = stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["c", "d"]))
    assert over.code == pb.CODE_RESOURCE_EXHAUSTED
    assert "max_length" in over.message
    assert stub.Size(pb.SizeRequest(token=token, queue_name="q")).size == 2  # none added
    assert stub.Add(pb.AddRequest(token=token, queue_name="q", element="c")).code == pb.CODE_OK
    full = stub.Add(pb.AddRequest(token=token, queue_name="q", element="d"))
    assert full.code == pb.CODE_RESOURCE_EXHAUSTED


# GetQueueInfo --------------------------------------------------------------------------


def test_queue_info_counts(server: ServerHandle, stub: Stub, token: str) -> None:
    new_queue(stub, token, "q")
    empty = info(stub, token, "q")
    assert (empty.ready, empty.delayed, empty.in_flight, empty.oldest_ready_age_ms) == (0, 0, 0, 0)
    assert (empty.holding_sessions, empty.subscriptions, empty.dead_lettered) == (0, 0, 0)
    before = now_ms()
    stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["a", "b", "c"]))
    later = stub.Add(pb.AddRequest(token=token, queue_name="q", element="d", delay_ms=600_000))
    assert later.code == pb.CODE_OK
    other = login(stub, "admin", server.admin_password)
    assert stub.Poll(pb.PollRequest(token=token, queue_name="q")).element == "a"
    assert stub.Poll(pb.PollRequest(token=other, queue_name="q")).element == "b"
    stream = Opened(stub, token, "q", max_unacked=1)
    assert [e.element for e in stream.next().element_info] == ["c"]
    got = info(stub, token, "q")
    assert (got.ready, got.delayed, got.in_flight) == (0, 1, 3)
    assert (got.holding_sessions, got.subscriptions) == (2, 1)
    assert got.oldest_ready_age_ms == 0  # none is ready
    stream.close()
    freed = info(stub, token, "q")
    assert (freed.ready, freed.in_flight, freed.subscriptions) == (1, 2, 0)
    # "c" was first added at `before` or later: its age is at most the time since.
    assert 0 <= freed.oldest_ready_age_ms <= now_ms() - before
    denied = stub.GetQueueInfo(pb.GetQueueInfoRequest(token=token, queue_name="nope"))
    assert denied.code == pb.CODE_QUEUE_NOT_FOUND


# Adds ----------------------------------------------------------------------------------


def test_add_delay_makes_the_message_ready_later(stub: Stub, token: str) -> None:
    new_queue(stub, token, "q")
    added = stub.Add(pb.AddRequest(token=token, queue_name="q", element="later", delay_ms=1000))
    assert added.code == pb.CODE_OK
    assert stub.Poll(pb.PollRequest(token=token, queue_name="q")).code == pb.CODE_QUEUE_EMPTY
    assert (info(stub, token, "q").ready, info(stub, token, "q").delayed) == (0, 1)
    polled = stub.Poll(pb.PollRequest(token=token, queue_name="q", wait_ms=10_000))
    assert (polled.code, polled.element, polled.message_id) == (
        pb.CODE_OK,
        "later",
        added.message_id,
    )
    assert now_ms() >= polled.enqueued_at_ms + 1000


def test_queue_delay_applies_unless_the_add_says_otherwise(stub: Stub, token: str) -> None:
    new_queue(stub, token, "q", pb.QueueSettings(delay_ms=600_000))
    stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["held"]))
    now = stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["now"], delay_ms=0))
    assert now.code == pb.CODE_OK
    polled = stub.Poll(pb.PollRequest(token=token, queue_name="q"))
    assert (polled.code, polled.element) == (pb.CODE_OK, "now")
    assert stub.Poll(pb.PollRequest(token=token, queue_name="q")).code == pb.CODE_QUEUE_EMPTY
    assert info(stub, token, "q").delayed == 1


@pytest.mark.parametrize("delay_ms", [-1, 7 * 24 * HOUR_MS + 1])
def test_add_delay_out_of_bounds(stub: Stub, token: str, delay_ms: int) -> None:
    new_queue(stub, token, "q")
    one = stub.Add(pb.AddRequest(token=token, queue_name="q", element="x", delay_ms=delay_ms))
    many = stub.AddAll(
        pb.AddAllRequest(token=token, queue_name="q", elements=["x"], delay_ms=delay_ms)
    )
    for reply in (one, many):
        assert reply.code == pb.CODE_INVALID_ARGUMENT
        assert "delay_ms" in reply.message
    assert (info(stub, token, "q").ready, info(stub, token, "q").delayed) == (0, 0)


def test_request_id_replays_the_first_answer(
    make_server: Callable[..., ServerHandle],
) -> None:
    server = make_server()
    user_command(server.data_dir, "add", "bob", "--password-stdin", stdin="bob-pw\n")
    user_command(server.data_dir, "grant", "bob", "write,read", "queue", "*")
    with grpc.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", server.admin_password)
        new_queue(stub, token, "q")
        new_queue(stub, token, "r")
        first = stub.Add(pb.AddRequest(token=token, queue_name="q", element="a", request_id="r1"))
        assert (first.code, first.replayed) == (pb.CODE_OK, False)
        again = stub.Add(pb.AddRequest(token=token, queue_name="q", element="a", request_id="r1"))
        assert (again.code, again.message_id, again.replayed) == (
            pb.CODE_OK,
            first.message_id,
            True,
        )
        # Another session of the same user replays too.
        other = login(stub, "admin", server.admin_password)
        third = stub.Add(pb.AddRequest(token=other, queue_name="q", element="a", request_id="r1"))
        assert (third.message_id, third.replayed) == (first.message_id, True)
        assert stub.Size(pb.SizeRequest(token=token, queue_name="q")).size == 1
        # The same id for another request: other elements, or another queue.
        for reused in (
            pb.AddRequest(token=token, queue_name="q", element="b", request_id="r1"),
            pb.AddRequest(token=token, queue_name="r", element="a", request_id="r1"),
        ):
            refused = stub.Add(reused)
            assert refused.code == pb.CODE_INVALID_ARGUMENT, refused.message
        batch = pb.AddAllRequest(token=token, queue_name="q", elements=["x", "y"], request_id="b")
        added = stub.AddAll(batch)
        replayed = stub.AddAll(batch)
        assert (replayed.message_ids, replayed.replayed) == (added.message_ids, True)
        # Element boundaries count: ["xy"] is another request than ["x", "y"].
        joined = pb.AddAllRequest(token=token, queue_name="q", elements=["xy"], request_id="b")
        assert stub.AddAll(joined).code == pb.CODE_INVALID_ARGUMENT
        # Another user's request_id is theirs alone.
        bob = login(stub, "bob", "bob-pw")
        bobs = stub.Add(pb.AddRequest(token=bob, queue_name="q", element="a", request_id="r1"))
        assert (bobs.code, bobs.replayed) == (pb.CODE_OK, False)
        assert bobs.message_id != first.message_id
        assert stub.Size(pb.SizeRequest(token=token, queue_name="q")).size == 4
        # Length bounds.
        longest = "i" * lifecycle.MAX_REQUEST_ID_CHARS
        ok = stub.Add(pb.AddRequest(token=token, queue_name="q", element="z", request_id=longest))
        assert ok.code == pb.CODE_OK
        too_long = stub.Add(
            pb.AddRequest(token=token, queue_name="q", element="z", request_id=longest + "i")
        )
        assert too_long.code == pb.CODE_INVALID_ARGUMENT
        assert "request_id" in too_long.message
    server.stop()
    restarted = make_server(data_dir=server.data_dir)
    with grpc.insecure_channel(restarted.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", restarted.admin_password)
        after = stub.Add(pb.AddRequest(token=token, queue_name="q", element="a", request_id="r1"))
        assert (after.code, after.message_id, after.replayed) == (
            pb.CODE_OK,
            first.message_id,
            True,
        )


# Deliveries ----------------------------------------------------------------------------


class Opened:
    """A Subscribe stream with its own ack deadline; acks sent one by one."""

    def __init__(
        self,
        stub: Stub,
        token: str,
        queue: str,
        max_unacked: int,
        ack_deadline_ms: int | None = None,
    ) -> None:
        self._outgoing: SimpleQueue[pb.SubscribeRequest | None] = SimpleQueue()
        self._outgoing.put(
            pb.SubscribeRequest(
                open=pb.SubscribeOpen(
                    token=token,
                    queue_name=queue,
                    max_unacked=max_unacked,
                    ack_deadline_ms=ack_deadline_ms,
                )
            )
        )
        self.responses = stub.Subscribe(self._requests(), timeout=30)

    def _requests(self) -> Iterator[pb.SubscribeRequest]:
        while (request := self._outgoing.get()) is not None:
            yield request

    def ack(self, ids: list[int], ack_type: pb.AckType = pb.ACK_TYPE_DONE) -> None:
        self._outgoing.put(
            pb.SubscribeRequest(ack=pb.SubscribeAck(message_ids=ids, ack_type=ack_type))
        )

    def next(self) -> pb.SubscribeResponse:
        return next(self.responses)

    def close(self) -> None:
        self._outgoing.put(None)
        assert list(self.responses) == []


def test_deliveries_carry_their_enqueue_time_and_lease(stub: Stub, token: str) -> None:
    new_queue(stub, token, "q")
    new_queue(stub, token, "timed", pb.QueueSettings(ack_deadline_ms=60_000))
    before = now_ms()
    stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["a", "b", "c", "d"]))
    stub.AddAll(pb.AddAllRequest(token=token, queue_name="timed", elements=["e"]))
    added = now_ms()
    plain = stub.Poll(pb.PollRequest(token=token, queue_name="q"))
    assert before <= plain.enqueued_at_ms <= added
    assert plain.lease_expires_at_ms == 0  # no deadline: held while the session lives
    asked = now_ms()
    leased = stub.Poll(pb.PollRequest(token=token, queue_name="q", ack_deadline_ms=30_000))
    assert asked + 30_000 <= leased.lease_expires_at_ms <= now_ms() + 30_000
    pulled = stub.PullElements(
        pb.PullElementsRequest(token=token, queue_name="q", number=1, ack_deadline_ms=5_000)
    )
    assert [e.element for e in pulled.element_info] == ["c"]
    (c,) = pulled.element_info
    assert before <= c.enqueued_at_ms <= added
    assert asked + 5_000 <= c.lease_expires_at_ms <= now_ms() + 5_000
    queue_default = stub.Poll(pb.PollRequest(token=token, queue_name="timed"))
    assert asked + 60_000 <= queue_default.lease_expires_at_ms <= now_ms() + 60_000
    stream = Opened(stub, token, "q", max_unacked=5, ack_deadline_ms=2_000)
    (d,) = stream.next().element_info
    assert d.element == "d"
    assert asked + 2_000 <= d.lease_expires_at_ms <= now_ms() + 2_000
    assert before <= d.enqueued_at_ms <= added
    stream.close()


@pytest.mark.parametrize("deadline", [0, -1, 999, 12 * HOUR_MS + 1])
def test_ack_deadline_of_a_call_out_of_bounds(stub: Stub, token: str, deadline: int) -> None:
    new_queue(stub, token, "q")
    stub.Add(pb.AddRequest(token=token, queue_name="q", element="x"))
    replies: list[Any] = [
        stub.Poll(pb.PollRequest(token=token, queue_name="q", ack_deadline_ms=deadline)),
        stub.PullElements(
            pb.PullElementsRequest(token=token, queue_name="q", number=1, ack_deadline_ms=deadline)
        ),
        Opened(stub, token, "q", max_unacked=1, ack_deadline_ms=deadline).next(),
    ]
    for reply in replies:
        assert reply.code == pb.CODE_INVALID_ARGUMENT
        assert "ack_deadline_ms" in reply.message
    assert (info(stub, token, "q").ready, info(stub, token, "q").in_flight) == (1, 0)


# Purge ---------------------------------------------------------------------------------


def test_purge_removes_ready_and_delayed_but_not_in_flight(stub: Stub, token: str) -> None:
    new_queue(stub, token, "q")
    stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["a", "b", "c"]))
    stub.Add(pb.AddRequest(token=token, queue_name="q", element="later", delay_ms=600_000))
    held = stub.Poll(pb.PollRequest(token=token, queue_name="q"))
    purged = stub.Purge(pb.PurgeRequest(token=token, queue_name="q"))
    assert (purged.code, purged.purged) == (pb.CODE_OK, 3)
    got = info(stub, token, "q")
    assert (got.ready, got.delayed, got.in_flight) == (0, 0, 1)
    assert stub.Ack(pb.AckRequest(token=token, message_id=held.message_id)).code == pb.CODE_OK
    again = stub.Purge(pb.PurgeRequest(token=token, queue_name="q"))
    assert (again.code, again.purged) == (pb.CODE_OK, 0)
    missing = stub.Purge(pb.PurgeRequest(token=token, queue_name="nope"))
    assert missing.code == pb.CODE_QUEUE_NOT_FOUND


def test_a_waiting_poll_outlives_a_purge(stub: Stub, token: str) -> None:
    new_queue(stub, token, "q")
    waiting = stub.Poll.future(pb.PollRequest(token=token, queue_name="q", wait_ms=20_000))
    assert stub.Purge(pb.PurgeRequest(token=token, queue_name="q")).purged == 0
    stub.Add(pb.AddRequest(token=token, queue_name="q", element="after"))
    polled = waiting.result(timeout=20)
    assert (polled.code, polled.element) == (pb.CODE_OK, "after")


# Listings ------------------------------------------------------------------------------


def test_list_queues_pages_by_name(stub: Stub, token: str) -> None:
    for name in ("e", "b", "d", "a", "c"):
        new_queue(stub, token, name)
    stub.AddAll(pb.AddAllRequest(token=token, queue_name="b", elements=["1", "2"]))
    stub.Add(pb.AddRequest(token=token, queue_name="b", element="3", delay_ms=600_000))
    stub.Poll(pb.PollRequest(token=token, queue_name="b"))
    pages: list[list[str]] = []
    cursor = ""
    while True:
        reply = stub.ListQueues(pb.ListQueuesRequest(token=token, start_after=cursor, limit=2))
        assert reply.code == pb.CODE_OK, reply.message
        pages.append([q.name for q in reply.queues])
        if not reply.next_start_after:
            break
        assert reply.next_start_after == reply.queues[-1].name
        cursor = reply.next_start_after
    assert pages == [["a", "b"], ["c", "d"], ["e"]]
    first = stub.ListQueues(pb.ListQueuesRequest(token=token, limit=2))
    assert [(q.name, q.ready, q.in_flight, q.delayed) for q in first.queues] == [
        ("a", 0, 0, 0),
        ("b", 1, 1, 1),
    ]
    exact = stub.ListQueues(pb.ListQueuesRequest(token=token, start_after="c", limit=2))
    assert ([q.name for q in exact.queues], exact.next_start_after) == (["d", "e"], "")
    past = stub.ListQueues(pb.ListQueuesRequest(token=token, start_after="z", limit=5))
    assert (past.code, list(past.queues), past.next_start_after) == (pb.CODE_OK, [], "")


@pytest.mark.parametrize("limit", [0, -1, 1001])
def test_listing_limits(stub: Stub, token: str, limit: int) -> None:
    replies: list[Any] = [
        stub.ListQueues(pb.ListQueuesRequest(token=token, limit=limit)),
        stub.ListMaps(pb.ListMapsRequest(token=token, limit=limit)),
    ]
    for reply in replies:
        assert reply.code == pb.CODE_INVALID_ARGUMENT
        assert "limit" in reply.message


def test_list_maps_pages_by_name(stub: Stub, token: str) -> None:
    for name in ("m3", "m1", "m2"):
        stub.MapPut(pb.MapPutRequest(token=token, map=name, key="k", value="v"))
    first = stub.ListMaps(pb.ListMapsRequest(token=token, limit=2))
    assert (first.code, list(first.names), first.next_start_after) == (
        pb.CODE_OK,
        ["m1", "m2"],
        "m2",
    )
    rest = stub.ListMaps(pb.ListMapsRequest(token=token, start_after="m2", limit=2))
    assert (list(rest.names), rest.next_start_after) == (["m3"], "")


def test_listings_show_only_what_the_caller_may_read(
    make_server: Callable[..., ServerHandle],
) -> None:
    server = make_server()
    user_command(server.data_dir, "add", "bob", "--password-stdin", stdin="bob-pw\n")
    with grpc.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        admin = login(stub, "admin", server.admin_password)
        for name in ("a", "jobs.1", "jobs.2", "jobs.3", "k", "z"):
            new_queue(stub, admin, name)
            stub.MapPut(pb.MapPutRequest(token=admin, map=name, key="k", value="v"))
        bob = login(stub, "bob", "bob-pw")
        none = stub.ListQueues(pb.ListQueuesRequest(token=bob, limit=10))
        assert (none.code, list(none.queues), none.next_start_after) == (pb.CODE_OK, [], "")
        assert list(stub.ListMaps(pb.ListMapsRequest(token=bob, limit=10)).names) == []
        user_command(server.data_dir, "grant", "bob", "read", "queue", "jobs.*")
        user_command(server.data_dir, "grant", "bob", "write,manage", "queue", "*")
        user_command(server.data_dir, "grant", "bob", "read", "map", "z")
        bob = login(stub, "bob", "bob-pw")  # a login reloads grants at once
        page = stub.ListQueues(pb.ListQueuesRequest(token=bob, limit=2))
        assert ([q.name for q in page.queues], page.next_start_after) == (
            ["jobs.1", "jobs.2"],
            "jobs.2",
        )
        rest = stub.ListQueues(pb.ListQueuesRequest(token=bob, start_after="jobs.2", limit=2))
        assert ([q.name for q in rest.queues], rest.next_start_after) == (["jobs.3"], "")
        maps = stub.ListMaps(pb.ListMapsRequest(token=bob, limit=10))
        assert (list(maps.names), maps.next_start_after) == (["z"], "")
        unauthenticated = stub.ListQueues(pb.ListQueuesRequest(token="nope", limit=1))
        assert unauthenticated.code == pb.CODE_UNAUTHENTICATED


# Map key cursor ------------------------------------------------------------------------


def map_page(
    stub: Stub, token: str, start_after: str | None, size: int, offset: int = 0
) -> tuple[list[str], str | None]:
    reply = stub.MapGetList(
        pb.MapGetListRequest(
            token=token, map="m", offset=offset, size=size, start_after=start_after
        )
    )
    assert reply.code == pb.CODE_OK, reply.message
    assert (reply.size, reply.offset) == (len(reply.list), offset)
    return [kv.key for kv in reply.list], reply.next_key if reply.HasField("next_key") else None


def test_map_pages_by_key_cursor_stable_while_it_changes(stub: Stub, token: str) -> None:
    keys = ["", *(f"k{i:02}" for i in range(6))]  # the empty key is a key like any other
    pairs = [pb.KeyValue(key=k, value=k.upper()) for k in keys]
    stub.MapBatchPut(pb.MapBatchPutRequest(token=token, map="m", size=len(pairs), list=pairs))
    # The first page comes without a cursor: start_after "" would skip the key "".
    first, cursor = map_page(stub, token, None, 3)
    assert (first, cursor) == (keys[:3], "k01")
    assert map_page(stub, token, "", 3) == (keys[1:4], "k02")
    # Changes meanwhile: a key before the cursor, one removed ahead, one added ahead.
    stub.MapPut(pb.MapPutRequest(token=token, map="m", key="k00a", value="x"))
    stub.MapRemove(pb.MapRemoveRequest(token=token, map="m", key="k03"))
    stub.MapPut(pb.MapPutRequest(token=token, map="m", key="k04a", value="x"))
    second, cursor = map_page(stub, token, cursor, 3)
    assert (second, cursor) == (["k02", "k04", "k04a"], "k04a")
    third, cursor = map_page(stub, token, cursor, 3)
    assert (third, cursor) == (["k05"], None)
    values = stub.MapGetList(pb.MapGetListRequest(token=token, map="m", size=1, start_after="k04"))
    assert [(kv.key, kv.value) for kv in values.list] == [("k04a", "x")]
    # Offset paging stays the seed's, and says where a cursor would go on.
    now = ["", "k00", "k00a", "k01", "k02", "k04", "k04a", "k05"]
    assert map_page(stub, token, None, 2, offset=2) == (now[2:4], "k01")
    assert map_page(stub, token, None, 2, offset=6) == (now[6:], None)
    assert map_page(stub, token, None, 2, offset=8) == ([], None)
    assert map_page(stub, token, None, 8, offset=1) == (now[1:], None)


def test_map_cursor_rules(stub: Stub, token: str) -> None:
    stub.MapPut(pb.MapPutRequest(token=token, map="m", key="k", value="v"))
    mixed = stub.MapGetList(
        pb.MapGetListRequest(token=token, map="m", offset=1, size=1, start_after="")
    )
    assert mixed.code == pb.CODE_INVALID_ARGUMENT
    assert "offset" in mixed.message
    for size in (0, 1001):
        bad = stub.MapGetList(pb.MapGetListRequest(token=token, map="m", size=size, start_after=""))
        assert bad.code == pb.CODE_INVALID_ARGUMENT
        assert "size" in bad.message
    missing = stub.MapGetList(pb.MapGetListRequest(token=token, map="nope", size=1, start_after=""))
    assert missing.code == pb.CODE_MAP_NOT_FOUND
    end = stub.MapGetList(pb.MapGetListRequest(token=token, map="m", size=5, start_after="k"))
    assert (end.code, list(end.list), end.HasField("next_key")) == (pb.CODE_OK, [], False)


# Every new RPC: the token, then the name ---------------------------------------------

NAMED_CALLS: dict[str, Callable[[Stub, str, str], Any]] = {
    "UpdateQueue": lambda stub, token, name: stub.UpdateQueue(
        pb.UpdateQueueRequest(token=token, queue_name=name)
    ),
    "GetQueueInfo": lambda stub, token, name: stub.GetQueueInfo(
        pb.GetQueueInfoRequest(token=token, queue_name=name)
    ),
    "Purge": lambda stub, token, name: stub.Purge(pb.PurgeRequest(token=token, queue_name=name)),
    "Redrive": lambda stub, token, name: stub.Redrive(
        pb.RedriveRequest(token=token, queue_name=name)
    ),
    "ListDeadLetters": lambda stub, token, name: stub.ListDeadLetters(
        pb.ListDeadLettersRequest(token=token, queue_name=name, limit=1)
    ),
}
UNNAMED_CALLS: dict[str, Callable[[Stub, str], Any]] = {
    "ExtendLease": lambda stub, token: stub.ExtendLease(
        pb.ExtendLeaseRequest(token=token, message_ids=[1], ack_deadline_ms=1000)
    ),
    "ListQueues": lambda stub, token: stub.ListQueues(pb.ListQueuesRequest(token=token, limit=1)),
    "ListMaps": lambda stub, token: stub.ListMaps(pb.ListMapsRequest(token=token, limit=1)),
}


def test_every_new_rpc_checks_the_token_then_the_name(stub: Stub, token: str) -> None:
    for name, call in NAMED_CALLS.items():
        assert call(stub, "nope", "q").code == pb.CODE_UNAUTHENTICATED, name
        for bad in ("", "no space", "x" * 256):
            reply = call(stub, token, bad)
            assert reply.code == pb.CODE_INVALID_ARGUMENT, (name, bad)
            assert "queue_name" in reply.message, name
        assert call(stub, token, "missing").code == pb.CODE_QUEUE_NOT_FOUND, name
    for name, unnamed in UNNAMED_CALLS.items():
        assert unnamed(stub, "nope").code == pb.CODE_UNAUTHENTICATED, name
