"""Durable file writes: the contract fsyncs a created file and its directory before answering."""

from __future__ import annotations

import os
from pathlib import Path


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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def ensure_dir(path: Path) -> None:
    """Create the data directory (mode 0700) and make its entry durable."""
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True)
        fsync_dir(path.parent.resolve())
