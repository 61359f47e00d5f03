"""The writer's in-memory index of the SQLite store, and how it is rebuilt from the file.

The writer keeps queue ids and counts, map ids, the next message id and each queue's
delivery mark in memory, so that limits and existence checks cost no query and payloads
stay on disk. The index includes the open transaction's effects; when a transaction fails,
it is rebuilt from the committed file and the in-flight map (load_index).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass, field

from qm_server.lifecycle import DEFAULT_SETTINGS, QueueSettings
from qm_server.store import sqlite_sql as sql
from qm_server.store.inflight import InFlight
from qm_server.store.settings_json import settings_from_json


@dataclass(slots=True)
class QueueState:
    id: int
    sql: sql.MessageStatements
    ready: int = 0
    # Every id at or below it was delivered at least once (saved with each claim).
    delivered_upto: int = 0
    # A heap of ready ids at or below delivered_upto: given back by a negative ack or a
    # session's end, or in flight when the last process stopped. Older than every id
    # above the mark, so claims take these first.
    given_back: list[int] = field(default_factory=list)
    owner: str | None = None  # who created it; None for queues made before owners were kept
    # Its lifecycle settings (lifecycle.py), as committed or staged in the open transaction.
    settings: QueueSettings = DEFAULT_SETTINGS


@dataclass(slots=True)
class Index:
    """The writer's view, including the open transaction's effects."""

    queues: dict[str, QueueState] = field(default_factory=dict)
    queue_names: dict[int, str] = field(default_factory=dict)
    maps: dict[str, int] = field(default_factory=dict)
    map_owners: dict[str, str | None] = field(default_factory=dict)
    # Queues and maps per creator, for the per-user quotas.
    owned_queues: Counter[str] = field(default_factory=Counter)
    owned_maps: Counter[str] = field(default_factory=Counter)
    next_message_id: int = 1


def load_index(conn: sqlite3.Connection, in_flight: InFlight) -> Index:
    """The index of the committed file and the in-flight map (at start, and after a
    failed transaction, whose in-flight changes were already undone)."""
    index = Index()
    # The next id: after the largest ever handed out, even if that row is gone.
    (saved_next_id,) = conn.execute(sql.SAVED_NEXT_MESSAGE_ID).fetchone() or (1,)
    index.next_message_id = int(saved_next_id)
    for queue_id, name, delivered_upto, owner, settings in conn.execute(sql.ALL_QUEUES).fetchall():
        statements = sql.MessageStatements.of(queue_id)
        held = in_flight.held_in(queue_id)
        delivered = conn.execute(statements.delivered_ids, (delivered_upto,))
        given_back = [m for (m,) in delivered if m not in held]  # ascending: a heap
        (count,) = conn.execute(statements.count).fetchone()
        ready = count - in_flight.count(queue_id)
        state = QueueState(queue_id, statements, ready, delivered_upto, given_back, owner)
        state.settings = settings_from_json(settings)
        if owner:
            index.owned_queues[owner] += 1
        index.queues[name] = state
        index.queue_names[queue_id] = name
        (newest,) = conn.execute(statements.max_id).fetchone()
        index.next_message_id = max(index.next_message_id, (newest or 0) + 1)
    for map_id, name, owner in conn.execute(sql.ALL_MAPS):
        index.maps[name] = map_id
        index.map_owners[name] = owner
        if owner:
            index.owned_maps[owner] += 1
    return index


def disown(owned: Counter[str], owner: str | None) -> None:
    """One queue or map fewer for its creator."""
    if owner:
        owned[owner] -= 1
        if owned[owner] <= 0:
            del owned[owner]
