"""Splitting a large load (``qm add`` of a file, ``qm map load --batched``) into calls the
server takes, and showing how far it got on a terminal.

A batch holds at most the server's ``max_batch`` entries and its entries fit the
server's ``max_request_bytes`` less room for the rest of the request (token, name,
framing): both as the server said at login (``ServerLimits``), or the defaults of a
server that did not say. An entry too large on its own goes alone, for the server to
refuse with its own code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TextIO, TypeVar

from .._sessions import ServerLimits

__all__ = ["Progress", "element_size", "pair_size", "split"]

T = TypeVar("T")

# What a server that does not say takes: the server's defaults, and gRPC's own 4 MiB
# default receive limit (a server that says nothing may have kept it).
FALLBACK_BATCH = 1000
FALLBACK_REQUEST_BYTES = 4 << 20
# Room in a request for what is not an entry: the token, the queue or map name, fields.
REQUEST_ROOM = 4096
# A length-delimited field's tag and length, at most.
FIELD_OVERHEAD = 6


def element_size(element: str) -> int:
    """An element as a repeated string field encodes it, at most."""
    return len(element.encode()) + FIELD_OVERHEAD


def pair_size(pair: tuple[str, str]) -> int:
    """A key and value as a KeyValue in a repeated field encodes them, at most."""
    key, value = pair
    return len(key.encode()) + len(value.encode()) + 3 * FIELD_OVERHEAD


def split(
    entries: Sequence[T],
    size_of: Callable[[T], int],
    limits: ServerLimits,
    most: int | None = None,
) -> list[list[T]]:
    """Consecutive batches, in order, each within the server's limits (and of at most
    ``most`` entries, when given)."""
    count = limits.max_batch or FALLBACK_BATCH
    if most is not None:
        count = min(count, most)
    room = max((limits.max_request_bytes or FALLBACK_REQUEST_BYTES) - REQUEST_ROOM, 1)
    batches: list[list[T]] = []
    batch: list[T] = []
    used = 0
    for entry in entries:
        size = size_of(entry)
        if batch and (len(batch) == count or used + size > room):
            batches.append(batch)
            batch, used = [], 0
        batch.append(entry)
        used += size
    if batch:
        batches.append(batch)
    return batches


class Progress:
    """``verb N/TOTAL noun`` redrawn in place on ``stream`` while a load of several
    batches runs, only when ``stream`` is a terminal: piped output stays free of it."""

    def __init__(self, stream: TextIO, verb: str, total: int, noun: str, batches: int) -> None:
        self._stream = stream
        self._shown = batches > 1 and stream.isatty()
        self._verb = verb
        self._total = total
        self._noun = noun

    def advance(self, done: int) -> None:
        if self._shown:
            self._stream.write(f"\r{self._verb} {done}/{self._total} {self._noun}")
            self._stream.flush()

    def end(self) -> None:
        """Leave the line (however far the load got)."""
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()
