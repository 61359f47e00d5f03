"""The database file: opening it with the contract's durability, its migrations, and the
users and grants, which `qm-server user ...` edits directly while a server runs.

Kept apart from the store (sqlite.py) because the user commands need only this: no
writer thread, no event loop.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from qm_server.permissions import Grant, Permissions
from qm_server.store import sqlite_sql as sql
from qm_server.store.base import UserRecord

DB_FILE = "qm.db"
# Durability modes. "full" (the default and the contract's promise): every commit is
# fsynced before its answer, so a power cut loses nothing answered OK. "process-crash":
# commits reach the OS but are fsynced only at checkpoints; a kill -9 loses nothing, a
# power cut may lose the last commits.
SYNCHRONOUS = {"full": "FULL", "process-crash": "NORMAL"}


def connect(path: Path) -> sqlite3.Connection:
    """Open the database with the durability settings of the contract, migrated."""
    # Statements are per queue (one messages table each): keep many of them prepared.
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=1024
    )
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA busy_timeout = 10000")
    migrate(conn)
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction for a connection in autocommit mode (the user commands)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(conn: sqlite3.Connection) -> None:
    """Apply the migrations this file has not seen, in one transaction."""
    with transaction(conn):
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        row = conn.execute(sql.SCHEMA_VERSION).fetchone() if has_meta else None
        version = int(row[0]) if row else 0
        if version > len(sql.MIGRATIONS):
            raise RuntimeError(
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


# Users: also used directly (without the writer thread) by `qm-server user ...`. ----------


def get_user(conn: sqlite3.Connection, name: str) -> UserRecord | None:
    row = conn.execute(sql.GET_USER, (name,)).fetchone()
    return UserRecord(row[0], row[1], bool(row[2])) if row else None


def put_user(conn: sqlite3.Connection, record: UserRecord) -> None:
    conn.execute(sql.PUT_USER, (record.name, record.password_hash, int(record.is_admin)))


def delete_user(conn: sqlite3.Connection, name: str) -> bool:
    conn.execute(sql.DELETE_USER_GRANTS, (name,))
    return conn.execute(sql.DELETE_USER, (name,)).rowcount > 0


def add_grant(conn: sqlite3.Connection, name: str, grant: Grant) -> None:
    conn.execute(sql.ADD_GRANT, (name, grant.action, grant.kind, grant.pattern))


def remove_grant(conn: sqlite3.Connection, name: str, grant: Grant) -> bool:
    args = (name, grant.action, grant.kind, grant.pattern)
    return conn.execute(sql.REMOVE_GRANT, args).rowcount > 0


def load_permissions(conn: sqlite3.Connection) -> dict[str, Permissions]:
    grants: dict[str, list[Grant]] = {}
    for username, action, kind, pattern in conn.execute(sql.ALL_GRANTS):
        grants.setdefault(username, []).append(Grant(action, kind, pattern))
    return {
        user.name: Permissions(user.is_admin, tuple(grants.get(user.name, ())), user.password_hash)
        for user in list_users(conn)
    }


def list_users(conn: sqlite3.Connection) -> list[UserRecord]:
    return [UserRecord(r[0], r[1], bool(r[2])) for r in conn.execute(sql.LIST_USERS)]
