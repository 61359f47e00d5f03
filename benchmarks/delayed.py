"""The delayed-backlog scenario: claims of ready messages beside a large delayed backlog.

Delays cost no timer per message and wait apart from the ready messages (the store keeps
them in their own table, found through an index on their ready time), so a queue that
holds a large number of delayed messages must claim its ready ones as fast as a queue
that holds none. Each round measures the claim scenario (Poll + Ack by default) on a
fresh queue of ready messages twice: once alone, and once with N messages delayed by a
day added to the same queue first, before the ready ones (so they have the lower ids:
the worst case for a store that would keep both kinds in one table and skip the delayed
ones on every claim). The order alternates each round, and each round's ratio (beside the
backlog / alone) is taken inside the round, so the machine's drift cancels; the median
over rounds is the figure. GetQueueInfo must show exactly N delayed and none ready before
the ready messages are added, or the measurement fails.

It uses its own server and data directory, as the backlog scenario does. Filling is
bounded in time (FILL_TIMEOUT_S), each measurement in time and count as any scenario's.
"""

from __future__ import annotations

import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.admin import AdminClient, SetupFailed
from benchmarks.runner import Measurement, RunOptions, Target, measure
from benchmarks.scenarios import SCENARIOS
from benchmarks.servers import ADMIN_PASSWORD, ADMIN_USER, start_ours
from benchmarks.stats import us_text

DELAY_MS = 86_400_000
"""One day: far beyond any measurement, well inside the 7-day bound of delay_ms."""
FILL_TIMEOUT_S = 120.0
"""Per backlog: 200,000 delayed messages take a few seconds here."""
CLAIM_SCENARIOS = ("poll_ack", "pull_ack")


@dataclass
class DelayedRow:
    """One concurrency: per round, the measurement alone and the one beside the backlog."""

    concurrency: int
    alone: list[Measurement] = field(default_factory=list)
    beside: list[Measurement] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [b.rate / a.rate for a, b in zip(self.alone, self.beside, strict=True)]

    def cpu_ratios(self) -> list[float]:
        pairs = zip(self.alone, self.beside, strict=True)
        return [b.cpu_us_per_unit / a.cpu_us_per_unit for a, b in pairs]

    def p50_ratios(self) -> list[float]:
        """Steadier than the rate at concurrency 1, where a few slow calls move the mean."""
        return [b.p50_ms / a.p50_ms for a, b in zip(self.alone, self.beside, strict=True)]


@dataclass
class DelayedResult:
    delayed: int
    scenario: str
    rows: list[DelayedRow] = field(default_factory=list)
    fill_rates: list[float] = field(default_factory=list)
    """Delayed messages added per second, one figure per backlog."""
    error: str = ""

    def lines(self) -> list[str]:
        if self.error:
            return [f"error: {self.error}"]
        title = SCENARIOS[self.scenario].title
        out = [
            f"backlog: {self.delayed:,} messages delayed by {DELAY_MS // 3_600_000} h, added "
            f"with AddAll delay_ms at {statistics.median(self.fill_rates):,.0f} msgs/s "
            f"(median of {len(self.fill_rates)}); GetQueueInfo showed {self.delayed:,} delayed "
            "and 0 ready each time"
        ]
        for row in self.rows:

            def med(ms: list[Measurement], attr: str) -> float:
                return statistics.median(float(getattr(m, attr)) for m in ms)

            ratios, cpu, p50 = row.ratios(), row.cpu_ratios(), row.p50_ratios()
            out.append(
                f"{title} c{row.concurrency}: alone {med(row.alone, 'rate'):,.0f}/s "
                f"(p50 {med(row.alone, 'p50_ms'):.2f} ms, CPU "
                f"{us_text(med(row.alone, 'cpu_us_per_unit'))} us/unit); beside the backlog "
                f"{med(row.beside, 'rate'):,.0f}/s (p50 {med(row.beside, 'p50_ms'):.2f} ms, "
                f"CPU {us_text(med(row.beside, 'cpu_us_per_unit'))} us/unit)"
            )
            out.append(
                f"  ratio beside / alone: {statistics.median(ratios):.2f} "
                f"(per round {' '.join(f'{r:.2f}' for r in ratios)}); p50 "
                f"{statistics.median(p50):.2f}x; server CPU per unit {statistics.median(cpu):.2f}x"
            )
        return out


async def run_delayed(
    delayed: int,
    scenario: str,
    concurrency: list[int],
    rounds: int,
    opts: RunOptions,
    work_dir: Path,
) -> DelayedResult:
    """Bounded: rounds x concurrency levels x two measurements, each with its own limits."""
    res = DelayedResult(delayed, scenario)
    data_dir = work_dir / "delayed-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    server = start_ours(data_dir, work_dir, name="delayed")
    target = Target("ours", server, ADMIN_USER, ADMIN_PASSWORD, stateful=True)

    async def add_backlog(admin: AdminClient, queue: str) -> None:
        rate = await admin.fill(
            queue, delayed, opts.element_size, timeout_s=FILL_TIMEOUT_S, delay_ms=DELAY_MS
        )
        ready, waiting, _ = await admin.counts(queue)
        if (ready, waiting) != (0, delayed):
            raise SetupFailed(f"{queue}: {ready} ready and {waiting} delayed, not 0 and {delayed}")
        res.fill_rates.append(rate)

    try:
        res.rows = [DelayedRow(c) for c in concurrency]
        for i in range(rounds):
            for row in res.rows:
                order = (False, True) if i % 2 == 0 else (True, False)
                for beside in order:
                    m = await measure(
                        target,
                        SCENARIOS[scenario],
                        row.concurrency,
                        opts,
                        add_backlog if beside else None,
                    )
                    if m.status != "ok":
                        phase = "beside the backlog" if beside else "alone"
                        raise SetupFailed(f"c{row.concurrency} {phase}: {m.status} {m.note}")
                    (row.beside if beside else row.alone).append(m)
                print(
                    f"delayed round {i + 1}/{rounds} c{row.concurrency}: alone "
                    f"{row.alone[-1].rate:,.0f}/s, beside {delayed:,} delayed "
                    f"{row.beside[-1].rate:,.0f}/s",
                    flush=True,
                )
    except Exception as e:  # reported in its own section; the other results stand
        res.error = f"{type(e).__name__}: {e}"[:300]
    finally:
        server.stop(timeout_s=60)
        shutil.rmtree(data_dir, ignore_errors=True)
    return res
