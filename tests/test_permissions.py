"""Grants: a new user holds nothing; grants open exactly what they name; admins hold all."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

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


def every_call(stub: Stub, token: str, queue: str, map_name: str) -> dict[str, Any]:
    return {
        "NewQueue": stub.NewQueue(pb.NewQueueRequest(token=token, queue_name=queue + ".new")),
        "Add": stub.Add(pb.AddRequest(token=token, queue_name=queue, element="e")),
        "AddAll": stub.AddAll(pb.AddAllRequest(token=token, queue_name=queue, elements=["e"])),
        "Size": stub.Size(pb.SizeRequest(token=token, queue_name=queue)),
        "IsEmpty": stub.IsEmpty(pb.IsEmptyRequest(token=token, queue_name=queue)),
        "GetUncheckNum": stub.GetUncheckNum(pb.GetUncheckNumRequest(token=token, queue_name=queue)),
        "Poll": stub.Poll(pb.PollRequest(token=token, queue_name=queue)),
        "PullElements": stub.PullElements(
            pb.PullElementsRequest(token=token, queue_name=queue, number=1)
        ),
        "MapGet": stub.MapGet(pb.MapGetRequest(token=token, map=map_name, key="k")),
        "MapGetAll": stub.MapGetAll(pb.MapGetAllRequest(token=token, map=map_name)),
        "MapGetList": stub.MapGetList(
            pb.MapGetListRequest(token=token, map=map_name, offset=0, size=1)
        ),
        "MapPut": stub.MapPut(pb.MapPutRequest(token=token, map=map_name, key="k", value="w")),
        "MapRemove": stub.MapRemove(pb.MapRemoveRequest(token=token, map=map_name, key="k")),
        "DestroyQueue": stub.DestroyQueue(
            pb.DestroyQueueRequest(token=token, queue_name=queue, force=True)
        ),
        "MapDestroy": stub.MapDestroy(pb.MapDestroyRequest(token=token, map=map_name)),
    }


def test_new_user_holds_nothing_and_changes_nothing(
    setup: tuple[ServerHandle, Stub, str],
) -> None:
    _, stub, admin = setup
    bob = login(stub, "bob", "bob-pw")
    replies = every_call(stub, bob, "jobs.a", "cfg")
    assert {name: r.code for name, r in replies.items()} == dict.fromkeys(
        replies, pb.CODE_PERMISSION_DENIED
    )
    assert "may not" in replies["Add"].message
    # Nothing changed.
    assert stub.Size(pb.SizeRequest(token=admin, queue_name="jobs.a")).size == 1
    assert stub.MapGet(pb.MapGetRequest(token=admin, map="cfg", key="k")).value == "v"
    assert stub.HeartBeat(pb.HeartBeatRequest(token=bob)).code == pb.CODE_OK


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


def wait_for_code(call: Callable[[], int], code: int, timeout_s: float = 10.0) -> None:
    """Grants are reloaded by the server's sweep (about once a second)."""
    deadline = time.monotonic() + timeout_s
    while call() != code:
        assert time.monotonic() < deadline, f"still not {code}"
        time.sleep(0.05)


def test_revoke_and_remove_take_effect_without_relogin(
    setup: tuple[ServerHandle, Stub, str],
) -> None:
    handle, stub, _ = setup
    user_command(handle.data_dir, "grant", "bob", "read", "map", "*")
    bob = login(stub, "bob", "bob-pw")
    assert stub.MapGet(pb.MapGetRequest(token=bob, map="cfg", key="k")).code == pb.CODE_OK
    out = user_command(handle.data_dir, "revoke", "bob", "read", "map", "*")
    assert out.strip() == "revoked read map * from bob"
    wait_for_code(
        lambda: stub.MapGet(pb.MapGetRequest(token=bob, map="cfg", key="k")).code,
        pb.CODE_PERMISSION_DENIED,
    )
    user_command(handle.data_dir, "remove", "bob")
    wait_for_code(
        lambda: stub.HeartBeat(pb.HeartBeatRequest(token=bob)).code, pb.CODE_UNAUTHENTICATED
    )


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
