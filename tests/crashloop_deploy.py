"""What the crash loop runs and crashes: one qm-server on a data directory (`OneServer`),
or several nodes on one PostgreSQL database (crashloop_pg.PgCluster).

tests/crashloop.py drives a deployment the same way whatever it is: `setup` once (users),
then each round `start` (the targets, the first of which the runner reads the state
through), `client_args` per client process, `play` while the load runs (sleeps; a cluster
also pauses a node, restarts its database and kills a node meanwhile), `kill` at the
round's end; after the last round one more `start`, `settle`, the drain, `terminate`.
"""

from __future__ import annotations

import abc
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from crashloop_checker import History, ServerState
from crashloop_client import USERS, WORKER_GRANTS
from server_process import ServerProcess

# Short, so that an idle client sees its session expire within a round; clients call
# far more often than this, and one that stalls past it logs in again.
SESSION_TTL_S = 0.4
SERVER_ARGS = ("--rsa-bits", "2048", "--session-ttl", str(SESSION_TTL_S))


class Deployment(abc.ABC):
    """The servers of one crash loop run; `figures` counts the faults it caused."""

    history: type[History] = History  # the proofs that fit this deployment

    def __init__(self) -> None:
        self.figures: Counter[str] = Counter()

    @abc.abstractmethod
    def setup(self) -> None:
        """Create the store with the admin, then the worker and its grants."""

    @abc.abstractmethod
    def start(self) -> list[str]:
        """Start the round's servers; their targets."""

    def client_args(self, targets: list[str], client: int) -> list[str]:
        """The load client's arguments that say where to connect."""
        return ["--target", targets[client % len(targets)]]

    def play(self, rng: random.Random, round_no: int, delay: float) -> None:
        """While the load runs: wait `delay` (the random moment of the kill)."""
        time.sleep(delay)

    @abc.abstractmethod
    def kill(self) -> int:
        """SIGKILL every server still running; how many."""

    def settle(self, target: str) -> None:  # noqa: B027 (nothing to wait for by default)
        """Before the final drain: wait until nothing is in flight for a dead session."""

    def between_rounds(self, state: ServerState) -> ServerState:
        """The state as the checks after a restart expect it."""
        return state

    @abc.abstractmethod
    def terminate(self) -> list[str]:
        """Stop the servers with SIGTERM; a problem per one that did not exit 0."""

    @abc.abstractmethod
    def log(self) -> str:
        """Every server log of the run."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop whatever still runs (the end of the run, whatever happened)."""


def qm_server_user(store_args: list[str], *args: str, password: str | None = None) -> None:
    """One `qm-server [store_args] user ...` command, which must succeed."""
    subprocess.run(
        [sys.executable, "-m", "qm_server", *store_args, "user", *args],
        input=None if password is None else password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def add_worker(store_args: list[str]) -> None:
    qm_server_user(store_args, "add", "worker", "--password-stdin", password=USERS["worker"])
    for actions, kind, pattern in WORKER_GRANTS:
        qm_server_user(store_args, "grant", "worker", actions, kind, pattern)


class OneServer(Deployment):
    """qm-server on `work_dir/data`, started anew each round and SIGKILLed at its end."""

    def __init__(self, work_dir: Path) -> None:
        super().__init__()
        self.data = work_dir / "data"
        self.server = ServerProcess(self.data, *SERVER_ARGS, env={"QM_ADMIN_PASSWORD": ""})

    def setup(self) -> None:
        first = ServerProcess(self.data, *SERVER_ARGS, env={"QM_ADMIN_PASSWORD": USERS["admin"]})
        if first.start().terminate() != 0:
            raise RuntimeError(f"the first start failed:\n{first.log()}")
        add_worker(["--data-dir", str(self.data)])

    def start(self) -> list[str]:
        self.server = ServerProcess(self.data, *SERVER_ARGS, env={"QM_ADMIN_PASSWORD": ""})
        return [self.server.start().target]

    def kill(self) -> int:
        self.server.kill()
        return 1

    def terminate(self) -> list[str]:
        code = self.server.terminate()
        return [] if code == 0 else [f"qm-server exited {code} on SIGTERM"]

    def log(self) -> str:
        return self.server.log()

    def stop(self) -> None:
        self.server.stop()
