"""Limits and login throttles of nodes sharing one PostgreSQL schema hold for the cluster,
not per node: failed logins are counted in the database (store/pg_login_failures.py),
queues and maps are counted there under a lock (pg_queues.create_queue, pg_maps.map_put).

The nodes are in-process servers on one schema (tests/test_pg_cluster.py's start_nodes);
the test's client is one host (ipv4:127.0.0.1) to both.

Every throttle here starts with a backoff of 1 s, so the call that must be refused is
sent right after the failures, its request prepared beforehand; were it delayed past
that second (a stalled machine), the throttle would rightly let it through, and the
test skips, saying so, rather than fail or pass on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pg_fixtures import URL, schema_of
from test_pg_cluster import Node, start_nodes

from conftest import FAST_AUTH, ServerHandle, encrypt_password, login
from qm.v1 import queue_manager_pb2 as pb
from qm_server.auth import PasswordHasher
from qm_server.permissions import Grant
from qm_server.store.base import UserRecord

BACKOFF_S = 1.0  # the first backoff of every throttle


def prepared(node: Node, user: str, password: str) -> pb.AuthRequest:
    """An Auth request for `node`, ready to send (its challenge is good for a minute)."""
    challenge = node.stub.GetChallenge(pb.GetChallengeRequest())
    return pb.AuthRequest(username=user, password=encrypt_password(challenge, password))


def failures_then_refusal(
    failing: list[tuple[Node, pb.AuthRequest]], last: Node, request: pb.AuthRequest
) -> None:
    """Send the failing logins, then `request` to `last` at once: it must be refused
    (skip: sent after the backoff had ended)."""
    codes = [node.stub.Auth(failed).code for node, failed in failing]
    failed_at = time.monotonic()
    reply = last.stub.Auth(request)
    took_s = time.monotonic() - failed_at
    assert codes == [pb.CODE_UNAUTHENTICATED] * len(failing)
    if reply.code != pb.CODE_RESOURCE_EXHAUSTED and took_s >= BACKOFF_S:
        pytest.skip(f"the machine stalled {took_s:.1f} s: the backoff had ended")
    assert reply.code == pb.CODE_RESOURCE_EXHAUSTED, reply


def test_failures_on_one_node_throttle_the_same_user_and_host_on_another(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    a, b = start_nodes(make_server, tmp_path)
    on_a = [(a, prepared(a, "admin", f"guess-{i}")) for i in range(5)]
    failures_then_refusal(on_a, b, prepared(b, "admin", "guess-b"))


def test_the_host_throttle_holds_across_nodes(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """Four failures allowed per host, whatever the user: two on each node are four."""
    auth = dataclasses.replace(FAST_AUTH, host_failures_before_backoff=4)
    a, b = start_nodes(make_server, tmp_path, auth=auth)
    spread = [(node, prepared(node, f"user-{i}", "guess")) for i, node in enumerate([a, b] * 2)]
    failures_then_refusal(spread, a, prepared(a, "user-4", "guess"))


def test_max_queues_holds_across_nodes_even_when_two_create_at_once(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    limit = 4
    a, b = start_nodes(make_server, tmp_path, max_queues=limit)
    created = [new_queue(node, f"q{i}") for i, node in enumerate([a, b] * 2)]
    assert created == [pb.CODE_OK] * limit
    assert (new_queue(a, "over"), new_queue(b, "over")) == (pb.CODE_RESOURCE_EXHAUSTED,) * 2
    assert destroy_queue(a, "q3") == pb.CODE_OK
    one_takes_the_last_slot(a, b, new_queue, destroy_queue)


def test_max_maps_holds_across_nodes_even_when_two_create_at_once(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    a, b = start_nodes(make_server, tmp_path, max_maps=3)
    codes = [map_put(node, f"m{i}") for i, node in enumerate([a, b, a, b])]
    assert codes == [pb.CODE_OK] * 3 + [pb.CODE_RESOURCE_EXHAUSTED]
    assert map_put(a, "m0") == pb.CODE_OK  # an existing map takes no new slot
    assert destroy_map(b, "m2") == pb.CODE_OK
    one_takes_the_last_slot(a, b, map_put, destroy_map)


def one_takes_the_last_slot(
    a: Node, b: Node, create: Callable[[Node, str], int], destroy: Callable[[Node, str], int]
) -> None:
    """With one slot left, `a` and `b` create at once, ten times: one of them gets it,
    never both (it is destroyed again for the next round)."""
    for round_ in range(10):
        names = (f"a{round_}", f"b{round_}")
        codes = at_once(
            [functools.partial(create, a, names[0]), functools.partial(create, b, names[1])]
        )
        assert sorted(codes) == [pb.CODE_OK, pb.CODE_RESOURCE_EXHAUSTED], (round_, codes)
        assert destroy(b, names[codes.index(pb.CODE_OK)]) == pb.CODE_OK


def test_a_user_s_queue_quota_holds_across_nodes(
    make_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    a, b = start_nodes(make_server, tmp_path, max_queues_per_user=2)
    add_manager(tmp_path, "alice", "alice-secret")
    tokens = [login(node.stub, "alice", "alice-secret") for node in (a, b)]
    codes = [
        node.stub.NewQueue(pb.NewQueueRequest(token=token, queue_name=f"alice-{i}")).code
        for i, (node, token) in enumerate(zip([a, b, a], [*tokens, tokens[0]], strict=True))
    ]
    assert codes == [pb.CODE_OK, pb.CODE_OK, pb.CODE_RESOURCE_EXHAUSTED]
    assert new_queue(b, "admins-have-no-quota") == pb.CODE_OK


def add_manager(tmp_path: Path, name: str, password: str) -> None:
    """A user who may manage every queue, added as `qm-server --store URL user` adds one."""
    from qm_server.store.pg_users import PgUserDirectory

    async def main() -> None:
        users = PgUserDirectory(URL, schema_of(tmp_path / "cluster"))
        try:
            hashed = PasswordHasher.from_settings(FAST_AUTH).hash(password)
            assert await users.create_user(UserRecord(name, hashed, is_admin=False))
            assert await users.add_grants(name, [Grant("manage", "queue", "*")]) == [True]
        finally:
            await users.close()

    asyncio.run(main())


def new_queue(node: Node, name: str) -> int:
    reply = node.stub.NewQueue(pb.NewQueueRequest(token=node.token, queue_name=name))
    return int(reply.code)


def destroy_queue(node: Node, name: str) -> int:
    request = pb.DestroyQueueRequest(token=node.token, queue_name=name)
    return int(node.stub.DestroyQueue(request).code)


def destroy_map(node: Node, name: str) -> int:
    return int(node.stub.MapDestroy(pb.MapDestroyRequest(token=node.token, map=name)).code)


def map_put(node: Node, name: str) -> int:
    request = pb.MapPutRequest(token=node.token, map=name, key="k", value="v")
    return int(node.stub.MapPut(request).code)


def at_once(calls: list[Callable[[], int]]) -> list[int]:
    """The calls, from threads released together; their answers, in order."""
    start = threading.Barrier(len(calls))
    answers: list[int] = [-1] * len(calls)

    def run(index: int) -> None:
        start.wait(timeout=10)
        answers[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return answers
