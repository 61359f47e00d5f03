"""Pages of listings: how a page is cut, and where the next one starts.

A listing asks its store for one entry more than the page holds: that entry's presence
says whether another page follows, without a second query. Dead letters and map entries
carry texts of up to the element size limit, so their pages are also cut to what one
answer can carry (answer_size.py), as PullElements is; a page so cut may be followed by
an empty one, never by a silently shortened listing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from qm_server.answer_size import key_value_size, varint_size
from qm_server.store.base import DeadLetter

T = TypeVar("T")


def one_page(entries: Sequence[T], limit: int) -> tuple[list[T], bool]:
    """The first `limit` of entries fetched with a limit of `limit + 1`, and whether
    more follow."""
    return list(entries[:limit]), len(entries) > limit


def _field(size: int) -> int:
    """A length-delimited field of `size` bytes with a one-byte tag (field number < 16)."""
    return 1 + varint_size(size) + size


def _number(value: int) -> int:
    """An int64 field with a one-byte tag; 0 is not sent."""
    return 1 + varint_size(value) if value else 0


def dead_letter_size(letter: DeadLetter) -> int:
    """One DeadLetter in ListDeadLetters' repeated field, exactly as protobuf encodes it."""
    inner = (
        _number(letter.message_id)
        + _number(letter.delivery_count)
        + _number(letter.enqueued_at_ms)
        + _number(letter.dead_lettered_at_ms)
    )
    for text in (letter.original_queue, letter.cause, letter.element):
        if text:
            inner += _field(len(text.encode()))
    return _field(inner)


def dead_letter_page(
    fetched: Sequence[DeadLetter], limit: int, room: int, element_limit: int
) -> tuple[list[DeadLetter], int]:
    """Cut dead letters fetched with a limit of `limit + 1` and `room` bytes of elements
    to a page that fits `room` bytes encoded (the first one always comes), and the
    after_id of the next page (0 when none follows).

    The store stops early once more elements would pass `room`; such a page gets a next
    after_id even when nothing follows, so a reader sees, at worst, an empty last page,
    never a silently shortened listing."""
    page: list[DeadLetter] = []
    used = 0
    for letter in fetched[:limit]:
        size = dead_letter_size(letter)
        if page and used + size > room:
            break
        page.append(letter)
        used += size
    if not page:
        return [], 0
    elements = sum(len(letter.element.encode()) for letter in fetched)
    more = len(page) < len(fetched) or elements + element_limit > room
    return page, page[-1].message_id if more else 0


def offset_page(
    fetched: Sequence[tuple[str, str]], size: int, room: int, element_limit: int
) -> tuple[list[tuple[str, str]], str | None]:
    """A MapGetList page by offset from entries fetched with a size of `size + 1` and
    `room` bytes, and the start_after of the next page (None when none follows)."""
    page = list(fetched[:size])
    if not page:
        return [], None
    if len(fetched) > size:
        return page, page[-1][0]
    used = sum(key_value_size(len(k.encode()), len(v.encode())) for k, v in page)
    cut_by_room = used + key_value_size(element_limit, element_limit) > room
    return page, page[-1][0] if cut_by_room else None
