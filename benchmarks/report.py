"""Aggregates runs into rows, checks the issue's targets, prints tables and writes JSON.

Ratios are computed inside each run (ours and the floor measured back to back) and only
then summarised by the median, because the machine's background load moves both figures
of one run together but differs between runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from benchmarks.backlog import BacklogResult
from benchmarks.big_reads import BigReadsResult
from benchmarks.delayed import DelayedResult
from benchmarks.peers.e2e import AT_LEAST_AS_DURABLE_AS_OURS, CONTEXT_ONLY, E2ERow
from benchmarks.runner import Measurement
from benchmarks.scenarios import SCENARIOS
from benchmarks.stats import median

HEADER = (
    f"{'scenario':<30} {'conc':>4} {'unit':>5} {'ours ops/s':>11} {'floor ops/s':>11} "
    f"{'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} {'floor p50':>9} {'CPU us/msg':>10} "
    f"{'floor CPU':>9} {'RSS MB':>7}"
)


@dataclass
class Summary:
    """One target's figures for one row: medians over runs of the measurements that worked."""

    status: str
    rate: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    cpu_us: float = math.nan
    rss_mb: float = math.nan
    note: str = ""


@dataclass
class Row:
    scenario: str
    concurrency: int
    ours: Summary
    floor: Summary
    ratio: float
    ratios: list[float] = field(default_factory=list)


@dataclass
class Target:
    name: str
    verdict: str
    """PASS, FAIL or n/a."""
    detail: str


def summarise(ms: Sequence[Measurement]) -> Summary:
    good = [m for m in ms if m.status in ("ok", "partial")]
    if not good:
        first = ms[0] if ms else None
        return Summary(first.status if first else "n/a", note=first.note if first else "")
    return Summary(
        status="ok" if all(m.status == "ok" for m in good) else "partial",
        rate=median([m.rate for m in good]),
        p50_ms=median([m.p50_ms for m in good]),
        p99_ms=median([m.p99_ms for m in good]),
        cpu_us=median([m.cpu_us_per_unit for m in good]),
        rss_mb=max(m.rss_mb for m in good),
        note=next((m.note for m in ms if m.note), ""),
    )


def build_rows(runs: Sequence[Sequence[tuple[Measurement, Measurement]]]) -> list[Row]:
    """runs[i] holds (ours, floor) pairs of run i, in the same order for every run."""
    rows: list[Row] = []
    if not runs:
        return rows
    for j, (ours0, _floor0) in enumerate(runs[0]):
        pairs = [run[j] for run in runs]
        ratios = [
            o.rate / f.rate
            for o, f in pairs
            if o.status in ("ok", "partial") and f.status in ("ok", "partial") and f.rate > 0
        ]
        rows.append(
            Row(
                ours0.scenario,
                ours0.concurrency,
                summarise([o for o, _ in pairs]),
                summarise([f for _, f in pairs]),
                median(ratios),
                ratios,
            )
        )
    return rows


def _num(x: float, fmt: str = ".0f") -> str:
    return "-" if math.isnan(x) else format(x, fmt)


def print_rows(rows: Sequence[Row], out: TextIO) -> None:
    print(HEADER, file=out)
    print("-" * len(HEADER), file=out)
    for r in rows:
        sc = SCENARIOS[r.scenario]
        ok = r.ours.status in ("ok", "partial")
        ours_rate = _num(r.ours.rate) if ok else r.ours.status
        print(
            f"{sc.title:<30} {r.concurrency:>4} {sc.unit:>5} {ours_rate:>11} "
            f"{_num(r.floor.rate):>11} {_num(r.ratio, '.2f'):>6} {_num(r.ours.p50_ms, '.2f'):>7} "
            f"{_num(r.ours.p99_ms, '.2f'):>7} {_num(r.floor.p50_ms, '.2f'):>9} "
            f"{_num(r.ours.cpu_us, '.1f'):>10} {_num(r.floor.cpu_us, '.1f'):>9} "
            f"{_num(r.ours.rss_mb):>7}",
            file=out,
        )
    notes = [
        f"  {r.scenario} c{r.concurrency} {who}: {s.status} {s.note}"
        for r in rows
        for who, s in (("ours", r.ours), ("floor", r.floor))
        if s.note or s.status not in ("ok",)
    ]
    if notes:
        print("notes:", file=out)
        for n in notes:
            print(n, file=out)


def print_e2e(rows: Sequence[E2ERow], out: TextIO) -> None:
    """One table per in-flight depth; ours/this compares with ours at the same depth."""
    for depth in sorted({r.in_flight for r in rows if r.in_flight}):
        at_depth = [r for r in rows if r.in_flight == depth]
        ours = next((r.rate for r in at_depth if r.system == "ours"), math.nan)
        print(
            f"\nend-to-end: produce N, then consume and ack all (1 client, {depth} in flight)",
            file=out,
        )
        head = (
            f"{'system':<15} {'msgs/s':>8} {'produce/s':>10} {'consume/s':>10} {'ours/this':>9}  "
            "durability"
        )
        print(head, file=out)
        print("-" * (len(head) + 40), file=out)
        for r in at_depth:
            if r.status in ("ok", "partial"):
                print(
                    f"{r.system:<15} {_num(r.rate):>8} {_num(r.produce_rate):>10} "
                    f"{_num(r.consume_rate):>10} {_num(ours / r.rate, '.2f'):>9}  {r.durability}"
                    + (f"  [{r.status}: {r.note}]" if r.note or r.status != "ok" else ""),
                    file=out,
                )
            else:
                print(f"{r.system:<15} {r.status}: {r.note}  ({r.durability})", file=out)
    for r in rows:
        if not r.in_flight:
            print(f"{r.system:<15} {r.status}: {r.note}  ({r.durability})", file=out)


def _best_e2e(rows: Sequence[E2ERow], system: str) -> E2ERow | None:
    """A system's fastest depth: each is judged in its best client mode."""
    measured = [r for r in rows if r.system == system and not math.isnan(r.rate)]
    return max(measured, key=lambda r: r.rate, default=None)


def print_backlog(b: BacklogResult | None, out: TextIO) -> None:
    if b is None:
        return
    print(f"\nbacklog: {b.backlog:,} queued {b.element_size}-byte messages", file=out)
    for line in b.lines():
        print(f"  {line}", file=out)


def print_big_reads(b: BigReadsResult | None, out: TextIO) -> None:
    if b is None:
        return
    print(f"\nadd_beside_big_reads: a map of {b.map_mb:.0f} MiB, {b.readers} readers", file=out)
    for line in b.lines():
        print(f"  {line}", file=out)


def print_delayed(d: DelayedResult | None, out: TextIO) -> None:
    if d is None:
        return
    print(f"\ndelayed_backlog: claims of ready messages beside {d.delayed:,} delayed", file=out)
    for line in d.lines():
        print(f"  {line}", file=out)


def _row(rows: Sequence[Row], scenario: str, c: int) -> Row | None:
    return next((r for r in rows if r.scenario == scenario and r.concurrency == c), None)


def check_targets(
    rows: Sequence[Row], e2e: Sequence[E2ERow], backlog: BacklogResult | None
) -> list[Target]:
    """The issue's targets, each judged only when its scenario ran; n/a otherwise."""
    out: list[Target] = []
    for scenario, c, floor_share in (
        ("add", 64, 0.80),
        ("poll_ack", 64, 0.80),
        ("addall", 64, 0.70),
        ("pull_ack", 64, 0.70),
    ):
        r = _row(rows, scenario, c)
        name = f"{SCENARIOS[scenario].title} c{c} >= {floor_share:.0%} of floor"
        if r is None or math.isnan(r.ratio):
            out.append(Target(name, "n/a", "not measured"))
        else:
            verdict = "PASS" if r.ratio >= floor_share else "FAIL"
            out.append(Target(name, verdict, f"ratio {r.ratio:.2f}"))
    r = _row(rows, "add", 1)
    name = "durable Add c1 p50 within 0.3 ms of floor"
    if r is None or math.isnan(r.ours.p50_ms) or math.isnan(r.floor.p50_ms):
        out.append(Target(name, "n/a", "not measured"))
    else:
        gap = r.ours.p50_ms - r.floor.p50_ms
        out.append(Target(name, "PASS" if gap <= 0.3 else "FAIL", f"+{gap:.2f} ms"))
    ours = _best_e2e(e2e, "ours")
    for system in dict.fromkeys(r.system for r in e2e):
        if system == "ours" or system in CONTEXT_ONLY:
            continue
        strength = "equal" if system in AT_LEAST_AS_DURABLE_AS_OURS else "weaker"
        name = f"e2e faster than {system} ({strength} durability)"
        peer = _best_e2e(e2e, system)
        if ours is None or peer is None:
            note = next((r.note for r in e2e if r.system == system and r.note), "")
            out.append(Target(name, "n/a", note or "not measured"))
        else:
            verdict = "PASS" if ours.rate > peer.rate else "FAIL"
            out.append(
                Target(
                    name,
                    verdict,
                    f"{ours.rate:.0f} ({ours.in_flight} in flight) vs "
                    f"{peer.rate:.0f} msgs/s ({peer.in_flight} in flight)",
                )
            )
    if backlog is not None:
        out.extend(Target(n, v, d) for n, v, d in backlog.targets())
    return out


def print_targets(targets: Sequence[Target], out: TextIO) -> None:
    if not targets:
        return
    print("\ntargets (issue: performance)", file=out)
    for t in targets:
        print(f"  [{t.verdict:<4}] {t.name}: {t.detail}", file=out)


def write_json(
    path: Path,
    meta: dict[str, Any],
    rows: Sequence[Row],
    raw: Sequence[Sequence[tuple[Measurement, Measurement]]],
    e2e: Sequence[E2ERow],
    backlog: BacklogResult | None,
    targets: Sequence[Target],
    big_reads: BigReadsResult | None = None,
    delayed: DelayedResult | None = None,
) -> None:
    """Everything, raw runs included, so a later reader can recompute any figure."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    doc = {
        "meta": meta,
        "rows": [dataclasses.asdict(r) for r in rows],
        "runs": [[[dataclasses.asdict(o), dataclasses.asdict(f)] for o, f in run] for run in raw],
        "e2e": [dataclasses.asdict(r) for r in e2e],
        "backlog": dataclasses.asdict(backlog) if backlog else None,
        "big_reads": dataclasses.asdict(big_reads) if big_reads else None,
        "delayed_backlog": dataclasses.asdict(delayed) if delayed else None,
        "targets": [dataclasses.asdict(t) for t in targets],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(doc), indent=2) + "\n")
