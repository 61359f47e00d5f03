"""The client and ``qm`` over TLS and mutual TLS, against a real server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from client_fixtures import ADMIN, run_qm

from conftest import ServerHandle
from qm_client import QueueManagerClient, Unavailable, health
from qm_server.config import TlsSettings


def test_client_verifies_the_server_with_the_given_roots(
    make_server: Callable[..., ServerHandle], pki: dict[str, Path]
) -> None:
    server = make_server(tls=TlsSettings(pki["server_cert"], pki["server_key"]))
    target = f"localhost:{server.port}"
    ca = pki["ca"].read_bytes()
    with QueueManagerClient(target, ADMIN, server.admin_password, root_certificates=ca) as qm:
        qm.new_queue("jobs")
        assert qm.size("jobs") == 0
    assert health(target, root_certificates=ca) == "SERVING"
    with pytest.raises(Unavailable):  # a plaintext client cannot talk to a TLS server
        QueueManagerClient(target, ADMIN, server.admin_password, timeout=5)

    result = run_qm(server, "--ca-cert", str(pki["ca"]), "queue", "size", "jobs", QM_SERVER=target)
    assert (result.returncode, result.stdout) == (0, "0\n")


def test_client_certificate_for_mutual_tls(
    make_server: Callable[..., ServerHandle], pki: dict[str, Path]
) -> None:
    server = make_server(
        tls=TlsSettings(pki["server_cert"], pki["server_key"], client_ca=pki["ca"])
    )
    target = f"localhost:{server.port}"
    ca = pki["ca"].read_bytes()
    with pytest.raises(Unavailable) as refused:
        QueueManagerClient(target, ADMIN, server.admin_password, root_certificates=ca, timeout=5)
    assert refused.value.grpc_status == grpc.StatusCode.UNAVAILABLE
    with QueueManagerClient(
        target,
        ADMIN,
        server.admin_password,
        root_certificates=ca,
        certificate_chain=pki["client_cert"].read_bytes(),
        private_key=pki["client_key"].read_bytes(),
    ) as qm:
        qm.map("m")["k"] = "v"

    tls = [
        "--ca-cert",
        str(pki["ca"]),
        "--cert",
        str(pki["client_cert"]),
        "--key",
        str(pki["client_key"]),
    ]
    result = run_qm(server, *tls, "map", "get", "m", "k", QM_SERVER=target)
    assert (result.returncode, result.stdout) == (0, "v\n")
    result = run_qm(server, *tls, "health", QM_SERVER=target)
    assert (result.returncode, result.stdout) == (0, "SERVING\n")
    half = run_qm(server, "--cert", str(pki["client_cert"]), "health", QM_SERVER=target)
    assert (half.returncode, half.stderr) == (2, "qm: USAGE: --cert and --key go together\n")


def test_half_a_client_certificate_is_refused() -> None:
    with pytest.raises(ValueError, match="go together"):
        QueueManagerClient("localhost:1", ADMIN, "x", certificate_chain=b"pem")
