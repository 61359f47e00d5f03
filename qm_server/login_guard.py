"""Who may attempt a login now: throttles against guessing, and a line per host.

Why not per user: a throttle keyed by the user name alone lets anyone keep that user out
by failing logins as them. Failures are counted as established systems count them
(fail2ban and nginx's limit_req per address; django-axes' lockout by user and address;
Entra's smart lockout, which locks out unfamiliar places, not the account):

- per (user, host) pair: `failures_before_backoff` free failures, then a backoff that
  doubles up to `max_backoff_s`. Guessing one user's password from one host stays slow;
  the same user logging in from another host is not affected.
- per host, whatever the user: `host_failures_before_backoff`, likewise, so one host
  cannot guess many users' passwords quickly. A success does not clear it (a valid
  account would otherwise reset it between guesses); it is forgotten after a quiet
  `forget_failures_after_s`.
- per user, over all hosts: only a ceiling. Past `user_failures_ceiling` recent failures
  each host gets one failure for that user before its pair backoff starts: a guess spread
  over many hosts is slowed, and a host that has not failed for the user is never refused.

Why a line per host: RSA decryption and the password hash are the expensive part of a
login, and a burst of parallel calls passes any throttle check before the first of them
fails. Logins from one host are therefore judged one at a time, with a bounded line
behind; a call checks the throttle when its turn comes, before any expensive work. A
flood from one host then holds at most one crypto worker, and its refused calls cost
almost nothing.

Where the counts live (login_failures.py): in memory for one server; in the store when
servers share one, so that the budgets hold across the cluster, not per server. The line
per host stays in each server: it guards that server's CPU.

Every refusal and failure is an audit event (audit.py: login.failed, login.throttled) with
the user and the peer (never a password or token), so that an operator can see an
attack; a refusal once per backoff, not once per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from qm_server import audit, errors
from qm_server.config import AuthSettings
from qm_server.login_failures import LoginFailures, MemoryLoginFailures

log = logging.getLogger(__name__)

# User names reach the throttle and the log before anything has checked them; a longer
# name is cut to this (names sharing a prefix this long share their counts).
MAX_NAME_CHARS = 256


@dataclass
class _Line:
    """Logins of one host: one judged at a time, the others waiting their turn."""

    turn: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    calls: int = 0  # judged or waiting
    refusal_logged: bool = False


class LoginGuard:
    def __init__(
        self,
        settings: AuthSettings,
        clock: Callable[[], float],
        failures: LoginFailures | None = None,
    ) -> None:
        """`failures`: where the counts live; None keeps them in memory (one server)."""
        self._settings = settings
        self._failures = failures or MemoryLoginFailures(settings, clock)
        self._lines: dict[str, _Line] = {}
        # Since the start, for metrics: failed logins, and logins refused unjudged
        # (throttled, or too many in progress from one host).
        self.failures = 0
        self.refusals = 0

    @contextlib.asynccontextmanager
    async def admit(self, username: str, host: str) -> AsyncIterator[None]:
        """Wait for this host's turn, then refuse at once if throttled; else let the
        login do its expensive work inside the block."""
        line = self._lines.setdefault(host, _Line())
        if line.calls > self._settings.logins_waiting_per_host:
            if not line.refusal_logged:  # once while the line stays full or busy
                line.refusal_logged = True
                audit.record(
                    audit.Event.LOGIN_THROTTLED,
                    user=_shown(username),
                    reason="logins in progress from this host (further refusals while "
                    "they last are not logged)",
                    in_progress=line.calls,
                )
            self.refusals += 1
            raise errors.ResourceExhausted(
                "too many logins in progress from this address; retry shortly"
            )
        line.calls += 1
        try:
            async with line.turn:
                await self.check(username, host)
                yield
        finally:
            line.calls -= 1
            self._forget_if_idle(host, line)

    async def check(self, username: str, host: str) -> None:
        """ResourceExhausted while the (user, host) pair or the host is backing off."""
        refusal = await self._failures.refusal(_shown(username), host)
        if refusal is None:
            return
        if refusal.first:
            audit.record(
                audit.Event.LOGIN_THROTTLED,
                user=_shown(username),
                reason="failures from this host"
                if refusal.by_host
                else "failures of this user from this host",
                failures=refusal.failures,
                retry_after_s=round(refusal.retry_after_s, 1),
            )
        self.refusals += 1
        raise errors.ResourceExhausted(
            f"too many failed logins; retry in {refusal.retry_after_s:.1f} s"
        )

    async def failed(self, username: str, host: str, reason: str) -> None:
        self.failures += 1
        user = _shown(username)
        audit.record(audit.Event.LOGIN_FAILED, user=user, reason=reason)
        user_failures = await self._failures.failed(user, host)
        if user_failures == self._settings.user_failures_ceiling + 1:
            log.warning(
                "user %r had %d failed logins from all hosts within %.0f s: each host now "
                "gets one failure for this user before backing off",
                user,
                user_failures,
                self._settings.forget_failures_after_s,
            )

    async def succeeded(self, username: str, host: str) -> None:
        """Clears the pair only: see the module docstring for the host and the user."""
        await self._failures.succeeded(_shown(username), host)

    def _forget_if_idle(self, host: str, line: _Line) -> None:
        if line.calls == 0 and self._lines.get(host) is line:
            del self._lines[host]


def _shown(username: str) -> str:
    return username[:MAX_NAME_CHARS]
