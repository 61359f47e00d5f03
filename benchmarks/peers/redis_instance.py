"""A second, durable redis-server for the peer runs, so the shared instance is left alone.

The machine's Redis runs without persistence; the durable figures need AOF with
``appendfsync always`` (fsync before reply, like ours) and ``everysec`` for context. The
instance lives in a temp dir, on a free loopback port, and is shut down afterwards.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DurableRedis:
    """``with DurableRedis("always") as port:`` runs redis-server with AOF for the block."""

    def __init__(self, appendfsync: str, start_timeout_s: float = 15.0) -> None:
        self.appendfsync = appendfsync
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self._dir = Path()
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> str | None:
        """None if redis-server can be started, else the reason it cannot."""
        return None if shutil.which("redis-server") else "redis-server not installed"

    def __enter__(self) -> int:
        import redis  # here, not at the top: a run without peers needs no redis package

        self._dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.port = free_port()
        self._proc = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self._dir),
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", self.appendfsync,
                "--daemonize", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return self.port
            except redis.ConnectionError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError(f"redis-server on {self.port} did not answer PING")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=15)
        shutil.rmtree(self._dir, ignore_errors=True)
