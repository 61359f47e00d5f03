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

from collections.abc import Sequence

# (message ids, session id, queue id, whether the change was a hold rather than a drop)
_Change = tuple[list[int], int, int, bool]


class InFlight:
    """message id -> (session id, queue id), indexed by session and by queue.

    Claims and acks come in batches of up to a thousand ids, so every change takes a
    list and is journaled once per session and queue rather than once per id.
    """

    def __init__(self) -> None:
        self._holders: dict[int, tuple[int, int]] = {}
        self._by_session: dict[int, set[int]] = {}
        self._by_queue: dict[int, set[int]] = {}
        self._journal: list[_Change] = []

    def hold(self, session_id: int, queue_id: int, message_ids: list[int]) -> None:
        self._add(message_ids, session_id, queue_id)
        self._journal.append((message_ids, session_id, queue_id, True))

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
            del self._holders[message_id]
            found.append(holder[1])
            dropped.setdefault(holder[1], []).append(message_id)
        for queue_id, ids in dropped.items():
            self._unindex(ids, session_id, queue_id)
            self._journal.append((ids, session_id, queue_id, False))
        return found

    def drop_session(self, session_id: int) -> list[tuple[int, int]]:
        """Stop holding everything of a session: (message id, queue id) pairs."""
        held = sorted(self._by_session.get(session_id, ()))
        found = self.drop(session_id, held)
        return [(m, q) for m, q in zip(held, found, strict=True) if q is not None]

    def drop_queue(self, queue_id: int) -> None:
        by_session: dict[int, list[int]] = {}
        for message_id in self._by_queue.get(queue_id, ()):
            by_session.setdefault(self._holders[message_id][0], []).append(message_id)
        for session_id, ids in by_session.items():
            self.drop(session_id, ids)

    def count(self, queue_id: int) -> int:
        return len(self._by_queue.get(queue_id, ()))

    def held_in(self, queue_id: int) -> set[int]:
        return self._by_queue.get(queue_id, set())

    def commit(self) -> None:
        """The open transaction committed: its changes stay."""
        self._journal.clear()

    def rollback(self) -> None:
        """The open transaction failed: undo its changes, newest first."""
        for message_ids, session_id, queue_id, was_hold in reversed(self._journal):
            if was_hold:
                for message_id in message_ids:
                    del self._holders[message_id]
                self._unindex(message_ids, session_id, queue_id)
            else:
                self._add(message_ids, session_id, queue_id)
        self._journal.clear()

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
