"""Why ``qm`` could not reach a server, in words a person can act on.

gRPC reports every failed connection the same way (``UNAVAILABLE: failed to connect to
all addresses``), whatever the cause: nothing listening, or a client speaking plaintext
to a TLS server or the reverse. After such a failure ``qm`` knocks once more itself, with
a TLS handshake that verifies nothing: a server that completes it speaks TLS, one that
answers in anything else speaks plaintext, and a refused connection means nothing
listens there.
"""

from __future__ import annotations

import socket
import ssl

__all__ = ["connection_hint", "speaks_tls"]


def speaks_tls(host: str, port: int, timeout: float) -> bool | None:
    """Whether the server at host:port completes a TLS handshake; None when nothing
    answers at all."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a probe of the protocol, not of the server
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLError:
        return False  # it answered, but not in TLS
    except ConnectionResetError:
        return False  # it hung up on the handshake: a plaintext HTTP/2 server does
    except OSError:
        return None


def _host_port(target: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port``; None for other gRPC target forms (``dns:///``,
    ``unix:``), which get no hint."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "/" in target or target.startswith("unix:"):
        return None
    return host.strip("[]") or "localhost", int(port)


def connection_hint(target: str, tls: bool, default_target: str, timeout: float) -> str | None:
    """What to try after a failed connection to ``target``, or None when the probe
    finds nothing to say (the server may have just stopped)."""
    address = _host_port(target)
    if address is None:
        return None
    server_tls = speaks_tls(*address, timeout=timeout)
    if server_tls is None:
        return (
            f"nothing answers at {target}: is the server running? "
            f"(it listens on {default_target} unless given --listen)"
        )
    if server_tls and not tls:
        return "the server speaks TLS: pass --ca-cert FILE (the CA that signed its certificate)"
    if tls and not server_tls:
        return "the server speaks plaintext: leave out --ca-cert, --cert and --key"
    return None
