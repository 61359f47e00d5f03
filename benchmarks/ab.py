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

from benchmarks.procs import ServerProcess
from benchmarks.runner import RunOptions, Target, measure
from benchmarks.scenarios import SCENARIOS
from benchmarks.servers import ADMIN_PASSWORD, ADMIN_USER, start_floor, start_ours


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
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="add")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=8.0, help="time limit per run, s")
    parser.add_argument("--scale", type=float, default=10.0, help="multiplies the unit cap")
    parser.add_argument("--client-procs", type=int, default=2)
    return parser


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
        scenario = SCENARIOS[args.scenario]
        for i in range(args.rounds):
            line = []
            for s in series if i % 2 == 0 else series[::-1]:
                m = await measure(s.target, scenario, args.concurrency, opts)
                if m.status != "ok":
                    print(f"{s.target.name}: {m.status} {m.note}", file=sys.stderr)
                    return 1
                s.rates.append(m.rate)
                s.cpu_us.append(m.cpu_us_per_unit)
                line.append(f"{s.target.name} {m.rate:,.0f}/s")
            print(f"round {i + 1}/{args.rounds}: " + " | ".join(line), flush=True)
    finally:
        for s in series:
            s.target.server.stop()
    print(report(series))
    return 0


def report(series: Sequence[Series]) -> str:
    floor = series[0]
    lines = [f"{'server':<12} {'median/s':>10} {'CPU us/unit':>12} {'ratio':>6}  per round"]
    for s in series:
        ratios = [mine / base for mine, base in zip(s.rates, floor.rates, strict=True)]
        lines.append(
            f"{s.target.name:<12} {statistics.median(s.rates):>10,.0f} "
            f"{statistics.median(s.cpu_us):>12.0f} {statistics.median(ratios):>6.2f}  "
            + " ".join(f"{r:.2f}" for r in ratios)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
