"""The ``qm`` lifecycle commands, run as subprocesses against a real server: queue settings,
info, list, purge, dead letters, delayed and idempotent adds, and what poll shows."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from client_fixtures import connect, run_qm
from test_cli import failed, iso, ok, ok_json

from conftest import ServerHandle
from qm_client import QueueManagerClient, QueueSettings, RetryPolicy

SETTING_FLAGS = [
    "--ack-deadline",
    "30000",
    "--max-deliveries",
    "5",
    "--dead-letter-queue",
    "jobs.dead",
    "--retry-initial",
    "1000",
    "--retry-multiplier",
    "3",
    "--retry-max",
    "60000",
    "--delay",
    "0",
    "--max-age",
    "86400000",
    "--max-length",
    "100",
]
SETTINGS = QueueSettings(
    ack_deadline_ms=30_000,
    max_deliveries=5,
    dead_letter_queue="jobs.dead",
    retry=RetryPolicy(1_000, 3.0, 60_000),
    delay_ms=0,
    max_age_ms=86_400_000,
    max_length=100,
)
SETTINGS_JSON = {
    "ack_deadline_ms": 30_000,
    "max_deliveries": 5,
    "dead_letter_queue": "jobs.dead",
    "retry_delay": {"initial_delay_ms": 1_000, "multiplier": 3.0, "max_delay_ms": 60_000},
    "delay_ms": 0,
    "max_age_ms": 86_400_000,
    "max_length": 100,
}


@pytest.fixture
def qm(server: ServerHandle) -> Iterator[QueueManagerClient]:
    with connect(server) as client:
        yield client


def test_queue_create_takes_every_setting_and_info_shows_them(
    server: ServerHandle, qm: QueueManagerClient
) -> None:
    qm.new_queue("jobs.dead")
    assert ok(run_qm(server, "queue", "create", "jobs", *SETTING_FLAGS)) == "created queue jobs\n"
    assert qm.queue_info("jobs").settings == SETTINGS
    qm.add_all("jobs", ["a", "b"])
    data = ok_json(run_qm(server, "--json", "queue", "info", "jobs"))
    assert data["settings"] == SETTINGS_JSON
    assert (data["queue"], data["ready"], data["in_flight"], data["delayed"]) == ("jobs", 2, 0, 0)
    text = ok(run_qm(server, "queue", "info", "jobs"))
    assert "ready:             2\n" in text
    assert "ack_deadline:      30000 ms\n" in text
    assert "retry_delay:       1000 ms, x3 per failure, up to 60000 ms\n" in text
    failed(run_qm(server, "queue", "info", "nope"), 1, "QUEUE_NOT_FOUND")
    failed(run_qm(server, "queue", "create", "bad", "--ack-deadline", "10"), 1, "INVALID_ARGUMENT")


def test_queue_update_changes_only_the_flags_given(
    server: ServerHandle, qm: QueueManagerClient
) -> None:
    qm.new_queue("jobs.dead")
    qm.new_queue("jobs", SETTINGS)
    data = ok_json(run_qm(server, "--json", "queue", "update", "jobs", "--retry-max", "5000"))
    # One flag of the retry policy keeps the other two as they were.
    assert data == {
        "queue": "jobs",
        "settings": {
            **SETTINGS_JSON,
            "retry_delay": {"initial_delay_ms": 1_000, "multiplier": 3.0, "max_delay_ms": 5_000},
        },
    }
    text = ok(run_qm(server, "queue", "update", "jobs", "--max-length", "0"))
    assert "max_length:        none\n" in text
    assert qm.queue_info("jobs").settings.max_length == 0
    usage = run_qm(server, "queue", "update", "jobs")
    assert usage.returncode == 2
    assert usage.stderr.startswith("qm: USAGE: nothing to change")


def test_queue_list_and_purge(server: ServerHandle, qm: QueueManagerClient) -> None:
    for name in ("b", "a"):
        qm.new_queue(name)
    qm.add_all("a", ["1", "2", "3"])
    held = qm.poll("a")
    assert held is not None
    assert ok(run_qm(server, "queue", "list")) == (
        "a\t2 ready\t1 in flight\t0 delayed\nb\t0 ready\t0 in flight\t0 delayed\n"
    )
    assert ok_json(run_qm(server, "--json", "queue", "list")) == {
        "queues": [
            {"name": "a", "ready": 2, "in_flight": 1, "delayed": 0},
            {"name": "b", "ready": 0, "in_flight": 0, "delayed": 0},
        ]
    }
    assert ok(run_qm(server, "queue", "purge", "a")) == "purged 2 message(s) from a\n"
    assert ok_json(run_qm(server, "--json", "queue", "purge", "a")) == {"queue": "a", "purged": 0}
    assert (qm.size("a"), qm.unacked("a")) == (0, 1)
    held.ack()


def test_dead_list_and_redrive(server: ServerHandle, qm: QueueManagerClient) -> None:
    qm.new_queue("jobs.dead")
    qm.new_queue("jobs", QueueSettings(max_deliveries=1, dead_letter_queue="jobs.dead"))
    ids = qm.add_all("jobs", ["x", "y"])
    for message in qm.pull("jobs", 2):
        message.nack()
    data = ok_json(run_qm(server, "--json", "dead", "list", "jobs.dead"))
    letters = data["dead_letters"]
    assert [(d["message_id"], d["element"], d["original_queue"]) for d in letters] == [
        (ids[0], "x", "jobs"),
        (ids[1], "y", "jobs"),
    ]
    assert letters[0]["cause"] == "max_deliveries after ack error"
    assert letters[0]["delivery_count"] == 1
    assert abs(letters[0]["dead_lettered_at_ms"] - time.time() * 1000) < 60_000
    text = ok(run_qm(server, "dead", "list", "jobs.dead")).splitlines()
    assert text[0] == (
        f"{ids[0]}\tx\tfrom jobs\t1 deliveries\tmax_deliveries after ack error\t"
        f"at {iso(letters[0]['dead_lettered_at_ms'])}"
    )
    assert ok(run_qm(server, "dead", "redrive", "jobs.dead", str(ids[0]))) == (
        "moved 1 dead letter(s) back to their queues\n"
    )
    assert qm.size("jobs") == 1
    # An id that is not a dead letter there stays, and says why.
    result = run_qm(server, "dead", "redrive", "jobs.dead", str(ids[0]), str(ids[1]))
    assert result.returncode == 1
    assert result.stdout == "moved 1 dead letter(s) back to their queues\n"
    assert result.stderr == f"qm: MESSAGE_NOT_FOUND: dead letter {ids[0]} stayed\n"
    assert ok_json(run_qm(server, "--json", "dead", "redrive", "jobs.dead")) == {
        "queue": "jobs.dead",
        "moved": 0,
        "failed": [],
    }
    assert ok(run_qm(server, "dead", "list", "jobs.dead")) == ""


def test_add_with_delay_and_request_id(server: ServerHandle, qm: QueueManagerClient) -> None:
    qm.new_queue("jobs")
    first = ok_json(run_qm(server, "--json", "add", "jobs", "later", "--delay", "3600000"))
    assert len(first["message_ids"]) == 1
    info = qm.queue_info("jobs")
    assert (info.ready, info.delayed) == (0, 1)
    args = ["add", "jobs", "a", "b", "--request-id", "job-7"]
    ids = ok(run_qm(server, *args))
    assert ok(run_qm(server, *args)) == ids  # a repeat adds nothing
    assert qm.size("jobs") == 2
    usage = run_qm(server, "add", "jobs", "--batch-size", "1", "--request-id", "r", stdin="a\nb\n")
    assert usage.returncode == 2


def test_poll_shows_the_lease_it_was_given(server: ServerHandle, qm: QueueManagerClient) -> None:
    qm.new_queue("jobs")
    qm.add("jobs", "hello")
    before = time.time() * 1000
    data = ok_json(run_qm(server, "--json", "poll", "jobs", "--ack-deadline", "60000", "--ack"))
    (message,) = data["messages"]
    assert abs(message["lease_expires_at_ms"] - (before + 60_000)) < 30_000
    assert abs(message["enqueued_at_ms"] - before) < 30_000
    qm.add("jobs", "again")
    fields = ok(run_qm(server, "poll", "jobs", "--ack-deadline", "5000", "--ack")).split("\t")
    assert fields[1:3] == ["again", "delivery 1"]
    assert fields[4].startswith("lease until 20")
