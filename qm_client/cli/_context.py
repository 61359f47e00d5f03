"""What a ``qm`` command runs in: its credentials and TLS files, its output, its failures.

Kept apart from the commands (one module per group) so that each command reads as "call
the client, emit the result": where the password comes from, how JSON and text differ,
and which exit status a kind of outcome gets are decided here once.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO, TypedDict

from ..client import QueueManagerClient

__all__ = [
    "DEFAULT_SERVER",
    "EXIT_EMPTY",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "Context",
    "TlsFiles",
    "UsageError",
    "read_bytes",
    "read_text",
    "report",
]

# Where the server listens by default (qm-server --listen): the IPv4 loopback, named so,
# since "localhost" may try ::1 first and meet a refusal there.
DEFAULT_SERVER = "127.0.0.1:50051"

# What each exit status means is in the package docstring (and the epilog of ``qm --help``).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_EMPTY = 3
EXIT_UNAVAILABLE = 4


class TlsFiles(TypedDict):
    """The TLS keyword arguments of the client, read from the files the flags name."""

    root_certificates: bytes | None
    certificate_chain: bytes | None
    private_key: bytes | None


class UsageError(Exception):
    """A problem with what the user typed or piped in; exit status 2."""


class Context:
    """What a command needs: where to write, and a client made only when asked for.

    The client is created lazily so that ``qm health`` and usage errors never prompt for
    a password or log in.
    """

    def __init__(self, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> None:
        self.args = args
        self.json: bool = getattr(args, "json", False)
        self.stdout = stdout
        self.stderr = stderr
        self.client: QueueManagerClient | None = None
        self.logout_on_exit = True

    def connect(self) -> QueueManagerClient:
        if self.client is None:
            args = self.args
            user = args.user or os.environ.get("QM_USER") or _prompt_user()
            password = args.password
            if password is None:
                password = os.environ.get("QM_PASSWORD")
            if password is None:
                password = _prompt_password(user, self.server)
            self.client = QueueManagerClient(
                self.server,
                user,
                password,
                pin_fingerprint=args.pin or os.environ.get("QM_PIN") or None,
                timeout=args.timeout,
                **self.tls(),
            )
        return self.client

    def tls(self) -> TlsFiles:
        """The TLS files named by the flags, read; all ``None`` means plaintext."""
        args = self.args
        if (args.client_cert is None) != (args.client_key is None):
            raise UsageError("--cert and --key go together")
        return TlsFiles(
            root_certificates=read_bytes(args.ca_cert) if args.ca_cert else None,
            certificate_chain=read_bytes(args.client_cert) if args.client_cert else None,
            private_key=read_bytes(args.client_key) if args.client_key else None,
        )

    @property
    def server(self) -> str:
        server: str = self.args.server or os.environ.get("QM_SERVER") or DEFAULT_SERVER
        return server

    def emit(self, human: str | None, data: Any) -> None:
        """Print ``human`` for people, or ``data`` as one JSON document for scripts."""
        if self.json:
            print(json.dumps(data, ensure_ascii=False), file=self.stdout)
        elif human is not None:
            print(human, file=self.stdout)

    def note(self, text: str) -> None:
        """A remark for people on stderr; silent under ``--json``."""
        if not self.json:
            print(text, file=self.stderr)

    def close(self) -> None:
        if self.client is not None:
            self.client.close(logout=self.logout_on_exit)


def _prompt_user() -> str:
    if not sys.stdin.isatty():
        raise UsageError("no user: pass --user or set QM_USER")
    return input("User: ").strip()


def _prompt_password(user: str, server: str) -> str:
    # getpass falls back to reading stdin with only a warning when there is no terminal;
    # stdin may be the data being piped in, so refuse instead.
    try:
        with open("/dev/tty"):
            pass
    except OSError:
        raise UsageError("no password: set QM_PASSWORD (or pass --password)") from None
    return getpass.getpass(f"Password for {user}@{server}: ")


def read_bytes(path: str) -> bytes:
    """A file the user named; unreadable is a usage error, not a traceback."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None


def read_text(path: str | None) -> str:
    """A UTF-8 file the user named, or stdin for none or ``-``."""
    if path is None or path == "-":
        return sys.stdin.read()
    return read_bytes(path).decode("utf-8")


def report(ctx: Context, code_name: str, message: str) -> None:
    """A failure on stderr: ``qm: CODE: message``, or a JSON ``error`` object under
    ``--json``."""
    if ctx.json:
        error = {"error": {"code": code_name, "message": message}}
        print(json.dumps(error, ensure_ascii=False), file=ctx.stderr)
    else:
        text = f"{code_name}: {message}" if message else code_name
        print(f"qm: {text}", file=ctx.stderr)
