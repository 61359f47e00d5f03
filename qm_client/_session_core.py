"""The session's state and decisions, shared by the sync and the asyncio client.

Nothing here does I/O, so both ``Session`` (blocking calls) and ``AsyncSession``
(``grpc.aio``) drive the same rules: which login is current, what it holds, which lease
was lost, and what to do with each answer of a call (log in again, repeat after a
pause, or return). The drivers only send requests and wait.

The lock is a ``threading.Lock`` for both: it guards a few fields for a few lines and is
never held across a call or an ``await``, so it never blocks an event loop.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from qm.v1 import queue_manager_pb2 as pb

from ._lifecycle import datetime_from_ms, required_datetime_from_ms
from ._message import Delivery, Login
from ._retry import answer_retry_delays, retried_by_request_id, retried_on_unavailable_answer
from .errors import (
    ClientClosed,
    LeaseLost,
    MessageReleased,
    QMError,
    Unauthenticated,
    Unavailable,
    error_for_code,
)

__all__ = [
    "CallRetries",
    "Endpoint",
    "Pause",
    "Renew",
    "Send",
    "SessionCore",
    "SessionLoss",
    "Step",
    "Stepper",
    "call_steps",
]

logger = logging.getLogger("qm_client")


class _Response(Protocol):
    @property
    def code(self) -> int: ...

    @property
    def message(self) -> str: ...


_D = TypeVar("_D", bound=Delivery)


@dataclass(frozen=True)
class SessionLoss:
    """What the caller is told when the client had to log in again.

    ``released`` are the messages the lost session held: the server has put them back to
    ready, so their ``ack``/``nack`` now raise :class:`MessageReleased` and another
    consumer may already be working on them. Empty when the session held nothing.
    """

    released: tuple[Delivery, ...]
    generation: int


def released_error() -> MessageReleased:
    return MessageReleased("the session this message was delivered to has ended")


class Step(enum.Enum):
    """What a call does after an answer."""

    DONE = enum.auto()
    RENEW = enum.auto()
    REPEAT = enum.auto()


class CallRetries:
    """The decisions of one token call (``Session.call``), made the same way by both
    clients.

    A call answered UNAUTHENTICATED was not applied, so it is made once more under a new
    login, except a call bound to the login it names (acks: ``bound``), which raises
    :class:`MessageReleased` then. A CODE_UNAVAILABLE answer applied nothing: the call is
    repeated after a pause if its method allows (``_retry.py``). An add with a request id
    is also repeated after a gRPC UNAVAILABLE status.
    """

    def __init__(self, request: object, *, bound: bool) -> None:
        self.rpc = type(request).__name__.removesuffix("Request")
        self._bound = bound
        retried = retried_on_unavailable_answer(self.rpc, request)
        self._pauses: Iterator[float] = answer_retry_delays() if retried else iter(())
        self._by_request_id = retried_by_request_id(self.rpc, request)
        self._renewed = False
        self.pause = 0.0

    def after_status_unavailable(self, error: QMError) -> bool:
        """Whether to repeat after a gRPC UNAVAILABLE status (after ``self.pause`` s)."""
        if not self._by_request_id or (pause := next(self._pauses, None)) is None:
            return False
        logger.debug("%s failed (%s); again in %.2f s", self.rpc, error, pause)
        self.pause = pause
        return True

    def after_answer(self, response: _Response) -> Step:
        """What to do with an answer: log in again, repeat after ``self.pause`` s, or
        stop (then :meth:`check` judges the answer)."""
        if response.code == pb.CODE_UNAUTHENTICATED and not self._renewed:
            self._renewed = True
            return Step.RENEW
        if response.code != pb.CODE_UNAVAILABLE or (pause := next(self._pauses, None)) is None:
            return Step.DONE
        logger.debug(
            "%s answered UNAVAILABLE (%s); again in %.2f s", self.rpc, response.message, pause
        )
        self.pause = pause
        return Step.REPEAT

    def after_renewal(self) -> None:
        """A bound call is not repeated under the new login: its messages were released."""
        if self._bound:
            raise released_error()

    @staticmethod
    def check(response: _Response, accept: tuple[int, ...]) -> None:
        """Raise the typed error of an answer that is neither OK nor accepted."""
        if response.code != pb.CODE_OK and response.code not in accept:
            raise error_for_code(response.code, response.message)


@dataclass(frozen=True)
class Send:
    """Send ``request`` once with this deadline; the answer comes back, a failure
    (a typed error) is thrown back."""

    request: Any
    timeout: float


@dataclass(frozen=True)
class Pause:
    """Wait ``seconds``; back comes whether the session was shut meanwhile."""

    seconds: float


@dataclass(frozen=True)
class Renew:
    """Replace the dead ``login`` (``renew``); back comes the new login."""

    login: Login


Action = Send | Pause | Renew
CallSteps = Generator[Action, Any, tuple[Any, Login]]


def call_steps(
    core: SessionCore[Any],
    request: Any,
    timeout: float,
    accept: tuple[int, ...],
    bound_to: Login | None,
) -> CallSteps:
    """A token call as the actions it takes (sans-IO): each session drives it with its
    own I/O. Returns the answer with the login that got it, or raises its typed error.

    Logs in again once if the session is gone, and repeats after a CODE_UNAVAILABLE
    answer (or, for an add with a request id, a gRPC UNAVAILABLE status) as
    :class:`CallRetries` decides.
    """
    login = core.current()
    core.check_bound(login, bound_to)
    retries = CallRetries(request, bound=bound_to is not None)
    while True:
        request.token = login.token
        try:
            response = yield Send(request, timeout)
        except Unavailable as error:
            if not retries.after_status_unavailable(error) or (yield Pause(retries.pause)):
                raise
            continue
        step = retries.after_answer(response)
        if step is Step.RENEW:
            login = yield Renew(login)
            retries.after_renewal()
            continue
        # Shut during a pause: report the last answer.
        if step is Step.DONE or (yield Pause(retries.pause)):
            break
    retries.check(response, accept)
    return response, login


class Stepper:
    """Walks a :func:`call_steps` generator for a session: :meth:`next` gives the next
    action (``None`` once the call is over, its answer in ``result``); the session does
    the action and hands back its outcome or its failure."""

    def __init__(self, steps: CallSteps) -> None:
        self._steps = steps
        self._outcome: Any = None
        self._failure: QMError | None = None
        self.result: tuple[Any, Login] | None = None

    def next(self) -> Action | None:
        outcome, failure = self._outcome, self._failure
        self._outcome = self._failure = None
        try:
            return self._steps.send(outcome) if failure is None else self._steps.throw(failure)
        except StopIteration as done:
            self.result = done.value
            return None

    def done(self, outcome: Any) -> None:
        self._outcome = outcome

    def failed(self, error: QMError) -> None:
        self._failure = error

    def answer(self) -> tuple[Any, Login]:
        assert self.result is not None
        return self.result


def check_logout(response: _Response) -> None:
    """Log a refused logout: the session then ends by expiry instead."""
    if response.code not in (pb.CODE_OK, pb.CODE_UNAUTHENTICATED):
        failure = error_for_code(response.code, response.message)
        logger.warning("logout failed, the session will expire instead: %s", failure)


def relogin_failed(error: Unauthenticated) -> Unauthenticated:
    return Unauthenticated(
        f"session ended and logging in again failed: {error.message}", code=error.code
    )


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom a session logs in, and how long each call may take."""

    target: str
    username: str
    password: str = field(repr=False)
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    pin_fingerprint: str | None = None
    timeout: float = 10.0
    load_balancing: str = ""

    @property
    def tls(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        return self.root_certificates, self.certificate_chain, self.private_key


class SessionCore(Generic[_D]):
    """The state of a logged-in session: the current login, whether it is shut, and the
    messages each login holds. Thread-safe; no I/O."""

    message_type: type[_D]
    """The record a delivery becomes (``Message`` or ``AsyncMessage``)."""

    def __init__(
        self, endpoint: Endpoint, on_session_lost: Callable[[SessionLoss], None] | None
    ) -> None:
        self.endpoint = endpoint
        self.target = endpoint.target
        self.username = endpoint.username
        self.timeout = endpoint.timeout
        self._on_session_lost = on_session_lost
        # Guards _current_login, _closed and every Login's held, lost and finishing.
        self._lock = threading.Lock()
        self._closed = False
        self._current_login: Login | None = None

    # -- the current login ------------------------------------------------------------------

    def current(self) -> Login:
        """The login calls are made under now; :class:`ClientClosed` once shut."""
        with self._lock:
            if self._closed:
                raise ClientClosed("the client is closed")
            if self._current_login is None:
                raise ClientClosed("the client is not logged in: await login() or use async with")
            return self._current_login

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def logged_in(self) -> bool:
        return self._current_login is not None

    def shut_login(self) -> Login | None:
        """Refuse further calls; returns the login to end, or ``None`` if already shut."""
        with self._lock:
            if self._closed or self._current_login is None:
                self._closed = True
                return None
            self._closed = True
            return self._current_login

    def check_bound(self, login: Login, bound_to: Login | None) -> None:
        if bound_to is not None and bound_to is not login:
            raise released_error()

    def adopt(self, fresh: Login) -> bool:
        """Make ``fresh`` current; ``False`` if the session was shut meanwhile (then the
        caller ends ``fresh`` too, or it would hold whatever it is given until its ttl)."""
        with self._lock:
            if self._closed:
                return False
            self._current_login = fresh
            return True

    def lost(self, stale: Login, fresh: Login) -> None:
        """Report that ``stale`` ended and ``fresh`` replaced it."""
        loss = SessionLoss(released=tuple(stale.held.values()), generation=fresh.generation)
        if self._on_session_lost is None:
            logger.warning(
                "session of %s@%s ended; logged in again; %d held message(s) were released: %s",
                self.username,
                self.target,
                len(loss.released),
                [m.message_id for m in loss.released],
            )
            return
        try:
            self._on_session_lost(loss)
        except Exception:
            # The callback runs on the heartbeat too; a bug in it must not stop the
            # heartbeat, but it must be seen.
            logger.exception("on_session_lost callback failed")

    # -- messages held ----------------------------------------------------------------------

    def hold(
        self,
        login: Login,
        queue: str,
        info: pb.ElementInfo | pb.PollResponse,
        owner: object | None = None,
        lease_ms: int | None = None,
    ) -> _D:
        """Record a delivery, so that a lost session can say what it released.

        ``owner`` finishes the message; by default the session itself, with an ``Ack`` call.
        ``lease_ms`` is the ack deadline the call asked for, if it asked.
        """
        message = self.message_type(
            element=info.element,
            message_id=info.message_id,
            delivery_count=info.delivery_count,
            queue=queue,
            enqueued_at=required_datetime_from_ms(info.enqueued_at_ms),
            lease_expires_at=datetime_from_ms(info.lease_expires_at_ms),
            _owner=self if owner is None else owner,
            _login=login,
            _lease_ms=lease_ms,
        )
        with self._lock:
            login.held[message.message_id] = message
        return message

    def unhold(self, login: Login, message_ids: Iterable[int]) -> None:
        """Forget deliveries that were finished or released."""
        with self._lock:
            for message_id in message_ids:
                login.held.pop(message_id, None)
                login.lost.pop(message_id, None)
                login.finishing.discard(message_id)

    def mark_lost(self, message: Delivery, cause: QMError | None) -> bool:
        """The lease keeper lost this message's lease: its ack or nack will say so.

        ``False`` when the message is no longer held or its ack is under way: then the
        refusal the keeper got is the ack's doing, and nothing was lost.
        """
        login, message_id = message._login, message.message_id
        with self._lock:
            if message_id not in login.held or message_id in login.finishing:
                return False
            login.lost[message_id] = cause
            return True

    def check_lease(self, message: Delivery) -> None:
        """Before an ack or nack: raise :class:`LeaseLost` (and forget the message) if its
        lease was lost, else note that it is being finished."""
        login = message._login
        with self._lock:
            if message.message_id not in login.lost:
                login.finishing.add(message.message_id)
                return
            cause = login.lost.pop(message.message_id)
            login.held.pop(message.message_id, None)
        why = "it reached max_lease" if cause is None else f"an extension failed: {cause}"
        raise LeaseLost(
            f"the lease of message {message.message_id} was lost while it was handled ({why})",
            cause=cause,
        )

    def ack_request(self, message: Delivery, ack_type: pb.AckType) -> tuple[pb.AckRequest, Login]:
        """The unary ack of a message this session core delivered, after its lease check."""
        login = message._login
        if not isinstance(login, Login) or message._owner is not self:
            raise TypeError("message was not delivered by this client")
        self.check_lease(message)
        return pb.AckRequest(message_id=message.message_id, ack_type=ack_type), login
