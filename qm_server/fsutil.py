"""Durable file writes: the contract fsyncs a created file and its directory before answering."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "qm.lock"
# Every file the server keeps is its owner's alone: the database holds password hashes,
# the key file the server's identity.
PRIVATE_MODE = 0o600


def fsync_dir(path: Path) -> None:
    """Make a directory entry (a created or renamed file) survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_file(path: Path, data: bytes) -> None:
    """Write a secret atomically with mode 0600: a temp file, fsync, rename, fsync the dir.

    A crash leaves either no file or the whole file, never a truncated key.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)  # a temp file left by a crash keeps its old mode
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def create_private_file(path: Path) -> bool:
    """Create an empty file with mode 0600 (whatever the umask) and make its directory
    entry durable; False if it already existed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_MODE)
    except FileExistsError:
        return False
    os.close(fd)
    fsync_dir(path.parent)
    return True


def ensure_dir(path: Path) -> None:
    """Create the data directory (mode 0700) and make its entry durable."""
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True)
        fsync_dir(path.parent.resolve())


class DataDirInUse(RuntimeError):
    """Another qm-server holds the data directory."""


class DataDirRefused(RuntimeError):
    """The data directory is not fit to serve from; the message says what to do."""


class SchemaTooNew(DataDirRefused):
    """The store was migrated by a newer qm-server: refused, never written, so that an
    older server started by mistake cannot damage what the newer one wrote. A refusal
    like any other (exit status 2 and the message), for both stores."""


def lock_data_dir(data_dir: Path) -> int:
    """Hold `<data_dir>/qm.lock` while the returned descriptor stays open.

    Two servers on one data directory would each keep their own record of which session
    holds which message, and deliver the same messages to two sessions at once. The
    `qm-server user` commands, which edit the database beside a running server, do not
    take it. The kernel drops the lock with the process, so a killed server leaves none.
    """
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise DataDirInUse(
            f"data directory {data_dir} is in use by another qm-server"
            + (f" (pid {holder})" if holder else "")
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
