"""Which session holds which message: kept in memory by the single-node store.

Why in memory: being in flight does not outlive the server process (sessions die with
it, and at start every message is ready again), so writing it into each message's row on
every claim and every ack would pay a row update, two index changes and a share of an
fsync for state that a restart throws away. What must survive a restart, the delivery
count, the store records separately (sqlite.py).

The writer thread is the only user, so there is no lock. Changes made while a
transaction is open are journaled: when that transaction fails to commit, `rollback`
undoes them, and the map again matches what was committed.
"""

from __future__ import annotations

from collections.abc import Iterable

# (message id, session id, queue id, whether the change was a hold rather than a drop)
_Change = tuple[int, int, int, bool]


class InFlight:
    """message id -> (session id, queue id), indexed by session and by queue."""

    def __init__(self) -> None:
        self._holders: dict[int, tuple[int, int]] = {}
        self._by_session: dict[int, set[int]] = {}
        self._by_queue: dict[int, set[int]] = {}
        self._journal: list[_Change] = []

    def hold(self, session_id: int, queue_id: int, message_ids: Iterable[int]) -> None:
        for message_id in message_ids:
            self._add(message_id, session_id, queue_id)
            self._journal.append((message_id, session_id, queue_id, True))

    def drop(self, message_id: int, session_id: int) -> int | None:
        """Stop holding a message if `session_id` holds it; its queue id, else None."""
        holder = self._holders.get(message_id)
        if holder is None or holder[0] != session_id:
            return None
        queue_id = holder[1]
        self._remove(message_id, session_id, queue_id)
        self._journal.append((message_id, session_id, queue_id, False))
        return queue_id

    def drop_session(self, session_id: int) -> list[tuple[int, int]]:
        """Stop holding everything of a session: (message id, queue id) pairs."""
        held = sorted(self._by_session.get(session_id, ()))
        return [(m, q) for m in held if (q := self.drop(m, session_id)) is not None]

    def drop_queue(self, queue_id: int) -> None:
        for message_id in sorted(self._by_queue.get(queue_id, ())):
            session_id = self._holders[message_id][0]
            self.drop(message_id, session_id)

    def count(self, queue_id: int) -> int:
        return len(self._by_queue.get(queue_id, ()))

    def held_in(self, queue_id: int) -> set[int]:
        return self._by_queue.get(queue_id, set())

    def commit(self) -> None:
        """The open transaction committed: its changes stay."""
        self._journal.clear()

    def rollback(self) -> None:
        """The open transaction failed: undo its changes, newest first."""
        for message_id, session_id, queue_id, was_hold in reversed(self._journal):
            if was_hold:
                self._remove(message_id, session_id, queue_id)
            else:
                self._add(message_id, session_id, queue_id)
        self._journal.clear()

    def _add(self, message_id: int, session_id: int, queue_id: int) -> None:
        self._holders[message_id] = (session_id, queue_id)
        self._by_session.setdefault(session_id, set()).add(message_id)
        self._by_queue.setdefault(queue_id, set()).add(message_id)

    def _remove(self, message_id: int, session_id: int, queue_id: int) -> None:
        del self._holders[message_id]
        for index, key in ((self._by_session, session_id), (self._by_queue, queue_id)):
            members = index[key]
            members.discard(message_id)
            if not members:
                del index[key]
