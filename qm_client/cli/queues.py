"""``qm queue`` and ``qm dead``: queues, their settings and counts, and dead letters."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .._lifecycle import DeadLetter, QueueInfo, QueueSettings, RetryPolicy
from ..client import QueueManagerClient
from ._args import Commands, Leaf, iso, ms, non_negative_float, non_negative_int, positive_int
from ._context import EXIT_FAILURE, EXIT_OK, Context, UsageError

__all__ = ["register"]


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
            f"{d.delivery_count} deliveries\t{d.cause}\tat {iso(d.dead_lettered_at)}"
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
        "enqueued_at_ms": ms(letter.enqueued_at),
        "dead_lettered_at_ms": ms(letter.dead_lettered_at),
        "cause": letter.cause,
        "element": letter.element,
    }


def register(commands: Commands, leaf: Leaf) -> None:
    """``queue ...`` and ``dead ...``."""
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
        "ids", nargs="*", type=positive_int, metavar="ID", help="the ids to move; none: all"
    )


def _setting_options(sub: argparse.ArgumentParser, *, update: bool) -> None:
    """The queue settings as flags; unset ones are not sent (see QueueSettings)."""
    group = sub.add_argument_group(
        "settings (milliseconds; 0 turns one off)"
        + ("; unset flags leave a setting as it is" if update else "; unset: the default")
    )
    group.add_argument(
        "--ack-deadline",
        type=non_negative_int,
        metavar="MS",
        help="lease of a delivery without ack or extension (default none: held while the "
        "session lives)",
    )
    group.add_argument(
        "--max-deliveries",
        type=non_negative_int,
        metavar="N",
        help="deliveries after which a released message is dead-lettered (needs "
        "--dead-letter-queue)",
    )
    group.add_argument(
        "--dead-letter-queue", metavar="QUEUE", help='the queue for dead letters ("": none)'
    )
    group.add_argument(
        "--retry-initial",
        type=non_negative_int,
        metavar="MS",
        help="wait before a nacked message is ready again (default 0: at once)",
    )
    group.add_argument(
        "--retry-multiplier",
        type=non_negative_float,
        metavar="X",
        help="growth of that wait per further failure (default 2)",
    )
    group.add_argument(
        "--retry-max", type=non_negative_int, metavar="MS", help="the longest such wait"
    )
    group.add_argument(
        "--delay", type=non_negative_int, metavar="MS", help="default delay of an added message"
    )
    group.add_argument(
        "--max-age",
        type=non_negative_int,
        metavar="MS",
        help="older messages are dead-lettered, or dropped without a dead-letter queue",
    )
    group.add_argument(
        "--max-length",
        type=non_negative_int,
        metavar="N",
        help="most ready plus delayed messages; adds past it are refused",
    )
