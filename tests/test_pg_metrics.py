"""Queue depths, dead letters held and oldest ready ages in the metrics of a server on the
PostgreSQL store: read in the background by one bounded statement once a scrape asks
(qm_server/store/pg_depths.py), never counted per scrape. The schema is the test's own
(tests/pg_fixtures.py); without a reachable PostgreSQL the test skips, saying why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
from pg_fixtures import pg_config
from test_metrics import (
    Samples,
    check_oldest_age_and_dead_letters,
    metrics_port,
    scrape,
    value,
)

from conftest import ADMIN_PASSWORD, ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server.store.pg_depths import DEPTHS_EVERY_S
from qm_server.store.pg_store import DUE_POLL_S


def depths(samples: Samples, queue: str) -> tuple[float, float, float]:
    return tuple(  # type: ignore[return-value]
        value(samples, "qm_queue_messages", queue=queue, state=state)
        for state in ("ready", "in_flight", "delayed")
    )


def pg_server(make_server: Callable[..., ServerHandle], tmp_path: Path) -> ServerHandle:
    """A server on a throwaway schema of its own, serving metrics on a free port."""
    config = pg_config(tmp_path / "pg")
    return make_server(
        store=config.store, store_schema=config.store_schema, metrics_listen="127.0.0.1:0"
    )


def test_queue_depths_are_exported_from_a_background_read(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    server = pg_server(make_server, tmp_path)
    port = metrics_port(server)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", ADMIN_PASSWORD)
        for name in ("jobs", "idle"):
            assert stub.NewQueue(pb.NewQueueRequest(token=token, queue_name=name)).code == 0
        for i in range(3):
            assert stub.Add(pb.AddRequest(token=token, queue_name="jobs", element=str(i))).code == 0
        later = pb.AddRequest(token=token, queue_name="jobs", element="later", delay_ms=600_000)
        assert stub.Add(later).code == 0
        assert stub.Poll(pb.PollRequest(token=token, queue_name="jobs")).code == pb.CODE_OK

        # The first scrape asks; the background loop reads within its period.
        deadline = time.monotonic() + DUE_POLL_S * 10
        samples = scrape(port)
        while value(samples, "qm_queues") != 2:
            assert time.monotonic() < deadline, "the depths never came"
            time.sleep(0.05)
            samples = scrape(port)
        assert depths(samples, "jobs") == (2, 1, 1)
        assert depths(samples, "idle") == (0, 0, 0)
        # Read again every DEPTHS_EVERY_S while scrapes come.
        assert stub.Add(pb.AddRequest(token=token, queue_name="idle", element="x")).code == 0
        deadline = time.monotonic() + DEPTHS_EVERY_S + DUE_POLL_S * 10
        while depths(samples := scrape(port), "idle") != (1, 0, 0):
            assert time.monotonic() < deadline, "the depths were never read again"
            time.sleep(0.1)


def test_oldest_ready_age_and_dead_letters_come_from_the_background_read(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    server = pg_server(make_server, tmp_path)
    settle_s = DEPTHS_EVERY_S + DUE_POLL_S * 10  # a whole period, and the loop's turn
    check_oldest_age_and_dead_letters(server.target, metrics_port(server), settle_s)
