"""Our server on the PostgreSQL store: a fresh schema per run, dropped afterwards, and the
database's side of each measurement (its backends' CPU time, its transactions).

Every server of one run connects with the schema's name as ``application_name`` (libpq's
``PGAPPNAME``), so the probe finds exactly those backends in ``pg_stat_activity`` and
reads their CPU time from ``/proc`` (psutil): the database work done for our server, apart
from any other client of the same PostgreSQL. Transactions come from
``pg_stat_database`` (commits plus rollbacks of the whole database): a cheap count of
round trips that end a transaction, which other clients of the same database would add
to, so the harness reports it beside the same database's count while idle.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import psutil

CONNECT_TIMEOUT_S = 10
STATEMENT_TIMEOUT_MS = 60_000


def fresh_schema() -> str:
    """A schema name no other run uses (also the servers' application_name)."""
    return f"qm_bench_{uuid.uuid4().hex[:10]}"


def _connect(url: str) -> object:
    import psycopg  # the postgresql extra; only runs that ask for --store need it

    return psycopg.connect(
        url,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT_S,
        options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
    )


def drop_schema(url: str, schema: str) -> None:
    """Drops the run's schema and everything in it (its servers are stopped first)."""
    import psycopg.sql

    with _connect(url) as conn:  # type: ignore[attr-defined]
        conn.execute(
            psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                psycopg.sql.Identifier(schema)
            )
        )


@dataclass(frozen=True)
class DbSample:
    cpu_s: dict[int, float]
    """CPU seconds (user + system) of each of the run's backends, by pid."""
    xacts: int
    """Commits plus rollbacks of the database so far."""


def _cpu(pid: int) -> float | None:
    try:
        t = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return float(t.user + t.system)


class DbProbe:
    """Reads the database's side of a measurement; one connection of its own, outside the
    run's application_name, so its own queries are not counted as the server's CPU."""

    def __init__(self, url: str, app_name: str) -> None:
        self.url = url
        self.app_name = app_name
        self._conn = _connect(url)

    def sample(self) -> DbSample:
        conn = self._conn
        conn.execute("SELECT pg_stat_clear_snapshot()")  # type: ignore[attr-defined]
        pids = [
            int(r[0])
            for r in conn.execute(  # type: ignore[attr-defined]
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                (self.app_name,),
            ).fetchall()
        ]
        row = conn.execute(  # type: ignore[attr-defined]
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
        cpu = {p: c for p in pids if (c := _cpu(p)) is not None}
        return DbSample(cpu, int(row[0]) if row else 0)

    @staticmethod
    def delta(a: DbSample, b: DbSample) -> tuple[float, int]:
        """Backend CPU seconds and transactions between two samples; a backend that
        appeared in between counts from zero, one that left is lost (the pool keeps its
        connections, so neither happens in a steady run)."""
        cpu = sum(c - a.cpu_s.get(p, 0.0) for p, c in b.cpu_s.items())
        return cpu, b.xacts - a.xacts

    def analyze(self) -> None:
        """ANALYZE the run's messages table: what autovacuum would do within a minute,
        done at once, so that a claim's plan is measured on fresh statistics too."""
        import psycopg.sql

        self._conn.execute(  # type: ignore[attr-defined]
            psycopg.sql.SQL("ANALYZE {}.messages").format(psycopg.sql.Identifier(self.app_name))
        )

    def close(self) -> None:
        self._conn.close()  # type: ignore[attr-defined]
