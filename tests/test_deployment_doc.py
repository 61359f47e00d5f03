"""docs/deployment.md stays true: its flags exist, its command line parses, its service
config is valid JSON that the Python snippet uses, and that config spreads calls over
the nodes and skips a node that says NOT_SERVING."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import itertools
import json
import re
import shlex
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_pg_cluster import Node, start_nodes

from conftest import ADMIN_PASSWORD, FAST_AUTH, ServerHandle
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc
from qm_client import QueueManagerClient
from qm_client._channel import service_config
from qm_server import health
from qm_server.__main__ import build_parser
from qm_server.server import HEALTH_NAMES
from qm_server.sessions import Session

DOC = (Path(__file__).resolve().parent.parent / "docs" / "deployment.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, flags=re.DOTALL)


def test_every_flag_named_exists() -> None:
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", DOC))
    known = {o for action in build_parser()._actions for o in action.option_strings}
    assert named and named <= known, named - known


def test_the_node_s_command_line_parses() -> None:
    (command,) = blocks("sh")
    words = shlex.split(command.replace("\\\n", " "))
    assert words[0] == "qm-server"
    options = build_parser().parse_args(words[1:])
    assert options.store == "postgresql://qm@db.internal/qm"
    assert options.listen == "0.0.0.0:50051"


def test_the_service_config_is_the_snippet_s_and_valid_json() -> None:
    (text,) = blocks("json")
    config = json.loads(text)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    target, options = run_snippet()
    assert target == "dns:///qm.internal:50051"
    assert options == [("grpc.service_config", json.dumps(config))]


def test_the_python_client_s_argument_sets_the_doc_s_service_config() -> None:
    """The client snippet names a real argument, and the argument's service config holds
    the doc's JSON keys."""
    (code,) = [block for block in blocks("python") if "QueueManagerClient(" in block]
    made: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    names: dict[str, Any] = {"password": "pw"}
    exec(
        code.replace("from qm_client import QueueManagerClient\n", ""),
        names | {"QueueManagerClient": lambda *args, **kwargs: made.append((args, kwargs))},
    )
    ((args, kwargs),) = made
    assert args[0] == "dns:///qm.internal:50051"
    assert "load_balancing" in inspect.signature(QueueManagerClient).parameters
    (text,) = blocks("json")
    config = json.loads(service_config(kwargs["load_balancing"]))
    assert {key: config[key] for key in json.loads(text)} == json.loads(text)


def run_snippet() -> tuple[str, list[tuple[str, Any]]]:
    """The doc's Python block, run with a stand-in for grpc that records its channel."""
    (code,) = [block for block in blocks("python") if block.startswith("import json")]
    made: list[tuple[str, list[tuple[str, Any]]]] = []

    def secure_channel(target: str, credentials: object, options: Any) -> None:
        made.append((target, options))

    stand_in = types.ModuleType("grpc")
    stand_in.secure_channel = secure_channel  # type: ignore[attr-defined]
    stand_in.ssl_channel_credentials = lambda root_certificates: root_certificates  # type: ignore[attr-defined]
    real = sys.modules["grpc"]
    sys.modules["grpc"] = stand_in
    try:
        exec(code, {"ca_pem": b"-----BEGIN CERTIFICATE-----"})
    finally:
        sys.modules["grpc"] = real
    (channel,) = made
    return channel


def test_the_service_config_spreads_calls_and_skips_a_node_not_serving(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """Both nodes in one target (grpc's `ipv4:` resolver, as DNS would list them); failed
    logins show which node answered each call (each node counts its own)."""
    # Failed logins back off their host; in a cluster, on every node: not here.
    auth = dataclasses.replace(FAST_AUTH, host_failures_before_backoff=10_000)
    a, b = start_nodes(make_server, tmp_path, auth=auth)
    _, options = run_snippet()
    target = f"ipv4:127.0.0.1:{a.handle.port},127.0.0.1:{b.handle.port}"
    with grpc.insecure_channel(target, options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = pb_grpc.QueueManagerServiceStub(channel)
        spread = answered_by(stub, [a, b], calls=8)
        assert spread[0] > 0 and spread[1] > 0, spread
        set_health(b, health.NOT_SERVING)
        wait_for(lambda: answered_by(stub, [a, b], calls=1) == [1, 0])
        assert answered_by(stub, [a, b], calls=6) == [6, 0]


def test_the_python_client_s_round_robin_spreads_one_session_over_the_nodes(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """`load_balancing="round_robin"`: one login, then calls answered by both nodes (each
    caches the session it served), and a node saying NOT_SERVING is skipped."""
    a, b = start_nodes(make_server, tmp_path)
    target = f"ipv4:127.0.0.1:{a.handle.port},127.0.0.1:{b.handle.port}"
    with QueueManagerClient(
        target, "admin", ADMIN_PASSWORD, load_balancing="round_robin", heartbeat=False
    ) as qm:
        qm.new_queue("spread")
        for n in range(8):
            qm.add("spread", f"m{n}")
        assert [serves(node, qm.token) for node in (a, b)] == [True, True]
        set_health(b, health.NOT_SERVING)
        # Round robin over two ready nodes sends every other call to b: four calls in a
        # row that b did not see mean it is skipped.
        wait_for(lambda: skipped(b, qm.token, lambda: qm.size("spread"), calls=4))
        assert skipped(b, qm.token, lambda: qm.size("spread"), calls=6)
        assert qm.size("spread") == 8


def serves(node: Node, token: str) -> bool:
    """Whether the node has seen the session: it served one of its calls."""
    return cached_session(node, token) is not None


def cached_session(node: Node, token: str) -> Session | None:
    server = node.handle.thread.server
    assert server is not None and server.engine is not None
    return server.engine._sessions.cached(token)


def skipped(node: Node, token: str, call: Callable[[], object], calls: int) -> bool:
    """Whether `calls` calls went by without the node: every call it serves renews the
    session's last activity there."""
    session = cached_session(node, token)
    assert session is not None
    before = session.last_active
    for _ in range(calls):
        call()
    return session.last_active == before


def answered_by(stub: pb_grpc.QueueManagerServiceStub, nodes: list[Node], calls: int) -> list[int]:
    """Send `calls` failing logins (each a user of its own, to stay clear of the pair
    throttle); how many each node answered."""
    before = [failures(node) for node in nodes]
    for _ in range(calls):
        request = pb.AuthRequest(username=f"nobody-{next(USERS)}", password=b"garbage")
        assert stub.Auth(request, timeout=10).code == pb.CODE_UNAUTHENTICATED
    return [failures(node) - count for node, count in zip(nodes, before, strict=True)]


USERS = itertools.count()


def failures(node: Node) -> int:
    server = node.handle.thread.server
    assert server is not None and server.engine is not None
    return server.engine.stats().login_failures


def set_health(node: Node, status: int) -> None:
    server = node.handle.thread.server
    loop = node.handle.thread._loop
    assert server is not None and loop is not None

    async def run() -> None:
        for service in HEALTH_NAMES:
            await server._health.set(service, status, "test")

    asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=10)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
