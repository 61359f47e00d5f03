"""Grants: a new user holds nothing; grants open exactly what they name; admins hold all."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_subscribe import Stream

from conftest import ServerHandle, login
from qm.v1 import queue_manager_pb2 as pb
from qm.v1 import queue_manager_pb2_grpc as pb_grpc

Stub = pb_grpc.QueueManagerServiceStub


def user_command(data_dir: Path, *args: str, stdin: str = "") -> str:
    result = subprocess.run(
        [sys.executable, "-m", "qm_server", "user", *args, "--data-dir", str(data_dir)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


@pytest.fixture
def setup(make_server: Callable[..., ServerHandle]) -> Iterator[tuple[ServerHandle, Stub, str]]:
    handle = make_server()
    user_command(handle.data_dir, "add", "bob", "--password-stdin", stdin="bob-pw\n")
    channel = grpc.insecure_channel(handle.target)
    stub = Stub(channel)
    admin = login(stub, "admin", handle.admin_password)
    stub.NewQueue(pb.NewQueueRequest(token=admin, queue_name="jobs.a"))
    stub.NewQueue(pb.NewQueueRequest(token=admin, queue_name="other"))
    stub.Add(pb.AddRequest(token=admin, queue_name="jobs.a", element="x"))
    stub.MapPut(pb.MapPutRequest(token=admin, map="cfg", key="k", value="v"))
    yield handle, stub, admin
    channel.close()


GRANT_NEEDED = (
    "NewQueue",
    "DestroyQueue",
    "Add",
    "AddAll",
    "Poll",
    "PullElements",
    "Subscribe",
    "Size",
    "IsEmpty",
    "GetUncheckNum",
    "MapPut",
    "MapBatchPut",
    "MapRemove",
    "MapGet",
    "MapGetAll",
    "MapGetList",
    "MapDestroy",
    "UpdateQueue",
    "GetQueueInfo",
    "Purge",
    "Redrive",
    "ListDeadLetters",
)
"""The calls a user without grants is refused (the README's table of actions)."""

# Admins only, whatever the grants.
ADMIN_ONLY = ("ListSessions", "EndSession")

NO_GRANT_NEEDED = {
    "GetChallenge": pb.CODE_OK,
    "Auth": pb.CODE_OK,
    "HeartBeat": pb.CODE_OK,
    # Only the session a message was delivered to can ack it: another's is not found.
    "Ack": pb.CODE_MESSAGE_NOT_FOUND,
    "BatchAck": pb.CODE_OK,  # with CODE_MESSAGE_NOT_FOUND for each id
    "ExtendLease": pb.CODE_OK,  # likewise
    "ListQueues": pb.CODE_OK,  # listing nothing
    "ListMaps": pb.CODE_OK,  # likewise
    "Logout": pb.CODE_OK,
}


def every_call(
    stub: Stub, token: str, queue: str, map_name: str, held: int, password: str
) -> dict[str, int]:
    """Each RPC once, as the session of `token`, with the code it answered. `held` is a
    message in flight for another session; Logout comes last."""

    def subscribe() -> int:
        stream = Stream(stub, token, queue, max_unacked=1)
        try:
            return stream.next().code
        finally:
            stream.close()

    def batch_ack() -> int:
        reply = stub.BatchAck(pb.BatchAckRequest(token=token, message_ids=[held]))
        assert [r.code for r in reply.results] == [pb.CODE_MESSAGE_NOT_FOUND]
        return reply.code

    def extend_lease() -> int:
        reply = stub.ExtendLease(
            pb.ExtendLeaseRequest(token=token, message_ids=[held], ack_deadline_ms=0)
        )
        assert [r.code for r in reply.results] == [pb.CODE_MESSAGE_NOT_FOUND]
        return reply.code

    def list_queues() -> int:
        reply = stub.ListQueues(pb.ListQueuesRequest(token=token, limit=10))
        assert list(reply.queues) == []
        return reply.code

    def list_maps() -> int:
        reply = stub.ListMaps(pb.ListMapsRequest(token=token, limit=10))
        assert list(reply.names) == []
        return reply.code

    pair = [pb.KeyValue(key="k", value="w")]
    settings = pb.QueueSettings(max_length=1)
    calls: dict[str, Callable[[], int]] = {
        "GetChallenge": lambda: stub.GetChallenge(pb.GetChallengeRequest()).code,
        "Auth": lambda: pb.CODE_OK if login(stub, "bob", password) else pb.CODE_INTERNAL,
        "HeartBeat": lambda: stub.HeartBeat(pb.HeartBeatRequest(token=token)).code,
        "NewQueue": lambda: (
            stub.NewQueue(pb.NewQueueRequest(token=token, queue_name=queue + ".new")).code
        ),
        "Add": lambda: stub.Add(pb.AddRequest(token=token, queue_name=queue, element="e")).code,
        "AddAll": lambda: (
            stub.AddAll(pb.AddAllRequest(token=token, queue_name=queue, elements=["e"])).code
        ),
        "Poll": lambda: stub.Poll(pb.PollRequest(token=token, queue_name=queue)).code,
        "PullElements": lambda: (
            stub.PullElements(pb.PullElementsRequest(token=token, queue_name=queue, number=1)).code
        ),
        "Subscribe": subscribe,
        "Ack": lambda: stub.Ack(pb.AckRequest(token=token, message_id=held)).code,
        "BatchAck": batch_ack,
        "Size": lambda: stub.Size(pb.SizeRequest(token=token, queue_name=queue)).code,
        "IsEmpty": lambda: stub.IsEmpty(pb.IsEmptyRequest(token=token, queue_name=queue)).code,
        "GetUncheckNum": lambda: (
            stub.GetUncheckNum(pb.GetUncheckNumRequest(token=token, queue_name=queue)).code
        ),
        "MapGet": lambda: stub.MapGet(pb.MapGetRequest(token=token, map=map_name, key="k")).code,
        "MapGetAll": lambda: stub.MapGetAll(pb.MapGetAllRequest(token=token, map=map_name)).code,
        "MapGetList": lambda: (
            stub.MapGetList(pb.MapGetListRequest(token=token, map=map_name, offset=0, size=1)).code
        ),
        "MapPut": lambda: (
            stub.MapPut(pb.MapPutRequest(token=token, map=map_name, key="k", value="w")).code
        ),
        "MapBatchPut": lambda: (
            stub.MapBatchPut(
                pb.MapBatchPutRequest(token=token, map=map_name, size=1, list=pair)
            ).code
        ),
        "MapRemove": lambda: (
            stub.MapRemove(pb.MapRemoveRequest(token=token, map=map_name, key="k")).code
        ),
        "DestroyQueue": lambda: (
            stub.DestroyQueue(
                pb.DestroyQueueRequest(token=token, queue_name=queue, force=True)
            ).code
        ),
        "MapDestroy": lambda: stub.MapDestroy(pb.MapDestroyRequest(token=token, map=map_name)).code,
        "UpdateQueue": lambda: (
            stub.UpdateQueue(
                pb.UpdateQueueRequest(token=token, queue_name=queue, settings=settings)
            ).code
        ),
        "GetQueueInfo": lambda: (
            stub.GetQueueInfo(pb.GetQueueInfoRequest(token=token, queue_name=queue)).code
        ),
        "ExtendLease": extend_lease,
        "Purge": lambda: stub.Purge(pb.PurgeRequest(token=token, queue_name=queue)).code,
        "Redrive": lambda: stub.Redrive(pb.RedriveRequest(token=token, queue_name=queue)).code,
        "ListDeadLetters": lambda: (
            stub.ListDeadLetters(
                pb.ListDeadLettersRequest(token=token, queue_name=queue, limit=10)
            ).code
        ),
        "ListQueues": list_queues,
        "ListMaps": list_maps,
        "ListSessions": lambda: (
            stub.ListSessions(pb.ListSessionsRequest(token=token, limit=10)).code
        ),
        # Any id: the admin's own session among them, which must live on.
        "EndSession": lambda: stub.EndSession(pb.EndSessionRequest(token=token, session_id=1)).code,
        "Logout": lambda: stub.Logout(pb.LogoutRequest(token=token)).code,
    }
    rpcs = pb.DESCRIPTOR.services_by_name["QueueManagerService"].methods_by_name
    assert set(calls) == set(rpcs), "every RPC is called here: add the new one"
    return {name: call() for name, call in calls.items()}


def test_new_user_holds_nothing_and_changes_nothing(
    setup: tuple[ServerHandle, Stub, str],
) -> None:
    _, stub, admin = setup
    held = stub.Poll(pb.PollRequest(token=admin, queue_name="jobs.a"))  # "x", admin's now
    stub.Add(pb.AddRequest(token=admin, queue_name="jobs.a", element="ready"))
    bob = login(stub, "bob", "bob-pw")
    codes = every_call(stub, bob, "jobs.a", "cfg", held.message_id, "bob-pw")
    refused = (*GRANT_NEEDED, *ADMIN_ONLY)
    expected = {**dict.fromkeys(refused, pb.CODE_PERMISSION_DENIED), **NO_GRANT_NEEDED}
    assert codes == expected
    denied = stub.Add(pb.AddRequest(token=login(stub, "bob", "bob-pw"), queue_name="jobs.a"))
    assert "may not" in denied.message
    # Nothing changed: the queue, its ready and in-flight messages, the map.
    assert stub.Size(pb.SizeRequest(token=admin, queue_name="jobs.a")).size == 1
    unacked = stub.GetUncheckNum(pb.GetUncheckNumRequest(token=admin, queue_name="jobs.a"))
    assert unacked.ack_num == 1
    assert stub.Ack(pb.AckRequest(token=admin, message_id=held.message_id)).code == pb.CODE_OK
    new = stub.Size(pb.SizeRequest(token=admin, queue_name="jobs.a.new"))
    assert new.code == pb.CODE_QUEUE_NOT_FOUND
    assert stub.MapGet(pb.MapGetRequest(token=admin, map="cfg", key="k")).value == "v"
    assert stub.MapGetAll(pb.MapGetAllRequest(token=admin, map="cfg")).map == {"k": "v"}
    settings = stub.GetQueueInfo(pb.GetQueueInfoRequest(token=admin, queue_name="jobs.a")).settings
    assert settings.max_length == 0


def test_lifecycle_grants(setup: tuple[ServerHandle, Stub, str]) -> None:
    """`read` shows a queue, `manage` changes and empties it, and naming a dead-letter
    queue needs `write` on it."""
    handle, stub, admin = setup
    stub.NewQueue(pb.NewQueueRequest(token=admin, queue_name="dead"))
    user_command(handle.data_dir, "grant", "bob", "read", "queue", "jobs.*")
    bob = login(stub, "bob", "bob-pw")
    info = stub.GetQueueInfo(pb.GetQueueInfoRequest(token=bob, queue_name="jobs.a"))
    assert (info.code, info.ready) == (pb.CODE_OK, 1)
    letters = stub.ListDeadLetters(
        pb.ListDeadLettersRequest(token=bob, queue_name="jobs.a", limit=1)
    )
    assert letters.code == pb.CODE_OK
    denied = [
        stub.Purge(pb.PurgeRequest(token=bob, queue_name="jobs.a")).code,
        stub.UpdateQueue(pb.UpdateQueueRequest(token=bob, queue_name="jobs.a")).code,
        stub.Redrive(pb.RedriveRequest(token=bob, queue_name="jobs.a")).code,
    ]
    assert denied == [pb.CODE_PERMISSION_DENIED] * 3
    user_command(handle.data_dir, "grant", "bob", "manage", "queue", "jobs.*")
    bob = login(stub, "bob", "bob-pw")
    dead_letters = pb.QueueSettings(max_deliveries=3, dead_letter_queue="dead")
    refused: list[Any] = [
        stub.NewQueue(pb.NewQueueRequest(token=bob, queue_name="jobs.b", settings=dead_letters)),
        stub.UpdateQueue(
            pb.UpdateQueueRequest(token=bob, queue_name="jobs.a", settings=dead_letters)
        ),
    ]
    for reply in refused:
        assert reply.code == pb.CODE_PERMISSION_DENIED
        assert "may not write queue 'dead'" in reply.message
    assert stub.Size(pb.SizeRequest(token=admin, queue_name="jobs.b")).code == (
        pb.CODE_QUEUE_NOT_FOUND
    )
    user_command(handle.data_dir, "grant", "bob", "write", "queue", "dead")
    bob = login(stub, "bob", "bob-pw")
    created = stub.NewQueue(
        pb.NewQueueRequest(token=bob, queue_name="jobs.b", settings=dead_letters)
    )
    assert created.code == pb.CODE_OK, created.message
    updated = stub.UpdateQueue(
        pb.UpdateQueueRequest(token=bob, queue_name="jobs.a", settings=dead_letters)
    )
    assert (updated.code, updated.settings.dead_letter_queue) == (pb.CODE_OK, "dead")
    purged = stub.Purge(pb.PurgeRequest(token=bob, queue_name="jobs.a"))
    assert (purged.code, purged.purged) == (pb.CODE_OK, 1)


def test_grants_open_exactly_what_they_name(setup: tuple[ServerHandle, Stub, str]) -> None:
    handle, stub, admin = setup
    out = user_command(handle.data_dir, "grant", "bob", "read,write", "queue", "jobs.*")
    assert out.splitlines() == [
        "granted read queue jobs.* to bob",
        "granted write queue jobs.* to bob",
    ]
    bob = login(stub, "bob", "bob-pw")  # a login reloads grants at once
    polled = stub.Poll(pb.PollRequest(token=bob, queue_name="jobs.a"))
    assert (polled.code, polled.element) == (pb.CODE_OK, "x")
    assert stub.Ack(pb.AckRequest(token=bob, message_id=polled.message_id)).code == pb.CODE_OK
    assert stub.Add(pb.AddRequest(token=bob, queue_name="jobs.a", element="y")).code == 0
    denied = [
        stub.Add(pb.AddRequest(token=bob, queue_name="other", element="y")).code,
        stub.NewQueue(pb.NewQueueRequest(token=bob, queue_name="jobs.b")).code,  # manage
        stub.DestroyQueue(pb.DestroyQueueRequest(token=bob, queue_name="jobs.a")).code,
        stub.MapGet(pb.MapGetRequest(token=bob, map="cfg", key="k")).code,  # maps: none
    ]
    assert denied == [pb.CODE_PERMISSION_DENIED] * 4
    listing = user_command(handle.data_dir, "list")
    assert listing.splitlines() == [
        "admin (admin)",
        "bob: read queue jobs.*; write queue jobs.*",
    ]
    # Another user cannot ack bob's message, admin or not.
    polled = stub.Poll(pb.PollRequest(token=bob, queue_name="jobs.a"))
    theirs = stub.Ack(pb.AckRequest(token=admin, message_id=polled.message_id))
    assert theirs.code == pb.CODE_MESSAGE_NOT_FOUND


class Reloads:
    """The running server's grant reloads (its sweep's, about once a second), counted, so
    that a test waits for one that began after a change instead of polling its effect."""

    def __init__(self, handle: ServerHandle) -> None:
        engine = handle.thread.server.engine if handle.thread.server else None
        assert engine is not None
        self._changed = threading.Condition()
        self._started = 0
        self._finished_upto = 0  # every reload started up to this one has finished
        reload = engine.refresh_permissions

        async def counted() -> None:
            with self._changed:
                self._started += 1
                mine = self._started
            try:
                await reload()
            finally:
                with self._changed:
                    self._finished_upto = max(self._finished_upto, mine)
                    self._changed.notify_all()

        engine.refresh_permissions = counted  # type: ignore[method-assign]

    def wait_for_next(self, timeout_s: float = 10.0) -> None:
        """Until a reload that starts after this call has finished."""
        with self._changed:
            after = self._started + 1
            assert self._changed.wait_for(lambda: self._finished_upto >= after, timeout_s)


def test_revoke_and_remove_take_effect_without_relogin(
    setup: tuple[ServerHandle, Stub, str],
) -> None:
    handle, stub, _ = setup
    reloads = Reloads(handle)
    user_command(handle.data_dir, "grant", "bob", "read", "map", "*")
    bob = login(stub, "bob", "bob-pw")
    assert stub.MapGet(pb.MapGetRequest(token=bob, map="cfg", key="k")).code == pb.CODE_OK
    out = user_command(handle.data_dir, "revoke", "bob", "read", "map", "*")
    assert out.strip() == "revoked read map * from bob"
    reloads.wait_for_next()
    denied = stub.MapGet(pb.MapGetRequest(token=bob, map="cfg", key="k"))
    assert denied.code == pb.CODE_PERMISSION_DENIED
    user_command(handle.data_dir, "remove", "bob")
    reloads.wait_for_next()
    assert stub.HeartBeat(pb.HeartBeatRequest(token=bob)).code == pb.CODE_UNAUTHENTICATED


def test_bad_grant_is_refused(setup: tuple[ServerHandle, Stub, str]) -> None:
    handle, _, _ = setup
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qm_server",
            "user",
            "grant",
            "bob",
            "fly",
            "queue",
            "*",
            "--data-dir",
            str(handle.data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "action must be one of read, write, manage" in result.stderr
