"""The ``qm`` command line: the Python client for people and shell scripts.

Output is for people by default and JSON with ``--json``; either way a failure goes to
stderr with the code's name (``QUEUE_NOT_FOUND``), and the exit status says what kind of
outcome it was, so scripts need not parse text:

    0  success
    1  the service or the transport reported a failure (its code name is printed)
    2  usage error: bad flags, unreadable input, missing credentials
    3  ``poll`` found nothing ready (QUEUE_EMPTY)
    4  UNAVAILABLE: the server is unreachable or shutting down, or its store is failing
       (after the client's own retries); nothing was done, or for ``add`` maybe not:
       try again later. A long poll cut short by a shutdown ends here, never with 3.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from qm.v1 import queue_manager_pb2 as pb

from ._cli_context import (
    DEFAULT_SERVER,
    EXIT_EMPTY,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Context,
    UsageError,
    read_text,
    report,
)
from .client import DEFAULT_TIMEOUT, Message, health
from .errors import QMError, QueueEmpty, ResourceExhausted, Unavailable

__all__ = ["main"]

Handler = Callable[[Context, argparse.Namespace], int]


# -- commands ------------------------------------------------------------------------------


def cmd_queue_create(ctx: Context, args: argparse.Namespace) -> int:
    ctx.connect().new_queue(args.name)
    ctx.emit(f"created queue {args.name}", {"queue": args.name, "created": True})
    return EXIT_OK


def cmd_queue_destroy(ctx: Context, args: argparse.Namespace) -> int:
    ctx.connect().destroy_queue(args.name, force=args.force)
    ctx.emit(f"destroyed queue {args.name}", {"queue": args.name, "destroyed": True})
    return EXIT_OK


def cmd_queue_size(ctx: Context, args: argparse.Namespace) -> int:
    size = ctx.connect().size(args.name)
    ctx.emit(str(size), {"queue": args.name, "size": size})
    return EXIT_OK


def cmd_queue_empty(ctx: Context, args: argparse.Namespace) -> int:
    empty = ctx.connect().is_empty(args.name)
    ctx.emit("true" if empty else "false", {"queue": args.name, "empty": empty})
    return EXIT_OK


def cmd_queue_unacked(ctx: Context, args: argparse.Namespace) -> int:
    count = ctx.connect().unacked(args.name)
    ctx.emit(str(count), {"queue": args.name, "unacked": count})
    return EXIT_OK


def cmd_add(ctx: Context, args: argparse.Namespace) -> int:
    client = ctx.connect()
    if args.elements:
        # Several elements on the command line are one atomic AddAll.
        batches = [list(args.elements)]
    else:
        lines = sys.stdin.read().splitlines()
        size = args.batch_size
        batches = [lines[i : i + size] for i in range(0, len(lines), size)]
    ids: list[int] = []
    for batch in batches:
        if len(batch) == 1:
            ids.append(client.add(args.queue, batch[0]))
        else:
            ids.extend(client.add_all(args.queue, batch))
    ctx.emit("\n".join(map(str, ids)) if ids else None, {"queue": args.queue, "message_ids": ids})
    return EXIT_OK


def cmd_poll(ctx: Context, args: argparse.Namespace) -> int:
    client = ctx.connect()
    messages: list[Message]
    if args.count == 1:
        message = client.poll(args.queue, wait=args.wait)
        messages = [] if message is None else [message]
    else:
        messages = client.pull(args.queue, args.count, wait=args.wait)
    if not messages:
        raise QueueEmpty(f"no message ready in {args.queue}", code=pb.CODE_QUEUE_EMPTY)
    finished = "ack" if args.ack else "nack" if args.nack else None
    failed: list[Message] = []
    if finished is not None and len(messages) > 1:
        failed = client.ack_many(messages, nack=args.nack)
    elif finished == "ack":
        messages[0].ack()
    elif finished == "nack":
        messages[0].nack()
    ctx.emit(
        "\n".join(f"{m.message_id}\t{m.element}" for m in messages),
        {
            "queue": args.queue,
            "messages": [
                {
                    "message_id": m.message_id,
                    "element": m.element,
                    "delivery_count": m.delivery_count,
                }
                for m in messages
            ],
            "finished": finished,
            "failed": [m.message_id for m in failed],
        },
    )
    if failed:
        print(
            f"qm: MESSAGE_NOT_FOUND: could not {finished} "
            f"{', '.join(str(m.message_id) for m in failed)}",
            file=ctx.stderr,
        )
        return EXIT_FAILURE
    if finished is None:
        ctx.note(
            "(not acked: released back to the queue when qm exits; use --ack or --nack to finish)"
        )
    return EXIT_OK


def cmd_map_put(ctx: Context, args: argparse.Namespace) -> int:
    ctx.connect().map(args.map)[args.key] = args.value
    ctx.emit(f"set {args.key} in {args.map}", {"map": args.map, "key": args.key})
    return EXIT_OK


def cmd_map_get(ctx: Context, args: argparse.Namespace) -> int:
    value = ctx.connect().map(args.map)[args.key]
    ctx.emit(value, {"map": args.map, "key": args.key, "value": value})
    return EXIT_OK


def cmd_map_remove(ctx: Context, args: argparse.Namespace) -> int:
    del ctx.connect().map(args.map)[args.key]
    ctx.emit(f"removed {args.key} from {args.map}", {"map": args.map, "key": args.key})
    return EXIT_OK


def cmd_map_all(ctx: Context, args: argparse.Namespace) -> int:
    view = ctx.connect().map(args.map)
    try:
        entries = view.to_dict()
    except ResourceExhausted:  # more than one answer carries (4 MiB): page it instead
        ctx.note(f"qm: {args.map} is too large for one snapshot; reading it page by page")
        entries = dict(view.items())
    # The JSON form is the bare object, so `qm --json map all A | qm map load B` copies.
    ctx.emit("\n".join(f"{k}\t{v}" for k, v in sorted(entries.items())) or None, entries)
    return EXIT_OK


def cmd_map_list(ctx: Context, args: argparse.Namespace) -> int:
    page = ctx.connect().map(args.map).page(args.offset, args.size)
    ctx.emit(
        "\n".join(f"{k}\t{v}" for k, v in page) or None,
        {
            "map": args.map,
            "offset": args.offset,
            "size": len(page),
            "list": [{"key": k, "value": v} for k, v in page],
        },
    )
    return EXIT_OK


def cmd_map_destroy(ctx: Context, args: argparse.Namespace) -> int:
    ctx.connect().map(args.map).destroy()
    ctx.emit(f"destroyed map {args.map}", {"map": args.map, "destroyed": True})
    return EXIT_OK


def cmd_map_load(ctx: Context, args: argparse.Namespace) -> int:
    text = read_text(args.file)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"input is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise UsageError("input must be a JSON object of string keys to string values")
    bad = [k for k, v in data.items() if not isinstance(v, str)]
    if bad:
        raise UsageError(f"values must be strings; not for key(s): {', '.join(bad[:5])}")
    if not data:
        raise UsageError("input is an empty object: nothing to load")
    ctx.connect().map(args.map).update(data)
    ctx.emit(f"loaded {len(data)} key(s) into {args.map}", {"map": args.map, "loaded": len(data)})
    return EXIT_OK


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


# -- parser --------------------------------------------------------------------------------


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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def leaf(
        group: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        handler: Handler,
        help_text: str,
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    queue = commands.add_parser("queue", help="create, destroy and inspect queues")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    for name, handler, help_text in (
        ("create", cmd_queue_create, "create an empty queue"),
        ("destroy", cmd_queue_destroy, "delete a queue"),
        ("size", cmd_queue_size, "print the number of ready messages"),
        ("empty", cmd_queue_empty, "print true when no message is ready"),
        ("unacked", cmd_queue_unacked, "print the number of messages in flight"),
    ):
        sub = leaf(queue_commands, name, handler, help_text)
        sub.add_argument("name", metavar="NAME")
        if name == "destroy":
            sub.add_argument(
                "--force",
                action="store_true",
                help="delete even when messages remain (they are lost)",
            )

    add = leaf(
        commands, "add", cmd_add, "add elements (arguments, or one per stdin line) to a queue"
    )
    add.add_argument("queue", metavar="QUEUE")
    add.add_argument(
        "elements",
        nargs="*",
        metavar="ELEMENT",
        help="elements to add atomically; none: read lines from stdin",
    )
    add.add_argument(
        "--batch-size",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="stdin lines per atomic batch (default %(default)s)",
    )

    poll = leaf(commands, "poll", cmd_poll, "take messages from a queue")
    poll.add_argument("queue", metavar="QUEUE")
    poll.add_argument(
        "--count",
        type=_positive_int,
        default=1,
        metavar="N",
        help="take up to N messages (default 1)",
    )
    poll.add_argument(
        "--wait",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for a message (default 0)",
    )
    finish = poll.add_mutually_exclusive_group()
    finish.add_argument("--ack", action="store_true", help="ack what was taken (done)")
    finish.add_argument(
        "--nack",
        action="store_true",
        help="nack what was taken (back to ready, delivery count raised)",
    )

    map_parser = commands.add_parser("map", help="read and write maps")
    map_commands = map_parser.add_subparsers(dest="map_command", required=True, metavar="ACTION")
    sub = leaf(map_commands, "put", cmd_map_put, "set a key (creates the map)")
    sub.add_argument("map", metavar="MAP")
    sub.add_argument("key", metavar="KEY")
    sub.add_argument("value", metavar="VALUE")
    for name, handler, help_text in (
        ("get", cmd_map_get, "print a key's value"),
        ("remove", cmd_map_remove, "remove a key"),
    ):
        sub = leaf(map_commands, name, handler, help_text)
        sub.add_argument("map", metavar="MAP")
        sub.add_argument("key", metavar="KEY")
    sub = leaf(
        map_commands, "all", cmd_map_all, "print every entry (one snapshot up to 4 MiB, else paged)"
    )
    sub.add_argument("map", metavar="MAP")
    sub = leaf(map_commands, "list", cmd_map_list, "print one page of entries in key order")
    sub.add_argument("map", metavar="MAP")
    sub.add_argument("--offset", type=_non_negative_int, default=0, metavar="N")
    sub.add_argument("--size", type=_positive_int, default=100, metavar="N")
    sub = leaf(map_commands, "destroy", cmd_map_destroy, "delete a map and its entries")
    sub.add_argument("map", metavar="MAP")
    sub = leaf(
        map_commands,
        "load",
        cmd_map_load,
        "set every key of a JSON object (file or stdin) in one atomic batch",
    )
    sub.add_argument("map", metavar="MAP")
    sub.add_argument("file", nargs="?", metavar="FILE", help="JSON file; default stdin")

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
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


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
