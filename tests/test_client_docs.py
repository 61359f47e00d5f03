"""The quick start at the top of docs/client.md runs as written."""

from __future__ import annotations

import re

import pytest
from client_fixtures import ROOT, connect

from conftest import ServerHandle


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
