"""The e2e workload on NATS JetStream: file storage, work-queue retention, explicit ack.

JetStream's default file store syncs to disk only every two minutes, so a power cut can
lose acknowledged publishes: it is weaker than ours, and the report says so beside it.
"""

from __future__ import annotations

import asyncio
import time

import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType

from benchmarks.peers.common import E2EResult, E2ESpec

FETCH_TIMEOUT_S = 2.0


async def run(spec: E2ESpec) -> E2EResult:
    res = E2EResult(status="ok")
    body = b"x" * spec.element_size
    deadline = time.monotonic() + spec.timeout_s
    stream = spec.name.replace(".", "_").replace(":", "_")
    subject = f"bench.{stream}"
    nc = await nats.connect(f"nats://{spec.host}:{spec.port}", connect_timeout=5)
    js = nc.jetstream(timeout=30)
    try:
        await js.add_stream(
            name=stream,
            subjects=[subject],
            storage=StorageType.FILE,
            retention=RetentionPolicy.WORK_QUEUE,
        )
        t0 = time.perf_counter()
        while res.produced < spec.n and time.monotonic() < deadline:
            k = min(spec.in_flight, spec.n - res.produced)
            futures = [await js.publish_async(subject, body) for _ in range(k)]
            await asyncio.gather(*futures)
            res.produced += k
        t1 = time.perf_counter()
        sub = await js.pull_subscribe(
            subject,
            durable="bench",
            stream=stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1),
        )
        while res.consumed < res.produced and time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(spec.in_flight, timeout=FETCH_TIMEOUT_S)
            except nats.errors.TimeoutError:
                continue
            for m in msgs:
                await m.ack()
            res.consumed += len(msgs)
        await nc.flush(timeout=10)
        t2 = time.perf_counter()
        res.produce_s, res.consume_s = t1 - t0, t2 - t1
    finally:
        try:
            await js.delete_stream(stream)
        finally:
            await nc.close()
    return res
