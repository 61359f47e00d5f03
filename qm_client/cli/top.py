"""``qm top``: a live view of the queues, refreshed in the terminal as ``nats top`` does.

Each refresh reads every queue's depths (ListQueues: ready, delayed, in flight) and the
dead letters of the queues on screen (GetQueueInfo), and derives rates from the reading
before: how fast each queue grows or drains (messages per second, net of adds and
acks/removals: the service reports depths, not counters of adds and acks). The screen
is redrawn whole each time on the terminal's alternate screen, which is given back on
exit; ``q`` or Ctrl-C leaves and exits 0. Without a terminal it prints one reading
and exits, so it is usable from scripts (``--json`` too).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TextIO

from ..client import QueueManagerClient
from ._args import Commands, Leaf, iso
from ._context import EXIT_OK, Context

__all__ = ["Depth", "Reading", "frame", "read_depths", "register"]

MIN_INTERVAL = 0.2
MAX_INTERVAL = 60.0
DEFAULT_INTERVAL = 1.0
# Alternate screen on and cursor hidden; then home and clear before each frame.
ENTER = "\x1b[?1049h\x1b[?25l"
LEAVE = "\x1b[?25h\x1b[?1049l"
CLEAR = "\x1b[H\x1b[2J"
QUIT_KEYS = frozenset(b"qQ")
ROW = "{:<24} {:>10} {:>9} {:>10} {:>8} {:>9}"


@dataclass(frozen=True)
class Depth:
    """One queue's messages by state at one reading."""

    ready: int
    delayed: int
    in_flight: int
    dead: int
    """Messages dead-lettered from this queue that its dead-letter queue still holds."""

    @property
    def total(self) -> int:
        """Messages the queue holds (dead letters sit in another queue)."""
        return self.ready + self.delayed + self.in_flight


@dataclass(frozen=True)
class Reading:
    at: float
    """``time.monotonic()`` when the reading was taken."""
    queues: dict[str, Depth]


def read_depths(client: QueueManagerClient, detail_rows: int) -> Reading:
    """Every queue's depths; the dead-letter count of the first ``detail_rows`` (those
    on screen), each one GetQueueInfo."""
    queues: dict[str, Depth] = {}
    for index, q in enumerate(client.list_queues(page_size=1000)):
        dead = client.queue_info(q.name).dead_lettered if index < detail_rows else 0
        queues[q.name] = Depth(q.ready, q.delayed, q.in_flight, dead)
    return Reading(time.monotonic(), queues)


def rate(before: Reading | None, now: Reading, name: str) -> float | None:
    """Messages per second by which the queue grew (negative: drained) since ``before``;
    None for the first reading or a queue that was not there."""
    if before is None or name not in before.queues or now.at <= before.at:
        return None
    return (now.queues[name].total - before.queues[name].total) / (now.at - before.at)


def frame(title: str, before: Reading | None, now: Reading, width: int, height: int) -> list[str]:
    """The screen's lines, each cut to ``width``, at most ``height`` of them."""
    header = (
        f"{'QUEUE':<24} {'READY':>10} {'DELAYED':>9} {'IN FLIGHT':>10} {'DEAD':>8} {'NET/S':>9}"
    )
    lines = [title, "", header]
    for name, d in now.queues.items():
        per_s = rate(before, now, name)
        shown = "-" if per_s is None else f"{per_s:+.1f}"
        lines.append(
            f"{name[:24]:<24} {d.ready:>10} {d.delayed:>9} {d.in_flight:>10} {d.dead:>8} {shown:>9}"
        )
    if not now.queues:
        lines.append("(no queue you may read)")
    return [line[:width] for line in lines[:height]]


@contextlib.contextmanager
def _screen(keys: int, out: TextIO) -> Iterator[None]:
    """The terminal in cbreak mode (keys arrive one by one, unechoed; Ctrl-C still
    interrupts) on the alternate screen; all given back however the view ends."""
    saved = termios.tcgetattr(keys)
    tty.setcbreak(keys)
    out.write(ENTER)
    try:
        yield
    finally:
        out.write(LEAVE)
        out.flush()
        termios.tcsetattr(keys, termios.TCSADRAIN, saved)


def _quit_pressed(keys: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for a key; whether it was one that quits."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([keys], [], [], left)
        if not ready:
            return False
        typed = os.read(keys, 64)
        if not typed or any(k in QUIT_KEYS for k in typed):
            return True  # q, or end of input: nobody is left to press it
    return False


def cmd_top(ctx: Context, args: argparse.Namespace) -> int:
    client = ctx.connect()
    interactive = sys.stdin.isatty() and ctx.stdout.isatty() and not ctx.json
    if not interactive:
        now = read_depths(client, detail_rows=1000)
        width, _ = shutil.get_terminal_size()
        title = f"qm top  {ctx.server}  {iso(datetime.now(UTC))}"
        ctx.emit(
            "\n".join(frame(title, None, now, width, len(now.queues) + 3)),
            {"queues": [{"queue": n, **asdict(d)} for n, d in now.queues.items()]},
        )
        return EXIT_OK
    keys = sys.stdin.fileno()
    before: Reading | None = None
    try:
        with _screen(keys, ctx.stdout):
            while True:
                width, height = shutil.get_terminal_size()
                now = read_depths(client, detail_rows=max(height - 3, 0))
                title = (
                    f"qm top  {ctx.server}  every {args.interval:g} s  "
                    f"{iso(datetime.now(UTC))}  (q: quit)"
                )
                lines = frame(title, before, now, width, height)
                ctx.stdout.write(CLEAR + "\n".join(lines))
                ctx.stdout.flush()
                before = now
                if _quit_pressed(keys, args.interval):
                    return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK


def _interval(text: str) -> float:
    value = float(text)
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"must be from {MIN_INTERVAL:g} to {MAX_INTERVAL:g} seconds: {text}"
        )
    return value


def register(commands: Commands, leaf: Leaf) -> None:
    """``top``."""
    top = leaf(
        commands,
        "top",
        cmd_top,
        "live view of queue depths and rates (q or Ctrl-C quits); one reading when piped",
    )
    top.add_argument(
        "--interval",
        type=_interval,
        default=DEFAULT_INTERVAL,
        metavar="SECONDS",
        help=f"seconds between refreshes, {MIN_INTERVAL:g} to {MAX_INTERVAL:g} "
        f"(default {DEFAULT_INTERVAL:g})",
    )
