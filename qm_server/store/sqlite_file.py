"""The database file: opening it with the contract's durability, checking it, migrating it.

Kept apart from the store (sqlite.py) because the user commands (sqlite_users.py) and
`qm-server check` need only this: no writer thread, no event loop.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from qm_server.fsutil import DataDirRefused, SchemaTooNew, create_private_file
from qm_server.store import sqlite_sql as sql

log = logging.getLogger(__name__)

DB_FILE = "qm.db"
# The database and the two files SQLite keeps beside it in WAL mode.
SQLITE_FILES = (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm")
# Durability modes. "full" (the default and the contract's promise): every commit is
# fsynced before its answer, so a power cut loses nothing answered OK. "process-crash":
# commits reach the OS but are fsynced only at checkpoints; a kill -9 loses nothing, a
# power cut may lose the last commits.
SYNCHRONOUS = {"full": "FULL", "process-crash": "NORMAL"}


class DatabaseDamaged(DataDirRefused):
    """The database file is corrupt: serving it would answer with wrong data."""


def connect(path: Path, create: bool = True, check_s: float = 0.0) -> sqlite3.Connection:
    """Open the database with the durability settings of the contract, migrated.

    Created (mode 0600, which SQLite gives its WAL and shared-memory files too) only
    if `create`; otherwise a missing file is an error, not a new database. With
    `check_s`, its integrity is checked for that long at most first (refuse_if_damaged),
    before any migration writes to it; a damaged file raises DatabaseDamaged.
    """
    if create:
        create_private_file(path)
    # Statements are per queue (one messages table each): keep many of them prepared.
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=rw",
        isolation_level=None,
        check_same_thread=False,
        cached_statements=1024,
        uri=True,
    )
    try:
        for pragma in sql.CONNECT_PRAGMAS:
            conn.execute(pragma)
        if check_s:
            refuse_if_damaged(conn, path, check_s)
        migrate(conn)
    except BaseException as exc:
        conn.close()
        if is_corruption(exc):
            raise damaged(path, [str(exc)]) from None
        raise
    return conn


def refuse_if_damaged(conn: sqlite3.Connection, path: Path, seconds: float) -> None:
    """The start-up check: raise DatabaseDamaged, or warn if it took too long to finish."""
    started = time.monotonic()
    problems = check_integrity(conn, seconds)
    if problems:
        raise damaged(path, problems)
    if problems is None:
        log.warning(
            "the integrity check of %s did not finish within %g s (--start-check-seconds) "
            "and was skipped; run `qm-server check --data-dir %s` while the server is stopped",
            path,
            seconds,
            path.parent,
        )
    else:
        log.info("integrity check of %s: ok (%.2f s)", path, time.monotonic() - started)


def is_corruption(exc: BaseException) -> bool:
    """SQLite found the file damaged (SQLITE_CORRUPT) or not a database (SQLITE_NOTADB)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


MAX_PROBLEMS_SHOWN = 3
# How many steps of SQLite's virtual machine run between looks at the clock.
CHECK_CLOCK_STEPS = 1000


def damaged(path: Path, problems: list[str]) -> DatabaseDamaged:
    """The refusal of a damaged database, saying what to do."""
    shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
    more = len(problems) - MAX_PROBLEMS_SHOWN
    return DatabaseDamaged(
        f"the database {path} is damaged ({shown}{f'; and {more} more' if more > 0 else ''}). "
        f"Stop writing to it: restore it from a backup, or salvage what is readable with "
        f"`sqlite3 {path.name} .recover` into a new file; "
        f"`qm-server check --data-dir {path.parent}` lists every problem"
    )


def check_integrity(conn: sqlite3.Connection, seconds: float | None = None) -> list[str] | None:
    """The problems SQLite finds in the database, [] if none.

    With `seconds`, PRAGMA quick_check (every page, record and b-tree; not whether each
    index matches its table), interrupted after `seconds` (None then); without, the full
    PRAGMA integrity_check, however long it takes. Between the steps of SQLite's virtual
    machine a progress handler watches the clock; inside one step (the walk of a whole
    b-tree) only sqlite3_interrupt stops the check, which a timer calls (measured: it
    stopped within 0.1 s on a 366 MiB file, the handler alone within 0.4 s).
    """
    deadline = None
    if seconds is not None:
        end = time.monotonic() + seconds
        conn.set_progress_handler(lambda: time.monotonic() > end, CHECK_CLOCK_STEPS)
        deadline = threading.Timer(seconds, conn.interrupt)
        deadline.start()
    try:
        pragma = sql.INTEGRITY_CHECK if seconds is None else sql.QUICK_CHECK
        rows = conn.execute(pragma).fetchall()
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_INTERRUPT:
            return None  # the deadline passed
        if is_corruption(exc):  # too damaged for the check to go on
            return [str(exc)]
        raise
    finally:
        if deadline is not None:
            deadline.cancel()
            deadline.join()  # an interrupt must not reach a later statement
            conn.set_progress_handler(None, 0)
    problems = [line for (text,) in rows for line in str(text).splitlines()]
    if problems == ["ok"]:
        return []
    return [p for p in problems if not p.startswith("*** in database")]


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction for a connection in autocommit mode (migrations, the user
    commands)."""
    conn.execute(sql.BEGIN)
    try:
        yield
    except BaseException:
        conn.execute(sql.ROLLBACK)
        raise
    conn.execute(sql.COMMIT)


def migrate(conn: sqlite3.Connection) -> None:
    """Apply the migrations this file has not seen, in one transaction."""
    with transaction(conn):
        has_meta = conn.execute(sql.HAS_META).fetchone()
        row = conn.execute(sql.SCHEMA_VERSION).fetchone() if has_meta else None
        version = int(row[0]) if row else 0
        if version > len(sql.MIGRATIONS):
            raise SchemaTooNew(
                f"database schema version {version} is newer than this server "
                f"({len(sql.MIGRATIONS)}); upgrade qm-server"
            )
        for number, step in enumerate(sql.MIGRATIONS[version:], start=version + 1):
            if callable(step):
                step(conn)
            else:
                for statement in step.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(sql.SET_SCHEMA_VERSION, (str(number),))
