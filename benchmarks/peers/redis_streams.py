"""The e2e workload on Redis Streams: XADD pipelines, then XREADGROUP + XACK per 100."""

from __future__ import annotations

import time
from typing import Any

import redis

from benchmarks.peers.common import E2EResult, E2ESpec

GROUP = "bench"
CONSUMER = "bench-consumer"


def run(spec: E2ESpec) -> E2EResult:
    res = E2EResult(status="ok")
    body = b"x" * spec.element_size
    deadline = time.monotonic() + spec.timeout_s
    r = redis.Redis(host=spec.host, port=spec.port, socket_timeout=30)
    try:
        r.delete(spec.name)
        r.xgroup_create(spec.name, GROUP, id="0", mkstream=True)
        t0 = time.perf_counter()
        while res.produced < spec.n and time.monotonic() < deadline:
            k = min(spec.in_flight, spec.n - res.produced)
            pipe = r.pipeline(transaction=False)
            for _ in range(k):
                pipe.xadd(spec.name, {"e": body})
            pipe.execute()
            res.produced += k
        t1 = time.perf_counter()
        while res.consumed < res.produced and time.monotonic() < deadline:
            got: Any = r.xreadgroup(GROUP, CONSUMER, {spec.name: ">"}, count=spec.in_flight)
            ids = [mid for _stream, entries in got for mid, _fields in entries]
            if ids:
                res.consumed += int(r.xack(spec.name, GROUP, *ids))
        t2 = time.perf_counter()
        res.produce_s, res.consume_s = t1 - t0, t2 - t1
    finally:
        r.delete(spec.name)
        r.close()
    return res
