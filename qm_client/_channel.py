"""Channel construction: transport security and the retry policy.

Retries live in the channel's service config rather than in client code, so that gRPC's
own implementation (exponential backoff with jitter, retry throttling, no retry once a
response has started) applies, and so that polyglot users can copy the same JSON.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import grpc.aio

SERVICE = "qm.v1.QueueManagerService"

# Calls whose repetition cannot change the outcome. Everything else (Add, Poll, Ack,
# NewQueue, DestroyQueue, Purge, Redrive, ExtendLease, Logout, Auth...) is never retried
# on a gRPC status: a retry after a lost answer could add twice, deliver twice, purge
# what came meanwhile, or report a first success as a failure (an ExtendLease to 0
# repeated answers MESSAGE_NOT_FOUND). (A CODE_UNAVAILABLE answer applied nothing, which
# allows more, and an Add with a request_id may be repeated: _retry.py.)
IDEMPOTENT_METHODS = (
    "GetChallenge",
    "HeartBeat",
    "Size",
    "IsEmpty",
    "GetUncheckNum",
    "MapGet",
    "MapGetAll",
    "MapGetList",
    "MapPut",
    "MapBatchPut",
    "GetQueueInfo",
    "ListDeadLetters",
    "ListQueues",
    "ListMaps",
    "ListSessions",
    # Sets the settings given: a repeat sets them again, with the same answer.
    "UpdateQueue",
)

# The largest answer the server sends, framed (its --max-response-bytes, by default
# gRPC's own default receive limit): set explicitly so that the client receives exactly
# what the server may send, whatever gRPC's default becomes.
MAX_ANSWER_BYTES = 4 * 1024 * 1024

RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


# gRPC's client-side load balancing policies that suit the service: "pick_first" (gRPC's
# default: one connection, to the first address that answers) and "round_robin" (calls
# spread over every address the target resolves to: the nodes of a cluster sharing a
# PostgreSQL store, where any node accepts any session; docs/deployment.md).
LOAD_BALANCING = ("pick_first", "round_robin")


def service_config(load_balancing: str = "") -> str:
    """The JSON service config: UNAVAILABLE retried with backoff, idempotent calls only;
    with `load_balancing`, that policy (gRPC's default, pick_first, otherwise)."""
    if load_balancing and load_balancing not in LOAD_BALANCING:
        raise ValueError(f"load_balancing must be one of {LOAD_BALANCING}, not {load_balancing!r}")
    names: list[dict[str, str]] = [
        {"service": SERVICE, "method": method} for method in IDEMPOTENT_METHODS
    ]
    names.append({"service": "grpc.health.v1.Health", "method": "Check"})
    config: dict[str, Any] = {"methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}]}
    if load_balancing:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    if load_balancing == "round_robin":
        # Skip a node whose health says NOT_SERVING (draining, its store unreachable).
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    return json.dumps(config)


def _options(load_balancing: str = "") -> list[tuple[str, Any]]:
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(load_balancing)),
        ("grpc.primary_user_agent", "qm-python-client"),
        ("grpc.max_receive_message_length", MAX_ANSWER_BYTES),
    ]


def _credentials(
    root_certificates: bytes | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials when any certificate is given, else ``None`` (plaintext)."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key go together")
    if root_certificates is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates,
        private_key=private_key,
        certificate_chain=certificate_chain,
    )


def open_channel(
    target: str,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    load_balancing: str = "",
) -> grpc.Channel:
    """A channel to ``target``: TLS when any certificate is given, else plaintext.

    ``certificate_chain`` and ``private_key`` are the client's own, for a server that
    requires mutual TLS.
    """
    credentials = _credentials(root_certificates, certificate_chain, private_key)
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=_options(load_balancing))
    return grpc.insecure_channel(target, options=_options(load_balancing))


def open_aio_channel(
    target: str,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    load_balancing: str = "",
) -> grpc.aio.Channel:
    """The ``grpc.aio`` channel of the asyncio client, with the same options as
    :func:`open_channel`. Made inside the running event loop it serves."""
    credentials = _credentials(root_certificates, certificate_chain, private_key)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=_options(load_balancing))
    return grpc.aio.insecure_channel(target, options=_options(load_balancing))
