"""A private PostgreSQL server for the tests that must stop, crash or restart the database.

The machine's PostgreSQL (tests/pg_fixtures.py) is shared and must never be restarted, so
a test that takes the database away runs its own: `initdb` into a temporary directory,
`pg_ctl` to start it on a free port of 127.0.0.1 (trust login, `fsync` and
`synchronous_commit` on, as a production database), to restart it, and to stop it; the
directory is removed at the end. `initdb` refuses to run as root, so under root every
PostgreSQL command runs as the `postgres` user (`runuser -u postgres --`) in a directory
owned by it.

`PgInstance.unavailable()` says why an instance cannot run here ("" when it can): the
binaries are missing (QM_TEST_PG_BIN overrides /usr/lib/postgresql/15/bin) or, under
root, there is no `postgres` user. Every instance started is stopped and removed by
`stop()`, by the `pg_instance` fixture's finalizer, and at interpreter exit (atexit) for
a run that ended early.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(os.environ.get("QM_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"  # the account PostgreSQL runs as when the tests run as root
COMMAND_TIMEOUT_S = 60.0
_running: list[PgInstance] = []


class PgInstance:
    """One private PostgreSQL server: `url` reaches its database `postgres` as user
    `postgres`. Use start(), restart() (a crash and recovery by default), stop()."""

    def __init__(self, bin_dir: Path = BIN) -> None:
        self.bin_dir = bin_dir
        self.root: Path | None = None
        self.port = 0

    @staticmethod
    def unavailable(bin_dir: Path = BIN) -> str:
        """Why no private instance can run on this machine; "" when one can."""
        for tool in ("initdb", "pg_ctl"):
            if not (bin_dir / tool).exists():
                return f"no {tool} in {bin_dir} (set QM_TEST_PG_BIN to PostgreSQL's bin directory)"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(OS_USER)
            except KeyError:
                return f"running as root and there is no {OS_USER!r} user for initdb to run as"
            if shutil.which("runuser") is None:
                return "running as root and there is no runuser to run initdb as postgres"
        return ""

    @property
    def data(self) -> Path:
        assert self.root is not None, "not started"
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "not started"
        return self.root / "postgres.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _run(self, tool: str, *args: str) -> None:
        prefix = ["runuser", "-u", OS_USER, "--"] if os.geteuid() == 0 else []
        done = subprocess.run(
            [*prefix, str(self.bin_dir / tool), *args],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            cwd=self.root,  # a directory the postgres user may enter
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} exited {done.returncode}:\n{done.stdout}"
                f"{done.stderr}\n{self.log()[-3000:]}"
            )

    def start(self) -> PgInstance:
        """initdb (first time) and start; returns self once it accepts connections."""
        reason = self.unavailable(self.bin_dir)
        if reason:
            raise RuntimeError(reason)
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="qm-pg-"))
            if os.geteuid() == 0:
                shutil.chown(self.root, OS_USER, OS_USER)
            _running.append(self)
            # --no-sync only spares initdb's own final fsync of the fresh files; the
            # server runs with fsync on.
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync")  # fmt: skip
            self.port = _free_port()
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.root}",
                "-c fsync=on",
                "-c synchronous_commit=on",
                "-c max_connections=200",
            ]
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", options,
                  "-w", "-t", "60", "start")  # fmt: skip
        return self

    def restart(self, mode: str = "immediate") -> None:
        """Stop and start again. `immediate` is a crash of the database: no checkpoint,
        every connection cut, recovery from the WAL at start (what was committed must be
        there); `fast` is a clean shutdown."""
        self.halt(mode)
        self.start()

    def halt(self, mode: str = "immediate") -> None:
        """Stop the server but keep its files (start() brings it back)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def stop(self) -> None:
        """Stop it (if running) and remove its files; safe to call more than once."""
        if self.root is None:
            return
        try:
            if (self.data / "postmaster.pid").exists():
                self.halt("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            if self in _running:
                _running.remove(self)


def _free_port() -> int:
    """A port nothing listens on now (PostgreSQL binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@atexit.register
def _stop_all() -> None:
    for instance in list(_running):
        instance.stop()


@pytest.fixture
def pg_instance() -> Iterator[PgInstance]:
    """A private PostgreSQL server for one test, stopped and removed after it; the test
    is skipped, saying why, where none can run."""
    reason = PgInstance.unavailable()
    if reason:
        pytest.skip(reason)
    instance = PgInstance().start()
    try:
        yield instance
    finally:
        instance.stop()
