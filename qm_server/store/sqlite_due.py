"""Messages that move: delays and retry backoff, dead letters, max_age, purge, redrive.

Where a message waits that is not ready: a delayed add, or one waiting out its retry
backoff, is a row of the `delayed` table, not of its queue's messages table. A claim
walks the messages table from the queue's mark in id order (sqlite_sql.MessageStatements)
and would otherwise step over every waiting row above the mark on every claim: a queue
holding a million delayed messages would make each claim of a ready one read them. In a
table of their own they cost a claim nothing; the store finds the due ones through the
`delayed_due` index on ready_at and keeps only the earliest ready_at in memory
(Index.next_delayed_ms). A backoff moves the row out of its queue (one DELETE, one
INSERT) and a due message moves back, at its place (its id): ready again, it is taken
before younger messages.

Dead letters keep their id and their row moves to the dead-letter queue's messages table,
where it is an ordinary ready message; its history (original queue, deliveries, when and
why) is a row of `dead_letters`, dropped when the message is acked or redriven.

max_age: the ids of one clock's adds increase with their first add time, and every move
keeps both, so a queue's oldest messages are its smallest ids: an age check walks from
the smallest id and stops at the first ready message still young, and schedules the
next check for when that one grows old (Index.age_checks). A message is aged out only
while ready: in flight it is its holder's, and delayed it is checked once due. A wall
clock set back may delay an age-out until the messages ahead of it age out.

Everything here runs on the writer thread, inside the transaction the writer opened; the
in-memory changes (Index, InFlight's journal) are undone with it when it fails.
"""

from __future__ import annotations

import heapq
import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qm_server.errors import Code
from qm_server.lifecycle import CAUSE_MAX_AGE
from qm_server.store import sqlite_sql as sql
from qm_server.store.inflight import InFlight
from qm_server.store.sqlite_index import Index, QueueState
from qm_server.store.sqlite_staging import Batch, begin

# How many due delayed messages one statement moves (run_due loops until none is left).
DUE_CHUNK = 1000

# (id, deliveries so far, payload, first add time)
Row = tuple[int, int, str, int]


@dataclass(slots=True)
class Moves:
    """One transaction's view: the connection, the index, the staged batch, the in-flight
    map, and the store's clock as the transaction runs."""

    conn: sqlite3.Connection
    index: Index
    batch: Batch
    in_flight: InFlight
    now_ms: int

    # Releases ------------------------------------------------------------------------------

    def release(self, queue_id: int, ids: list[int], cause: str, backoff: bool) -> None:
        """Messages no longer in flight and not done: ready again at their place, after
        the queue's retry backoff if `backoff` (an ack error), or dead-lettered with
        `cause` when their deliveries reached max_deliveries and the dead-letter queue
        exists (else they stay: never lost)."""
        state = self.state(queue_id)
        settings = state.settings
        dead_letter_queue = self._dead_letter_queue(state) if settings.max_deliveries else None
        waits = backoff and settings.retry.initial_delay_ms > 0
        if dead_letter_queue is None and not waits:
            self.give_back(state, ids)
            return
        dead: list[Row] = []
        delayed: list[tuple[Row, int]] = []
        back: list[int] = []
        for row in self.read_rows(state, ids):
            count = row[1]
            if dead_letter_queue is not None and count >= settings.max_deliveries:
                dead.append(row)
            elif waits and (wait := settings.retry.delay_ms(count)) > 0:
                delayed.append((row, self.now_ms + wait))
            else:
                back.append(row[0])
        self.give_back(state, back)
        if dead and dead_letter_queue is not None:
            self.dead_letter(state, dead_letter_queue, dead, cause, were_ready=False)
        if delayed:
            self._delay(state, delayed)

    def give_back(self, state: QueueState, ids: list[int]) -> None:
        """In-flight messages (all at or below the mark) ready again at their place."""
        if not ids:
            return
        for message_id in ids:
            heapq.heappush(state.given_back, message_id)
        state.ready += len(ids)
        self._now_ready(state)

    # Dead letters --------------------------------------------------------------------------

    def dead_letter(
        self, source: QueueState, target: QueueState, rows: list[Row], cause: str, were_ready: bool
    ) -> None:
        """Move the rows from `source` to the dead-letter queue `target`, ids kept, ready
        there at once, with their history."""
        ids = [row[0] for row in rows]
        self._delete_rows(source, ids, were_ready)
        self._insert_ready(target, rows)
        name = self.name_of(source)
        history = [(i, target.id, name, n, self.now_ms, cause) for i, n, _, _ in rows]
        self.conn.executemany(sql.SAVE_DEAD_LETTER, history)
        target.dead_letters += len(rows)

    def _dead_letter_queue(self, state: QueueState) -> QueueState | None:
        target = self.index.queues.get(state.settings.dead_letter_queue)
        return None if target is None or target is state else target

    # Delays --------------------------------------------------------------------------------

    def add_delayed(
        self, state: QueueState, first_id: int, payloads: list[str], ready_at: int
    ) -> None:
        """A delayed add: waiting in `delayed` until `ready_at` (ms)."""
        begin(self.conn)
        encoded = json.dumps(payloads, ensure_ascii=False)
        if "\\u0000" in encoded:  # json_each would hand NUL back unescaped: row by row
            rows = [
                (first_id + i, state.id, ready_at, 0, self.now_ms, payload)
                for i, payload in enumerate(payloads)
            ]
            self.conn.executemany(sql.INSERT_DELAYED, rows)
        else:
            self.conn.execute(
                sql.INSERT_DELAYED_MANY, (first_id, state.id, ready_at, self.now_ms, encoded)
            )
        state.delayed += len(payloads)
        self._next_delayed(ready_at)
        self.batch.touched.add(self.name_of(state))

    def _delay(self, state: QueueState, waits: list[tuple[Row, int]]) -> None:
        """In-flight messages wait out their backoff in `delayed`."""
        # A dead letter backing off in its dead-letter queue keeps its history.
        self._delete_rows(state, [row[0] for row, _ in waits], were_ready=False, history=False)
        self.conn.executemany(
            sql.INSERT_DELAYED,
            [(i, state.id, at, n, e, p) for (i, n, p, e), at in waits],
        )
        state.delayed += len(waits)
        self._next_delayed(min(at for _, at in waits))
        self.batch.touched.add(self.name_of(state))

    def come_due(self) -> None:
        """Make every delayed message whose time came ready, at its place."""
        if not self.index.next_delayed_ms or self.index.next_delayed_ms > self.now_ms:
            return
        while True:
            rows = self.conn.execute(sql.DUE_DELAYED, (self.now_ms, DUE_CHUNK)).fetchall()
            by_queue: dict[int, list[Row]] = {}
            for message_id, queue_id, count, enqueued_at, payload in rows:
                by_queue.setdefault(queue_id, []).append((message_id, count, payload, enqueued_at))
            for queue_id, moved in by_queue.items():
                state = self.state(queue_id)
                self._insert_ready(state, moved)
                state.delayed -= len(moved)
            if rows:
                self.conn.execute(sql.DELETE_DELAYED_IDS, (json.dumps([r[0] for r in rows]),))
            if len(rows) < DUE_CHUNK:
                break
        (next_due,) = self.conn.execute(sql.NEXT_DELAYED).fetchone()
        self.index.next_delayed_ms = next_due or 0

    def _next_delayed(self, ready_at: int) -> None:
        current = self.index.next_delayed_ms
        if not current or ready_at < current:
            self.index.next_delayed_ms = ready_at

    # max_age -------------------------------------------------------------------------------

    def age_out(self) -> None:
        """Run every max_age check that is due."""
        checks = self.index.age_checks
        checked: set[int] = set()
        while checks and checks[0][0] <= self.now_ms:
            due, queue_id = heapq.heappop(checks)
            name = self.index.queue_names.get(queue_id)
            state = self.index.queues.get(name) if name is not None else None
            if state is None or state.age_due_ms != due or not state.settings.max_age_ms:
                continue  # stale
            state.age_due_ms = 0
            if queue_id in checked:
                # Dead-letter queues that dead-letter into each other by age: one move per
                # max_age, not a loop.
                self.index.schedule_age_check(state, self.now_ms + state.settings.max_age_ms)
                continue
            checked.add(queue_id)
            self._age_out(state)

    def _age_out(self, state: QueueState) -> None:
        max_age = state.settings.max_age_ms
        cutoff = self.now_ms - max_age
        held = self.in_flight.held_in(state.id)
        old: list[int] = []
        young_at = 0
        cursor = self.conn.execute(state.sql.by_age)
        for message_id, enqueued_at in cursor:
            if message_id in held:
                continue  # its holder's until released
            if enqueued_at > cutoff:
                young_at = enqueued_at
                break
            old.append(message_id)
        cursor.close()
        if young_at:
            self.index.schedule_age_check(state, young_at + max_age)
        if not old:
            return
        target = self._dead_letter_queue(state) if state.settings.dead_letter_queue else None
        if target is not None:
            rows = self.read_rows(state, old)
            self.dead_letter(state, target, rows, CAUSE_MAX_AGE, were_ready=True)
        else:
            self._delete_rows(state, old, were_ready=True)
            self.in_flight.forget(old)
            self.batch.deleted_newest = True

    # Purge and redrive ---------------------------------------------------------------------

    def purge(self, state: QueueState) -> int:
        """Delete every ready and delayed message of the queue; how many."""
        held = self.in_flight.held_in(state.id)
        kept = json.dumps(sorted(held))
        self.conn.execute(state.sql.purge, (kept,))
        self.conn.execute(sql.DELETE_QUEUE_DELAYED, (state.id,))
        if state.dead_letters:
            self.conn.execute(sql.PURGE_DEAD_LETTERS, (state.id, kept))
            (state.dead_letters,) = self.conn.execute(
                "SELECT count(*) FROM dead_letters WHERE holder = ?", (state.id,)
            ).fetchone()
        removed = state.ready + state.delayed
        state.ready = 0
        state.delayed = 0
        state.given_back = []
        self.in_flight.forget_queue_except(state.id, set(held))
        self.batch.deleted_newest = True
        self.batch.touched.add(self.name_of(state))
        return removed

    def redrive(
        self,
        holder: QueueState,
        message_ids: Sequence[int] | None,
        may_write: Callable[[str], bool],
    ) -> tuple[int, list[tuple[int, Code]]]:
        """Move dead letters held by `holder` back to their original queues (base.py)."""
        if message_ids is None:
            found = self.conn.execute(sql.HELD_DEAD_LETTERS, (holder.id,)).fetchall()
            wanted = [row[0] for row in found]
        else:
            wanted = list(dict.fromkeys(message_ids))
            found = self.conn.execute(
                sql.HELD_DEAD_LETTERS_OF, (holder.id, json.dumps(wanted))
            ).fetchall()
        origins = dict(found)
        held = self.in_flight.held_in(holder.id)
        present = {row[0]: row for row in self.read_rows(holder, list(origins))}
        # Backing off in the dead-letter queue (an ack error there): still its dead letter.
        waiting = {
            row[0]: row
            for row in self.conn.execute(
                sql.READ_DELAYED_OF,
                (holder.id, json.dumps([m for m in origins if m not in present])),
            )
        }
        present.update(waiting)
        failed: list[tuple[int, Code]] = []
        by_target: dict[str, list[Row]] = {}
        for message_id in wanted:
            origin = origins.get(message_id)
            if origin is None or message_id in held or message_id not in present:
                failed.append((message_id, Code.MESSAGE_NOT_FOUND))
            elif origin not in self.index.queues:
                failed.append((message_id, Code.QUEUE_NOT_FOUND))
            elif not may_write(origin):
                failed.append((message_id, Code.PERMISSION_DENIED))
            else:
                by_target.setdefault(origin, []).append(present[message_id])
        moved = 0
        for origin, rows in by_target.items():
            ready = [row[0] for row in rows if row[0] not in waiting]
            delayed = [row[0] for row in rows if row[0] in waiting]
            if ready:
                self._delete_rows(holder, ready, were_ready=True)
            if delayed:
                self.conn.execute(sql.DELETE_DELAYED_IDS, (json.dumps(delayed),))
                self.conn.execute(sql.DELETE_DEAD_LETTER_IDS, (json.dumps(delayed),))
                holder.delayed -= len(delayed)
                holder.dead_letters -= len(delayed)
                self.batch.touched.add(self.name_of(holder))
            self._insert_ready(self.index.queues[origin], rows)
            moved += len(rows)
        return moved, failed

    # Rows ----------------------------------------------------------------------------------

    def read_rows(self, state: QueueState, ids: list[int]) -> list[Row]:
        """The rows of those ids present in the queue's table, with true delivery counts."""
        if not ids:
            return []
        mark = state.delivered_upto
        rows = self.conn.execute(state.sql.read_rows, (json.dumps(ids),)).fetchall()
        return [(i, sql.true_count(n, i, mark), p, e) for i, n, p, e in rows]

    def _insert_ready(self, state: QueueState, rows: list[Row]) -> None:
        """Rows moved into the queue, ready at their place (by id)."""
        if not rows:
            return
        mark = state.delivered_upto
        self.conn.executemany(
            state.sql.insert_row,
            [(i, sql.stored_count(n, i, mark), p, e) for i, n, p, e in rows],
        )
        for message_id, _, _, _ in rows:
            if message_id <= mark:
                heapq.heappush(state.given_back, message_id)
        state.ready += len(rows)
        self._now_ready(state)

    def _delete_rows(
        self, state: QueueState, ids: list[int], were_ready: bool, history: bool = True
    ) -> None:
        """Take rows out of the queue's table: in flight (already dropped from InFlight)
        or, if `were_ready`, ready ones; with their dead-letter history if `history`."""
        self.conn.execute(state.sql.delete_ids, (json.dumps(ids),))
        if were_ready:
            gone = set(ids)
            state.given_back = [m for m in state.given_back if m not in gone]
            heapq.heapify(state.given_back)
            state.ready -= len(ids)
        if history and state.dead_letters:
            deleted = self.conn.execute(
                "SELECT count(*) FROM dead_letters WHERE holder = ?"
                " AND id IN (SELECT value FROM json_each(?))",
                (state.id, json.dumps(ids)),
            ).fetchone()[0]
            if deleted:
                self.conn.execute(sql.DELETE_DEAD_LETTER_IDS, (json.dumps(ids),))
                state.dead_letters -= deleted
        self.batch.touched.add(self.name_of(state))

    def _now_ready(self, state: QueueState) -> None:
        name = self.name_of(state)
        self.batch.touched.add(name)
        self.batch.now_ready.add(name)
        self.index.schedule_age_check(state, self.now_ms)

    # Lookups -------------------------------------------------------------------------------

    def state(self, queue_id: int) -> QueueState:
        return self.index.queues[self.index.queue_names[queue_id]]

    def name_of(self, state: QueueState) -> str:
        return self.index.queue_names[state.id]
