"""Argument checks shared by every entry point, so each rule is written once."""

from __future__ import annotations

import re
from collections.abc import Sequence

from qm_server.errors import InvalidArgument

NAME_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,255}")


def check_name(kind: str, name: str) -> None:
    """Queue and map names: 1-255 characters of [A-Za-z0-9._:-] (the contract)."""
    if not NAME_PATTERN.fullmatch(name):
        if not name:
            raise InvalidArgument(f"{kind} is empty")
        if len(name) > 255:
            raise InvalidArgument(f"{kind} is longer than 255 characters")
        raise InvalidArgument(f"{kind} {name!r} has characters outside [A-Za-z0-9._:-]")


def check_text_size(what: str, text: str, limit: int) -> None:
    """Elements, keys and values are limited in UTF-8 bytes, as they are stored."""
    check_texts_size(what, (text,), limit)


def check_texts_size(what: str, texts: Sequence[str], limit: int) -> None:
    """check_text_size for each text, in one loop (AddAll checks up to max_batch)."""
    for text in texts:
        # A character is at most 4 bytes: skip the encoding for the common small case.
        if len(text) * 4 > limit and len(text.encode()) > limit:
            raise InvalidArgument(f"{what} is larger than {limit} bytes")


def check_count(what: str, count: int, limit: int) -> None:
    """Batches and pages hold 1..limit items."""
    if count < 1:
        raise InvalidArgument(f"{what} must be at least 1")
    if count > limit:
        raise InvalidArgument(f"{what} is {count}, more than the limit of {limit}")


def check_unique(what: str, ids: Sequence[int]) -> None:
    """A list of ids may not name one twice: its per-id results would be ambiguous."""
    if len(set(ids)) != len(ids):
        raise InvalidArgument(f"{what} repeats an id")
