"""``qm health`` and ``qm token``: the server itself and sessions for other tools."""

from __future__ import annotations

import argparse

from ..client import health
from ._args import Commands, Leaf
from ._context import EXIT_FAILURE, EXIT_OK, Context

__all__ = ["register"]


def cmd_health(ctx: Context, args: argparse.Namespace) -> int:
    status = health(ctx.server, args.service, timeout=args.timeout, **ctx.tls())
    ctx.emit(status, {"service": args.service, "status": status})
    if status != "SERVING":
        print(f"qm: {status}", file=ctx.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_token(ctx: Context, args: argparse.Namespace) -> int:
    client = ctx.connect()
    # The token is for another tool: logging out here would kill the session it names.
    ctx.logout_on_exit = False
    ttl_ms = round(client.session_ttl * 1000)
    ctx.emit(client.token, {"token": client.token, "session_ttl_ms": ttl_ms})
    ctx.note(
        f"(session expires after {client.session_ttl:g} s without a call; "
        "send HeartBeat to keep it)"
    )
    return EXIT_OK


def register(commands: Commands, leaf: Leaf) -> None:
    """``health`` and ``token``."""
    sub = leaf(commands, "health", cmd_health, "print the server's health status (no login)")
    sub.add_argument(
        "--service",
        default="",
        metavar="NAME",
        help='service to ask about (default "": the whole server)',
    )

    leaf(
        commands,
        "token",
        cmd_token,
        "log in and print a session token for other tools (the session is left open)",
    )
