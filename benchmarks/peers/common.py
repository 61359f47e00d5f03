"""The e2e workload's spec and result, shared by every system's client."""

from __future__ import annotations

import socket
from dataclasses import dataclass

CALL_SIZE = 100
"""Elements per AddAll, and the unit of ours' in-flight depth."""


@dataclass(frozen=True)
class E2ESpec:
    """One e2e run; crosses the process boundary as JSON."""

    system: str
    host: str
    port: int
    n: int
    element_size: int
    in_flight: int
    """Messages a client keeps unacknowledged in each phase: its pipeline, confirm window,
    prefetch or fetch size. Ours sends calls of CALL_SIZE, in_flight / CALL_SIZE at a time."""
    timeout_s: float
    name: str
    """Queue, stream or key to use; unique per run and removed afterwards."""
    username: str = ""
    password: str = ""


@dataclass
class E2EResult:
    status: str
    """"ok", "partial" (timed out before all n were acked), "skipped" or "error"."""
    produced: int = 0
    consumed: int = 0
    produce_s: float = 0.0
    consume_s: float = 0.0
    note: str = ""

    @property
    def rate(self) -> float:
        """Messages through the whole produce, consume and ack cycle per second."""
        total = self.produce_s + self.consume_s
        return self.consumed / total if total > 0 and self.consumed else float("nan")


def reachable(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Peers that are not running are skipped with a reason, not reported as failures."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
