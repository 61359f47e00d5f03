"""Server processes under measurement: start, wait until serving, sample CPU and RSS, stop.

Both the floor and our server are watched the same way so that their CPU and memory
figures are comparable: psutil on the server's own pid, never on the harness.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
"""Children run from here with it on PYTHONPATH, so ``-m benchmarks.*`` works uninstalled."""


RESULT_GRACE_S = 30.0
"""How long past its own time limit a client may take to report before it is killed."""


class ServerStartError(RuntimeError):
    """The server exited or never wrote its port file; the message carries its log's tail."""


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for children: the repo importable, nothing else changed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if extra:
        env.update(extra)
    return env


async def spawn_client(
    module: str, spec: Any, stdin: int, stderr: int | IO[bytes], limit: int = 2**16
) -> asyncio.subprocess.Process:
    """Starts ``python -m module '{json spec}'``, its stdout piped for the RESULT line."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        json.dumps(dataclasses.asdict(spec)),
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        cwd=REPO_ROOT,
        env=child_env(),
        limit=limit,
    )


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class ServerProcess:
    """A running server and where to reach it."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started_s: float
    _ps: psutil.Process = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ps = psutil.Process(self.popen.pid)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """User plus system time of the server process, threads included."""
        t = self._ps.cpu_times()
        return float(t.user + t.system)

    def rss_bytes(self) -> int:
        return int(self._ps.memory_info().rss)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after timeout_s: a hung server must not hang the harness."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout_s)
        return self.popen.returncode


class RssSampler:
    """Keeps the peak RSS seen while a load runs; sampling is cheap next to the load."""

    def __init__(self, server: ServerProcess, every_s: float = 0.2) -> None:
        self.server = server
        self.every_s = every_s
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.server.rss_bytes())
            await asyncio.sleep(self.every_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> int:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.peak = max(self.peak, self.server.rss_bytes())
        return self.peak


def start_server(
    name: str,
    cmd: Sequence[str],
    port_file: Path,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
    cwd: Path = REPO_ROOT,
) -> ServerProcess:
    """Starts cmd in cwd and waits, bounded by timeout_s, for it to write its port to
    port_file."""
    port_file.unlink(missing_ok=True)
    started = time.monotonic()
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=child_env(env),
        )
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise ServerStartError(
                f"{name} exited with {popen.returncode} before serving:\n{log_tail(log_path)}"
            )
        try:
            text = port_file.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text.isdigit() and int(text) > 0:
            return ServerProcess(name, popen, int(text), log_path, time.monotonic() - started)
        time.sleep(0.02)
    popen.kill()
    popen.wait(timeout=10)
    raise ServerStartError(f"{name} wrote no port file in {timeout_s:.0f}s:\n{log_tail(log_path)}")
