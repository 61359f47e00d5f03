"""Where failed logins are counted: in this server's memory, or in a store that several
servers share.

The rules (login_guard.py's docstring says why) are the same wherever the counts live:
a (user, host) pair gets `failures_before_backoff` failures, a host
`host_failures_before_backoff` whatever the user, then each further failure doubles a
backoff (1 s, 2 s ... `max_backoff_s`); a user past `user_failures_ceiling` failures from
all hosts gives each host one failure before its pair's backoff starts; a success clears
the pair only; a count with no failure for `forget_failures_after_s` starts afresh.

One server keeps them in memory (MemoryLoginFailures, over auth.LoginThrottle). Servers
that share a store must share the counts too, or a guesser spreading attempts over N
nodes would get N times the budget: the store then gives an implementation of its own
(Store.login_failures; store/pg_login_failures.py for PostgreSQL). What stays per server
is the line of logins per host (login_guard.py): it bounds this server's CPU, which is
its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from qm_server.auth import LoginThrottle
from qm_server.config import AuthSettings


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a login is refused unjudged: its pair's backoff, else its host's."""

    retry_after_s: float
    failures: int  # recent failures of what backs off
    by_host: bool  # the host's backoff (else the pair's)
    first: bool  # the first refusal of this backoff: worth a log line, the rest are not


class LoginFailures(Protocol):
    """Failed logins of (user, host) pairs, hosts and users. `user` is the name as the
    login gave it (login_guard.py cuts it to a bounded length); `host` the client's."""

    async def refusal(self, user: str, host: str) -> Refusal | None:
        """The backoff that refuses this login now (the pair's before the host's), or
        None when it may be judged."""

    async def failed(self, user: str, host: str) -> int:
        """Count one failure against the user, the pair and the host, atomically with
        respect to every server sharing the counts; the user's recent failures from all
        hosts, this one included."""

    async def succeeded(self, user: str, host: str) -> None:
        """Clear the pair's count (not the host's nor the user's: login_guard.py)."""


class MemoryLoginFailures:
    """One server's counts, in three bounded LoginThrottles."""

    def __init__(self, settings: AuthSettings, clock: Callable[[], float]) -> None:
        self._settings = settings
        forget = settings.forget_failures_after_s
        backoff = settings.max_backoff_s
        self._pairs = LoginThrottle(
            settings.failures_before_backoff, backoff, clock, forget_after_s=forget
        )
        self._hosts = LoginThrottle(
            settings.host_failures_before_backoff, backoff, clock, forget_after_s=forget
        )
        # Only counted, never refused on.
        self._users = LoginThrottle(
            settings.user_failures_ceiling, backoff, clock, forget_after_s=forget
        )

    async def refusal(self, user: str, host: str) -> Refusal | None:
        for throttle, key in ((self._pairs, pair_key(user, host)), (self._hosts, host)):
            wait = throttle.retry_after(key)
            if wait > 0:
                return Refusal(
                    retry_after_s=wait,
                    failures=throttle.failures(key),
                    by_host=throttle is self._hosts,
                    first=throttle.first_refusal(key),
                )
        return None

    async def failed(self, user: str, host: str) -> int:
        user_failures = self._users.failures(user) + 1
        self._users.failed(user)
        under_attack = user_failures > self._settings.user_failures_ceiling
        self._pairs.failed(pair_key(user, host), 1 if under_attack else None)
        self._hosts.failed(host)
        return user_failures

    async def succeeded(self, user: str, host: str) -> None:
        self._pairs.succeeded(pair_key(user, host))


def pair_key(user: str, host: str) -> str:
    """One key for a (user, host) pair: a host holds no space, so none collide."""
    return f"{host} {user}"
