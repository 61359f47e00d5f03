"""Prometheus metrics of one server, served on `--metrics-listen` (prometheus-client).

Each server has a registry of its own, so that servers in one process (tests, embedding)
never share or clash. What a call costs is kept small: `CallMetrics.record` is one dict
lookup and a few plain increments (a bisect finds the latency bucket), done in the
servicer's `_answer`, where the method and the domain code are already at hand; the
histogram is built from those numbers at scrape time. Everything else is read when
Prometheus scrapes, not per call: the engine's counts (sessions, streams, parked polls,
login failures), the store's published queue counts (depths, dead letters held, the first
add of the oldest ready message: kept by the store, never counted per scrape) and its
health, through collectors.
The SQLite store reports each group commit (its size and duration, fsync included) from
its writer thread: one call per commit.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from itertools import accumulate
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from qm.v1 import queue_manager_pb2 as pb
from qm_server.engine import Engine
from qm_server.store.base import QueueCounts, Store

log = logging.getLogger(__name__)

MAX_EXPORTED_QUEUES = 1000
"""Queues whose depths are exported at most (the deepest): each is five series."""

# Calls take from tens of microseconds to a long poll's 20 s wait.
CALL_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_CODE_NAMES = {value: name.removeprefix("CODE_") for name, value in pb.Code.items()}
_CODE_SLOTS = max(_CODE_NAMES) + 1


class MetricsAddressError(ValueError):
    """--metrics-listen is not HOST:PORT, or cannot be bound."""


class _Method:
    """One RPC's calls by code (a list indexed by code) and latency histogram (counts per
    bucket, and their sum). Plain numbers changed on the event loop only, without the
    locks of prometheus-client's own metrics: read whole at scrape time."""

    __slots__ = ("buckets", "codes", "name", "seconds")

    def __init__(self, name: str) -> None:
        self.name = name
        self.codes = [0] * _CODE_SLOTS
        self.buckets = [0] * (len(CALL_BUCKETS) + 1)  # the last: past every bound (+Inf)
        self.seconds = 0.0


class CallMetrics:
    """Calls by method and code, and their latency by method."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._methods: dict[type, _Method] = {}
        self.subscribe_opened = Counter(
            "qm_subscribe_streams_opened", "Subscribe streams opened", registry=registry
        )
        self.subscribe_ended = Counter(
            "qm_subscribe_streams_ended", "Subscribe streams ended", registry=registry
        )

    def record(self, response_type: type, code: int, seconds: float) -> None:
        """On the event loop, once per unary call: the hot path."""
        method = self._methods.get(response_type) or self._add(response_type)
        if 0 <= code < _CODE_SLOTS:
            method.codes[code] += 1
        # The first bound at or above: Prometheus buckets count values <= their bound.
        method.buckets[bisect_left(CALL_BUCKETS, seconds)] += 1
        method.seconds += seconds

    def _add(self, response_type: type) -> _Method:
        method = _Method(response_type.__name__.removesuffix("Response"))
        self._methods[response_type] = method
        return method

    def families(self) -> Iterable[Metric]:
        calls = CounterMetricFamily(
            "qm_calls", "Unary calls answered, by method and code", labels=["method", "code"]
        )
        latency = HistogramMetricFamily(
            "qm_call_duration_seconds",
            "Time to answer a unary call, by method (long polls include their wait)",
            labels=["method"],
        )
        for method in list(self._methods.values()):
            for code, count in enumerate(list(method.codes)):
                if count:
                    calls.add_metric([method.name, _CODE_NAMES.get(code, str(code))], count)
            cumulative = list(accumulate(list(method.buckets)))
            bounds = [*(repr(float(b)) for b in CALL_BUCKETS), "+Inf"]
            latency.add_metric(
                [method.name], list(zip(bounds, cumulative, strict=True)), method.seconds
            )
        yield calls
        yield latency


class _StateCollector(Collector):
    """Read at scrape time: the engine's counts, the store's queue depths and health."""

    def __init__(
        self,
        calls: CallMetrics,
        engine: Engine,
        store: Store,
        healthy: Callable[[], bool],
        max_queues: int,
        wall_clock: Callable[[], float],
    ) -> None:
        self._calls = calls
        self._wall_clock = wall_clock
        self._engine = engine
        self._store = store
        self._healthy = healthy
        self._max_queues = max_queues

    def collect(self) -> Iterable[Metric]:
        yield from self._calls.families()
        stats = self._engine.stats()
        yield _gauge("qm_sessions", "Live sessions", stats.sessions)
        yield _gauge("qm_subscriptions", "Open Subscribe streams", stats.subscriptions)
        yield _gauge("qm_waiting_polls", "Long polls parked, waiting", stats.waiting_polls)
        yield CounterMetricFamily(
            "qm_login_failures", "Failed logins (bad user or password)", stats.login_failures
        )
        yield CounterMetricFamily(
            "qm_login_throttled",
            "Logins refused unjudged: throttled after failures, or too many at once from a host",
            stats.login_refusals,
        )
        yield _gauge(
            "qm_store_healthy",
            "1 while the store commits, 0 while it fails",
            1.0 if self._healthy() else 0.0,
        )
        counts = self._store.published_counts()
        if counts is not None:
            yield from self._depths(counts)

    def _depths(self, counts: dict[str, QueueCounts]) -> Iterable[Metric]:
        shown = counts.items()
        if len(counts) > self._max_queues:
            shown = heapq.nlargest(  # type: ignore[assignment]
                self._max_queues,
                shown,
                key=lambda item: item[1].ready + item[1].in_flight + item[1].delayed,
            )
        depth = GaugeMetricFamily(
            "qm_queue_messages",
            "Messages in a queue, by state: ready, delayed, in_flight (as last committed)",
            labels=["queue", "state"],
        )
        dead = GaugeMetricFamily(
            "qm_queue_dead_letters",
            "Dead letters a queue holds, already counted in its qm_queue_messages",
            labels=["queue"],
        )
        age = GaugeMetricFamily(
            "qm_queue_oldest_ready_age_seconds",
            "Time since the first add of a queue's oldest ready message; 0 when none is ready",
            labels=["queue"],
        )
        now_ms = self._wall_clock() * 1000
        for name, c in shown:
            depth.add_metric([name, "ready"], c.ready)
            depth.add_metric([name, "delayed"], c.delayed)
            depth.add_metric([name, "in_flight"], c.in_flight)
            dead.add_metric([name], c.dead_letters)
            oldest = c.oldest_ready_enqueued_at_ms
            age.add_metric([name], max(0.0, now_ms - oldest) / 1000 if oldest else 0.0)
        yield depth
        yield dead
        yield age
        yield _gauge("qm_queues", "Queues that exist", len(counts))
        yield _gauge(
            "qm_queues_not_exported",
            f"Queues left out of qm_queue_messages (past the {self._max_queues} deepest)",
            max(0, len(counts) - self._max_queues),
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class ServerMetrics:
    """The registry of one server and what feeds it; `serve` starts its HTTP endpoint."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        healthy: Callable[[], bool],
        max_queues: int | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`wall_clock`: Unix time, as the store's, for the ages of the oldest messages."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.calls = CallMetrics(self.registry)
        commit_size = Histogram(
            "qm_store_commit_operations",
            "Operations committed together in one transaction (group commit)",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        commit_time = Histogram(
            "qm_store_commit_duration_seconds",
            "Time to commit one transaction, fsync included",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        observe_size, observe_time = commit_size.observe, commit_time.observe

        def committed(operations: int, seconds: float) -> None:
            observe_size(operations)
            observe_time(seconds)

        store.set_commit_observer(committed)
        cap = MAX_EXPORTED_QUEUES if max_queues is None else max_queues
        collector = _StateCollector(self.calls, engine, store, healthy, cap, wall_clock)
        self.registry.register(collector)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def serve(self, address: str) -> int:
        """Serve /metrics on `address` (HOST:PORT, port 0: any free); returns the port."""
        host, port = parse_address(address)
        try:
            self._httpd, self._thread = start_http_server(port, host, self.registry)
        except OSError as exc:
            raise MetricsAddressError(f"cannot serve metrics on {address}: {exc}") from None
        self.port = self._httpd.server_port
        log.info("serving Prometheus metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) -> (host, port)."""
    host, sep, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise MetricsAddressError(f"--metrics-listen wants HOST:PORT, not {address!r}")
    return host, int(port_text)
