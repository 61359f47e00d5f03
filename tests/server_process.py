"""Run `qm-server` as a real subprocess, as an operator would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

START_TIMEOUT_S = 30.0


def qm_server(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """One `qm-server` command run to its end (a user command, `check`, a refused start)."""
    return subprocess.run(
        [sys.executable, "-m", "qm_server", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


class ServerProcess:
    """`qm-server` on port 0 in a data directory; `port` is read from --port-file."""

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """`prefix` runs the server under another program (strace, in the durability tests)."""
        self.data_dir = data_dir
        self.prefix = list(prefix)
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        port_file = self.data_dir.parent / f"{self.data_dir.name}.port"
        port_file.unlink(missing_ok=True)
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "qm_server",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(self.data_dir),
                "--port-file",
                str(port_file),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"qm-server exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"qm-server did not start:\n{self.log()}")
            time.sleep(0.02)  # the port file appears only once the server serves
        self.port = int(port_file.read_text())
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def health(self) -> int:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            return int(reply.status)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
