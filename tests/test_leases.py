"""Leases, dead letters, retry backoff and Redrive through a real server: a late ack is
told apart from an unknown id, a lease moves or is given back, a poison message is parked
after max_deliveries and comes back with Redrive, a failed message waits its backoff,
and a Subscribe stream's window is not stuck by messages that left it another way.

Expiries are awaited, not slept through: another session's long poll receives the
message when its lease runs out."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest
from test_lifecycle_rpcs import Opened, info, new_queue, now_ms
from test_permissions import user_command

from conftest import ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

Stub = pb_grpc.QueueManagerServiceStub
HOUR_MS = 3_600_000
LONG_POLL_MS = 15_000


def poll(stub: Stub, token: str, queue: str, **fields: int) -> pb.PollResponse:
    reply = stub.Poll(pb.PollRequest(token=token, queue_name=queue, **fields))
    assert reply.code == pb.CODE_OK, reply.message
    return reply


def nack(stub: Stub, token: str, message_id: int) -> None:
    reply = stub.Ack(pb.AckRequest(token=token, message_id=message_id, ack_type=pb.ACK_TYPE_ERROR))
    assert reply.code == pb.CODE_OK, reply.message


def extend(stub: Stub, token: str, ids: list[int], deadline: int) -> pb.ExtendLeaseResponse:
    return stub.ExtendLease(
        pb.ExtendLeaseRequest(token=token, message_ids=ids, ack_deadline_ms=deadline)
    )


@pytest.fixture
def other(server: ServerHandle, stub: Stub) -> str:
    """A second session of the admin: the consumer that gets what the first lost."""
    return login(stub, "admin", server.admin_password)


# Leases --------------------------------------------------------------------------------


def test_a_late_ack_is_lease_expired_and_the_message_goes_to_another(
    stub: Stub, token: str, other: str
) -> None:
    new_queue(stub, token, "q", pb.QueueSettings(ack_deadline_ms=1000))
    stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["a", "b"]))
    first = poll(stub, token, "q")
    held = poll(stub, token, "q", ack_deadline_ms=60_000)  # its own, longer lease
    assert first.lease_expires_at_ms > 0
    again = poll(stub, other, "q", wait_ms=LONG_POLL_MS)  # once the 1 s lease ran out
    assert (again.element, again.message_id, again.delivery_count) == ("a", first.message_id, 2)
    assert now_ms() >= first.lease_expires_at_ms
    late = stub.Ack(pb.AckRequest(token=token, message_id=first.message_id))
    assert late.code == pb.CODE_LEASE_EXPIRED
    assert "lease" in late.message
    batch = stub.BatchAck(
        pb.BatchAckRequest(token=token, message_ids=[first.message_id, held.message_id, 999_999])
    )
    assert batch.code == pb.CODE_OK
    assert [(r.message_id, r.code) for r in batch.results] == [
        (first.message_id, pb.CODE_LEASE_EXPIRED),
        (held.message_id, pb.CODE_OK),
        (999_999, pb.CODE_MESSAGE_NOT_FOUND),
    ]
    # The late acks changed nothing: the new holder acks it.
    assert stub.Ack(pb.AckRequest(token=other, message_id=again.message_id)).code == pb.CODE_OK
    assert (info(stub, token, "q").ready, info(stub, token, "q").in_flight) == (0, 0)


def test_extend_lease_moves_it_and_zero_gives_the_message_back(
    stub: Stub, token: str, other: str
) -> None:
    new_queue(stub, token, "q")
    stub.AddAll(pb.AddAllRequest(token=token, queue_name="q", elements=["a", "b"]))
    a = poll(stub, token, "q", ack_deadline_ms=1000)
    asked = now_ms()
    moved = extend(stub, token, [a.message_id, 999_999], 60_000)
    assert moved.code == pb.CODE_OK, moved.message
    assert [(r.message_id, r.code) for r in moved.results] == [
        (a.message_id, pb.CODE_OK),
        (999_999, pb.CODE_MESSAGE_NOT_FOUND),
    ]
    assert asked + 60_000 <= moved.results[0].lease_expires_at_ms <= now_ms() + 60_000
    assert moved.results[1].lease_expires_at_ms == 0
    # Another session waits past the first lease's end and gets only "b".
    b = poll(stub, other, "q", wait_ms=LONG_POLL_MS)
    assert b.element == "b"
    waited = stub.Poll(pb.PollRequest(token=other, queue_name="q", wait_ms=1500))
    assert waited.code == pb.CODE_QUEUE_EMPTY
    assert now_ms() > a.lease_expires_at_ms  # the first lease would have run out
    # Someone else's message: not found, and its lease stays.
    theirs = extend(stub, token, [b.message_id], 0)
    assert [(r.message_id, r.code) for r in theirs.results] == [
        (b.message_id, pb.CODE_MESSAGE_NOT_FOUND)
    ]
    given = extend(stub, token, [a.message_id], 0)
    assert [(r.code, r.lease_expires_at_ms) for r in given.results] == [(pb.CODE_OK, 0)]
    back = poll(stub, other, "q")
    assert (back.message_id, back.delivery_count) == (a.message_id, 2)
    gone = extend(stub, token, [a.message_id], 60_000)
    assert [r.code for r in gone.results] == [pb.CODE_MESSAGE_NOT_FOUND]


def test_extend_lease_after_expiry_is_lease_expired(stub: Stub, token: str, other: str) -> None:
    new_queue(stub, token, "q")
    stub.Add(pb.AddRequest(token=token, queue_name="q", element="a"))
    a = poll(stub, token, "q", ack_deadline_ms=1000)
    assert poll(stub, other, "q", wait_ms=LONG_POLL_MS).message_id == a.message_id
    late = extend(stub, token, [a.message_id], 60_000)
    assert [(r.code, r.lease_expires_at_ms) for r in late.results] == [(pb.CODE_LEASE_EXPIRED, 0)]


@pytest.mark.parametrize(
    ("ids", "deadline", "field"),
    [
        ([], 1000, "message_ids"),
        ([1, 2, 1], 1000, "message_ids"),
        (list(range(1, 1002)), 1000, "message_ids"),
        ([1], -1, "ack_deadline_ms"),
        ([1], 999, "ack_deadline_ms"),
        ([1], 12 * HOUR_MS + 1, "ack_deadline_ms"),
    ],
)
def test_extend_lease_arguments(
    stub: Stub, token: str, ids: list[int], deadline: int, field: str
) -> None:
    reply = extend(stub, token, ids, deadline)
    assert reply.code == pb.CODE_INVALID_ARGUMENT
    assert field in reply.message
    assert list(reply.results) == []


def test_extend_lease_needs_a_session(stub: Stub) -> None:
    reply = extend(stub, "nope", [1], 1000)
    assert reply.code == pb.CODE_UNAUTHENTICATED


# Dead letters and backoff --------------------------------------------------------------


def dead_letter_setup(stub: Stub, token: str, max_deliveries: int = 2) -> None:
    new_queue(stub, token, "jobs.dead")
    new_queue(
        stub,
        token,
        "jobs",
        pb.QueueSettings(max_deliveries=max_deliveries, dead_letter_queue="jobs.dead"),
    )


def test_poison_message_is_dead_lettered_after_max_deliveries_and_redriven(
    stub: Stub, token: str
) -> None:
    dead_letter_setup(stub, token)
    before = now_ms()
    poison = stub.Add(pb.AddRequest(token=token, queue_name="jobs", element="poison")).message_id
    stub.Add(pb.AddRequest(token=token, queue_name="jobs", element="fine"))
    for delivery in (1, 2):
        got = poll(stub, token, "jobs")
        assert (got.message_id, got.delivery_count) == (poison, delivery)
        nack(stub, token, poison)
    # Past max_deliveries: moved, and the message behind it is seen.
    nxt = poll(stub, token, "jobs")
    assert nxt.element == "fine"
    jobs = info(stub, token, "jobs")
    dead = info(stub, token, "jobs.dead")
    assert (jobs.dead_lettered, dead.dead_letters_held, dead.ready) == (1, 1, 1)
    listed = stub.ListDeadLetters(
        pb.ListDeadLettersRequest(token=token, queue_name="jobs.dead", limit=10)
    )
    assert listed.code == pb.CODE_OK, listed.message
    (letter,) = listed.dead_letters
    assert (letter.message_id, letter.original_queue, letter.delivery_count) == (
        poison,
        "jobs",
        2,
    )
    assert (letter.cause, letter.element, listed.next_after_id) == (
        "max_deliveries after ack error",
        "poison",
        0,
    )
    assert before <= letter.enqueued_at_ms <= letter.dead_lettered_at_ms <= now_ms()
    redriven = stub.Redrive(pb.RedriveRequest(token=token, queue_name="jobs.dead"))
    assert (redriven.code, redriven.moved, list(redriven.results)) == (pb.CODE_OK, 1, [])
    back = poll(stub, token, "jobs")
    assert (back.message_id, back.element, back.delivery_count) == (poison, "poison", 3)
    empty = stub.ListDeadLetters(
        pb.ListDeadLettersRequest(token=token, queue_name="jobs.dead", limit=10)
    )
    assert (empty.code, list(empty.dead_letters), empty.next_after_id) == (pb.CODE_OK, [], 0)


def test_dead_letters_page_by_id_and_redrive_by_id(
    make_server: Callable[..., ServerHandle],
) -> None:
    server = make_server()
    user_command(server.data_dir, "add", "bob", "--password-stdin", stdin="bob-pw\n")
    with grpc.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        token = login(stub, "admin", server.admin_password)
        dead_letter_setup(stub, token, max_deliveries=1)
        new_queue(
            stub, token, "other", pb.QueueSettings(max_deliveries=1, dead_letter_queue="jobs.dead")
        )
        ids = list(
            stub.AddAll(
                pb.AddAllRequest(token=token, queue_name="jobs", elements=["a", "b", "c"])
            ).message_ids
        )
        (from_other,) = stub.AddAll(
            pb.AddAllRequest(token=token, queue_name="other", elements=["o"])
        ).message_ids
        for queue in ("jobs", "jobs", "jobs", "other"):
            nack(stub, token, poll(stub, token, queue).message_id)
        every = [*ids, from_other]
        pages: list[list[int]] = []
        after = 0
        while True:
            page = stub.ListDeadLetters(
                pb.ListDeadLettersRequest(
                    token=token, queue_name="jobs.dead", after_id=after, limit=3
                )
            )
            assert page.code == pb.CODE_OK, page.message
            pages.append([d.message_id for d in page.dead_letters])
            if not page.next_after_id:
                break
            after = page.next_after_id
        assert pages == [every[:3], every[3:]]
        # bob may manage the dead-letter queue and write "jobs", not "other".
        user_command(server.data_dir, "grant", "bob", "manage,read", "queue", "jobs.dead")
        user_command(server.data_dir, "grant", "bob", "write", "queue", "jobs")
        bob = login(stub, "bob", "bob-pw")
        reply = stub.Redrive(
            pb.RedriveRequest(
                token=bob, queue_name="jobs.dead", message_ids=[ids[1], from_other, 999_999]
            )
        )
        assert (reply.code, reply.moved) == (pb.CODE_OK, 1), reply.message
        assert [(r.message_id, r.code) for r in reply.results] == [
            (ids[1], pb.CODE_OK),
            (from_other, pb.CODE_PERMISSION_DENIED),
            (999_999, pb.CODE_MESSAGE_NOT_FOUND),
        ]
        assert poll(stub, token, "jobs").message_id == ids[1]
        # An original queue that is gone keeps its dead letters where they are.
        stub.DestroyQueue(pb.DestroyQueueRequest(token=token, queue_name="other", force=True))
        rest = stub.Redrive(pb.RedriveRequest(token=token, queue_name="jobs.dead"))
        assert (rest.code, rest.moved) == (pb.CODE_OK, 2)
        assert [(r.message_id, r.code) for r in rest.results] == [
            (from_other, pb.CODE_QUEUE_NOT_FOUND)
        ]
        left = stub.ListDeadLetters(
            pb.ListDeadLettersRequest(token=token, queue_name="jobs.dead", limit=10)
        )
        assert [d.message_id for d in left.dead_letters] == [from_other]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": 1, "after_id": -1}, "after_id"),
    ],
)
def test_list_dead_letters_arguments(
    stub: Stub, token: str, request_fields: dict[str, int], field: str
) -> None:
    new_queue(stub, token, "q")
    reply = stub.ListDeadLetters(
        pb.ListDeadLettersRequest(token=token, queue_name="q", **request_fields)
    )
    assert reply.code == pb.CODE_INVALID_ARGUMENT
    assert field in reply.message
    missing = stub.ListDeadLetters(
        pb.ListDeadLettersRequest(token=token, queue_name="nope", limit=1)
    )
    assert missing.code == pb.CODE_QUEUE_NOT_FOUND


def test_redrive_arguments(stub: Stub, token: str) -> None:
    new_queue(stub, token, "q")
    for ids in ([1, 1], list(range(1, 1002))):
        reply = stub.Redrive(pb.RedriveRequest(token=token, queue_name="q", message_ids=ids))
        assert reply.code == pb.CODE_INVALID_ARGUMENT
        assert "message_ids" in reply.message
    missing = stub.Redrive(pb.RedriveRequest(token=token, queue_name="nope"))
    assert missing.code == pb.CODE_QUEUE_NOT_FOUND
    nothing = stub.Redrive(pb.RedriveRequest(token=token, queue_name="q"))
    assert (nothing.code, nothing.moved, list(nothing.results)) == (pb.CODE_OK, 0, [])


def test_retry_backoff_delays_a_failed_message(stub: Stub, token: str) -> None:
    new_queue(stub, token, "q", pb.QueueSettings(retry_delay=pb.RetryPolicy(initial_delay_ms=1000)))
    stub.Add(pb.AddRequest(token=token, queue_name="q", element="flaky"))
    got = poll(stub, token, "q")
    nack(stub, token, got.message_id)
    nacked = time.monotonic()
    assert stub.Poll(pb.PollRequest(token=token, queue_name="q")).code == pb.CODE_QUEUE_EMPTY
    assert (info(stub, token, "q").ready, info(stub, token, "q").delayed) == (0, 1)
    again = poll(stub, token, "q", wait_ms=LONG_POLL_MS)
    assert time.monotonic() - nacked >= 0.9  # the backoff, not the next add, woke it
    assert (again.message_id, again.delivery_count) == (got.message_id, 2)


def test_lease_expiry_dead_letters_past_max_deliveries(stub: Stub, token: str, other: str) -> None:
    dead_letter_setup(stub, token, max_deliveries=1)
    (message_id,) = stub.AddAll(
        pb.AddAllRequest(token=token, queue_name="jobs", elements=["slow"])
    ).message_ids
    poll(stub, token, "jobs", ack_deadline_ms=1000)
    moved = poll(stub, other, "jobs.dead", wait_ms=LONG_POLL_MS)  # a DLQ is a queue
    assert (moved.message_id, moved.element) == (message_id, "slow")
    late = stub.Ack(pb.AckRequest(token=token, message_id=message_id))
    assert late.code == pb.CODE_LEASE_EXPIRED
    listed = stub.ListDeadLetters(
        pb.ListDeadLettersRequest(token=token, queue_name="jobs.dead", limit=1)
    )
    assert [d.cause for d in listed.dead_letters] == ["max_deliveries after lease expiry"]


# Streams -------------------------------------------------------------------------------


def test_a_stream_drops_an_expired_message_from_its_window(
    stub: Stub, token: str, other: str
) -> None:
    new_queue(stub, token, "q")
    stub.Add(pb.AddRequest(token=token, queue_name="q", element="a"))
    stream = Opened(stub, token, "q", max_unacked=1, ack_deadline_ms=1000)
    (a,) = stream.next().element_info
    assert a.lease_expires_at_ms > 0
    taken = poll(stub, other, "q", wait_ms=LONG_POLL_MS)  # its lease ran out
    assert (taken.message_id, taken.delivery_count) == (a.message_id, 2)
    stream.ack([a.message_id])
    answer = stream.next()
    assert [(r.message_id, r.code) for r in answer.ack_results] == [
        (a.message_id, pb.CODE_LEASE_EXPIRED)
    ]
    stub.Add(pb.AddRequest(token=token, queue_name="q", element="b"))
    pushed = stream.next()  # the window has room again
    assert [e.element for e in pushed.element_info] == ["b"]
    stream.close()


@pytest.mark.parametrize("how", ["Ack", "BatchAck", "ExtendLease 0"])
def test_a_message_finished_outside_its_stream_leaves_the_window(
    stub: Stub, token: str, how: str
) -> None:
    new_queue(stub, token, "q")
    stub.Add(pb.AddRequest(token=token, queue_name="q", element="a"))
    stream = Opened(stub, token, "q", max_unacked=1)
    (a,) = stream.next().element_info
    if how == "Ack":
        assert stub.Ack(pb.AckRequest(token=token, message_id=a.message_id)).code == pb.CODE_OK
    elif how == "BatchAck":
        batch = stub.BatchAck(pb.BatchAckRequest(token=token, message_ids=[a.message_id]))
        assert [r.code for r in batch.results] == [pb.CODE_OK]
    else:
        given = extend(stub, token, [a.message_id], 0)
        assert [r.code for r in given.results] == [pb.CODE_OK]
    stub.Add(pb.AddRequest(token=token, queue_name="q", element="b"))
    pushed = [e.element for e in stream.next().element_info]
    # Given back, "a" is ready again before "b"; acked, only "b" is left.
    assert pushed == (["a"] if how == "ExtendLease 0" else ["b"])
    stream.close()
