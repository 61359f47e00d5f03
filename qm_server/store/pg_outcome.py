"""Which failures of a PostgreSQL call applied nothing, and which may have committed.

The contract tells two failures apart. A CODE_UNAVAILABLE answer applied nothing, so a
client may repeat the call; a call whose outcome is unknown is answered with the gRPC
status UNAVAILABLE instead, as a lost answer would be (errors.OutcomeUnknown). The
store's connection to the database can break at any moment, and what that means depends
on what was in flight:

- no connection from the pool, or one that broke inside an explicit transaction before
  its COMMIT was sent: the database rolls the transaction back; nothing was applied;
- a connection that died while it sat in the pool (the database restarted, or ended it):
  `check_open` finds it closed before anything is sent on it; nothing was applied;
- a statement the database answered with an error while the connection stayed up (a full
  disk, a cancelled statement): its transaction was rolled back; nothing was applied;
- a COMMIT, or a statement run in autocommit (its own transaction, committed as it ends),
  whose connection broke before the answer came: the database may well have committed
  it, and nothing on this side can tell. That is OutcomeUnknown.

A connection whose statements only read commits nothing even in autocommit: the store
takes those with `commits=False` (PgStore._conn), and so does a transaction, whose
COMMIT `transaction` watches. The LISTEN/NOTIFY connections (pg_notify.py) are apart
from all this: a notification is sent only after a commit was answered, so after an
OutcomeUnknown none is sent, and other nodes find what may have been added by their
periodic recheck, as after any lost notification.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

from qm_server import errors
from qm_server.store.pg_driver import Conn, psycopg


class CommitLost(psycopg.OperationalError):
    """The connection broke while a COMMIT was in flight (raised by `transaction`)."""


class ClosedBeforeUse(psycopg.OperationalError):
    """The connection was found closed before anything was sent on it (`check_open`)."""


def check_open(conn: Conn) -> None:
    """Raise ClosedBeforeUse if the server closed `conn` while it was idle. No round trip:
    libpq reads what the socket already holds, without waiting. A server that ends a
    connection sends a FATAL message, then closes it: the first read takes the message,
    the second meets the end."""
    try:
        for _ in range(2):
            conn.pgconn.consume_input()
    except psycopg.OperationalError as exc:
        raise ClosedBeforeUse(str(exc)) from exc


@contextlib.asynccontextmanager
async def transaction(conn: Conn) -> AsyncIterator[None]:
    """`conn.transaction()`, a lost answer to its COMMIT raised as CommitLost: a failure
    of the block itself, before the COMMIT was sent, propagates as it came."""
    committing = False
    try:
        async with conn.transaction():
            yield
            committing = True
    except psycopg.Error as exc:
        if committing and conn.closed:
            raise CommitLost(str(exc)) from exc
        raise


@contextlib.contextmanager
def after_commit(committed: bool, what: str) -> Iterator[None]:
    """Around a step that follows another's commit (`committed`: it changed something):
    the step's Unavailable becomes OutcomeUnknown, since the call was half applied and a
    CODE_UNAVAILABLE answer would say that none of it was. `what` names the first step."""
    try:
        yield
    except errors.OutcomeUnknown:
        raise
    except errors.Unavailable as exc:
        if not committed:
            raise
        raise errors.OutcomeUnknown(f"{what} committed, but what followed failed: {exc}") from exc


def failure(exc: Exception, conn: Conn | None, commits: bool) -> errors.Unavailable:
    """The domain error for a database failure `exc`: OutcomeUnknown when a commit may
    have happened (a COMMIT lost by `transaction`, or `commits`, a connection whose
    statements commit by themselves, that broke), else Unavailable. `conn` is None when
    the pool gave none."""
    broken = conn is not None and conn.closed and not isinstance(exc, ClosedBeforeUse)
    if isinstance(exc, CommitLost) or (commits and broken):
        return errors.OutcomeUnknown(f"{errors.COMMIT_LOST} ({exc})")
    return errors.Unavailable(f"the database is unavailable: {exc}")
