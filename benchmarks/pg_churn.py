"""A long run of churn on the PostgreSQL store: does the table stay small, does the claim
stay fast, and what does a client holding an old snapshot do to both?

Our server on a fresh schema; one producer (AddAll of 100, at most `--backlog` messages
ahead of the consumer) and one consumer (Subscribe, window 400, each push acked) for
`--minutes`. From `--snapshot-from` to `--snapshot-until` (seconds into the run) another
connection holds a REPEATABLE READ transaction open on the schema, as a long report or a
forgotten session would: vacuum cannot remove any row version deleted after its
snapshot, so the acked rows stay, dead, at the head of the queue's indexes, where every
claim starts. Every `--every` seconds one line: messages consumed a second, the messages
table's size with its indexes, its live and dead rows, the index entries the claims read
per message claimed (`pg_stat_user_indexes`), the database backends' CPU per message
and autovacuum's runs so far. Usage (see BENCHMARKS.md):

    python -m benchmarks.pg_churn --store postgresql://127.0.0.1/test --minutes 5 \\
        --snapshot-from 90 --snapshot-until 180
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psycopg
import psycopg.sql

from benchmarks.login import login, new_stub
from benchmarks.pgstore import DbProbe, drop_schema, fresh_schema
from benchmarks.servers import ADMIN_PASSWORD, ADMIN_USER, start_ours
from benchmarks.stream import AckingStream
from qm.v1 import queue_manager_pb2 as pb

QUEUE = "churn"
BATCH = 100
WINDOW = 400
CALL_TIMEOUT_S = 30.0

TABLE_STATS = """
    SELECT pg_total_relation_size(t.relid), t.n_live_tup, t.n_dead_tup, t.autovacuum_count,
           (SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes i
            WHERE i.relid = t.relid AND i.indexrelname IN ('messages_ready', 'messages_pkey'))
    FROM pg_stat_user_tables t WHERE t.schemaname = %s AND t.relname = 'messages'
"""


class Counters:
    def __init__(self) -> None:
        self.produced = 0
        self.consumed = 0
        self.stop = False


async def produce(stub: Any, token: str, counters: Counters, backlog: int, size: int) -> None:
    payload = ["x" * size] * BATCH
    request = pb.AddAllRequest(token=token, queue_name=QUEUE, elements=payload)
    while not counters.stop:
        if counters.produced - counters.consumed >= backlog:
            await asyncio.sleep(0.005)
            continue
        answer = await stub.AddAll(request, timeout=CALL_TIMEOUT_S)
        if answer.code != pb.CODE_OK:
            raise RuntimeError(f"AddAll: {pb.Code.Name(answer.code)} {answer.message}")
        counters.produced += BATCH


async def consume(stub: Any, token: str, counters: Counters) -> None:
    async with AckingStream(stub, token, QUEUE, WINDOW) as stream:
        while not counters.stop:
            got = await stream.next_batch(time.monotonic() + CALL_TIMEOUT_S)
            if got is None:
                raise RuntimeError("the stream ended")
            counters.consumed += got


def table_stats(conn: Any, schema: str) -> tuple[int, int, int, int, int]:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(TABLE_STATS, (schema,)).fetchone()
    return tuple(int(x) for x in row) if row else (0, 0, 0, 0, 0)  # type: ignore[return-value]


async def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="qm-pg-churn-"))
    schema = fresh_schema()
    server = start_ours(work / "data", work, store=args.store, schema=schema)
    probe = DbProbe(args.store, schema)
    stats = psycopg.connect(args.store, autocommit=True)
    holder: Any = None
    counters = Counters()
    tasks: list[asyncio.Task[None]] = []
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = new_stub(channel)
            token = await login(stub, ADMIN_USER, ADMIN_PASSWORD)
            await stub.NewQueue(pb.NewQueueRequest(token=token, queue_name=QUEUE))
            tasks = [
                asyncio.ensure_future(
                    produce(stub, token, counters, args.backlog, args.element_size)
                ),
                asyncio.ensure_future(consume(stub, token, counters)),
            ]
            print(
                f"{'t s':>5} {'snapshot':>8} {'consumed/s':>10} {'table+idx MB':>12} "
                f"{'live rows':>10} {'dead rows':>10} {'idx reads/msg':>13} "
                f"{'db CPU us/msg':>13} {'autovacuums':>11}",
                flush=True,
            )
            start = time.monotonic()
            db0, done0, reads0 = probe.sample(), 0, table_stats(stats, schema)[4]
            while (elapsed := time.monotonic() - start) < args.minutes * 60:
                await asyncio.sleep(args.every)
                for task in tasks:
                    if task.done():
                        task.result()  # a failed load ends the run with its error
                elapsed = time.monotonic() - start
                holding = args.snapshot_from <= elapsed < args.snapshot_until
                if holding and holder is None:
                    holder = psycopg.connect(args.store)
                    holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                    holder.execute(
                        psycopg.sql.SQL("SELECT count(*) FROM {}.queues").format(
                            psycopg.sql.Identifier(schema)
                        )
                    )
                elif not holding and holder is not None:
                    holder.rollback()
                    holder.close()
                    holder = None
                db1, done1 = probe.sample(), counters.consumed
                size, live, dead, vacuums, reads1 = table_stats(stats, schema)
                n = max(done1 - done0, 1)
                db_cpu, _ = DbProbe.delta(db0, db1)
                print(
                    f"{elapsed:>5.0f} {'held' if holder is not None else '-':>8} "
                    f"{(done1 - done0) / args.every:>10,.0f} {size / 2**20:>12.1f} "
                    f"{live:>10,} {dead:>10,} {(reads1 - reads0) / n:>13.1f} "
                    f"{db_cpu * 1e6 / n:>13.1f} {vacuums:>11}",
                    flush=True,
                )
                db0, done0, reads0 = db1, done1, reads1
            counters.stop = True
    finally:
        counters.stop = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if holder is not None:
            holder.close()
        stats.close()
        probe.close()
        server.stop()
        drop_schema(args.store, schema)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pg_churn", description=__doc__)
    parser.add_argument("--store", required=True, help="postgresql:// URL (a schema is made)")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--every", type=float, default=15.0, help="seconds between lines")
    parser.add_argument("--backlog", type=int, default=10_000, help="produced ahead, at most")
    parser.add_argument("--element-size", type=int, default=100)
    parser.add_argument("--snapshot-from", type=float, default=float("inf"), metavar="S")
    parser.add_argument("--snapshot-until", type=float, default=float("inf"), metavar="S")
    args = parser.parse_args(argv)
    if args.minutes > 15:
        parser.error("--minutes: at most 15 (a shared machine)")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
