"""What each scenario does, in which unit it counts, and how much work one run may do.

Counts cap every run as well as the time limit does: a run stops at whichever comes first,
so a fast server cannot make a run unbounded and a slow one cannot make it endless.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    """One load shape. ``batch`` is the elements per call; 1 for the unary scenarios."""

    name: str
    title: str
    unit: str
    batch: int
    needs_backlog: bool
    max_units: int
    """Cap on units per run at full scale (--quick divides it)."""


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("add", "unary Add", "msgs", 1, False, 60_000),
        Scenario("poll_ack", "Poll + Ack", "msgs", 1, True, 30_000),
        Scenario("addall", "AddAll x100", "elems", 100, False, 600_000),
        Scenario("pull_ack", "PullElements x100 + BatchAck", "elems", 100, True, 600_000),
        Scenario("stream", "Subscribe (window 100)", "elems", 100, True, 600_000),
    )
}

DEFAULT_CONCURRENCY = (1, 64)


@dataclass(frozen=True)
class LoadSpec:
    """Everything one load-client process needs; crosses the process boundary as JSON."""

    address: str
    username: str
    password: str
    scenario: str
    queue_name: str
    tasks: int
    max_units: int
    duration_s: float
    element_size: int
    batch: int
    call_timeout_s: float = 10.0


@dataclass
class LoadResult:
    """What one load-client process measured, between GO and its last task's end."""

    status: str
    """"ok", "unimplemented" (the server lacks the RPC) or "error"."""
    units: int = 0
    iterations: int = 0
    elapsed_s: float = 0.0
    latencies_us: list[int] | None = None
    errors: int = 0
    note: str = ""
