"""The ``qm`` parser and entry point: the common flags, the command groups' parsers
(one module per group), and the mapping of outcomes to exit statuses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .._version import __version__
from ..client import DEFAULT_TIMEOUT
from ..errors import QMError, QueueEmpty, Unavailable
from ._args import Handler, Leaf
from ._context import (
    DEFAULT_SERVER,
    EXIT_EMPTY,
    EXIT_FAILURE,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Context,
    UsageError,
    report,
)
from ._hints import connection_hint
from .maps import register as map_commands
from .messages import register as message_commands
from .queues import register as queue_commands
from .server import register as server_commands
from .sessions import register as session_commands
from .top import register as top_command

__all__ = ["build_parser", "main"]


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """Connection and output flags, accepted before or after the command.

    The copy attached to each command uses SUPPRESS defaults so that it does not
    overwrite a value given before the command.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument(
        "-s",
        "--server",
        default=default(None),
        metavar="HOST:PORT",
        help=f"server address (env QM_SERVER, default {DEFAULT_SERVER})",
    )
    group.add_argument(
        "-u", "--user", default=default(None), help="user name (env QM_USER; prompted when missing)"
    )
    group.add_argument(
        "--password",
        default=default(None),
        help="password (prefer env QM_PASSWORD: arguments are visible in ps; "
        "prompted when missing)",
    )
    group.add_argument(
        "--ca-cert",
        default=default(None),
        metavar="FILE",
        help="PEM root certificates: use TLS and verify the server with them",
    )
    group.add_argument(
        "--cert",
        dest="client_cert",
        default=default(None),
        metavar="FILE",
        help="PEM client certificate chain, for a server that requires mutual TLS",
    )
    group.add_argument(
        "--key",
        dest="client_key",
        default=default(None),
        metavar="FILE",
        help="PEM private key of --cert",
    )
    group.add_argument(
        "--pin",
        default=default(None),
        metavar="SHA256",
        help="refuse a server whose login key has another fingerprint (env QM_PIN)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=default(DEFAULT_TIMEOUT),
        metavar="SECONDS",
        help=f"deadline of each call (default {DEFAULT_TIMEOUT:g})",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON for scripts instead of text for people",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; each leaf sets ``handler``."""
    common = _common_options(suppress=True)
    parser = argparse.ArgumentParser(
        prog="qm",
        description="Command line for the queue manager service.",
        parents=[_common_options(suppress=False)],
        epilog="exit status: 0 ok, 1 failure (code name on stderr), 2 usage error, "
        "3 poll found nothing ready, 4 UNAVAILABLE: server unreachable, shutting down or "
        "its store failing (a long poll cut short by a shutdown too); try again later",
    )
    parser.add_argument("--version", action="version", version=f"qm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    leaf = Leaf(common)
    queue_commands(commands, leaf)
    message_commands(commands, leaf)
    map_commands(commands, leaf)
    server_commands(commands, leaf)
    session_commands(commands, leaf)
    top_command(commands, leaf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit status."""
    args = build_parser().parse_args(argv)
    ctx = Context(args, sys.stdout, sys.stderr)
    handler: Handler = args.handler
    try:
        return handler(ctx, args)
    except QueueEmpty as error:
        report(ctx, error.code_name, error.message)
        return EXIT_EMPTY
    except Unavailable as error:
        report(ctx, error.code_name, error.message)
        if error.grpc_status is not None and not ctx.json:  # not reached, or cut off
            tls = bool(args.ca_cert or args.client_cert)
            hint = connection_hint(ctx.server, tls, DEFAULT_SERVER, min(args.timeout, 5.0))
            if hint is not None:
                print(f"qm: hint: {hint}", file=ctx.stderr)
        return EXIT_UNAVAILABLE
    except QMError as error:
        report(ctx, error.code_name, error.message)
        return EXIT_FAILURE
    except UsageError as error:
        report(ctx, "USAGE", str(error))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    finally:
        ctx.close()
