"""Lost database answers for the PostgreSQL store's tests: the database did its work, the
store's connection broke before the answer reached the store.

`LostAnswer` patches psycopg's async connection for the duration of a `with` block, in
every thread (an in-process server runs the store on a loop of its own): when one of its
`statements` has run, the connection is closed at the socket (libpq's `finish`, as a
connection that the network or the database dropped ends up) and the caller gets the
OperationalError that a dropped connection raises. `at` says when:

- "statement": right after the statement itself was answered (in autocommit, the
  statement was committed);
- "commit": right after the COMMIT of the transaction that ran the statement was answered
  (the transaction was committed);
- "before commit": right after the statement, when it ran inside a transaction: the
  COMMIT is never sent, and the database rolls the transaction back;
- "refused": instead of the statement, which is never sent, an OperationalError on a
  connection that stays up, as when the database answers a statement with an error.

It fires `times` times (once by default), then lets everything through; `fired` counts,
so a test can tell that the fault it meant actually happened.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import pytest

from qm_server.store.pg_driver import psycopg

INTRANS = psycopg.pq.TransactionStatus.INTRANS
DROPPED = "consuming input failed: server closed the connection unexpectedly"


class LostAnswer:
    def __init__(
        self,
        statements: tuple[str, ...],
        at: Literal["statement", "commit", "before commit", "refused"],
        times: int = 1,
    ) -> None:
        self.statements = statements
        self.at = at
        self.times = times
        self.fired = 0
        self._ran_in: set[int] = set()  # connections whose transaction ran a statement

    def _drop(self, conn: Any) -> None:
        self.fired += 1
        conn.pgconn.finish()
        raise psycopg.OperationalError(DROPPED)

    def _armed(self) -> bool:
        return self.fired < self.times

    @contextmanager
    def installed(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[LostAnswer]:
        execute = psycopg.AsyncConnection.execute
        exit_transaction = psycopg.AsyncTransaction.__aexit__

        async def patched_execute(conn: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            if self.at == "refused" and query in self.statements and self._armed():
                self.fired += 1
                raise psycopg.OperationalError("the database refused the statement")
            cursor = await execute(conn, query, *args, **kwargs)
            if query in self.statements and self._armed():
                in_transaction = conn.info.transaction_status == INTRANS
                if self.at == "commit" and in_transaction:
                    self._ran_in.add(id(conn))
                elif in_transaction == (self.at == "before commit"):
                    self._drop(conn)
            return cursor

        async def patched_exit(transaction: Any, exc_type: Any, *rest: Any) -> Any:
            conn = transaction.connection
            ran = id(conn) in self._ran_in
            self._ran_in.discard(id(conn))
            result = await exit_transaction(transaction, exc_type, *rest)
            if ran and exc_type is None and self._armed():
                self._drop(conn)
            return result

        with monkeypatch.context() as patch:
            patch.setattr(psycopg.AsyncConnection, "execute", patched_execute)
            patch.setattr(psycopg.AsyncTransaction, "__aexit__", patched_exit)
            yield self
