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


def parse_checkout(text: str) -> tuple[str, Path]:
    """``NAME=PATH``: a label and a checkout of this repo (a git worktree, say)."""
    name, sep, path = text.partition("=")
    checkout = Path(path).resolve()
    if not sep or not name or name == "floor":
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (NAME not 'floor'), got {text!r}")
    if not (checkout / "qm_server" / "__main__.py").is_file():
        raise argparse.ArgumentTypeError(f"{checkout} holds no qm_server package")
    return name, checkout


def start_checkout(name: str, checkout: Path, work: Path) -> ServerProcess:
    """Our server as that checkout has it, importing only that checkout's code."""
    run_dir = work / name
    run_dir.mkdir()
    return start_ours(run_dir / "data", run_dir, name=name, checkout=checkout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/bench-ab", description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=parse_checkout, metavar="NAME=PATH")
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


async def measure_e2e(target: Target, n: int, depth: int) -> Figure:
    """One e2e run (produce n, consume and ack n) against the target, with the server's
    CPU time per message read around it (the run's own queue is set up inside it)."""
    system = "ours" if target.stateful else "floor"
    cpu0 = target.server.cpu_seconds()
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
    cpu_s = target.server.cpu_seconds() - cpu0
    return Figure(r.status, r.rate, cpu_s * 1e6 / max(r.consumed, 1), r.note)


async def measure_one(target: Target, args: argparse.Namespace, opts: RunOptions) -> Figure:
    if args.scenario == "e2e":
        return await measure_e2e(target, args.e2e_n, args.e2e_in_flight)
    m = await measure(target, SCENARIOS[args.scenario], args.concurrency, opts)
    return Figure(m.status, m.rate, m.cpu_us_per_unit, m.note)


async def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="qm-bench-ab-"))
    series: list[Series] = []
    try:
        floor = start_floor(work, 100)
        series.append(Series(Target("floor", floor, ADMIN_USER, "-", stateful=False)))
        for name, checkout in args.checkouts:
            server = start_checkout(name, checkout, work)
            series.append(Series(Target(name, server, ADMIN_USER, ADMIN_PASSWORD, stateful=True)))
        opts = RunOptions(args.duration, args.scale, 100, args.client_procs, work)
        for i in range(args.rounds):
            line = []
            for s in series if i % 2 == 0 else series[::-1]:
                m = await measure_one(s.target, args, opts)
                if m.status != "ok":
                    print(f"{s.target.name}: {m.status} {m.note}", file=sys.stderr)
                    return 1
                s.rates.append(m.rate)
                s.cpu_us.append(m.cpu_us)
                line.append(f"{s.target.name} {m.rate:,.0f}/s")
            print(f"round {i + 1}/{args.rounds}: " + " | ".join(line), flush=True)
    finally:
        for s in series:
            s.target.server.stop()
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
