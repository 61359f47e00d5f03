"""Which calls are made again when the service answers ``CODE_UNAVAILABLE``, and when.

Two kinds of UNAVAILABLE reach a client. A gRPC ``UNAVAILABLE`` *status* means the call
may never have reached the service, or its answer was lost on the way back: the call may
have taken effect, so only calls whose repetition cannot change the outcome are retried,
by gRPC itself (the service config in ``_channel.py``). A ``CODE_UNAVAILABLE`` *answer*
means the service judged the call and applied nothing: its store could not commit (a full
disk, a failing file) or the server is shutting down (a long poll cut short claims
nothing). Repeating such a call is the same as making it a moment later, so the client
repeats it, with the same backoff as gRPC's policy.

Add and AddAll are the exception. Should "applied nothing" ever be wrong (a commit whose
fsync failed can still be found on disk after a restart), a repeat would add the
messages twice. So they are repeated only when they carry a ``request_id``: the server
then answers a repeat with the first call's ids and adds nothing (AIP-155). With one,
they are also repeated after a gRPC ``UNAVAILABLE`` status, whose call may have been
applied: that is what the request id is for. Without one, their caller decides.
Calls that only make sense once are not repeated: Auth (its challenge is burnt), Logout
and EndSession (the session is gone once the call began, so a repeat would answer that it
is not found). The Subscribe stream (which ends with the code; open a new one) is not
made through this path.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from ._channel import RETRY_POLICY

RETRIED_ON_UNAVAILABLE_ANSWER = frozenset(
    {
        "HeartBeat",
        "NewQueue",
        "Poll",
        "PullElements",
        "Ack",
        "BatchAck",
        "Size",
        "IsEmpty",
        "DestroyQueue",
        "GetUncheckNum",
        "MapPut",
        "MapRemove",
        "MapGet",
        "MapGetAll",
        "MapDestroy",
        "MapGetList",
        "MapBatchPut",
        # Lifecycle calls: an UNAVAILABLE answer applied nothing, and none of them
        # depends on having been made once only.
        "UpdateQueue",
        "GetQueueInfo",
        "ExtendLease",
        "Purge",
        "Redrive",
        "ListDeadLetters",
        "ListQueues",
        "ListMaps",
        "ListSessions",
    }
)
"""RPCs made again after a ``CODE_UNAVAILABLE`` answer (named as in the proto)."""

RETRIED_WITH_REQUEST_ID = frozenset({"Add", "AddAll"})
"""RPCs made again (after an UNAVAILABLE answer or status) only when they carry a
``request_id``."""

NOT_RETRIED_ON_UNAVAILABLE_ANSWER = frozenset(
    {"GetChallenge", "Auth", "Logout", "EndSession", "Subscribe"}
)
"""The other RPCs, for the reasons in the module docstring."""


def _seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


def answer_retry_delays() -> Iterator[float]:
    """The pauses before each repeat: as many as the policy's attempts allow, growing
    exponentially with full jitter (a random pause up to the current backoff), as gRPC's
    own retries do, so that clients turned away together do not return together."""
    backoff = _seconds(RETRY_POLICY["initialBackoff"])
    ceiling = _seconds(RETRY_POLICY["maxBackoff"])
    for _ in range(int(RETRY_POLICY["maxAttempts"]) - 1):
        yield random.uniform(0, backoff)
        backoff = min(backoff * float(RETRY_POLICY["backoffMultiplier"]), ceiling)


def retried_on_unavailable_answer(rpc: str, request: object = None) -> bool:
    """Whether a ``CODE_UNAVAILABLE`` answer to ``request`` (of method ``rpc``) is repeated."""
    return rpc in RETRIED_ON_UNAVAILABLE_ANSWER or retried_by_request_id(rpc, request)


def retried_by_request_id(rpc: str, request: object) -> bool:
    """Whether ``request`` carries a request id that makes repeating it safe even after a
    gRPC ``UNAVAILABLE`` status (the first call may have been applied)."""
    return rpc in RETRIED_WITH_REQUEST_ID and bool(getattr(request, "request_id", ""))
