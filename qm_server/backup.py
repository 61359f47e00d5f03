"""`qm-server backup DEST`: a consistent copy of the embedded store, taken while it serves.

What a data directory needs to start as the same server: the database `qm.db` and the
key `server-key.pem` (the server's identity: clients may pin its fingerprint), and the
`initial-admin-password` file if it is still there. `qm.lock` and `qm.reserve` are made
again at start, and the database's `-wal` and `-shm` files belong to the copy's
connection, not the original's.

The database is copied with SQLite's online backup API in one step, which reads inside
one read transaction: in WAL mode that is a snapshot of every commit made before it
began (those still in `qm.db-wal` included), and the server's writer goes on committing
meanwhile. The copy does not take `qm.lock`: a server may be running, or start or stop
during the copy, and the snapshot is consistent all the same. Nothing is written in the
data directory but what SQLite does itself when the last connection to a database closes
(it checkpoints the WAL: a stopped server's directory). The copy is checked
(`PRAGMA integrity_check`) and fsynced in a temporary directory beside DEST, which is
renamed to DEST only when whole, so DEST is either a complete backup or absent.

Exit statuses: 0 done; 2 nothing was written (DEST not empty, no database, a PostgreSQL
store, or the copy failed: said on stderr).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

from qm_server.auth import KEY_FILE
from qm_server.datadir import INITIAL_PASSWORD_FILE
from qm_server.fsutil import PRIVATE_MODE, DataDirRefused, fsync_dir
from qm_server.store.sqlite_file import DB_FILE, SQLITE_FILES, check_integrity
from qm_server.store.sqlite_users import existing_database

BACKUP_FAILED = 2
# Copied beside the database when present; the key is required unless --new-key made
# sense for the original too (a database that never served has no users and no key yet).
KEPT_FILES = (KEY_FILE, INITIAL_PASSWORD_FILE)
PG_DUMP_HINT = (
    "--store is PostgreSQL: back it up with PostgreSQL's own tools, e.g. "
    "`pg_dump --schema={schema} --format=custom --file=qm.dump URL` (restore with "
    "pg_restore); the schema holds queues, maps, users and the server key (cluster_secrets)"
)


class BackupRefused(RuntimeError):
    """Nothing was written; the message says why."""


def add_backup_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backup = commands.add_parser(
        "backup",
        help="copy the database and key of --data-dir into DEST, also while the server runs",
    )
    backup.add_argument(
        "dest", type=Path, metavar="DEST", help="a directory that does not exist, or is empty"
    )
    backup.add_argument(
        "--data-dir", type=Path, dest="user_data_dir", metavar="DIR", help="the one to copy"
    )


def run_backup(args: argparse.Namespace) -> int:
    """`qm-server backup DEST` (--data-dir given before or after `backup`)."""
    if getattr(args, "store", ""):
        hint = PG_DUMP_HINT.format(schema=getattr(args, "store_schema", "qm"))
        print(f"qm-server: {hint}", file=sys.stderr)
        return BACKUP_FAILED
    try:
        copied = back_up(args.user_data_dir or args.data_dir, args.dest)
    except (BackupRefused, DataDirRefused) as exc:
        print(f"qm-server: {exc}", file=sys.stderr)
        return BACKUP_FAILED
    print(f"backed up {', '.join(copied)} to {args.dest}")
    return 0


def back_up(data_dir: Path, dest: Path) -> list[str]:
    """Copy the data directory's database and key into the new directory `dest`; the
    names copied. Raises BackupRefused (or DataDirRefused: no database) having written
    nothing that stays."""
    source = existing_database(data_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupRefused(f"{dest} exists and is not an empty directory")
    parent = dest.absolute().parent
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise BackupRefused(f"cannot write beside {dest}: {exc}") from None
    try:
        copied = [DB_FILE, *_copy_files(data_dir, work)]
        _copy_database(source, work / DB_FILE)
        fsync_dir(work)
        work.rename(dest)  # an empty dest is replaced; one filled meanwhile fails here
        fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk, DEST filled meanwhile, ...
            raise BackupRefused(f"cannot write {dest}: {exc}") from None
        raise
    return copied


def _copy_database(source: Path, target: Path) -> None:
    """The online backup, checked and fsynced; the target holds no -wal or -shm after."""
    try:
        src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise BackupRefused(f"cannot open {source}: {exc}") from None
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
        os.close(fd)
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # pages=-1: every page in one step, one read transaction
            problems = check_integrity(dst)
            if problems:
                raise BackupRefused(f"the copy of {source} is damaged: {'; '.join(problems)}")
        finally:
            dst.close()  # the last connection checkpoints and removes the copy's WAL
    except sqlite3.Error as exc:
        raise BackupRefused(f"cannot copy {source}: {exc}") from None
    finally:
        src.close()
    leftovers = [name for name in SQLITE_FILES[1:] if (target.parent / name).exists()]
    if leftovers:
        raise BackupRefused(f"the copy kept {', '.join(leftovers)}: not a closed database")
    _fsync_file(target)


def _copy_files(data_dir: Path, work: Path) -> list[str]:
    """The key and the initial password, each 0600 and fsynced; the names copied."""
    copied = []
    for name in KEPT_FILES:
        try:
            data = (data_dir / name).read_bytes()
        except FileNotFoundError:
            continue
        fd = os.open(work / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        copied.append(name)
    return copied


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
