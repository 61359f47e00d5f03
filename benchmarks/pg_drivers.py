"""psycopg 3 (with psycopg_pool) against asyncpg on the PostgreSQL store's hot path.

The store's own statements (pg_sql) on the store's own schema, without gRPC or the
server: consumers claim up to `--batch` messages and ack them, `--consumers` of them at
once on one pool of `--pool` connections, from a queue filled beforehand. Each driver
runs in turns, the order reversed every round, each round on a freshly filled queue.
Per driver: messages a second, this process's CPU per message (the driver's cost, as
the server would pay it) and the database backends' CPU per message (the same for both
unless a driver makes the database work more). Usage (see BENCHMARKS.md):

    python -m benchmarks.pg_drivers --store postgresql://127.0.0.1/test --batch 100
    python -m benchmarks.pg_drivers --store postgresql://127.0.0.1/test --batch 1
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from benchmarks.pgstore import drop_schema, fresh_schema
from qm_server.store import pg_sql
from qm_server.store.pg_store import PgStore

Step = Callable[[int], Awaitable[int]]
"""One consumer's turn as session `s`: claim and ack; how many messages it acked."""

FILL_CHUNK = 10_000
SESSION_BASE = 1_000


def asyncpg_text(statement: str, names: list[str]) -> str:
    """A pg_sql statement with `%(name)s` placeholders as asyncpg's `$n` ones."""

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return re.sub(r"%\((\w+)\)s", number, statement)


def claim_params(session: int, batch: int) -> dict[str, Any]:
    return {
        "name": "q",
        "session": session,
        "limit": batch,
        "max_bytes": 4 << 20,
        "lease": None,
        "now": None,
    }


async def psycopg_steps(url: str, schema: str, pool: int, batch: int) -> Any:
    """A psycopg pool configured as the store's, and its claim-and-ack step."""
    from psycopg_pool import AsyncConnectionPool

    async def configure(conn: Any) -> None:
        await conn.execute(f"SET search_path TO {schema}")
        await conn.execute("SET enable_bitmapscan = off")

    conns: Any = AsyncConnectionPool(
        url,
        min_size=pool,
        max_size=pool,
        open=False,
        kwargs={"autocommit": True},
        configure=configure,
    )
    await conns.open(wait=True)

    async def step(session: int) -> int:
        async with conns.connection() as conn:
            cursor = await conn.execute(pg_sql.CLAIM, claim_params(session, batch))
            ids = [int(r[0]) for r in await cursor.fetchall()]
        if not ids:
            return 0
        async with conns.connection() as conn:
            args = {"ids": ids, "session": session}
            cursor = await conn.execute(pg_sql.ACK_DONE, args)
            return len(await cursor.fetchall())

    return step, conns.close


async def asyncpg_steps(url: str, schema: str, pool: int, batch: int) -> Any:
    """An asyncpg pool configured as the store's, and the same claim-and-ack step."""
    import asyncpg  # type: ignore[import-untyped]

    # Settings of the connection, not SETs: asyncpg's pool runs RESET ALL on every release.
    settings = {"search_path": schema, "enable_bitmapscan": "off"}
    conns = await asyncpg.create_pool(url, min_size=pool, max_size=pool, server_settings=settings)
    claim_names: list[str] = []
    claim = asyncpg_text(pg_sql.CLAIM, claim_names)
    ack_names: list[str] = []
    ack = asyncpg_text(pg_sql.ACK_DONE, ack_names)

    async def step(session: int) -> int:
        params = claim_params(session, batch)
        async with conns.acquire() as conn:
            rows = await conn.fetch(claim, *(params[n] for n in claim_names))
        if not rows:
            return 0
        args = {"ids": [int(r[0]) for r in rows], "session": session}
        async with conns.acquire() as conn:
            return len(await conn.fetch(ack, *(args[n] for n in ack_names)))

    return step, conns.close


DRIVERS = {"psycopg": psycopg_steps, "asyncpg": asyncpg_steps}


async def fill(store: PgStore, count: int, size: int) -> None:
    payload = "x" * size
    for start in range(0, count, FILL_CHUNK):
        await store.enqueue("q", [payload] * min(FILL_CHUNK, count - start))
    async with store._conn() as conn:  # fresh statistics: the drivers, not the plan
        await conn.execute("ANALYZE messages")


def backend_cpu(url: str, schema: str) -> float:
    """CPU seconds of the backends whose application_name is the schema's."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        pids = [
            int(r[0])
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (schema,)
            ).fetchall()
        ]
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


async def one_run(args: argparse.Namespace, driver: str) -> tuple[float, float, float]:
    """(messages/s, this process's CPU us/message, backends' CPU us/message)."""
    schema = fresh_schema()
    url = args.store + ("&" if "?" in args.store else "?") + f"application_name={schema}"
    store = PgStore(url, schema=schema, timed=False, notify=False, pool_size=2)
    await store.open()
    try:
        await store.create_queue("q", _room())
        await fill(store, args.messages, args.element_size)
        step, close = await DRIVERS[driver](url, schema, args.pool, args.batch)
        done = 0
        deadline = time.monotonic() + args.duration

        async def consumer(session: int) -> None:
            nonlocal done
            while time.monotonic() < deadline:
                n = await step(session)
                if not n:
                    return
                done += n

        me = psutil.Process()
        db0, cpu0, t0 = backend_cpu(url, schema), me.cpu_times(), time.perf_counter()
        await asyncio.gather(*(consumer(SESSION_BASE + i) for i in range(args.consumers)))
        elapsed = time.perf_counter() - t0
        cpu1, db1 = me.cpu_times(), backend_cpu(url, schema)
        await close()
    finally:
        await store.close()
        drop_schema(args.store, schema)
    own = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    n = max(done, 1)
    return done / elapsed, own * 1e6 / n, (db1 - db0) * 1e6 / n


def _room() -> Any:
    from qm_server.quotas import Room

    return Room.server_wide("queues", 10)


async def run(args: argparse.Namespace) -> int:
    figures: dict[str, list[tuple[float, float, float]]] = {d: [] for d in DRIVERS}
    names = list(DRIVERS)
    for i in range(args.rounds):
        order = names if i % 2 == 0 else names[::-1]
        line = []
        for driver in order:
            figure = await one_run(args, driver)
            figures[driver].append(figure)
            line.append(f"{driver} {figure[0]:,.0f}/s")
        print(f"round {i + 1}/{args.rounds}: " + " | ".join(line), flush=True)
    first = figures[names[0]]
    print(
        f"{'driver':<9} {'msgs/s':>9} {'client CPU us/msg':>18} "
        f"{'backends CPU us/msg':>20}  vs {names[0]} per round"
    )
    for driver, runs in figures.items():
        versus = [r[0] / f[0] for r, f in zip(runs, first, strict=True)]
        print(
            f"{driver:<9} {statistics.median(r[0] for r in runs):>9,.0f} "
            f"{statistics.median(r[1] for r in runs):>18.1f} "
            f"{statistics.median(r[2] for r in runs):>20.1f}  "
            + " ".join(f"{v:.2f}" for v in versus)
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pg_drivers", description=__doc__)
    parser.add_argument("--store", required=True, help="postgresql:// URL (a schema is made)")
    parser.add_argument("--batch", type=int, default=100, help="messages per claim and ack")
    parser.add_argument("--consumers", type=int, default=8)
    parser.add_argument("--pool", type=int, default=10, help="connections in the pool")
    parser.add_argument("--messages", type=int, default=50_000, help="queue filled per run")
    parser.add_argument("--element-size", type=int, default=100)
    parser.add_argument("--duration", type=float, default=5.0, help="time limit per run, s")
    parser.add_argument("--rounds", type=int, default=4)
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
