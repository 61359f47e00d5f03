"""Prometheus metrics on --metrics-listen: scraped over real HTTP while real gRPC calls run.

The scrapes are parsed with prometheus-client's own text parser, as Prometheus would read
them; the Grafana dashboard's queries are checked against what a live server exports.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import ServerProcess, qm_server
from test_subscribe import Stream

from conftest import ADMIN_PASSWORD, FAST_AUTH, ServerHandle, encrypt_password, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_server import metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"

# A login guard that throttles a (user, host) pair after one failure.
FAST_ONE_FAILURE = dataclasses.replace(FAST_AUTH, failures_before_backoff=1)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        return str(reply.read().decode())


def scrape(port: int) -> Samples:
    """Every sample, keyed by its name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(scrape_text(port))
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def metrics_port(server: ServerHandle) -> int:
    assert server.thread.server is not None and server.thread.server.metrics is not None
    return server.thread.server.metrics.port


@pytest.fixture
def watched(make_server: Callable[..., ServerHandle]) -> ServerHandle:
    return make_server(metrics_listen="127.0.0.1:0")


def test_calls_queues_sessions_and_logins_move_with_load(watched: ServerHandle) -> None:
    port = metrics_port(watched)
    before = scrape(port)
    assert value(before, "qm_sessions") == 0
    assert value(before, "qm_store_healthy") == 1
    with grpc.insecure_channel(watched.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", ADMIN_PASSWORD)
        challenge = stub.GetChallenge(pb.GetChallengeRequest())
        wrong = encrypt_password(challenge, "not the password")
        refused = stub.Auth(pb.AuthRequest(username="admin", password=wrong))
        assert refused.code == pb.CODE_UNAUTHENTICATED
        assert stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="jobs")).code == 0
        for i in range(3):
            assert stub.Add(pb.AddRequest(token=token, queue_name="jobs", element=str(i))).code == 0
        delayed = pb.AddRequest(token=token, queue_name="jobs", element="later", delay_ms=600_000)
        assert stub.Add(delayed).code == 0
        missing = stub.Size(pb.SizeRequest(token=token, queue_name="nope"))
        assert missing.code == pb.CODE_QUEUE_NOT_FOUND
        polled = stub.Poll(pb.PollRequest(token=token, queue_name="jobs"))
        assert polled.code == pb.CODE_OK
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="idle"))
        waited = stub.Poll(pb.PollRequest(token=token, queue_name="idle", wait_ms=600))
        assert waited.code == pb.CODE_QUEUE_EMPTY, waited.message

        after = scrape(port)
    assert value(after, "qm_calls_total", method="Add", code="OK") == 4
    assert value(after, "qm_calls_total", method="Size", code="QUEUE_NOT_FOUND") == 1
    assert value(after, "qm_calls_total", method="Auth", code="OK") == 1
    assert value(after, "qm_calls_total", method="Auth", code="UNAUTHENTICATED") == 1
    assert value(after, "qm_calls_total", method="Poll", code="OK") == 1
    assert value(after, "qm_calls_total", method="Poll", code="QUEUE_EMPTY") == 1
    assert value(after, "qm_call_duration_seconds_count", method="Add") == 4
    assert value(after, "qm_call_duration_seconds_bucket", method="Add", le="+Inf") == 4
    assert value(after, "qm_call_duration_seconds_sum", method="Add") > 0
    # The long poll waited 0.6 s: in the bucket up to 1 s, not in the one up to 0.5 s.
    assert value(after, "qm_call_duration_seconds_bucket", method="Poll", le="0.5") == 1
    assert value(after, "qm_call_duration_seconds_bucket", method="Poll", le="1.0") == 2
    assert value(after, "qm_call_duration_seconds_sum", method="Poll") >= 0.6
    assert value(after, "qm_queue_messages", queue="jobs", state="ready") == 2
    assert value(after, "qm_queue_messages", queue="jobs", state="in_flight") == 1
    assert value(after, "qm_queue_messages", queue="jobs", state="delayed") == 1
    assert value(after, "qm_queues") == 2
    assert value(after, "qm_queues_not_exported") == 0
    assert value(after, "qm_sessions") == 1
    assert value(after, "qm_login_failures_total") == 1
    assert value(after, "qm_login_throttled_total") == 0
    assert value(after, "qm_store_healthy") == 1
    # Each write committed (the server's own start committed a few more before).
    commits = value(after, "qm_store_commit_duration_seconds_count")
    assert commits - value(before, "qm_store_commit_duration_seconds_count") >= 6
    assert value(after, "qm_store_commit_operations_count") == commits
    assert value(after, "qm_store_commit_operations_sum") >= commits


def age(samples: Samples, queue: str) -> float:
    return value(samples, "qm_queue_oldest_ready_age_seconds", queue=queue)


def dead_letters(samples: Samples, queue: str) -> float:
    return value(samples, "qm_queue_dead_letters", queue=queue)


def check_oldest_age_and_dead_letters(target: str, port: int, settle_s: float) -> None:
    """The oldest ready message's age appears with an add, grows, and is 0 once nothing is
    ready; a nacked message past max_deliveries appears as a dead letter of its dead-letter
    queue, counted once in qm_queue_messages. `settle_s`: how long the store may take to
    show a change (a PostgreSQL store reads its depths in the background)."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", ADMIN_PASSWORD)
        assert stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="jobs.dead")).code == 0
        settings = pb.QueueSettings(max_deliveries=1, dead_letter_queue="jobs.dead")
        jobs = pb.NewQueueRequest(token=token, queue_name="jobs", settings=settings)
        assert stub.NewQueue(jobs).code == 0
        empty = wait_for(port, lambda s: value(s, "qm_queues") == 2, settle_s)
        assert value(empty, "qm_queues") == 2
        assert (age(empty, "jobs"), dead_letters(empty, "jobs.dead")) == (0, 0)

        before_add = time.monotonic()
        added = pb.AddAllRequest(token=token, queue_name="jobs", elements=["x", "y"])
        assert stub.AddAll(added).code == 0
        first = wait_for(port, lambda s: age(s, "jobs") > 0, settle_s)
        assert 0 < age(first, "jobs") <= time.monotonic() - before_add + 0.1
        later = wait_for(port, lambda s: age(s, "jobs") > age(first, "jobs"))
        assert age(later, "jobs") > age(first, "jobs")  # the same message, older now

        x = stub.Poll(pb.PollRequest(token=token, queue_name="jobs"))
        assert x.code == pb.CODE_OK
        nack = pb.AckRequest(token=token, message_id=x.message_id, ack_type=pb.ACK_TYPE_ERROR)
        assert stub.Ack(nack).code == pb.CODE_OK
        moved = wait_for(port, lambda s: dead_letters(s, "jobs.dead") == 1, settle_s)
        assert dead_letters(moved, "jobs.dead") == 1
        assert dead_letters(moved, "jobs") == 0
        # The dead letter is a ready message of jobs.dead, and counted there only.
        assert value(moved, "qm_queue_messages", queue="jobs.dead", state="ready") == 1
        total = sum(v for (name, _), v in moved.items() if name == "qm_queue_messages")
        assert total == 2
        # It keeps its first add: jobs.dead's oldest ready message is as old as jobs' own.
        assert age(moved, "jobs.dead") > 0 and age(moved, "jobs") > 0

        y = stub.Poll(pb.PollRequest(token=token, queue_name="jobs"))
        assert y.code == pb.CODE_OK
        held = wait_for(port, lambda s: age(s, "jobs") == 0, settle_s)
        assert age(held, "jobs") == 0  # in flight is not ready
        assert value(held, "qm_queue_messages", queue="jobs", state="in_flight") == 1

        letter = stub.Poll(pb.PollRequest(token=token, queue_name="jobs.dead"))
        assert letter.code == pb.CODE_OK
        for message in (y, letter):
            assert stub.Ack(pb.AckRequest(token=token, message_id=message.message_id)).code == 0
        done = wait_for(port, lambda s: age(s, "jobs") == age(s, "jobs.dead") == 0, settle_s)
        assert (age(done, "jobs"), age(done, "jobs.dead")) == (0, 0)
        assert dead_letters(done, "jobs.dead") == 0


def test_oldest_ready_age_and_dead_letters_move_with_load(watched: ServerHandle) -> None:
    check_oldest_age_and_dead_letters(watched.target, metrics_port(watched), settle_s=0)


def test_throttled_logins_are_counted(make_server: Callable[..., ServerHandle]) -> None:
    server = make_server(metrics_listen="127.0.0.1:0", auth=FAST_ONE_FAILURE)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        codes = []
        for _ in range(2):
            challenge = stub.GetChallenge(pb.GetChallengeRequest())
            wrong = encrypt_password(challenge, "not the password")
            codes.append(stub.Auth(pb.AuthRequest(username="admin", password=wrong)).code)
    assert codes == [pb.CODE_UNAUTHENTICATED, pb.CODE_RESOURCE_EXHAUSTED]
    samples = scrape(metrics_port(server))
    assert value(samples, "qm_login_failures_total") == 1
    assert value(samples, "qm_login_throttled_total") == 1


def test_subscribe_streams_counted_at_open_and_end(watched: ServerHandle) -> None:
    port = metrics_port(watched)
    with grpc.insecure_channel(watched.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", ADMIN_PASSWORD)
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
        stub.Add(pb.AddRequest(token=token, queue_name="q", element="x"))
        stream = Stream(stub, token, "q", max_unacked=1)
        assert stream.next().code == pb.CODE_OK  # open, and pushing
        open_ = scrape(port)
        assert value(open_, "qm_subscribe_streams_opened_total") == 1
        assert value(open_, "qm_subscribe_streams_ended_total") == 0
        assert value(open_, "qm_subscriptions") == 1
        stream.responses.cancel()
        ended = wait_for(port, lambda s: value(s, "qm_subscribe_streams_ended_total") == 1)
    assert value(ended, "qm_subscribe_streams_ended_total") == 1
    assert value(ended, "qm_subscribe_streams_opened_total") == 1
    assert value(ended, "qm_subscriptions") == 0


def wait_for(port: int, condition: Callable[[Samples], bool], seconds: float = 10) -> Samples:
    """Scrape until `condition` holds: a stream's end reaches the server asynchronously
    (and a PostgreSQL store's depths come from a background read)."""
    deadline = time.monotonic() + seconds
    while True:
        samples = scrape(port)
        if condition(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def test_only_the_deepest_queues_are_exported_past_the_cap(
    make_server: Callable[..., ServerHandle], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "MAX_EXPORTED_QUEUES", 2)
    server = make_server(metrics_listen="127.0.0.1:0")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", ADMIN_PASSWORD)
        for name, depth in (("a", 1), ("b", 3), ("c", 2)):
            stub.NewQueue(pb.NewQueueRequest(token=token, queue_name=name))
            elements = [str(i) for i in range(depth)]
            stub.AddAll(pb.AddAllRequest(token=token, queue_name=name, elements=elements))
    samples = scrape(metrics_port(server))
    exported = {dict(labels)["queue"] for name, labels in samples if name == "qm_queue_messages"}
    assert exported == {"b", "c"}
    for gauge in ("qm_queue_oldest_ready_age_seconds", "qm_queue_dead_letters"):
        assert {dict(labels)["queue"] for name, labels in samples if name == gauge} == exported
    assert value(samples, "qm_queues") == 3
    assert value(samples, "qm_queues_not_exported") == 1


def test_the_dashboard_queries_only_exported_names(watched: ServerHandle) -> None:
    with grpc.insecure_channel(watched.target) as channel:
        stub = pb_grpc.QueueManagerServiceStub(channel)
        token = login(stub, "admin", ADMIN_PASSWORD)
        stub.NewQueue(pb.NewQueueRequest(token=token, queue_name="q"))
    families = list(text_string_to_metric_families(scrape_text(metrics_port(watched))))
    exported = {s.name for f in families for s in f.samples} | {f.name for f in families}
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    assert len(queries) >= 5
    queries += [variable["query"] for variable in dashboard["templating"]["list"]]
    used = {name for query in queries for name in re.findall(r"\bqm_[a-z_]+\b", query)}
    assert used, queries
    assert used <= exported, used - exported
    for wanted in ("qm_calls_total", "qm_call_duration_seconds_bucket", "qm_queue_messages"):
        assert wanted in used
    assert {"qm_sessions", "qm_store_commit_duration_seconds_bucket"} <= used
    assert {"qm_queue_oldest_ready_age_seconds", "qm_queue_dead_letters"} <= used


# The subprocess tests: what an operator starts, and which ports it opens.


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on, from /proc (its socket inodes, LISTEN state)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_without_the_flag_no_metrics_port_is_opened(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", "--rsa-bits", "2048").start()
    try:
        assert server.proc is not None
        assert listening_ports(server.proc.pid) == {server.port}
    finally:
        server.stop()


def test_qm_server_serves_metrics_on_the_flag_and_stops_with_it(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "data", "--rsa-bits", "2048", "--metrics-listen", "127.0.0.1:0"
    ).start()
    try:
        assert server.proc is not None
        ports = listening_ports(server.proc.pid)
        assert len(ports) == 2 and server.port in ports
        (port,) = ports - {server.port}
        assert value(scrape(port), "qm_store_healthy") == 1
        assert server.terminate() == 0
        with pytest.raises(OSError):
            scrape(port)
    finally:
        server.stop()


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:http", "127.0.0.1:70000"])
def test_a_malformed_metrics_address_exits_2(tmp_path: Path, address: str) -> None:
    result = qm_server(
        "--data-dir",
        str(tmp_path / "d"),
        "--rsa-bits",
        "2048",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        address,
    )
    assert result.returncode == 2, result.stderr
    assert "--metrics-listen" in result.stderr
    assert not (tmp_path / "d").exists()  # refused before the data directory is made


def test_a_taken_metrics_port_exits_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = qm_server(
            "--data-dir",
            str(tmp_path / "d"),
            "--rsa-bits",
            "2048",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            f"127.0.0.1:{port}",
        )
    assert result.returncode == 2, result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr


def test_the_metrics_endpoint_stops_with_the_server(watched: ServerHandle) -> None:
    port = metrics_port(watched)
    assert value(scrape(port), "qm_store_healthy") == 1
    watched.stop()
    with pytest.raises(OSError):
        scrape(port)
