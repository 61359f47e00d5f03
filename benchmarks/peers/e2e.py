"""Runs the e2e workload on ours, the floor and each reachable peer, with durability labels.

Each peer is reached on 127.0.0.1 only. A peer whose server is not listening is skipped
with the reason printed; the durable Redis runs use a private redis-server instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from benchmarks.peers.common import E2EResult, E2ESpec, reachable
from benchmarks.peers.redis_instance import DurableRedis
from benchmarks.procs import RESULT_GRACE_S, spawn_client
from benchmarks.stats import median

RABBIT = ("127.0.0.1", 5672)
REDIS = ("127.0.0.1", 6379)
NATS = ("127.0.0.1", 4222)

DURABILITY = {
    "ours": "fsync before every OK (default durability)",
    "floor": "none (stores nothing)",
    "rabbitmq": "durable queue, persistent msgs, confirm after fsync",
    "redis-always": "AOF appendfsync always (fsync before reply)",
    "redis-everysec": "AOF appendfsync everysec (power cut loses <=1 s)",
    "redis-none": "no persistence (the shared instance)",
    "nats": "file store, default sync every 2 min (power cut loses acked msgs)",
}
"""What a power cut right after an OK loses, per system: the column targets are read by."""

AT_LEAST_AS_DURABLE_AS_OURS = {"rabbitmq", "redis-always"}
CONTEXT_ONLY = {"floor", "redis-none"}
"""Shown for orientation; the issue's e2e target does not name them."""


@dataclass
class E2ERow:
    system: str
    durability: str
    status: str
    in_flight: int
    """The depth it was measured at; 0 for a system skipped at every depth."""
    rate: float = math.nan
    produce_rate: float = math.nan
    consume_rate: float = math.nan
    runs: list[float] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class E2EOptions:
    n: int
    element_size: int
    runs: int
    timeout_s: float
    peers: bool
    depths: tuple[int, ...] = (100, 400)
    """Messages in flight (E2ESpec.in_flight): every system is measured at each."""


async def _run_client(spec: E2ESpec) -> E2EResult:
    proc = await spawn_client(
        "benchmarks.peers.client",
        spec,
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), spec.timeout_s + RESULT_GRACE_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return E2EResult(status="error", note="client did not finish in time")
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("RESULT "):
            return E2EResult(**json.loads(line[len("RESULT ") :]))
    return E2EResult(status="error", note=f"client exited {proc.returncode} without a result")


async def run_once(
    system: str, host: str, port: int, user: str, pw: str, n: int, depth: int, timeout_s: float
) -> E2EResult:
    """One e2e run of 100-byte messages on a queue of its own (scripts/bench-ab)."""
    name = f"bench.e2e.{uuid.uuid4().hex[:8]}"
    return await _run_client(E2ESpec(system, host, port, n, 100, depth, timeout_s, name, user, pw))


async def _measure_depths(
    label: str, system: str, host: str, port: int, opts: E2EOptions, user: str = "", pw: str = ""
) -> list[E2ERow]:
    return [
        await _measure(label, system, host, port, opts, depth, user, pw) for depth in opts.depths
    ]


async def _measure(
    label: str,
    system: str,
    host: str,
    port: int,
    opts: E2EOptions,
    depth: int,
    user: str = "",
    pw: str = "",
) -> E2ERow:
    row = E2ERow(label, DURABILITY[label], status="ok", in_flight=depth)
    results: list[E2EResult] = []
    for _ in range(opts.runs):
        spec = E2ESpec(
            system=system,
            host=host,
            port=port,
            n=opts.n,
            element_size=opts.element_size,
            in_flight=depth,
            timeout_s=opts.timeout_s,
            name=f"bench.e2e.{uuid.uuid4().hex[:8]}",
            username=user,
            password=pw,
        )
        r = await _run_client(spec)
        results.append(r)
        if r.status in ("skipped", "error"):
            break
    good = [r for r in results if r.status in ("ok", "partial")]
    if not good:
        row.status, row.note = results[-1].status, results[-1].note
        return row
    row.status = "ok" if all(r.status == "ok" for r in good) else "partial"
    row.runs = [r.rate for r in good]
    row.rate = median(row.runs)
    row.produce_rate = median([r.produced / r.produce_s for r in good if r.produce_s > 0])
    row.consume_rate = median([r.consumed / r.consume_s for r in good if r.consume_s > 0])
    row.note = next((r.note for r in results if r.note), "")
    return row


@contextlib.contextmanager
def _durable_redis(mode: str) -> Iterator[tuple[int, str]]:
    """Yields (port, "") or (0, reason) so that a missing redis-server is a skip, not a crash."""
    reason = DurableRedis.available() or ""
    if reason:
        yield 0, reason
        return
    with contextlib.ExitStack() as stack:
        port = 0
        try:
            port = stack.enter_context(DurableRedis(mode))
        except Exception as e:
            reason = f"could not start redis-server: {e}"
        yield port, reason


def _skipped(label: str, reason: str) -> list[E2ERow]:
    return [E2ERow(label, DURABILITY[label], status="skipped", in_flight=0, note=reason)]


async def _measure_running(
    label: str, system: str, addr: tuple[str, int], opts: E2EOptions, user: str = "", pw: str = ""
) -> list[E2ERow]:
    """A peer the machine already runs: measured if something listens at addr, else skipped."""
    if not reachable(*addr):
        return _skipped(label, f"nothing listening on {addr[0]}:{addr[1]}")
    return await _measure_depths(label, system, *addr, opts, user, pw)


async def run_e2e(
    opts: E2EOptions,
    ours: tuple[str, int, str, str] | None,
    floor: tuple[str, int] | None,
) -> list[E2ERow]:
    """ours is (host, port, user, password), floor is (host, port); either may be absent."""
    rows: list[E2ERow] = []
    if floor:
        rows += await _measure_depths("floor", "floor", *floor, opts, "admin", "-")
    if ours:
        host, port, user, password = ours
        rows += await _measure_depths("ours", "ours", host, port, opts, user, password)
    if not opts.peers:
        return rows
    rows += await _measure_running("rabbitmq", "rabbitmq", RABBIT, opts, "guest", "guest")
    for mode in ("always", "everysec"):
        with _durable_redis(mode) as (port, reason):
            label = f"redis-{mode}"
            if reason:
                rows += _skipped(label, reason)
            else:
                rows += await _measure_depths(label, "redis", "127.0.0.1", port, opts)
    rows += await _measure_running("redis-none", "redis", REDIS, opts)
    rows += await _measure_running("nats", "nats", NATS, opts)
    return rows
