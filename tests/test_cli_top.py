"""``qm top`` driven in a pseudo-terminal against a real server while messages are added:
the screen shows the queue with its changing depths and rates, and q or Ctrl-C leaves
it with the terminal given back and exit status 0."""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator

import pytest
from client_fixtures import ROOT, client_env, connect, run_qm

from conftest import ServerHandle
from qm_client import QueueManagerClient
from qm_client.cli.top import CLEAR, ENTER, LEAVE

WAIT_S = 30.0
ROW = re.compile(
    r"^jobs +(?P<ready>\d+) +(?P<delayed>\d+) +(?P<in_flight>\d+) +(?P<dead>\d+) +(?P<rate>\S+)$",
    re.MULTILINE,
)


# util-linux's setsid --ctty makes the pseudo-terminal the child's controlling terminal,
# so that Ctrl-C typed on it interrupts it as on a real one (and no fork of this
# multi-threaded process runs Python code before exec).
SETSID = shutil.which("setsid")
pytestmark = pytest.mark.skipif(SETSID is None, reason="needs util-linux's setsid")


class Terminal:
    """``qm top`` on a pseudo-terminal; everything it writes is kept in ``output``."""

    def __init__(self, server: ServerHandle, *args: str) -> None:
        self._master, replica = os.openpty()
        fcntl.ioctl(replica, termios.TIOCSWINSZ, b"\x18\x00\x78\x00\x00\x00\x00\x00")  # 24x120
        self.process = subprocess.Popen(
            [str(SETSID), "--ctty", sys.executable, "-m", "qm_client", "top", *args],
            stdin=replica,
            stdout=replica,
            stderr=replica,
            env=client_env(server, TERM="xterm"),
            cwd=ROOT,
        )
        os.close(replica)
        self.output = b""

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self._master], [], [], timeout)
        if ready:
            try:
                self.output += os.read(self._master, 65536)
            except OSError:  # the child closed the terminal (EIO)
                time.sleep(0.01)

    def frames(self) -> list[str]:
        """Every complete screen drawn so far."""
        text = self.output.decode(errors="replace")
        return text.split(CLEAR)[1:-1]

    def wait_for(self, found: str, what: str) -> re.Match[str]:
        """The first row matching what the test waits for in a frame drawn from now on."""
        seen = len(self.frames())
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for screen in self.frames()[seen:]:
                match = ROW.search(screen)
                if match is not None and re.fullmatch(found, match.group(what)):
                    return match
            self._read(0.5)
        raise AssertionError(f"no frame with {what} {found!r}: {self.output[-2000:]!r}")

    def type(self, keys: bytes) -> None:
        os.write(self._master, keys)

    def finish(self) -> int:
        deadline = time.monotonic() + WAIT_S
        while self.process.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        status = self.process.wait(timeout=5)
        self._read(0)
        return status

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self._master)


@pytest.fixture
def qm(server: ServerHandle) -> Iterator[QueueManagerClient]:
    with connect(server) as client:
        client.new_queue("jobs")
        client.add_all("jobs", ["a", "b", "c"])
        yield client


@pytest.fixture
def terminal(server: ServerHandle, qm: QueueManagerClient) -> Iterator[Terminal]:
    term = Terminal(server, "--interval", "0.3")
    yield term
    term.close()


def test_top_shows_changing_depths_and_rates_and_q_quits(
    qm: QueueManagerClient, terminal: Terminal
) -> None:
    first = terminal.wait_for("3", "ready")
    assert (first["delayed"], first["in_flight"], first["dead"]) == ("0", "0", "0")
    assert terminal.output.startswith(ENTER.encode())
    qm.add_all("jobs", [str(i) for i in range(50)])
    growing = terminal.wait_for("53", "ready")  # the first reading after the add
    assert float(growing["rate"]) > 0
    qm.pull("jobs", 10)
    terminal.wait_for("10", "in_flight")
    terminal.wait_for(r"\+0\.0", "rate")  # pulling moves messages, the total stays
    terminal.type(b"q")
    assert terminal.finish() == 0
    assert terminal.output.endswith(LEAVE.encode())


def test_ctrl_c_leaves_top_with_status_0(terminal: Terminal) -> None:
    terminal.wait_for("3", "ready")
    terminal.type(b"\x03")  # the terminal turns it into SIGINT for its foreground
    assert terminal.finish() == 0
    assert terminal.output.endswith(LEAVE.encode())


def test_sigint_leaves_top_with_status_0(terminal: Terminal) -> None:
    terminal.wait_for("3", "ready")
    terminal.process.send_signal(signal.SIGINT)
    assert terminal.finish() == 0
    assert terminal.output.endswith(LEAVE.encode())


def test_top_without_a_terminal_prints_one_reading(
    server: ServerHandle, qm: QueueManagerClient
) -> None:
    result = run_qm(server, "top")
    assert (result.returncode, result.stderr) == (0, "")
    match = ROW.search(result.stdout)
    assert match is not None
    assert match.groups() == ("3", "0", "0", "0", "-")
    json_result = run_qm(server, "--json", "top")
    assert json_result.stdout.strip() == (
        '{"queues": [{"queue": "jobs", "ready": 3, "delayed": 0, "in_flight": 0, "dead": 0}]}'
    )


@pytest.mark.parametrize("interval", ["0.1", "61", "x"])
def test_top_refuses_an_interval_out_of_bounds(server: ServerHandle, interval: str) -> None:
    result = run_qm(server, "top", "--interval", interval)
    assert result.returncode == 2
    assert "--interval" in result.stderr
