"""Where a listing's next page starts (qm_server/pages.py): one entry fetched past the
page says that another follows; a page cut by its answer's room may be followed by an
empty one, but a listing is never cut short silently."""

from __future__ import annotations

from qm.v1 import queue_manager_pb2 as pb
from qm_server.pages import dead_letter_page, dead_letter_size, offset_page, one_page
from qm_server.store.base import DeadLetter


def letter(message_id: int, element: str = "e") -> DeadLetter:
    return DeadLetter(
        message_id, "jobs", 3, 1_700_000_000_000, 1_700_000_100_000, "max_age", element
    )


def test_dead_letter_size_is_the_protobuf_encoding() -> None:
    letters = [letter(1), letter(2**40, "é" * 300), DeadLetter(5, "", 0, 0, 0, "", "")]
    answer = pb.ListDeadLettersResponse()
    for d in letters:
        answer.dead_letters.add(
            message_id=d.message_id,
            original_queue=d.original_queue,
            delivery_count=d.delivery_count,
            enqueued_at_ms=d.enqueued_at_ms,
            dead_lettered_at_ms=d.dead_lettered_at_ms,
            cause=d.cause,
            element=d.element,
        )
    assert answer.ByteSize() == sum(dead_letter_size(d) for d in letters)


def test_one_page() -> None:
    assert one_page([1, 2, 3], 2) == ([1, 2], True)
    assert one_page([1, 2], 2) == ([1, 2], False)
    assert one_page([], 2) == ([], False)


def test_dead_letter_pages() -> None:
    room = 10_000
    three = [letter(1), letter(2), letter(3)]
    assert dead_letter_page(three, 2, room, 100) == (three[:2], 2)  # one more was there
    assert dead_letter_page(three[:2], 2, room, 100) == (three[:2], 0)  # the end
    assert dead_letter_page([], 2, room, 100) == ([], 0)
    # Near the room, the store may have stopped for bytes: the next page is asked for.
    assert dead_letter_page(three[:2], 5, room, room) == (three[:2], 2)
    # Cut to what the answer carries; the first always comes.
    big = [letter(1, "x" * 6000), letter(2, "y" * 6000)]
    assert dead_letter_page(big, 5, room, 6000) == (big[:1], 1)
    huge = [letter(1, "x" * 20_000)]
    assert dead_letter_page(huge, 5, room, 20_000) == (huge, 1)


def test_offset_pages() -> None:
    room = 10_000
    entries = [("a", "1"), ("b", "2"), ("c", "3")]
    assert offset_page(entries, 2, room, 100) == (entries[:2], "b")
    assert offset_page(entries[:2], 2, room, 100) == (entries[:2], None)
    assert offset_page([], 2, room, 100) == ([], None)
    assert offset_page(entries[:2], 5, room, room) == (entries[:2], "b")  # maybe cut
