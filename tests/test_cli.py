"""The ``qm`` command line, run as a subprocess against a real server."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from client_fixtures import SUBPROCESS_TIMEOUT, add_user, connect, raw_stub, run_qm
from test_client_unavailable import parked

from conftest import ServerHandle
from qm.v1 import queue_manager_pb2 as pb
from qm_client import QueueManagerClient
from qm_client.cli import main
from qm_server.config import MIB


@pytest.fixture
def qm(server: ServerHandle) -> Iterator[QueueManagerClient]:
    """A client beside the CLI, to set up and to check what the CLI did."""
    with connect(server) as client:
        yield client


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    return result.stdout


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result))


def iso(ms: int) -> str:
    """A proto time as ``qm`` prints it for people."""
    when = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def failed(result: subprocess.CompletedProcess[str], status: int, code_name: str) -> str:
    assert result.returncode == status, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith(f"qm: {code_name}: "), result.stderr
    return result.stderr


def test_queue_commands(server: ServerHandle, qm: QueueManagerClient) -> None:
    assert ok(run_qm(server, "queue", "create", "jobs")) == "created queue jobs\n"
    failed(run_qm(server, "queue", "create", "jobs"), 1, "QUEUE_ALREADY_EXISTS")
    qm.add_all("jobs", ["a", "b"])
    held = qm.poll("jobs")
    assert ok(run_qm(server, "queue", "size", "jobs")) == "1\n"
    assert ok(run_qm(server, "queue", "empty", "jobs")) == "false\n"
    assert ok(run_qm(server, "queue", "unacked", "jobs")) == "1\n"
    assert ok_json(run_qm(server, "--json", "queue", "size", "jobs")) == {
        "queue": "jobs",
        "size": 1,
    }
    # --json is accepted after the command too.
    assert ok_json(run_qm(server, "queue", "empty", "jobs", "--json")) == {
        "queue": "jobs",
        "empty": False,
    }
    assert ok_json(run_qm(server, "queue", "unacked", "--json", "jobs")) == {
        "queue": "jobs",
        "unacked": 1,
    }
    failed(run_qm(server, "queue", "destroy", "jobs"), 1, "QUEUE_NOT_EMPTY")
    assert held is not None
    assert ok(run_qm(server, "queue", "destroy", "jobs", "--force")) == "destroyed queue jobs\n"
    failed(run_qm(server, "queue", "size", "jobs"), 1, "QUEUE_NOT_FOUND")


def test_errors_as_json_name_the_code(server: ServerHandle) -> None:
    result = run_qm(server, "--json", "queue", "size", "nope")
    assert (result.returncode, result.stdout) == (1, "")
    error = json.loads(result.stderr)
    assert error["error"]["code"] == "QUEUE_NOT_FOUND"
    assert error["error"]["message"]


def test_add_from_arguments_and_from_stdin(server: ServerHandle, qm: QueueManagerClient) -> None:
    qm.new_queue("jobs")
    first = int(ok(run_qm(server, "add", "jobs", "one")))
    assert ok_json(run_qm(server, "--json", "add", "jobs", "two", "three")) == {
        "queue": "jobs",
        "message_ids": [first + 1, first + 2],
    }
    out = ok(run_qm(server, "add", "jobs", "--batch-size", "2", stdin="four\nfive\nsix\n"))
    assert out == f"{first + 3}\n{first + 4}\n{first + 5}\n"
    assert [m.element for m in qm.pull("jobs", 10)] == [
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
    ]
    failed(run_qm(server, "add", "nope", "x"), 1, "QUEUE_NOT_FOUND")


def test_poll_without_finishing_releases_on_exit(
    server: ServerHandle, qm: QueueManagerClient
) -> None:
    qm.new_queue("jobs")
    (message_id,) = qm.add_all("jobs", ["hello"])
    result = run_qm(server, "poll", "jobs")
    assert result.returncode == 0
    fields = result.stdout.removesuffix("\n").split("\t")
    assert fields[:3] == [str(message_id), "hello", "delivery 1"]
    assert fields[4] == "no lease (held while qm runs)"
    assert "not acked" in result.stderr
    assert (qm.size("jobs"), qm.unacked("jobs")) == (1, 0)
    data = ok_json(run_qm(server, "--json", "poll", "jobs"))
    (message,) = data["messages"]
    assert fields[3] == f"enqueued {iso(message['enqueued_at_ms'])}"
    assert data == {
        "queue": "jobs",
        "messages": [
            {
                "message_id": message_id,
                "element": "hello",
                "delivery_count": 2,
                "enqueued_at_ms": message["enqueued_at_ms"],
                "lease_expires_at_ms": 0,
            }
        ],
        "finished": None,
        "failed": [],
    }


def test_poll_ack_and_nack(server: ServerHandle, qm: QueueManagerClient) -> None:
    qm.new_queue("jobs")
    ids = qm.add_all("jobs", ["a", "b", "c"])
    data = ok_json(run_qm(server, "--json", "poll", "jobs", "--nack"))
    assert [(m["message_id"], m["element"], m["delivery_count"]) for m in data["messages"]] == [
        (ids[0], "a", 1)
    ]
    assert data["finished"] == "nack"
    assert (qm.size("jobs"), qm.unacked("jobs")) == (3, 0)
    data = ok_json(run_qm(server, "--json", "poll", "jobs", "--count", "2", "--ack"))
    assert [(m["message_id"], m["delivery_count"]) for m in data["messages"]] == [
        (ids[0], 2),
        (ids[1], 1),
    ]
    assert (data["finished"], data["failed"]) == ("ack", [])
    assert ok(run_qm(server, "poll", "jobs", "--ack")).startswith(f"{ids[2]}\tc\tdelivery 1\t")
    assert (qm.size("jobs"), qm.unacked("jobs")) == (0, 0)
    empty = run_qm(server, "poll", "jobs", "--wait", "0.2")
    failed(empty, 3, "QUEUE_EMPTY")
    usage = run_qm(server, "poll", "jobs", "--ack", "--nack")
    assert usage.returncode == 2
    assert "not allowed with argument" in usage.stderr


def test_map_commands(server: ServerHandle, qm: QueueManagerClient, tmp_path: Path) -> None:
    assert ok(run_qm(server, "map", "put", "cfg", "color", "blue")) == "set color in cfg\n"
    assert ok(run_qm(server, "map", "get", "cfg", "color")) == "blue\n"
    assert ok_json(run_qm(server, "--json", "map", "get", "cfg", "color")) == {
        "map": "cfg",
        "key": "color",
        "value": "blue",
    }
    failed(run_qm(server, "map", "get", "cfg", "size"), 1, "KEY_NOT_FOUND")
    failed(run_qm(server, "map", "get", "nope", "size"), 1, "MAP_NOT_FOUND")

    source = tmp_path / "load.json"
    source.write_text(json.dumps({"size": "L", "shape": "round"}))
    assert ok(run_qm(server, "map", "load", "cfg", str(source))) == "loaded 2 key(s) into cfg\n"
    assert ok_json(run_qm(server, "--json", "map", "load", "cfg", stdin='{"weight": "3"}')) == {
        "map": "cfg",
        "loaded": 1,
    }
    assert ok(run_qm(server, "map", "all", "cfg")) == (
        "color\tblue\nshape\tround\nsize\tL\nweight\t3\n"
    )
    everything = ok_json(run_qm(server, "--json", "map", "all", "cfg"))
    assert everything == {"color": "blue", "shape": "round", "size": "L", "weight": "3"}
    # The JSON of `map all` is what `map load` reads.
    copy = ok(run_qm(server, "map", "load", "copy", stdin=json.dumps(everything)))
    assert copy == "loaded 4 key(s) into copy\n"
    assert qm.map("copy").to_dict() == everything

    assert ok(run_qm(server, "map", "list", "cfg", "--offset", "1", "--size", "2")) == (
        "shape\tround\nsize\tL\n"
    )
    assert ok_json(run_qm(server, "--json", "map", "list", "cfg", "--offset", "3")) == {
        "map": "cfg",
        "offset": 3,
        "size": 1,
        "list": [{"key": "weight", "value": "3"}],
    }
    assert ok(run_qm(server, "map", "remove", "cfg", "color")) == "removed color from cfg\n"
    failed(run_qm(server, "map", "remove", "cfg", "color"), 1, "KEY_NOT_FOUND")
    assert ok(run_qm(server, "map", "destroy", "cfg")) == "destroyed map cfg\n"
    failed(run_qm(server, "map", "all", "cfg"), 1, "MAP_NOT_FOUND")


def test_map_all_reads_a_map_too_large_for_one_answer(
    server: ServerHandle, qm: QueueManagerClient
) -> None:
    big = {f"k{i}": str(i) * MIB for i in range(5)}  # 5 MiB: MapGetAll refuses it
    for key, value in big.items():
        qm.map("big")[key] = value
    assert ok_json(run_qm(server, "--json", "map", "all", "big")) == big
    result = run_qm(server, "map", "all", "big")
    assert (result.returncode, len(result.stdout.splitlines())) == (0, 5)
    assert "page by page" in result.stderr


@pytest.mark.parametrize(
    ("stdin", "reason"),
    [
        ("not json", "input is not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"a": 1}', "values must be strings"),
        ("{}", "nothing to load"),
    ],
)
def test_map_load_refuses_bad_input(
    server: ServerHandle, qm: QueueManagerClient, stdin: str, reason: str
) -> None:
    stderr = failed(run_qm(server, "map", "load", "cfg", stdin=stdin), 2, "USAGE")
    assert reason in stderr
    assert qm.map("cfg").exists() is False


def test_map_load_is_one_atomic_batch(make_server: Callable[..., ServerHandle]) -> None:
    server = make_server(max_batch=2)
    failed(
        run_qm(server, "map", "load", "m", stdin='{"a":"1","b":"2","c":"3"}'), 1, "INVALID_ARGUMENT"
    )
    with connect(server) as qm:
        assert qm.map("m").exists() is False


def test_health_needs_no_login(server: ServerHandle) -> None:
    assert ok(run_qm(server, "health", QM_USER=None, QM_PASSWORD=None)) == "SERVING\n"
    assert ok_json(
        run_qm(server, "--json", "health", "--service", "qm.v1.QueueManagerService")
    ) == {
        "service": "qm.v1.QueueManagerService",
        "status": "SERVING",
    }


def test_token_session_outlives_the_command(server: ServerHandle) -> None:
    token = ok_json(run_qm(server, "--json", "token"))
    assert token["session_ttl_ms"] == 30_000
    result = run_qm(server, "token")
    assert result.returncode == 0
    plain = result.stdout.strip()
    assert "session expires after 30 s" in result.stderr
    with raw_stub(server) as stub:
        for value in (token["token"], plain):
            reply = stub.Size(pb.SizeRequest(token=value, queue_name="nope"))
            assert reply.code == pb.CODE_QUEUE_NOT_FOUND  # the token was accepted
            assert stub.Logout(pb.LogoutRequest(token=value)).code == pb.CODE_OK


def test_permission_denied_is_named(server: ServerHandle, qm: QueueManagerClient) -> None:
    qm.new_queue("jobs")
    add_user(server, "bob", "bob-pw")
    result = run_qm(server, "queue", "size", "jobs", QM_USER="bob", QM_PASSWORD="bob-pw")
    failed(result, 1, "PERMISSION_DENIED")


def test_wrong_password_fails_with_the_code(server: ServerHandle) -> None:
    failed(run_qm(server, "queue", "size", "jobs", QM_PASSWORD="wrong"), 1, "UNAUTHENTICATED")


def test_missing_credentials_without_a_terminal_are_a_usage_error(server: ServerHandle) -> None:
    stderr = failed(run_qm(server, "queue", "size", "jobs", QM_PASSWORD=None), 2, "USAGE")
    assert "set QM_PASSWORD" in stderr
    stderr = failed(run_qm(server, "queue", "size", "jobs", QM_USER=None), 2, "USAGE")
    assert "set QM_USER" in stderr


def test_flags_override_the_environment(server: ServerHandle) -> None:
    result = run_qm(
        server,
        "--server",
        server.target,
        "--user",
        "admin",
        "--password",
        server.admin_password,
        "queue",
        "create",
        "x",
        QM_SERVER="127.0.0.1:1",
        QM_USER="nobody",
        QM_PASSWORD="wrong",
    )
    assert ok(result) == "created queue x\n"


def test_unreachable_server_is_unavailable(server: ServerHandle) -> None:
    failed(
        run_qm(server, "--timeout", "3", "queue", "size", "x", QM_SERVER="127.0.0.1:1"),
        4,
        "UNAVAILABLE",
    )


def test_a_long_poll_cut_short_by_a_shutdown_exits_4_not_3(
    server: ServerHandle, qm: QueueManagerClient
) -> None:
    """A script that stops at exit status 3 (nothing ready) must not stop because the
    server restarts: the poll the shutdown cut short exits 4 (UNAVAILABLE)."""
    qm.new_queue("jobs")
    waiting = parked(server)
    result: list[subprocess.CompletedProcess[str]] = []
    polling = threading.Thread(
        target=lambda: result.append(run_qm(server, "poll", "jobs", "--wait", "20"))
    )
    polling.start()
    assert waiting.wait(SUBPROCESS_TIMEOUT)
    server.stop()
    polling.join(SUBPROCESS_TIMEOUT)
    failed(result[0], 4, "UNAVAILABLE")


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["queue"],
        *(
            ["queue", action]
            for action in (
                "create",
                "update",
                "info",
                "list",
                "purge",
                "destroy",
                "size",
                "empty",
                "unacked",
            )
        ),
        ["dead"],
        ["dead", "list"],
        ["dead", "redrive"],
        ["add"],
        ["poll"],
        ["map"],
        *(["map", action] for action in ("put", "get", "remove", "all", "list", "destroy", "load")),
        ["health"],
        ["token"],
    ],
)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: qm")
