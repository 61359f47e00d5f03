"""``qm map``: map entries, one at a time, all at once, by page, or loaded from JSON."""

from __future__ import annotations

import argparse
import json

from qm.v1 import queue_manager_pb2 as pb

from ..errors import InvalidArgument, ResourceExhausted
from ._args import Commands, Leaf, non_negative_int, positive_int
from ._batches import Progress, pair_size, split
from ._context import EXIT_OK, Context, UsageError, read_text

__all__ = ["register"]


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
    client = ctx.connect()
    batches = split(list(data.items()), pair_size, client.server_limits)
    if len(batches) > 1 and not args.batched:
        raise InvalidArgument(
            f"{len(data)} key(s) do not fit one call of this server; pass --batched to load "
            f"them in {len(batches)} batches, each atomic",
            code=pb.CODE_INVALID_ARGUMENT,
        )
    view = client.map(args.map)
    progress = Progress(ctx.stderr, "loaded", len(data), f"key(s) into {args.map}", len(batches))
    loaded = 0
    try:
        for batch in batches:
            view.update(batch)
            loaded += len(batch)
            progress.advance(loaded)
    finally:
        progress.end()
        if 0 < loaded < len(data):
            ctx.note(f"qm: loaded {loaded} of {len(data)} key(s) before the failure")
    text = f"loaded {len(data)} key(s) into {args.map}"
    if len(batches) > 1:
        text += f" in {len(batches)} batches"
    ctx.emit(text, {"map": args.map, "loaded": len(data)})
    return EXIT_OK


def register(commands: Commands, leaf: Leaf) -> None:
    """``map ...``."""
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
    sub.add_argument("--offset", type=non_negative_int, default=0, metavar="N")
    sub.add_argument("--size", type=positive_int, default=100, metavar="N")
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
    sub.add_argument(
        "--batched",
        action="store_true",
        help="load an object larger than one call takes in batches of the server's limit, "
        "each atomic (progress shown on a terminal)",
    )
