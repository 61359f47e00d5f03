"""The backlog scenario: memory, Poll latency and restart time with N queued messages.

It uses its own server and data directory, so the other scenarios never run against a
10-million-message database and this one never sees their leftovers.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.admin import AdminClient, SetupFailed
from benchmarks.procs import RssSampler
from benchmarks.servers import ADMIN_PASSWORD, ADMIN_USER, start_ours
from benchmarks.stats import percentile
from qm.v1 import queue_manager_pb2 as pb

QUEUE = "bench.backlog"
SMALL_BACKLOG = 1_000
POLL_SAMPLES = 300
RESTART_TARGET_S = 30.0
RSS_TARGET_MB = 500.0
POLL_RATIO_TARGET = 1.5
TARGET_BACKLOG = 10_000_000


@dataclass
class BacklogResult:
    backlog: int
    element_size: int
    fill_rate: float = math.nan
    fill_s: float = math.nan
    rss_peak_fill_mb: float = math.nan
    rss_after_fill_mb: float = math.nan
    data_dir_mb: float = math.nan
    poll_p50_small_ms: float = math.nan
    poll_p50_large_ms: float = math.nan
    poll_p99_large_ms: float = math.nan
    restart_port_s: float = math.nan
    restart_ready_s: float = math.nan
    rss_after_restart_mb: float = math.nan
    size_after_restart: int = -1
    error: str = ""

    def lines(self) -> list[str]:
        if self.error:
            return [f"error: {self.error}"]
        return [
            f"fill: {self.fill_rate:,.0f} msgs/s ({self.fill_s:.0f} s), data dir "
            f"{self.data_dir_mb:,.0f} MB",
            f"server RSS: peak while filling {self.rss_peak_fill_mb:.0f} MB, after fill "
            f"{self.rss_after_fill_mb:.0f} MB, after restart {self.rss_after_restart_mb:.0f} MB",
            f"Poll p50 at {SMALL_BACKLOG:,}: {self.poll_p50_small_ms:.3f} ms; at "
            f"{self.backlog:,}: {self.poll_p50_large_ms:.3f} ms (p99 {self.poll_p99_large_ms:.3f})",
            f"restart: port file after {self.restart_port_s:.1f} s, first Poll answered after "
            f"{self.restart_ready_s:.1f} s; Size after restart {self.size_after_restart:,}",
        ]

    def targets(self) -> list[tuple[str, str, str]]:
        at = "" if self.backlog >= TARGET_BACKLOG else f" [at {self.backlog:,}; target is 10M]"
        if self.error:
            return [("backlog", "FAIL", self.error)]
        rss = max(self.rss_peak_fill_mb, self.rss_after_fill_mb, self.rss_after_restart_mb)
        ratio = self.poll_p50_large_ms / self.poll_p50_small_ms
        return [
            (
                f"backlog RSS < {RSS_TARGET_MB:.0f} MB{at}",
                "PASS" if rss < RSS_TARGET_MB else "FAIL",
                f"{rss:.0f} MB",
            ),
            (
                f"backlog Poll p50 within {POLL_RATIO_TARGET}x of p50 at 1k{at}",
                "PASS" if ratio <= POLL_RATIO_TARGET else "FAIL",
                f"{ratio:.2f}x",
            ),
            (
                f"backlog restart serves within {RESTART_TARGET_S:.0f} s{at}",
                "PASS" if self.restart_ready_s <= RESTART_TARGET_S else "FAIL",
                f"{self.restart_ready_s:.1f} s",
            ),
        ]


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


async def _poll_latencies(admin: AdminClient, samples: int) -> list[float]:
    """Times Poll alone at concurrency 1; each message is acked (untimed) to keep state clean."""
    lat: list[float] = []
    for _ in range(samples):
        t0 = time.perf_counter()
        r = await admin.stub.Poll(
            pb.PollRequest(token=admin.token, queue_name=QUEUE, wait_ms=0), timeout=30
        )
        lat.append((time.perf_counter() - t0) * 1000)
        if r.code != pb.CODE_OK:
            raise SetupFailed(f"Poll: {pb.Code.Name(r.code)} {r.message}")
        await admin.stub.Ack(
            pb.AckRequest(token=admin.token, message_id=r.message_id, ack_type=pb.ACK_TYPE_DONE),
            timeout=30,
        )
    return sorted(lat)


async def run_backlog(n: int, element_size: int, work_dir: Path) -> BacklogResult:
    """Bounded in time: the fill may take at most max(300 s, n / 5000 msgs/s)."""
    res = BacklogResult(backlog=n, element_size=element_size)
    data_dir = work_dir / "backlog-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    server = start_ours(data_dir, work_dir)
    try:
        async with AdminClient(server.address, ADMIN_USER, ADMIN_PASSWORD) as admin:
            await admin.new_queue(QUEUE)
            await admin.fill(QUEUE, SMALL_BACKLOG + POLL_SAMPLES, element_size)
            small = await _poll_latencies(admin, POLL_SAMPLES)
            res.poll_p50_small_ms = percentile(small, 0.5)
            t0 = time.perf_counter()
            sampler = RssSampler(server, every_s=0.5)
            sampler.start()
            try:
                res.fill_rate = await admin.fill(
                    QUEUE, n - SMALL_BACKLOG + POLL_SAMPLES, element_size,
                    batch=1000, timeout_s=max(300.0, n / 5000),
                )  # fmt: skip
            finally:
                peak = await sampler.stop()
            res.rss_peak_fill_mb = peak / 2**20
            res.fill_s = time.perf_counter() - t0
            res.rss_after_fill_mb = server.rss_bytes() / 2**20
            large = await _poll_latencies(admin, POLL_SAMPLES)
            res.poll_p50_large_ms = percentile(large, 0.5)
            res.poll_p99_large_ms = percentile(large, 0.99)
        server.stop(timeout_s=60)
        res.data_dir_mb = _dir_mb(data_dir)
        t0 = time.monotonic()
        server = start_ours(data_dir, work_dir, timeout_s=300)
        res.restart_port_s = time.monotonic() - t0
        async with AdminClient(server.address, ADMIN_USER, ADMIN_PASSWORD) as admin:
            r = await admin.stub.Poll(
                pb.PollRequest(token=admin.token, queue_name=QUEUE, wait_ms=0), timeout=300
            )
            res.restart_ready_s = time.monotonic() - t0
            if r.code != pb.CODE_OK:
                raise SetupFailed(f"Poll after restart: {pb.Code.Name(r.code)}")
            res.rss_after_restart_mb = server.rss_bytes() / 2**20
            res.size_after_restart = await admin.size(QUEUE) + 1
    except Exception as e:  # reported in the backlog section; the other results stand
        res.error = f"{type(e).__name__}: {e}"[:300]
    finally:
        server.stop(timeout_s=60)
        shutil.rmtree(data_dir, ignore_errors=True)
    return res
