"""The rows of the PostgreSQL store's claims, made into what the store interface answers.

A claim answers (id, payload, delivery count, enqueued at, lease deadline) rows; a
stream's ack-and-refill (pg_sql.ACK_AND_CLAIM) answers the acked ids, the claimed rows and
whether the queue exists in one result, told apart by the first column.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final, NamedTuple

from qm_server.store.base import Delivery

ACKED: Final = 0
CLAIMED: Final = 1
QUEUE: Final = 2


def deliveries(rows: Iterable[tuple[Any, ...]]) -> list[Delivery]:
    """Claimed rows, oldest first, as deliveries (payloads are UTF-8 bytes)."""
    return [
        Delivery(int(i), bytes(p).decode(), int(n), int(e), int(d))
        for i, p, n, e, d in sorted(rows)
    ]


class AckedAndClaimed(NamedTuple):
    acked: set[int]
    claimed: list[Delivery]
    queue_exists: bool


def split(rows: Iterable[Sequence[Any]]) -> AckedAndClaimed:
    """ACK_AND_CLAIM's rows: (kind, id, payload, delivery count, enqueued at, deadline)."""
    acked: set[int] = set()
    claimed: list[tuple[Any, ...]] = []
    exists = False
    for kind, *row in rows:
        if kind == ACKED:
            acked.add(int(row[0]))
        elif kind == CLAIMED:
            claimed.append(tuple(row))
        else:
            exists = int(row[0]) > 0
    return AckedAndClaimed(acked, deliveries(claimed), exists)
