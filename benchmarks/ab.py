"""``scripts/bench-ab``: interleaved rounds of the floor and several checkouts of our server.

A change worth a few per cent is smaller than this machine's drift between two runs, so
the versions are measured in turns, the order reversed every round, and each is reported
as its median ratio to the floor of the same round.

Each checkout's server runs with that checkout as its working directory: ``python -m``
puts the working directory first on ``sys.path``, so a server started from this repo
would import this repo's ``qm_server`` whatever PYTHONPATH says, and an A/B of two
versions would quietly measure one version twice.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.peers.e2e import run_once
from benchmarks.pgstore import DbProbe, drop_schema, fresh_schema
from benchmarks.procs import ServerProcess
from benchmarks.runner import RunOptions, Target, measure
from benchmarks.scenarios import SCENARIOS
from benchmarks.servers import ADMIN_PASSWORD, ADMIN_USER, start_floor, start_ours
from benchmarks.stats import us_text

E2E_TIMEOUT_S = 120.0
"""Per e2e run: its client stops there and reports what it did."""


@dataclass
class Series:
    """One server's figures, round by round."""

    target: Target
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    db_cpu_us: list[float] = field(default_factory=list)
    db_xacts: list[float] = field(default_factory=list)


def parse_checkout(text: str) -> tuple[str, Path]:
    """``NAME=PATH``: a label and a checkout of this repo (a git worktree, say)."""
    name, sep, path = text.partition("=")
    checkout = Path(path).resolve()
    if not sep or not name or name == "floor":
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (NAME not 'floor'), got {text!r}")
    if not (checkout / "qm_server" / "__main__.py").is_file():
        raise argparse.ArgumentTypeError(f"{checkout} holds no qm_server package")
    return name, checkout


def parse_pair(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` for --store and --nodes."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def start_checkout(
    name: str, checkout: Path, work: Path, store: str | None = None, schema: str | None = None
) -> ServerProcess:
    """Our server as that checkout has it, importing only that checkout's code."""
    run_dir = work / name
    run_dir.mkdir(exist_ok=True)
    return start_ours(
        run_dir / "data", run_dir, name=name, checkout=checkout, store=store, schema=schema
    )


def start_target(
    name: str,
    checkout: Path,
    work: Path,
    store: str | None,
    nodes: int,
    schemas: list[tuple[str, str]],
) -> Target:
    """One checkout as ``nodes`` servers: on SQLite one; on PostgreSQL that many on one
    fresh schema (recorded in ``schemas`` to be dropped), started one after the other so
    that the first applies the migrations."""
    if store is None:
        server = start_checkout(name, checkout, work)
        return Target(name, server, ADMIN_USER, ADMIN_PASSWORD, stateful=True)
    schema = fresh_schema()
    schemas.append((store, schema))
    servers: list[ServerProcess] = []
    try:
        for i in range(nodes):
            node = name if i == 0 else f"{name}-{i + 1}"
            servers.append(start_checkout(node, checkout, work, store, schema))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return Target(
        name,
        servers[0],
        ADMIN_USER,
        ADMIN_PASSWORD,
        stateful=True,
        more_nodes=tuple(servers[1:]),
        db=DbProbe(store, schema),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/bench-ab", description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=parse_checkout, metavar="NAME=PATH")
    parser.add_argument(
        "--store",
        type=parse_pair,
        action="append",
        default=[],
        metavar="NAME=URL",
        help="run checkout NAME on the PostgreSQL store at URL (a fresh schema, dropped after)",
    )
    parser.add_argument(
        "--nodes",
        type=parse_pair,
        action="append",
        default=[],
        metavar="NAME=N",
        help="run checkout NAME (on --store) as N servers on one schema, the load spread over them",
    )
    parser.add_argument(
        "--analyze-after-fill",
        action="store_true",
        help="PostgreSQL store: ANALYZE the messages table once a scenario's backlog is in",
    )
    parser.add_argument("--scenario", choices=sorted([*SCENARIOS, "e2e"]), default="add")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=8.0, help="time limit per run, s")
    parser.add_argument("--scale", type=float, default=10.0, help="multiplies the unit cap")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--e2e-n", type=int, default=50_000, help="messages per e2e run")
    parser.add_argument(
        "--e2e-in-flight", type=int, default=400, help="messages in flight in e2e runs"
    )
    return parser


@dataclass
class Figure:
    """One server's figure in one round; ``rate`` in units per second."""

    status: str
    rate: float
    cpu_us: float
    note: str = ""
    db_cpu_us: float = float("nan")
    db_xacts: float = float("nan")


async def measure_e2e(target: Target, n: int, depth: int) -> Figure:
    """One e2e run (produce n, consume and ack n) against the target, with the server's
    CPU time per message read around it (the run's own queue is set up inside it)."""
    system = "ours" if target.stateful else "floor"
    db0 = target.db.sample() if target.db else None
    cpu0 = target.cpu_seconds()
    r = await run_once(
        system,
        "127.0.0.1",
        target.server.port,
        target.username,
        target.password,
        n,
        depth,
        E2E_TIMEOUT_S,
    )
    cpu_s = target.cpu_seconds() - cpu0
    units = max(r.consumed, 1)
    f = Figure(r.status, r.rate, cpu_s * 1e6 / units, r.note)
    if db0 is not None and target.db is not None:
        db_cpu, xacts = DbProbe.delta(db0, target.db.sample())
        f.db_cpu_us, f.db_xacts = db_cpu * 1e6 / units, xacts / units
    return f


async def measure_one(target: Target, args: argparse.Namespace, opts: RunOptions) -> Figure:
    if args.scenario == "e2e":
        return await measure_e2e(target, args.e2e_n, args.e2e_in_flight)
    m = await measure(target, SCENARIOS[args.scenario], args.concurrency, opts)
    return Figure(
        m.status, m.rate, m.cpu_us_per_unit, m.note, m.db_cpu_us_per_unit, m.db_xacts_per_unit
    )


async def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="qm-bench-ab-"))
    series: list[Series] = []
    schemas: list[tuple[str, str]] = []
    stores, nodes = dict(args.store), {k: int(v) for k, v in args.nodes}
    try:
        floor = start_floor(work, 100)
        series.append(Series(Target("floor", floor, ADMIN_USER, "-", stateful=False)))
        for name, checkout in args.checkouts:
            target = start_target(
                name, checkout, work, stores.get(name), nodes.get(name, 1), schemas
            )
            series.append(Series(target))
            pids = " ".join(str(s.pid) for s in target.nodes)
            where = f", schema {target.db.app_name}" if target.db else ""
            print(f"{name}: pids {pids}{where}", file=sys.stderr, flush=True)
        opts = RunOptions(
            args.duration, args.scale, 100, args.client_procs, work, args.analyze_after_fill
        )
        for i in range(args.rounds):
            line = []
            for s in series if i % 2 == 0 else series[::-1]:
                m = await measure_one(s.target, args, opts)
                if m.status != "ok":
                    print(f"{s.target.name}: {m.status} {m.note}", file=sys.stderr)
                    return 1
                s.rates.append(m.rate)
                s.cpu_us.append(m.cpu_us)
                s.db_cpu_us.append(m.db_cpu_us)
                s.db_xacts.append(m.db_xacts)
                line.append(f"{s.target.name} {m.rate:,.0f}/s")
            print(f"round {i + 1}/{args.rounds}: " + " | ".join(line), flush=True)
    finally:
        for s in series:
            for node in s.target.nodes:
                node.stop()
            if s.target.db is not None:
                s.target.db.close()
        for url, schema in schemas:
            drop_schema(url, schema)
    print(report(series))
    return 0


def report(series: Sequence[Series]) -> str:
    """Per server: median rate and CPU per unit, the median of its per-round ratios to the
    floor and to the first checkout (measured next to it in every round: the order is
    floor, checkouts, then reversed), then each round's ratio to the floor and CPU."""
    floor, first = series[0], series[1]
    lines = [
        f"{'server':<12} {'median/s':>10} {'CPU us/unit':>12} {'ratio':>6} "
        f"{'vs ' + first.target.name:>9}  per round: ratio | CPU us/unit"
    ]
    for s in series:
        ratios = [mine / base for mine, base in zip(s.rates, floor.rates, strict=True)]
        versus = [mine / base for mine, base in zip(s.rates, first.rates, strict=True)]
        lines.append(
            f"{s.target.name:<12} {statistics.median(s.rates):>10,.0f} "
            f"{us_text(statistics.median(s.cpu_us)):>12} {statistics.median(ratios):>6.2f} "
            f"{statistics.median(versus):>9.2f}  "
            + " ".join(f"{r:.2f}" for r in ratios)
            + " | "
            + " ".join(us_text(c) for c in s.cpu_us)
        )
    for s in series:
        if s.target.db is not None:
            lines.append(
                f"{s.target.name:<12} database, median per unit: backends' CPU "
                f"{us_text(statistics.median(s.db_cpu_us))} us, transactions "
                f"{statistics.median(s.db_xacts):.3f} (per round: "
                + " ".join(f"{x:.3f}" for x in s.db_xacts)
                + ")"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
