"""One e2e client process: ``python -m benchmarks.peers.client '{json E2ESpec}'``.

A process per system keeps the client libraries' CPU out of the harness and one client's
crash out of the others' figures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys

from benchmarks.peers.common import E2EResult, E2ESpec


def run(spec: E2ESpec) -> E2EResult:
    """A run that ended without error but short of n acked messages is partial."""
    result = _run_system(spec)
    if result.status == "ok" and result.consumed < spec.n:
        result.status = "partial"
    return result


def _run_system(spec: E2ESpec) -> E2EResult:
    """Imports each client library only when its system runs, so a missing one skips it."""
    if spec.system in ("ours", "floor"):
        from benchmarks.peers import ours

        return asyncio.run(ours.run(spec))
    if spec.system == "rabbitmq":
        from benchmarks.peers import rabbitmq

        return rabbitmq.run(spec)
    if spec.system == "redis":
        from benchmarks.peers import redis_streams

        return redis_streams.run(spec)
    if spec.system == "nats":
        from benchmarks.peers import nats_js

        return asyncio.run(nats_js.run(spec))
    return E2EResult(status="error", note=f"unknown system {spec.system}")


def main() -> int:
    spec = E2ESpec(**json.loads(sys.argv[1]))
    try:
        result = run(spec)
    except ImportError as e:
        result = E2EResult(status="skipped", note=f"client library missing: {e.name}")
    except Exception as e:  # reported beside the row instead of losing the other peers
        result = E2EResult(status="error", note=f"{type(e).__name__}: {e}"[:300])
    print("RESULT " + json.dumps(dataclasses.asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
