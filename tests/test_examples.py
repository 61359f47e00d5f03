"""The Python examples, run as a user would run them, so that they stay true."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from client_fixtures import ROOT, SUBPROCESS_TIMEOUT, client_env, connect, run

from conftest import ServerHandle
from qm_client import QueueManagerClient


@pytest.fixture
def qm(server: ServerHandle) -> Iterator[QueueManagerClient]:
    with connect(server) as client:
        yield client


def example(server: ServerHandle, name: str, *args: str, stdin: str | None = None) -> str:
    result = run([sys.executable, str(ROOT / "examples" / name), *args], client_env(server), stdin)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_producer_then_worker(server: ServerHandle, qm: QueueManagerClient) -> None:
    ids = example(server, "producer.py", "jobs", "1", "2", "oops").split()
    more = example(server, "producer.py", "jobs", stdin="4\n").split()
    assert [int(i) for i in ids + more] == list(range(int(ids[0]), int(ids[0]) + 4))
    assert qm.size("jobs") == 4

    out = example(
        server,
        "worker.py",
        "jobs",
        "--results",
        "squares",
        "--max-deliveries",
        "3",
        "--idle-exit",
        "0.5",
    )

    assert qm.map("squares").to_dict() == {"1": "1", "2": "4", "4": "16"}
    assert (qm.size("jobs"), qm.unacked("jobs")) == (0, 0)
    parked = qm.pull("jobs.dead", 10)
    assert [m.element for m in parked] == ["oops"]
    lines = out.splitlines()
    assert "worker: done '1' -> 1" in lines
    assert "worker: failed 'oops' (attempt 1), will retry: " in "\n".join(lines)
    assert "worker: failed 'oops' (attempt 2), will retry: " in "\n".join(lines)
    assert any(
        line.startswith("worker: parked 'oops' in jobs.dead after 3 attempts") for line in lines
    )
    assert lines[-1] == "worker: no message in jobs within 0.5 s, exiting"


def test_worker_stops_cleanly_on_sigterm(server: ServerHandle, qm: QueueManagerClient) -> None:
    qm.new_queue("jobs")
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "worker.py"), "jobs", "--wait", "1"],
        env=client_env(server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        qm.add("jobs", "3")
        assert worker.stdout is not None
        assert worker.stdout.readline() == "worker: done '3' -> 9\n"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=SUBPROCESS_TIMEOUT) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        rest, stderr = worker.communicate()
    assert (rest, stderr) == ("", "")
    assert qm.map("results").to_dict() == {"3": "9"}
    assert (qm.size("jobs"), qm.unacked("jobs")) == (0, 0)
