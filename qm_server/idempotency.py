"""What makes an Add or AddAll repeatable (AIP-155): the key the store remembers.

A request_id alone would let a client that reuses one for another request get the first
request's ids back for something it never added. So the key also carries a fingerprint
of what was asked (the queue and the elements), and the store tells a reused id apart
(InvalidArgument). Each part is length-prefixed before it is hashed: ("ab", "c") and
("a", "bc") must not collide, nor the queue name run into the first element.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from qm_server.lifecycle import check_request_id
from qm_server.store.base import IdempotencyKey


def fingerprint(queue: str, elements: Sequence[str]) -> bytes:
    """SHA-256 over the queue name and the elements, each preceded by its UTF-8 length."""
    digest = hashlib.sha256()
    for part in (queue, *elements):
        data = part.encode()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.digest()


def idempotency_key(
    user: str, request_id: str, queue: str, elements: Sequence[str]
) -> IdempotencyKey | None:
    """The key of an add, or None without a request_id (no deduplication).
    InvalidArgument for a request_id over its length limit."""
    if not request_id:
        return None
    check_request_id(request_id)
    return IdempotencyKey(user, request_id, fingerprint(queue, elements))
