"""A crash-loop load client for several nodes on one database (crashloop_pg.py).

Where the plain load client (crashloop_client.LoadClient) stops when its server dies,
this one carries on as a client of a cluster would:
- when its node stops answering, it goes on at the next node of its list, logging a
  `failover` record: in the same session while that lives (sessions are the database's:
  any node accepts any live token), else in a new one (what the old one held comes back
  when it expires); it stops when no node answers;
- an answer CODE_UNAVAILABLE (the database is out of reach) applied nothing: it is
  logged as `unavailable`, which the proofs hold to that (crashloop_checker), and after a
  short pause the load goes on; a login answered UNAVAILABLE is tried again. A commit
  whose answer the node's database connection lost is answered with the gRPC status
  UNAVAILABLE instead (store/pg_outcome.py), an unknown outcome like any lost answer,
  after which the client moves to the next node.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from crashloop_client import (
    CALL_TIMEOUT_S,
    LoadClient,
    LoginRefused,
    Record,
    ServerGone,
    Stub,
)

from qm.v1 import queue_manager_pb2 as pb

OUTAGE_PAUSE_S = 0.1  # after an UNAVAILABLE answer, before the next call
LOGIN_ATTEMPTS = 100  # a login answered UNAVAILABLE is tried again, this many times at most


class FailoverClient(LoadClient):
    """LoadClient over `targets`, the first its home; close() closes every channel."""

    def __init__(self, targets: list[str], *rest: Any) -> None:
        """`rest`: LoadClient's arguments after its stub (user, rng, out, ...)."""
        self.targets = targets
        self.channels = [grpc.insecure_channel(target) for target in targets]
        self.at = 0  # the node in use
        super().__init__(Stub(self.channels[0]), *rest)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def login(self) -> None:
        for attempt in range(LOGIN_ATTEMPTS):
            try:
                super().login()
                return
            except LoginRefused as refused:
                if refused.code != pb.CODE_UNAVAILABLE or attempt == LOGIN_ATTEMPTS - 1:
                    raise
                time.sleep(OUTAGE_PAUSE_S)

    def _write(self, record: Record) -> None:
        codes = (record.get("code"), *record.get("codes", ()))
        if record["st"] == "failed" and pb.CODE_UNAVAILABLE in codes:
            record.update(st="unavailable", grpc="CODE_UNAVAILABLE")
            time.sleep(OUTAGE_PAUSE_S)
        super()._write(record)

    def run(self, max_ops: int, until: float) -> int:
        done = 0
        while True:
            done += super().run(max_ops - done, until)
            if done >= max_ops or time.monotonic() > until or not self.fail_over():
                return done

    def fail_over(self) -> bool:
        """Go on at the next node that answers: in the same session if it still lives
        (any node accepts any live token), else in a new one; False when none answers."""
        for step in range(1, len(self.targets)):
            at = (self.at + step) % len(self.targets)
            self.stub = Stub(self.channels[at])
            try:
                kept = self._session_lives()
                if not kept:
                    self.login()
            except (grpc.RpcError, ServerGone):
                continue
            self.at = at
            self.seq += 1
            record: Record = {"op": "failover", "st": "moved", "to": self.targets[at]}
            self._stamp(record)
            record.update(t1=record["t0"], kept=kept)
            self._write(record)
            return True
        return False

    def _session_lives(self) -> bool:
        beat = self.stub.HeartBeat(pb.HeartBeatRequest(token=self.token), timeout=CALL_TIMEOUT_S)
        return bool(beat.code == pb.CODE_OK)
