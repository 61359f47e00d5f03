"""The big-reads scenario: Add latency alone, then beside readers of a map of tens of MiB.

A read of a large map must not hold up writers, nor grow the server without bound. So
one run measures unary Add (concurrency 1) alone, then again while reader processes page
through a large map with MapGetList (until an empty page) and ask for all of it with
MapGetAll, as fast as they can; it reports both latencies, their ratio (measured in the
same run, so the machine's noise cancels) and the server's RSS alone and beside them.

It uses its own server and data directory, as the backlog scenario does. Readers run in
another process (``python -m benchmarks.big_reads '{json}'``), so that decoding their
answers does not share a CPU and a GIL with the process timing the Adds. Both phases are
bounded in time and in count.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from benchmarks.admin import CALL_TIMEOUT_S, AdminClient, SetupFailed
from benchmarks.login import login, new_stub
from benchmarks.procs import RESULT_GRACE_S, RssSampler, spawn_client
from benchmarks.servers import ADMIN_PASSWORD, ADMIN_USER, start_ours
from benchmarks.stats import percentile
from qm.v1 import queue_manager_pb2 as pb

MAP = "bench.big"
QUEUE = "bench.adds"
VALUE_BYTES = 512 * 1024
PUT_BATCH = 8
"""Entries per MapBatchPut: 4 MiB, within the server's request limit."""
MAX_ADDS = 20_000
"""Per phase, whatever the duration: a fast server cannot make a phase unbounded."""
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ReaderSpec:
    """One reader process; crosses the process boundary as JSON."""

    address: str
    username: str
    password: str
    tasks: int
    duration_s: float


@dataclass
class BigReadsResult:
    map_mb: float
    readers: int
    adds_alone: int = 0
    adds_beside: int = 0
    add_p50_alone_ms: float = math.nan
    add_p99_alone_ms: float = math.nan
    add_p50_beside_ms: float = math.nan
    add_p99_beside_ms: float = math.nan
    reads: int = 0
    read_mb: float = 0.0
    read_refusals: int = 0
    rss_alone_mb: float = math.nan
    rss_peak_beside_mb: float = math.nan
    error: str = ""

    def lines(self) -> list[str]:
        if self.error:
            return [f"error: {self.error}"]
        p50 = self.add_p50_beside_ms / self.add_p50_alone_ms
        p99 = self.add_p99_beside_ms / self.add_p99_alone_ms
        return [
            f"Add alone: p50 {self.add_p50_alone_ms:.2f} ms, p99 {self.add_p99_alone_ms:.2f} ms "
            f"({self.adds_alone:,} Adds)",
            f"Add beside {self.readers} readers: p50 {self.add_p50_beside_ms:.2f} ms "
            f"({p50:.1f}x), p99 {self.add_p99_beside_ms:.2f} ms ({p99:.1f}x) "
            f"({self.adds_beside:,} Adds)",
            f"readers: {self.reads:,} reads, {self.read_mb:,.0f} MB received, "
            f"{self.read_refusals:,} MapGetAll answered RESOURCE_EXHAUSTED",
            f"server RSS: {self.rss_alone_mb:.0f} MB alone, peak {self.rss_peak_beside_mb:.0f} MB "
            "beside the readers",
        ]


async def _fill_map(admin: AdminClient, map_bytes: int) -> None:
    entries = max(1, map_bytes // VALUE_BYTES)
    value = "v" * VALUE_BYTES
    for first in range(0, entries, PUT_BATCH):
        pairs = [
            pb.KeyValue(key=f"k{i:06d}", value=value)
            for i in range(first, min(first + PUT_BATCH, entries))
        ]
        r = await admin.stub.MapBatchPut(
            pb.MapBatchPutRequest(token=admin.token, map=MAP, size=len(pairs), list=pairs),
            timeout=CALL_TIMEOUT_S,
        )
        if r.code != pb.CODE_OK:
            raise SetupFailed(f"MapBatchPut: {pb.Code.Name(r.code)} {r.message}")


async def _add_latencies(admin: AdminClient, duration_s: float) -> list[float]:
    """Unary Adds one after another, for duration_s or MAX_ADDS; latencies in ms, sorted."""
    latencies: list[float] = []
    deadline = time.monotonic() + duration_s
    request = pb.AddRequest(token=admin.token, queue_name=QUEUE, element="x" * 100)
    while time.monotonic() < deadline and len(latencies) < MAX_ADDS:
        t0 = time.perf_counter()
        r = await admin.stub.Add(request, timeout=CALL_TIMEOUT_S)
        latencies.append((time.perf_counter() - t0) * 1000)
        if r.code != pb.CODE_OK:
            raise SetupFailed(f"Add: {pb.Code.Name(r.code)} {r.message}")
    return sorted(latencies)


async def _read_tagged(proc: asyncio.subprocess.Process, tag: str, timeout_s: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=left)
        if not line:
            raise RuntimeError(f"reader exited before {tag}")
        text = line.decode().rstrip("\n")
        if text.startswith(tag):
            return text[len(tag) :].strip()
    raise TimeoutError(f"no {tag} from the reader in {timeout_s:.0f}s")


async def run_big_reads(
    map_bytes: int, readers: int, duration_s: float, work_dir: Path
) -> BigReadsResult:
    """Bounded in time: two phases of duration_s, plus setup and the reader's start."""
    res = BigReadsResult(map_mb=map_bytes / 2**20, readers=readers)
    data_dir = work_dir / "big-reads-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    server = start_ours(data_dir, work_dir, name="big-reads")
    proc: asyncio.subprocess.Process | None = None
    try:
        async with AdminClient(server.address, ADMIN_USER, ADMIN_PASSWORD) as admin:
            await admin.new_queue(QUEUE)
            await _fill_map(admin, map_bytes)
            await _add_latencies(admin, min(duration_s, 0.5))  # warm-up, not counted
            alone = await _add_latencies(admin, duration_s)
            res.rss_alone_mb = server.rss_bytes() / 2**20
            spec = ReaderSpec(server.address, ADMIN_USER, ADMIN_PASSWORD, readers, duration_s)
            with (work_dir / "big-readers.log").open("ab") as log:
                proc = await spawn_client(
                    "benchmarks.big_reads", spec, stdin=asyncio.subprocess.PIPE, stderr=log
                )
            await _read_tagged(proc, "READY", READY_TIMEOUT_S)
            assert proc.stdin is not None
            proc.stdin.write(b"GO\n")
            await proc.stdin.drain()
            sampler = RssSampler(server, every_s=0.1)
            sampler.start()
            try:
                beside = await _add_latencies(admin, duration_s)
            finally:
                res.rss_peak_beside_mb = await sampler.stop() / 2**20
            reads = json.loads(await _read_tagged(proc, "RESULT", duration_s + RESULT_GRACE_S))
        res.reads, res.read_refusals = reads["reads"], reads["refusals"]
        res.read_mb = reads["bytes"] / 2**20
        res.adds_alone, res.adds_beside = len(alone), len(beside)
        res.add_p50_alone_ms, res.add_p99_alone_ms = percentile(alone, 0.5), percentile(alone, 0.99)
        res.add_p50_beside_ms = percentile(beside, 0.5)
        res.add_p99_beside_ms = percentile(beside, 0.99)
    except Exception as e:  # reported in its own section; the other results stand
        res.error = f"{type(e).__name__}: {e}"[:300]
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.stop(timeout_s=60)
        shutil.rmtree(data_dir, ignore_errors=True)
    return res


# The reader process ----------------------------------------------------------------------


async def _reader(stub: Any, token: str, deadline: float, totals: dict[str, int]) -> None:
    """Whole-map reads until the deadline: pages until an empty one, then one MapGetAll."""
    while time.monotonic() < deadline:
        offset = 0
        while time.monotonic() < deadline:
            page = await stub.MapGetList(
                pb.MapGetListRequest(token=token, map=MAP, offset=offset, size=1000),
                timeout=CALL_TIMEOUT_S,
            )
            totals["reads"] += 1
            totals["bytes"] += page.ByteSize()
            if not page.list:
                break
            offset += len(page.list)
        whole = await stub.MapGetAll(
            pb.MapGetAllRequest(token=token, map=MAP), timeout=CALL_TIMEOUT_S
        )
        totals["reads"] += 1
        totals["bytes"] += whole.ByteSize()
        totals["refusals"] += whole.code == pb.CODE_RESOURCE_EXHAUSTED


async def _reader_main(spec: ReaderSpec) -> None:
    # Any size: the scenario measures what the server does, whatever it answers.
    options = [("grpc.max_receive_message_length", -1)]
    channels = [grpc.aio.insecure_channel(spec.address, options=options) for _ in range(spec.tasks)]
    try:
        stubs = [new_stub(channel) for channel in channels]
        tokens = [await login(stub, spec.username, spec.password) for stub in stubs]
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        totals = {"reads": 0, "bytes": 0, "refusals": 0}
        deadline = time.monotonic() + spec.duration_s
        readers = zip(stubs, tokens, strict=True)
        await asyncio.gather(*(_reader(stub, token, deadline, totals) for stub, token in readers))
        print("RESULT " + json.dumps(totals), flush=True)
    finally:
        for channel in channels:
            await channel.close()


if __name__ == "__main__":
    asyncio.run(_reader_main(ReaderSpec(**json.loads(sys.argv[1]))))
