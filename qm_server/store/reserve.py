"""Disk space set aside at start, given up when the disk fills so that draining still works.

Why: on a full disk SQLite cannot commit anything, deletions included (each commit
appends pages to the write-ahead log, and a checkpoint may have to grow the database).
An operator who wants to make room by draining queues and deleting maps would be refused
too. So the store keeps a file of `size` bytes in the data directory; when a commit fails
for lack of space it deletes the file, and the space it frees lets acks and deletions
commit (they free pages SQLite reuses) while adds stay refused. Once the file can be made
again with as much room left beside it, the disk has room again.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from qm_server.fsutil import PRIVATE_MODE

RESERVE_FILE = "qm.reserve"
CHUNK_BYTES = 1 << 20
# What a file system without fallocate answers; the reserve is then written out instead.
NO_FALLOCATE = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class DiskReserve:
    """`path`, `size` bytes of allocated blocks; size 0 turns the reserve off."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    def make(self) -> bool:
        """Allocate the reserve unless it is there already; False if the disk is too full
        (nothing of it is left behind then).

        Too full means less free than the reserve and as much again: right after the
        reserve was released, exactly its size is free, and making it again at once
        would leave the disk as full as before.
        """
        if self.size <= 0:
            return True
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_size >= self.size:
                return True
        disk = os.statvfs(self.path.parent)
        if disk.f_bavail * disk.f_frsize < 2 * self.size:
            return False
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, PRIVATE_MODE)
        try:
            _allocate(fd, self.size)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self.release()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return False
            raise
        os.close(fd)
        return True

    def release(self) -> bool:
        """Give the space back to the file system; False if there was none to give."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True


def _allocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as exc:
        if exc.errno not in NO_FALLOCATE:
            raise
    written = os.fstat(fd).st_size
    zeros = bytes(CHUNK_BYTES)
    while written < size:
        written += os.pwrite(fd, zeros[: size - written], written)
