"""How many bytes an answer takes on the wire, counted before it is built.

A client with gRPC's default settings drops any answer over 4 MiB (RESOURCE_EXHAUSTED on
its side), after the server has done the work: for PullElements or a Subscribe push that
means messages put in flight for a session that never saw them. So the server sizes each
answer with the protobuf encoding itself (field tags, length prefixes, ids, counts, the
answer's own fields, the gRPC frame) and stops adding entries before the limit, instead of
counting payload bytes only, which let a few maximum-size elements overshoot by a few
bytes. tests/test_answer_size.py checks these formulas against the protobuf library.
"""

from __future__ import annotations

# gRPC's length-prefixed message: a compressed flag and a 4-byte length.
FRAME_BYTES = 5
# The answer's own fields besides its entries: code and message (empty on success),
# number, offset and size (int32 varints): a few dozen bytes at most.
ENVELOPE_BYTES = 64
# One AckResult of a Subscribe answer: tag and length, message_id (up to a 10-byte
# varint) and code, with their tags.
ACK_RESULT_BYTES = 16
# An entry's bytes beyond its strings' UTF-8 bytes, at most: the entry's tag and length,
# two string tags and lengths (or, for ElementInfo, one string and four int64 fields with
# their tags: id, delivery count, enqueue time, lease end), for strings shorter than
# 2**35 bytes.
MAX_ENTRY_OVERHEAD = 1 + 5 + 1 + 5 + 4 * 11


def varint_size(value: int) -> int:
    """Bytes of a protobuf varint; a negative int64 takes 10."""
    if value < 0:
        return 10
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def _field(size: int) -> int:
    """A length-delimited field of `size` bytes with a one-byte tag (field number < 16)."""
    return 1 + varint_size(size) + size


def element_info_size(
    element_bytes: int,
    message_id: int,
    delivery_count: int,
    enqueued_at_ms: int = 0,
    lease_expires_at_ms: int = 0,
) -> int:
    """One ElementInfo in a repeated field: what it adds to PullElements or Subscribe.
    A delivery's times (Unix ms, about 7 bytes each with their tags) count too: a
    thousand entries that leave them out would overshoot by some 14 KB."""
    inner = _field(element_bytes) if element_bytes else 0
    for number in (message_id, delivery_count, enqueued_at_ms, lease_expires_at_ms):
        if number:
            inner += 1 + varint_size(number)
    return _field(inner)


def key_value_size(key_bytes: int, value_bytes: int) -> int:
    """One KeyValue of MapGetList, or one entry of MapGetAll's map field: the map entry
    always carries both fields, the KeyValue omits empty ones, so this is exact for the
    first and at most 3 bytes over for the second."""
    return _field(_field(key_bytes) + _field(value_bytes))


def entries_room(max_answer_bytes: int) -> int:
    """The bytes an answer's repeated entries may take so that, frame and envelope
    included, it stays within max_answer_bytes."""
    return max_answer_bytes - FRAME_BYTES - ENVELOPE_BYTES
