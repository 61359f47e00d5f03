"""What a process asked of the disk, read from `strace`, and what a power cut would keep.

`kill -9` keeps the page cache, so a missing fsync passes every crash test. Here the real
`qm-server` runs under strace (`STRACE_ARGS`), which writes each file syscall with its
full data (`-xx -s`: every string hex-escaped, whole; `-y`: each descriptor with its
path). `read_trace` turns that into `Event`s and `PowerCut` replays them on a model of
a disk that keeps only what was synced: a file's content as of its last fsync or
fdatasync, a directory entry (a created, renamed or removed name) only once its
directory was fsynced. This is the worst a power cut may do under POSIX, and a
filesystem such as ext4 may do it (delayed allocation, a rename not yet in the journal).

A FUSE layer would drop unsynced writes too, but needs /dev/fuse and privileges a test
machine may lack; strace needs only ptrace of one's own child, and shows the order of
the fsyncs against the answers as well.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TRACED = (
    "openat,mkdir,write,pwrite64,ftruncate,fsync,fdatasync,"
    "rename,renameat,renameat2,unlink,unlinkat,sendmsg"
)
STRACE_ARGS = (
    "strace",
    "-f",  # every thread: SQLite writes from the store's writer thread
    "-qq",
    "-ttt",
    "-y",
    "-xx",
    "-s",
    "1048576",
    "--seccomp-bpf",  # stop only at the traced calls: the server runs near full speed
    "-e",
    f"trace={TRACED}",
)

_LINE = re.compile(r"^(\d+) +(\d+\.\d+) (.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\) += (-?\d+)")
_FD = re.compile(r"(\d+)<((?:\\x[0-9a-f]{2})*)>")
_STRING = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')


def _decode(hexed: str) -> bytes:
    return bytes.fromhex(hexed.replace("\\x", ""))


@dataclass
class Event:
    """One successful syscall: when strace saw it start and end (time, line of the trace)."""

    t: float
    name: str
    started: float = 0.0
    line: int = 0
    started_line: int = 0
    path: str = ""  # the descriptor's path, or the first path argument
    target: str = ""  # rename: the new name
    data: bytes = b""
    offset: int | None = None  # pwrite64; write appends at the descriptor's position
    size: int = 0  # ftruncate
    fd: int = -1
    flags: str = ""


def _parse(t: float, name: str, args: str, result: int) -> Event | None:
    if result < 0:
        return None
    fds = _FD.findall(args)
    strings = [_decode(s).decode(errors="replace") for s in _STRING.findall(args)]
    event = Event(t, name)
    if name == "openat":
        event.path, event.fd, event.flags = strings[0], result, args
    elif name == "mkdir":
        event.path = strings[0]
    elif name in ("write", "pwrite64"):
        event.fd, event.path = int(fds[0][0]), _decode(fds[0][1]).decode(errors="replace")
        data = _decode(_STRING.findall(args)[0])
        event.data = data[:result]
        if name == "pwrite64":
            event.offset = int(args.rsplit(",", 1)[1])
    elif name in ("fsync", "fdatasync", "ftruncate", "sendmsg"):
        event.fd, event.path = int(fds[0][0]), _decode(fds[0][1]).decode(errors="replace")
        if name == "ftruncate":
            event.size = int(args.rsplit(",", 1)[1])
    elif name.startswith("rename"):
        event.path, event.target = strings[0], strings[1]
    elif name in ("unlink", "unlinkat"):
        event.path = strings[0]
    else:
        return None
    return event


def read_trace(path: Path) -> list[Event]:
    """The successful calls of a trace, in the order they ended."""
    # pid -> the start of its unfinished call, with its time and line
    pending: dict[str, tuple[str, float, int]] = {}
    events: list[Event] = []
    text = path.read_text(encoding="ascii", errors="replace")
    for number, line in enumerate(text.splitlines()):
        match = _LINE.match(line)
        if match is None:
            continue
        pid, t, rest = match.group(1), float(match.group(2)), match.group(3)
        if rest.endswith("<unfinished ...>"):
            pending[pid] = (rest[: -len("<unfinished ...>")].rstrip(), t, number)
            continue
        started, started_line = t, number
        resumed = _RESUMED.match(rest)
        if resumed is not None:
            head, started, started_line = pending.pop(pid, (resumed.group(1) + "(", t, number))
            rest = head + resumed.group(2)
        call = _CALL.match(rest)
        if call is None:
            continue
        event = _parse(t, call.group(1), call.group(2), int(call.group(3)))
        if event is not None:
            event.started, event.line, event.started_line = started, number, started_line
            events.append(event)
    return events


# The disk that keeps only what was synced ----------------------------------------------


@dataclass
class _Inode:
    data: bytearray = field(default_factory=bytearray)
    synced: bytes | None = None  # content at the last fsync; None: never synced
    is_dir: bool = False


class PowerCut:
    """Replay the events under `root` (a directory that existed, synced, before them)."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self._inodes: list[_Inode] = [_Inode(is_dir=True, synced=b"")]
        self._names: dict[str, int] = {self.root: 0}  # path -> inode, as the OS sees it
        self._synced_names: dict[str, int] = {self.root: 0}  # as a power cut leaves it
        self._position: dict[int, int] = {}  # descriptor -> offset of the next write

    def _mine(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + "/")

    def _inode(self, path: str) -> _Inode | None:
        number = self._names.get(path.removesuffix(" (deleted)"))
        return None if number is None else self._inodes[number]

    def apply(self, event: Event) -> None:
        if not self._mine(event.path.removesuffix(" (deleted)")):
            return
        name = event.name
        if name == "openat":
            inode = self._inode(event.path)
            if inode is None:
                self._inodes.append(_Inode())
                self._names[event.path] = len(self._inodes) - 1
            elif "O_TRUNC" in event.flags:
                inode.data.clear()
            self._position[event.fd] = 0
        elif name == "mkdir":
            self._inodes.append(_Inode(is_dir=True))
            self._names[event.path] = len(self._inodes) - 1
        elif name in ("write", "pwrite64"):
            inode = self._inode(event.path)
            if inode is None:  # opened before the trace began (the server's log)
                return
            offset = event.offset if event.offset is not None else self._position[event.fd]
            end = offset + len(event.data)
            if len(inode.data) < offset:
                inode.data.extend(bytes(offset - len(inode.data)))
            inode.data[offset:end] = event.data
            if event.offset is None:
                self._position[event.fd] = end
        elif name == "ftruncate":
            inode = self._inode(event.path)
            if inode is None:
                return
            del inode.data[event.size :]
            inode.data.extend(bytes(event.size - len(inode.data)))
        elif name in ("fsync", "fdatasync"):
            self._sync(event.path.removesuffix(" (deleted)"))
        elif name.startswith("rename"):
            self._names[event.target] = self._names.pop(event.path)
        elif name.startswith("unlink"):
            self._names.pop(event.path, None)

    def _sync(self, path: str) -> None:
        inode = self._inode(path)
        if inode is None:
            return
        if not inode.is_dir:
            inode.synced = bytes(inode.data)
            return
        # An fsync of a directory makes its entries durable: new, renamed and removed.
        children = {p for p in (*self._names, *self._synced_names) if p.rpartition("/")[0] == path}
        for child in children:
            if child in self._names:
                self._synced_names[child] = self._names[child]
            else:
                self._synced_names.pop(child, None)

    def survivors(self) -> Iterator[tuple[str, _Inode]]:
        """Each path a power cut keeps (its directories' entries all synced), with its file."""
        for path, number in sorted(self._synced_names.items()):
            parts = path[len(self.root) :].split("/")
            ancestors = [self.root + "/".join(parts[:n]) for n in range(1, len(parts))]
            if all(a in self._synced_names for a in ancestors):
                yield path, self._inodes[number]

    def write_image(self, into: Path, skip: tuple[str, ...] = ()) -> list[str]:
        """Write what survives into `into` (as `root`); returns the relative paths written.

        A file created and never synced survives empty, as its entry may.
        """
        if into.exists():
            shutil.rmtree(into)
        into.mkdir(parents=True)
        written = []
        for path, inode in self.survivors():
            relative = path[len(self.root) :].lstrip("/")
            if not relative or relative.endswith(skip):
                continue
            target = into / relative
            if inode.is_dir:
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(inode.synced or b"")
            written.append(relative)
        return written
