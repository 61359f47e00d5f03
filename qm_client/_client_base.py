"""What the sync and the asyncio client have in common before any call: their
constructor, the parts it assembles, and the read-only views of the session.

Each client names its own parts (``Session`` or ``AsyncSession``, a thread or a task
for the heartbeat and the lease keeper); their arguments are the same, so they are
declared once, here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from ._message import Delivery
from ._session_core import Endpoint, SessionCore, SessionLoss
from ._sessions import ServerLimits
from .errors import QMError

__all__ = ["DEFAULT_MAX_LEASE", "DEFAULT_PAGE_SIZE", "DEFAULT_TIMEOUT", "ClientBase"]

DEFAULT_TIMEOUT = 10.0
"""Seconds every call may take before it fails with DeadlineExceeded (plus any wait)."""

DEFAULT_MAX_LEASE = 3600.0
"""Seconds the lease keeper extends a message's lease at most, from its delivery."""

DEFAULT_PAGE_SIZE = 100
"""Entries per call of the listing iterators."""

_M = TypeVar("_M", bound=Delivery)


class ClientBase(Generic[_M]):
    """The constructor both clients share; the arguments are documented on
    :class:`QueueManagerClient`."""

    _session_type: ClassVar[Callable[..., Any]]
    _lease_keeper_type: ClassVar[Callable[..., Any]]
    _heartbeat_type: ClassVar[Callable[..., Any]]

    def __init__(
        self,
        target: str,
        username: str,
        password: str,
        *,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        pin_fingerprint: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        heartbeat: bool = True,
        on_session_lost: Callable[[SessionLoss], None] | None = None,
        max_lease: float = DEFAULT_MAX_LEASE,
        on_lease_lost: Callable[[_M, QMError | None], None] | None = None,
        load_balancing: str = "",
    ) -> None:
        self.target = target
        self.username = username
        endpoint = Endpoint(
            target,
            username,
            password,
            root_certificates,
            certificate_chain,
            private_key,
            pin_fingerprint,
            timeout,
            load_balancing,
        )
        self._session: SessionCore[_M] = self._session_type(endpoint, on_session_lost)
        self._lease_keeper = self._lease_keeper_type(self._session, max_lease, on_lease_lost)
        self._heartbeat = self._heartbeat_type(self._session) if heartbeat else None
        self._assembled()

    def _assembled(self) -> None:
        """Called once the parts exist (the sync client starts its heartbeat here)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, user={self.username!r})"

    @property
    def token(self) -> str:
        """The current session token, for tools that speak the wire protocol directly."""
        return self._session.current().token

    @property
    def session_ttl(self) -> float:
        """Seconds of inactivity after which the server ends the session."""
        return self._session.current().ttl

    @property
    def server_limits(self) -> ServerLimits:
        """The server's batch and request size limits, as it told them at login."""
        login = self._session.current()
        return ServerLimits(login.max_batch, login.max_request_bytes)
