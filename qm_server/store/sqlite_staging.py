"""Operations staged in the open transaction, and their flush just before the commit.

Why operations are staged: the sqlite3 module releases the GIL around every step of every
statement, and under load the writer then waits for the event loop to give the GIL back
far longer than SQLite works. So a transaction issues few statements however many
operations share it: adds, claims and done-acks are collected in a Batch and written
together just before the commit (BENCHMARKS.md has the measurements).

Everything here runs on the writer thread, inside the transaction the writer opened.
"""

from __future__ import annotations

import functools
import heapq
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, cast

from qm_server.answer_size import MAX_ENTRY_OVERHEAD, element_info_size
from qm_server.store import sqlite_sql as sql
from qm_server.store.base import Delivery
from qm_server.store.inflight import InFlight
from qm_server.store.sqlite_index import Index, QueueState


@dataclass(slots=True)
class Claim:
    """A claim staged in a transaction; `deliveries` is filled in place when resolved."""

    state: QueueState
    session_id: int
    limit: int
    max_bytes: int
    lease_ms: int = 0
    """How long each delivery is leased (0: while the session lives)."""
    deliveries: list[Delivery] = field(default_factory=list)


@dataclass(slots=True)
class Append:
    """Consecutive ids of one queue, staged to be inserted with one statement."""

    queue: QueueState
    first_id: int
    payloads: list[str]


class Batch:
    """What one transaction changed, for publishing after its commit."""

    def __init__(self, now_ms: int = 0) -> None:
        # The store's clock when the transaction started: the first add time of its adds
        # and the start of its claims' leases.
        self.now_ms = now_ms
        self.touched: set[str] = set()
        self.now_ready: set[str] = set()
        # The newest id was deleted: save the id counter, or a restart (which derives it
        # from the largest id present) could hand that id out again.
        self.deleted_newest = False
        # Writes staged so that a transaction issues few statements, whatever number of
        # operations it holds: each statement costs the writer a round trip through the
        # GIL, which under load took most of an operation's time. Adds: one INSERT per run
        # of ids, written before any operation that reads or deletes messages.
        self.appends: list[Append] = []
        # Done-acked ids, deleted by runs, and queue id -> delivered_upto: written just
        # before the commit. Deferring them changes no claim: a claim never reads a
        # message that was in flight, and reads the mark from memory.
        self.deletes: dict[int, list[int]] = {}  # queue id -> ids
        self.marks: dict[int, int] = {}
        # Claims in arrival order, resolved together: one read per queue for all of them.
        self.claims: list[Claim] = []

    def append(self, state: QueueState, first_id: int, payloads: list[str]) -> None:
        """Stage adds of ids first_id, first_id + 1, ...: one run with the last if they
        follow on in the same queue."""
        if self.appends and self.appends[-1].queue is state:
            self.appends[-1].payloads.extend(payloads)
        else:
            self.appends.append(Append(state, first_id, payloads))

    def claim(
        self, state: QueueState, session_id: int, limit: int, max_bytes: int, lease_ms: int = 0
    ) -> Claim:
        """Stage a claim; its list is filled before the commit (resolve_claims)."""
        claim = Claim(state, session_id, limit, max_bytes, lease_ms)
        self.claims.append(claim)
        return claim


def begin(conn: sqlite3.Connection) -> None:
    """Open the transaction at the first statement that needs one."""
    if not conn.in_transaction:
        conn.execute(sql.BEGIN)


def write_staged(conn: sqlite3.Connection, batch: Batch, index: Index, in_flight: InFlight) -> None:
    """Everything staged, before the commit: adds and claims (which read them), then
    deletions and marks."""
    if not conn.in_transaction:  # only staged work so far: perhaps no transaction
        others = batch.claims or batch.deletes or batch.marks or batch.deleted_newest
        if not (batch.appends or others):
            return  # nothing to write (negative acks, say)
        # Only when nothing else is staged: write_appends would build the JSON again.
        lone = None
        if len(batch.appends) == 1 and not others:
            lone = _one_insert(batch.appends[0], batch.now_ms)
        if lone:
            # Adds to one queue only (unary Adds under load share one run of ids) are
            # one INSERT, which commits by itself: no BEGIN and no COMMIT, two
            # statements fewer, each a round trip through the GIL.
            conn.execute(*lone)
            batch.appends.clear()
            return
    begin(conn)
    resolve_claims(conn, batch, index, in_flight)
    for queue_id, deletes in batch.deletes.items():
        # Every id of a run was acked done, so deleting the whole range touches no
        # other message.
        state = index.queues[index.queue_names[queue_id]]
        runs = _runs(deletes)
        conn.executemany(state.sql.delete_range, runs)
        if state.dead_letters:  # acked dead letters take their history with them
            state.dead_letters -= conn.executemany(sql.DELETE_DEAD_LETTER_RANGE, runs).rowcount
    if batch.marks:
        marks = [(mark, queue_id) for queue_id, mark in batch.marks.items()]
        conn.executemany(sql.SET_DELIVERED_UPTO, marks)
    if batch.deleted_newest:
        conn.execute(sql.SAVE_NEXT_MESSAGE_ID, (index.next_message_id,))


def write_appends(conn: sqlite3.Connection, batch: Batch) -> None:
    """Insert the staged adds: before anything that reads or deletes messages, and
    before the commit."""
    now = batch.now_ms
    for append in batch.appends:
        one = _one_insert(append, now)
        if one:
            conn.execute(*one)
        else:
            first = append.first_id
            rows = [(first + i, e, now) for i, e in enumerate(append.payloads)]
            conn.executemany(append.queue.sql.insert_one, rows)
    batch.appends.clear()


def resolve_claims(
    conn: sqlite3.Connection, batch: Batch, index: Index, in_flight: InFlight
) -> None:
    """Give each staged claim the oldest ready messages of its queue, in the order
    the claims arrived: one read per queue, however many claims wait."""
    write_appends(conn, batch)  # the rows the claims may take
    by_queue: dict[int, list[Claim]] = {}
    for claim in batch.claims:
        by_queue.setdefault(claim.state.id, []).append(claim)
    batch.claims.clear()
    for claims in by_queue.values():
        _fill_claims(conn, batch, index, in_flight, claims[0].state, claims)


def _fill_claims(
    conn: sqlite3.Connection,
    batch: Batch,
    index: Index,
    in_flight: InFlight,
    state: QueueState,
    claims: list[Claim],
) -> None:
    wanted = min(sum(claim.limit for claim in claims), state.ready)
    rows: list[tuple[int, str, int, int]] = []
    if state.given_back:
        given_back = json.dumps(heapq.nsmallest(wanted, state.given_back))
        rows = _read_messages(conn, state.sql.read_by_ids, (given_back,))
    if len(rows) < wanted:
        undelivered = (state.delivered_upto, wanted - len(rows))
        rows += _read_messages(conn, state.sql.read_undelivered, undelivered)
    recounts: list[tuple[int, int]] = []
    start = 0
    for claim in claims:
        mine = rows[start : start + claim.limit]
        deadline = batch.now_ms + claim.lease_ms if claim.lease_ms else 0
        if len(mine) > 1 and not _fits(mine, claim.max_bytes):
            # Nothing is put in flight that its answer could not carry to the client.
            sizes = [element_info_size(utf8_size(p), i, n, e, deadline) for i, p, n, e in mine]
            mine = mine[: _within_budget(sizes, claim.max_bytes)]
        start += len(mine)
        for message_id, _, count, _ in mine:
            if message_id > state.delivered_upto:
                if count > 1:  # moved in above the mark, delivered before (a dead letter)
                    recounts.append((count, message_id))
                continue  # a first delivery is recorded by the mark
            # A redelivery: the message's own row keeps the count.
            if heapq.heappop(state.given_back) != message_id:
                raise RuntimeError(f"message {message_id} was not given back")
            recounts.append((count, message_id))
        if mine:
            # Rows and the deadline zipped into Deliveries at C speed: the named tuple's
            # own constructor, in a Python loop, cost a claim of 100 rows 7 us more.
            columns = zip(*mine, strict=True)
            claim.deliveries.extend(map(_delivery, zip(*columns, repeat(deadline))))
        if mine:
            in_flight.hold(claim.session_id, state.id, [row[0] for row in mine], deadline)
    if recounts:
        conn.executemany(state.sql.set_delivery_count, recounts)
    if start:
        newest = rows[start - 1][0]
        if newest > state.delivered_upto:
            batch.marks[state.id] = newest
            state.delivered_upto = newest
        state.ready -= start
        batch.touched.add(index.queue_names[state.id])


# Delivery._make without its Python-level length check: the rows come from our own SQL.
_delivery = cast(
    Callable[[tuple[int, str, int, int, int]], Delivery],
    functools.partial(tuple.__new__, Delivery),
)


def _read_messages(
    conn: sqlite3.Connection, statement: str, args: tuple[Any, ...]
) -> list[tuple[int, str, int, int]]:
    """(id, payload, delivery count, first add time) rows, by id, from a statement that
    returns them as four JSON arrays (sqlite_sql.MessageStatements.read_undelivered says
    why)."""
    ids, payloads, counts, enqueued = conn.execute(statement, args).fetchone()
    rows = list(
        zip(
            json.loads(ids),
            json.loads(payloads),
            json.loads(counts),
            json.loads(enqueued),
            strict=True,
        )
    )
    rows.sort()
    return rows


def _one_insert(append: Append, now_ms: int) -> tuple[str, tuple[Any, ...]] | None:
    """The one statement that inserts a run of adds, or None where each row needs its own
    (JSON carries a NUL character escaped, which json_each would hand back unescaped)."""
    statements = append.queue.sql
    if len(append.payloads) == 1:
        return statements.insert_one, (append.first_id, append.payloads[0], now_ms)
    payloads = json.dumps(append.payloads, ensure_ascii=False)
    if "\\u0000" in payloads:
        return None
    return statements.insert_many, (append.first_id, now_ms, payloads)


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive integers as (first, last) pairs: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    ordered = sorted(numbers)
    first = last = ordered[0]
    for number in ordered[1:]:
        if number != last + 1:
            runs.append((first, last))
            first = number
        last = number
    runs.append((first, last))
    return runs


def _fits(rows: list[tuple[int, str, int, int]], max_bytes: int) -> bool:
    """Cheaply: surely within max_bytes once encoded (a character takes at most 4 bytes
    in UTF-8, and an entry at most MAX_ENTRY_OVERHEAD more)."""
    return 4 * sum(len(row[1]) for row in rows) + MAX_ENTRY_OVERHEAD * len(rows) <= max_bytes


def _within_budget(sizes: list[int], max_bytes: int) -> int:
    """How many leading items fit in max_bytes; at least one, so that one large item
    still gets through."""
    total = 0
    for taken, size in enumerate(sizes):
        total += size
        if taken and total > max_bytes:
            return taken
    return len(sizes)


def utf8_size(text: str) -> int:
    """The UTF-8 length of `text`, which answer sizes are counted in."""
    # ASCII is the common case; str.isascii() is O(1) for CPython's compact strings.
    return len(text) if text.isascii() else len(text.encode())
