"""Users and grants in the SQLite database: the statements, run on a connection inside a
transaction that the caller holds, and SqliteUserDirectory, which runs them alone.

Two callers share the statements: SqliteStore (its writer thread for changes, its reader
threads for reads, so that logins see users as the server's other operations do), and
SqliteUserDirectory, which `qm-server user ...` opens on a data directory while a server
may be running there. That one opens a connection of its own and nothing else: no message
index, no writer thread, no lock on the data directory. SQLite's locks order its
transactions with the server's writer, and the server reads users afresh at each login
and reloads grants every second, so its changes reach the running server.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from qm_server import errors
from qm_server.config import ServerConfig
from qm_server.datadir import missing_database
from qm_server.fsutil import DataDirRefused
from qm_server.permissions import Grant, Permissions
from qm_server.store import sqlite_sql as sql
from qm_server.store.base import UserDirectory, UserRecord
from qm_server.store.sqlite_file import (
    DB_FILE,
    DatabaseDamaged,
    connect,
    damaged,
    is_corruption,
    transaction,
)

T = TypeVar("T")

# The statements. Each function runs inside its caller's transaction. ----------------------


def get_user(conn: sqlite3.Connection, name: str) -> UserRecord | None:
    row = conn.execute(sql.GET_USER, (name,)).fetchone()
    return UserRecord(row[0], row[1], bool(row[2])) if row else None


def list_users(conn: sqlite3.Connection) -> list[UserRecord]:
    return [UserRecord(r[0], r[1], bool(r[2])) for r in conn.execute(sql.LIST_USERS)]


def count_users(conn: sqlite3.Connection) -> int:
    return int(conn.execute(sql.COUNT_USERS).fetchone()[0])


def create_user(conn: sqlite3.Connection, record: UserRecord) -> bool:
    args = (record.name, record.password_hash, int(record.is_admin))
    return conn.execute(sql.CREATE_USER, args).rowcount > 0


def set_password(
    conn: sqlite3.Connection, name: str, password_hash: str, make_admin: bool = False
) -> bool:
    return conn.execute(sql.SET_PASSWORD, (password_hash, int(make_admin), name)).rowcount > 0


def delete_user(conn: sqlite3.Connection, name: str) -> bool:
    conn.execute(sql.DELETE_USER_GRANTS, (name,))
    return conn.execute(sql.DELETE_USER, (name,)).rowcount > 0


def add_grants(conn: sqlite3.Connection, name: str, grants: Sequence[Grant]) -> list[bool] | None:
    if conn.execute(sql.USER_EXISTS, (name,)).fetchone() is None:
        return None
    return [
        conn.execute(sql.ADD_GRANT, (name, g.action, g.kind, g.pattern)).rowcount > 0
        for g in grants
    ]


def remove_grants(
    conn: sqlite3.Connection, name: str, grants: Sequence[Grant]
) -> list[bool] | None:
    if conn.execute(sql.USER_EXISTS, (name,)).fetchone() is None:
        return None
    return [
        conn.execute(sql.REMOVE_GRANT, (name, g.action, g.kind, g.pattern)).rowcount > 0
        for g in grants
    ]


def load_permissions(conn: sqlite3.Connection) -> dict[str, Permissions]:
    grants: dict[str, list[Grant]] = {}
    for username, action, kind, pattern in conn.execute(sql.ALL_GRANTS):
        grants.setdefault(username, []).append(Grant(action, kind, pattern))
    return {
        user.name: Permissions(user.is_admin, tuple(grants.get(user.name, ())), user.password_hash)
        for user in list_users(conn)
    }


# The user commands' directory. ------------------------------------------------------------


def existing_database(data_dir: Path) -> Path:
    """The database of `data_dir`; DataDirRefused if there is none, because a user command
    that made one would report success on a mistyped directory."""
    why = missing_database(data_dir)
    if why is not None:
        raise DataDirRefused(
            f"no database in {data_dir} ({DB_FILE} {why}); "
            "check --data-dir, or start qm-server there once to create one"
        )
    return data_dir / DB_FILE


def open_sqlite_user_directory(config: ServerConfig) -> SqliteUserDirectory:
    """The users of the database in config.data_dir, which must exist (DataDirRefused)."""
    return SqliteUserDirectory(existing_database(config.data_dir))


class SqliteUserDirectory(UserDirectory):
    """The users of one database file, each call one transaction on a connection of its own.

    The connection is opened (and the schema migrated, as the server would) at the first
    call, and lives on one thread of its own, which runs the calls in turn. Changes take
    SQLite's write lock only for their own transaction, waiting (busy_timeout) while the
    server's writer commits.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="qm-users")

    async def close(self) -> None:
        try:
            await self._call(self._close_connection)
        finally:
            self._thread.shutdown()

    async def get_user(self, name: str) -> UserRecord | None:
        return await self._read(lambda conn: get_user(conn, name))

    async def list_users(self) -> list[UserRecord]:
        return await self._read(list_users)

    async def count_users(self) -> int:
        return await self._read(count_users)

    async def create_user(self, record: UserRecord) -> bool:
        return await self._write(lambda conn: create_user(conn, record))

    async def set_password(self, name: str, password_hash: str, make_admin: bool = False) -> bool:
        return await self._write(lambda conn: set_password(conn, name, password_hash, make_admin))

    async def delete_user(self, name: str) -> bool:
        return await self._write(lambda conn: delete_user(conn, name))

    async def add_grants(self, name: str, grants: Sequence[Grant]) -> list[bool] | None:
        return await self._write(lambda conn: add_grants(conn, name, grants))

    async def remove_grants(self, name: str, grants: Sequence[Grant]) -> list[bool] | None:
        return await self._write(lambda conn: remove_grants(conn, name, grants))

    async def load_permissions(self) -> dict[str, Permissions]:
        return await self._read(load_permissions)

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """A read transaction: one snapshot of what was committed, without the write lock."""
        return await self._call(lambda: self._in_transaction(run, write=False))

    async def _write(self, run: Callable[[sqlite3.Connection], T]) -> T:
        return await self._call(lambda: self._in_transaction(run, write=True))

    async def _call(self, run: Callable[[], T]) -> T:
        try:
            pending = asyncio.get_running_loop().run_in_executor(self._thread, run)
        except RuntimeError:  # the thread was shut down (close)
            raise errors.Unavailable("the user directory is closed") from None
        return await pending

    def _in_transaction(self, run: Callable[[sqlite3.Connection], T], write: bool) -> T:
        """One transaction, on the directory's thread; SQLite's failures become
        Unavailable, saying what they mean for the file."""
        try:
            if self._conn is None:
                self._conn = connect(self._path, create=False)
            if write:
                with transaction(self._conn):
                    return run(self._conn)
            self._conn.execute("BEGIN")
            try:
                return run(self._conn)
            finally:
                self._conn.execute("ROLLBACK")  # it wrote nothing; this ends the snapshot
        except DatabaseDamaged as exc:
            raise errors.Unavailable(str(exc)) from exc
        except sqlite3.Error as exc:  # a full disk, a read-only file, a corrupt page
            if is_corruption(exc):
                raise errors.Unavailable(str(damaged(self._path, [str(exc)]))) from exc
            raise errors.Unavailable(f"nothing changed, {self._path}: {exc}") from exc

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
