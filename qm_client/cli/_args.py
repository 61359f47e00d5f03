"""What every command group shares: how a command is hung on the parser, the argument
types of counts and durations, and how times are shown (UTC ISO for people, Unix
milliseconds, as the proto's, in JSON)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import datetime
from typing import TypeAlias

from ._context import Context

__all__ = [
    "Commands",
    "Handler",
    "Leaf",
    "iso",
    "ms",
    "non_negative_float",
    "non_negative_int",
    "positive_int",
]

Handler = Callable[[Context, argparse.Namespace], int]
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class Leaf:
    """Hangs a command on the parser; it runs ``handler`` and accepts the connection and
    output flags (``common``) after its name too."""

    def __init__(self, common: argparse.ArgumentParser) -> None:
        self._common = common

    def __call__(
        self, group: Commands, name: str, handler: Handler, help_text: str
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, parents=[self._common], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub


def iso(when: datetime) -> str:
    """UTC to the millisecond, as ``2026-01-02T03:04:05.678Z``."""
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ms(when: datetime | None) -> int:
    """A time as the proto's Unix milliseconds (0 for none), for the JSON output."""
    return 0 if when is None else round(when.timestamp() * 1000)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value
