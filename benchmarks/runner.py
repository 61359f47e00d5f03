"""Runs one scenario at one concurrency against one server and turns it into a Measurement.

The measured window is GO to the last client's result: logins, warm-up and backlog filling
happen before it, so the server CPU read around it belongs to the scenario alone.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.admin import AdminClient
from benchmarks.pgstore import DbProbe
from benchmarks.procs import RESULT_GRACE_S, RssSampler, ServerProcess, spawn_client
from benchmarks.scenarios import LoadResult, LoadSpec, Scenario
from benchmarks.stats import percentile

READY_TIMEOUT_S = 90.0
"""Covers interpreter start, imports and a deliberately slow password hash per client."""
STREAM_LINE_LIMIT = 64 * 1024 * 1024
"""A RESULT line carries every latency sample; asyncio's 64 KiB default would cut it."""

Prepare = Callable[[AdminClient, str], Awaitable[None]]
"""Extra setup of a scenario's fresh queue (by name), run before its backlog is filled."""


@dataclass(frozen=True)
class Target:
    """A server under test and how to log in to it."""

    name: str
    server: ServerProcess
    username: str
    password: str
    stateful: bool
    """False for the floor: it needs no queue and no backlog."""
    more_nodes: tuple[ServerProcess, ...] = ()
    """Further servers on the same PostgreSQL schema: the load processes are spread over
    ``server`` and these in turn, and the CPU figure is that of all of them."""
    db: DbProbe | None = None
    """The PostgreSQL store's database side, read around the window like the CPU."""

    @property
    def nodes(self) -> tuple[ServerProcess, ...]:
        return (self.server, *self.more_nodes)

    def cpu_seconds(self) -> float:
        return sum(s.cpu_seconds() for s in self.nodes)


@dataclass(frozen=True)
class RunOptions:
    duration_s: float
    scale: float
    """Multiplies each scenario's unit cap; --quick makes it tiny."""
    element_size: int
    client_procs: int
    """Client processes used when concurrency > 1; the tasks are split among them."""
    log_dir: Path
    analyze_after_fill: bool = False
    """PostgreSQL store: ANALYZE its messages table once the backlog is in (fresh
    statistics for the claim's plan; autovacuum would take up to a minute)."""


@dataclass
class Measurement:
    target: str
    scenario: str
    concurrency: int
    status: str
    units: int = 0
    elapsed_s: float = 0.0
    rate: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    cpu_us_per_unit: float = math.nan
    rss_mb: float = math.nan
    db_cpu_us_per_unit: float = math.nan
    """CPU of the server's PostgreSQL backends per unit (PostgreSQL store only)."""
    db_xacts_per_unit: float = math.nan
    """Database transactions (commits + rollbacks) per unit (PostgreSQL store only)."""
    errors: int = 0
    note: str = ""


class NotImplementedByServer(Exception):
    """The scenario needs an RPC the server answers UNIMPLEMENTED: reported as n/a."""


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


async def _spawn(spec: LoadSpec, log_path: Path) -> asyncio.subprocess.Process:
    with log_path.open("ab") as log:
        return await spawn_client(
            "benchmarks.loadclient",
            spec,
            stdin=asyncio.subprocess.PIPE,
            stderr=log,
            limit=STREAM_LINE_LIMIT,
        )


async def _read_tagged(proc: asyncio.subprocess.Process, tag: str, timeout_s: float) -> str:
    """Next stdout line starting with tag; anything else a library printed is skipped."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {tag} from load client in {timeout_s:.0f}s")
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=left)
        if not line:
            raise RuntimeError(f"load client exited before {tag}")
        text = line.decode().rstrip("\n")
        if text.startswith(tag):
            return text[len(tag) :].strip()


async def _prepare_queue(
    target: Target,
    scenario: Scenario,
    queue: str,
    units: int,
    tasks: int,
    opts: RunOptions,
    prepare: Prepare | None,
) -> None:
    if not target.stateful:
        return
    async with AdminClient(target.server.address, target.username, target.password) as admin:
        await admin.new_queue(queue)
        if prepare is not None:
            await prepare(admin, queue)
        if scenario.name == "stream" and not await admin.supports_subscribe(queue):
            raise NotImplementedByServer("Subscribe not implemented by the server")
        if scenario.needs_backlog:
            # Extra room so that windows held by the last tasks never starve the others.
            await admin.fill(queue, units + tasks * scenario.batch, opts.element_size)
    if opts.analyze_after_fill and target.db is not None:
        target.db.analyze()


async def _drop_queue(target: Target, queue: str) -> None:
    if not target.stateful:
        return
    async with AdminClient(target.server.address, target.username, target.password) as admin:
        await admin.destroy_queue(queue)


async def measure(
    target: Target,
    scenario: Scenario,
    concurrency: int,
    opts: RunOptions,
    prepare: Prepare | None = None,
) -> Measurement:
    """Runs the scenario once; failures come back as a Measurement with status and note.
    ``prepare`` runs on the fresh queue before its backlog is filled, outside the window."""
    m = Measurement(target.name, scenario.name, concurrency, status="error")
    units = max(scenario.batch, int(scenario.max_units * opts.scale))
    procs_n = 1 if concurrency == 1 else max(1, min(opts.client_procs, concurrency))
    queue = f"bench.{scenario.name}.c{concurrency}.{uuid.uuid4().hex[:8]}"
    log_path = opts.log_dir / f"clients-{target.name}.log"
    procs: list[asyncio.subprocess.Process] = []
    try:
        await _prepare_queue(target, scenario, queue, units, concurrency, opts, prepare)
        specs = [
            LoadSpec(
                address=target.nodes[i % len(target.nodes)].address,
                username=target.username,
                password=target.password,
                scenario=scenario.name,
                queue_name=queue,
                tasks=tasks,
                max_units=share,
                duration_s=opts.duration_s,
                element_size=opts.element_size,
                batch=scenario.batch,
            )
            for i, (tasks, share) in enumerate(
                zip(split(concurrency, procs_n), split(units, procs_n), strict=True)
            )
        ]
        procs = [await _spawn(spec, log_path) for spec in specs]
        await asyncio.gather(*(_read_tagged(p, "READY", READY_TIMEOUT_S) for p in procs))
        sampler = RssSampler(target.server)
        sampler.start()
        db0 = target.db.sample() if target.db else None
        cpu0 = target.cpu_seconds()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"GO\n")
            await p.stdin.drain()
        raw = await asyncio.gather(
            *(_read_tagged(p, "RESULT", opts.duration_s + RESULT_GRACE_S) for p in procs)
        )
        cpu1 = target.cpu_seconds()
        db1 = target.db.sample() if target.db else None
        peak = await sampler.stop()
        results = [LoadResult(**json.loads(r)) for r in raw]
        _combine(m, results, cpu1 - cpu0, peak)
        if db0 is not None and db1 is not None and m.units:
            db_cpu, xacts = DbProbe.delta(db0, db1)
            m.db_cpu_us_per_unit = db_cpu * 1e6 / m.units
            m.db_xacts_per_unit = xacts / m.units
    except NotImplementedByServer as e:
        m.status, m.note = "n/a", str(e)
    except Exception as e:  # one broken row must not lose the rest of the run
        m.status, m.note = "error", f"{type(e).__name__}: {e}"[:300]
    finally:
        for p in procs:
            if p.returncode is None:
                try:
                    await asyncio.wait_for(p.wait(), timeout=5)
                except TimeoutError:
                    p.kill()
                    await p.wait()
        try:
            await _drop_queue(target, queue)
        except Exception as e:
            m.note = (m.note + f"; cleanup: {e}")[:300]
    return m


def _combine(m: Measurement, results: list[LoadResult], cpu_s: float, rss: int) -> None:
    m.rss_mb = rss / 2**20
    if any(r.status == "unimplemented" for r in results):
        m.status, m.note = "n/a", "Subscribe not implemented by the server"
        return
    m.units = sum(r.units for r in results)
    m.errors = sum(r.errors for r in results)
    m.elapsed_s = max((r.elapsed_s for r in results), default=0.0)
    notes = [r.note for r in results if r.note]
    m.note = notes[0] if notes else ""
    if m.units == 0 or m.elapsed_s <= 0:
        m.status = "error"
        m.note = m.note or "no unit completed"
        return
    m.status = "ok" if not m.errors else "partial"
    m.rate = m.units / m.elapsed_s
    lat = sorted(x for r in results for x in (r.latencies_us or []))
    m.p50_ms = percentile(lat, 0.50) / 1000
    m.p99_ms = percentile(lat, 0.99) / 1000
    m.cpu_us_per_unit = cpu_s * 1e6 / m.units
