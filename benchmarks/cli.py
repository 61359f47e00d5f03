"""``scripts/bench``: start the floor and our server, run the scenarios, print the report.

Exit status: 0 when the harness ran every requested scenario, even if targets failed
(targets are figures, and the machine is noisy); 1 when a server did not start or a
scenario could not be measured at all (an error, not a slow figure).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc

from benchmarks.backlog import BacklogResult, run_backlog
from benchmarks.big_reads import BigReadsResult, run_big_reads
from benchmarks.delayed import CLAIM_SCENARIOS, DelayedResult, run_delayed
from benchmarks.peers.e2e import E2EOptions, E2ERow, run_e2e
from benchmarks.pgstore import DbProbe, drop_schema, fresh_schema
from benchmarks.procs import ServerProcess, ServerStartError
from benchmarks.report import (
    build_rows,
    check_targets,
    print_backlog,
    print_big_reads,
    print_delayed,
    print_e2e,
    print_rows,
    print_targets,
    write_json,
)
from benchmarks.runner import Measurement, RunOptions, Target, measure
from benchmarks.scenarios import DEFAULT_CONCURRENCY, SCENARIOS
from benchmarks.servers import ADMIN_PASSWORD, ADMIN_USER, start_floor, start_ours

BIG_READS = "add_beside_big_reads"
DELAYED = "delayed_backlog"

ALL_SCENARIOS = [*SCENARIOS, "e2e", BIG_READS, DELAYED]


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark our server against a no-op gRPC floor and peer brokers.",
    )
    p.add_argument("--quick", action="store_true", help="a few-second smoke run (CI)")
    p.add_argument(
        "--scenarios",
        type=_csv,
        default=ALL_SCENARIOS,
        help=f"comma-separated, from: {','.join(ALL_SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in _csv(s)],
        default=list(DEFAULT_CONCURRENCY),
        help="comma-separated concurrency levels (default: 1,64)",
    )
    p.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the e2e workload on RabbitMQ, Redis and NATS too (default: on, off with --quick)",
    )
    p.add_argument("--runs", type=int, default=None, help="runs to take the median of (default 3)")
    p.add_argument("--duration", type=float, default=None, help="time limit per measurement, s")
    p.add_argument("--scale", type=float, default=None, help="multiplies every count cap")
    p.add_argument("--client-procs", type=int, default=2, help="load processes at concurrency>1")
    p.add_argument("--element-size", type=int, default=100)
    p.add_argument("--e2e-n", type=int, default=None, help="messages per e2e run (default 50000)")
    p.add_argument(
        "--e2e-in-flight",
        type=lambda s: tuple(int(x) for x in _csv(s)),
        default=(100, 400),
        help="messages each e2e client keeps in flight, every system at each (default: 100,400)",
    )
    p.add_argument(
        "--backlog", type=int, default=0, metavar="N", help="run the backlog scenario with N msgs"
    )
    p.add_argument(
        "--big-reads-mb",
        type=int,
        default=None,
        metavar="MB",
        help=f"map size for {BIG_READS} (default 32, 8 with --quick)",
    )
    p.add_argument(
        "--big-readers", type=int, default=None, help=f"reader tasks for {BIG_READS} (default 4)"
    )
    p.add_argument(
        "--delayed",
        type=int,
        default=None,
        metavar="N",
        help=f"delayed messages for {DELAYED} (default 200000, 2000 with --quick)",
    )
    p.add_argument(
        "--delayed-claims",
        choices=CLAIM_SCENARIOS,
        default="poll_ack",
        help=f"how {DELAYED} claims the ready messages (default poll_ack)",
    )
    p.add_argument(
        "--store",
        metavar="URL",
        help="run our server on the PostgreSQL store at URL (postgresql://127.0.0.1/test), in "
        "a fresh schema dropped afterwards; the backlog, big-reads and delayed scenarios "
        "keep SQLite",
    )
    p.add_argument("--json", type=Path, help="write every figure, raw runs included, here")
    p.add_argument("--keep", action="store_true", help="keep the work dir (data, logs)")
    return p


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _meta(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    return {
        "started": args.started,
        "load_at_start": args.load_at_start,
        "finished": _now(),
        "command": "scripts/bench " + " ".join(argv),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "load_at_end": os.getloadavg(),
        "runs": args.runs,
        "duration_s": args.duration,
    }


async def _run(args: argparse.Namespace, work: Path) -> int:
    opts = RunOptions(
        duration_s=args.duration,
        scale=args.scale,
        element_size=args.element_size,
        client_procs=1 if args.quick else args.client_procs,
        log_dir=work,
    )
    failed = False
    ours: ServerProcess | None = None
    floor: ServerProcess | None = None
    raw: list[list[tuple[Measurement, Measurement]]] = []
    e2e: list[E2ERow] = []
    backlog: BacklogResult | None = None
    big_reads: BigReadsResult | None = None
    delayed: DelayedResult | None = None
    schema = fresh_schema() if args.store else None
    db: DbProbe | None = None
    try:
        floor = start_floor(work, args.element_size)
        ours = start_ours(work / "data", work, store=args.store, schema=schema)
        if args.store and schema:
            db = DbProbe(args.store, schema)
            print(f"ours on {args.store}, schema {schema}", flush=True)
        print(
            f"floor pid {floor.pid} on {floor.address}; ours pid {ours.pid} on {ours.address} "
            f"(started in {ours.started_s:.1f} s); work dir {work}",
            flush=True,
        )
        t_ours = Target("ours", ours, ADMIN_USER, ADMIN_PASSWORD, stateful=True, db=db)
        t_floor = Target("floor", floor, ADMIN_USER, "-", stateful=False)
        grid = [
            (SCENARIOS[s], c) for s in args.scenarios if s in SCENARIOS for c in args.concurrency
        ]
        for i in range(args.runs if grid else 0):
            run: list[tuple[Measurement, Measurement]] = []
            for scenario, c in grid:
                # Alternate who goes first so that warm-up or drift favours neither side.
                first, second = (t_floor, t_ours) if i % 2 == 0 else (t_ours, t_floor)
                a = await measure(first, scenario, c, opts)
                b = await measure(second, scenario, c, opts)
                o, f = (b, a) if first is t_floor else (a, b)
                print(
                    f"run {i + 1}/{args.runs} {scenario.name:<9} c{c:<3} ours {o.status} "
                    f"{o.rate:,.0f}/s floor {f.status} {f.rate:,.0f}/s",
                    flush=True,
                )
                failed = failed or "error" in (o.status, f.status)
                run.append((o, f))
            raw.append(run)
        if "e2e" in args.scenarios:
            e2e = await run_e2e(
                E2EOptions(
                    args.e2e_n,
                    args.element_size,
                    args.runs,
                    120.0,
                    args.peers,
                    args.e2e_in_flight,
                ),
                ("127.0.0.1", ours.port, ADMIN_USER, ADMIN_PASSWORD),
                ("127.0.0.1", floor.port),
            )
            failed = failed or any(r.status == "error" for r in e2e if r.system == "ours")
    except ServerStartError as e:
        print(f"server did not start: {e}", file=sys.stderr)
        return 1
    finally:
        for s in (ours, floor):
            if s is not None:
                s.stop()
        if db is not None:
            db.close()
        if args.store and schema:
            drop_schema(args.store, schema)
    if args.backlog:
        backlog = await run_backlog(args.backlog, args.element_size, work)
        failed = failed or bool(backlog.error)
    if BIG_READS in args.scenarios:
        big_reads = await run_big_reads(
            args.big_reads_mb * 2**20, args.big_readers, args.duration, work
        )
        failed = failed or bool(big_reads.error)
    if DELAYED in args.scenarios:
        delayed = await run_delayed(
            args.delayed, args.delayed_claims, args.concurrency, args.runs, opts, work
        )
        failed = failed or bool(delayed.error)
    rows = build_rows(raw)
    print()
    print_rows(rows, sys.stdout)
    print_e2e(e2e, sys.stdout)
    print_backlog(backlog, sys.stdout)
    print_big_reads(big_reads, sys.stdout)
    print_delayed(delayed, sys.stdout)
    targets = check_targets(rows, e2e, backlog)
    print_targets(targets, sys.stdout)
    if args.json:
        write_json(
            args.json,
            _meta(args, sys.argv[1:]),
            rows,
            raw,
            e2e,
            backlog,
            targets,
            big_reads,
            delayed,
        )
        print(f"\nJSON written to {args.json}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.started, args.load_at_start = _now(), os.getloadavg()
    unknown = [s for s in args.scenarios if s not in ALL_SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.quick:
        args.runs = args.runs or 1
        args.duration = args.duration or 0.5
        args.scale = args.scale or 0.005
        args.e2e_n = args.e2e_n or 500
        args.big_reads_mb = args.big_reads_mb or 8
        args.big_readers = args.big_readers or 2
        args.delayed = args.delayed or 2_000
        args.peers = bool(args.peers)
    else:
        args.runs = args.runs or 3
        args.duration = args.duration or 4.0
        args.scale = args.scale or 1.0
        args.e2e_n = args.e2e_n or 50_000
        args.big_reads_mb = args.big_reads_mb or 32
        args.big_readers = args.big_readers or 4
        args.delayed = args.delayed or 200_000
        args.peers = True if args.peers is None else args.peers
    work = Path(tempfile.mkdtemp(prefix="qm-bench-"))
    code = 1
    try:
        code = asyncio.run(_run(args, work))
    finally:
        if args.keep or code != 0:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return code
