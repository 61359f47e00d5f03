"""The writer's in-memory index of the SQLite store, and how it is rebuilt from the file.

The writer keeps queue ids and counts, map ids, the next message id and each queue's
delivery mark in memory, so that limits and existence checks cost no query and payloads
stay on disk. The index includes the open transaction's effects; when a transaction fails,
it is rebuilt from the committed file and the in-flight map (load_index).
"""

from __future__ import annotations

import heapq
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
    # Waiting in the `delayed` table (a delayed add or a retry backoff).
    delayed: int = 0
    # Dead letters this queue holds (rows of `dead_letters` naming it).
    dead_letters: int = 0
    # When its oldest ready message passes max_age (ms); 0: no check scheduled.
    age_due_ms: int = 0


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
    # The earliest ready_at in the `delayed` table (ms); 0 when it is empty.
    next_delayed_ms: int = 0
    # (due ms, queue id) of max_age checks; an entry not matching its queue's age_due_ms
    # is stale and skipped (sqlite_due.py).
    age_checks: list[tuple[int, int]] = field(default_factory=list)

    def schedule_age_check(self, state: QueueState, due_ms: int) -> None:
        """Check the queue's max_age at `due_ms` at the latest (call after its max_age
        changed, or when older messages became ready)."""
        if not state.settings.max_age_ms:
            return
        if state.age_due_ms == 0 or due_ms < state.age_due_ms:
            state.age_due_ms = due_ms
            heapq.heappush(self.age_checks, (due_ms, state.id))

    def next_age_check(self) -> int:
        """The earliest scheduled max_age check (ms); 0 for none."""
        checks = self.age_checks
        while checks:
            due, queue_id = checks[0]
            name = self.queue_names.get(queue_id)
            state = self.queues.get(name) if name is not None else None
            if state is not None and state.age_due_ms == due and state.settings.max_age_ms:
                return due
            heapq.heappop(checks)
        return 0


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
    for queue_id, count in conn.execute(sql.DELAYED_COUNTS):
        index.queues[index.queue_names[queue_id]].delayed = count
    for queue_id, count in conn.execute(sql.HELD_DEAD_LETTER_COUNTS):
        index.queues[index.queue_names[queue_id]].dead_letters = count
    (index.next_delayed_ms,) = conn.execute(sql.NEXT_DELAYED).fetchone()
    index.next_delayed_ms = index.next_delayed_ms or 0
    (newest_delayed,) = conn.execute(sql.MAX_DELAYED_ID).fetchone()
    index.next_message_id = max(index.next_message_id, (newest_delayed or 0) + 1)
    for state in index.queues.values():
        index.schedule_age_check(state, 1)  # at the first run_due: ages went on meanwhile
    for map_id, name, owner in conn.execute(sql.ALL_MAPS):
        index.maps[name] = map_id
        index.map_owners[name] = owner
        if owner:
            index.owned_maps[owner] += 1
    return index


def oldest_ready(conn: sqlite3.Connection, state: QueueState) -> int:
    """The first add of the queue's oldest ready message (the smallest ready id: ids
    follow first add times, sqlite_due.py says why); 0 when none is ready. At most two
    index lookups, whatever the queue's length: the writer runs it for each queue a
    commit touched, so that the published counts carry it (metrics)."""
    if not state.ready:
        return 0
    times = []
    if state.given_back:
        row = conn.execute(state.sql.enqueued_at, (state.given_back[0],)).fetchone()
        times.append(row[0])
    row = conn.execute(state.sql.first_undelivered, (state.delivered_upto,)).fetchone()
    if row is not None:
        times.append(row[0])
    return min(times) if times else 0


def disown(owned: Counter[str], owner: str | None) -> None:
    """One queue or map fewer for its creator."""
    if owner:
        owned[owner] -= 1
        if owned[owner] <= 0:
            del owned[owner]
