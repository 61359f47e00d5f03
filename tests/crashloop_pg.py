"""The crash loop's PostgreSQL mode: several qm-server nodes on one database, itself a
private PostgreSQL instance (tests/pg_instance.py) that the loop may crash.

Each round starts every node on the same schema; each client process is given every
node, its own first (crashloop_failover: when its node dies it logs in on the next one
and carries on, and after a CODE_UNAVAILABLE answer, which applied nothing, it carries
on too). While the load runs, `play` does this round's faults at random moments:
in even rounds it pauses one node (SIGSTOP, then SIGCONT after up to PAUSE_MAX_S), in
odd rounds it crashes the database (`pg_ctl stop -m immediate`, then start: recovery
from the WAL), and in every round it SIGKILLs one node, after which the load goes on a
moment on the others; at the round's end the rest are SIGKILLed.

What changes in the proofs: what a killed node's sessions held stays in flight until
those sessions expire (SESSION_TTL_S after their last activity, then a sweep of a live
node), possibly in the next round. So the state read between rounds counts in-flight
messages as present (ready, or held by a session that is ending: either way not lost),
the final drain first waits until nothing is in flight, and a claim whose answer was
lost excuses FIFO on its queue for as long as its session may hold what it took
(`SharedStoreHistory`), not only to the round's end.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from signal import SIGCONT, SIGSTOP

import grpc
from crashloop_checker import Delivery, History, ServerState
from crashloop_client import (
    CALL_TIMEOUT_S,
    DEAD_LETTER_QUEUE,
    LIFECYCLE_QUEUE,
    QUEUES,
    USERS,
    Stub,
    login,
)
from crashloop_deploy import SERVER_ARGS, SESSION_TTL_S, Deployment, add_worker
from pg_instance import PgInstance
from server_process import ServerProcess

from qm.v1 import queue_manager_pb2 as pb

SCHEMA = "qm"
SWEEP_MAX_S = 1.0  # the engine sweeps sessions every min(1 s, TTL / 4)
PAUSE_MAX_S = 1.5
# After a node's SIGKILL, the load goes on this long on the others before the round ends.
AFTER_KILL_S = (0.3, 1.0)
# How long a lost claim may keep messages in flight: its session lives until its client
# ends (a round at most; the longest last a few seconds), then it expires and a sweep
# releases them.
ROUND_MAX_S = 60.0
LOST_CLAIM_HOLD_S = ROUND_MAX_S + SESSION_TTL_S + SWEEP_MAX_S
SETTLE_TIMEOUT_S = 30.0


class SharedStoreHistory(History):
    """The proofs for several nodes on one database (the module says what changes)."""

    def lost_claim_may_hold(self, d: Delivery, round_no: int) -> bool:
        return any(
            r["q"] == d.queue and r["t0"] < d.t1 and r["t1"] + LOST_CLAIM_HOLD_S > d.t0
            for r in self.lost_claims
        )


class PgCluster(Deployment):
    """`nodes` qm-server processes on the schema `qm` of a private PostgreSQL instance."""

    history = SharedStoreHistory

    def __init__(self, work_dir: Path, nodes: int) -> None:
        super().__init__()
        self.work_dir = work_dir
        self.db = PgInstance()
        self.nodes: list[ServerProcess] = []
        self.count = nodes
        self.killed = 0  # nodes SIGKILLed this round

    def _store_args(self) -> list[str]:
        return ["--store", self.db.url, "--store-schema", SCHEMA]

    def _node(self, index: int, admin_password: str = "") -> ServerProcess:
        data = self.work_dir / f"node{index}"
        args = (*SERVER_ARGS, *self._store_args())
        return ServerProcess(data, *args, env={"QM_ADMIN_PASSWORD": admin_password})

    def setup(self) -> None:
        self.db.start()
        first = self._node(0, admin_password=USERS["admin"])
        if first.start().terminate() != 0:
            raise RuntimeError(f"the first start failed:\n{first.log()}")
        add_worker(self._store_args())

    def start(self) -> list[str]:
        self.nodes = [self._node(i) for i in range(self.count)]
        failures: list[BaseException] = []

        def start(node: ServerProcess) -> None:
            try:
                node.start()
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=start, args=(n,)) for n in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        return [n.target for n in self.nodes]

    def client_args(self, targets: list[str], client: int) -> list[str]:
        mine = targets[client % len(targets) :] + targets[: client % len(targets)]
        return [arg for target in mine for arg in ("--target", target)] + ["--failover"]

    def play(self, rng: random.Random, round_no: int, delay: float) -> None:
        victim = rng.randrange(self.count)
        before = rng.uniform(0, delay)
        time.sleep(before)
        if round_no % 2 == 0 and self.count > 1:
            paused = rng.choice([i for i in range(self.count) if i != victim])
            proc = self.nodes[paused].proc
            assert proc is not None
            proc.send_signal(SIGSTOP)
            time.sleep(rng.uniform(0.1, PAUSE_MAX_S))
            proc.send_signal(SIGCONT)
            self.figures["node pauses (SIGSTOP)"] += 1
        elif round_no % 2 == 1:
            self.db.restart("immediate")
            self.figures["database crashes and restarts"] += 1
        time.sleep(max(0.0, delay - before))
        self.nodes[victim].kill()
        self.killed += 1
        self.figures["node SIGKILLs mid-load"] += 1
        time.sleep(rng.uniform(*AFTER_KILL_S))

    def kill(self) -> int:
        """SIGKILL the nodes still running; how many died this round, the victim too."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(SIGCONT)
                node.kill()
                self.killed += 1
        killed, self.killed = self.killed, 0
        return killed

    def between_rounds(self, state: ServerState) -> ServerState:
        """In flight now means held by a killed node's session: present, not lost."""
        for queue, held in state.in_flight.items():
            if queue in QUEUES:
                state.ready[queue] += held
            state.in_flight[queue] = 0
        return state

    def settle(self, target: str) -> None:
        """Wait until what killed nodes' sessions held is released (they expire)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        with grpc.insecure_channel(target) as channel:
            stub = Stub(channel)
            token = login(stub)
            while True:
                held = sum(
                    stub.GetUncheckNum(
                        pb.GetUncheckNumRequest(token=token, queue_name=q), timeout=CALL_TIMEOUT_S
                    ).ack_num
                    for q in (*QUEUES, LIFECYCLE_QUEUE, DEAD_LETTER_QUEUE)
                )
                if not held or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            stub.Logout(pb.LogoutRequest(token=token), timeout=CALL_TIMEOUT_S)

    def terminate(self) -> list[str]:
        problems = []
        for index, node in enumerate(self.nodes):
            code = node.terminate()
            if code != 0:
                problems.append(f"node {index} exited {code} on SIGTERM")
        return problems

    def log(self) -> str:
        return "".join(ServerProcess.log(self._node(i)) for i in range(self.count))

    def stop(self) -> None:
        try:
            self.kill()
        finally:
            self.db.stop()
