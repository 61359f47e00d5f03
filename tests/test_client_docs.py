"""The examples of docs/client.md run as written."""

from __future__ import annotations

import re

import pytest
from client_fixtures import ROOT, connect

from conftest import ServerHandle
from qm_client import QueueSettings


def test_quick_start_runs(
    server: ServerHandle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (ROOT / "docs" / "client.md").read_text()
    match = re.search(r"```python\n(.*?)```", text, re.DOTALL)
    assert match is not None
    code = match.group(1).replace('"localhost:50051"', repr(server.target))
    monkeypatch.setenv("QM_PASSWORD", server.admin_password)
    exec(compile(code, "docs/client.md", "exec"), {})
    assert capsys.readouterr().out == "resize photo 42\n"
    with connect(server) as qm:
        assert (qm.size("jobs"), qm.unacked("jobs")) == (0, 0)


def python_blocks(heading: str) -> list[str]:
    """The python blocks of one section of docs/client.md."""
    text = (ROOT / "docs" / "client.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_queue_settings_example_runs(
    server: ServerHandle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (code,) = python_blocks("### Queue settings")
    code = code.replace('"localhost:50051"', repr(server.target))
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
        (code,) = python_blocks("### Idempotent adds")
        exec(compile(code, "docs/client.md", "exec"), {"qm": qm})
        assert qm.size("orders") == 3
        ids = qm.add_all("orders", ["x", "y"])
        for message in qm.pull("orders", 5):
            if message.message_id in ids:
                message.nack()  # dead-lettered
            else:
                message.ack()
        (code,) = python_blocks("### Dead letters, purge and listings")
        exec(compile(code, "docs/client.md", "exec"), {"qm": qm})
        out = capsys.readouterr().out
        assert out.startswith(f"{ids[0]} orders 1 max_deliveries after ack error\n")
        assert out.endswith("2 {}\n")
        assert qm.size("orders") == 0  # redriven, then purged


def test_the_asyncio_example_runs(
    server: ServerHandle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (code,) = python_blocks("### asyncio (`AsyncQueueManagerClient`)")
    code = code.replace('"localhost:50051"', repr(server.target))
    monkeypatch.setenv("QM_PASSWORD", server.admin_password)
    exec(compile(code, "docs/client.md", "exec"), {"__name__": "docs"})
    assert capsys.readouterr().out == "welcome ann\nwelcome bob\nnoreply@example.com\n"
    with connect(server) as qm:
        assert (qm.size("emails"), qm.unacked("emails")) == (0, 0)
        assert qm.map("settings").to_dict() == {"sender": "noreply@example.com"}
