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


def service_config() -> str:
    """The JSON service config: UNAVAILABLE retried with backoff, idempotent calls only."""
    names: list[dict[str, str]] = [
        {"service": SERVICE, "method": method} for method in IDEMPOTENT_METHODS
    ]
    names.append({"service": "grpc.health.v1.Health", "method": "Check"})
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}]})


def _options() -> list[tuple[str, Any]]:
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config()),
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
) -> grpc.Channel:
    """A channel to ``target``: TLS when any certificate is given, else plaintext.

    ``certificate_chain`` and ``private_key`` are the client's own, for a server that
    requires mutual TLS.
    """
    credentials = _credentials(root_certificates, certificate_chain, private_key)
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=_options())
    return grpc.insecure_channel(target, options=_options())


def open_aio_channel(
    target: str,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
) -> grpc.aio.Channel:
    """The ``grpc.aio`` channel of the asyncio client, with the same options as
    :func:`open_channel`. Made inside the running event loop it serves."""
    credentials = _credentials(root_certificates, certificate_chain, private_key)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=_options())
    return grpc.aio.insecure_channel(target, options=_options())
