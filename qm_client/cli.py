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
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
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
from ._lifecycle import DeadLetter, QueueInfo, QueueSettings, RetryPolicy
from ._version import __version__
from .client import DEFAULT_TIMEOUT, Message, QueueManagerClient, health
from .errors import QMError, QueueEmpty, ResourceExhausted, Unavailable

__all__ = ["main"]

Handler = Callable[[Context, argparse.Namespace], int]


# -- commands ------------------------------------------------------------------------------


def cmd_queue_create(ctx: Context, args: argparse.Namespace) -> int:
    settings = _settings_from_flags(args, None)
    ctx.connect().new_queue(args.name, settings)
    ctx.emit(f"created queue {args.name}", {"queue": args.name, "created": True})
    return EXIT_OK


def cmd_queue_update(ctx: Context, args: argparse.Namespace) -> int:
    if not any(getattr(args, flag) is not None for flag in _SETTING_FLAGS):
        raise UsageError("nothing to change: give at least one setting flag")
    client = ctx.connect()
    settings = client.update_queue(args.name, _settings_from_flags(args, client) or QueueSettings())
    ctx.emit(
        "\n".join(_settings_lines(settings)),
        {"queue": args.name, "settings": _settings_json(settings)},
    )
    return EXIT_OK


def cmd_queue_info(ctx: Context, args: argparse.Namespace) -> int:
    info = ctx.connect().queue_info(args.name)
    ctx.emit("\n".join(_info_lines(info)), _info_json(info))
    return EXIT_OK


def cmd_queue_list(ctx: Context, args: argparse.Namespace) -> int:
    queues = list(ctx.connect().list_queues())
    ctx.emit(
        "\n".join(
            f"{q.name}\t{q.ready} ready\t{q.in_flight} in flight\t{q.delayed} delayed"
            for q in queues
        )
        or None,
        {"queues": [dataclasses.asdict(q) for q in queues]},
    )
    return EXIT_OK


def cmd_queue_purge(ctx: Context, args: argparse.Namespace) -> int:
    purged = ctx.connect().purge(args.name)
    ctx.emit(f"purged {purged} message(s) from {args.name}", {"queue": args.name, "purged": purged})
    return EXIT_OK


def cmd_dead_list(ctx: Context, args: argparse.Namespace) -> int:
    letters = list(ctx.connect().dead_letters(args.queue))
    ctx.emit(
        "\n".join(
            f"{d.message_id}\t{d.element}\tfrom {d.original_queue}\t"
            f"{d.delivery_count} deliveries\t{d.cause}\tat {_iso(d.dead_lettered_at)}"
            for d in letters
        )
        or None,
        {"queue": args.queue, "dead_letters": [_dead_letter_json(d) for d in letters]},
    )
    return EXIT_OK


def cmd_dead_redrive(ctx: Context, args: argparse.Namespace) -> int:
    result = ctx.connect().redrive(args.queue, args.ids or None)
    ctx.emit(
        f"moved {result.moved} dead letter(s) back to their queues",
        {
            "queue": args.queue,
            "moved": result.moved,
            "failed": [
                {"message_id": i, "code": e.code_name} for i, e in sorted(result.failed.items())
            ],
        },
    )
    if result.failed:
        for message_id, error in sorted(result.failed.items()):
            print(f"qm: {error.code_name}: dead letter {message_id} stayed", file=ctx.stderr)
        return EXIT_FAILURE
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
    if args.request_id is not None and len(batches) > 1:
        raise UsageError("--request-id names one request: give at most --batch-size elements")
    delay = None if args.delay is None else args.delay / 1000
    ids: list[int] = []
    for batch in batches:
        if len(batch) == 1:
            ids.append(client.add(args.queue, batch[0], delay=delay, request_id=args.request_id))
        else:
            ids.extend(client.add_all(args.queue, batch, delay=delay, request_id=args.request_id))
    ctx.emit("\n".join(map(str, ids)) if ids else None, {"queue": args.queue, "message_ids": ids})
    return EXIT_OK


def cmd_poll(ctx: Context, args: argparse.Namespace) -> int:
    client = ctx.connect()
    messages: list[Message]
    lease = None if args.ack_deadline is None else args.ack_deadline / 1000
    if args.count == 1:
        message = client.poll(args.queue, wait=args.wait, ack_deadline=lease)
        messages = [] if message is None else [message]
    else:
        messages = client.pull(args.queue, args.count, wait=args.wait, ack_deadline=lease)
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
        "\n".join(_message_line(m) for m in messages),
        {
            "queue": args.queue,
            "messages": [
                {
                    "message_id": m.message_id,
                    "element": m.element,
                    "delivery_count": m.delivery_count,
                    "enqueued_at_ms": _ms(m.enqueued_at),
                    "lease_expires_at_ms": _ms(m.lease_expires_at),
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


# -- lifecycle records as text and JSON ---------------------------------------------------

# The setting flags' destinations, in the order they are shown.
_SETTING_FLAGS = (
    "ack_deadline",
    "max_deliveries",
    "dead_letter_queue",
    "retry_initial",
    "retry_multiplier",
    "retry_max",
    "delay",
    "max_age",
    "max_length",
)


def _settings_from_flags(
    args: argparse.Namespace, current_of: QueueManagerClient | None
) -> QueueSettings | None:
    """The settings the flags give (``None``: no flag at all).

    The proto's retry policy is one value, so changing one of its three flags on update
    keeps the other two as they are (``current_of`` reads them), instead of resetting them.
    """
    if not any(getattr(args, flag) is not None for flag in _SETTING_FLAGS):
        return None
    retry = None
    if any(
        getattr(args, f) is not None for f in ("retry_initial", "retry_multiplier", "retry_max")
    ):
        base = RetryPolicy()
        if current_of is not None:
            base = current_of.queue_info(args.name).settings.retry or base
        retry = RetryPolicy(
            initial_delay_ms=_given(args.retry_initial, base.initial_delay_ms),
            multiplier=_given(args.retry_multiplier, base.multiplier),
            max_delay_ms=_given(args.retry_max, base.max_delay_ms),
        )
    return QueueSettings(
        ack_deadline_ms=args.ack_deadline,
        max_deliveries=args.max_deliveries,
        dead_letter_queue=args.dead_letter_queue,
        retry=retry,
        delay_ms=args.delay,
        max_age_ms=args.max_age,
        max_length=args.max_length,
    )


def _given(flag: Any, current: Any) -> Any:
    return current if flag is None else flag


def _settings_json(settings: QueueSettings) -> dict[str, Any]:
    """The proto's field names and order (``retry_delay``), so the JSON reads as the
    contract."""
    data = dataclasses.asdict(settings)
    return {("retry_delay" if name == "retry" else name): value for name, value in data.items()}


def _settings_lines(settings: QueueSettings) -> list[str]:
    retry = settings.retry or RetryPolicy()
    backoff = "none"
    if retry.initial_delay_ms:
        backoff = (
            f"{retry.initial_delay_ms} ms, x{retry.multiplier:g} per failure, "
            f"up to {retry.max_delay_ms} ms"
        )

    def off(value: int | None, unit: str = "") -> str:
        return "none" if not value else f"{value}{unit}"

    return [
        f"ack_deadline:      {off(settings.ack_deadline_ms, ' ms')}",
        f"max_deliveries:    {off(settings.max_deliveries)}",
        f"dead_letter_queue: {settings.dead_letter_queue or 'none'}",
        f"retry_delay:       {backoff}",
        f"delay:             {off(settings.delay_ms, ' ms')}",
        f"max_age:           {off(settings.max_age_ms, ' ms')}",
        f"max_length:        {off(settings.max_length)}",
    ]


def _info_lines(info: QueueInfo) -> list[str]:
    return [
        f"queue:             {info.name}",
        f"ready:             {info.ready}",
        f"delayed:           {info.delayed}",
        f"in_flight:         {info.in_flight}",
        f"dead_lettered:     {info.dead_lettered}",
        f"dead_letters_held: {info.dead_letters_held}",
        f"oldest_ready_age:  {info.oldest_ready_age_ms} ms",
        f"holding_sessions:  {info.holding_sessions}",
        f"subscriptions:     {info.subscriptions}",
        *_settings_lines(info.settings),
    ]


def _info_json(info: QueueInfo) -> dict[str, Any]:
    data = dataclasses.asdict(info)
    data["settings"] = _settings_json(info.settings)
    return {("queue" if name == "name" else name): value for name, value in data.items()}


def _dead_letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "message_id": letter.message_id,
        "original_queue": letter.original_queue,
        "delivery_count": letter.delivery_count,
        "enqueued_at_ms": _ms(letter.enqueued_at),
        "dead_lettered_at_ms": _ms(letter.dead_lettered_at),
        "cause": letter.cause,
        "element": letter.element,
    }


def _message_line(message: Message) -> str:
    """``id``, ``element``, then what people want to know of the delivery."""
    lease = (
        "no lease (held while qm runs)"
        if message.lease_expires_at is None
        else f"lease until {_iso(message.lease_expires_at)}"
    )
    return (
        f"{message.message_id}\t{message.element}\tdelivery {message.delivery_count}\t"
        f"enqueued {_iso(message.enqueued_at)}\t{lease}"
    )


def _iso(when: datetime) -> str:
    """UTC to the millisecond, as ``2026-01-02T03:04:05.678Z``."""
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(when: datetime | None) -> int:
    """A time as the proto's Unix milliseconds (0 for none), for the JSON output."""
    return 0 if when is None else round(when.timestamp() * 1000)


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
    parser.add_argument("--version", action="version", version=f"qm {__version__}")
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
        ("create", cmd_queue_create, "create an empty queue, with settings"),
        ("update", cmd_queue_update, "change a queue's settings; print them all"),
        ("info", cmd_queue_info, "print a queue's settings and counts"),
        ("purge", cmd_queue_purge, "remove every ready and delayed message of a queue"),
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
        if name in ("create", "update"):
            _setting_options(sub, update=name == "update")
    leaf(queue_commands, "list", cmd_queue_list, "list the queues you may read, with counts")

    dead = commands.add_parser("dead", help="list and redrive dead letters")
    dead_commands = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    sub = leaf(dead_commands, "list", cmd_dead_list, "list the dead letters a queue holds")
    sub.add_argument("queue", metavar="QUEUE", help="the dead-letter queue")
    sub = leaf(
        dead_commands,
        "redrive",
        cmd_dead_redrive,
        "move dead letters back to their original queues",
    )
    sub.add_argument("queue", metavar="QUEUE", help="the dead-letter queue")
    sub.add_argument(
        "ids", nargs="*", type=_positive_int, metavar="ID", help="the ids to move; none: all"
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
    add.add_argument(
        "--delay",
        type=_non_negative_int,
        default=None,
        metavar="MS",
        help="ready only after MS milliseconds (default: the queue's delay)",
    )
    add.add_argument(
        "--request-id",
        default=None,
        metavar="ID",
        help="make the add safe to repeat: the same ID again adds nothing and prints "
        "the first ids (one batch only)",
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
    poll.add_argument(
        "--ack-deadline",
        type=_positive_int,
        default=None,
        metavar="MS",
        help="lease of what is taken (default: the queue's ack deadline)",
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


def _setting_options(sub: argparse.ArgumentParser, *, update: bool) -> None:
    """The queue settings as flags; unset ones are not sent (see QueueSettings)."""
    group = sub.add_argument_group(
        "settings (milliseconds; 0 turns one off)"
        + ("; unset flags leave a setting as it is" if update else "; unset: the default")
    )
    group.add_argument(
        "--ack-deadline",
        type=_non_negative_int,
        metavar="MS",
        help="lease of a delivery without ack or extension (default none: held while the "
        "session lives)",
    )
    group.add_argument(
        "--max-deliveries",
        type=_non_negative_int,
        metavar="N",
        help="deliveries after which a released message is dead-lettered (needs "
        "--dead-letter-queue)",
    )
    group.add_argument(
        "--dead-letter-queue", metavar="QUEUE", help='the queue for dead letters ("": none)'
    )
    group.add_argument(
        "--retry-initial",
        type=_non_negative_int,
        metavar="MS",
        help="wait before a nacked message is ready again (default 0: at once)",
    )
    group.add_argument(
        "--retry-multiplier",
        type=_non_negative_float,
        metavar="X",
        help="growth of that wait per further failure (default 2)",
    )
    group.add_argument(
        "--retry-max", type=_non_negative_int, metavar="MS", help="the longest such wait"
    )
    group.add_argument(
        "--delay", type=_non_negative_int, metavar="MS", help="default delay of an added message"
    )
    group.add_argument(
        "--max-age",
        type=_non_negative_int,
        metavar="MS",
        help="older messages are dead-lettered, or dropped without a dead-letter queue",
    )
    group.add_argument(
        "--max-length",
        type=_non_negative_int,
        metavar="N",
        help="most ready plus delayed messages; adds past it are refused",
    )


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
