"""Which session holds which message, until when: kept in memory by the single-node store.

Why in memory: being in flight does not outlive the server process (sessions die with
it, and at start every message is ready again), so writing it into each message's row on
every claim and every ack would pay a row update, two index changes and a share of an
fsync for state that a restart throws away. What must survive a restart, the delivery
count, the store records separately (sqlite.py).

Leases: a hold may carry a deadline (Unix time, ms). The deadlines sit in one heap,
pushed once per hold (one entry for all the ids a claim took) and never removed: an entry
whose ids no longer hold that deadline is stale and skipped when it comes up (`expired`).
So a give-back, an ack or an extension costs no heap work, and no timer exists per
message; the store asks for `next_deadline` to arm its one timer.

A session that held a message until its lease ran out is remembered (`expired_holder`),
so that its late ack is told LEASE_EXPIRED rather than MESSAGE_NOT_FOUND. That memory is
bounded by the messages that exist: it is forgotten when the session is released or the
message deleted.

The writer thread is the only user, so there is no lock. Changes made while a
transaction is open are journaled: when that transaction fails to commit, `rollback`
undoes them, and the map again matches what was committed.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Sequence

_Undo = Callable[[], None]


class InFlight:
    """message id -> (session id, queue id), indexed by session and by queue, with an
    optional lease deadline per message.

    Claims and acks come in batches of up to a thousand ids, so every change takes a
    list and is journaled once per session and queue rather than once per id.
    """

    def __init__(self) -> None:
        self._holders: dict[int, tuple[int, int]] = {}
        self._by_session: dict[int, set[int]] = {}
        self._by_queue: dict[int, set[int]] = {}
        # message id -> lease deadline (ms), for held messages that have one.
        self._deadlines: dict[int, int] = {}
        # (deadline, sequence, ids): possibly stale, see the module docstring.
        self._heap: list[tuple[int, int, list[int]]] = []
        self._sequence = itertools.count()
        # message id -> (session id, queue id) whose lease on it ran out.
        self._expired: dict[int, tuple[int, int]] = {}
        self._expired_by_session: dict[int, set[int]] = {}
        self._journal: list[_Undo] = []

    # Holding and dropping ------------------------------------------------------------------

    def hold(
        self, session_id: int, queue_id: int, message_ids: list[int], deadline: int = 0
    ) -> None:
        """Hold the messages for the session, until `deadline` (ms; 0: while it lives)."""
        self._add(message_ids, session_id, queue_id)
        if deadline:
            self._set_deadlines(message_ids, deadline)

        def undo() -> None:
            for message_id in message_ids:
                del self._holders[message_id]
                self._deadlines.pop(message_id, None)
            self._unindex(message_ids, session_id, queue_id)

        self._journal.append(undo)

    def drop(self, session_id: int, message_ids: Sequence[int]) -> list[int | None]:
        """Stop holding those of the messages that `session_id` holds: per id, its queue
        id, or None when the session does not hold it (nothing changes for that id)."""
        found: list[int | None] = []
        dropped: dict[int, list[int]] = {}
        for message_id in message_ids:
            holder = self._holders.get(message_id)
            if holder is None or holder[0] != session_id:
                found.append(None)
                continue
            found.append(holder[1])
            dropped.setdefault(holder[1], []).append(message_id)
        for queue_id, ids in dropped.items():
            self._drop(session_id, queue_id, ids)
        return found

    def _drop(self, session_id: int, queue_id: int, ids: list[int]) -> None:
        deadlines = {m: self._deadlines.pop(m) for m in ids if m in self._deadlines}
        for message_id in ids:
            del self._holders[message_id]
        self._unindex(ids, session_id, queue_id)

        def undo() -> None:
            self._add(ids, session_id, queue_id)
            self._deadlines.update(deadlines)

        self._journal.append(undo)

    def drop_session(self, session_id: int) -> list[tuple[int, int]]:
        """Stop holding everything of a session, and forget its expired leases:
        (message id, queue id) pairs it held."""
        held = sorted(self._by_session.get(session_id, ()))
        found = self.drop(session_id, held)
        self._forget_session(session_id)
        return [(m, q) for m, q in zip(held, found, strict=True) if q is not None]

    def drop_queue(self, queue_id: int) -> None:
        by_session: dict[int, list[int]] = {}
        for message_id in self._by_queue.get(queue_id, ()):
            by_session.setdefault(self._holders[message_id][0], []).append(message_id)
        for session_id, ids in by_session.items():
            self.drop(session_id, ids)
        self.forget([m for m, (_, q) in self._expired.items() if q == queue_id])

    # Leases --------------------------------------------------------------------------------

    def deadline(self, message_id: int) -> int:
        """The held message's lease deadline (ms); 0 for none or not held."""
        return self._deadlines.get(message_id, 0)

    def holder(self, message_id: int) -> int | None:
        """The session holding the message, or None."""
        holder = self._holders.get(message_id)
        return None if holder is None else holder[0]

    def extend(self, message_ids: list[int], deadline: int) -> None:
        """Move the lease of held messages to `deadline` (ms)."""
        previous = {m: self._deadlines.get(m, 0) for m in message_ids}
        self._set_deadlines(message_ids, deadline)

        def undo() -> None:
            for message_id, old in previous.items():
                if old:
                    self._deadlines[message_id] = old
                else:
                    self._deadlines.pop(message_id, None)

        self._journal.append(undo)

    def next_deadline(self) -> int:
        """The earliest deadline that may still be live (ms); 0 when none. Only between
        transactions: it drops stale entries without journaling them."""
        heap = self._heap
        while heap:
            deadline, _, ids = heap[0]
            if any(self._deadlines.get(m) == deadline for m in ids):
                return deadline
            heapq.heappop(heap)  # stale: none of its ids still has that deadline
        return 0

    def expired(self, now_ms: int) -> list[tuple[int, int, int]]:
        """Drop every hold whose lease ended at or before `now_ms`, remembering its
        session: (message id, session id, queue id), oldest deadline first."""
        out: list[tuple[int, int, int]] = []
        heap = self._heap
        popped: list[tuple[int, int, list[int]]] = []
        while heap and heap[0][0] <= now_ms:
            entry = heapq.heappop(heap)
            popped.append(entry)
            deadline, _, ids = entry
            live = [m for m in ids if self._deadlines.get(m) == deadline]
            by_holder: dict[tuple[int, int], list[int]] = {}
            for message_id in live:
                by_holder.setdefault(self._holders[message_id], []).append(message_id)
            for (session_id, queue_id), held in by_holder.items():
                self._drop(session_id, queue_id, held)
                self._remember_expired(held, session_id, queue_id)
                out.extend((m, session_id, queue_id) for m in held)
        if popped:
            # Pushed back first on a rollback, before the holds come back (newest first).

            def undo() -> None:
                for entry in popped:
                    heapq.heappush(heap, entry)

            self._journal.append(undo)
        return out

    def expired_holder(self, message_id: int) -> int | None:
        """The session whose lease on the message ran out, or None."""
        entry = self._expired.get(message_id)
        return None if entry is None else entry[0]

    def forget(self, message_ids: Iterable[int]) -> None:
        """The messages were deleted: forget who held them until their lease ran out."""
        if not self._expired:
            return
        gone = [(m, self._expired[m]) for m in message_ids if m in self._expired]
        for message_id, (session_id, _) in gone:
            del self._expired[message_id]
            members = self._expired_by_session[session_id]
            members.discard(message_id)
            if not members:
                del self._expired_by_session[session_id]
        if gone:
            self._journal.append(lambda: self._restore_expired(gone))

    def forget_queue_except(self, queue_id: int, kept: set[int]) -> None:
        """The queue's messages but `kept` were deleted (a purge)."""
        self.forget([m for m, (_, q) in self._expired.items() if q == queue_id and m not in kept])

    # Counting ------------------------------------------------------------------------------

    def count(self, queue_id: int) -> int:
        return len(self._by_queue.get(queue_id, ()))

    def held_by(self, session_ids: Sequence[int]) -> dict[int, int]:
        """How many messages each of the sessions holds; those holding none are left out."""
        held = ((s, len(self._by_session.get(s, ()))) for s in session_ids)
        return {s: n for s, n in held if n}

    def held_in(self, queue_id: int) -> set[int]:
        return self._by_queue.get(queue_id, set())

    def sessions_in(self, queue_id: int) -> int:
        """How many sessions hold messages of the queue."""
        held = self._by_queue.get(queue_id, ())
        return len({self._holders[m][0] for m in held})

    # Transactions --------------------------------------------------------------------------

    def commit(self) -> None:
        """The open transaction committed: its changes stay."""
        self._journal.clear()

    def rollback(self) -> None:
        """The open transaction failed: undo its changes, newest first."""
        for undo in reversed(self._journal):
            undo()
        self._journal.clear()

    # Internals -----------------------------------------------------------------------------

    def _set_deadlines(self, message_ids: list[int], deadline: int) -> None:
        self._deadlines.update(dict.fromkeys(message_ids, deadline))
        heapq.heappush(self._heap, (deadline, next(self._sequence), list(message_ids)))

    def _remember_expired(self, message_ids: list[int], session_id: int, queue_id: int) -> None:
        previous = [(m, self._expired[m]) for m in message_ids if m in self._expired]
        self._forget_entries(previous)
        for message_id in message_ids:
            self._expired[message_id] = (session_id, queue_id)
        self._expired_by_session.setdefault(session_id, set()).update(message_ids)

        def undo() -> None:
            self._forget_entries([(m, (session_id, queue_id)) for m in message_ids])
            self._restore_expired(previous)

        self._journal.append(undo)

    def _forget_session(self, session_id: int) -> None:
        ids = self._expired_by_session.get(session_id)
        if ids:
            self.forget(list(ids))

    def _forget_entries(self, entries: list[tuple[int, tuple[int, int]]]) -> None:
        for message_id, (session_id, _) in entries:
            self._expired.pop(message_id, None)
            members = self._expired_by_session.get(session_id)
            if members is not None:
                members.discard(message_id)
                if not members:
                    del self._expired_by_session[session_id]

    def _restore_expired(self, entries: list[tuple[int, tuple[int, int]]]) -> None:
        for message_id, (session_id, queue_id) in entries:
            self._expired[message_id] = (session_id, queue_id)
            self._expired_by_session.setdefault(session_id, set()).add(message_id)

    def _add(self, message_ids: list[int], session_id: int, queue_id: int) -> None:
        self._holders.update(dict.fromkeys(message_ids, (session_id, queue_id)))
        self._by_session.setdefault(session_id, set()).update(message_ids)
        self._by_queue.setdefault(queue_id, set()).update(message_ids)

    def _unindex(self, message_ids: list[int], session_id: int, queue_id: int) -> None:
        for index, key in ((self._by_session, session_id), (self._by_queue, queue_id)):
            members = index[key]
            members.difference_update(message_ids)
            if not members:
                del index[key]
