"""Which call a log line is about: its request id, RPC and peer, for every line it logs.

`enter` runs first in every call (handlers.py wraps each method with it) and keeps the
call's `CallInfo` in a context variable. asyncio gives each call a task of its own, and a
task started during the call (a stream's pusher, a session released in the background)
copies the variable, so whatever logs on the call's behalf, down to the engine and the
store's awaits, is tagged without passing anything along; lines not about a call (the
sweeper, the store's writer thread) carry none.

The request id is the client's `x-request-id` metadata value when it sends a sane one
(1 to 64 characters of letters, digits and `._:-`, so that it cannot forge or break a log
line), else a random one. It is also the incident id of a CODE_INTERNAL answer.
"""

from __future__ import annotations

import logging
import os
import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

if TYPE_CHECKING:  # not at run time: qm-server's main sets grpc's log level before it
    import grpc

REQUEST_ID_KEY = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(frozen=True, slots=True)
class CallInfo:
    request_id: str
    rpc: str
    peer: str


_current: ContextVar[CallInfo | None] = ContextVar("qm_call", default=None)


def current() -> CallInfo | None:
    """The call being served in this task, or None outside any call."""
    return _current.get()


def request_id_of(metadata: Any) -> str:
    """The client's x-request-id if it is sane, else a new random id (16 hex digits)."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _SANE_ID.fullmatch(value):
            return value
    return os.urandom(8).hex()


def enter(context: grpc.aio.ServicerContext[Any, Any], rpc: str) -> CallInfo:
    """Tag this task, and the tasks it starts from now on, with the call."""
    info = CallInfo(
        request_id_of(context.invocation_metadata()), rpc, unquote(context.peer() or "unknown")
    )
    _current.set(info)
    return info


class CallFilter(logging.Filter):
    """Adds `request_id`, `rpc` and `peer` to every record logged during a call (on the
    handler, so that records of every logger get them); records outside a call get none,
    and a text format shows its default there."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = _current.get()
        if info is not None:
            record.request_id = info.request_id
            record.rpc = info.rpc
            record.peer = info.peer
        return True
