"""``qm add`` and ``qm poll``: messages in and out of a queue."""

from __future__ import annotations

import argparse
import sys

from qm.v1 import queue_manager_pb2 as pb

from ..client import Message
from ..errors import QueueEmpty
from ._args import Commands, Leaf, iso, ms, non_negative_float, non_negative_int, positive_int
from ._batches import Progress, element_size, split
from ._context import EXIT_FAILURE, EXIT_OK, Context, UsageError

__all__ = ["register"]


def cmd_add(ctx: Context, args: argparse.Namespace) -> int:
    client = ctx.connect()
    lines: list[str] = []
    if args.elements:
        # Several elements on the command line are one atomic AddAll.
        batches = [list(args.elements)]
    else:
        lines = sys.stdin.read().splitlines()
        batches = split(lines, element_size, client.server_limits, args.batch_size)
    if args.request_id is not None and len(batches) > 1:
        raise UsageError("--request-id names one request: give at most --batch-size elements")
    delay = None if args.delay is None else args.delay / 1000
    ids: list[int] = []
    progress = Progress(
        ctx.stderr, "added", len(lines), f"element(s) to {args.queue}", len(batches)
    )
    try:
        for batch in batches:
            if len(batch) == 1:
                ids.append(
                    client.add(args.queue, batch[0], delay=delay, request_id=args.request_id)
                )
            else:
                ids.extend(
                    client.add_all(args.queue, batch, delay=delay, request_id=args.request_id)
                )
            progress.advance(len(ids))
    finally:
        progress.end()
        if 0 < len(ids) < len(lines):
            ctx.note(f"qm: added {len(ids)} of {len(lines)} element(s) before the failure")
    if lines and ctx.stdout.isatty() and not ctx.json:
        # From a file, to a person: what was added, not thousands of ids.
        ctx.emit(_summary(args.queue, lines, ids, len(batches)), None)
        return EXIT_OK
    ctx.emit("\n".join(map(str, ids)) if ids else None, {"queue": args.queue, "message_ids": ids})
    return EXIT_OK


def _summary(queue: str, elements: list[str], ids: list[int], batches: int) -> str:
    size = sum(len(e.encode()) for e in elements)
    span = f"id {ids[0]}" if len(ids) == 1 else f"ids {ids[0]} to {ids[-1]}"
    return (
        f"added {len(ids)} element(s), {size} bytes, to {queue}: {span} "
        f"({batches} batch{'es' if batches > 1 else ''})"
    )


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
                    "enqueued_at_ms": ms(m.enqueued_at),
                    "lease_expires_at_ms": ms(m.lease_expires_at),
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


def _message_line(message: Message) -> str:
    """``id``, ``element``, then what people want to know of the delivery."""
    lease = (
        "no lease (held while qm runs)"
        if message.lease_expires_at is None
        else f"lease until {iso(message.lease_expires_at)}"
    )
    return (
        f"{message.message_id}\t{message.element}\tdelivery {message.delivery_count}\t"
        f"enqueued {iso(message.enqueued_at)}\t{lease}"
    )


def register(commands: Commands, leaf: Leaf) -> None:
    """``add`` and ``poll``."""
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
        type=positive_int,
        default=None,
        metavar="N",
        help="stdin lines per atomic batch (default: as many as the server takes in one call)",
    )
    add.add_argument(
        "--delay",
        type=non_negative_int,
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
        type=positive_int,
        default=1,
        metavar="N",
        help="take up to N messages (default 1)",
    )
    poll.add_argument(
        "--wait",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for a message (default 0)",
    )
    poll.add_argument(
        "--ack-deadline",
        type=positive_int,
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
