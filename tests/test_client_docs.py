"""Every Python example of docs/client.md runs against a real server.

A block is found by its first line (RUN), so editing a block keeps its test, and a new
block fails test_every_block_is_run_or_marked until it is run here or marked
`<!-- not run: why -->` on the line before its fence. Blocks after the first two take
names from the text around them (`qm`, a connected client; `handle`, `handle_order`,
`stopping`, `target`, `user`, `password`, `log`): namespace() gives them.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import re
import threading
from typing import Any

import pytest
from client_fixtures import ROOT, connect

import qm_client
from conftest import ServerHandle
from qm_client import Message, QueueManagerClient, QueueSettings

DOC = ROOT / "docs" / "client.md"
NOT_RUN = "<!-- not run: "
RUN = {
    "quick start": "import os\nfrom qm_client import QueueManagerClient\n\nwith",
    "queue settings": "import os\nfrom qm_client import QueueManagerClient, QueueSettings",
    "worker loop": "while not stopping.is_set():",
    "leases": 'message = qm.poll("orders", wait=5, ack_deadline=30)',
    "dead letters": 'for letter in qm.dead_letters("orders.dead"):',
    "idempotent adds": 'ids = qm.add_all("orders", ["a", "b"], request_id=',
    "maps": 'config = qm.map("config")',
    "session loss": "def on_session_lost(loss: SessionLoss) -> None:",
    "subscribe": 'with qm.subscribe("jobs", max_unacked=32) as subscription:',
    "asyncio": "import asyncio\nimport os\n\nfrom qm_client import AsyncQueueManagerClient",
}


def blocks() -> list[tuple[str, bool]]:
    """Every python block, and whether it is marked not to run."""
    text = DOC.read_text()
    found = []
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.DOTALL):
        line_before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found.append((match.group(1), line_before.startswith(NOT_RUN)))
    return found


def block(name: str) -> str:
    (code,) = [code for code, _ in blocks() if code.startswith(RUN[name])]
    return code


def run(name: str, names: dict[str, Any]) -> dict[str, Any]:
    exec(compile(block(name), f"docs/client.md ({name})", "exec"), names)
    return names


class Done(Exception):
    """Ends an example's endless loop from inside its handler."""


def namespace(server: ServerHandle, qm: QueueManagerClient) -> dict[str, Any]:
    """What the examples take from the text around them, and every public client name."""
    names: dict[str, Any] = {name: getattr(qm_client, name) for name in qm_client.__all__}
    names |= {
        "qm": qm,
        "target": server.target,
        "user": "admin",
        "password": server.admin_password,
        "log": logging.getLogger("docs-example"),
        "stopping": threading.Event(),
        "handled": [],
    }
    return names


def test_every_block_is_run_or_marked() -> None:
    unmarked = [code for code, marked in blocks() if not marked]
    assert len(blocks()) - len(unmarked) == 3  # the signature, the sketch, the sessions
    for code in unmarked:
        assert [name for name, start in RUN.items() if code.startswith(start)], code


def test_the_message_sketch_has_the_fields_of_message() -> None:
    (sketch,) = [code for code, marked in blocks() if marked and "class Message" in code]
    tree = ast.parse(sketch)
    fields = [node.target.id for node in ast.walk(tree) if isinstance(node, ast.AnnAssign)]  # type: ignore[union-attr]
    public = [f.name for f in dataclasses.fields(Message) if not f.name.startswith("_")]
    assert fields == public


def test_quick_start_runs(
    server: ServerHandle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = block("quick start").replace('"localhost:50051"', repr(server.target))
    monkeypatch.setenv("QM_PASSWORD", server.admin_password)
    exec(compile(code, "docs/client.md", "exec"), {})
    assert capsys.readouterr().out == "resize photo 42\n"
    with connect(server) as qm:
        assert (qm.size("jobs"), qm.unacked("jobs")) == (0, 0)


def test_the_queue_settings_example_runs(
    server: ServerHandle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = block("queue settings").replace('"localhost:50051"', repr(server.target))
    monkeypatch.setenv("QM_PASSWORD", server.admin_password)
    exec(compile(code, "docs/client.md", "exec"), {})
    assert capsys.readouterr().out == "30000 0 0 0\norders 0 0 0\norders.dead 0 0 0\n"
    with connect(server) as qm:
        settings = qm.queue_info("orders").settings
        assert (settings.max_deliveries, settings.max_length) == (5, 10_000)


def test_the_dead_letter_and_idempotent_add_examples_run(
    server: ServerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    with connect(server) as qm:
        qm.new_queue("orders.dead")
        qm.new_queue("orders", QueueSettings(max_deliveries=1, dead_letter_queue="orders.dead"))
        run("idempotent adds", namespace(server, qm))
        assert qm.size("orders") == 3
        ids = qm.add_all("orders", ["x", "y"])
        for message in qm.pull("orders", 5):
            if message.message_id in ids:
                message.nack()  # dead-lettered
            else:
                message.ack()
        run("dead letters", namespace(server, qm))
        out = capsys.readouterr().out
        assert out.startswith(f"{ids[0]} orders 1 max_deliveries after ack error\n")
        assert out.endswith("2 {}\n")
        assert qm.size("orders") == 0  # redriven, then purged


def test_the_worker_loop_nacks_a_failure_and_acks_the_rest(server: ServerHandle) -> None:
    with connect(server) as qm:
        qm.new_queue("jobs")
        qm.add_all("jobs", ["one", "flaky", "two"])
        names = namespace(server, qm)
        failed_once: list[str] = []

        def handle(element: str) -> None:
            if element == "flaky" and not failed_once:
                failed_once.append(element)
                raise RuntimeError("the first try fails")
            names["handled"].append(element)
            if len(names["handled"]) == 3:
                names["stopping"].set()

        names["handle"] = handle
        run("worker loop", names)
        assert sorted(names["handled"]) == ["flaky", "one", "two"]
        assert (qm.size("jobs"), qm.unacked("jobs")) == (0, 0)


def test_the_lease_examples_ack(server: ServerHandle) -> None:
    with connect(server) as qm:
        qm.new_queue("orders")
        qm.add_all("orders", ["first", "second"])
        names = namespace(server, qm)
        names["handle_order"] = lambda message: names["handled"].append(message.element)
        run("leases", names)
        assert names["handled"] == ["first", "second"]
        assert names["lease"].lost is False
        assert (qm.size("orders"), qm.unacked("orders")) == (0, 0)


def test_the_map_example_prints(server: ServerHandle, capsys: pytest.CaptureFixture[str]) -> None:
    with connect(server) as qm:
        run("maps", namespace(server, qm))
        expected = {"color": "blue", "size": "L", "shape": "round"}
        assert capsys.readouterr().out == f"blue 3 {dict(sorted(expected.items()))}\n"
        assert qm.map("config") == expected


def test_the_session_loss_example_logs_in_with_its_callback(server: ServerHandle) -> None:
    with connect(server) as qm:
        names = run("session loss", namespace(server, qm))
    made = names["qm"]
    try:
        assert made is not qm
        made.new_queue("made-by-the-example")  # the example's client is logged in
    finally:
        made.close()


def test_the_subscribe_example_handles_and_acks(server: ServerHandle) -> None:
    with connect(server) as qm:
        qm.new_queue("jobs")
        qm.add_all("jobs", ["a", "b", "stop"])
        names = namespace(server, qm)

        def handle(element: str) -> None:
            if element == "stop":
                raise Done
            names["handled"].append(element)

        names["handle"] = handle
        with pytest.raises(Done):
            run("subscribe", names)
        assert names["handled"] == ["a", "b"]
        assert (qm.size("jobs"), qm.unacked("jobs")) == (1, 0)  # "stop", never acked


def test_the_asyncio_example_runs(
    server: ServerHandle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = block("asyncio").replace('"localhost:50051"', repr(server.target))
    monkeypatch.setenv("QM_PASSWORD", server.admin_password)
    exec(compile(code, "docs/client.md", "exec"), {"__name__": "docs"})
    assert capsys.readouterr().out == "welcome ann\nwelcome bob\nnoreply@example.com\n"
    with connect(server) as qm:
        assert (qm.size("emails"), qm.unacked("emails")) == (0, 0)
        assert qm.map("settings").to_dict() == {"sender": "noreply@example.com"}
