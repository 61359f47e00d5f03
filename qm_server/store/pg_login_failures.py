"""Failed logins counted in PostgreSQL, so that login throttles hold across every node.

One row per counted thing (`login_failures`, pg_sql migration 4): a (user, host) pair, a
host, or a user, keyed by kind and name. Each operation is ONE statement on the
database's clock (pg_sql.NOW), so nodes never disagree about when a backoff ends, and a
failure counted on one node is seen by the next login on any node:

- `failed`: one statement of three upserts (INSERT ... ON CONFLICT DO UPDATE): the user's
  count first, then the pair's, whose allowance depends on the user's new count, then the
  host's. Concurrent failures of one key queue on its row, so none is lost and no two
  nodes both see the same count. Every such statement takes its rows in the same order
  (user, pair, host), so two of them cannot deadlock.
- `refusal`: one statement that reads the pair's and the host's backoff and marks the
  first refusal of a backoff as logged (a conditional UPDATE: one node logs it).
- `succeeded`: one DELETE of the pair's row.

The arithmetic is auth.LoginThrottle's, in SQL: no backoff before the allowance, then
1 s doubling with each further failure up to max_backoff_s; a count whose last failure
is older than forget_failures_after_s starts again from one. Rows that old are deleted
by `failed` itself, at most once per PRUNE_EVERY_S on each node: the table holds at most
the keys that failed within that window, where the in-memory counts are bounded by a
number of keys instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Final

from qm_server.config import AuthSettings
from qm_server.login_failures import Refusal, pair_key
from qm_server.store.pg_sql import NOW

if TYPE_CHECKING:
    from qm_server.store.pg_driver import Conn

PAIR: Final = 0
HOST: Final = 1
USER: Final = 2
PRUNE_EVERY_S = 60.0
PRUNE_CHUNK = 1000

# A row's count with one more failure: one again after a quiet forget_ms.
_NEXT = f"CASE WHEN {NOW} - f.last_failure > %(forget_ms)s THEN 1 ELSE f.failures + 1 END"


def _backoff_ms(failures: str, free: str) -> str:
    """LoginThrottle.failed's backoff for `failures` with an allowance of `free`."""
    return (
        f"CASE WHEN ({failures}) >= ({free}) THEN least(%(max_ms)s::float8, "
        f"1000 * power(2::float8, least(({failures}) - ({free}), 62)))::bigint ELSE 0 END"
    )


def _count(kind: int, key: str, free: str) -> str:
    """One more failure of a row (created at one), with its backoff."""
    return f"""
        INSERT INTO login_failures AS f (kind, key, failures, refused_until, last_failure)
        VALUES ({kind}, {key}, 1, {NOW} + {_backoff_ms("1", free)}, {NOW})
        ON CONFLICT (kind, key) DO UPDATE SET
            failures = {_NEXT},
            refused_until = {NOW} + {_backoff_ms(_NEXT, free)},
            last_failure = {NOW},
            refusal_logged = false
    """


# The pair's allowance: one failure once its user is past the ceiling.
_PAIR_FREE = "(SELECT CASE WHEN failures > %(ceiling)s THEN 1 ELSE %(pair_free)s END FROM usr)"
# The user's count, then the pair's, then the host's. Answers the user's count.
FAILED = f"""
    WITH usr AS (
        {_count(USER, "%(user)s", "%(ceiling)s")}
        RETURNING failures
    ), pair AS (
        {_count(PAIR, "%(pair)s", _PAIR_FREE)}
    ), host AS (
        {_count(HOST, "%(host)s", "%(host_free)s")}
    )
    SELECT failures FROM usr
"""
# The pair's backoff if it backs off, else the host's: (kind, failures, ms left, whether
# this call is the first to see it since it began).
REFUSAL = f"""
    WITH hit AS (
        SELECT kind, key, failures, refused_until FROM login_failures
        WHERE (kind = {PAIR} AND key = %(pair)s OR kind = {HOST} AND key = %(host)s)
          AND refused_until > {NOW} AND {NOW} - last_failure <= %(forget_ms)s
        ORDER BY kind LIMIT 1
    ), logged AS (
        UPDATE login_failures f SET refusal_logged = true FROM hit
        WHERE f.kind = hit.kind AND f.key = hit.key AND NOT f.refusal_logged
        RETURNING f.kind
    )
    SELECT kind, failures, refused_until - {NOW}, EXISTS (SELECT FROM logged) FROM hit
"""
SUCCEEDED = f"DELETE FROM login_failures WHERE kind = {PAIR} AND key = %(pair)s"
PRUNE = f"""
    DELETE FROM login_failures WHERE (kind, key) IN (
        SELECT kind, key FROM login_failures WHERE last_failure < {NOW} - %(forget_ms)s
        LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
"""


class PgLoginFailures:
    """login_failures.LoginFailures in the store's database.

    `connection` lends a pooled connection (autocommit: each statement commits alone);
    `params` adds the store's `now` (None: the database's clock; a test's fake one)."""

    def __init__(
        self,
        settings: AuthSettings,
        connection: Callable[[], AbstractAsyncContextManager[Conn]],
        params: Callable[..., dict[str, Any]],
    ) -> None:
        self._settings = settings
        self._connection = connection
        self._params = params
        self._forget_ms = int(settings.forget_failures_after_s * 1000)
        self._prune_at = 0.0  # monotonic time of the next prune

    async def refusal(self, user: str, host: str) -> Refusal | None:
        params = self._params(pair=pair_key(user, host), host=host, forget_ms=self._forget_ms)
        async with self._connection() as conn:
            cursor = await conn.execute(REFUSAL, params)
            row = await cursor.fetchone()
        if row is None:
            return None
        kind, failures, left_ms, first = row
        return Refusal(int(left_ms) / 1000, int(failures), kind == HOST, bool(first))

    async def failed(self, user: str, host: str) -> int:
        settings = self._settings
        params = self._params(
            user=user,
            pair=pair_key(user, host),
            host=host,
            ceiling=settings.user_failures_ceiling,
            pair_free=settings.failures_before_backoff,
            host_free=settings.host_failures_before_backoff,
            max_ms=int(settings.max_backoff_s * 1000),
            forget_ms=self._forget_ms,
        )
        async with self._connection() as conn:
            cursor = await conn.execute(FAILED, params)
            row = await cursor.fetchone()
            assert row is not None  # an upsert always answers its row
            if time.monotonic() >= self._prune_at:
                self._prune_at = time.monotonic() + PRUNE_EVERY_S
                await _prune(conn, self._params(forget_ms=self._forget_ms, limit=PRUNE_CHUNK))
        return int(row[0])

    async def succeeded(self, user: str, host: str) -> None:
        async with self._connection() as conn:
            await conn.execute(SUCCEEDED, self._params(pair=pair_key(user, host)))


async def _prune(conn: Conn, params: dict[str, Any]) -> None:
    """Delete rows forgotten already (their next failure would count from one)."""
    while True:
        cursor = await conn.execute(PRUNE, params)
        if cursor.rowcount < PRUNE_CHUNK:
            return
