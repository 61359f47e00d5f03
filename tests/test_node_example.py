"""The Node.js example against a real server: proof that the proto alone is enough.

Installs the example's pinned dependencies itself (``npm ci``) when they are missing, so a
fresh CI machine passes without a separate setup step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from client_fixtures import ROOT, client_env, connect, run, server_fingerprint

from conftest import ServerHandle

NODE_DIR = ROOT / "examples" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the example's dependencies installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node is not None and npm is not None, "the Node example needs node and npm"
    if not (NODE_DIR / "node_modules").is_dir():
        install = run([npm, "ci", "--no-audit", "--no-fund"], dict(os.environ), cwd=NODE_DIR)
        assert install.returncode == 0, install.stderr
    return node


def test_node_client_logs_in_queues_acks_and_reads_a_map(server: ServerHandle, node: str) -> None:
    fingerprint = server_fingerprint(server)
    env = client_env(server, QM_QUEUE="from-node", QM_MAP="node-map", QM_PIN=fingerprint)
    result = run([node, "example.js"], env, cwd=NODE_DIR)
    assert result.returncode == 0, result.stderr

    summary = json.loads(result.stdout)
    message_id = summary["added_id"]
    assert summary == {
        "fingerprint": fingerprint,
        "session_ttl_ms": 30_000,
        "added_id": message_id,
        "polled": {"message_id": message_id, "element": "hello from node", "delivery_count": 1},
        "language": "javascript",
        "map": {"language": "javascript", "runtime": summary["map"]["runtime"]},
    }
    assert summary["map"]["runtime"].startswith("node ")
    with connect(server) as qm:
        assert (qm.size("from-node"), qm.unacked("from-node")) == (0, 0)
        assert qm.map("node-map").to_dict() == summary["map"]


def test_node_client_reports_a_failed_login(server: ServerHandle, node: str) -> None:
    result = run([node, "example.js"], client_env(server, QM_PASSWORD="wrong"), cwd=NODE_DIR)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: CODE_UNAUTHENTICATED: ")


def test_node_client_refuses_a_server_with_another_key(server: ServerHandle, node: str) -> None:
    result = run([node, "example.js"], client_env(server, QM_PIN="00" * 32), cwd=NODE_DIR)
    assert result.returncode == 1
    assert "does not match QM_PIN; password not sent" in result.stderr
    with connect(server) as qm:
        assert qm.map("node-example").exists() is False


def test_node_dependencies_are_pinned() -> None:
    package = json.loads((NODE_DIR / "package.json").read_text())
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    for name, version in package["dependencies"].items():
        assert version[0].isdigit(), f"{name} is not pinned to an exact version"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    assert Path(ROOT / ".gitignore").read_text().splitlines().count("node_modules/") == 1
