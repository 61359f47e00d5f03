"""What the server checks about its data directory before it serves from it: that the
database belongs with the key beside it, and that every file in it is its owner's alone.

Why the key matters: it is created together with the first database and never rotated,
so a directory that holds the key but no database once held one. Starting there with a
new, empty database would silently serve none of the queues, maps and users the clients
expect (and re-create `admin`): the operator has to say that this is what they want.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from qm_server.auth import KEY_FILE
from qm_server.fsutil import LOCK_FILE, PRIVATE_MODE, DataDirRefused
from qm_server.store.reserve import RESERVE_FILE
from qm_server.store.sqlite_file import DB_FILE, SQLITE_FILES

INITIAL_PASSWORD_FILE = "initial-admin-password"
# A database holds at least its first page, which SQLite writes whole (512 bytes at least);
# anything shorter is a file that never became a database.
MIN_DATABASE_BYTES = 512
NEW_DATABASE_FLAG = "--new-database"
NEW_KEY_FLAG = "--new-key"
# Every database the server made has this table (migration 1).
HAS_META = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
HAS_USERS = "SELECT 1 FROM users LIMIT 1"


def missing_database(data_dir: Path) -> str | None:
    """Why `<data_dir>/qm.db` holds no database of ours ("is missing", "is empty", "holds
    no tables"), or None if it does (or is too damaged to tell: the integrity check
    reports that)."""
    path = data_dir / DB_FILE
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if size < MIN_DATABASE_BYTES:
        return "is empty"
    return None if _answers(path, HAS_META) in (True, None) else "holds no tables"


def check_database_belongs(data_dir: Path, new_database: bool) -> None:
    """Refuse a directory whose key survived its database, unless told to start afresh."""
    if new_database or not (data_dir / KEY_FILE).exists():
        return
    why = missing_database(data_dir)
    if why is not None:
        raise DataDirRefused(
            f"the database {data_dir / DB_FILE} {why}, but the server key "
            f"{data_dir / KEY_FILE} is there: this directory held a database that is gone. "
            f"Restore {DB_FILE} from a backup, check --data-dir, or give {NEW_DATABASE_FLAG} "
            "to start with an empty database (no queues, maps or users but a new admin)"
        )


def check_key_belongs(data_dir: Path, new_key: bool) -> None:
    """Refuse a directory whose database outlived its key, unless told to make a new one.

    The key is the server's identity: clients may pin its fingerprint, and a new one made
    silently would look to them like another server. A database with users has served (the
    key is created before the first admin), so its key was there and is gone.
    """
    if new_key or (data_dir / KEY_FILE).exists() or not _holds_users(data_dir / DB_FILE):
        return
    raise DataDirRefused(
        f"the server key {data_dir / KEY_FILE} is missing, but the database "
        f"{data_dir / DB_FILE} holds users: this directory had a key that is gone. Restore "
        f"{KEY_FILE} from a backup, check --data-dir, or give {NEW_KEY_FLAG} to make a new "
        "key (clients that pinned the old fingerprint must pin the new one)"
    )


def _holds_users(path: Path) -> bool:
    """True if the file is a database of ours with at least one user; a file that is
    missing, not ours or damaged is for the other checks to report."""
    return path.exists() and _answers(path, HAS_USERS) is True


def _answers(path: Path, query: str) -> bool | None:
    """Whether `query` finds a row in the existing database file; None when SQLite cannot
    read it (a damaged file, or no table of that name: the integrity check says which)."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True)
        try:
            return conn.execute(query).fetchone() is not None
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return None


def make_files_private(data_dir: Path) -> None:
    """Mode 0600 for every file the server keeps in `data_dir`, whatever the umask.

    New files are created so (sqlite_file.connect, fsutil); this narrows those left wider
    by an earlier version, a restore or a copy. SQLite gives a new write-ahead log and
    shared-memory file the database's own mode.
    """
    names = (*SQLITE_FILES, KEY_FILE, INITIAL_PASSWORD_FILE, LOCK_FILE, RESERVE_FILE)
    for name in names:
        path = data_dir / name
        try:
            if path.stat().st_mode & 0o777 != PRIVATE_MODE:
                path.chmod(PRIVATE_MODE)
        except FileNotFoundError:
            continue
