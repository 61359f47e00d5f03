"""The Python client: one object per user session, thread-safe.

``QueueManagerClient`` composes parts that each have one job. Each part is given the
shared session, not the client, so none of them imports this module:

- ``_session.py``: the session (channel, current login, the unary call that logs in again
  and reports a lost session, the messages held);
- ``_heartbeat.py``: the thread that keeps the session alive;
- ``_lease_keeper.py``: the thread that extends the leases of messages being handled;
- ``maps.py`` (``QMap``) and ``subscribe.py`` (``Subscription``): views built on it;
- ``_lifecycle.py``: the typed records of queue settings, counts and dead letters;
- ``_sessions.py``: the typed records of sessions (``heartbeat``, ``list_sessions``).

The rules are shared with the asyncio client (``aio.py``) and live in modules without
I/O: ``_ops.py`` (each method's request and what its answer becomes),
``_session_core.py`` (session state; a call's re-login and retry steps),
``_lease_book.py``, ``_subscription_core.py`` and ``_client_base.py`` (the constructor).
A method here builds an operation and hands it to the session, which blocks on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import qm_client._ops as ops

from ._channel import open_channel
from ._client_base import DEFAULT_MAX_LEASE, DEFAULT_PAGE_SIZE, DEFAULT_TIMEOUT, ClientBase
from ._heartbeat import Heartbeat
from ._lease_keeper import LeaseGuard, LeaseKeeper
from ._lifecycle import (
    AddedIds,
    DeadLetter,
    LeaseResult,
    QueueInfo,
    QueueSettings,
    QueueSummary,
    RedriveResult,
)
from ._message import Message
from ._session import Session, SessionLoss
from ._sessions import SessionStatus, SessionSummary
from .errors import MessageNotFound, QMError, error_for_rpc_error
from .maps import QMap
from .subscribe import Subscription

__all__ = [
    "DEFAULT_MAX_LEASE",
    "DEFAULT_TIMEOUT",
    "Message",
    "QueueManagerClient",
    "SessionLoss",
    "health",
]

_T = TypeVar("_T")


class QueueManagerClient(ClientBase[Message]):
    """A logged-in session with a queue manager server.

    Logging in happens in the constructor, so a wrong password or an unreachable server
    fails here rather than on first use. Use it as a context manager, or call
    :meth:`close`: closing logs out, which hands every message still held back to the queue
    at once instead of after the session ttl.

    Args:
        target: ``host:port`` of the server, or any gRPC target: ``dns:///qm.internal:50051``
            (every address the name resolves to), ``ipv4:10.0.0.1:50051,10.0.0.2:50051``.
        username: The user to log in as.
        password: Its password; it only ever travels RSA-OAEP encrypted with a one-use
            challenge, so a captured login cannot be replayed.
        root_certificates: PEM roots to verify a TLS server with. With neither these nor
            a client certificate the channel is plaintext; with only a client certificate,
            the system's roots verify the server.
        certificate_chain: PEM certificate chain of this client, for a server that
            requires mutual TLS; goes with ``private_key``.
        private_key: PEM private key of that certificate.
        pin_fingerprint: Hex SHA-256 of the server's login key (the server logs it at
            start). When given, a server with any other key gets no password:
            :class:`FingerprintMismatch`.
        timeout: Deadline in seconds for each call; waits asked of ``poll``/``pull`` are
            added to it.
        heartbeat: Keep the session alive from a background thread. Turn off only when
            the caller makes calls often enough itself.
        on_session_lost: Called (from whichever thread noticed) after the client logged in
            again because its session had ended. Without it, the loss is logged at
            WARNING on the ``qm_client`` logger.
        max_lease: Seconds after its delivery past which the lease keeper stops extending
            a message's lease (:meth:`keep_lease`): its handler is taken to be hung.
        on_lease_lost: Called from the lease keeper's thread with the message and the
            error (``None`` for ``max_lease``) when it loses a lease. Without it, the
            loss is logged at WARNING. Either way the message's ack raises
            :class:`LeaseLost`.
        load_balancing: ``"round_robin"`` spreads calls over every address ``target``
            resolves to: the nodes of a cluster on one PostgreSQL store, any of which
            accepts the session (docs/deployment.md). ``""`` (gRPC's default,
            ``"pick_first"``) keeps to one address while it answers.
    """

    _session_type = Session
    _lease_keeper_type = LeaseKeeper
    _heartbeat_type = Heartbeat
    _session: Session
    _lease_keeper: LeaseKeeper
    _heartbeat: Heartbeat | None

    def _assembled(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.start()

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self, *, logout: bool = True) -> None:
        """Stop the heartbeat and the lease keeper, log out and close the channel. Safe to
        call twice.

        ``logout=False`` leaves the session alive on the server until its ttl runs out
        (``qm token`` hands that session to another tool). A failed logout is logged, not
        raised: the session then ends by expiry, which releases the same messages later.
        """
        login = self._session.shut()
        if login is None:
            return
        self._lease_keeper.stop()
        if self._heartbeat is not None:
            self._heartbeat.join()
        self._session.end(login, logout=logout)

    # -- sessions -------------------------------------------------------------------------

    def heartbeat(self) -> SessionStatus:
        """Renew the session now and return its status (:class:`SessionStatus`): time
        left, messages held, streams open. The background heartbeat does this already."""
        return self._session.run(ops.heartbeat())

    def list_sessions(
        self, *, username: str = "", page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[SessionSummary]:
        """Every live session (only ``username``'s, if given), by id, a page per call
        (:class:`SessionSummary`). Admins only: :class:`PermissionDenied` otherwise."""
        return self._session.pages(ops.list_sessions(username, page_size))

    def end_session(self, session_id: int) -> None:
        """End another session as its logout would: its streams and waits fail with
        :class:`Unauthenticated`, its messages are ready again. Admins only;
        :class:`SessionNotFound` when no live session has that id."""
        self._session.run(ops.end_session(session_id))

    # -- queues ---------------------------------------------------------------------------

    def new_queue(
        self, name: str, settings: QueueSettings | None = None, *, exist_ok: bool = False
    ) -> None:
        """Create an empty queue; the only way a queue comes to exist.

        ``settings`` (:class:`QueueSettings`) sets its lifecycle; unset fields take their
        defaults, the seed's behaviour. Raises :class:`QueueAlreadyExists` unless
        ``exist_ok`` (an existing queue keeps its own settings: :meth:`update_queue`).
        """
        self._session.run(ops.new_queue(name, settings, exist_ok))

    def update_queue(self, name: str, settings: QueueSettings) -> QueueSettings:
        """Change the settings that are not ``None``; returns every setting as it is now.

        Messages in flight keep their lease; the rest follow the new settings from now on.
        """
        return self._session.run(ops.update_queue(name, settings))

    def queue_info(self, name: str) -> QueueInfo:
        """A queue's settings and counts (:class:`QueueInfo`)."""
        return self._session.run(ops.queue_info(name))

    def list_queues(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[QueueSummary]:
        """Every queue the user may read, by name, a page per call (:class:`QueueSummary`).

        Paged by name: a queue created or destroyed while the listing runs may or may not
        be listed, and no other is skipped or repeated.
        """
        return self._session.pages(ops.list_queues(page_size))

    def list_maps(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[str]:
        """The names of every map the user may read, a page per call, as ``list_queues``."""
        return self._session.pages(ops.list_maps(page_size))

    def purge(self, queue: str) -> int:
        """Remove every ready and delayed message of ``queue`` in one step; returns how
        many. Messages in flight stay with their holders."""
        return self._session.run(ops.purge(queue))

    def dead_letters(
        self, queue: str, *, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[DeadLetter]:
        """The dead letters ``queue`` holds, by id, with their history, a page per call."""
        return self._session.pages(ops.dead_letters(queue, page_size))

    def redrive(self, queue: str, ids: Iterable[int] | None = None) -> RedriveResult:
        """Move dead letters of ``queue`` (all, or the ids given) back to their original
        queues, ready at once, delivery count kept. Safe to repeat."""
        return self._session.run(ops.redrive(queue, ids))

    def add(
        self,
        queue: str,
        element: str,
        *,
        delay: float | None = None,
        request_id: str | None = None,
        idempotent: bool = False,
    ) -> int:
        """Append one message and return its id.

        ``delay``: seconds before it is ready (default: the queue's ``delay_ms``).
        ``request_id`` (or ``idempotent=True``, which makes one up) makes the add safe to
        repeat: the client then repeats it after UNAVAILABLE, and the server answers a
        repeat with the first id. Without either it is not repeated: a repeat could add it
        twice.
        """
        return self._session.run(ops.add(queue, element, delay, request_id, idempotent))

    def add_all(
        self,
        queue: str,
        elements: Iterable[str],
        *,
        delay: float | None = None,
        request_id: str | None = None,
        idempotent: bool = False,
    ) -> AddedIds:
        """Append several messages atomically (all or none); ids in the same order.

        ``delay``, ``request_id`` and ``idempotent`` as for :meth:`add`. The answer is a
        ``list`` of ids that also says whether it was a replay (:class:`AddedIds`).
        """
        return self._session.run(ops.add_all(queue, elements, delay, request_id, idempotent))

    def poll(
        self, queue: str, *, wait: float = 0.0, ack_deadline: float | None = None
    ) -> Message | None:
        """Take the oldest ready message, or ``None`` if none is ready within ``wait`` s.

        The message stays in flight for the client's session until acked, nacked, the
        session ends, or its lease runs out: ``ack_deadline`` s (1 to 43,200), else the
        queue's ``ack_deadline_ms`` (none by default). The server caps ``wait`` (20 s by
        default).
        """
        return self._session.run(ops.poll(self._session, queue, wait, ack_deadline))

    def pull(
        self,
        queue: str,
        max_count: int,
        *,
        wait: float = 0.0,
        ack_deadline: float | None = None,
    ) -> list[Message]:
        """Take up to ``max_count`` of the oldest ready messages; ``[]`` if none is ready.

        Waits up to ``wait`` s for the first one; returns what is ready then, not a full
        batch. ``ack_deadline`` as for :meth:`poll`.
        """
        return self._session.run(ops.pull(self._session, queue, max_count, wait, ack_deadline))

    def extend_lease(self, messages: Iterable[Message | int], deadline: float) -> list[LeaseResult]:
        """Move the lease of messages held by the client's session to ``deadline`` s from
        now (1 to 43,200); ``0`` gives them back at once (ready again, without retry
        backoff; it counts as a delivery). A result per message, in order
        (:class:`LeaseResult`); failures are in the results, not raised.

        A ``Message`` delivered to a session that has since ended fails with
        :class:`MessageReleased` without a call. To keep a lease alive while a handler
        runs, :meth:`keep_lease` does this from a background thread.
        """
        return self._session.run(ops.extend_lease(self._session, messages, deadline))

    def keep_lease(self, message: Message, *, max_lease: float | None = None) -> LeaseGuard:
        """Keep ``message``'s lease alive from the lease keeper's thread until the returned
        guard is released (use it as a context manager), at most ``max_lease`` s from its
        delivery (default: the client's). A message without a lease needs no keeping: its
        guard does nothing.

        A lost lease shows on the guard (``lost``, ``cause``), goes to ``on_lease_lost``
        (or the log), and makes the message's ack and nack raise :class:`LeaseLost`.
        """
        return self._lease_keeper.keep(message, max_lease)

    def handle(
        self,
        message: Message,
        handler: Callable[[Message], _T],
        *,
        max_lease: float | None = None,
    ) -> _T:
        """Run ``handler(message)`` with its lease kept alive; ack the message when the
        handler returns, nack it when it raises (and re-raise). Returns what it returned.

        Raises :class:`LeaseLost` when the lease was lost meanwhile (the message is, or
        will be, delivered again; the handler's work on it does not count), and what
        ``ack`` raises otherwise.
        """
        with self.keep_lease(message, max_lease=max_lease):
            try:
                result = handler(message)
            except Exception:
                # Lost or released, it comes back either way (the loss was reported by
                # the keeper); the handler's error is the one to raise.
                with contextlib.suppress(QMError):
                    message.nack()
                raise
            message.ack()
        return result

    def ack(self, message: Message) -> None:
        """Same as ``message.ack()``.

        Finished by the message's owner: a subscription's message goes on its stream,
        which must learn that it has room again (a unary Ack would leave the stream
        counting it as held, and a full window would push nothing more).
        """
        message.ack()

    def nack(self, message: Message) -> None:
        """Same as ``message.nack()``; finished by its owner, as for :meth:`ack`."""
        message.nack()

    def ack_many(self, messages: Iterable[Message], *, nack: bool = False) -> list[Message]:
        """Finish many messages in one durable step (BatchAck); return those that failed.

        A message fails when its session has ended (it was released) or the server no
        longer has it in flight for the client's session. Failures are returned rather than raised
        because the others were finished all the same.
        """
        own, others = ops.split_by_owner(messages, self._session)
        failed: list[Message] = []
        for message in others:
            try:
                message.nack() if nack else message.ack()
            except MessageNotFound:
                failed.append(message)
        return failed + self._session.run(ops.batch_ack(self._session, own, nack))

    def size(self, queue: str) -> int:
        """The number of ready messages (in-flight ones are not counted)."""
        return self._session.run(ops.size(queue))

    def is_empty(self, queue: str) -> bool:
        """Whether no message is ready (messages may still be in flight)."""
        return self._session.run(ops.is_empty(queue))

    def unacked(self, queue: str) -> int:
        """The number of messages in flight over all sessions (seed: get_uncheck_num)."""
        return self._session.run(ops.unacked(queue))

    def destroy_queue(self, queue: str, *, force: bool = False) -> None:
        """Delete a queue. Without ``force``, :class:`QueueNotEmpty` while it holds messages."""
        self._session.run(ops.destroy_queue(queue, force))

    def subscribe(
        self, queue: str, max_unacked: int = 16, *, ack_deadline: float | None = None
    ) -> Subscription:
        """Stream messages as they arrive, at most ``max_unacked`` held at once.

        Iterate the returned object; ack or nack each message to make room for the next.
        Closing it (or leaving its ``with`` block) releases what it still holds.
        ``ack_deadline`` as for :meth:`poll`, for every message pushed.
        """
        return Subscription(self._session, queue, max_unacked, ops.optional_millis(ack_deadline))

    # -- maps -----------------------------------------------------------------------------

    def map(self, name: str, *, page_size: int = 500) -> QMap:
        """A ``MutableMapping`` view of a map; no call is made until it is used."""
        return QMap(self._session, name, page_size=page_size)


def health(
    target: str,
    service: str = "",
    *,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """The ``grpc.health.v1`` status of ``service`` (``""`` for the whole server).

    Needs no login, so monitors can call it. Returns the status name, e.g. ``SERVING``.
    TLS arguments as for :class:`QueueManagerClient`.
    """
    with open_channel(target, root_certificates, certificate_chain, private_key) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            raise error_for_rpc_error(error) from error
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return name
